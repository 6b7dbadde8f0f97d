"""Synthetic sounds of the demo data set: ten species' calls, unknown birds, two kinds of site,
rooms and distance, and a reproducible OGG writer.

Only numpy, soundfile and the standard library; every random choice comes from the
numpy generator passed in, so a seed gives identical audio samples.
"""
from __future__ import annotations

import io
import math
import pathlib
import zlib

import numpy as np
import soundfile as sf

HOP_S = 0.01  # 10 ms frames for "actual call sound" bookkeeping


def _ramp(n, sr, attack_s, release_s):
    """Raised-cosine attack/release envelope (never shorter than 5 ms: no clicks)."""
    env = np.ones(n)
    for length, sl in ((attack_s, slice(None)), (release_s, slice(None, None, -1))):
        m = min(n // 2, max(int(round(max(length, 0.005) * sr)), 1))
        env[sl][:m] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / m)
    return env


def _osc(freq, sr, phase0=0.0):
    """Sine with instantaneous frequency ``freq`` (array, Hz)."""
    return np.sin(phase0 + 2 * np.pi * np.cumsum(freq) / sr)


def _bandnoise(rng, n, sr, lo, hi):
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (x.std() + 1e-12)


def _silence(sr, s):
    return np.zeros(int(round(s * sr)))


def _time_axis(dur, sr):
    """(times (n,), n) of a note of `dur` seconds, at least 16 samples."""
    n = max(int(round(dur * sr)), 16)
    return np.arange(n) / sr, n


def _rise(rng, sr, p, d, ph):  # exponential rising sweep 2.2 -> 5.2 kHz
    dur = 0.45 * d
    t, n = _time_axis(dur, sr)
    u = t / dur
    f = 2200 * p * (5200 / 2200) ** (u ** rng.uniform(0.8, 1.2))
    x = _osc(f, sr, ph)
    x += 0.12 * _osc(2 * f, sr)  # weak 2nd harmonic (folds nowhere: <11 kHz)
    return x * _ramp(n, sr, 0.03, 0.06)


def _fall(rng, sr, p, d, ph):  # fast-then-slow falling sweep 6.5 -> 3.2 kHz
    dur = 0.35 * d
    t, n = _time_axis(dur, sr)
    u = t / dur
    f = p * (3200 + 3300 * (1 - u) ** 2)
    return _osc(f, sr, ph) * _ramp(n, sr, 0.01, 0.05)


def _trill(rng, sr, p, d, ph):  # tone ~4.2 kHz, rapid AM pulses (~22 Hz)
    dur = 1.0 * d
    t, n = _time_axis(dur, sr)
    f = 4200 * p * (1 + 0.04 * t / dur)
    rate = 22 * rng.uniform(0.9, 1.1)
    am = (0.5 - 0.5 * np.cos(2 * np.pi * rate * t)) ** 2
    return _osc(f, sr, ph) * am * _ramp(n, sr, 0.02, 0.05)


def _twonote(rng, sr, p, d, ph):  # two-note whistle, high then low
    parts = []
    for f0, dur in ((3400, 0.18), (2700, 0.24)):
        t, n = _time_axis(dur * d, sr)
        f = f0 * p * (1 - 0.03 * t / (dur * d))
        parts.append(_osc(f, sr, ph) * _ramp(n, sr, 0.015, 0.03))
        parts.append(_silence(sr, 0.07 * d))
    return np.concatenate(parts[:-1])


def _stack(rng, sr, p, d, ph):  # nasal harmonic stack, f0 ~850 Hz with chevron contour
    dur = 0.3 * d
    t, n = _time_axis(dur, sr)
    f0 = 850 * p * (1 + 0.08 * np.sin(np.pi * t / dur))
    x = sum(a * _osc(k * f0, sr, k * ph) for k, a in
            zip(range(1, 6), (1.0, 0.8, 0.6, 0.4, 0.25)))
    return x * _ramp(n, sr, 0.02, 0.04)


