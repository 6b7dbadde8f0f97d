"""Tests for infer.py: row layout, ensembles aligned by name, smoothing and priors, output formats,
scoring against labels, detections, EMA and averaged weights, bad input.

A checkpoint trained once for the session (conftest's `checkpoint`) is scored on tone
recordings written here. (Runners, streams and backends: test_engines.py; the row grid
and window cutting: test_soundscapes.py.)
"""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT, TINY_SPECIES, quick_args, run_infer, tone_recording, write_tone

import engines
import infer
import outputs
import model as model_lib
import soundscapes
import train


def test_row_ids_and_counts_end_to_end(checkpoint, tmp_path):
    folder = tmp_path / "soundscapes"
    folder.mkdir()
    write_tone(folder / "soundscape_29201.wav", 12.3)
    write_tone(folder / "short.flac", 5.0, sample_rate=44100, channels=2)
    write_tone(folder / "long.ogg", 600.0, sample_rate=22050)
    result = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    submission = pd.read_csv(tmp_path / "sub.csv")
    ids = list(submission["row_id"])
    assert ids[:3] == ["long_5", "long_10", "long_15"] and ids[119] == "long_600"
    assert ids[120:] == ["short_5", "soundscape_29201_5", "soundscape_29201_10", "soundscape_29201_15"]
    assert len(submission) == 124 == result["rows"]
    assert list(submission.columns) == ["row_id", *sorted(TINY_SPECIES)]
    scores = submission.drop(columns="row_id").to_numpy()
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)  # softmax checkpoint: rows are distributions


def permuted_copy(checkpoint, path, order):
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["head.weight"] = state["model"]["head.weight"][order]
    state["model"]["head.bias"] = state["model"]["head.bias"][order]
    state["model_config"]["labels"] = [state["model_config"]["labels"][i] for i in order]
    torch.save(state, path)
    return path


def test_ensemble_aligns_permuted_label_orders(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 17.0)
    permuted = permuted_copy(checkpoint, tmp_path / "permuted.pt", [2, 0, 3, 1])
    common = ["--soundscapes", folder, "--precision", "fp32"]
    alone = run_infer("--ckpts", checkpoint, "--out", tmp_path / "1.csv", *common)["submission"]
    other = run_infer("--ckpts", permuted, "--out", tmp_path / "2.csv", *common)["submission"]
    both = run_infer("--ckpts", checkpoint, permuted, "--out", tmp_path / "3.csv", *common)["submission"]
    species = sorted(TINY_SPECIES)
    assert list(other.columns[1:]) != species  # the permuted model alone keeps its own order
    np.testing.assert_allclose(other[species].to_numpy(), alone[species].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(both[species].to_numpy(), alone[species].to_numpy(), atol=1e-6)


def test_sample_submission_fixes_columns_and_unknown_species_get_zero(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 7.0)
    columns = ["row_id", "zzzzzz1", "ggghhh1", "aaabbb1", "eeefff1", "cccddd1"]
    pd.DataFrame(columns=columns).to_csv(tmp_path / "sample_submission.csv", index=False)
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv",
              "--sample-submission", tmp_path / "sample_submission.csv")
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns) == columns
    assert (submission["zzzzzz1"] == 0).all() and (submission["ggghhh1"] > 0).all()


def test_smoothing_and_file_prior_by_hand():
    scores = np.array([[1.0], [0.0], [0.0], [0.5]], dtype=np.float32)
    smoothed = infer.smooth_rows(scores, [0.1, 0.8, 0.1])
    # Edges renormalise over the neighbours that exist: row 0 = (0.8*1 + 0.1*0) / 0.9.
    np.testing.assert_allclose(smoothed[:, 0], [0.8 / 0.9, 0.1, 0.05, (0.8 * 0.5) / 0.9], rtol=1e-6)
    with pytest.raises(ValueError):
        infer.smooth_rows(scores, [0.5, 0.5])
    prior = infer.apply_file_prior(scores, weight=0.25)
    np.testing.assert_allclose(prior[:, 0], [1.0, 0.25, 0.25, 0.625])


