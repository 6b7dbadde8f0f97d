"""Tests for extras.py (`python data.py extras`, train.py --extras): choosing detector-built extra
training windows (log experiments 61-91), and how the training set and its audit take them in.

Detections are a hand-made table whose selections are worked out by hand in the docstring
and parameters; the training set's extra windows are compared with the plain training set
and with the windows decoded directly.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import quick_args, quick_settings

import audio
import data
import extras as extras_lib
import soundscapes
import train


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
    extras = extras_lib.select_extras(detections_table(), threshold=0.55, minimum=minimum, maximum=maximum,
                                      divisor=divisor, keep_all_below=3)
    got = counts(extras)
    assert got.get("aaa/XC1.ogg", 0) == expected_xc1
    assert got.get("aaa/XC2.ogg", 0) == expected_xc2
    assert all(got.get(f"aaa/XC{n}.ogg", 0) == expected_small for n in range(3, 13))
    assert got.get("bbb/XC20.ogg") == 7  # bbb has 2 < 3 recordings: keeps all its detections
    assert "bbb/XC21.ogg" not in got    # no detection at all
    assert (extras["score"] >= 0.55).all()


def test_best_windows_first_and_columns():
    extras = extras_lib.select_extras(detections_table(), threshold=0.55, minimum=4, maximum=12, divisor=1.5,
                                      keep_all_below=3)
    assert list(extras.columns) == ["filename", "start_s", "score", "labels"]
    xc1 = extras[extras["filename"] == "aaa/XC1.ogg"]
    assert list(xc1["start_s"]) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]  # the six best scores
    assert set(extras["labels"]) == {"aaa", "bbb"}


def test_keep_all_rule_applies_by_recordings_per_species():
    # With keep_all_below 13 the common species (12 recordings) keeps all its detections too.
    extras = extras_lib.select_extras(detections_table(), threshold=0.55, minimum=4, maximum=12, divisor=1.5,
                                      keep_all_below=13)
    assert counts(extras)["aaa/XC1.ogg"] == 9


def test_score_any_counts_windows_where_another_species_scores_high():
    table = detections_table()
    table["top1_score"] = table["primary_score"]
    table.loc[(table["filename"] == "bbb/XC21.ogg"), "top1_score"] = 0.9   # another species heard there
    primary = extras_lib.select_extras(table, 0.55, 0, 20, 1.0, keep_all_below=0)
    any_species = extras_lib.select_extras(table, 0.55, 0, 20, 1.0, keep_all_below=0, score="any")
    assert "bbb/XC21.ogg" not in counts(primary) and counts(any_species)["bbb/XC21.ogg"] == 2
    assert (any_species["score"] >= 0.55).all()
    with pytest.raises(ValueError, match="top1_score"):
        extras_lib.select_extras(detections_table(), 0.55, 0, 20, 1.0, keep_all_below=0, score="any")


def test_random_choice_keeps_the_same_counts_and_is_seeded():
    best = extras_lib.select_extras(detections_table(), 0.55, 2, 8, 2.0, keep_all_below=3)
    random_a = extras_lib.select_extras(detections_table(), 0.55, 2, 8, 2.0, keep_all_below=3, choose="random", seed=1)
    random_b = extras_lib.select_extras(detections_table(), 0.55, 2, 8, 2.0, keep_all_below=3, choose="random", seed=1)
    random_c = extras_lib.select_extras(detections_table(), 0.55, 2, 8, 2.0, keep_all_below=3, choose="random", seed=2)
    assert counts(random_a) == counts(best)                    # XC1: floor(9/2)=4 of its 9 detections, etc.
    pd.testing.assert_frame_equal(random_a, random_b)
    def xc1(extras):
        return list(extras[extras["filename"] == "aaa/XC1.ogg"]["start_s"])
    assert xc1(best) == [0.0, 5.0, 10.0, 15.0]                 # the four best of XC1's nine detections
    assert xc1(random_a) != xc1(best) or xc1(random_c) != xc1(best)
    assert set(xc1(random_a)) <= {5.0 * i for i in range(9)}  # only detections (scores >= 0.55)


def test_skip_start_and_end_leave_those_seconds_out():
    # XC1 has 10 windows, 0-50 s; skipping 15 s at the start and 10 s at the end leaves 15-40 s:
    # 5 windows, of which those >= 0.55 (starts 15..35 s: scores 0.80..0.60) are detections
    extras = extras_lib.select_extras(detections_table(), 0.55, 0, 20, 1.0, keep_all_below=0, skip_start=15,
                                      skip_end=10)
    assert sorted(extras[extras["filename"] == "aaa/XC1.ogg"]["start_s"]) == [15.0, 20.0, 25.0, 30.0, 35.0]


def test_totals_count_recordings_extras_and_species_kept_whole():
    table = detections_table()
    extras = extras_lib.select_extras(table, 0.55, 4, 12, 1.5, keep_all_below=3)
    totals = extras_lib.extras_totals(extras, table, keep_all_below=3).set_index("species")
    # by hand: aaa 12 recordings, extras 6 (XC1) + 3 (XC2) + 10 x 1 = 19; bbb 2 recordings (kept whole), 7 extras
    assert totals.loc["aaa", ["recordings", "extras", "per_epoch"]].tolist() == [12, 19, 31]
    assert totals.loc["bbb", ["recordings", "extras", "per_epoch"]].tolist() == [2, 7, 9]
    assert totals["kept_whole"].to_dict() == {"aaa": False, "bbb": True}


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


# ----------------------------------------------------------------------------- train.py --extras

def test_train_extras_are_fixed_windows_of_training_recordings_only(tiny_data, tmp_path, caplog):
    plain = quick_settings(tiny_data, tmp_path / "plain").data
    plain_labels, plain_train, plain_val = data.build_datasets(plain, tmp_path)
    table = data.read_metadata(tiny_data)
    names = dict(zip(table["path"], table["filename"]))
    train_names = [names[path] for path in plain_train.paths]
    val_names = [names[path] for path in plain_val.paths]
    rows = [(train_names[0], 0.0), (train_names[0], 5.0), (train_names[1], 5.0),   # 3 of training recordings
            (val_names[0], 0.0),                                                   # dropped: validation
            ("zzz/XC999.ogg", 0.0)]                                                # dropped: unknown
    pd.DataFrame({"filename": [r[0] for r in rows], "start_s": [r[1] for r in rows], "primary_score": 0.9,
                  "labels": "x"}).to_csv(tmp_path / "extras.csv", index=False)

    settings = quick_settings(tiny_data, tmp_path / "run", "--extras", str(tmp_path / "extras.csv")).data
    with caplog.at_level("INFO", logger="birdclef"):
        labels, train_set, val_set = data.build_datasets(settings, tmp_path)
    assert "3 windows of 2 training recordings used; 1 dropped (their recording is in the validation split), " \
           "1 dropped (no such usable recording)" in caplog.text
    n = len(plain_train)
    assert len(train_set) == n + 3 and train_set.paths[:n] == plain_train.paths   # recordings first, unchanged
    assert train_set.extras.tolist() == [False] * n + [True] * 3
    assert np.isnan(train_set.starts[:n]).all() and train_set.starts[n:].tolist() == [0.0, 5.0, 5.0]
    assert train_set.paths[n:] == [plain_train.paths[0], plain_train.paths[0], plain_train.paths[1]]
    np.testing.assert_array_equal(train_set.targets[n:], plain_train.targets[[0, 0, 1]])
    assert val_set.paths == plain_val.paths                                       # validation untouched
    # the extra row decodes exactly its window, whatever the epoch and position
    item = train_set[(n + 1, 3, 17)]
    window = train_set.crop.window_seconds
    start = soundscapes.fixed_window_start(row_start=5.0, duration=train_set.durations[n + 1], window=window)
    expected = audio.read_window(plain_train.paths[0], start_seconds=start, seconds=window,
                                 sample_rate=train_set.crop.sample_rate)
    np.testing.assert_array_equal(item["waveform"].numpy(), expected)


def test_extras_chunk_crops_randomly_inside_a_chunk_centred_on_the_window(tiny_data, tmp_path):
    """--extras-chunk 6 (window 2 s): training crops start anywhere in the 6-s chunk centred on the 5-s row
    that still holds the window; other rows and evaluation keep their fixed start."""
    _, plain_train, _ = data.build_datasets(quick_settings(tiny_data, tmp_path / "plain").data, tmp_path)
    table = data.read_metadata(tiny_data)
    name = dict(zip(table["path"], table["filename"]))[plain_train.paths[0]]
    pd.DataFrame({"filename": [name], "start_s": [0.0]}).to_csv(tmp_path / "extras.csv", index=False)
    settings = quick_settings(tiny_data, tmp_path / "run", "--extras", str(tmp_path / "extras.csv"),
                              "--extras-chunk", "6").data
    _, train_set, _ = data.build_datasets(settings, tmp_path)
    row, duration = len(train_set) - 1, train_set.durations[-1]
    assert train_set.chunks.tolist() == [0.0] * row + [6.0]
    chunk_start = min(max(0.0 + 2.5 - 3.0, 0.0), max(duration - 6.0, 0.0))      # centred on 0-5 s, inside
    starts = [train_set.crop_start((row, epoch, position))[1] for epoch in range(5) for position in range(20)]
    assert min(starts) >= chunk_start and max(starts) <= chunk_start + min(6.0, duration) - 2.0
    assert len(set(starts)) > 50                                                # anywhere in it, not fixed
    assert train_set.crop_start(row)[1] == soundscapes.fixed_window_start(0.0, duration, 2.0)   # evaluation
    # a recording row crops by policy as before
    assert train_set.crop_start((0, 1, 2)) == plain_train.crop_start((0, 1, 2))


def test_sampling_audit_counts_extras_separately(tiny_data, tmp_path):
    _, plain_train, _ = data.build_datasets(quick_settings(tiny_data, tmp_path / "plain").data, tmp_path)
    table = data.read_metadata(tiny_data)
    names = dict(zip(table["path"], table["filename"]))
    chosen = [names[path] for path in plain_train.paths[:4]]
    pd.DataFrame({"filename": chosen * 2, "start_s": [0.0] * 4 + [5.0] * 4}).to_csv(tmp_path / "extras.csv",
                                                                                   index=False)
    state = train.main(quick_args(tiny_data, tmp_path / "run", "--extras", str(tmp_path / "extras.csv"),
                                  "--audit-sampling"))
    audit = pd.read_csv(tmp_path / "run" / "sampling_audit.csv").set_index("species")
    expected = pd.Series(plain_train.primary_labels[:4] * 2).value_counts()
    for species in audit.index:
        assert audit.loc[species, "extra_recordings"] == expected.get(species, 0)
        assert audit.loc[species, "recordings"] == plain_train.primary_labels.count(species) + expected.get(species, 0)
    assert state["audit"]["extra_share"] == pytest.approx(8 / (len(plain_train) + 8))
