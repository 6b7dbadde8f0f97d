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
import runfolder
import losses
import data


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def final_weights(out_dir):
    last = runfolder.periodic_checkpoints(out_dir)[-1]
    return torch.load(last, weights_only=True)["model"]


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
    assert [p.name for p in runfolder.periodic_checkpoints(out)] == ["checkpoint_step00000002.pt",
                                                                 "checkpoint_step00000003.pt"]
    # A new process knows nothing of the old list; pruning must still remove the old files.
    train.main(quick_args(tiny_data, out, "--keep-last", "1",
                          "--resume", str(out / "checkpoint_step00000003.pt")))
    assert [p.name for p in runfolder.periodic_checkpoints(out)] == ["checkpoint_step00000006.pt"]
    assert (out / "best.pt").exists()
    assert not list(out.glob("*.tmp"))


def test_patience_stops_and_says_why(tiny_data, tmp_path):
    # An improvement of 10 in validation loss is impossible, so every evaluation after the
    # first counts against patience.
    state = train.main(quick_args(tiny_data, tmp_path / "run", "--epochs", "5", "--monitor", "val_loss",
                                  "--min-delta", "10", "--patience", "2"))
    assert len(read_rows(tmp_path / "run" / "metrics.csv")) == 3
    assert "val_loss did not improve by more than 10.0 for 2 evaluations" in state.stop_reason


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
    assert state.global_step == 3  # 16 usable of 18: 13 train -> 3 steps
    bad = pd.read_csv(tmp_path / "run" / "bad_files.csv")
    assert sorted(bad["path"]) == sorted([str(corrupt.resolve()), str(missing.resolve())])
    assert bad["reason"].str.len().min() > 10


def test_file_failing_mid_epoch_is_skipped_not_fatal(tiny_data, tmp_path, caplog):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    labels, train_set, _ = data.build_datasets(quick_args(data_dir, tmp_path / "run"), tmp_path)
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


# ----------------------------------------------------------------------------- losses and schedule knobs

def test_focal_loss_is_bce_at_gamma_zero_and_matches_its_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) > 0.7).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(losses.compute_loss(logits, targets, "focal", focal_gamma=0.0), bce, atol=1e-7)
    # Hand formula: -alpha_t (1 - p_t)^gamma log(p_t).
    p = logits.sigmoid()
    p_t = torch.where(targets == 1, p, 1 - p)
    alpha_t = torch.where(targets == 1, torch.tensor(0.25), torch.tensor(0.75))
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    got = losses.compute_loss(logits, targets, "focal", focal_gamma=2.0, focal_alpha=0.25)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    smoothed = torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    expected = -(smoothed * logits.log_softmax(dim=1)).sum()
    assert torch.allclose(losses.compute_loss(logits, target, "ce", label_smoothing=0.1), expected)
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.95, 0.05, 0.05]]))
    assert torch.allclose(losses.compute_loss(logits, target, "bce", label_smoothing=0.1), expected_bce)


def test_ce_renormalises_secondary_targets():
    logits = torch.tensor([[1.0, 0.5, -1.0]])
    with_secondary = torch.tensor([[1.0, 0.5, 0.0]])
    expected = -(torch.tensor([[2 / 3, 1 / 3, 0.0]]) * logits.log_softmax(dim=1)).sum()
    assert torch.allclose(losses.compute_loss(logits, with_secondary, "ce"), expected)


def test_loss_switch_changes_loss_and_activation(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--loss", "ce", "--loss-switch-epoch", "1", "--loss-after", "bce",
                          "--keep-last", "10"))
    first_epoch = torch.load(out / "checkpoint_step00000003.pt", weights_only=True)
    second_epoch = torch.load(out / "checkpoint_step00000006.pt", weights_only=True)
    assert first_epoch["model_config"]["activation"] == "softmax"
    assert second_epoch["model_config"]["activation"] == "sigmoid"
    with pytest.raises(ValueError, match="go together"):
        train.main(quick_args(tiny_data, out, "--loss-after", "bce"))


