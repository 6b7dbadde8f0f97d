"""Fault injection across modules: bad audio and metadata, interruptions, full disks, non-finite numbers.

Every bad file is generated here, inside the test; nothing is committed. Each fault is
met where a user meets it: training (train.py or the data it reads), inference
(infer.py), or both. (A torn checkpoint passed over by --resume auto: test_runfolder.py.)
"""
from __future__ import annotations

import errno
import os
import signal
import unittest.mock

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import quick_args, read_rows, run_infer, tone_recording, write_tiny_dataset

import audio
import data
import losses
import model as model_lib
import runfolder
import soundscapes
import train


def write_bad_audio(folder, sample_rate=16000):
    """Every kind of bad or awkward audio file the issue lists -> {name: what it is}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = tone_recording(2500.0, 7.0, sample_rate, rng)
    kinds = {}
    open(folder / "zero_length.ogg", "wb").close()
    kinds["zero_length.ogg"] = "unreadable"
    (folder / "text.ogg").write_text("this is a text file named .ogg")
    kinds["text.ogg"] = "unreadable"
    sf.write(folder / "whole.ogg", good, sample_rate, format="OGG", subtype="VORBIS")
    data_bytes = (folder / "whole.ogg").read_bytes()
    (folder / "truncated.ogg").write_bytes(data_bytes[: len(data_bytes) // 3])
    kinds["truncated.ogg"] = "truncated"
    (folder / "whole.ogg").unlink()
    nan_audio = good.copy()
    nan_audio[1000:1100] = np.nan
    nan_audio[2000] = np.inf
    sf.write(folder / "nan.wav", nan_audio, sample_rate, subtype="FLOAT")
    kinds["nan.wav"] = "nan"
    sf.write(folder / "silence.wav", np.zeros(sample_rate * 6, dtype=np.float32), sample_rate)
    kinds["silence.wav"] = "silence"
    sf.write(folder / "stereo.flac", np.stack([good, good], axis=1), sample_rate)
    kinds["stereo.flac"] = "ok"
    sf.write(folder / "six_channels.wav", np.stack([good] * 6, axis=1), sample_rate)
    kinds["six_channels.wav"] = "ok"
    for rate in (8000, 22050, 44100, 48000, 96000):
        sf.write(folder / f"rate_{rate}.wav", tone_recording(2500.0, 6.0, rate, rng), rate)
        kinds[f"rate_{rate}.wav"] = "ok"
    sf.write(folder / "short.wav", good[: sample_rate // 2], sample_rate)
    kinds["short.wav"] = "ok"
    return kinds


# ----------------------------------------------------------------------------- bad audio

def test_inference_on_a_folder_of_bad_files_writes_the_good_ones(checkpoint, tmp_path):
    folder = tmp_path / "bad"
    kinds = write_bad_audio(folder)
    result = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert np.isfinite(submission.iloc[:, 1:].to_numpy()).all()
    stems = {row_id.rsplit("_", 1)[0] for row_id in submission["row_id"]}
    for name, kind in kinds.items():
        stem = name.rsplit(".", 1)[0]
        if kind in ("ok", "nan", "silence"):
            assert stem in stems, name
    assert {"zero_length", "text"}.isdisjoint(stems)
    reported = " ".join(result["problems"])
    assert "zero_length.ogg" in reported and "text.ogg" in reported
    assert len(submission[submission["row_id"].str.startswith("six_channels_")]) == 2  # 7 s -> 2 rows


def test_training_skips_bad_recordings_and_strict_refuses(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    table = pd.read_csv(data_dir / "train_metadata.csv")
    first = data_dir / "train_audio" / table.loc[0, "filename"]
    first.write_bytes(first.read_bytes()[:200])  # truncated ogg
    (data_dir / "train_audio" / table.loc[1, "filename"]).write_text("not audio")
    # what train.py trains on: the data set as data.build_datasets reads it
    out = tmp_path / "run"
    out.mkdir()
    _, train_set, val_set = data.build_datasets(quick_args(data_dir, out, "--epochs", "1"), out)
    assert len(train_set) // 4 > 0                      # at least one training step of --batch-size 4
    bad = pd.read_csv(out / "bad_files.csv")
    assert len(bad) >= 1 and bad["reason"].str.len().min() > 5
    # every recording is trained on or validated on, except those listed as bad
    listed = set(bad["path"])
    assert set(train_set.paths + val_set.paths) == {path for path in data.read_metadata(data_dir)["path"]
                                                     if path not in listed}
    with pytest.raises(ValueError, match="--strict"):
        data.build_datasets(quick_args(data_dir, out, "--strict"), out)


def test_nan_samples_are_zeroed_and_short_clips_padded(tmp_path):
    kinds = write_bad_audio(tmp_path / "audio")
    assert kinds["nan.wav"] == "nan"
    waveform = audio.read_window(tmp_path / "audio" / "nan.wav", start_seconds=0.0, seconds=1.0, sample_rate=16000)
    assert np.isfinite(waveform).all() and (waveform[1000:1100] == 0).all()
    short = audio.read_window(tmp_path / "audio" / "short.wav", start_seconds=0.0, seconds=2.0, sample_rate=16000,
                              pad="zero")
    assert short.shape == (32000,) and (short[8000:] == 0).all()
    repeated = audio.read_window(tmp_path / "audio" / "short.wav", start_seconds=0.0, seconds=2.0, sample_rate=16000,
                                 pad="repeat")
    np.testing.assert_array_equal(repeated[8000:16000], repeated[:8000])
    assert np.abs(repeated[8000:]).max() > 0


def test_species_without_usable_recordings_is_warned(tmp_path, caplog):
    data_dir = write_tiny_dataset(tmp_path / "data")
    table = pd.read_csv(data_dir / "train_metadata.csv")
    for name in table.loc[table["primary_label"] == "ggghhh1", "filename"]:
        (data_dir / "train_audio" / name).write_text("broken")
    with caplog.at_level("WARNING"):
        data.build_datasets(quick_args(data_dir, tmp_path / "run"), tmp_path)
    assert "no usable recording" in caplog.text and "ggghhh1" in caplog.text


# ----------------------------------------------------------------------------- interruptions

def test_ctrl_c_saves_the_current_step_and_resume_auto_continues_exactly(tiny_data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train.main(quick_args(tiny_data, full))
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job

    real_loss = losses.batch_loss
    calls = {"n": 0}

    def loss_with_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during step 0
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(losses, "batch_loss", loss_with_ctrl_c)
    interrupted = tmp_path / "interrupted"
    state = train.main(quick_args(tiny_data, interrupted))
    assert state.stop_reason.startswith("interrupted: saved checkpoint_step00000001.pt")
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    monkeypatch.setattr(losses, "batch_loss", real_loss)
    train.main(quick_args(tiny_data, interrupted, "--resume", "auto"))
    assert read_rows(interrupted / "steps.csv") == read_rows(full / "steps.csv")
    assert read_rows(interrupted / "metrics.csv") == read_rows(full / "metrics.csv")


def test_full_disk_keeps_previous_checkpoints_and_says_so(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def save_until_disk_is_full(payload, handle, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # the first evaluation writes checkpoint + best.pt; then the disk is full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(payload, handle, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_until_disk_is_full)
    with pytest.raises(runfolder.CheckpointSaveError, match="No space left on device.*intact.*--resume auto"):
        train.main(quick_args(tiny_data, out))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in runfolder.periodic_checkpoints(out)] == ["checkpoint_step00000002.pt"]
    assert torch.load(out / "checkpoint_step00000002.pt", weights_only=True)["global_step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- numerics

def test_skip_nonfinite_skips_up_to_k_batches(tiny_data, tmp_path, monkeypatch, caplog):
    real_loss = losses.batch_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 4) else loss
    monkeypatch.setattr(losses, "batch_loss", sometimes_nan)
    with caplog.at_level("WARNING"):
        state = train.main(quick_args(tiny_data, tmp_path / "run", "--skip-nonfinite", "2"))
    assert state.skipped_nonfinite == 2 and caplog.text.count("skipping batch") == 2
    steps = pd.read_csv(tmp_path / "run" / "steps.csv")
    assert list(steps["global_step"]) == [0, 2, 4, 5]  # the skipped steps logged no loss
    calls["n"] = 0
    with pytest.raises(losses.NonFiniteLossError, match="batch files"):
        train.main(quick_args(tiny_data, tmp_path / "run2", "--skip-nonfinite", "1"))


def test_non_finite_gradient_is_caught_like_a_loss(tiny_data, tmp_path, monkeypatch):
    real_check = train.check_gradients

    def poisoned(parts, args):
        for parameter in parts.model.head.parameters():
            parameter.grad = torch.full_like(parameter, float("inf"))
        return real_check(parts, args)
    monkeypatch.setattr(train, "check_gradients", poisoned)
    with pytest.raises(losses.NonFiniteLossError, match="non-finite gradient norm"):
        train.main(quick_args(tiny_data, tmp_path / "run"))


def test_one_hour_file_gives_720_rows(checkpoint, tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    rate = 8000  # the checkpoint runs at 16 kHz: this also exercises resampling of a long file
    with sf.SoundFile(folder / "hour.wav", "w", rate, 1) as handle:
        block = (0.01 * np.random.default_rng(0).standard_normal(rate * 60)).astype(np.float32)
        for _ in range(60):
            handle.write(block)
    result = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv",
                       "--batch-size", "128")
    assert result["rows"] == 720 and not result["problems"]
    assert pd.read_csv(tmp_path / "sub.csv")["row_id"].iloc[-1] == "hour_3600"


def test_ensemble_members_with_other_rates_and_windows_each_get_their_own_input(checkpoint, tmp_path):
    """A member trained at another sample rate / window is fed its own resampled windows, not mixed."""
    other = torch.load(checkpoint, weights_only=True)
    other["model_config"].update(sample_rate=22050, window_seconds=3.0, fmax=11025.0)
    for key in [k for k in other["model"] if k.startswith("frontend.")]:
        del other["model"][key]  # the frontend's buffers follow the new rate
    rebuilt = model_lib.BirdCallModel(other["model_config"])
    other["model"].update({k: v for k, v in rebuilt.state_dict().items() if k.startswith("frontend.")})
    torch.save(other, tmp_path / "other.pt")
    folder = tmp_path / "s"
    folder.mkdir()
    sf.write(folder / "a.wav", tone_recording(2500.0, 12.0, 44100, np.random.default_rng(0)), 44100)
    fed = []
    real_fill_batch = soundscapes.fill_batch

    def spy(sources, window_samples):
        fed.append((window_samples, len(sources), {len(waveform) for waveform, _ in sources}))
        return real_fill_batch(sources, window_samples)
    with unittest.mock.patch.object(soundscapes, "fill_batch", spy):
        result = run_infer("--ckpts", checkpoint, tmp_path / "other.pt", "--soundscapes", folder,
                           "--out", tmp_path / "sub.csv")
    assert result["rows"] == 3
    # 12 s of 44.1 kHz audio: 2-s windows of the 16 kHz waveform, 3-s windows of the 22.05 kHz one
    assert sorted(fed) == [(32000, 3, {12 * 16000}), (66150, 3, {12 * 22050})]


def test_non_finite_logits_never_reach_a_metric_or_a_submission(checkpoint, tiny_data, tmp_path, monkeypatch):
    with pytest.raises(FloatingPointError, match="2 non-finite logits"):
        model_lib.checked_scores(torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]]), activation="softmax",
                                 source="test")
    # Inference: a checkpoint whose head emits nan writes no submission.
    broken = torch.load(checkpoint, weights_only=True)
    broken["model"]["head.bias"][0] = float("nan")
    torch.save(broken, tmp_path / "broken.pt")
    folder = tmp_path / "s"
    folder.mkdir()
    sf.write(folder / "a.wav", tone_recording(2500.0, 6.0, 16000, np.random.default_rng(0)), 16000)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        run_infer("--ckpts", tmp_path / "broken.pt", "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()
    # Training: nan validation logits stop the run before a metrics row or checkpoint is written.
    real_classify = model_lib.BirdCallModel.classify

    def nan_in_eval(self, image):
        logits = real_classify(self, image)
        return logits if self.training else logits * float("nan")
    monkeypatch.setattr(model_lib.BirdCallModel, "classify", nan_in_eval)
    with pytest.raises(FloatingPointError, match="validation windows"):
        train.main(quick_args(tiny_data, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.csv").exists() and not runfolder.periodic_checkpoints(tmp_path / "run")
