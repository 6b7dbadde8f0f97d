"""The training loop: exact resume, determinism, checkpoints on disk, patience, bad input."""
from __future__ import annotations

import csv
import shutil

import pandas as pd
import pytest
import torch

import model as model_lib
import train
from conftest import quick_args, write_tiny_dataset


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def final_weights(out_dir):
    last = train.periodic_checkpoints(out_dir)[-1]
    return torch.load(last, weights_only=True)["model"]


def test_resume_mid_epoch_equals_uninterrupted(tiny_data, tmp_path):
    # 14 training recordings, batch 4 -> 3 steps per epoch, evaluations after steps 2 and 3.
    # Dropout makes the global torch RNG matter, mixup the augmentation RNG.
    full = tmp_path / "full"
    train.main(quick_args(tiny_data, full, "--dropout", "0.5", "--mixup-prob", "1"))

    interrupted = tmp_path / "interrupted"
    state = train.main(quick_args(tiny_data, interrupted, "--max-steps", "2", "--dropout", "0.5", "--mixup-prob", "1"))
    assert state["stop_reason"] == "reached --max-steps 2"
    checkpoint = interrupted / "checkpoint_step00000002.pt"
    assert torch.load(checkpoint, weights_only=True)["step_in_epoch"] == 2  # mid-epoch
    train.main(quick_args(tiny_data, interrupted, "--resume", str(checkpoint), "--dropout", "0.5", "--mixup-prob", "1"))

    full_steps, resumed_steps = read_rows(full / "steps.csv"), read_rows(interrupted / "steps.csv")
    assert len(full_steps) == 6
    assert resumed_steps == full_steps  # loss of every step identical, no duplicated rows
    assert read_rows(interrupted / "metrics.csv") == read_rows(full / "metrics.csv")
    for name, tensor in final_weights(full).items():
        assert torch.equal(tensor, final_weights(interrupted)[name]), name


def test_resume_truncates_rows_written_after_the_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--keep-last", "5"))
    assert len(read_rows(out / "metrics.csv")) == 2
    # Resuming from the first evaluation's checkpoint must forget the second evaluation's rows
    # before writing them again.
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--resume", str(out / "checkpoint_step00000002.pt")))
    assert [row["evaluation"] for row in read_rows(out / "metrics.csv")] == ["1", "2"]
    assert [row["global_step"] for row in read_rows(out / "steps.csv")] == ["0", "1", "2"]


def test_same_seed_same_metrics_and_workers_do_not_matter(tiny_data, tmp_path):
    train.main(quick_args(tiny_data, tmp_path / "a", "--epochs", "1"))
    train.main(quick_args(tiny_data, tmp_path / "b", "--epochs", "1", "--workers", "2"))
    train.main(quick_args(tiny_data, tmp_path / "c", "--epochs", "1", "--seed", "7"))
    first = (tmp_path / "a" / "metrics.csv").read_text()
    assert first == (tmp_path / "b" / "metrics.csv").read_text()
    assert first != (tmp_path / "c" / "metrics.csv").read_text()


def test_keep_last_counts_files_on_disk_across_restarts(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--keep-last", "5", "--max-steps", "3"))
    assert [p.name for p in train.periodic_checkpoints(out)] == ["checkpoint_step00000002.pt",
                                                                 "checkpoint_step00000003.pt"]
    # A new process knows nothing of the old list; pruning must still remove the old files.
    train.main(quick_args(tiny_data, out, "--keep-last", "1",
                          "--resume", str(out / "checkpoint_step00000003.pt")))
    assert [p.name for p in train.periodic_checkpoints(out)] == ["checkpoint_step00000006.pt"]
    assert (out / "best.pt").exists()
    assert not list(out.glob("*.tmp"))


def test_patience_stops_and_says_why(tiny_data, tmp_path):
    # An improvement of 10 in validation loss is impossible, so every evaluation after the
    # first counts against patience.
    state = train.main(quick_args(tiny_data, tmp_path / "run", "--epochs", "5", "--monitor", "val_loss",
                                  "--min-delta", "10", "--patience", "2"))
    assert len(read_rows(tmp_path / "run" / "metrics.csv")) == 3
    assert "val_loss did not improve by more than 10.0 for 2 evaluations" in state["stop_reason"]


def test_checkpoint_is_plain_data_and_load_model_rebuilds_the_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--loss", "bce"))
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["loss"] == "bce"
    assert checkpoint["labels"] == ["aaabbb1", "cccddd1", "eeefff1", "ggghhh1"]
    for key in ("epoch", "step_in_epoch", "global_step", "best_metric", "patience_counter", "optimizer"):
        assert key in checkpoint

    loaded = model_lib.load_model(out / "best.pt")
    assert not loaded.training
    assert loaded.activation == "sigmoid" and loaded.labels == checkpoint["labels"]
    assert loaded.config["n_mels"] == 32 and loaded.config["sample_rate"] == 16000
    reference = model_lib.BirdCallModel(checkpoint["model_config"])
    reference.load_state_dict(checkpoint["model"])
    reference.eval()
    waveform = torch.randn(2, loaded.window_samples)
    with torch.inference_mode():
        assert torch.equal(loaded(waveform), reference(waveform))


def test_unreadable_and_missing_files_are_reported_and_skipped(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    table = pd.read_csv(data_dir / "train_metadata.csv")
    corrupt = data_dir / "train_audio" / table.loc[0, "filename"]
    corrupt.write_text("this is not audio")
    missing = data_dir / "train_audio" / table.loc[1, "filename"]
    missing.unlink()
    state = train.main(quick_args(data_dir, tmp_path / "run", "--epochs", "1"))
    assert state["global_step"] == 3  # 16 usable of 18: 13 train -> 3 steps
    bad = pd.read_csv(tmp_path / "run" / "bad_files.csv")
    assert sorted(bad["path"]) == sorted([str(corrupt.resolve()), str(missing.resolve())])
    assert bad["reason"].str.len().min() > 10


def test_file_failing_mid_epoch_is_skipped_not_fatal(tiny_data, tmp_path, caplog):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    labels, train_set, _ = train.prepare_data(quick_args(data_dir, tmp_path / "run"), tmp_path)
    # The header check passed; now the file breaks before it is decoded.
    open(train_set.paths[0], "wb").close()
    assert train_set[(0, 0, 0)] is None
    assert "skipping" in caplog.text and train_set.paths[0] in caplog.text


def test_unknown_backbone_fails_before_reading_data(tmp_path):
    args = quick_args(tmp_path / "does-not-exist", tmp_path / "run", "--backbone", "no_such_net")
    with pytest.raises(ValueError, match="Unknown model"):
        train.main(args)


def test_parser_defaults_are_the_original_recipe():
    args = train.get_args_parser().parse_args([])
    assert (args.loss, args.lr, args.backbone) == ("ce", 5e-4, "tf_efficientnet_b0.ns_jft_in1k")
    assert (args.n_fft, args.hop, args.n_mels, args.fmin, args.fmax) == (1024, 512, 128, 20.0, 16000.0)
    assert (args.mixup_alpha, args.evals_per_epoch, args.monitor, args.crop_policy) == (0.2, 2, "cmap5", "ends")
    assert args.pretrained and args.secondary_weight == 0.0
    assert not train.get_args_parser().parse_args(["--no-pretrained"]).pretrained
