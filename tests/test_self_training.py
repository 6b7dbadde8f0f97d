"""Tests for soundscape windows as training data (--soundscape-labels): the soft-target loss against a hand
computation, the teacher transforms, refused tables naming the row, no file in training and validation both,
the share of every batch, the audit and the drawn counts, safe no-call windows from a teacher, determinism,
and a SIGKILLed run resumed to the uninterrupted run's numbers.

References: hand-computed losses (math on the numbers, not the function twice), hand-written tables, and an
uninterrupted run.
"""
from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUICK_FLAGS, ROOT, TINY_SPECIES, quick_args, quick_settings, read_rows, tone_recording, write_wav

import data
import loader
import losses
import pseudo_labels
import sampling
import train

SPECIES = sorted(TINY_SPECIES)
RATE = 16000


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Two 20-s 'unlabelled' recordings of the site: species aaabbb1 calls in rows 0-1 of site_0, eeefff1 in
    row 2 of site_1, the rest is quiet noise."""
    folder = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(5)
    for index, (code, rows) in enumerate((("aaabbb1", (0, 1)), ("eeefff1", (2,)))):
        audio = (0.02 * rng.standard_normal(20 * RATE)).astype(np.float32)
        for row in rows:
            audio[row * 5 * RATE:(row + 1) * 5 * RATE] += tone_recording(TINY_SPECIES[code], 5.0, RATE, rng)
        write_wav(folder / f"site_{index}.wav", audio, RATE)
    return folder


def teacher_table(site: Path, path: Path, changes: dict | None = None) -> Path:
    """What `infer.py --format csv` writes for the site: row_id,file,start_s,end_s + one column per species."""
    rows = []
    for index in range(2):
        for row in range(4):
            probabilities = dict.fromkeys(SPECIES, 0.01)
            if index == 0 and row in (0, 1):
                probabilities["aaabbb1"] = 0.9
            if index == 1 and row == 2:
                probabilities["eeefff1"] = 0.6
                probabilities["cccddd1"] = 0.2
            rows.append({"row_id": f"site_{index}_{5 * (row + 1)}", "file": f"site_{index}.wav",
                         "start_s": 5.0 * row, "end_s": 5.0 * (row + 1), **probabilities})
    table = pd.DataFrame(rows)
    table = table.astype(object)                     # a cell may become text
    for (row, column), value in (changes or {}).items():
        table.loc[row, column] = value
    table.to_csv(path, index=False)
    return path


def settings(table, audio_dir=None, power=1.0, threshold=0.0, weighting="none", share=0.25):
    return pseudo_labels.PseudoLabelSettings(str(table), str(audio_dir) if audio_dir else None, share, power,
                                             threshold, weighting)


# ----------------------------------------------------------------------------- the loss and the transforms

def test_soft_targets_in_the_loss_equal_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -2.0]])
    targets = torch.tensor([[0.9, 0.2, 0.0], [0.0, 0.0, 0.0]])
    weights = torch.tensor([0.9, 0.25])

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    def bce(row):
        return sum(-(t * math.log(sigmoid(z)) + (1 - t) * math.log(1 - sigmoid(z)))
                   for z, t in zip(logits[row].tolist(), targets[row].tolist())) / 3
    expected = (0.9 * bce(0) + 0.25 * bce(1)) / 2                     # a weighted mean over the batch
    assert losses.compute_loss(logits, targets, "bce", weights=weights).item() == pytest.approx(expected, rel=1e-6)
    assert losses.compute_loss(logits, targets, "bce").item() == pytest.approx((bce(0) + bce(1)) / 2, rel=1e-6)
    # CE renormalises a teacher's probabilities to a distribution; an all-zero row adds nothing
    log_softmax = [z - math.log(sum(math.exp(v) for v in logits[0].tolist())) for z in logits[0].tolist()]
    ce_first = -(0.9 / 1.1 * log_softmax[0] + 0.2 / 1.1 * log_softmax[1])
    assert losses.compute_loss(logits, targets, "ce", weights=weights).item() == pytest.approx(0.9 * ce_first / 2,
                                                                                              rel=1e-6)


def test_power_threshold_and_confidence_weight_transform_a_teachers_probabilities(site, tmp_path):
    table = teacher_table(site, tmp_path / "teacher.csv")
    plain = pseudo_labels.read_windows(settings(table, site), SPECIES)
    assert plain.targets.shape == (8, 4) and plain.targets[0, SPECIES.index("aaabbb1")] == pytest.approx(0.9)
    sharpened = pseudo_labels.read_windows(settings(table, site, power=2.0, threshold=0.1), SPECIES)
    row = 6                                                        # site_1, row 2: eeefff1 0.6, cccddd1 0.2
    assert sharpened.targets[row, SPECIES.index("eeefff1")] == pytest.approx(0.36)
    assert sharpened.targets[row, SPECIES.index("cccddd1")] == pytest.approx(0.04)
    assert sharpened.targets[row, SPECIES.index("ggghhh1")] == 0.0                    # 0.01 < 0.1: 0
    assert (plain.weights == 1).all()
    weighted = pseudo_labels.read_windows(settings(table, site, weighting="confidence"), SPECIES)
    assert weighted.weights.tolist() == pytest.approx([0.9, 0.9, 0.01, 0.01, 0.01, 0.01, 0.6, 0.01])
    assert plain.paths[4] == str(site / "site_1.wav") and plain.starts.tolist()[:4] == [0.0, 5.0, 10.0, 15.0]
    assert plain.durations[0] == pytest.approx(20.0)


def test_hard_labels_and_the_nocall_class(site, tmp_path):
    path = tmp_path / "by_ear.csv"
    pd.DataFrame({"file": ["site_0.wav", "site_0.wav", "site_1.wav"], "start_s": [0, 5, 10], "end_s": [5, 10, 15],
                  "labels": ["aaabbb1", "", "eeefff1 zzz9"]}).to_csv(path, index=False)
    vocabulary = SPECIES + ["nocall"]
    table = pseudo_labels.read_windows(settings(path, site), vocabulary)
    assert table.targets.tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]


@pytest.mark.parametrize("change, message", [
    ({(3, "file"): "elsewhere.wav"}, r"teacher.csv row 5: elsewhere.wav is not a readable audio file"),
    ({(2, "start_s"): 7.5, (2, "end_s"): 12.5}, r"teacher.csv row 4: window 7.5-12.5 s is off the 5-s grid"),
    ({(1, "end_s"): 12.0}, r"teacher.csv row 3: window 5-12 s is off the 5-s grid"),
    ({(6, "eeefff1"): 1.5}, r"teacher.csv row 8: eeefff1 is '1.5', not a probability in \[0, 1\]"),
    ({(0, "cccddd1"): "NaN"}, r"teacher.csv row 2: cccddd1 is 'NaN', not a probability in \[0, 1\]"),
    ({(0, "cccddd1"): float("nan")}, r"teacher.csv row 2: cccddd1 is '', not a probability"),      # a blank
    ({(0, "cccddd1"): -0.1}, r"teacher.csv row 2: cccddd1 is '-0.1', not a probability"),
    ({(4, "file"): "../site_0.wav"}, r"outside|climbs|refused|\.\."),
])
def test_a_bad_table_is_refused_in_one_line_naming_the_row(site, tmp_path, change, message):
    table = teacher_table(site, tmp_path / "teacher.csv", change)
    with pytest.raises(ValueError, match=message):
        pseudo_labels.read_windows(settings(table, site), SPECIES)


# ----------------------------------------------------------------------------- the training set and its batches

def test_every_batch_holds_its_share_of_soundscape_windows_and_the_audit_counts_them(tiny_data, site, tmp_path):
    table = teacher_table(site, tmp_path / "teacher.csv")
    run = quick_settings(tiny_data, tmp_path / "run", "--soundscape-labels", str(table), "--soundscape-audio",
                         str(site), "--soundscape-share", "0.25")
    _, train_set, _ = data.build_datasets(run.data, tmp_path)
    scapes = np.flatnonzero(train_set.soundscape)
    assert len(scapes) == 8 and scapes.tolist() == list(range(len(train_set) - 8, len(train_set)))   # last
    recordings = len(train_set) - 8
    for epoch in (0, 1):
        batches = list(loader.epoch_batches(train_set, run.loader, epoch))
        assert len(batches) == recordings // 3                              # 3 recordings + 1 window a batch
        for batch in batches:
            assert sum(index in set(scapes) for index, _, _ in batch) == 1
        drawn = [index for batch in batches for index, _, _ in batch]
        assert sorted(index for index in drawn if index not in set(scapes)) == sorted(
            set(index for index in drawn if index not in set(scapes)))     # no recording twice with sampler none
    table_audit, audit = train.audit_sampling(train_set, run.loader, tmp_path)
    assert audit["soundscape_windows"] == 8 and audit["soundscape_draws"] == recordings // 3
    assert audit["epoch_length"] == (recordings // 3) * 4
    assert table_audit.iloc[-1]["species"] == data.SOUNDSCAPE_WINDOW
    assert pd.read_csv(tmp_path / "sampling_audit.csv").iloc[-1]["recordings"] == 8


def test_windows_of_files_validation_scores_are_left_out(tiny_data, site, tmp_path, caplog):
    table = teacher_table(site, tmp_path / "teacher.csv")
    labels = tmp_path / "site_labels.csv"
    pd.DataFrame({"file": ["site_1.wav"], "start_s": [0.0], "end_s": [5.0], "labels": ["eeefff1"]}).to_csv(labels,
                                                                                                           index=False)
    run = quick_settings(tiny_data, tmp_path / "run", "--soundscape-labels", str(table), "--soundscape-audio",
                         str(site), "--val-soundscapes", str(labels), "--val-soundscape-audio", str(site))
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        _, train_set, _ = data.build_datasets(run.data, tmp_path)
    trained = {Path(path).name for path, is_scape in zip(train_set.paths, train_set.soundscape) if is_scape}
    assert trained == {"site_0.wav"} and "4 window(s) of 1 file(s) left out" in caplog.text


def test_a_teachers_quiet_windows_are_the_only_no_call_windows(tiny_data, site, tmp_path, caplog):
    table = teacher_table(site, tmp_path / "teacher.csv")
    run = quick_settings(tiny_data, tmp_path / "run", "--nocall", "--nocall-soundscapes", str(table),
                         "--soundscape-audio", str(site), "--nocall-max-score", "0.05")
    with caplog.at_level(logging.INFO, logger="birdclef"):
        _, train_set, _ = data.build_datasets(run.data, tmp_path)
    nocall = [(Path(path).name, start) for path, start, label in zip(train_set.paths, train_set.starts,
                                                                      train_set.primary_labels) if label == "nocall"]
    assert nocall == [("site_0.wav", 10.0), ("site_0.wav", 15.0), ("site_1.wav", 0.0), ("site_1.wav", 5.0),
                      ("site_1.wav", 15.0)]                               # the three rows with a call are out
    assert "5 of 8 (the teacher scores the other 3 at or above 0.05" in caplog.text
    folder = quick_settings(tiny_data, tmp_path / "run2", "--nocall", "--nocall-soundscapes", str(site))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        data.build_datasets(folder.data, tmp_path)
    assert "usually hold the target birds" in caplog.text


def test_training_with_soundscape_windows_is_deterministic_and_resumes_exactly_after_sigkill(tiny_data, site,
                                                                                             tmp_path):
    table = teacher_table(site, tmp_path / "teacher.csv")
    flags = ["--soundscape-labels", str(table), "--soundscape-audio", str(site), "--soundscape-share", "0.25",
             "--soundscape-weight", "confidence", "--soundscape-power", "2", "--keep-last", "5"]
    train.main(quick_args(tiny_data, tmp_path / "a", *flags))
    train.main(quick_args(tiny_data, tmp_path / "b", *flags))
    assert read_rows(tmp_path / "a" / "steps.csv") == read_rows(tmp_path / "b" / "steps.csv")
    drawn = pd.read_csv(tmp_path / "a" / "drawn_counts.csv")
    assert drawn.loc[drawn["species"] == data.SOUNDSCAPE_WINDOW, "draws"].tolist() == [4, 4]   # 4 steps x 1 an epoch
    # killed with SIGKILL after its first checkpoint, then resumed: the uninterrupted run's numbers
    command = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(tiny_data), "--out-dir",
               str(tmp_path / "killed"), "--resume", "auto", *QUICK_FLAGS, *flags]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not list((tmp_path / "killed").glob("checkpoint_*.pt")):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert list((tmp_path / "killed").glob("checkpoint_*.pt")), "killed before its first checkpoint"
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert read_rows(tmp_path / "killed" / "steps.csv") == read_rows(tmp_path / "a" / "steps.csv")
    assert read_rows(tmp_path / "killed" / "metrics.csv") == read_rows(tmp_path / "a" / "metrics.csv")


def test_the_windows_per_batch_and_the_share_flag_are_checked():
    assert sampling.soundscape_windows_per_batch(0.25, 16) == 4
    args = quick_args(Path("x"), Path("y"), "--soundscape-labels", "t.csv", "--soundscape-share", "0.01")
    with pytest.raises(ValueError, match="--soundscape-share 0.01 of --batch-size 4 is 0 window"):
        train.options.check_arguments(args)
