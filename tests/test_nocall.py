"""The no-call class across modules: train.py --nocall from three sources (data.py's build_datasets),
infer.py drops it from the submission and can gate the species by it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import TINY_SPECIES, quick_args, quick_settings, run_infer

import audio
import data
import infer
import loader
import model as model_lib
import soundscapes
import train


def write_noise(path, seconds, rate=16000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = 0.01 * np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32)
    sf.write(path, audio, rate, format="OGG", subtype="VORBIS")


@pytest.fixture
def nocall_sources(tiny_data, tmp_path):
    """--bg-dir with 2 files, a soundscape table with 2 no-call rows of 4, detections with quiet windows."""
    write_noise(tmp_path / "bg" / "a.ogg", 6.0, seed=1)
    write_noise(tmp_path / "bg" / "sub" / "b.wav", 3.0, seed=2)
    write_noise(tmp_path / "scapes" / "test_soundscapes" / "s1.ogg", 20.0, seed=3)
    pd.DataFrame({"file": ["s1.ogg"] * 4, "start_s": [0, 5, 10, 15], "end_s": [5, 10, 15, 20],
                  "labels": ["nocall", "aaabbb1", "", "cccddd1 aaabbb1"]}).to_csv(
        tmp_path / "scapes" / "labels.csv", index=False)
    table = data.read_metadata(tiny_data)
    rows = []
    for filename, label in zip(table["filename"], table["primary_label"]):
        for window, top1 in enumerate([0.9, 0.01, 0.03]):   # two quiet windows each; the quietest is 5-10 s
            rows.append({"filename": filename, "start_s": 5.0 * window, "end_s": 5.0 * (window + 1),
                         "primary_label": label, "primary_score": top1, "top1_label": label, "top1_score": top1})
    pd.DataFrame(rows).to_csv(tmp_path / "detections.csv", index=False)
    return tmp_path


def test_nocall_windows_from_each_source(tiny_data, nocall_sources, tmp_path):
    _, plain_train, _ = data.build_datasets(quick_settings(tiny_data, tmp_path / "plain").data, tmp_path)
    settings = quick_settings(tiny_data, tmp_path / "run", "--nocall", "--nocall-audio", str(nocall_sources / "bg"),
                              "--nocall-soundscapes", str(nocall_sources / "scapes" / "labels.csv"),
                              "--nocall-detections", str(nocall_sources / "detections.csv"))
    labels, train_set, val_set = data.build_datasets(settings.data, tmp_path)
    assert labels == sorted(TINY_SPECIES) + ["nocall"]
    n = len(plain_train)
    nocall = slice(n, len(train_set))
    # 2 background files + 2 no-call soundscape rows (0-5 s and the empty 10-15 s) + 1 per training recording
    assert len(train_set) - n == 2 + 2 + n
    assert set(train_set.primary_labels[nocall]) == {"nocall"}
    assert (train_set.targets[nocall] == np.eye(len(labels))[-1]).all()
    assert (train_set.targets[:n, -1] == 0).all()                    # species recordings are not no-call
    starts = train_set.starts[nocall]
    assert np.isnan(starts[:2]).all() and starts[2:4].tolist() == [0.0, 10.0]
    assert train_set.anywhere[nocall].all() and not train_set.anywhere[:n].any()
    assert starts[4:].tolist() == [5.0] * n                          # the quietest window of each recording
    assert train_set.paths[n + 4:] == plain_train.paths               # training recordings only, never validation
    assert val_set.targets.shape[1] == len(labels) and (val_set.targets[:, -1] == 0).all()


def test_background_files_are_cropped_anywhere_whatever_the_crop_policy():
    """A --bg-dir file of the nocall class has no calls at its ends to prefer: its crops cover the whole
    file, while a recording under --crop-policy ends keeps to its first and last --ends-seconds."""
    crop = audio.CropSettings(32000, 5.0, "ends", 8.0, "zero")
    dataset = loader.RecordingDataset(["recording.ogg", "bed.ogg"], [60.0, 60.0], np.zeros((2, 1), np.float32),
                                      crop, seed=3, anywhere=[False, True])
    starts = {index: np.array([dataset.crop_start((index, epoch, 0))[1] for epoch in range(400)])
              for index in (0, 1)}
    assert ((starts[0] <= 3.0) | (starts[0] >= 52.0)).all()               # inside 0-8 s or 52-60 s
    assert starts[1].min() < 5.0 and starts[1].max() > 50.0 and ((starts[1] > 10) & (starts[1] < 45)).mean() > 0.5


def test_a_folder_of_background_recordings_gives_each_of_its_rows(nocall_sources, tmp_path):
    """--nocall-soundscapes DIR: every 5-s row of each file on infer.py's grid (a last row needs >= 1 s), the
    same rows as a table listing them all as no-call; an unreadable file is skipped."""
    folder = nocall_sources / "bg"
    (folder / "broken.ogg").write_bytes(b"not audio")
    rows = soundscapes.nocall_soundscape_rows(folder)
    assert [(Path(path).name, start) for path, start in zip(rows["path"], rows["start_s"])] == [
        ("a.ogg", 0.0), ("a.ogg", 5.0), ("b.wav", 0.0)]                 # 6 s: 5 + a 1-s last row; 3 s: one row
    table = tmp_path / "rows.csv"
    pd.DataFrame({"file": ["a.ogg", "a.ogg", "sub/b.wav"], "start_s": [0, 5, 0], "end_s": [5, 10, 5],
                  "labels": ""}).to_csv(table, index=False)
    from_table = soundscapes.nocall_soundscape_rows(table, audio_dir=folder)
    assert [Path(p).resolve() for p in from_table["path"]] == [Path(p).resolve() for p in rows["path"]]
    assert from_table["start_s"].tolist() == rows["start_s"].tolist()


def test_a_folder_as_nocall_audio_and_as_nocall_soundscapes_gives_its_files_then_its_rows(tiny_data,
                                                                                         nocall_sources, tmp_path):
    """The README's recipe (one folder as --nocall-audio, formerly --bg-dir under --nocall, and as
    --nocall-soundscapes): each file whole (a crop anywhere per epoch), then each 5-s row of each file, in
    this order, the order training's random draws are made in."""
    folder = nocall_sources / "bg"
    sources = data.NocallSources(audio_dir=str(folder), soundscapes=str(folder), soundscape_audio=None, detections=None,
                                 max_score=0.05, per_recording=1)
    table = data.read_metadata(tiny_data)
    windows = data.nocall_windows(sources, table, np.arange(len(table)), tmp_path, strict=False)
    a, b = str(folder / "a.ogg"), str(folder / "sub" / "b.wav")
    assert [(Path(path).resolve(), source) for path, source in zip(windows["path"], windows["source"])] == [
        (Path(a).resolve(), "--nocall-audio"), (Path(b).resolve(), "--nocall-audio"),
        (Path(a).resolve(), "--nocall-soundscapes"), (Path(a).resolve(), "--nocall-soundscapes"),
        (Path(b).resolve(), "--nocall-soundscapes")]
    np.testing.assert_array_equal(windows["start_s"], [np.nan, np.nan, 0.0, 5.0, 0.0])
    np.testing.assert_allclose(windows["duration"], [6.0, 3.0, 6.0, 6.0, 3.0], atol=0.01)