def test_smoothing_weights_are_scale_free():
    """#26.9: --smooth 1e308,1e308,1e308 passed the check and gave an all-zero submission (their sum
    overflowed to inf). Weights mean only their ratios."""
    infer.Scoring(smooth="1e308,1e308,1e308").check()
    scores = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    np.testing.assert_allclose(infer.smooth_rows(scores, [1e308] * 3), infer.smooth_rows(scores, [1.0] * 3),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="positive sum"):
        infer.Scoring(smooth="0,0,0").check()


def test_predict_takes_mono_or_frames_by_channels_scales_integer_pcm_and_refuses_the_rest(checkpoint):
    """#26.12: a (2, N) or (1, 1, N) array became one row, an empty one a reshape error, int16 was cast
    without scaling."""
    predictor = infer.Predictor([checkpoint])
    rate = 16000
    mono = (0.3 * np.sin(2 * np.pi * 2500 * np.arange(10 * rate) / rate)).astype(np.float32)   # 10 s: 2 rows
    reference = predictor.predict([mono], sample_rate=rate)
    assert len(reference) == 2
    stereo = predictor.predict([np.stack([mono, mono], axis=1)], sample_rate=rate)         # (frames, 2)
    np.testing.assert_allclose(stereo.to_numpy(), reference.to_numpy(), rtol=1e-5, atol=1e-6)
    pcm = np.round(mono * 32767).astype(np.int16)
    np.testing.assert_allclose(predictor.predict([pcm], sample_rate=rate).to_numpy(), reference.to_numpy(),
                               atol=1e-3)
    for bad, message in ((np.stack([mono, mono]), "transpose"), (mono[None, None], "shape"),
                         (np.zeros(0, np.float32), "no samples")):
        with pytest.raises(ValueError, match=message):
            predictor.predict([bad], sample_rate=rate)


def test_each_flag_is_a_settings_field_with_the_fields_default():
    """The flags' defaults are written once, in the settings dataclasses, and Predictor's options are the flags."""
    args = infer.get_args_parser().parse_args(["--ckpts", "a.pt"])
    assert set(vars(args)) == infer.OPTIONS
    settings = [infer.settings_of(kind, vars(args)) for kind in infer.SETTINGS]
    assert settings == [infer.Job(("a.pt",)), infer.Scoring(), engines.EngineSettings()]
    assert infer.settings_of(infer.Scoring, {"hop": 2.5, "out": "x.csv"}) == infer.Scoring(hop=2.5)
    with pytest.raises(ValueError, match="--smooth 0.5,0.5: needs an odd number"):
        infer.Scoring(smooth="0.5,0.5").check()
    with pytest.raises(ValueError, match="--hop 6: seconds between windows"):
        infer.Scoring(hop=6).check()


def test_combine_power_mean_and_missing_species():
    class Fake:
        def __init__(self, index):
            self.column_index = np.array(index)
    a = np.array([[0.2, 0.6]])
    b = np.array([[0.4]])
    members = [Fake([0, 1]), Fake([1])]  # the second model knows only species 1
    mean = infer.combine([a, b], members, n_columns=3, how="mean", power=2.0)
    np.testing.assert_allclose(mean, [[0.2, 0.5, 0.0]])
    power = infer.combine([a, b], members, n_columns=3, how="power", power=2.0)
    np.testing.assert_allclose(power, [[0.2, np.sqrt((0.36 + 0.16) / 2), 0.0]], rtol=1e-6)


def test_raven_and_csv_formats(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "site1.wav", 12.0)
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "raven",
              "--format", "raven", "--min-conf", "0.2")
    table = pd.read_csv(tmp_path / "raven" / "site1.selections.txt", sep="\t")
    assert list(table.columns) == outputs.RAVEN_COLUMNS
    assert len(table) > 0 and (table["Confidence"] >= 0.2).all()
    assert list(table["Selection"]) == list(range(1, len(table) + 1))
    assert set(table["Begin Time (s)"]) <= {0.0, 5.0, 10.0}
    assert ((table["End Time (s)"] - table["Begin Time (s)"]) == 5.0).all()
    assert set(table["Species Code"]) <= set(TINY_SPECIES)

    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "rows.csv", "--format", "csv")
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert list(rows.columns[:3]) == ["file", "start_s", "end_s"]
    assert list(rows["start_s"]) == [0.0, 5.0, 10.0] and set(rows["file"]) == {"site1.wav"}