def _buzz(rng, sr, p, d, ph):  # buzzy noise band ~6.3-8.8 kHz, 90 Hz buzz modulation
    dur = 0.6 * d
    t, n = _time_axis(dur, sr)
    x = _bandnoise(rng, n, sr, 6250 * p, 8750 * p)
    am = 0.5 + 0.5 * np.sin(2 * np.pi * 90 * rng.uniform(0.9, 1.1) * t)
    return x * am * _ramp(n, sr, 0.03, 0.05)


def _click(rng, sr, p, d, ph):  # click train: ~14 clicks/s of damped 5.5 kHz ringing + hiss
    nclick = int(rng.integers(8, 13))
    period = d / 14.0
    L = int(round((nclick * period + 0.01) * sr))
    x = np.zeros(L)
    tl = np.arange(int(0.006 * sr)) / sr
    for i in range(nclick):
        tau = 0.0007 * rng.uniform(0.8, 1.2)
        click = np.sin(2 * np.pi * 5500 * p * tl) * np.exp(-tl / tau)
        click += 0.3 * rng.standard_normal(len(tl)) * np.exp(-tl / (tau * 0.7))
        s = int(round((i * period + rng.uniform(0, 0.004)) * sr))
        x[s:s + len(tl)] += click * rng.uniform(0.7, 1.0)
    return x * _ramp(L, sr, 0.005, 0.005)


def _warble(rng, sr, p, d, ph):  # sinusoidal FM warble, carrier 2.6 kHz, +-700 Hz at ~9 Hz
    dur = 0.8 * d
    t, n = _time_axis(dur, sr)
    f = p * (2600 + 700 * np.sin(2 * np.pi * 9 * rng.uniform(0.9, 1.1) * t + ph))
    return _osc(f, sr) * _ramp(n, sr, 0.03, 0.06)


def _series(rng, sr, p, d, ph):  # descending cascade of short notes 10 -> ~6 kHz
    nnote = int(rng.integers(5, 8))
    parts = []
    for i in range(nnote):
        t, n = _time_axis(0.05 * d, sr)
        f = 10000 * p * 0.9 ** i * (1 - 0.05 * t / (0.05 * d))
        parts.append(_osc(f, sr) * _ramp(n, sr, 0.008, 0.012))
        parts.append(_silence(sr, 0.06 * d))
    return np.concatenate(parts[:-1])


def _hoot(rng, sr, p, d, ph):  # 2-3 low hoots ~560 Hz with weak 2nd harmonic
    nh = int(rng.integers(2, 4))
    parts = []
    for i in range(nh):
        t, n = _time_axis(0.35 * d, sr)
        f = 560 * p * 0.93 ** min(i, 1) * (1 - 0.04 * t / (0.35 * d))
        x = _osc(f, sr) + 0.25 * _osc(2 * f, sr)
        parts.append(x * _ramp(n, sr, 0.04, 0.08))
        parts.append(_silence(sr, 0.25 * d))
    return np.concatenate(parts[:-1])


_CALLS = {"rise": _rise, "fall": _fall, "trill": _trill, "twonote": _twonote, "stack": _stack,
          "buzz": _buzz, "click": _click, "warble": _warble, "series": _series, "hoot": _hoot}


def synth_call(kind, rng, sr):
    """One call of species ``kind`` at sample rate ``sr`` (float64, un-normalised).

    Per-call variation: pitch x U(0.95, 1.05), duration x U(0.85, 1.15) plus small
    kind-specific jitter.  Every note has a raised-cosine fade in/out.
    """
    if kind not in _CALLS:
        raise ValueError(kind)
    p = rng.uniform(0.95, 1.05)
    d = rng.uniform(0.85, 1.15)
    ph = rng.uniform(0, 2 * np.pi)
    return _CALLS[kind](rng, sr, p, d, ph)


