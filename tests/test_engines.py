"""Tests for engines.py: runners in streams (order, bounded memory), the optional ONNX Runtime and
OpenVINO backends against PyTorch, the parity check, and windows batched across files (--precision
auto's choice: tests/test_precision.py).

References: the submission of one stream, of PyTorch, and of each file scored on its own.
"""
from __future__ import annotations

import sys
import threading
import time
import unittest.mock

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_infer, write_tone

import engines
import model as model_lib
import precision
import soundscapes


@pytest.fixture(autouse=True)
def own_precision_cache(tmp_path, monkeypatch):
    """--precision auto times and caches its choice: in a file of the test's own, never in ~/.cache."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "precision.json"))


# ----------------------------------------------------------------------------- parity and the optional backends

def test_parity_check_refuses_a_backend_that_changes_scores(checkpoint):
    model = model_lib.load_model(checkpoint)
    waveforms = torch.randn(3, model.window_samples)
    with torch.inference_mode():
        logits = model(waveforms)
    assert engines.check_parity(model, waveforms, logits, backend="fake", tolerance=1e-6) < 1e-6
    with pytest.raises(FloatingPointError, match="disagrees with PyTorch"):
        engines.check_parity(model, waveforms, logits + torch.tensor([3.0, 0, 0, 0]), backend="fake",
                              tolerance=0.02)
    with pytest.raises(FloatingPointError):
        engines.check_parity(model, waveforms, logits * float("nan"), backend="fake", tolerance=0.02)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_optional_backends_match_torch(backend, checkpoint, tmp_path):
    pytest.importorskip(backend)
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 23.0)
    write_tone(folder / "b.wav", 41.0, frequency=4000.0)
    common = ["--ckpts", checkpoint, "--soundscapes", folder, "--precision", "fp32", "--batch-size", "2"]
    torch_scores = run_infer(*common, "--out", tmp_path / "t.csv", "--streams", "1")["submission"]
    # 2 streams: several batches in flight at once, each thread with its own engine request
    other = run_infer(*common, "--out", tmp_path / "o.csv", "--backend", backend, "--streams", "2")["submission"]
    assert list(other["row_id"]) == list(torch_scores["row_id"])
    np.testing.assert_allclose(other.iloc[:, 1:].to_numpy(), torch_scores.iloc[:, 1:].to_numpy(), atol=1e-4)


def test_missing_optional_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(ValueError, match="needs the optional package 'openvino'"):
        engines.import_optional("openvino")


# ----------------------------------------------------------------------------- streams

class SlowDoubler(engines.Runner):
    """A runner whose batches take different times, so concurrent ones finish out of order."""

    def __init__(self, streams):
        self.streams, self.stream_threads = streams, 1
        self.threads_used, self.running, self.most_running = [], 0, 0
        self.first_done, self.started_beside_first = False, False
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.started_beside_first |= bool(self.threads_used) and not self.first_done
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.threads_used.append(threading.current_thread().name)
        time.sleep(0.002 * (1 + int(batch[0]) % 5))
        with self.lock:
            self.running -= 1
            self.first_done = True
        return batch * 2


def test_streams_return_every_batch_in_order_with_bounded_memory():
    batches = [torch.full((3,), float(i)) for i in range(23)]
    for streams in (1, 2, 3):
        runner, pulled = SlowDoubler(streams), []

        def source():
            for batch in batches:
                pulled.append(batch)
                yield batch
        outputs = []
        for _ in range(2):  # the second call reuses the pool made by the first
            for logits in runner.map(source()):
                assert len(pulled) - len(outputs) - 1 <= runner.max_in_flight  # held besides the one returned
                outputs.append(logits)
            pulled.clear()
            assert [float(o[0]) for o in outputs] == [2.0 * i for i in range(23)]
            outputs = []
        if streams == 1:
            assert set(runner.threads_used) == {threading.main_thread().name}
        assert runner.most_running == streams and not runner.started_beside_first
        assert len(set(runner.threads_used[1:])) == streams


def test_streams_give_the_same_submission(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 31.0)
    write_tone(folder / "b.ogg", 17.0, sample_rate=22050, frequency=4000.0)
    common = ["--ckpts", checkpoint, "--soundscapes", folder, "--batch-size", "2", "--threads", "2"]
    one = run_infer(*common, "--out", tmp_path / "one.csv", "--streams", "1")["submission"]
    two = run_infer(*common, "--out", tmp_path / "two.csv", "--streams", "2")["submission"]
    assert list(two["row_id"]) == list(one["row_id"])
    np.testing.assert_allclose(two.iloc[:, 1:].to_numpy(), one.iloc[:, 1:].to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="--streams must be at least 1"):
        run_infer(*common, "--out", tmp_path / "zero.csv", "--streams", "0")


def test_split_threads_never_more_streams_than_threads():
    assert engines.split_threads(threads=4, streams=2) == (2, 2)
    assert engines.split_threads(threads=2, streams=2) == (2, 1)
    assert engines.split_threads(threads=1, streams=2) == (1, 1)
    assert engines.split_threads(threads=3, streams=1) == (1, 3)


# ----------------------------------------------------------------------------- windows batched across files

def test_batches_run_across_files_with_the_scores_of_each_file_alone(checkpoint, tmp_path):
    """Windows of consecutive files share batches (one partial batch per run, not per file),
    and each file's rows are what it gets when scored on its own."""
    lengths = {"a": 7.0, "b": 12.3, "c": 23.0, "d": 3.0}
    together = tmp_path / "together"
    together.mkdir()
    for index, (stem, seconds) in enumerate(lengths.items()):
        write_tone(together / f"{stem}.wav", seconds, frequency=1500.0 + 700 * index)
    batches = []
    real_fill_batch = soundscapes.fill_batch

    def spy(sources, window_samples):
        batches.append([id(waveform) for waveform, _ in sources])
        return real_fill_batch(sources, window_samples)
    common = ["--ckpts", checkpoint, "--hop", "2.5", "--batch-size", "3", "--smooth", "0.2,0.6,0.2"]
    with unittest.mock.patch.object(soundscapes, "fill_batch", spy):
        joint = run_infer(*common, "--soundscapes", together, "--out", tmp_path / "joint.csv")["submission"]
    assert sum(len(batch) < 3 for batch in batches) == 1                  # only the run's last batch
    assert sum(len(set(batch)) > 1 for batch in batches) >= 2              # batches spanning two files
    alone = []
    for stem in lengths:
        folder = tmp_path / stem
        folder.mkdir()
        (folder / f"{stem}.wav").write_bytes((together / f"{stem}.wav").read_bytes())
        alone.append(run_infer(*common, "--soundscapes", folder, "--out", tmp_path / f"{stem}.csv")["submission"])
    alone = pd.concat(alone, ignore_index=True)
    assert list(joint["row_id"]) == list(alone["row_id"])
    np.testing.assert_allclose(joint.iloc[:, 1:].to_numpy(), alone.iloc[:, 1:].to_numpy(), atol=1e-5)
