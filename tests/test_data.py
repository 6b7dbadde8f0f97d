"""Tests for data.py against hand-computed values and plain re-derivations.

Every audio file is written here with known content (FLOAT wav, so samples round
trip exactly); nothing is downloaded.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio

import data
from conftest import TINY_COUNTS, TINY_SPECIES
import audio
import sampling
import loader

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


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    sf.write(path, samples, rate, subtype="FLOAT")
    return path


def ramp(n: int) -> np.ndarray:
    """Distinct, exactly representable float32 values: sample k is k / 2**20."""
    return (np.arange(n, dtype=np.float64) / 2 ** 20).astype(np.float32)


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
        targets = data.make_targets(targets_table(), LABELS, 0.3)
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
    targets = data.make_targets(targets_table(), LABELS, 0.0)
    np.testing.assert_array_equal(targets, np.eye(4, dtype=np.float32))


def test_make_targets_primary_never_overwritten_by_secondary_weight():
    # the primary appears in its own secondary list, before and after other codes
    table = pd.DataFrame({"primary_label": ["bbb1", "bbb1"],
                          "secondary": [["bbb1"], ["aaa1", "bbb1", "ddd1"]]})
    for weight in (0.0, 0.5, 0.99):
        targets = data.make_targets(table, LABELS, weight)
        np.testing.assert_array_equal(targets[:, 1], [1.0, 1.0])
        np.testing.assert_array_equal(targets[1], np.float32([weight, 1.0, 0.0, weight]))


def test_make_targets_unknown_primary_raises():
    table = pd.DataFrame({"primary_label": ["aaa1", "qqq1"], "secondary": [[], []]})
    with pytest.raises(ValueError, match="qqq1"):
        data.make_targets(table, LABELS, 0.0)


# ----------------------------------------------------------------------------- split_recordings

SPLIT_COUNTS = {"s6": 6, "s5": 5, "s4": 4, "s3": 3, "s2": 2, "s1": 1, "t1": 1}


def split_labels():
    labels = [species for species, count in SPLIT_COUNTS.items() for _ in range(count)]
    return np.random.default_rng(123).permutation(labels)  # interleaved, like a real table


def test_split_is_deterministic_under_seed_and_changes_with_seed():
    labels = split_labels()
    train_a, val_a = data.split_recordings(labels, 0.25, 0, 0, seed=5)
    train_b, val_b = data.split_recordings(labels, 0.25, 0, 0, seed=5)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(val_a, val_b)
    _, val_c = data.split_recordings(labels, 0.25, 0, 0, seed=6)
    assert not np.array_equal(val_a, val_c)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9, 0.01])
def test_split_is_stratified_with_clipped_counts(fraction):
    labels = split_labels()
    train, val = data.split_recordings(labels, fraction, 0, 0, seed=0)
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
        train, val = data.split_recordings(labels, 0.25, folds, fold, seed=11)
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
    sizes = [len(data.split_recordings(labels, 0.25, 3, fold, seed=0)[1]) for fold in range(3)]
    assert sum(sizes) == 120
    assert max(sizes) - min(sizes) <= 12, sizes


def test_split_folds_deterministic_under_seed():
    labels = split_labels()
    a = data.split_recordings(labels, 0.25, 3, 1, seed=3)
    b = data.split_recordings(labels, 0.25, 3, 1, seed=3)
    np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- read_window

def test_read_window_returns_exact_samples(tmp_path):
    rate = 32000
    samples = ramp(5 * rate)
    path = write_wav(tmp_path / "ramp.wav", samples, rate)
    window = audio.read_window(path, 1.5, 2.0, rate)
    assert window.dtype == np.float32
    assert window.shape == (2 * rate,)
    np.testing.assert_array_equal(window, samples[48000:48000 + 64000])


def test_read_window_past_the_end_zero_pads_to_exact_length(tmp_path):
    rate = 32000
    samples = ramp(3 * rate)
    path = write_wav(tmp_path / "ramp.wav", samples, rate)
    window = audio.read_window(path, 2.5, 2.0, rate)
    assert window.shape == (64000,)
    np.testing.assert_array_equal(window[:16000], samples[80000:])
    np.testing.assert_array_equal(window[16000:], np.zeros(48000, np.float32))
    # starting past the end: all zeros, still the exact length
    beyond = audio.read_window(path, 10.0, 2.0, rate)
    np.testing.assert_array_equal(beyond, np.zeros(64000, np.float32))


def test_read_window_averages_stereo_to_mono(tmp_path):
    rate = 32000
    stereo = np.stack([np.full(rate, 0.25, np.float32), np.full(rate, 0.75, np.float32)], axis=1)
    path = write_wav(tmp_path / "stereo.wav", stereo, rate)
    window = audio.read_window(path, 0.0, 0.5, rate)
    assert window.ndim == 1 and window.shape == (16000,)
    np.testing.assert_array_equal(window, np.full(16000, 0.5, np.float32))


def test_read_window_resamples_16k_to_32k_keeping_pitch(tmp_path):
    source = 16000
    t = np.arange(3 * source) / source
    path = write_wav(tmp_path / "sine.wav", np.sin(2 * np.pi * 440 * t).astype(np.float32), source)
    window = audio.read_window(path, 0.5, 2.0, 32000)
    assert window.shape == (64000,)
    spectrum = np.abs(np.fft.rfft(window))
    peak_hz = np.argmax(spectrum) * 32000 / len(window)   # 0.5 Hz bins
    assert abs(peak_hz - 440.0) <= 0.5, peak_hz
    # away from the filter's edge transients the samples are the 32 kHz sine itself
    reference = np.sin(2 * np.pi * 440 * (0.5 + np.arange(64000) / 32000))
    np.testing.assert_allclose(window[1000:-1000], reference[1000:-1000], atol=5e-3)


@pytest.mark.parametrize("source, target", [(22050, 32000), (44100, 32000), (48000, 32000), (16000, 32000),
                                            (32000, 16000), (96000, 32000), (11025, 44100)])
def test_resampler_equals_torchaudio_resample(source, target):
    """The zero-tap-free filter against torchaudio's own dense one: same length, same samples."""
    resampler, reference = audio.Resampler(source, target), torchaudio.transforms.Resample(source, target)
    generator = torch.Generator().manual_seed(source)
    for length in (1, 7, source // 100 - 1, source // 100, 12345, 3 * source + 11):
        waveform = 0.3 * torch.randn(length, generator=generator)
        expected = reference(waveform)
        result = resampler(waveform)
        assert result.shape == expected.shape
        torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)


