"""Tests for soundscapes.py: the 5-s row grid, window plans and their overlap weights, cutting windows.

References are worked out by hand and hand-built zero-padded arrays. (Label tables:
BirdCLEF 2021's in test_years.py, file,start_s,end_s,labels through infer.py --labels
in test_infer.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

import soundscapes


@pytest.mark.parametrize("seconds, expected", [(12.3, 3), (5.0, 1), (600.0, 120), (600.01, 120),
                                               (2.0, 1), (10.9, 2), (11.0, 3)])
def test_row_count(seconds, expected):
    sample_rate = 32000
    assert soundscapes.row_count(int(round(seconds * sample_rate)), sample_rate) == expected


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


def test_fixed_window_start_centres_a_longer_window_and_stays_inside():
    assert soundscapes.fixed_window_start(row_start=10.0, duration=60.0, window=5.0) == 10.0
    assert soundscapes.fixed_window_start(row_start=10.0, duration=60.0, window=7.0) == 9.0   # centred on the row
    assert soundscapes.fixed_window_start(row_start=0.0, duration=60.0, window=7.0) == 0.0    # not before the start
    assert soundscapes.fixed_window_start(row_start=55.0, duration=58.0, window=7.0) == 51.0  # not past the end


def test_cut_windows_pads_at_both_ends():
    waveform = np.arange(1, 21, dtype=np.float32)  # 20 samples at 2 Hz = 10 s
    windows = soundscapes.cut_windows(waveform, sample_rate=2, starts=np.array([-2.5, 2.5, 7.5]),
                                      window_seconds=10.0)
    assert windows.shape == (3, 20)
    np.testing.assert_array_equal(windows[0][:5], 0)
    np.testing.assert_array_equal(windows[0][5:], np.arange(1, 16))
    np.testing.assert_array_equal(windows[2][:5], np.arange(16, 21))
    np.testing.assert_array_equal(windows[2][5:], 0)


def test_batches_filled_across_files_equal_cut_windows():
    rng = np.random.default_rng(0)
    files = [rng.standard_normal(n).astype(np.float32) for n in (23, 7, 40)]   # at 2 Hz
    plans = [soundscapes.window_plan(soundscapes.row_count(len(w), 2), window_seconds=10.0, hop_seconds=2.5)[0]
             for w in files]
    expected = np.concatenate([soundscapes.cut_windows(w, sample_rate=2, starts=starts, window_seconds=10.0)
                               for w, starts in zip(files, plans)])
    sources = [(w, int(offset)) for w, starts in zip(files, plans) for offset in soundscapes.window_offsets(starts, 2)]
    batches = [soundscapes.fill_batch(sources[first:first + 4], window_samples=20)
               for first in range(0, len(sources), 4)]
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    # and against a hand-built zero-padded file: windows entirely before or after the audio are zeros
    padded = np.concatenate([np.zeros(30, np.float32), files[1], np.zeros(30, np.float32)])
    out = np.empty(20, np.float32)
    for offset in (-25, -20, -3, 0, 5, 7, 12):
        soundscapes.copy_window(files[1], offset, out)
        np.testing.assert_array_equal(out, padded[30 + offset:50 + offset])