def sound_frames(x, sr):
    """Boolean mask per 10-ms frame: where the call actually sounds.

    Frames within 20 dB of the loudest frame, with gaps < 80 ms closed (so a
    click train or a note cascade counts as one continuous call).
    """
    hop = int(round(sr * HOP_S))
    nf = -(-len(x) // hop)
    xp = np.zeros(nf * hop)
    xp[:len(x)] = x
    rms = np.sqrt((xp.reshape(nf, hop) ** 2).mean(1))
    m = rms > 0.1 * rms.max()
    k = 8  # closing: dilate by k frames then erode by k frames
    pad = np.concatenate([np.zeros(k), m, np.zeros(k)])
    dil = np.convolve(pad, np.ones(2 * k + 1), "same") > 0.5
    ero = np.convolve((~dil).astype(float), np.ones(2 * k + 1), "same") < 0.5
    return ero[k:-k] | m


def make_call(kind, rng, sr):
    """Call normalised to unit RMS over its sounding frames; returns (x, frame mask)."""
    return _normalise_call(synth_call(kind, rng, sr), sr)


def _normalise_call(x, sr):
    hop = int(round(sr * HOP_S))
    nf = -(-len(x) // hop)
    x = np.concatenate([x, np.zeros(nf * hop - len(x))])  # whole frames
    m = sound_frames(x, sr)
    act = x.reshape(nf, hop)[m]
    return x / (np.sqrt((act ** 2).mean()) + 1e-12), m


# ----------------------------------------------------------------------------
# backgrounds
# ----------------------------------------------------------------------------
def _colored_noise(rng, n, sr, alpha, fmin=40.0):
    """Unit-variance noise with power ~ 1/f**alpha (1 pink, 2 brown), high-passed at fmin."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    f[0] = 1.0
    g = (f / 1000.0) ** (-alpha / 2) / (1 + (fmin / f) ** 4)
    x = np.fft.irfft(spec * g, n)
    return x / (x.std() + 1e-12)


def _slow_env(rng, n, sr, rate_hz, depth):
    """Smooth random positive envelope (gusts): interpolated random knots."""
    knots = max(int(n / sr * rate_hz) + 2, 3)
    v = rng.uniform(0, 1, knots) ** 2
    xi = np.linspace(0, knots - 1, n)
    e = np.interp(xi, np.arange(knots), v)
    return (1 - depth) + depth * e / (v.max() + 1e-9)


def make_background(rng, n, sr, wind_prob=0.3, insect_prob=0.12):
    """Pink/brown noise (+ wind rumble, + insect chorus). Returns unit-ish float64."""
    bg = _colored_noise(rng, n, sr, rng.uniform(0.8, 2.0))
    bg *= _slow_env(rng, n, sr, 0.2, rng.uniform(0.0, 0.4))  # slow level drift
    if rng.random() < wind_prob:  # low-frequency rumble in gusts
        rumble = _colored_noise(rng, n, sr, 2.0, fmin=15.0)
        spec = np.fft.rfft(rumble)
        f = np.fft.rfftfreq(n, 1.0 / sr)
        spec /= 1 + (f / rng.uniform(120, 300)) ** 4
        rumble = np.fft.irfft(spec, n)
        rumble /= rumble.std() + 1e-12
        bg += rumble * _slow_env(rng, n, sr, rng.uniform(0.2, 0.6), 0.9) * \
            10 ** (rng.uniform(0, 15) / 20)
    if rng.random() < insect_prob:  # steady stridulating insect, one long stretch
        L = int(min(n, rng.uniform(3, 20) * sr))
        s = int(rng.integers(0, n - L + 1))
        t = np.arange(L) / sr
        fc = rng.uniform(3000, 9000)
        am = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(35, 60) * t)) ** 3
        ins = np.sin(2 * np.pi * fc * t) * am * _ramp(L, sr, 0.5, 0.5)
        bg[s:s + L] += ins * 10 ** (rng.uniform(-12, -2) / 20)
    return bg


def _lowpass_noise(x, sr, cutoff):
    """x with a 4th-order low-pass magnitude response above `cutoff` Hz (FFT, zero phase)."""
    f = np.fft.rfftfreq(len(x), 1.0 / sr)
    return np.fft.irfft(np.fft.rfft(x) / np.sqrt(1 + (f / cutoff) ** 8), len(x))


def make_site_background(rng, n, sr):
    """The test site's sound, unlike the training recordings' pink/brown noise: a stream
    (brown noise below ~2 kHz), rain (random drops: 3-ms noise bursts at 2-9 kHz), a steady
    insect chorus (amplitude-modulated tones at 4-8 kHz) and a faint mains hum. Unit RMS."""
    t = np.arange(n) / sr
    stream = _lowpass_noise(_colored_noise(rng, n, sr, 2.0, fmin=150.0), sr, rng.uniform(1200, 2500))
    stream /= stream.std() + 1e-12
    drops = np.zeros(n)
    n_drops = int(rng.uniform(20, 120) * n / sr)
    drops[rng.integers(0, n, size=n_drops)] = rng.uniform(0.2, 1.0, size=n_drops)
    burst = _bandnoise(rng, int(0.003 * sr), sr, 2000, 9000) * np.exp(-np.arange(int(0.003 * sr)) / (0.0008 * sr))
    size = 1 << (n + len(burst)).bit_length()
    rain = np.fft.irfft(np.fft.rfft(drops, size) * np.fft.rfft(burst, size), size)[:n]
    rain /= rain.std() + 1e-12
    insects = np.zeros(n)
    for _ in range(int(rng.integers(1, 3))):
        am = (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(20, 60) * t)) ** 2
        insects += np.sin(2 * np.pi * rng.uniform(4000, 8000) * t) * am * _slow_env(rng, n, sr, 0.1, 0.5)
    insects /= insects.std() + 1e-12
    hum = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3))
    bg = (stream + 10 ** (rng.uniform(-6, 6) / 20) * rain + 10 ** (rng.uniform(-12, 0) / 20) * insects
          + 10 ** (rng.uniform(-24, -12) / 20) * hum)
    return bg / (bg.std() + 1e-12)


def _chirp(rng, sr, p, d, ph):  # 3-6 quick up-sweeps 2.8 -> 4.4 kHz
    parts = []
    for _ in range(int(rng.integers(3, 7))):
        t, n = _time_axis(0.07 * d, sr)
        f = p * (2800 + 1600 * t / (0.07 * d))
        parts.append(_osc(f, sr, ph) * _ramp(n, sr, 0.005, 0.01))
        parts.append(_silence(sr, 0.05 * d))
    return np.concatenate(parts[:-1])


def _coo(rng, sr, p, d, ph):  # two low coos, 420 then 360 Hz
    parts = []
    for f0 in (420, 360):
        t, n = _time_axis(0.4 * d, sr)
        parts.append((_osc(f0 * p * np.ones(n), sr, ph) + 0.3 * _osc(2 * f0 * p * np.ones(n), sr)) *
                     _ramp(n, sr, 0.05, 0.1))
        parts.append(_silence(sr, 0.15 * d))
    return np.concatenate(parts[:-1])


def _seesaw(rng, sr, p, d, ph):  # alternating 6.2 / 5.0 kHz notes
    parts = []
    for i in range(int(rng.integers(4, 9))):
        t, n = _time_axis(0.09 * d, sr)
        parts.append(_osc((6200 if i % 2 == 0 else 5000) * p * np.ones(n), sr, ph) * _ramp(n, sr, 0.01, 0.02))
        parts.append(_silence(sr, 0.04 * d))
    return np.concatenate(parts[:-1])


UNKNOWN_CALLS = {"chirp": _chirp, "coo": _coo, "seesaw": _seesaw}   # birds of the site outside the vocabulary


def make_unknown_call(rng, sr):
    """A call of a bird the vocabulary does not have, normalised like make_call -> (x, frame mask)."""
    kind = str(rng.choice(sorted(UNKNOWN_CALLS)))
    p, d, ph = rng.uniform(0.95, 1.05), rng.uniform(0.85, 1.15), rng.uniform(0, 2 * np.pi)
    return _normalise_call(UNKNOWN_CALLS[kind](rng, sr, p, d, ph), sr)


def reverberate(x, rng, sr, rt60):
    """x in a room: convolved with a direct path plus exponentially decaying noise (60 dB in rt60 s)
    carrying as much energy as the direct path; the tail is kept (len(x) + rt60 * sr samples)."""
    n_ir = max(int(rt60 * sr), 2)
    tail = rng.standard_normal(n_ir) * np.exp(-math.log(1000.0) * np.arange(n_ir) / sr / rt60)
    tail[0] = 0.0
    response = tail / (np.sqrt((tail ** 2).sum()) + 1e-12)
    response[0] = 1.0
    size = 1 << (len(x) + n_ir).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(response, size), size)[:len(x) + n_ir - 1]


def far_away(x, sr, cutoff_hz, gain_db):
    """x heard from a distance: low-passed at cutoff_hz and `gain_db` quieter."""
    return _lowpass_noise(x, sr, cutoff_hz) * 10 ** (gain_db / 20)


def band_rms(x, sr):
    """Function (lo, hi) -> RMS of x within that frequency band."""
    n = len(x)
    p = np.abs(np.fft.rfft(x)) ** 2 * 2 / n ** 2
    c = np.concatenate([[0.0], np.cumsum(p)])
    f = np.fft.rfftfreq(n, 1.0 / sr)

    def band(lo, hi):
        i0, i1 = np.searchsorted(f, lo), np.searchsorted(f, hi)
        return math.sqrt(max(c[i1] - c[i0], 1e-20))
    return band


# ----------------------------------------------------------------------------
# Ogg serial number fix-up (libsndfile picks a random one -> non-reproducible bytes)
# ----------------------------------------------------------------------------
_BITREV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _ogg_crc(data):
    """Ogg page CRC (poly 0x04c11db7, MSB-first, init 0) via zlib's reflected CRC-32."""
    r = zlib.crc32(data.translate(_BITREV), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{r:032b}"[::-1], 2)


def _ogg_set_serial(buf, serial):
    b = bytearray(buf)
    pos = 0
    while pos < len(b):
        if b[pos:pos + 4] != b"OggS" or pos + 27 > len(b):
            return bytes(buf)  # unexpected structure: leave untouched
        nseg = b[pos + 26]
        end = pos + 27 + nseg + sum(b[pos + 27:pos + 27 + nseg])
        b[pos + 14:pos + 18] = serial.to_bytes(4, "little")
        b[pos + 22:pos + 26] = b"\0\0\0\0"
        b[pos + 22:pos + 26] = _ogg_crc(bytes(b[pos:end])).to_bytes(4, "little")
        pos = end
    return bytes(b)


def write_ogg(path, audio, sr, serial):
    """OGG Vorbis via soundfile (block-wise), with a deterministic stream serial number."""
    buf = io.BytesIO()
    # Write in blocks: one big write makes libvorbis alloca() a buffer the size of
    # the whole signal and segfaults (stack overflow) on long files
    # (libsndfile#1095, python-soundfile#233/#396).
    with sf.SoundFile(buf, "w", sr, 1 if audio.ndim == 1 else audio.shape[1],
                      format="OGG", subtype="VORBIS") as f:
        for i in range(0, len(audio), 16384):
            f.write(audio[i:i + 16384])
    data = _ogg_set_serial(buf.getvalue(), serial & 0xFFFFFFFF)
    pathlib.Path(path).write_bytes(data)
    return len(data)