def test_read_window_replaces_nan_and_inf_with_zero(tmp_path):
    rate = 32000
    samples = np.full(rate, 0.125, np.float32)
    samples[[10, 500, 20000]] = np.nan
    samples[[7, 30000]] = [np.inf, -np.inf]
    path = write_wav(tmp_path / "nan.wav", samples, rate)
    assert np.isnan(sf.read(path, dtype="float32")[0]).sum() == 3  # the file really holds NaN
    window = audio.read_window(path, 0.0, 1.0, rate)
    expected = np.full(rate, 0.125, np.float32)
    expected[[10, 500, 20000, 7, 30000]] = 0.0
    np.testing.assert_array_equal(window, expected)


# ----------------------------------------------------------------------------- choose_crop_start

@pytest.mark.parametrize("policy", audio.CROP_POLICIES)
def test_crop_start_without_rng_is_zero(policy):
    assert audio.choose_crop_start(60.0, 5.0, policy, 8.0, None) == 0.0


@pytest.mark.parametrize("policy", audio.CROP_POLICIES)
@pytest.mark.parametrize("duration", [1.0, 4.99, 5.0])
def test_crop_start_short_recording_is_zero(policy, duration):
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert audio.choose_crop_start(duration, 5.0, policy, 8.0, rng) == 0.0


def test_crop_start_ends_policy_stays_in_the_end_segments_and_uses_both():
    duration, window, ends = 30.0, 5.0, 8.0
    rng = np.random.default_rng(1)
    starts = np.array([audio.choose_crop_start(duration, window, "ends", ends, rng) for _ in range(2000)])
    head = (starts >= 0.0) & (starts <= ends - window)                    # [0, 3]
    tail = (starts >= duration - ends) & (starts <= duration - window)    # [22, 25]
    assert np.all(head | tail), starts[~(head | tail)][:5]
    assert 700 < head.sum() < 1300 and 700 < tail.sum() < 1300
    # each segment is covered, not a single point
    assert starts[head].min() < 0.1 and starts[head].max() > 2.9
    assert starts[tail].min() < 22.1 and starts[tail].max() > 24.9


def test_crop_start_ends_policy_recording_shorter_than_ends():
    duration, window, ends = 6.0, 5.0, 8.0
    rng = np.random.default_rng(2)
    starts = np.array([audio.choose_crop_start(duration, window, "ends", ends, rng) for _ in range(500)])
    assert starts.min() >= 0.0 and starts.max() <= duration - window


