"""Fault injection across modules: bad audio and metadata, interruptions, full disks, non-finite numbers.

Every bad file is generated here, inside the test; nothing is committed. Each fault is
met where a user meets it: training (train.py or the data it reads), inference
(infer.py), or both. (A torn checkpoint passed over by --resume auto: test_runfolder.py.)
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import unittest.mock

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import quick_args, quick_settings, read_rows, run_infer, small_tmpfs, tone_recording, write_tiny_dataset

import audio
import data
import extras as extras_lib
import infer
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
    _, train_set, val_set = data.build_datasets(quick_settings(data_dir, out, "--epochs", "1").data, out)
    assert len(train_set) // 4 > 0                      # at least one training step of --batch-size 4
    bad = pd.read_csv(out / "bad_files.csv")
    assert len(bad) >= 1 and bad["reason"].str.len().min() > 5
    # every recording is trained on or validated on, except those listed as bad
    listed = set(bad["path"])
    assert set(train_set.paths + val_set.paths) == {path for path in data.read_metadata(data_dir)["path"]
                                                     if path not in listed}
    with pytest.raises(ValueError, match="--strict"):
        data.build_datasets(quick_settings(data_dir, out, "--strict").data, out)


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
        data.build_datasets(quick_settings(data_dir, tmp_path / "run").data, tmp_path)
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


def test_an_evaluation_after_only_skipped_steps_logs_no_training_loss(tiny_data, tmp_path, monkeypatch):
    """3 steps an epoch, evaluated after steps 2 and 3: when step 3 is skipped, the second evaluation has no
    training loss to report (NaN), not a loss of 0."""
    real_loss, calls = losses.batch_loss, {"n": 0}

    def third_is_nan(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs) * (float("nan") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(losses, "batch_loss", third_is_nan)
    train.main(quick_args(tiny_data, tmp_path / "run", "--skip-nonfinite", "1", "--epochs", "1"))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["global_step"].tolist() == [2, 3]
    assert metrics["train_loss"].iloc[0] > 0 and np.isnan(metrics["train_loss"].iloc[1])


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


# ----------------------------------------------------------------------------- run folders, resume, full disks (#17)

def test_a_new_run_never_touches_a_folder_holding_another_run(trained_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(FileExistsError, match="already holds files.*--resume auto.*--overwrite"):
        train.main(quick_args(tiny_data, out, "--epochs", "1"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before     # nothing written or deleted
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--overwrite"))
    aside = tmp_path / "run.previous-1"
    assert {path.name: path.read_bytes() for path in aside.iterdir()} == before   # moved aside, whole
    assert read_rows(out / "metrics.csv") == read_rows(trained_run / "metrics.csv")   # a fresh run of its own
    with pytest.raises(ValueError, match="--keep-last 0: keep at least 1"):
        train.main(quick_args(tiny_data, tmp_path / "other", "--keep-last", "0"))
    with pytest.raises(ValueError, match="--evals-per-epoch 0: evaluate"):      # else nothing is ever saved
        train.main(quick_args(tiny_data, tmp_path / "other", "--evals-per-epoch", "0"))
    assert not (tmp_path / "other").exists()


def test_resume_refuses_other_settings_or_other_data(trained_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    with pytest.raises(ValueError, match=r"other settings: --batch-size 4 -> 2; --fmax 8000.0 -> 11025.0; --lr "
                                         r"0.0005 -> 0.1; --sample-rate 16000 -> 22050; --window-seconds 2.0 -> 3.0"):
        train.main(quick_args(tiny_data, out, "--resume", "auto", "--sample-rate", "22050", "--fmax", "11025",
                              "--window-seconds", "3", "--batch-size", "2", "--lr", "0.1"))
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    table = pd.read_csv(data_dir / "train_metadata.csv")
    table.iloc[1:].to_csv(data_dir / "train_metadata.csv", index=False)          # one metadata row removed
    with pytest.raises(ValueError, match="trained on other data.*metadata row added or removed"):
        train.main(quick_args(data_dir, out, "--resume", "auto", "--epochs", "2"))
    state = train.main(quick_args(tiny_data, out, "--resume", "auto", "--epochs", "2", "--patience", "3"))
    assert state.epoch == 2                                                       # allowed changes are allowed


def test_every_metadata_row_twice_is_merged_not_leaked(tiny_data, tmp_path, caplog):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    table = pd.read_csv(data_dir / "train_metadata.csv")
    pd.concat([table, table]).to_csv(data_dir / "train_metadata.csv", index=False)
    with caplog.at_level("WARNING"):
        merged = data.read_metadata(data_dir)
    assert f"{len(table)} row(s) name a file listed before" in caplog.text
    assert list(merged["path"]) == [path.replace(str(tiny_data), str(data_dir))
                                    for path in data.read_metadata(tiny_data)["path"]]
    settings = quick_settings(data_dir, tmp_path / "run")
    train_index, val_index = data.split_usable_recordings(merged, settings.data.split)
    assert not set(merged["path"].iloc[train_index]) & set(merged["path"].iloc[val_index])


def test_a_real_full_disk_during_training_ends_in_one_message_and_resume_finishes(tiny_data, tmp_path):
    # 2 MB: config, logs, the plot and one checkpoint fit (1.3 MB); the first evaluation's second does not
    # (torch's zip writer fails with "unexpected pos", not an OSError).
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "run"
        with pytest.raises(runfolder.CheckpointSaveError, match=r"could not write .*run/checkpoint_step00000002.pt "
                                                                r"\(.*; [\d.]+ MB needed, [\d.]+ MB free on its "
                                                                r"disk\).*--resume auto"):
            train.main(quick_args(tiny_data, out, "--epochs", "1", "--keep-last", "1"))
        assert not [path for path in out.iterdir() if path.name.endswith(".tmp")]
        assert not runfolder.periodic_checkpoints(out)       # written last: the resume redoes this evaluation
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)    # space freed
        train.main(quick_args(tiny_data, out, "--epochs", "1", "--keep-last", "1", "--resume", "auto"))
        full = tmp_path / "full"
        train.main(quick_args(tiny_data, full, "--epochs", "1", "--keep-last", "1"))
        for name in ("metrics.csv", "steps.csv", "drawn_counts.csv"):
            assert read_rows(out / name) == read_rows(full / name), name
        assert (out / "best.pt").is_file()


# ----------------------------------------------------------------------------- hostile tables and outputs (#17)

def test_output_names_are_unique_and_columns_and_labels_unrepeated(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    tone = tone_recording(2500.0, 6.0, 16000, np.random.default_rng(0))
    sf.write(folder / "a.wav", tone, 16000)
    sf.write(folder / "a.flac", tone, 16000)
    with pytest.raises(ValueError, match=r"a.flac and .*a.wav have the same name 'a'"):
        run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    (folder / "a.flac").unlink()
    (folder / "site2").mkdir()
    sf.write(folder / "site2" / "a.ogg", tone, 16000)
    with pytest.raises(ValueError, match="same name 'a'"):
        run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    shutil.rmtree(folder / "site2")
    (tmp_path / "twice.txt").write_text(f"{folder / 'a.wav'}\n{folder / 'a.wav'}\n")
    with pytest.raises(ValueError, match="a.wav is listed twice"):
        run_infer("--ckpts", checkpoint, "--file-list", tmp_path / "twice.txt", "--out", tmp_path / "sub.csv")
    labels = torch.load(checkpoint, weights_only=True)["labels"]
    (tmp_path / "sample.csv").write_text(",".join(["row_id", labels[0], labels[1], labels[0]]) + "\n")
    with pytest.raises(ValueError, match=rf"sample.csv has the column\(s\) \['{labels[0]}'\] more than once"):
        run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--sample-submission", tmp_path / "sample.csv")
    repeated = torch.load(checkpoint, weights_only=True)
    repeated["labels"][1] = repeated["labels"][0]
    repeated["model_config"]["labels"] = repeated["labels"]
    torch.save(repeated, tmp_path / "repeated.pt")
    with pytest.raises(ValueError, match=rf"lists label\(s\) \['{labels[0]}'\] more than once"):
        run_infer("--ckpts", tmp_path / "repeated.pt", "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (["--smooth=1,-1,1"], "non-negative weights with a positive sum"),
    (["--smooth=0,0,0"], "positive sum"),
    (["--smooth=1,2"], "odd number"),
    (["--smooth=a,b,c"], "comma-separated numbers"),
    (["--combine", "power", "--power", "0"], "--power 0.0: .* must be positive"),
    (["--file-prior", "1.5"], "between 0 and 1"),
    (["--hop", "10"], "--hop 10.0: .* at most 5"),      # rows without a window would be NaN
    (["--hop", "0"], "above 0"),
])
def test_options_that_would_write_non_finite_scores_are_refused(checkpoint, tmp_path, flags, message):
    folder = tmp_path / "s"
    folder.mkdir()
    sf.write(folder / "a.wav", tone_recording(2500.0, 6.0, 16000, np.random.default_rng(0)), 16000)
    with pytest.raises(ValueError, match=message):
        run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv", *flags)
    assert not (tmp_path / "sub.csv").exists()


def test_rows_with_non_finite_scores_become_zeros_and_a_problem(caplog):
    rows, problem = infer.finite_rows("x.ogg", np.array([[0.5, np.nan], [0.1, 0.2]], dtype=np.float32))
    assert (rows == 0).all() and problem == "x.ogg: non-finite scores; 2 row(s) of zeros"
    good = np.array([[0.5, 0.25]], dtype=np.float32)
    assert infer.finite_rows("y.ogg", good) == (good, None)


def test_table_paths_stay_inside_their_folders(tiny_data, tmp_path, caplog):
    victim = tmp_path / "victim.ogg"
    victim.write_bytes(b"precious")
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    first = pd.read_csv(data_dir / "train_metadata.csv")["filename"][0]
    for hostile in ("../../victim.ogg", str(victim)):
        extras = pd.DataFrame({"filename": [first, hostile], "start_s": [0.0, 0.0]})
        with pytest.raises(ValueError, match="points outside"):
            extras_lib.write_extra_audio(extras, data_dir / "train_audio", tmp_path / "out" / "chunks", 5.0)
        target = pd.DataFrame({"filename": [f"../../../{victim.stem}/x.ogg"], "start_s": [0.0]})
        with pytest.raises(ValueError, match="points outside"):
            extras_lib.write_extra_audio(target, data_dir / "train_audio", tmp_path / "out" / "chunks", 5.0)
    assert victim.read_bytes() == b"precious"
    # Reading: a metadata filename or a soundscape table naming a file outside its folder is refused.
    table = pd.read_csv(data_dir / "train_metadata.csv")
    table.loc[0, "filename"] = "../../victim.ogg"
    table.to_csv(data_dir / "train_metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"row 2: '../../victim.ogg' points outside"):
        data.read_metadata(data_dir)
    (tmp_path / "labels.csv").write_text("file,start_s,end_s,labels\n../victim.ogg,0,5,nocall\n")
    with pytest.raises(ValueError, match="points outside"):
        soundscapes.read_soundscape_labels(tmp_path / "labels.csv", tmp_path / "audio")
    # A species folder that is a link to another disk is fine: the names stay inside.
    linked = tmp_path / "linked"
    shutil.copytree(tiny_data, linked)
    species = sorted((linked / "train_audio").iterdir())[0]
    shutil.move(species, tmp_path / "elsewhere")
    species.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert len(data.read_metadata(linked)) == len(data.read_metadata(tiny_data))


def test_extras_with_a_missing_column_or_recording_say_so(tiny_data, tmp_path, caplog):
    detections = pd.DataFrame({"filename": ["a/XC1.ogg"], "start_s": [0.0], "end_s": [5.0], "primary_score": [0.9]})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['primary_label'\]"):
        extras_lib.select_extras(detections, 0.5, 1, 3, 1.0, 0)
    first = pd.read_csv(tiny_data / "train_metadata.csv")["filename"][0]
    extras = pd.DataFrame({"filename": ["zzz/XC999.ogg", first], "start_s": [0.0, 0.0]})
    with caplog.at_level("WARNING"):
        written = extras_lib.write_extra_audio(extras, tiny_data / "train_audio", tmp_path / "chunks", 5.0)
    assert written == 1 and "skipped" in caplog.text and "XC999.ogg" in caplog.text


def test_sample_rates_that_would_ask_for_gigabytes_are_refused(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="below 4000 Hz"):
        audio.to_mono_resampled(np.ones((10, 1), dtype=np.float32), 1, 32000)
    assert "below 4000 Hz" in audio.check_audio_files([write_wav_declaring(tmp_path / "one_hz.wav", 1)])[1][0][1]
    with caplog.at_level("WARNING"):
        tone = tone_recording(2500.0, 1.0, 44100, rng)
        snapped = audio.to_mono_resampled(tone[:, None], 44101, 32000)      # read as 44.1 kHz
    assert "44101 Hz read as 44100 Hz" in caplog.text
    np.testing.assert_array_equal(snapped, audio.to_mono_resampled(tone[:, None], 44100, 32000))
    with pytest.raises(ValueError, match=r"44999 Hz: resampling it to 32000 Hz needs a [\d,]+-tap kernel"):
        audio.to_mono_resampled(tone[:, None], 44999, 32000)
    assert audio.kernel_taps(22050, 32000) == torchaudio.transforms.Resample(22050, 32000).kernel.numel()
    long_file = tmp_path / "long.wav"
    sf.write(long_file, np.zeros(16000 * 3, dtype=np.float32), 16000)
    monkeypatch.setattr(audio, "MAX_DECODED_SECONDS", 2.0)
    with pytest.raises(ValueError, match=r"long.wav: 0.0 h of audio; files are decoded whole up to"):
        audio.read_audio(long_file, 16000)


def write_wav_declaring(path, rate: int):
    """A valid WAV whose header declares `rate` samples per second."""
    sf.write(path, np.zeros(100, dtype=np.float32), rate)
    return path
