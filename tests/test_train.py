"""Tests for train.py, end to end: the training loop resumes exactly, is deterministic, stops on
patience, switches losses, freezes, keeps an EMA, counts draws, augments training batches only,
and writes checkpoints that rebuild the run; the parser's defaults are the original recipe.

Each run is seconds long on the tiny data set (conftest's quick_args); references are
uninterrupted runs, runs with one setting changed, and the run's own checkpoint. (Bad input
and interruptions: test_faults.py; what the run folder functions do: test_runfolder.py.)
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import TINY_SPECIES, quick_args, quick_settings, read_rows

import augment
import learner as learner_lib
import losses
import model as model_lib
import runfolder
import options
import train


ROOT = Path(__file__).resolve().parents[1]


def final_weights(out_dir):
    last = runfolder.periodic_checkpoints(out_dir)[-1]
    return torch.load(last, weights_only=True)["model"]


def checkpoint_names(out_dir) -> list[str]:
    return [path.name for path in runfolder.periodic_checkpoints(out_dir)]


# ----------------------------------------------------------------------------- resume and determinism

def test_resume_mid_epoch_equals_uninterrupted(tiny_data, tmp_path):
    # 14 training recordings, batch 4 -> 3 steps per epoch, evaluations after steps 2 and 3.
    # Dropout makes the global torch RNG matter, mixup the augmentation RNG.
    full = tmp_path / "full"
    train.main(quick_args(tiny_data, full, "--dropout", "0.5", "--mixup-prob", "1"))

    interrupted = tmp_path / "interrupted"
    state = train.main(quick_args(tiny_data, interrupted, "--max-steps", "2", "--dropout", "0.5", "--mixup-prob", "1"))
    assert state.stop_reason == "reached --max-steps 2"
    checkpoint = interrupted / "checkpoint_step00000002.pt"
    assert torch.load(checkpoint, weights_only=True)["step_in_epoch"] == 2  # mid-epoch
    train.main(quick_args(tiny_data, interrupted, "--resume", str(checkpoint), "--dropout", "0.5", "--mixup-prob", "1"))

    full_steps, resumed_steps = read_rows(full / "steps.csv"), read_rows(interrupted / "steps.csv")
    assert len(full_steps) == 6
    assert resumed_steps == full_steps  # loss of every step identical, no duplicated rows
    assert read_rows(interrupted / "metrics.csv") == read_rows(full / "metrics.csv")
    for name, tensor in final_weights(full).items():
        assert torch.equal(tensor, final_weights(interrupted)[name]), name
    # --keep-last 3 (the default) of the checkpoints after steps 2, 3, 5, 6; the resumed process
    # pruned the one the first process wrote, which it knew of only from the disk
    assert checkpoint_names(interrupted) == checkpoint_names(full) == [
        "checkpoint_step00000003.pt", "checkpoint_step00000005.pt", "checkpoint_step00000006.pt"]


def test_same_seed_same_metrics_and_workers_do_not_matter(tiny_data, trained_run, tmp_path):
    # trained_run is quick_args with --epochs 1, as these two runs but for the one setting each changes
    train.main(quick_args(tiny_data, tmp_path / "b", "--epochs", "1", "--workers", "2"))
    train.main(quick_args(tiny_data, tmp_path / "c", "--epochs", "1", "--seed", "7"))
    first = (trained_run / "metrics.csv").read_text()
    assert first == (tmp_path / "b" / "metrics.csv").read_text()
    assert first != (tmp_path / "c" / "metrics.csv").read_text()


def test_ema_is_evaluated_saved_and_resumed_exactly(tiny_data, tmp_path):
    full = tmp_path / "full"
    train.main(quick_args(tiny_data, full, "--ema", "0.9", "--monitor", "ema_cmap5"))
    rows = read_rows(full / "metrics.csv")
    assert {"ema_cmap5", "ema_val_loss"} <= set(rows[0])
    checkpoint = torch.load(full / "best.pt", weights_only=True)
    assert checkpoint["ema_updates"] > 0
    assert not torch.equal(checkpoint["model_ema"]["head.weight"], checkpoint["model"]["head.weight"])

    interrupted = tmp_path / "interrupted"
    train.main(quick_args(tiny_data, interrupted, "--ema", "0.9", "--monitor", "ema_cmap5", "--max-steps", "2"))
    train.main(quick_args(tiny_data, interrupted, "--ema", "0.9", "--monitor", "ema_cmap5",
                          "--resume", str(interrupted / "checkpoint_step00000002.pt")))
    assert read_rows(interrupted / "metrics.csv") == rows


def test_drawn_counts_follow_the_sampler_and_survive_resume(tiny_data, tmp_path):
    full = tmp_path / "full"
    train.main(quick_args(tiny_data, full, "--sampler", "cap", "--cap-per-class", "2", "--batch-size", "2",
                          "--epochs", "2"))
    drawn = pd.read_csv(full / "drawn_counts.csv")
    assert sorted(drawn["epoch"].unique()) == [0, 1]
    assert (drawn["draws"] == 2).all()  # cap 2 per species, 8 draws = 4 steps of 2
    interrupted = tmp_path / "interrupted"
    common = ["--sampler", "cap", "--cap-per-class", "2", "--batch-size", "2", "--epochs", "2"]
    train.main(quick_args(tiny_data, interrupted, *common, "--max-steps", "6"))
    train.main(quick_args(tiny_data, interrupted, *common, "--resume",
                          str(runfolder.periodic_checkpoints(interrupted)[-1])))
    assert pd.read_csv(interrupted / "drawn_counts.csv").equals(drawn)
    assert read_rows(interrupted / "steps.csv") == read_rows(full / "steps.csv")


# ----------------------------------------------------------------------------- stopping, losses, freezing

def test_patience_stops_and_says_why(tiny_data, tmp_path):
    # An improvement of 10 in validation loss is impossible, so every evaluation after the
    # first counts against patience.
    state = train.main(quick_args(tiny_data, tmp_path / "run", "--epochs", "5", "--monitor", "val_loss",
                                  "--min-delta", "10", "--patience", "2"))
    assert len(read_rows(tmp_path / "run" / "metrics.csv")) == 3
    assert "val_loss did not improve by more than 10.0 for 2 evaluations" in state.stop_reason


def test_loss_switch_changes_loss_and_activation_and_keep_best_keeps_the_best(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flushing = []

    def set_train_mode(model, *frozen):      # during the run, --flush-denormal flushes denormals to zero
        flushing.append(bool((torch.tensor([1e-40]) * 1.0).item() == 0.0))
        return real_set_train_mode(model, *frozen)
    real_set_train_mode = learner_lib.set_train_mode
    monkeypatch.setattr(learner_lib, "set_train_mode", set_train_mode)
    train.main(quick_args(tiny_data, out, "--loss", "ce", "--loss-switch-epoch", "1", "--loss-after", "bce",
                          "--keep-last", "10", "--keep-best", "2", "--flush-denormal"))
    assert flushing and all(flushing) and (torch.tensor([1e-40]) * 1.0).item() != 0.0   # and only during the run
    first_epoch = torch.load(out / "checkpoint_step00000003.pt", weights_only=True)
    second_epoch = torch.load(out / "checkpoint_step00000006.pt", weights_only=True)
    assert first_epoch["model_config"]["activation"] == "softmax"
    assert second_epoch["model_config"]["activation"] == "sigmoid"
    # --keep-best 2: exactly the two best evaluations of metrics.csv by cmap5 (the earlier of equals)
    metrics = pd.read_csv(out / "metrics.csv").sort_values(["cmap5", "global_step"], ascending=[False, True])
    assert sorted(path.name for path in out.glob("best-*.pt")) == sorted(
        f"best-step{step:08d}.pt" for step in metrics["global_step"].head(2))
    for path in out.glob("best-*.pt"):
        assert torch.load(path, weights_only=True)["global_step"] == int(path.name[9:17])
    with pytest.raises(ValueError, match="go together"):
        train.main(quick_args(tiny_data, out, "--loss-after", "bce"))


def test_freeze_backbone_trains_only_the_head(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--freeze-backbone-epochs", "1", "--epochs", "1", "--keep-last", "10"))
    torch.manual_seed(42)  # the run's seed: the initial weights
    initial = model_lib.build_model(quick_settings(tiny_data, out).learner.model, sorted(TINY_SPECIES), pretrained=False)
    trained = torch.load(out / "checkpoint_step00000003.pt", weights_only=True)["model"]
    for name, tensor in initial.state_dict().items():
        if name.startswith("backbone."):  # weights and BatchNorm statistics untouched
            assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(initial.state_dict()["head.weight"], trained["head.weight"])


def test_non_finite_loss_stops_naming_files_and_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_loss = losses.batch_loss
    calls = {"n": 0}

    def loss_that_breaks(logits, targets, args, loss_name):
        calls["n"] += 1
        loss = real_loss(logits, targets, args, loss_name)
        return loss * float("inf") if calls["n"] == 3 else loss
    monkeypatch.setattr(losses, "batch_loss", loss_that_breaks)
    out = tmp_path / "run"
    with pytest.raises(losses.NonFiniteLossError, match=r"step 2; batch files: .*XC\d+\.ogg"):
        train.main(quick_args(tiny_data, out))
    # The evaluation after step 2 wrote a checkpoint before the bad step 3; it is intact.
    good = torch.load(out / "checkpoint_step00000002.pt", weights_only=True)
    assert good["global_step"] == 2
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- augmentation

def test_augmentations_touch_training_batches_only(tiny_data, trained_run, tmp_path, monkeypatch):
    calls = {"waveforms": 0, "images": 0}
    real_waveforms, real_images = augment.augment_waveforms, augment.augment_images

    def count_waveforms(*args, **kwargs):
        calls["waveforms"] += 1
        return real_waveforms(*args, **kwargs)

    def count_images(*args, **kwargs):
        calls["images"] += 1
        return real_images(*args, **kwargs)
    monkeypatch.setattr(augment, "augment_waveforms", count_waveforms)
    monkeypatch.setattr(augment, "augment_images", count_images)
    strong = ["--noise-prob", "1", "--gain-prob", "1", "--freq-masks", "2", "--time-masks", "2", "--epochs", "1",
              "--mix-prob", "1", "--distance-prob", "1", "--reverb-prob", "1"]
    train.main(quick_args(tiny_data, tmp_path / "augmented", *strong))
    # 3 training steps and 2 evaluations of 4 validation windows: augmentation ran once per step only.
    assert calls == {"waveforms": 3, "images": 3}
    train.main(quick_args(tiny_data, tmp_path / "off", *strong, "--aug-strength", "0", "--mixup-prob", "0.5"))
    augmented = read_rows(tmp_path / "augmented" / "steps.csv")
    plain = read_rows(trained_run / "steps.csv")  # quick_args with --epochs 1: no augmentation but mixup
    assert augmented[0]["loss"] != plain[0]["loss"]  # the first batch already differs
    assert read_rows(tmp_path / "off" / "steps.csv") != plain  # strength 0 also turns off the mixup plain has
    train.main(quick_args(tiny_data, tmp_path / "off_nomix", *strong, "--aug-strength", "0", "--mixup-prob", "0"))
    assert read_rows(tmp_path / "off" / "steps.csv") == read_rows(tmp_path / "off_nomix" / "steps.csv")


def test_background_noise_folder_is_mixed_into_training(tiny_data, trained_run, tmp_path):
    background = tmp_path / "nocall"
    background.mkdir()
    noise = 0.1 * np.random.default_rng(0).standard_normal(16000 * 3)
    sf.write(background / "rain.wav", noise.astype("float32"), 16000)
    # trained_run is the same run without --bg-dir; the first step's loss is compared
    train.main(quick_args(tiny_data, tmp_path / "noisy", "--epochs", "1", "--max-steps", "2",
                          "--bg-dir", str(background), "--bg-prob", "1"))
    plain, noisy = read_rows(trained_run / "steps.csv"), read_rows(tmp_path / "noisy" / "steps.csv")
    assert plain[0]["loss"] != noisy[0]["loss"]
    with pytest.raises(ValueError, match="empty"):
        learner_lib.build_learner(quick_settings(tiny_data, tmp_path / "bad", "--bg-dir",
                                                 str(tmp_path / "empty_folder")).learner,
                                  sorted(TINY_SPECIES), torch.device("cpu"), steps_per_epoch=3)


# ----------------------------------------------------------------------------- checkpoints, flags, arguments

def test_checkpoint_holds_the_run_and_its_model_flags_as_plain_data_and_load_model_rebuilds_it(tiny_data,
                                                                                               tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--loss", "bce", "--frontend", "pcen", "--pcen-gain", "0.8",
                          "--head", "sed", "--img-size", "40x24", "--max-steps", "1", "--evals-per-epoch", "3"))
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["loss"] == "bce"
    assert checkpoint["labels"] == ["aaabbb1", "cccddd1", "eeefff1", "ggghhh1"]
    for key in ("epoch", "step_in_epoch", "global_step", "best_metric", "patience_counter", "optimizer"):
        assert key in checkpoint

    loaded = model_lib.load_model(out / "best.pt")
    assert not loaded.training
    assert loaded.activation == "sigmoid" and loaded.labels == checkpoint["labels"]
    assert loaded.config["n_mels"] == 32 and loaded.config["sample_rate"] == 16000
    assert (loaded.config["frontend"], loaded.config["head"], loaded.config["img_size"]) == ("pcen", "sed", [40, 24])
    assert loaded.config["pcen_gain"] == 0.8
    reference = model_lib.BirdCallModel(checkpoint["model_config"])
    reference.load_state_dict(checkpoint["model"])
    reference.eval()
    waveform = torch.randn(2, loaded.window_samples)
    with torch.inference_mode():
        assert torch.equal(loaded(waveform), reference(waveform))
        assert loaded.frontend(torch.randn(2, loaded.window_samples)).shape == (2, 1, 40, 24)
    with pytest.raises(SystemExit):
        options.get_args_parser().parse_args(["--img-size", "256"])


def test_audit_sampling_builds_the_training_sampler_and_trains_nothing(tiny_data, tmp_path, caplog):
    out = tmp_path / "audit"
    with caplog.at_level("INFO"):
        result = train.main(quick_args(tiny_data, out, "--audit-sampling", "--sampler", "inverse"))
    table = pd.read_csv(out / "sampling_audit.csv")
    # inverse: every species gets the same expected share of the 14 training draws.
    assert table["expected_draws_per_epoch"].to_numpy() == pytest.approx([14 / 4] * 4)
    assert result["audit"]["imbalance_after"] == pytest.approx(1.0)
    assert "sampling audit" in caplog.text
    assert not runfolder.periodic_checkpoints(out) and not (out / "metrics.csv").exists()


def test_unknown_backbone_fails_before_reading_data(tmp_path):
    args = quick_args(tmp_path / "does-not-exist", tmp_path / "run", "--backbone", "no_such_net")
    with pytest.raises(ValueError, match="Unknown model"):
        train.main(args)


def test_resume_auto_needs_out_dir():
    with pytest.raises(ValueError, match="needs --out-dir"):
        train.main(options.get_args_parser().parse_args(["--resume", "auto"]))


def test_parser_defaults_are_the_original_recipe():
    args = options.get_args_parser().parse_args([])
    assert (args.loss, args.lr, args.backbone) == ("ce", 5e-4, "tf_efficientnet_b0.ns_jft_in1k")
    assert (args.n_fft, args.hop, args.n_mels, args.fmin, args.fmax) == (1024, 512, 128, 20.0, 16000.0)
    assert (args.mixup_alpha, args.evals_per_epoch, args.monitor, args.crop_policy) == (0.2, 2, "cmap5", "ends")
    assert args.pretrained and args.secondary_weight == 0.0
    assert not options.get_args_parser().parse_args(["--no-pretrained"]).pretrained


def test_the_readme_first_command_parses_to_the_recommended_recipe():
    """The Quick start's train.py flags (what a fresh clone runs) are all known to the parser and are the
    recipe bench/self_training.py measured as pcen (no unlabelled audio: the demo's holds the site's birds)."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "pip install -r requirements.txt" in line and "train.py" in line)
    assert len(command) < 160
    args = options.parse_args(shlex.split(command.split("train.py", 1)[1]))
    options.resolve_deprecated(args)
    assert (args.frontend, args.nocall, args.bg_dir, args.soundscape_labels) == ("pcen", False, None, None)
    assert (args.pretrained, args.lr, args.batch_size, args.epochs, args.patience) == (False, 1e-3, 16, 10, 0)


