"""infer.py: row layout, ensembles aligned by name, window overlap, smoothing, outputs, bad input."""
from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import infer
import train
from conftest import TINY_SPECIES, quick_args, tone_recording
import soundscapes
import engines


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(quick_args(tiny_data, out, "--epochs", "1"))
    return out / "best.pt"


def run_infer(*argv):
    return infer.main(infer.get_args_parser().parse_args([str(a) for a in argv]))


def write_audio(path, seconds, sample_rate=16000, frequency=2500.0, channels=1):
    audio = tone_recording(frequency, seconds, sample_rate, np.random.default_rng(1))
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    # Written in blocks: libsndfile 1.2's Vorbis encoder segfaults on one very large write.
    with sf.SoundFile(path, "w", sample_rate, channels) as handle:
        for start in range(0, len(audio), sample_rate):
            handle.write(audio[start:start + sample_rate])
    return path


@pytest.mark.parametrize("seconds, expected", [(12.3, 3), (5.0, 1), (600.0, 120), (600.01, 120),
                                               (2.0, 1), (10.9, 2), (11.0, 3)])
def test_row_count(seconds, expected):
    sample_rate = 32000
    assert soundscapes.row_count(int(round(seconds * sample_rate)), sample_rate) == expected


def test_row_ids_and_counts_end_to_end(checkpoint, tmp_path):
    folder = tmp_path / "soundscapes"
    folder.mkdir()
    write_audio(folder / "soundscape_29201.wav", 12.3)
    write_audio(folder / "short.flac", 5.0, sample_rate=44100, channels=2)
    write_audio(folder / "long.ogg", 600.0, sample_rate=22050)
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
    write_audio(folder / "a.wav", 17.0)
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
    write_audio(folder / "a.wav", 7.0)
    columns = ["row_id", "zzzzzz1", "ggghhh1", "aaabbb1", "eeefff1", "cccddd1"]
    pd.DataFrame(columns=columns).to_csv(tmp_path / "sample_submission.csv", index=False)
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "sub.csv",
              "--sample-submission", tmp_path / "sample_submission.csv")
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns) == columns
    assert (submission["zzzzzz1"] == 0).all() and (submission["ggghhh1"] > 0).all()


def test_window_plan_overlap_weights_by_hand():
    starts, weights = soundscapes.window_plan(n_rows=2, window_seconds=5.0, hop_seconds=5.0)
    np.testing.assert_allclose(starts, [0.0, 5.0])
    np.testing.assert_allclose(weights, np.eye(2))
    # hop 2.5 s: windows at 0, 2.5, 5, 7.5 s. Row 0 [0, 5) overlaps window 0 fully and
    # window 1 for 2.5 s -> weights 2/3, 1/3. Row 1 [5, 10): window 1 for 2.5 s, window 2
    # fully, window 3 for 2.5 s -> 1/4, 1/2, 1/4.
    starts, weights = soundscapes.window_plan(n_rows=2, window_seconds=5.0, hop_seconds=2.5)
    np.testing.assert_allclose(starts, [0.0, 2.5, 5.0, 7.5])
    np.testing.assert_allclose(weights, [[2 / 3, 1 / 3, 0, 0], [0, 1 / 4, 1 / 2, 1 / 4]])
    # A 10-s model sees 2.5 s of context on each side of its row.
    starts, weights = soundscapes.window_plan(n_rows=3, window_seconds=10.0, hop_seconds=5.0)
    np.testing.assert_allclose(starts, [-2.5, 2.5, 7.5])
    np.testing.assert_allclose(weights[1], [0.25, 0.5, 0.25])


def test_cut_windows_pads_at_both_ends():
    waveform = np.arange(1, 21, dtype=np.float32)  # 20 samples at 2 Hz = 10 s
    windows = soundscapes.cut_windows(waveform, 2, np.array([-2.5, 2.5, 7.5]), 10.0)
    assert windows.shape == (3, 20)
    np.testing.assert_array_equal(windows[0][:5], 0)
    np.testing.assert_array_equal(windows[0][5:], np.arange(1, 16))
    np.testing.assert_array_equal(windows[2][:5], np.arange(16, 21))
    np.testing.assert_array_equal(windows[2][5:], 0)