def test_crop_start_ends_policy_never_runs_past_the_end_when_ends_shorter_than_window():
    # --ends-seconds 3 with --window-seconds 5 on a 30 s recording: the tail crop
    # should still be a full window of audio, not one that runs 2 s past the end.
    duration, window, ends = 30.0, 5.0, 3.0
    rng = np.random.default_rng(3)
    starts = np.array([audio.choose_crop_start(duration, window, "ends", ends, rng) for _ in range(200)])
    assert starts.max() + window <= duration, (
        f"BUG: 'ends' crop starts at {starts.max()} s, so the {window} s window runs "
        f"{starts.max() + window - duration} s past the end of a {duration} s recording "
        f"(zero padding) when ends_seconds < window_seconds")


def test_crop_start_random_policy_covers_the_recording():
    duration, window = 20.0, 5.0
    rng = np.random.default_rng(4)
    starts = np.array([audio.choose_crop_start(duration, window, "random", 8.0, rng) for _ in range(2000)])
    assert starts.min() >= 0.0 and starts.max() <= duration - window
    assert starts.min() < 0.1 and starts.max() > duration - window - 0.1
    # roughly uniform: every 1.5 s bin of [0, 15] is visited
    counts, _ = np.histogram(starts, bins=10, range=(0.0, duration - window))
    assert counts.min() > 100, counts


def test_crop_start_unknown_policy_raises():
    with pytest.raises(ValueError, match="middle"):
        audio.choose_crop_start(60.0, 5.0, "middle", 8.0, np.random.default_rng(0))


# ----------------------------------------------------------------------------- dataset, sampler, collate

RATE = 16000
N_LONG = 30 * RATE


@pytest.fixture()
def ramp_dataset(tmp_path):
    """Two 30 s ramp recordings at the model rate and a 1.5 s one, random crops of 2 s."""
    paths = [write_wav(tmp_path / "long_a.wav", ramp(N_LONG), RATE),
             write_wav(tmp_path / "long_b.wav", ramp(N_LONG)[::-1].copy(), RATE),
             write_wav(tmp_path / "short.wav", ramp(int(1.5 * RATE)), RATE)]
    targets = np.eye(3, dtype=np.float32)
    crop = audio.CropSettings(sample_rate=RATE, window_seconds=2.0, policy="random", ends_seconds=4.0)
    return loader.RecordingDataset([str(p) for p in paths], [30.0, 30.0, 1.5], targets, crop, seed=9)


def crop_start_sample(waveform: torch.Tensor) -> int:
    """The ramp encodes its own position: sample k holds k / 2**20."""
    return int(round(float(waveform[0]) * 2 ** 20))


def test_dataset_item_is_reproducible_and_a_contiguous_crop(ramp_dataset):
    first = ramp_dataset[(0, 3, 17)]
    again = ramp_dataset[(0, 3, 17)]
    assert torch.equal(first["waveform"], again["waveform"])
    waveform = first["waveform"]
    assert waveform.dtype == torch.float32 and waveform.shape == (2 * RATE,)
    start = crop_start_sample(waveform)
    assert 0 <= start <= N_LONG - 2 * RATE
    np.testing.assert_array_equal(waveform.numpy(), ramp(N_LONG)[start:start + 2 * RATE])
    assert torch.equal(first["target"], torch.tensor([1.0, 0.0, 0.0]))
    assert first["path"] == ramp_dataset.paths[0]


def test_dataset_crop_changes_with_epoch_and_position(ramp_dataset):
    starts_by_epoch = {crop_start_sample(ramp_dataset[(0, epoch, 5)]["waveform"]) for epoch in range(6)}
    assert len(starts_by_epoch) == 6, starts_by_epoch
    starts_by_position = {crop_start_sample(ramp_dataset[(0, 0, pos)]["waveform"]) for pos in range(6)}
    assert len(starts_by_position) == 6, starts_by_position


def test_dataset_crop_depends_on_seed(ramp_dataset):
    other = loader.RecordingDataset(ramp_dataset.paths, ramp_dataset.durations, ramp_dataset.targets,
                                  ramp_dataset.crop, seed=10)
    assert not torch.equal(ramp_dataset[(0, 1, 2)]["waveform"], other[(0, 1, 2)]["waveform"])


