"""data.py extras: choosing detector-built extra training windows (log experiments 61-91)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import data


def detections_table():
    """Hand-made: common species 'aaa' has 12 recordings, rare 'bbb' has 2.

    aaa/XC1: 10 windows at scores 0.95, 0.90, ..., 0.50 -> 9 at >= 0.55 with threshold 0.55
    aaa/XC2: 3 windows above threshold; aaa/XC3..XC12: 1 window each above, 1 below
    bbb/XC20: 7 above; bbb/XC21: 0 above
    """
    rows = []
    def add(filename, label, scores):
        rows.extend({"filename": filename, "start_s": 5.0 * i, "end_s": 5.0 * (i + 1), "primary_label": label,
                     "primary_score": score} for i, score in enumerate(scores))
    add("aaa/XC1.ogg", "aaa", [round(0.95 - 0.05 * i, 2) for i in range(10)])
    add("aaa/XC2.ogg", "aaa", [0.9, 0.6, 0.7, 0.1])
    for n in range(3, 13):
        add(f"aaa/XC{n}.ogg", "aaa", [0.8, 0.2])
    add("bbb/XC20.ogg", "bbb", [0.6] * 7)
    add("bbb/XC21.ogg", "bbb", [0.1, 0.2])
    return pd.DataFrame(rows)


def counts(extras):
    return extras.groupby("filename").size().to_dict()


@pytest.mark.parametrize("minimum, maximum, divisor, expected_xc1, expected_xc2, expected_small", [
    (4, 12, 1.5, 6, 3, 1),    # XC1: floor(9/1.5)=6; XC2: clip(floor(3/1.5)=2 -> 4) but only 3; 1 each
    (2, 8, 1.0, 8, 3, 1),     # XC1: 9 capped at 8
    (0, 20, 2.0, 4, 1, 0),    # XC1: floor(9/2)=4; XC2: floor(3/2)=1; one detection -> floor(0.5)=0
    (5, 20, 1.2, 7, 3, 1),    # XC1: floor(9/1.2)=7
])
def test_counts_per_recording(minimum, maximum, divisor, expected_xc1, expected_xc2, expected_small):
    extras = data.select_extras(detections_table(), 0.55, minimum, maximum, divisor, keep_all_below=3)
    got = counts(extras)
    assert got.get("aaa/XC1.ogg", 0) == expected_xc1
    assert got.get("aaa/XC2.ogg", 0) == expected_xc2
    assert all(got.get(f"aaa/XC{n}.ogg", 0) == expected_small for n in range(3, 13))
    assert got.get("bbb/XC20.ogg") == 7  # bbb has 2 < 3 recordings: keeps all its detections
    assert "bbb/XC21.ogg" not in got    # no detection at all
    assert (extras["primary_score"] >= 0.55).all()


def test_best_windows_first_and_columns():
    extras = data.select_extras(detections_table(), 0.55, 4, 12, 1.5, keep_all_below=3)
    assert list(extras.columns) == ["filename", "start_s", "primary_score", "labels"]
    xc1 = extras[extras["filename"] == "aaa/XC1.ogg"]
    assert list(xc1["start_s"]) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]  # the six best scores
    assert set(extras["labels"]) == {"aaa", "bbb"}


def test_keep_all_rule_applies_by_recordings_per_species():
    # With keep_all_below 13 the common species (12 recordings) keeps all its detections too.
    extras = data.select_extras(detections_table(), 0.55, 4, 12, 1.5, keep_all_below=13)
    assert counts(extras)["aaa/XC1.ogg"] == 9


def test_cli_writes_csv_and_audio_chunks(tmp_path, capsys):
    audio_dir = tmp_path / "train_audio"
    (audio_dir / "aaa").mkdir(parents=True)
    rate = 16000
    sf.write(audio_dir / "aaa" / "XC1.ogg", np.random.default_rng(0).uniform(-0.1, 0.1, rate * 50).astype("float32"),
             rate, format="OGG", subtype="VORBIS")
    table = detections_table()
    table = table[table["filename"] == "aaa/XC1.ogg"]
    table.to_csv(tmp_path / "detections.csv", index=False)
    data.main(["extras", "--detections", str(tmp_path / "detections.csv"), "--threshold", "0.55", "--min", "1",
               "--max", "3", "--divisor", "1", "--keep-all-below", "0", "--out", str(tmp_path / "extras.csv"),
               "--write-audio", str(tmp_path / "chunks"), "--audio-dir", str(audio_dir), "--chunk", "8"])
    assert "3 extras from 1 recordings of 1 species" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "chunks" / "aaa").iterdir())
    assert written == ["XC1_0.ogg", "XC1_10.ogg", "XC1_5.ogg"]
    assert sf.info(tmp_path / "chunks" / "aaa" / "XC1_10.ogg").duration == pytest.approx(8.0, abs=0.01)
