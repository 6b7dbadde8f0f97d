"""Tests for runfolder.py: keep-last-N from the files on disk, --resume auto's choice of checkpoint,
and logs cut back to a checkpoint on resume.

References are the folder's listing and the rows of a real one-epoch run (the shared
trained_run), copied before anything is changed. That a resumed run then writes the same
rows as an uninterrupted one is test_train.py's test_resume_mid_epoch_equals_uninterrupted.
"""
from __future__ import annotations

import argparse
import csv
import errno
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import quick_args, read_rows

import options
import runfolder
import train

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


# ----------------------------------------------------------------------------- what a person reads in the folder

def test_metrics_png_shows_chance_levels_the_best_evaluation_and_fits_its_axis(trained_run, tmp_path):
    metrics = pd.read_csv(trained_run / "metrics.csv")
    assert "chance_cmap5" in metrics and metrics["chance_cmap5"].nunique() == 1     # stored in metrics.csv
    shown = runfolder.plot_metrics(trained_run / "metrics.csv", tmp_path / "metrics.png")
    assert "cmap5, random scores" in shown["labels"]
    best = metrics.loc[metrics["cmap5"].idxmax()]
    assert f"best cmap5, step {int(best['global_step'])}" in shown["labels"]
    values = [*metrics[["cmap5", "cmap3", "macro_ap", "lrap"]].to_numpy().ravel(), metrics["chance_cmap5"].iloc[0]]
    low, high = shown["limits"]
    assert low <= min(values) and high >= max(values) and high - low < 1.2 * (max(values) - min(values)) + 0.03
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    by_loss = runfolder.plot_metrics(trained_run / "metrics.csv", tmp_path / "by_loss.png", monitor="val_loss")
    lowest = metrics.loc[metrics["val_loss"].idxmin()]                 # the evaluation best.pt holds then
    assert not any(label.startswith("best") for label in by_loss["labels"])
    assert f"best val_loss, step {int(lowest['global_step'])}" in by_loss["loss_labels"]


def test_train_log_holds_the_runs_lines(trained_run):
    log_lines = (trained_run / "train.log").read_text().splitlines()
    assert any("chance level on this validation set" in line for line in log_lines)
    assert any("stopped: completed 1 epochs" in line for line in log_lines)


# ----------------------------------------------------------------------------- one folder, one run (#17)

def test_pruning_keeps_checkpoints_past_the_current_step(tmp_path):
    # A resume from step 3 of a folder that also holds step 500 (a later branch, or a foreign file):
    # pruning at step 4 may only choose among the checkpoints at or below 4.
    for step in (2, 3, 500):
        torch.save({"global_step": step}, tmp_path / f"checkpoint_step{step:08d}.pt")
    runfolder.save_checkpoint(tmp_path, {"global_step": 4}, keep_last=1)
    assert checkpoint_names(tmp_path) == ["checkpoint_step00000004.pt", "checkpoint_step00000500.pt"]
    runfolder.prune_checkpoints(tmp_path, keep_last=0, step=4)          # at least one is always kept
    assert checkpoint_names(tmp_path) == ["checkpoint_step00000004.pt", "checkpoint_step00000500.pt"]


def test_a_folder_with_files_is_refused_and_overwrite_moves_them_aside(tmp_path):
    out = tmp_path / "run"
    runfolder.claim_folder(out, resuming=False, overwrite=False)        # missing: fine
    out.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    (out / runfolder.LOCK).write_text(finished.stdout.strip())          # a lock left by a killed run
    runfolder.claim_folder(out, resuming=False, overwrite=False)        # only a lock: fine
    (out / "metrics.csv").write_text("someone else's\n")
    with pytest.raises(FileExistsError, match="already holds files.*metrics.csv.*--resume auto.*--overwrite"):
        runfolder.claim_folder(out, resuming=False, overwrite=False)
    runfolder.claim_folder(out, resuming=True, overwrite=False)         # a resume continues the run there
    runfolder.claim_folder(out, resuming=False, overwrite=True, move_aside=False)   # torchrun's other ranks
    assert (out / "metrics.csv").is_file()
    for number in (1, 2):
        (out.parent / "run").mkdir(exist_ok=True)
        (out / "metrics.csv").write_text(f"run {number}\n")
        runfolder.claim_folder(out, resuming=False, overwrite=True)
        assert not out.exists()
        assert (tmp_path / f"run.previous-{number}" / "metrics.csv").read_text() == f"run {number}\n"