def test_freeze_backbone_trains_only_the_head(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--freeze-backbone-epochs", "1", "--epochs", "1", "--keep-last", "10"))
    torch.manual_seed(42)  # the run's seed: the initial weights
    import model as model_lib
    initial = model_lib.build_model(quick_args(tiny_data, out), ["aaabbb1", "cccddd1", "eeefff1", "ggghhh1"])
    trained = torch.load(out / "checkpoint_step00000003.pt", weights_only=True)["model"]
    for name, tensor in initial.state_dict().items():
        if name.startswith("backbone."):  # weights and BatchNorm statistics untouched
            assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(initial.state_dict()["head.weight"], trained["head.weight"])


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


def test_lr_find_writes_curve_and_suggests_a_rate(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train.main(quick_args(tiny_data, out, "--lr-find", "--lr-find-steps", "12"))
    assert 1e-7 <= result["suggested_lr"] <= 1.0
    curve = read_rows(out / "lr_find.csv")
    rates = [float(row["lr"]) for row in curve]
    assert rates == sorted(rates) and rates[0] == pytest.approx(1e-7)
    assert (out / "lr_find.png").stat().st_size > 1000
    assert not runfolder.periodic_checkpoints(out)  # nothing trained is kept


def test_model_flags_reach_the_checkpoint(tiny_data, tmp_path):
    import model as model_lib
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--frontend", "pcen", "--pcen-gain", "0.8", "--head", "sed",
                          "--img-size", "40x24", "--max-steps", "1", "--evals-per-epoch", "3"))
    loaded = model_lib.load_model(out / "best.pt")
    assert (loaded.config["frontend"], loaded.config["head"], loaded.config["img_size"]) == ("pcen", "sed", [40, 24])
    assert loaded.config["pcen_gain"] == 0.8
    with torch.inference_mode():
        assert loaded.frontend(torch.randn(2, loaded.window_samples)).shape == (2, 1, 40, 24)
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--img-size", "256"])


def test_augmentations_touch_training_batches_only(tiny_data, tmp_path, monkeypatch):
    import augment
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
    strong = ["--noise-prob", "1", "--gain-prob", "1", "--freq-masks", "2", "--time-masks", "2", "--epochs", "1"]
    train.main(quick_args(tiny_data, tmp_path / "augmented", *strong))
    # 3 training steps and 2 evaluations of 4 validation windows: augmentation ran once per step only.
    assert calls == {"waveforms": 3, "images": 3}
    train.main(quick_args(tiny_data, tmp_path / "plain", "--epochs", "1"))
    train.main(quick_args(tiny_data, tmp_path / "off", *strong, "--aug-strength", "0", "--mixup-prob", "0.5"))
    augmented = read_rows(tmp_path / "augmented" / "steps.csv")
    plain = read_rows(tmp_path / "plain" / "steps.csv")
    assert augmented[0]["loss"] != plain[0]["loss"]  # the first batch already differs
    assert read_rows(tmp_path / "off" / "steps.csv") != plain  # strength 0 also turns off the mixup plain has
    train.main(quick_args(tiny_data, tmp_path / "off_nomix", *strong, "--aug-strength", "0", "--mixup-prob", "0"))
    assert read_rows(tmp_path / "off" / "steps.csv") == read_rows(tmp_path / "off_nomix" / "steps.csv")


def test_inference_never_imports_augment():
    import subprocess
    import sys
    code = "import sys, infer; assert 'augment' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(train.Path(train.__file__).parent))


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


