"""Tests for loader.py: RecordingDataset's crops, collate, and files that fail after the header check.

The ramp recordings encode their own sample positions, so a crop says exactly where
it came from; references are slices of the ramp and items read one by one.
(Cached int16 batches and the BatchRing are tested with the cache, in test_cache.py.)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_settings, ramp, write_wav

import audio
import data
import loader
import sampling

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


# ----------------------------------------------------------------------------- files that fail to decode

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


def test_file_failing_mid_epoch_is_skipped_not_fatal(tiny_data, tmp_path, caplog):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    labels, train_set, _ = data.build_datasets(quick_settings(data_dir, tmp_path / "run").data, tmp_path)
    # The header check passed; now the file breaks before it is decoded.
    open(train_set.paths[0], "wb").close()
    assert train_set[(0, 0, 0)] is None
    assert "skipping" in caplog.text and train_set.paths[0] in caplog.text
