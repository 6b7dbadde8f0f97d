"""Tests for cache.py (`python data.py cache`, train.py --cache): crops read from the cache equal decoded
crops; its size, resume and refusal; and cached int16 batches, also through loader.py's BatchRing,
equal the items read one by one.

The recordings are written here at the training rate; the reference is the same
RecordingDataset without a cache, up to int16 rounding.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import quick_args, quick_settings, small_tmpfs, tone_recording

import audio
import cache as cache_lib
import data
import loader
import sampling
import train

RATE = 16000
QUANTUM = 1.5 / audio.INT16_SCALE      # int16 rounding, and nothing more


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
    """Recordings already at the training rate (no resampling), 3 to 30 s long."""
    root = tmp_path_factory.mktemp("native")
    rows = []
    for index, (code, seconds) in enumerate([("aaa1", 3.0), ("aaa1", 9.5), ("aaa1", 30.0), ("bbb1", 7.0),
                                             ("bbb1", 16.0), ("bbb1", 22.3), ("ccc1", 12.0), ("ccc1", 4.2)]):
        (root / "train_audio" / code).mkdir(parents=True, exist_ok=True)
        samples = tone_recording(700.0 * (index + 1), seconds, RATE, np.random.default_rng(index))
        sf.write(root / "train_audio" / code / f"XC{index + 1}.ogg", samples, RATE, format="OGG", subtype="VORBIS")
        rows.append({"primary_label": code, "secondary_labels": "[]", "filename": f"{code}/XC{index + 1}.ogg",
                     "url": f"https://www.xeno-canto.org/{index + 1}"})
    pd.DataFrame(rows).to_csv(root / "train_metadata.csv", index=False)
    return root


def as_float(item):
    assert item["waveform"].dtype == torch.int16          # cached batches travel as int16
    return audio.as_float(item["waveform"]).numpy()


def settings(policy="ends", max_seconds=0.0, rate=RATE):
    return cache_lib.cache_settings(sample_rate=rate, policy=policy, ends_seconds=4.0, window_seconds=2.0,
                                    max_seconds=max_seconds)


def build_cache(data_dir, out_dir, cache_settings, workers=0):
    """As `python data.py cache --data-dir data_dir --out out_dir` does it."""
    table, _ = data.read_training_data([data_dir])
    return cache_lib.build_cache(data.audio_names(table), list(table["path"]), out_dir, cache_settings, workers)


def open_cache(folder, table, cache_settings):
    return cache_lib.AudioCache(folder, data.audio_names(table), list(table["path"]), cache_settings)


def datasets(root, cache_dir, policy="ends", max_seconds=0.0):
    table, _ = data.read_training_data([root])
    durations = [sf.info(path).duration for path in table["path"]]
    crop = audio.CropSettings(sample_rate=RATE, window_seconds=2.0, policy=policy, ends_seconds=4.0)
    targets = np.zeros((len(table), 1), dtype=np.float32)
    cache = open_cache(cache_dir, table, settings(policy, max_seconds))
    plain = loader.RecordingDataset(table["path"], durations, targets, crop, seed=3)
    cached = loader.RecordingDataset(table["path"], durations, targets, crop, seed=3, cache=cache,
                                     cache_rows=np.arange(len(table)))
    return plain, cached


real_read_window = audio.read_window       # before any test replaces it


@pytest.mark.parametrize("policy", ["ends", "random"])
def test_cached_crops_equal_decoded_crops(native_data, tmp_path, policy, monkeypatch):
    build_cache(native_data, tmp_path / "cache", settings(policy), workers=0)
    plain, cached = datasets(native_data, tmp_path / "cache", policy)
    decoded = []
    monkeypatch.setattr(audio, "read_window", lambda *a, **k: decoded.append(a) or real_read_window(*a, **k))
    for epoch in range(4):
        for record in range(len(plain)):
            item = (record, epoch, 10 * epoch + record)
            np.testing.assert_allclose(as_float(cached[item]), plain[item]["waveform"].numpy(), atol=QUANTUM, rtol=0)
    np.testing.assert_allclose(as_float(cached[5]), plain[5]["waveform"].numpy(), atol=QUANTUM, rtol=0)
    assert len(decoded) == 4 * len(plain) + 1            # only the uncached dataset decoded anything


def test_size_follows_the_policy_and_max_seconds_lowers_it(native_data, tmp_path, capsys, monkeypatch):
    build_cache(native_data, tmp_path / "ends", settings("ends"), workers=2)   # in parallel
    manifest = json.loads((tmp_path / "ends" / "manifest.json").read_text())
    durations = [3.0, 9.5, 30.0, 7.0, 16.0, 22.3, 12.0, 4.2]
    expected = sum(d if d <= 8.0 else 8.0 for d in durations)      # first and last 4 s, or all of a short one
    assert manifest["samples"] == pytest.approx(expected * RATE, abs=2 * len(durations))
    assert manifest["complete"] and (tmp_path / "ends" / "audio.int16").stat().st_size == manifest["bytes"]
    assert f"{manifest['bytes'] / 1e9:.2f} GB" in capsys.readouterr().out           # told before writing
    build_cache(native_data, tmp_path / "capped", settings("ends", max_seconds=5.0), workers=0)
    capped = json.loads((tmp_path / "capped" / "manifest.json").read_text())
    assert capped["samples"] == pytest.approx(sum(min(d, 5.0) for d in durations) * RATE, abs=2 * len(durations))
    # crops the capped cache does not hold are decoded: the crops stay those of the policy
    plain, cached = datasets(native_data, tmp_path / "capped", max_seconds=5.0)
    for record in range(len(plain)):
        np.testing.assert_allclose(as_float(cached[(record, 1, record)]),
                                   plain[(record, 1, record)]["waveform"].numpy(), atol=QUANTUM, rtol=0)


def test_interrupted_cache_is_refused_then_finished_by_running_again(native_data, tmp_path, monkeypatch, capsys):
    clean = tmp_path / "clean"
    build_cache(native_data, clean, settings(), workers=0)
    calls = []
    real = cache_lib._cache_recording

    def crash_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(job[2])
        return real(job)
    monkeypatch.setattr(cache_lib, "_cache_recording", crash_after_three)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        build_cache(native_data, broken, settings(), workers=0)
    table, _ = data.read_training_data([native_data])
    with pytest.raises(cache_lib.CacheError, match="unfinished.*again"):
        open_cache(broken, table, settings())
    monkeypatch.setattr(cache_lib, "_cache_recording", lambda job: calls.append(job[2]) or real(job))
    build_cache(native_data, broken, settings(), workers=0)
    assert sorted(calls) == list(range(8)) and len(calls) == 8       # the first three were not decoded again
    assert (broken / "audio.int16").read_bytes() == (clean / "audio.int16").read_bytes()
    before = (clean / "audio.int16").stat().st_mtime_ns
    capsys.readouterr()
    build_cache(native_data, clean, settings(), workers=0)     # idempotent
    assert "already complete" in capsys.readouterr().out
    assert (clean / "audio.int16").stat().st_mtime_ns == before


def test_a_cache_of_other_data_policy_or_rate_is_refused(native_data, tiny_data, tmp_path):
    build_cache(native_data, tmp_path / "cache", settings(), workers=0)
    table, _ = data.read_training_data([native_data])
    with pytest.raises(cache_lib.CacheError, match="sample_rate=16000.*32000"):
        open_cache(tmp_path / "cache", table, settings(rate=32000))
    with pytest.raises(cache_lib.CacheError, match="crop_policy='ends'.*'random'"):
        open_cache(tmp_path / "cache", table, settings("random"))
    with pytest.raises(cache_lib.CacheError, match="made from other data"):
        open_cache(tmp_path / "cache", data.read_training_data([tiny_data])[0], settings())
    with pytest.raises(cache_lib.CacheError, match="ends"):              # a run cropping 6 s ends instead of 4
        build_cache(native_data, tmp_path / "cache",
                    cache_lib.cache_settings(sample_rate=RATE, policy="ends", ends_seconds=6.0, window_seconds=2.0),
                    workers=0)
    with pytest.raises(cache_lib.CacheError, match="not a cache"):
        open_cache(tmp_path, table, settings())


def test_training_with_the_cache_says_so_and_trains_the_same(native_data, tmp_path, caplog):
    common = ["--sample-rate", str(RATE), "--ends-seconds", "4", "--val-fraction", "0.3"]
    data.main(["cache", "--data-dir", str(native_data), "--out", str(tmp_path / "cache"), "--sample-rate",
               str(RATE), "--ends-seconds", "4", "--window-seconds", "2", "--workers", "0"])
    train.main(quick_args(native_data, tmp_path / "plain", "--batch-size", "2", *common))
    with caplog.at_level("INFO", logger="birdclef"):
        train.main(quick_args(native_data, tmp_path / "cached", "--batch-size", "2", "--cache",
                              str(tmp_path / "cache"), *common))
    assert "reading crops from the cache" in caplog.text
    train.main(quick_args(native_data, tmp_path / "cached_workers", "--batch-size", "2", "--cache",
                          str(tmp_path / "cache"), *common, "--workers", "2"))      # through a BatchRing
    plain, cached, workers = (pd.read_csv(tmp_path / name / "steps.csv")
                              for name in ("plain", "cached", "cached_workers"))
    np.testing.assert_allclose(cached["loss"], plain["loss"], rtol=1e-3)
    np.testing.assert_array_equal(workers["loss"], cached["loss"])
    refused = tmp_path / "refused"
    refused.mkdir()
    with pytest.raises(cache_lib.CacheError, match="crop_policy"):     # where train.py reads its data
        data.build_datasets(quick_settings(native_data, refused, "--cache", str(tmp_path / "cache"),
                                           "--crop-policy", "random", *common).data, refused)


@pytest.mark.parametrize("max_seconds", [0.0, 5.0])     # 5 s: some crops are not cached and are decoded
def test_whole_batches_from_the_cache_equal_items_read_one_by_one(native_data, tmp_path, max_seconds):
    build_cache(native_data, tmp_path / "cache", settings(max_seconds=max_seconds), workers=0)
    _, cached = datasets(native_data, tmp_path / "cache", max_seconds=max_seconds)
    cached.paths[1], cached.cache_rows[1] = str(tmp_path / "missing.ogg"), -1     # fails: left out of its batch
    sampler = sampling.EpochBatchSampler(np.tile(np.arange(len(cached)), 6), batch_size=4, epoch=2)
    loaders = [torch.utils.data.DataLoader(cached, batch_sampler=sampler, num_workers=workers,
                                           collate_fn=loader.collate) for workers in (0, 2)]
    loaders.append(loader.RingDataLoader(cached, batch_sampler=sampler, num_workers=2, collate_fn=loader.collate,
                                         ring_batch_size=4))    # through a BatchRing (12 batches, 5 slots)
    for data_loader in loaders:
        kept = list(data_loader)   # all kept before looking: a slot reused under a kept batch would show
        for items, batch in zip(sampler, kept, strict=True):
            one_by_one = [cached[item] for item in items]
            expected = torch.stack([item["waveform"] for item in one_by_one if item is not None])
            assert batch["waveform"].dtype == torch.int16 and torch.equal(batch["waveform"], expected)
            assert batch["index"].tolist() == [item["index"] for item in one_by_one if item is not None]


def test_a_recording_that_fails_to_decode_is_left_out_and_the_cache_still_completes(native_data, tmp_path,
                                                                                      monkeypatch, caplog):
    table, _ = data.read_training_data([native_data])
    broken = table["path"].iloc[2]
    real = audio.read_window

    def failing(path, *args, **kwargs):
        if str(path) == broken:
            raise RuntimeError("decoder error")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(audio, "read_window", failing)
    with caplog.at_level("WARNING", logger="birdclef"):
        build_cache(native_data, tmp_path / "cache", settings(), workers=0)
    assert "not cached (cannot be decoded): recording 2: RuntimeError: decoder error" in caplog.text
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
    assert np.load(tmp_path / "cache" / "done.npy").tolist() == [1, 1, 2, 1, 1, 1, 1, 1]
    _, cached = datasets(native_data, tmp_path / "cache")
    assert cached.cache.window(row=2, start_seconds=0.0, seconds=2.0) is None
    assert cached.cache.window(row=3, start_seconds=0.0, seconds=2.0) is not None
    assert cached[(2, 0, 0)] is None            # decoded as without a cache, fails, skipped as usual


def test_batch_ring_frees_slots_of_failed_batches_and_is_made_anew_for_each_pass(native_data, tmp_path,
                                                                                monkeypatch):
    build_cache(native_data, tmp_path / "cache", settings(), workers=0)
    _, cached = datasets(native_data, tmp_path / "cache")
    cached.paths[1], cached.cache_rows[1] = str(tmp_path / "missing.ogg"), -1
    monkeypatch.setattr(loader.BatchRing, "WAIT_SECONDS", 20.0)      # a leaked slot fails fast
    batches = [[(1, 0, position)] for position in range(8)] + [[(0, 0, 8), (2, 0, 9)]]  # 8 batches that fail
    data_loader = loader.RingDataLoader(cached, batch_sampler=batches, num_workers=1, prefetch_factor=1,
                                        collate_fn=loader.collate, ring_batch_size=2)      # 2 slots
    for _ in range(2):
        received = list(data_loader)
        assert received[:8] == [None] * 8
        assert torch.equal(received[8]["waveform"], torch.stack([cached[(0, 0, 8)]["waveform"],
                                                                 cached[(2, 0, 9)]["waveform"]]))
    partial = iter(data_loader)
    next(partial)                     # a pass left after one batch: its ring goes with it
    del partial
    assert len(list(data_loader)) == 9


# ----------------------------------------------------------------------------- content, truncation, full disk (#17)

def test_a_file_replaced_by_other_audio_of_the_same_size_or_a_truncated_cache_is_refused(native_data, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(native_data, data_dir)
    build_cache(data_dir, tmp_path / "cache", settings(), workers=0)
    table, _ = data.read_training_data([data_dir])
    open_cache(tmp_path / "cache", table, settings())                    # as made: accepted
    # Other audio, same size and mtime: only the content tells them apart.
    path = data_dir / "train_audio" / "bbb1" / "XC4.ogg"
    status = path.stat()
    other = bytearray(path.read_bytes())
    other[-100:] = bytes(255 - byte for byte in other[-100:])
    path.write_bytes(bytes(other))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_size == status.st_size
    with pytest.raises(cache_lib.CacheError, match="made from other data.*content"):
        open_cache(tmp_path / "cache", table, settings())
    # A cache whose audio.int16 lost its end.
    build_cache(native_data, tmp_path / "cut", settings(), workers=0)
    table, _ = data.read_training_data([native_data])
    with open(tmp_path / "cut" / "audio.int16", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(cache_lib.CacheError, match=r"audio.int16 holds 1000 bytes, its manifest says \d+ "
                                                   r"\(truncated or replaced\)"):
        open_cache(tmp_path / "cut", table, settings())


def test_a_cache_checks_and_reserves_its_space_first(native_data, tmp_path, monkeypatch):
    needed = 2 * int(cache_lib.plan_cache(list(data.read_training_data([native_data])[0]["path"]),
                                          settings())["length"].sum())
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=needed - 1))
    with pytest.raises(cache_lib.CacheError, match=rf"needs {needed / 1e9:.2f} GB in .* and {(needed - 1) / 1e9:.2f} "
                                                   r"GB are free"):
        build_cache(native_data, tmp_path / "cache", settings(), workers=0)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    monkeypatch.undo()
    build_cache(native_data, tmp_path / "cache", settings(), workers=0)
    if hasattr(os, "posix_fallocate"):    # reserved, not sparse: the blocks exist before a worker writes
        status = (tmp_path / "cache" / "audio.int16").stat()
        assert status.st_blocks * 512 >= status.st_size == needed


def test_a_dead_cache_worker_raises_instead_of_hanging(native_data, tmp_path):
    stop = threading.Event()

    def kill_first_worker():
        while not stop.is_set():
            children = multiprocessing.active_children()
            if children:
                os.kill(children[0].pid, signal.SIGKILL)
                return
            time.sleep(0.01)
    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    try:
        with pytest.raises(cache_lib.CacheError, match="a cache worker died.*run the same command again"):
            build_cache(native_data, tmp_path / "cache", settings(), workers=1)
    finally:
        stop.set()
        killer.join()
    build_cache(native_data, tmp_path / "cache", settings(), workers=0)   # and running again finishes it
    build_cache(native_data, tmp_path / "clean", settings(), workers=0)
    assert (tmp_path / "cache" / "audio.int16").read_bytes() == (tmp_path / "clean" / "audio.int16").read_bytes()


def test_a_real_full_disk_is_refused_before_caching(native_data, tmp_path):
    with small_tmpfs(tmp_path / "small", "64k") as disk:
        with pytest.raises(cache_lib.CacheError, match="needs .* GB .* are free"):
            build_cache(native_data, disk / "cache", settings(), workers=0)