def test_a_lock_refuses_a_second_process_and_is_taken_over_from_a_dead_one(tmp_path):
    with runfolder.locked(tmp_path):
        assert (tmp_path / runfolder.LOCK).read_text() == str(os.getpid())
    assert not (tmp_path / runfolder.LOCK).exists()
    (tmp_path / runfolder.LOCK).write_text(str(os.getppid()))          # a live process holds it
    with pytest.raises(FileExistsError, match=f"in use by another training process \\(pid {os.getppid()}\\)"):
        with runfolder.locked(tmp_path):
            pass
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    (tmp_path / runfolder.LOCK).write_text(finished.stdout.strip())     # left by a process that is gone
    with runfolder.locked(tmp_path):
        assert (tmp_path / runfolder.LOCK).read_text() == str(os.getpid())


def test_resume_refuses_changed_settings_and_names_them(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)
    args = argparse.Namespace(**saved["args"])
    options.check_resume(saved, args, 1)                        # the same settings
    for name, value in (("epochs", 40), ("workers", 7), ("patience", 1), ("keep_last", 9), ("data_dir", ["x"])):
        setattr(args, name, value)
    options.check_resume(saved, args, 1)                        # settings a resume may change
    args.sample_rate, args.fmax, args.lr = 22050, 11025.0, 0.1
    with pytest.raises(ValueError, match=r"--fmax 8000.0 -> 11025.0; --lr 0.0005 -> 0.1; --sample-rate 16000 -> "
                                         r"22050\. Resume with the checkpoint's settings"):
        options.check_resume(saved, args, 1)
    assert set(runfolder.CHANGEABLE_ON_RESUME) <= set(saved["args"]) | {"overwrite"}   # no stale names


