"""Tests for data.py: metadata, the vocabulary, targets, the split, and build_datasets.

Metadata tables are written here with the BirdCLEF 2023 columns; references are
hand-computed values and plain re-derivations. (The other BirdCLEF years' layouts
and several folders at once: test_years.py; --extras: test_extras.py; --nocall:
test_nocall.py.)
"""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_COUNTS, TINY_SPECIES, quick_settings, write_tiny_dataset

import cli
import data

BIRDCLEF_2023_COLUMNS = ["primary_label", "secondary_labels", "type", "latitude", "longitude",
                         "scientific_name", "common_name", "author", "license", "rating", "url",
                         "filename"]


# ----------------------------------------------------------------------------- helpers

def write_metadata(root: Path, rows: list[dict], columns=None) -> Path:
    """A train_metadata.csv with the BirdCLEF 2023 columns (others filled with dummies)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_audio").mkdir(exist_ok=True)
    full = []
    for row in rows:
        record = {column: "x" for column in BIRDCLEF_2023_COLUMNS}
        record.update(latitude=0.0, longitude=0.0, rating=4.0)
        record.update(row)
        full.append(record)
    table = pd.DataFrame(full, columns=columns or BIRDCLEF_2023_COLUMNS)
    table.to_csv(root / "train_metadata.csv", index=False)
    return root


# ----------------------------------------------------------------------------- read_metadata

def test_read_metadata_keeps_birdclef_2023_columns_and_adds_secondary_and_path(tiny_data):
    table = data.read_metadata(tiny_data)
    assert list(table.columns) == BIRDCLEF_2023_COLUMNS + ["secondary", "path", "source", "recording_id"]
    assert len(table) == sum(TINY_COUNTS)
    assert Counter(table["primary_label"]) == dict(zip(TINY_SPECIES, TINY_COUNTS))
    assert all(isinstance(code, str) for code in table["primary_label"])
    assert all(secondary == [] for secondary in table["secondary"])


def test_read_metadata_path_is_absolute_and_inside_train_audio(tiny_data):
    table = data.read_metadata(tiny_data)
    root = (tiny_data / "train_audio").resolve()
    for filename, path in zip(table["filename"], table["path"]):
        path = Path(path)
        assert path.is_absolute()
        assert path.is_relative_to(root)
        assert path == (tiny_data / "train_audio" / filename).resolve()
        assert path.is_file()


def test_read_metadata_parses_secondary_labels(tmp_path):
    write_metadata(tmp_path, [
        {"primary_label": "aaa1", "secondary_labels": "[]", "filename": "aaa1/XC1.ogg"},
        {"primary_label": "aaa1", "secondary_labels": "['bbb1', 'ccc1']", "filename": "aaa1/XC2.ogg"},
        {"primary_label": "bbb1", "secondary_labels": "['aaa1']", "filename": "bbb1/XC3.ogg"},
        {"primary_label": "bbb1", "secondary_labels": "", "filename": "bbb1/XC4.ogg"},
    ])
    table = data.read_metadata(tmp_path)
    assert list(table["secondary"]) == [[], ["bbb1", "ccc1"], ["aaa1"], []]
    # the raw column is left as it was in the file
    assert list(table["secondary_labels"]) == ["[]", "['bbb1', 'ccc1']", "['aaa1']", ""]


@pytest.mark.parametrize("bad", ["['bbb1', 'ccc1'", "bbb1, ccc1", "[1, 2]", "'bbb1'"])
def test_read_metadata_malformed_secondary_labels_names_the_csv_row(tmp_path, bad):
    write_metadata(tmp_path, [
        {"primary_label": "aaa1", "secondary_labels": "[]", "filename": "aaa1/XC1.ogg"},
        {"primary_label": "aaa1", "secondary_labels": "['bbb1']", "filename": "aaa1/XC2.ogg"},
        {"primary_label": "bbb1", "secondary_labels": bad, "filename": "bbb1/XC3.ogg"},
    ])
    # the third data row is line 4 of the file (line 1 is the header)
    with pytest.raises(ValueError) as raised:
        data.read_metadata(tmp_path)
    message = str(raised.value)
    assert re.search(r"\brow 4\b", message), message
    assert "train_metadata.csv" in message
    assert "secondary_labels" in message


@pytest.mark.parametrize("dropped", ["primary_label", "secondary_labels", "filename"])
def test_read_metadata_missing_column_is_named(tmp_path, dropped):
    columns = [column for column in BIRDCLEF_2023_COLUMNS if column != dropped]
    write_metadata(tmp_path, [{"primary_label": "aaa1", "secondary_labels": "[]",
                               "filename": "aaa1/XC1.ogg"}], columns=columns)
    with pytest.raises(ValueError, match=re.escape(repr(dropped))):
        data.read_metadata(tmp_path)


def test_read_metadata_empty_table_raises(tmp_path):
    write_metadata(tmp_path, [])
    assert (tmp_path / "train_metadata.csv").read_text().strip() == ",".join(BIRDCLEF_2023_COLUMNS)
    with pytest.raises(ValueError, match="no rows"):
        data.read_metadata(tmp_path)


def test_read_metadata_without_csv_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_metadata.csv"):
        data.read_metadata(tmp_path)


@pytest.mark.parametrize("filename", ["../outside.ogg", "aaa1/../../outside.ogg",
                                      "../../../../etc/passwd", "/etc/passwd"])
def test_read_metadata_rejects_filenames_escaping_train_audio(tmp_path, filename):
    write_metadata(tmp_path, [
        {"primary_label": "aaa1", "secondary_labels": "[]", "filename": "aaa1/XC1.ogg"},
        {"primary_label": "aaa1", "secondary_labels": "[]", "filename": filename},
    ])
    with pytest.raises(ValueError, match=r"row 3.*outside"):
        data.read_metadata(tmp_path)


def test_read_metadata_accepts_dotdot_that_stays_inside(tmp_path):
    write_metadata(tmp_path, [{"primary_label": "aaa1", "secondary_labels": "[]",
                               "filename": "bbb1/../aaa1/XC1.ogg"}])
    table = data.read_metadata(tmp_path)
    assert table["path"][0] == str((tmp_path / "train_audio" / "aaa1" / "XC1.ogg").resolve())


# ----------------------------------------------------------------------------- read_vocabulary

def test_read_vocabulary_follows_sample_submission_column_order(tmp_path):
    order = ["zzz1", "aaa1", "mmm1", "bbb1"]  # deliberately not sorted
    pd.DataFrame(columns=["row_id", *order]).to_csv(tmp_path / "sample_submission.csv", index=False)
    table = pd.DataFrame({"primary_label": ["aaa1", "bbb1", "mmm1", "aaa1"]})
    assert data.read_vocabulary(tmp_path, table) == order


def test_read_vocabulary_without_sample_submission_is_sorted_primary_labels(tmp_path):
    table = pd.DataFrame({"primary_label": ["mmm1", "aaa1", "zzz1", "aaa1", "bbb1"]})
    assert data.read_vocabulary(tmp_path, table) == ["aaa1", "bbb1", "mmm1", "zzz1"]


def test_read_vocabulary_on_tiny_data(tiny_data):
    table = data.read_metadata(tiny_data)
    assert data.read_vocabulary(tiny_data, table) == sorted(TINY_SPECIES)


# ----------------------------------------------------------------------------- make_targets

LABELS = ["aaa1", "bbb1", "ccc1", "ddd1"]


def targets_table():
    return pd.DataFrame({
        "primary_label": ["aaa1", "bbb1", "ccc1", "ddd1"],
        "secondary": [["bbb1"], ["zzz9", "ccc1"], ["ccc1", "aaa1"], []],
    })


def test_make_targets_primary_one_secondary_weight_unknown_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        targets = data.make_targets(targets_table(), LABELS, secondary_weight=0.3)
    expected = np.array([
        [1.0, 0.3, 0.0, 0.0],
        [0.0, 1.0, 0.3, 0.0],   # zzz9 is not in the vocabulary: ignored
        [0.3, 0.0, 1.0, 0.0],   # ccc1 is primary and secondary: stays 1.0
        [0.0, 0.0, 0.0, 1.0],
    ], dtype=np.float32)
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets, expected)
    warnings = [record for record in caplog.records
                if record.levelno == logging.WARNING and "zzz9" in record.getMessage()]
    assert warnings, f"no warning naming the unknown secondary label: {caplog.text!r}"


def test_make_targets_weight_zero_leaves_secondaries_zero():
    targets = data.make_targets(targets_table(), LABELS, secondary_weight=0.0)
    np.testing.assert_array_equal(targets, np.eye(4, dtype=np.float32))


def test_make_targets_primary_never_overwritten_by_secondary_weight():
    # the primary appears in its own secondary list, before and after other codes
    table = pd.DataFrame({"primary_label": ["bbb1", "bbb1"],
                          "secondary": [["bbb1"], ["aaa1", "bbb1", "ddd1"]]})
    for weight in (0.0, 0.5, 0.99):
        targets = data.make_targets(table, LABELS, secondary_weight=weight)
        np.testing.assert_array_equal(targets[:, 1], [1.0, 1.0])
        np.testing.assert_array_equal(targets[1], np.float32([weight, 1.0, 0.0, weight]))


def test_make_targets_unknown_primary_raises():
    table = pd.DataFrame({"primary_label": ["aaa1", "qqq1"], "secondary": [[], []]})
    with pytest.raises(ValueError, match="qqq1"):
        data.make_targets(table, LABELS, secondary_weight=0.0)


# ----------------------------------------------------------------------------- split_recordings

SPLIT_COUNTS = {"s6": 6, "s5": 5, "s4": 4, "s3": 3, "s2": 2, "s1": 1, "t1": 1}


def split_labels():
    labels = [species for species, count in SPLIT_COUNTS.items() for _ in range(count)]
    return np.random.default_rng(123).permutation(labels)  # interleaved, like a real table


def test_split_is_deterministic_under_seed_and_changes_with_seed():
    labels = split_labels()
    train_a, val_a = data.split_recordings(labels, val_fraction=0.25, folds=0, fold=0, seed=5)
    train_b, val_b = data.split_recordings(labels, val_fraction=0.25, folds=0, fold=0, seed=5)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(val_a, val_b)
    _, val_c = data.split_recordings(labels, val_fraction=0.25, folds=0, fold=0, seed=6)
    assert not np.array_equal(val_a, val_c)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9, 0.01])
def test_split_is_stratified_with_clipped_counts(fraction):
    labels = split_labels()
    train, val = data.split_recordings(labels, val_fraction=fraction, folds=0, fold=0, seed=0)
    n = len(labels)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    val_counts = Counter(labels[val])
    train_counts = Counter(labels[train])
    for species, count in SPLIT_COUNTS.items():
        if count < 2:
            assert val_counts[species] == 0, f"{species} (1 recording) must stay in train"
            assert train_counts[species] == 1
        else:
            expected = min(max(round(fraction * count), 1), count - 1)
            assert val_counts[species] == expected, (species, fraction)
            assert train_counts[species] == count - expected
            assert val_counts[species] >= 1 and train_counts[species] >= 1


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_split_folds_partition_recordings(folds):
    labels = split_labels()
    n = len(labels)
    val_sets = []
    for fold in range(folds):
        train, val = data.split_recordings(labels, val_fraction=0.25, folds=folds, fold=fold, seed=11)
        assert len(np.intersect1d(train, val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
        val_sets.append(val)
    every_val = np.concatenate(val_sets)
    # the K validation sets are disjoint and cover exactly the species with >= 2 recordings
    assert len(every_val) == len(set(every_val.tolist()))
    eligible = np.flatnonzero([SPLIT_COUNTS[label] >= 2 for label in labels])
    np.testing.assert_array_equal(np.sort(every_val), eligible)
    for species, count in SPLIT_COUNTS.items():
        per_fold = [int(np.sum(labels[val] == species)) for val in val_sets]
        if count < 2:
            assert per_fold == [0] * folds
            continue
        # round-robin dealing: each fold holds floor(n/K) or ceil(n/K) of the species;
        # n mod K folds get the extra one. With n < K, exactly n folds hold one
        # recording and K - n folds hold none of that species.
        low, extra = divmod(count, folds)
        assert sorted(per_fold) == [low] * (folds - extra) + [low + 1] * extra, (species, per_fold)
        assert max(per_fold) < count, "a species with >= 2 recordings must keep one in train"


def test_split_folds_spread_the_leftover_recordings():
    # 30 species x 4 recordings, 3 folds: each species has one leftover recording.
    # Dealt from a random start, the leftovers spread over the folds (about 10
    # each); always starting at fold 0 would give fold sizes 60 / 30 / 30.
    labels = np.repeat([f"sp{i:02d}" for i in range(30)], 4)
    sizes = [len(data.split_recordings(labels, val_fraction=0.25, folds=3, fold=fold, seed=0)[1])
             for fold in range(3)]
    assert sum(sizes) == 120
    assert max(sizes) - min(sizes) <= 12, sizes


def test_split_folds_deterministic_under_seed():
    labels = split_labels()
    a = data.split_recordings(labels, val_fraction=0.25, folds=3, fold=1, seed=3)
    b = data.split_recordings(labels, val_fraction=0.25, folds=3, fold=1, seed=3)
    np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- build_datasets

def test_split_usable_recordings_follows_the_split_settings():
    table = pd.DataFrame({"primary_label": split_labels()})
    split = data.SplitSettings(seed=3, val_fraction=0.25, folds=3, fold=1)
    train_index, val_index = data.split_usable_recordings(table, split)
    expected = data.split_recordings(table["primary_label"], 0.25, 3, 1, 3)
    np.testing.assert_array_equal(train_index, expected[0])
    np.testing.assert_array_equal(val_index, expected[1])



def test_unreadable_and_missing_files_are_reported_and_skipped(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "data")
    table = pd.read_csv(data_dir / "train_metadata.csv")
    corrupt = data_dir / "train_audio" / table.loc[0, "filename"]
    corrupt.write_text("this is not audio")
    missing = data_dir / "train_audio" / table.loc[1, "filename"]
    missing.unlink()
    out = tmp_path / "run"
    out.mkdir()
    labels, train_set, val_set = data.build_datasets(quick_settings(data_dir, out, "--epochs", "1").data, out)
    bad = pd.read_csv(out / "bad_files.csv")
    assert sorted(bad["path"]) == sorted([str(corrupt.resolve()), str(missing.resolve())])
    assert bad["reason"].str.len().min() > 10
    # the 16 usable recordings of 18, and only they, are split. Left per species: 4, 5, 4, 3; each
    # holds out round(0.2 n) clipped to >= 1 -> 4 validation, 12 training recordings = 3 steps of 4
    usable = sorted(str((data_dir / "train_audio" / name).resolve()) for name in table["filename"][2:])
    assert sorted(train_set.paths + val_set.paths) == usable
    assert (len(train_set), len(val_set)) == (12, 4)
    assert labels == sorted(TINY_SPECIES)


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("command, flag", [("demo", "--median-seconds"), ("extras", "--keep-all-below"),
                                           ("cache", "--max-seconds"), ("soundscapes", "--call-distance-prob")])
def test_each_subcommand_answers_help_with_the_flags_of_the_module_that_defines_it(command, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        data.main([command, "--help"])
    assert stop.value.code == 0 and flag in capsys.readouterr().out


def test_python_data_py_soundscapes_help_runs_as_a_script():
    result = subprocess.run([sys.executable, "data.py", "soundscapes", "--help"], cwd=Path(data.__file__).parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--bed-dir" in result.stdout and "deprecated spelling of --bed-dir" in result.stdout


def test_the_demo_folder_is_defined_once():
    assert data.DEMO_DIR is cli.DEMO_DIR
