"""torchrun --nproc_per_node 2 on the CPU (gloo): shards, gathered evaluation, one set of files, resume,
and inference split across processes -- each compared with a single-process run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT, read_rows, run_infer, tone_recording

import data
import distributed
import loader
import options
import train

# Two processes, per-process batch 2 == one process, batch 4. The backbone is frozen
# (BatchNorm statistics are per process under DDP, see README) and augmentation is off
# (mixup pairs examples within a process's batch); the head learns at a high rate so
# that wrong gradient averaging would show within a few steps.
COMMON = ["--backbone", "test_efficientnet", "--no-pretrained", "--workers", "0", "--epochs", "2",
          "--n-mels", "32", "--n-fft", "512", "--hop", "256", "--sample-rate", "16000", "--fmax", "8000",
          "--window-seconds", "2", "--ends-seconds", "4", "--aug-strength", "0", "--freeze-backbone-epochs", "9",
          "--lr", "0.05", "--warmup-epochs", "0", "--keep-last", "10"]


def torchrun(script, *argv, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(script), *[str(a) for a in argv]]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def single(*argv):
    return train.main(options.get_args_parser().parse_args([str(a) for a in argv]))


def test_rank_shards_are_disjoint_and_together_the_single_process_draw(tiny_data, tmp_path):
    for sampler in (["--sampler", "none"], ["--sampler", "inverse"]):
        torchrun(ROOT / "tests" / "ddp_probe.py", tmp_path / "probe.json", "--data-dir", tiny_data, "--out-dir",
                 tmp_path / "run", "--batch-size", "2", *COMMON, *sampler)
        shares = [json.loads((tmp_path / f"probe.rank{rank}.json").read_text()) for rank in (0, 1)]
        args = options.get_args_parser().parse_args(["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "one"),
                                                   "--batch-size", "4", *COMMON, *sampler])
        settings = options.training_settings(args)
        _, train_set, _ = data.build_datasets(settings.data, tmp_path)
        for epoch in ("0", "1"):
            one = [tuple(item) for batch in loader.epoch_batches(train_set, settings.loader, int(epoch))
                   for item in batch]
            ranks = [[tuple(item) for item in share["items"][epoch]] for share in shares]
            assert all(share["world_size"] == 2 for share in shares)
            positions = [{position for _, _, position in items} for items in ranks]
            assert not positions[0] & positions[1]                                 # disjoint
            assert sorted(ranks[0] + ranks[1], key=lambda item: item[2]) == one    # together: the same draw
            assert len(ranks[0]) == len(ranks[1])                                   # whole batches on each


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_data, tmp_path):
    torchrun(ROOT / "train.py", "--data-dir", tiny_data, "--out-dir", tmp_path / "ddp", "--batch-size", "2", *COMMON)
    single("--data-dir", tiny_data, "--out-dir", tmp_path / "one", "--batch-size", "4", *COMMON)
    ddp_steps, one_steps = pd.read_csv(tmp_path / "ddp" / "steps.csv"), pd.read_csv(tmp_path / "one" / "steps.csv")
    assert len(ddp_steps) == len(one_steps) == 6                               # 14 recordings // 4, two epochs
    np.testing.assert_allclose(ddp_steps["loss"], one_steps["loss"], rtol=1e-5)
    assert ddp_steps["loss"].iloc[-1] != pytest.approx(ddp_steps["loss"].iloc[0], rel=1e-3)  # it did learn
    ddp_metrics, one_metrics = pd.read_csv(tmp_path / "ddp" / "metrics.csv"), pd.read_csv(tmp_path / "one" / "metrics.csv")
    for column in ("val_loss", "cmap5", "macro_ap", "lrap"):                    # predictions gathered from both ranks
        np.testing.assert_allclose(ddp_metrics[column], one_metrics[column], rtol=1e-5)
    # one set of files: the same names as one process writes, each log row once
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert ddp_steps["global_step"].tolist() == list(range(6))
    assert ddp_metrics["evaluation"].tolist() == [1, 2, 3, 4]


def test_resume_under_torchrun_continues_the_same_way(tiny_data, tmp_path):
    torchrun(ROOT / "train.py", "--data-dir", tiny_data, "--out-dir", tmp_path / "full", "--batch-size", "2", *COMMON)
    torchrun(ROOT / "train.py", "--data-dir", tiny_data, "--out-dir", tmp_path / "cut", "--batch-size", "2", *COMMON,
             "--max-steps", "5")                                  # stops after an evaluation step
    assert len(read_rows(tmp_path / "cut" / "steps.csv")) == 5
    torchrun(ROOT / "train.py", "--data-dir", tiny_data, "--out-dir", tmp_path / "cut", "--batch-size", "2", *COMMON,
             "--resume", "auto")
    assert read_rows(tmp_path / "cut" / "steps.csv") == read_rows(tmp_path / "full" / "steps.csv")
    full, cut = read_rows(tmp_path / "full" / "metrics.csv"), read_rows(tmp_path / "cut" / "metrics.csv")
    assert [row["cmap5"] for row in cut] == [row["cmap5"] for row in full]


def test_inference_splits_files_across_processes_and_rank_0_writes_one_submission(checkpoint, tmp_path):
    folder = tmp_path / "scapes"
    folder.mkdir()
    for index, seconds in enumerate([12.0, 7.0, 20.0]):
        sf.write(folder / f"s{index}.ogg", tone_recording(900.0 * (index + 1), seconds, 16000,
                                                         np.random.default_rng(index)), 16000)
    common = ["--ckpts", checkpoint, "--soundscapes", folder, "--precision", "fp32"]
    torchrun(ROOT / "infer.py", *common, "--out", tmp_path / "ddp.csv")
    run_infer(*common, "--out", tmp_path / "one.csv")
    ddp, one = pd.read_csv(tmp_path / "ddp.csv"), pd.read_csv(tmp_path / "one.csv")
    assert ddp["row_id"].tolist() == one["row_id"].tolist() and len(one) == 3 + 2 + 4
    np.testing.assert_allclose(ddp.iloc[:, 1:].to_numpy(), one.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in tmp_path.glob("ddp*")) == ["ddp.csv"]


def test_resume_with_another_number_of_processes_is_refused(tiny_data, trained_run, tmp_path):
    (tmp_path / "run").mkdir()
    checkpoint = shutil.copy(trained_run / "checkpoint_step00000002.pt", tmp_path / "run")
    assert torch.load(checkpoint, weights_only=True)["world_size"] == 1    # written by one process
    state = torch.load(checkpoint, weights_only=True)
    state["world_size"] = 2                          # as if written under torchrun --nproc_per_node 2
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="written by 2 process.*--nproc_per_node 2"):
        single("--data-dir", tiny_data, "--out-dir", tmp_path / "run", "--batch-size", "4", *COMMON,
               "--resume", "auto")


def test_ranks_that_read_different_data_are_stopped(tiny_data, tmp_path, monkeypatch):
    args = options.get_args_parser().parse_args(["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "r"),
                                               "--batch-size", "4", *COMMON])
    labels, train_set, val_set = data.build_datasets(options.training_settings(args).data, tmp_path)
    data.check_same_data_on_every_rank(labels, train_set, val_set)            # one process: agrees with itself
    real = distributed.gather_objects
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value, real(value)[0] + "x"])
    with pytest.raises(ValueError, match="processes read different data"):
        data.check_same_data_on_every_rank(labels, train_set, val_set)