def test_nocall_without_a_source_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--nocall needs background audio: --nocall-audio, --nocall-soundscapes"):
        data.build_datasets(quick_settings(tiny_data, tmp_path / "run", "--nocall").data, tmp_path)


def test_gate_by_nocall_by_hand():
    scores = np.array([[0.5, 0.8, 0.2], [1.0, 0.0, 1.0]], dtype=np.float32)
    gated = infer.gate_by_nocall(scores, ["a", "b", "nocall"])
    np.testing.assert_allclose(gated, [[0.4, 0.64, 0.2], [0.0, 0.0, 1.0]])
    assert infer.gate_by_nocall(scores, ["a", "b", "c"]) is scores


def test_train_with_nocall_then_infer_drops_and_gates_it(tiny_data, nocall_sources, tmp_path):
    out = tmp_path / "run"
    state = train.main(quick_args(tiny_data, out, "--epochs", "1", "--nocall", "--bg-dir",
                                  str(nocall_sources / "bg")))
    assert model_lib.read_checkpoint(out / "best.pt")["labels"][-1] == "nocall"
    logged = pd.read_csv(out / "metrics.csv")
    assert logged["cmap5"].between(0, 1).all()
    scapes = nocall_sources / "scapes" / "test_soundscapes"
    common = ["--ckpts", out / "best.pt", "--soundscapes", scapes, "--precision", "fp32"]
    plain = run_infer(*common, "--out", tmp_path / "a.csv")
    gated = run_infer(*common, "--out", tmp_path / "b.csv", "--nocall-gate")
    columns = sorted(TINY_SPECIES)
    assert list(plain["submission"].columns) == ["row_id", *columns]      # nocall never reaches the submission
    before = plain["submission"][columns].to_numpy()
    after = gated["submission"][columns].to_numpy()
    ratio = after / before                                                  # one factor 1 - p(nocall) per row
    assert (ratio < 1).all() and np.allclose(ratio, ratio[:, :1], rtol=1e-4)
    assert state.out_dir == out