def test_background_noise_folder_is_mixed_into_training(tiny_data, tmp_path):
    import numpy as np
    import soundfile as sf
    background = tmp_path / "nocall"
    background.mkdir()
    sf.write(background / "rain.wav", (0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype("float32"), 16000)
    train.main(quick_args(tiny_data, tmp_path / "plain", "--max-steps", "2"))
    train.main(quick_args(tiny_data, tmp_path / "noisy", "--max-steps", "2", "--bg-dir", str(background),
                          "--bg-prob", "1"))
    plain, noisy = read_rows(tmp_path / "plain" / "steps.csv"), read_rows(tmp_path / "noisy" / "steps.csv")
    assert plain[0]["loss"] != noisy[0]["loss"]
    with pytest.raises(ValueError, match="empty"):
        train.main(quick_args(tiny_data, tmp_path / "bad", "--bg-dir", str(tmp_path / "empty_folder")))


def test_soundscape_validation_is_logged_and_agrees_with_infer(tiny_data, tmp_path):
    import numpy as np
    import soundfile as sf
    import infer
    from conftest import TINY_SPECIES, tone_recording
    folder = tmp_path / "soundscapes"
    folder.mkdir()
    species = sorted(TINY_SPECIES)
    rng = np.random.default_rng(5)
    audio = np.concatenate([tone_recording(TINY_SPECIES[code], 5.0, 22050, rng) for code in species * 2])
    sf.write(folder / "scape.wav", audio, 22050)
    labels = pd.DataFrame({"file": "scape.wav", "start_s": range(0, 40, 5), "end_s": range(5, 45, 5),
                           "labels": species * 2})
    labels.loc[3, "labels"] = ""  # a no-call row
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--val-soundscapes", str(tmp_path / "labels.csv"),
                          "--val-soundscape-audio", str(folder), "--monitor", "soundscape_cmap5",
                          "--keep-last", "5"))
    rows = read_rows(out / "metrics.csv")
    assert {"soundscape_cmap5", "soundscape_macro_ap"} <= set(rows[-1])
    # The same checkpoint scored by infer.py on the same labels gives the same number.
    scored = infer.main(infer.get_args_parser().parse_args([
        "--ckpts", str(out / "checkpoint_step00000003.pt"), "--soundscapes", str(folder),
        "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "sub.csv"), "--precision", "fp32"]))
    assert float(rows[-1]["soundscape_cmap5"]) == pytest.approx(scored["scores"]["cmap5"], abs=1e-6)
    assert float(rows[-1]["soundscape_macro_ap"]) == pytest.approx(scored["scores"]["macro_ap"], abs=1e-6)
    with pytest.raises(ValueError, match="needs --val-soundscapes"):
        train.main(quick_args(tiny_data, out, "--monitor", "soundscape_cmap5"))


def test_init_from_copies_shared_species_rows_by_name(tiny_data, tmp_path):
    source_dir = tmp_path / "pretrain"
    train.main(quick_args(tiny_data, source_dir, "--epochs", "1"))
    source = torch.load(source_dir / "best.pt", weights_only=True)

    target_data = tmp_path / "finetune_data"
    shutil.copytree(tiny_data, target_data)
    vocabulary = ["eeefff1", "zzzzzz1", "aaabbb1", "ggghhh1", "cccddd1"]  # permuted, plus a new species
    pd.DataFrame(columns=["row_id", *vocabulary]).to_csv(target_data / "sample_submission.csv", index=False)
    out = tmp_path / "finetune"
    train.main(quick_args(target_data, out, "--init-from", str(source_dir / "best.pt"), "--max-steps", "1",
                          "--lr", "0", "--evals-per-epoch", "3", "--mixup-prob", "0"))
    target = torch.load(out / "best.pt", weights_only=True)
    assert target["labels"] == vocabulary
    source_row = {label: i for i, label in enumerate(source["labels"])}
    for row, label in enumerate(vocabulary):
        if label in source_row:
            assert torch.equal(target["model"]["head.weight"][row], source["model"]["head.weight"][source_row[label]])
            assert torch.equal(target["model"]["head.bias"][row], source["model"]["head.bias"][source_row[label]])
        else:
            assert not any(torch.equal(target["model"]["head.weight"][row], source["model"]["head.weight"][i])
                           for i in range(4))
    # lr 0: the backbone's weights are the source's (BatchNorm statistics move in train mode, weights do not)
    name = "backbone.conv_stem.weight"
    assert torch.equal(target["model"][name], source["model"][name])