def test_config_json_replays_a_run_and_the_command_line_overrides_it(tiny_data, trained_run, tmp_path):
    replayed = options.parse_args(["--config", str(trained_run / "config.json"), "--out-dir", str(tmp_path / "again")])
    original = options.parse_args([]).__dict__ | json.loads((trained_run / "config.json").read_text())
    assert {k: v for k, v in vars(replayed).items() if k not in ("out_dir", "config")} == \
           {k: v for k, v in original.items() if k not in ("out_dir", "config")}
    resumed = json.loads((trained_run / "config.json").read_text()) | {"resume": "x/checkpoint.pt", "overwrite": True}
    (tmp_path / "resumed.json").write_text(json.dumps(resumed))
    again = options.parse_args(["--config", str(tmp_path / "resumed.json")])   # a resumed run's config.json
    assert again.resume is None and again.overwrite is False
    train.main(replayed)
    assert read_rows(tmp_path / "again" / "steps.csv") == read_rows(trained_run / "steps.csv")
    assert options.parse_args(["--config", str(trained_run / "config.json"), "--lr", "0.5"]).lr == 0.5
    (tmp_path / "bad.json").write_text(json.dumps({"not_a_flag": 1}))
    with pytest.raises(ValueError, match="not_a_flag"):
        options.parse_args(["--config", str(tmp_path / "bad.json")])


def test_no_file_is_written_before_the_pretrained_weights_are_known_to_be_usable(tiny_data, tmp_path):
    args = quick_args(tiny_data, tmp_path / "run", "--pretrained-file", str(tmp_path / "missing.safetensors"))
    with pytest.raises(model_lib.PretrainedWeightsError, match="does not exist"):
        train.main(args)
    assert not (tmp_path / "run").exists()
