"""Tests for evaluation.py: training's soundscape validation (--val-soundscapes) scores a checkpoint
exactly as infer.py --labels scores it, and its numbers are logged and can be monitored.

The reference is infer.py run on a checkpoint of the same training run. (Clip-level
validation metrics: test_metrics.py; the evaluation loop under torchrun: test_distributed.py.)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import TINY_SPECIES, quick_args, read_rows, run_infer, tone_recording

import metrics
import options
import train


def test_soundscape_validation_is_logged_and_agrees_with_infer(tiny_data, tmp_path):
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
                          "--keep-last", "5", "--test-soundscapes", str(tmp_path / "labels.csv"),
                          "--test-soundscape-audio", str(folder)))
    rows = read_rows(out / "metrics.csv")
    assert {"soundscape_cmap5", "soundscape_macro_ap", "test_cmap5", "test_lrap"} <= set(rows[-1])
    # the test table is scored like the validation one (here the same table), for the record only
    assert all(row["test_cmap5"] == row["soundscape_cmap5"] for row in rows)
    with pytest.raises(SystemExit):
        options.get_args_parser().parse_args(["--monitor", "test_cmap5"])
    # the chance level of each scored set: what random scores (seeded by --seed) get on it
    targets = np.array([[code in row.split() for code in species] for row in labels["labels"]], dtype=int)
    chance = metrics.padded_cmap(targets, np.random.default_rng(42).random(targets.shape))
    assert float(rows[-1]["soundscape_chance_cmap5"]) == float(rows[-1]["test_chance_cmap5"]) == pytest.approx(chance)
    assert 0 < float(rows[-1]["chance_cmap5"]) < 1 and len({row["chance_cmap5"] for row in rows}) == 1
    # The same checkpoint scored by infer.py on the same labels gives the same number.
    scored = run_infer("--ckpts", out / "checkpoint_step00000003.pt", "--soundscapes", folder,
                       "--labels", tmp_path / "labels.csv", "--out", tmp_path / "sub.csv", "--precision", "fp32")
    assert float(rows[-1]["soundscape_cmap5"]) == pytest.approx(scored["scores"]["cmap5"], abs=1e-6)
    assert float(rows[-1]["soundscape_macro_ap"]) == pytest.approx(scored["scores"]["macro_ap"], abs=1e-6)
    with pytest.raises(ValueError, match="needs --val-soundscapes"):
        train.main(quick_args(tiny_data, out, "--monitor", "soundscape_cmap5"))