def test_log_writes_on_a_full_disk_name_the_file_and_a_cut_header_is_written_again(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    row = {name: 1 for name in runfolder.metric_columns(False)}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(csv.DictWriter, "writeheader", no_space)
    with pytest.raises(runfolder.CheckpointSaveError, match=r"could not write .*metrics.csv \(No space left on "
                                                            r"device; [\d.]+ MB free on its disk\).*--resume auto"):
        runfolder.append_metrics(path, row)
    assert path.read_text() == ""                                       # left empty, as a full disk leaves it
    monkeypatch.undo()
    runfolder.append_metrics(path, row)                                 # after space was freed
    assert list(pd.read_csv(path).columns) == runfolder.metric_columns(False)
    steps = tmp_path / "steps.csv"
    steps.write_text("global_st")                                       # a header cut by a full disk
    runfolder.truncate_log(steps, "global_step", 10)                    # on resume: started again
    runfolder.append_steps(steps, [(1, 0, 1, 0.5, 0.001)])
    assert list(pd.read_csv(steps).columns) == runfolder.STEP_COLUMNS


def test_torch_zip_writer_failures_become_one_clear_error(tmp_path, monkeypatch):
    def torn_write(payload, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4544 vs 4416")
    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(runfolder.CheckpointSaveError, match=r"checkpoint_step00000007.pt \(\[enforce fail.*; "
                                                            r"0.0 MB needed, [\d.]+ MB free"):
        runfolder.save_checkpoint(tmp_path, {"global_step": 7, "w": torch.zeros(10)}, keep_last=1)
    assert list(tmp_path.iterdir()) == []


def test_a_garbage_row_in_a_log_is_named_on_resume(trained_run, tmp_path):
    shutil.copy(trained_run / "metrics.csv", tmp_path / "metrics.csv")
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[0] = "garbage"
    (tmp_path / "metrics.csv").write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.csv line 2: evaluation is 'garbage', not a number"):
        runfolder.truncate_log(tmp_path / "metrics.csv", "evaluation", 5)


def test_more_epochs_on_resume_keep_the_learning_rate_curve_the_run_started_on():
    """Without --schedule-epochs the schedule's length is --epochs, which may change on resume: the resumed
    run keeps the first part's length (and a later resume keeps it again) instead of jumping curves."""
    first = options.get_args_parser().parse_args(["--epochs", "2"])
    checkpoint = {"args": options.plain_config(first)}
    resumed = options.get_args_parser().parse_args(["--epochs", "4", "--resume", "x.pt"])
    options.check_resume(checkpoint, resumed, 1)
    assert resumed.schedule_epochs == 2
    again = options.get_args_parser().parse_args(["--epochs", "6", "--resume", "y.pt"])
    options.check_resume({"args": options.plain_config(resumed)}, again, 1)
    assert again.schedule_epochs == 2
    same = options.get_args_parser().parse_args(["--epochs", "2", "--resume", "x.pt"])
    options.check_resume(checkpoint, same, 1)
    assert same.schedule_epochs is None                              # nothing changed, nothing set
    with pytest.raises(ValueError, match="--schedule-epochs 2 -> 3"):
        options.check_resume({"args": options.plain_config(resumed)},
                             options.get_args_parser().parse_args(["--schedule-epochs", "3"]), 1)


def test_overwrite_refuses_to_move_a_folder_a_live_run_holds(tmp_path):
    """#26.2: --overwrite on the folder of a run still training moved the live run (and its lock) aside, so
    both runs wrote one metrics.csv. A live lock is checked before anything moves."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("live run\n")
    (out / runfolder.LOCK).write_text(str(os.getppid()))               # a live process holds it
    with pytest.raises(FileExistsError, match=f"in use by a running process \\(pid {os.getppid()}\\)"):
        runfolder.claim_folder(out, resuming=False, overwrite=True)
    assert (out / "metrics.csv").read_text() == "live run\n" and (out / runfolder.LOCK).is_file()
    assert not (tmp_path / "run.previous-1").exists()
    (out / runfolder.LOCK).unlink()                                     # the run finished: now it moves
    runfolder.claim_folder(out, resuming=False, overwrite=True)
    assert (tmp_path / "run.previous-1" / "metrics.csv").read_text() == "live run\n"


def test_resume_auto_after_a_manual_resume_continues_the_new_branch(tiny_data, tmp_path):
    """#26.19: checkpoints at steps 2, 4, 6; a manual --resume of step 2 runs to step 3 and is killed
    before its next checkpoint... then --resume auto took step 6, the abandoned branch's. Now the branch past
    the resumed step is set aside (renamed, kept) and --resume auto continues from what this run wrote."""
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--evals-per-epoch", "3", "--keep-last", "9"))
    steps = [int(runfolder.CHECKPOINT_PATTERN.match(path.name).group(1)) for path in runfolder.periodic_checkpoints(out)]
    assert len(steps) >= 2
    first = out / f"checkpoint_step{steps[0]:08d}.pt"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--evals-per-epoch", "3", "--keep-last", "9",
                          "--resume", str(first), "--max-steps", str(steps[0] + 1)))
    remaining = [path.name for path in runfolder.periodic_checkpoints(out)]
    assert all(int(runfolder.CHECKPOINT_PATTERN.match(name).group(1)) <= steps[0] + 1 for name in remaining)
    assert sorted(path.name for path in out.glob(runfolder.ABANDONED + "*")) == [
        f"{runfolder.ABANDONED}checkpoint_step{step:08d}.pt" for step in steps[1:]]       # kept, not deleted
    newest = runfolder.newest_complete_checkpoint(out)
    assert torch.load(newest, weights_only=True)["global_step"] <= steps[0] + 1