def test_batches_filled_across_files_equal_cut_windows():
    rng = np.random.default_rng(0)
    files = [rng.standard_normal(n).astype(np.float32) for n in (23, 7, 40)]   # at 2 Hz
    plans = [soundscapes.window_plan(soundscapes.row_count(len(w), 2), 10.0, 2.5)[0] for w in files]
    expected = np.concatenate([soundscapes.cut_windows(w, 2, starts, 10.0) for w, starts in zip(files, plans)])
    sources = [(w, int(offset)) for w, starts in zip(files, plans) for offset in soundscapes.window_offsets(starts, 2)]
    batches = [soundscapes.fill_batch(sources[first:first + 4], 20) for first in range(0, len(sources), 4)]
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    # and against a hand-built zero-padded file: windows entirely before or after the audio are zeros
    padded = np.concatenate([np.zeros(30, np.float32), files[1], np.zeros(30, np.float32)])
    out = np.empty(20, np.float32)
    for offset in (-25, -20, -3, 0, 5, 7, 12):
        soundscapes.copy_window(files[1], offset, out)
        np.testing.assert_array_equal(out, padded[30 + offset:50 + offset])


def test_smoothing_and_file_prior_by_hand():
    scores = np.array([[1.0], [0.0], [0.0], [0.5]], dtype=np.float32)
    smoothed = infer.smooth_rows(scores, [0.1, 0.8, 0.1])
    # Edges renormalise over the neighbours that exist: row 0 = (0.8*1 + 0.1*0) / 0.9.
    np.testing.assert_allclose(smoothed[:, 0], [0.8 / 0.9, 0.1, 0.05, (0.8 * 0.5) / 0.9], rtol=1e-6)
    with pytest.raises(ValueError):
        infer.smooth_rows(scores, [0.5, 0.5])
    prior = infer.apply_file_prior(scores, 0.25)
    np.testing.assert_allclose(prior[:, 0], [1.0, 0.25, 0.25, 0.625])


def test_combine_power_mean_and_missing_species():
    class Fake:
        def __init__(self, index):
            self.column_index = np.array(index)
    a = np.array([[0.2, 0.6]])
    b = np.array([[0.4]])
    members = [Fake([0, 1]), Fake([1])]  # the second model knows only species 1
    mean = infer.combine([a, b], members, 3, "mean", 2.0)
    np.testing.assert_allclose(mean, [[0.2, 0.5, 0.0]])
    power = infer.combine([a, b], members, 3, "power", 2.0)
    np.testing.assert_allclose(power, [[0.2, np.sqrt((0.36 + 0.16) / 2), 0.0]], rtol=1e-6)


def test_raven_and_csv_formats(checkpoint, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_audio(folder / "site1.wav", 12.0)
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "raven",
              "--format", "raven", "--min-conf", "0.2")
    table = pd.read_csv(tmp_path / "raven" / "site1.selections.txt", sep="\t")
    assert list(table.columns) == infer.RAVEN_COLUMNS
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
    write_audio(folder / "good.wav", 10.0)
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
    with pytest.raises(FileNotFoundError, match="no ogg/mp3/flac/wav files"):
        run_infer("--ckpts", checkpoint, "--soundscapes", empty)
    import model as model_lib
    with pytest.raises(model_lib.CheckpointError, match="not found"):
        run_infer("--ckpts", tmp_path / "missing.pt", "--soundscapes", empty)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(model_lib.CheckpointError, match="not a checkpoint written by train.py"):
        run_infer("--ckpts", tmp_path / "foreign.pt", "--soundscapes", empty)


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


