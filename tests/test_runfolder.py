"""Tests for runfolder.py: keep-last-N from the files on disk, --resume auto's choice of checkpoint,
and logs cut back to a checkpoint on resume.

References are the folder's listing and the rows of a real one-epoch run (the shared
trained_run), copied before anything is changed. That a resumed run then writes the same
rows as an uninterrupted one is test_train.py's test_resume_mid_epoch_equals_uninterrupted.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import read_rows

import runfolder

LOGS = ("metrics.csv", "steps.csv", "drawn_counts.csv")


def checkpoint_names(folder) -> list[str]:
    return [path.name for path in runfolder.periodic_checkpoints(folder)]


def test_keep_last_counts_files_on_disk_across_restarts(tmp_path):
    # The first run keeps 5: both of its checkpoints stay; one more was left by an older run.
    torch.save({"global_step": 1}, tmp_path / "checkpoint_step00000001.pt")
    runfolder.save_checkpoint(tmp_path, {"global_step": 2}, keep_last=5, best=True)
    runfolder.save_checkpoint(tmp_path, {"global_step": 3}, keep_last=5)
    assert checkpoint_names(tmp_path) == ["checkpoint_step00000001.pt", "checkpoint_step00000002.pt",
                                          "checkpoint_step00000003.pt"]
    # A new process knows nothing of the old list; pruning must still remove the old files.
    runfolder.save_checkpoint(tmp_path, {"global_step": 5}, keep_last=1)
    assert checkpoint_names(tmp_path) == ["checkpoint_step00000005.pt"]
    runfolder.save_checkpoint(tmp_path, {"global_step": 6}, keep_last=1)
    assert checkpoint_names(tmp_path) == ["checkpoint_step00000006.pt"]
    assert torch.load(tmp_path / "checkpoint_step00000006.pt", weights_only=True) == {"global_step": 6}
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"global_step": 2}   # best.pt is never pruned
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint(checkpoint, tmp_path, caplog):
    payload = torch.load(checkpoint, weights_only=True)
    for step in (2, 3):
        runfolder.save_checkpoint(tmp_path, {**payload, "global_step": step}, keep_last=3)
    newest = runfolder.periodic_checkpoints(tmp_path)[-1]
    assert newest.name == "checkpoint_step00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as if torn (cannot happen with os.replace, but be safe)
    with caplog.at_level("WARNING"):
        assert runfolder.newest_complete_checkpoint(tmp_path).name == "checkpoint_step00000002.pt"
    assert "passing over" in caplog.text
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        runfolder.newest_complete_checkpoint(tmp_path / "empty")


def test_resume_truncates_rows_written_after_the_checkpoint(trained_run, tmp_path):
    for name in LOGS:
        shutil.copy(trained_run / name, tmp_path / name)
    full_metrics, full_steps = read_rows(trained_run / "metrics.csv"), read_rows(trained_run / "steps.csv")
    assert [row["evaluation"] for row in full_metrics] == ["1", "2"]       # after steps 2 and 3
    assert [row["global_step"] for row in full_steps] == ["0", "1", "2"]
    assert {row["epoch"] for row in read_rows(trained_run / "drawn_counts.csv")} == {"0"}
    first_evaluation = torch.load(trained_run / "checkpoint_step00000002.pt", weights_only=True)
    assert (first_evaluation["evaluations"], first_evaluation["global_step"], first_evaluation["epoch"]) == (1, 2, 0)
    # Resuming from the first evaluation's checkpoint must forget the second evaluation's rows, the
    # step after it and the finished epoch's drawn counts: the resumed run writes them again.
    runfolder.start_logs(tmp_path, resumed_from=first_evaluation)
    assert read_rows(tmp_path / "metrics.csv") == full_metrics[:1]
    assert read_rows(tmp_path / "steps.csv") == full_steps[:2]
    assert read_rows(tmp_path / "drawn_counts.csv") == []
    assert not list(tmp_path.glob(".*.tmp"))
    # a fresh run in an old folder starts fresh logs
    runfolder.start_logs(tmp_path, resumed_from=None)
    assert not any((tmp_path / name).exists() for name in LOGS)


def test_truncate_log_drops_a_line_torn_by_a_kill(trained_run, tmp_path):
    steps = tmp_path / "steps.csv"
    shutil.copy(trained_run / "steps.csv", steps)
    whole = read_rows(steps)
    with open(steps, "a") as handle:
        handle.write("3,1,0,2.7")            # killed while appending: no lr, no line end
    assert len(read_rows(steps)) == len(whole) + 1
    runfolder.truncate_log(steps, "global_step", last=10)
    assert read_rows(steps) == whole