def test_scoring_with_both_label_formats(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    rng = np.random.default_rng(3)
    species = sorted(TINY_SPECIES)
    # 4 rows, each 5 s of one species' call: a labelled soundscape the model has a chance on.
    audio = np.concatenate([tone_recording(TINY_SPECIES[code], 5.0, 16000, rng) for code in species])
    sf.write(folder / "scape.wav", audio, 16000)
    segments = pd.DataFrame({"file": ["scape.wav"] * 4, "start_s": [0, 5, 10, 15],
                             "end_s": [5, 10, 15, 20], "labels": species})
    segments.to_csv(tmp_path / "labels_5s.csv", index=False)
    by_segment = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv",
                           "--labels", tmp_path / "labels_5s.csv")["scores"]
    matrix = pd.DataFrame(np.eye(4, dtype=int), columns=species)
    matrix.insert(0, "row_id", ["scape_5", "scape_10", "scape_15", "scape_20"])
    matrix.to_csv(tmp_path / "labels_matrix.csv", index=False)
    by_matrix = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv",
                          "--labels", tmp_path / "labels_matrix.csv")["scores"]
    assert by_segment == by_matrix
    assert by_segment["rows"] == 4
    assert set(by_segment) >= {"cmap5", "cmap3", "macro_ap", "lrap"}


def test_bad_files_still_give_a_submission(checkpoint, tmp_path, caplog):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "good.wav", 10.0)
    (folder / "text.ogg").write_text("not audio at all")
    open(folder / "empty.wav", "wb").close()
    with caplog.at_level(logging.WARNING):
        result = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv")
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission["row_id"]) == ["good_5", "good_10"]
    assert len(result["problems"]) == 2
    assert any("text.ogg" in line for line in result["problems"])
    assert "text.ogg" in caplog.text


def test_one_line_errors(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(model_lib.CheckpointError, match="not found"):
        run_infer("--ckpts", tmp_path / "missing.pt", "--soundscapes", empty, "--out", tmp_path / "a.csv")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(model_lib.CheckpointError, match="not a checkpoint written by train.py"):
        run_infer("--ckpts", tmp_path / "foreign.pt", "--soundscapes", empty, "--out", tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="folder without best.pt"):
        run_infer("--ckpts", empty, "--soundscapes", empty, "--out", tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="no ogg/mp3/flac/wav files"):
        run_infer("--ckpts", checkpoint, "--audio-dir", empty, "--detections", tmp_path / "d.csv")


def test_detections_mode_on_training_audio(checkpoint, tiny_data, tmp_path):
    result = run_infer("--ckpts", checkpoint, "--audio-dir", tiny_data / "train_audio",
                       "--detections", tmp_path / "detections.csv", "--top-k", "2")
    table = pd.read_csv(tmp_path / "detections.csv")
    assert list(table.columns) == ["filename", "start_s", "end_s", "primary_label", "primary_score",
                                   "top1_label", "top1_score", "top2_label", "top2_score"]
    metadata = pd.read_csv(tiny_data / "train_metadata.csv")
    assert set(table["filename"]) == set(metadata["filename"])
    primary = dict(zip(metadata["filename"], metadata["primary_label"]))
    assert (table["primary_label"] == table["filename"].map(primary)).all()
    assert (table["top1_score"] >= table["top2_score"]).all()
    assert (table["primary_score"] <= table["top1_score"] + 1e-7).all()
    # Each file gives as many windows as it has 5-s rows.
    durations = {name: sf.info(tiny_data / "train_audio" / name).duration for name in metadata["filename"]}
    counts = table.groupby("filename").size()
    for name, seconds in durations.items():
        assert counts[name] == soundscapes.row_count(int(seconds * 1000), 1000)
    assert len(result["detections"]) == len(table)


def test_ema_weights_are_used_when_asked(trained_run, tmp_path):
    # A checkpoint whose EMA weights are another checkpoint's weights: with --ema it must score
    # exactly as that other checkpoint does, without it as its own weights do.
    own, other = (torch.load(trained_run / f"checkpoint_step0000000{step}.pt", weights_only=True) for step in (3, 2))
    assert not torch.equal(own["model"]["head.weight"], other["model"]["head.weight"])
    torch.save({**own, "model_ema": other["model"], "ema_updates": 3}, tmp_path / "with_ema.pt")
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 7.0)
    common = ["--ckpts", tmp_path / "with_ema.pt", "--soundscapes", folder, "--precision", "fp32"]
    raw = run_infer(*common, "--out", tmp_path / "raw.csv")["submission"]
    ema = run_infer(*common, "--out", tmp_path / "ema.csv", "--ema")["submission"]
    assert not np.allclose(raw.iloc[:, 1:].to_numpy(), ema.iloc[:, 1:].to_numpy())
    reference = run_infer("--ckpts", trained_run / "checkpoint_step00000002.pt", "--soundscapes", folder,
                          "--precision", "fp32", "--out", tmp_path / "reference.csv")["submission"]
    np.testing.assert_allclose(ema.iloc[:, 1:].to_numpy(), reference.iloc[:, 1:].to_numpy(), atol=1e-7)
    with pytest.raises(model_lib.CheckpointError, match="no EMA weights"):
        model_lib.load_model(trained_run / "checkpoint_step00000002.pt", ema=True)