def test_parity_check_refuses_a_backend_that_changes_scores(checkpoint):
    import model as model_lib
    model = model_lib.load_model(checkpoint)
    waveforms = torch.randn(3, model.window_samples)
    with torch.inference_mode():
        logits = model(waveforms)
    assert engines.check_parity(model, waveforms, logits, "fake", 1e-6) < 1e-6
    with pytest.raises(FloatingPointError, match="disagrees with PyTorch"):
        engines.check_parity(model, waveforms, logits + torch.tensor([3.0, 0, 0, 0]), "fake", 0.02)
    with pytest.raises(FloatingPointError):
        engines.check_parity(model, waveforms, logits * float("nan"), "fake", 0.02)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_optional_backends_match_torch(backend, checkpoint, tmp_path):
    pytest.importorskip(backend)
    folder = tmp_path / "s"
    folder.mkdir()
    write_audio(folder / "a.wav", 23.0)
    write_audio(folder / "b.wav", 41.0, frequency=4000.0)
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


def test_ema_weights_are_used_when_asked(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--epochs", "1", "--ema", "0.5"))
    folder = tmp_path / "s"
    folder.mkdir()
    write_audio(folder / "a.wav", 7.0)
    common = ["--ckpts", out / "best.pt", "--soundscapes", folder, "--precision", "fp32"]
    raw = run_infer(*common, "--out", tmp_path / "raw.csv")["submission"]
    ema = run_infer(*common, "--out", tmp_path / "ema.csv", "--ema")["submission"]
    assert not np.allclose(raw.iloc[:, 1:].to_numpy(), ema.iloc[:, 1:].to_numpy())
    import model as model_lib
    plain = torch.load(out / "best.pt", weights_only=True)
    del plain["model_ema"]
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(model_lib.CheckpointError, match="no EMA weights"):
        model_lib.load_model(tmp_path / "plain.pt", ema=True)


def test_average_weights_is_one_model_with_the_mean_weights(checkpoint, tmp_path):
    import model as model_lib
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
    write_audio(folder / "a.wav", 10.0)
    submission = run_infer("--ckpts", tmp_path / "with_nocall.pt", "--soundscapes", folder,
                           "--out", tmp_path / "sub.csv", "--precision", "fp32")["submission"]
    assert list(submission.columns) == ["row_id", *sorted(TINY_SPECIES)[1:]]
    row_sums = submission.iloc[:, 1:].to_numpy().sum(axis=1)
    assert (row_sums < 1 - 1e-4).all()  # the nocall share of the softmax is not redistributed


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
    write_audio(folder / "a.wav", 31.0)
    write_audio(folder / "b.ogg", 17.0, sample_rate=22050, frequency=4000.0)
    common = ["--ckpts", checkpoint, "--soundscapes", folder, "--batch-size", "2", "--threads", "2"]
    one = run_infer(*common, "--out", tmp_path / "one.csv", "--streams", "1")["submission"]
    two = run_infer(*common, "--out", tmp_path / "two.csv", "--streams", "2")["submission"]
    assert list(two["row_id"]) == list(one["row_id"])
    np.testing.assert_allclose(two.iloc[:, 1:].to_numpy(), one.iloc[:, 1:].to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="--streams must be at least 1"):
        run_infer(*common, "--out", tmp_path / "zero.csv", "--streams", "0")


def test_split_threads_never_more_streams_than_threads():
    assert engines.split_threads(4, 2) == (2, 2)
    assert engines.split_threads(2, 2) == (2, 1)
    assert engines.split_threads(1, 2) == (1, 1)
    assert engines.split_threads(3, 1) == (1, 3)


def test_batches_run_across_files_with_the_scores_of_each_file_alone(checkpoint, tmp_path):
    """Windows of consecutive files share batches (one partial batch per run, not per file),
    and each file's rows are what it gets when scored on its own."""
    lengths = {"a": 7.0, "b": 12.3, "c": 23.0, "d": 3.0}
    together = tmp_path / "together"
    together.mkdir()
    for index, (stem, seconds) in enumerate(lengths.items()):
        write_audio(together / f"{stem}.wav", seconds, frequency=1500.0 + 700 * index)
    batches = []
    real_fill_batch = soundscapes.fill_batch

    def spy(sources, window_samples):
        batches.append([id(waveform) for waveform, _ in sources])
        return real_fill_batch(sources, window_samples)
    import unittest.mock
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