def test_dataset_eval_item_is_first_window_and_short_file_is_padded(ramp_dataset):
    item = ramp_dataset[1]
    np.testing.assert_array_equal(item["waveform"].numpy(), ramp(N_LONG)[::-1][:2 * RATE])
    short = ramp_dataset[(2, 4, 0)]["waveform"].numpy()
    expected = np.concatenate([ramp(int(1.5 * RATE)), np.zeros(RATE // 2, np.float32)])
    np.testing.assert_array_equal(short, expected)


def test_epoch_draw_is_a_seeded_permutation_changing_with_epoch():
    a = sampling.draw_epoch(50, seed=1, epoch=0)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, sampling.draw_epoch(50, seed=1, epoch=0))
    b = sampling.draw_epoch(50, seed=1, epoch=1)
    np.testing.assert_array_equal(np.sort(b), np.arange(50))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, sampling.draw_epoch(50, seed=2, epoch=0))


def test_sampler_batches_length_and_drop_last():
    draw = sampling.draw_epoch(10, seed=0, epoch=2)
    sampler = sampling.EpochBatchSampler(draw, batch_size=3, epoch=2)
    batches = list(sampler)
    assert len(sampler) == 3 == len(batches)
    expected = [[(int(draw[p]), 2, p) for p in range(3 * b, 3 * b + 3)] for b in range(3)]
    assert batches == expected
    # the incomplete last batch (position 9) is dropped
    assert all(position != 9 for batch in batches for _, _, position in batch)
    exact = sampling.EpochBatchSampler(draw[:9], batch_size=3, epoch=2)
    assert len(exact) == 3 and sorted(r for b in exact for r, _, _ in b) == sorted(draw[:9].tolist())
    too_small = sampling.EpochBatchSampler(draw[:2], batch_size=3, epoch=2)
    assert len(too_small) == 0 and list(too_small) == []


@pytest.mark.parametrize("start_batch", [0, 1, 2, 3, 4, 7])
def test_sampler_start_batch_yields_the_tail_of_the_epoch(start_batch):
    draw = sampling.draw_epoch(17, seed=4, epoch=1)
    full = list(sampling.EpochBatchSampler(draw, batch_size=4, epoch=1))
    assert len(full) == 4
    resumed = sampling.EpochBatchSampler(draw, batch_size=4, epoch=1, start_batch=start_batch)
    assert list(resumed) == full[start_batch:]
    assert len(resumed) == len(full[start_batch:])


def test_loader_with_sampler_reproduces_direct_items(ramp_dataset):
    draw = sampling.draw_epoch(len(ramp_dataset), seed=9, epoch=0)
    sampler = sampling.EpochBatchSampler(draw, batch_size=2, epoch=0)
    data_loader = torch.utils.data.DataLoader(ramp_dataset, batch_sampler=sampler,
                                         collate_fn=loader.collate, num_workers=0)
    batches = list(data_loader)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["waveform"].shape == (2, 2 * RATE) and batch["target"].shape == (2, 3)
    for row, (record, epoch, position) in enumerate(next(iter(sampler))):
        item = ramp_dataset[(record, epoch, position)]
        assert torch.equal(batch["waveform"][row], item["waveform"])
        assert torch.equal(batch["target"][row], item["target"])
        assert batch["path"][row] == item["path"]


def test_deleted_file_gives_none_with_warning_and_collate_drops_it(ramp_dataset, caplog):
    Path(ramp_dataset.paths[1]).unlink()
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        missing = ramp_dataset[(1, 0, 0)]
    assert missing is None
    assert any(record.levelno == logging.WARNING and ramp_dataset.paths[1] in record.getMessage()
               for record in caplog.records), caplog.text
    good_a, good_c = ramp_dataset[(0, 0, 1)], ramp_dataset[(2, 0, 2)]
    batch = loader.collate([good_a, missing, good_c])
    assert batch["waveform"].shape == (2, 2 * RATE)
    assert torch.equal(batch["waveform"][0], good_a["waveform"])
    assert torch.equal(batch["waveform"][1], good_c["waveform"])
    assert torch.equal(batch["target"], torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert batch["path"] == [ramp_dataset.paths[0], ramp_dataset.paths[2]]
    assert loader.collate([None, None]) is None
    assert loader.collate([]) is None


# ----------------------------------------------------------------------------- check_audio_files

def test_check_audio_files_reports_bad_files_with_reasons(tmp_path):
    missing = tmp_path / "missing.ogg"
    empty = tmp_path / "empty.ogg"
    empty.write_bytes(b"")
    text = tmp_path / "text.ogg"
    text.write_text("this is not audio\n" * 20)
    good = write_wav(tmp_path / "good.wav", np.zeros(12345, np.float32), 22050)
    headers, bad = audio.check_audio_files([missing, empty, text, good])
    assert headers == [None, None, None, (12345, 22050)]
    assert [path for path, _ in bad] == [str(missing), str(empty), str(text)]
    for _, reason in bad:
        assert isinstance(reason, str) and "Error" in reason and "\n" not in reason, reason


def test_check_audio_files_on_tiny_data(tiny_data):
    table = data.read_metadata(tiny_data)
    headers, bad = audio.check_audio_files(table["path"])
    assert bad == []
    for path, (frames, rate) in zip(table["path"], headers):
        info = sf.info(path)
        assert (frames, rate) == (info.frames, info.samplerate)
        assert rate in (22050, 32000, 44100) and 3.0 * rate - 1 <= frames <= 12.0 * rate
