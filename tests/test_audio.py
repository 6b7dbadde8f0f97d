"""Tests for audio.py: reading windows of files, the resampler, crop starts, the header check.

Every audio file is written here with known content (FLOAT wav, so samples round
trip exactly); nothing is downloaded. References are hand-computed values,
torchaudio's own resampler and soundfile's headers.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import TINY_COUNTS, ramp, write_wav

import audio


# ----------------------------------------------------------------------------- read_window

def test_read_window_returns_exact_samples(tmp_path):
    rate = 32000
    samples = ramp(5 * rate)
    path = write_wav(tmp_path / "ramp.wav", samples, rate)
    window = audio.read_window(path, start_seconds=1.5, seconds=2.0, sample_rate=rate)
    assert window.dtype == np.float32
    assert window.shape == (2 * rate,)
    np.testing.assert_array_equal(window, samples[48000:48000 + 64000])


def test_read_window_past_the_end_zero_pads_to_exact_length(tmp_path):
    rate = 32000
    samples = ramp(3 * rate)
    path = write_wav(tmp_path / "ramp.wav", samples, rate)
    window = audio.read_window(path, start_seconds=2.5, seconds=2.0, sample_rate=rate)
    assert window.shape == (64000,)
    np.testing.assert_array_equal(window[:16000], samples[80000:])
    np.testing.assert_array_equal(window[16000:], np.zeros(48000, np.float32))
    # starting past the end: all zeros, still the exact length
    beyond = audio.read_window(path, start_seconds=10.0, seconds=2.0, sample_rate=rate)
    np.testing.assert_array_equal(beyond, np.zeros(64000, np.float32))


def test_read_window_averages_stereo_to_mono(tmp_path):
    rate = 32000
    stereo = np.stack([np.full(rate, 0.25, np.float32), np.full(rate, 0.75, np.float32)], axis=1)
    path = write_wav(tmp_path / "stereo.wav", stereo, rate)
    window = audio.read_window(path, start_seconds=0.0, seconds=0.5, sample_rate=rate)
    assert window.ndim == 1 and window.shape == (16000,)
    np.testing.assert_array_equal(window, np.full(16000, 0.5, np.float32))


def test_read_window_resamples_16k_to_32k_keeping_pitch(tmp_path):
    source = 16000
    t = np.arange(3 * source) / source
    path = write_wav(tmp_path / "sine.wav", np.sin(2 * np.pi * 440 * t).astype(np.float32), source)
    window = audio.read_window(path, start_seconds=0.5, seconds=2.0, sample_rate=32000)
    assert window.shape == (64000,)
    spectrum = np.abs(np.fft.rfft(window))
    peak_hz = np.argmax(spectrum) * 32000 / len(window)   # 0.5 Hz bins
    assert abs(peak_hz - 440.0) <= 0.5, peak_hz
    # away from the filter's edge transients the samples are the 32 kHz sine itself
    reference = np.sin(2 * np.pi * 440 * (0.5 + np.arange(64000) / 32000))
    np.testing.assert_allclose(window[1000:-1000], reference[1000:-1000], atol=5e-3)


def test_read_window_replaces_nan_and_inf_with_zero(tmp_path):
    rate = 32000
    samples = np.full(rate, 0.125, np.float32)
    samples[[10, 500, 20000]] = np.nan
    samples[[7, 30000]] = [np.inf, -np.inf]
    path = write_wav(tmp_path / "nan.wav", samples, rate)
    assert np.isnan(sf.read(path, dtype="float32")[0]).sum() == 3  # the file really holds NaN
    window = audio.read_window(path, start_seconds=0.0, seconds=1.0, sample_rate=rate)
    expected = np.full(rate, 0.125, np.float32)
    expected[[10, 500, 20000, 7, 30000]] = 0.0
    np.testing.assert_array_equal(window, expected)


# ----------------------------------------------------------------------------- Resampler

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


# ----------------------------------------------------------------------------- choose_crop_start

@pytest.mark.parametrize("policy", audio.CROP_POLICIES)
def test_crop_start_without_rng_is_zero(policy):
    assert audio.choose_crop_start(duration=60.0, window=5.0, policy=policy, ends_seconds=8.0, rng=None) == 0.0


@pytest.mark.parametrize("policy", audio.CROP_POLICIES)
@pytest.mark.parametrize("duration", [1.0, 4.99, 5.0])
def test_crop_start_short_recording_is_zero(policy, duration):
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert audio.choose_crop_start(duration, window=5.0, policy=policy, ends_seconds=8.0, rng=rng) == 0.0


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
    starts = np.array([audio.choose_crop_start(duration, window, "random", ends_seconds=8.0, rng=rng)
                       for _ in range(2000)])
    assert starts.min() >= 0.0 and starts.max() <= duration - window
    assert starts.min() < 0.1 and starts.max() > duration - window - 0.1
    # roughly uniform: every 1.5 s bin of [0, 15] is visited
    counts, _ = np.histogram(starts, bins=10, range=(0.0, duration - window))
    assert counts.min() > 100, counts


def test_crop_start_unknown_policy_raises():
    with pytest.raises(ValueError, match="middle"):
        audio.choose_crop_start(duration=60.0, window=5.0, policy="middle", ends_seconds=8.0,
                                rng=np.random.default_rng(0))


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
    paths = audio.audio_files(tiny_data / "train_audio")
    assert len(paths) == sum(TINY_COUNTS)
    headers, bad = audio.check_audio_files(paths)
    assert bad == []
    for path, (frames, rate) in zip(paths, headers):
        info = sf.info(path)
        assert (frames, rate) == (info.frames, info.samplerate)
        assert rate in (22050, 32000, 44100) and 3.0 * rate - 1 <= frames <= 12.0 * rate


# ----------------------------------------------------------------------------- distance and rooms

def test_lowpass_is_3_db_down_at_the_cutoff_and_24_db_per_octave_above():
    rate, samples = 16000, 16000
    t = np.arange(samples) / rate
    tones = torch.from_numpy(np.stack([np.sin(2 * np.pi * f * t) for f in (250, 1000, 2000, 4000)]).astype(np.float32))
    out = audio.lowpass(tones, [1000.0] * 4, rate)
    gain_db = (10 * torch.log10((out.double() ** 2).mean(dim=1) / (tones.double() ** 2).mean(dim=1))).numpy()
    # 1 / sqrt(1 + (f / fc) ** 8): 0 dB well below, -3 dB at the cutoff, ~-24 dB an octave up, ~-48 two
    np.testing.assert_allclose(gain_db, [0.0, -3.01, -24.1, -48.2], atol=0.1)


def test_room_impulse_response_decays_60_db_in_rt60_with_as_much_energy_as_the_direct_path():
    generator = torch.Generator().manual_seed(0)
    response = audio.room_impulse_response(0.5, 16000, generator).double().numpy()
    assert response[0] == 1.0 and len(response) == 8000
    tail = response[1:]
    assert (tail ** 2).sum() == pytest.approx(1.0, rel=1e-5)                 # float32 rounding
    # energy in the first and the last 50 ms of the tail: 60 dB per 0.5 s -> ~(0.5 - 0.05) / 0.5 * 60 dB apart
    early, late = (tail[:800] ** 2).mean(), (tail[-800:] ** 2).mean()
    assert 10 * np.log10(early / late) == pytest.approx(54.0, abs=4.0)


def test_reverberate_is_a_convolution_kept_at_the_input_power():
    rate = 16000
    signal = torch.zeros(1, 4000)
    signal[0, 100] = 1.0                                     # an impulse: the output is the response itself
    out = audio.reverberate(signal, [0.1], rate, torch.Generator().manual_seed(7))
    response = audio.room_impulse_response(0.1, rate, torch.Generator().manual_seed(7))
    expected = np.zeros(4000)
    expected[100:100 + len(response)] = response.numpy()
    expected *= np.sqrt((signal.numpy() ** 2).mean() / (expected ** 2).mean())
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