def test_average_weights_is_one_model_with_the_mean_weights(checkpoint, tmp_path):
    first, second = sorted(checkpoint.parent.glob("checkpoint_step*.pt"))[:2]
    members = infer.load_members([first, second], average_weights=True)
    assert len(members) == 1
    a, b = model_lib.load_model(first).state_dict(), model_lib.load_model(second).state_dict()
    averaged = members[0].model.state_dict()
    assert torch.allclose(averaged["head.weight"], (a["head.weight"] + b["head.weight"]) / 2, atol=1e-7)
    assert not torch.equal(a["head.weight"], b["head.weight"])
    other = torch.load(second, weights_only=True)
    other["model_config"]["fmax"] = 7000.0
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="one configuration"):
        infer.load_members([first, tmp_path / "other.pt"], average_weights=True)


def test_nocall_takes_part_in_the_softmax_then_is_dropped(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["model_config"]["labels"] = ["nocall"] + state["model_config"]["labels"][1:]
    torch.save(state, tmp_path / "with_nocall.pt")
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 10.0)
    submission = run_infer("--ckpts", tmp_path / "with_nocall.pt", "--soundscapes", folder,
                           "--out", tmp_path / "sub.csv", "--precision", "fp32")["submission"]
    assert list(submission.columns) == ["row_id", *sorted(TINY_SPECIES)[1:]]
    row_sums = submission.iloc[:, 1:].to_numpy().sum(axis=1)
    assert (row_sums < 1 - 1e-4).all()  # the nocall share of the softmax is not redistributed


def test_inference_never_imports_augment():
    code = "import sys, infer; assert 'augment' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_an_exported_checkpoint_scores_the_same_and_is_not_resumed(checkpoint, tiny_data, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.ogg", 12.0)
    result = subprocess.run([sys.executable, str(ROOT / "model.py"), "export", str(checkpoint),
                             str(tmp_path / "small.pt")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "full.csv")
    run_infer("--ckpts", tmp_path / "small.pt", "--soundscapes", folder, "--out", tmp_path / "small.csv")
    assert (tmp_path / "full.csv").read_bytes() == (tmp_path / "small.csv").read_bytes()
    with pytest.raises(ValueError, match="holds weights only.*--init-from"):
        train.main(quick_args(tiny_data, tmp_path / "run", "--resume", str(tmp_path / "small.pt")))
