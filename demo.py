"""The built-in synthetic demo data set: `python data.py demo --out DIR`.

A separate module because synthesising audio is a different job from reading
it (data.py). ``write_demo_dataset(out_dir)`` writes, in the exact BirdCLEF 2023 Kaggle layout::

    out_dir/train_metadata.csv
    out_dir/train_audio/<label>/XC<id>.ogg
    out_dir/sample_submission.csv
    out_dir/test_soundscapes/soundscape_<n>.ogg
    out_dir/test_soundscapes_labels.csv     (file,start_s,end_s,labels; not in Kaggle)
    out_dir/README.txt

Ten invented species, each with a parametric synthetic call (sweeps, trill,
whistle, harmonic stack, buzz, click train, warble, note cascade, hoot) with
per-call random variation, mixed at 0-20 dB in-band SNR into pink/brown
background noise with occasional wind rumble and insect chorus.  Everything is
drawn from ``numpy.random.default_rng`` streams derived from ``seed``, so a
seed gives byte-identical CSVs and identical audio samples; the OGG files are
also byte-identical because the (otherwise random) Ogg stream serial number
that libsndfile writes is replaced by a seed-derived one.

Only numpy, pandas, soundfile and the standard library are used. OGG files are
written in blocks: libsndfile's Vorbis encoder crashes on one very large write.
"""
from __future__ import annotations

import io
import math
import pathlib
import time
import zlib

import numpy as np
import pandas as pd
import soundfile as sf

# ----------------------------------------------------------------------------
# species
# ----------------------------------------------------------------------------
# code, common name, scientific name, call kind, (band lo, band hi) in Hz
# (the band is where the call's energy lies; it is used for in-band SNR)
DEMO_SPECIES = [
    ("ascwhi1", "Ascending Whistler", "Sibilornis ascendens", "rise", (2000, 5800)),
    ("despip1", "Descending Piper", "Fistulator descendens", "fall", (2900, 7100)),
    ("triwar1", "Trilling Warbler", "Trillophila vibrans", "trill", (3800, 4700)),
    ("whitit1", "Whistling Tit", "Parulus duotonus", "twonote", (2400, 3800)),
    ("nashon1", "Nasal Honeyeater", "Melinasus harmonicus", "stack", (700, 4700)),
    ("buzcis1", "Buzzing Cisticola", "Cisticola stridens", "buzz", (5700, 9400)),
    ("cliwre1", "Clicking Wren", "Crepitornis clangens", "click", (2500, 11000)),
    ("wavbul1", "Wavering Bulbul", "Pycnonotus undulans", "warble", (1700, 3700)),
    ("casbab1", "Cascade Babbler", "Turdoides cascadens", "series", (5200, 11000)),
    ("hooowl1", "Hooting Owlet", "Glaucidium ululans", "hoot", (430, 1300)),
]
DEMO_COUNTS = [40, 26, 18, 13, 10, 8, 6, 4, 3, 2]  # recordings per species (long tail)

METADATA_COLUMNS = ["primary_label", "secondary_labels", "type", "latitude", "longitude",
                    "scientific_name", "common_name", "author", "license", "rating", "url",
                    "filename"]
LICENSE = "Creative Commons Attribution-NonCommercial-ShareAlike 4.0"
_FIRST = ["Amina", "Peter", "Grace", "Joseph", "Wanjiru", "Lars", "Sofia", "Daniel", "Mercy",
          "Hugo", "Ingrid", "Samuel", "Fatuma", "Marco", "Eleanor", "Brian", "Nadia", "Tomas"]
_LAST = ["Otieno", "Kamau", "Lindqvist", "Moreau", "Achieng", "Fischer", "Mwangi", "Brooks",
         "Haddad", "Njoroge", "Rossi", "Okafor", "Svensson", "Wekesa", "Dubois", "Keller"]
_TYPES = [["call"], ["song"], ["call"], ["song"], ["call", "song"], ["flight call"],
          ["alarm call"], ["call", "male"], ["song", "male"], ["call"]]

TRAIN_SR_CHOICES = (32000, 44100, 48000)
SOUNDSCAPE_SR = 32000
HOP_S = 0.01  # 10 ms frames for "actual call sound" bookkeeping


# ----------------------------------------------------------------------------
# small DSP helpers
# ----------------------------------------------------------------------------
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
    x = synth_call(kind, rng, sr)
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


def _band_rms(x, sr):
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


# ----------------------------------------------------------------------------
# planning (cheap, no audio): everything that goes into the CSVs
# ----------------------------------------------------------------------------
def _pick(rng, n, frac):
    k = int(round(n * frac))
    return set(rng.choice(n, size=k, replace=False).tolist())


def plan_demo(seed=0, soundscape_minutes=(1.0, 2.0), median_seconds=10.0):
    """Deterministic plan of the data set: recordings (metadata + audio params), soundscapes.

    Recording lengths are log-normal around `median_seconds` (10 s: the small demo;
    ~40 s is closer to real xeno-canto recordings, for loader benchmarks)."""
    rng = np.random.default_rng([seed, 0])
    codes = [s[0] for s in DEMO_SPECIES]
    nsp = len(codes)
    order = rng.permutation(nsp)  # which species gets which count
    counts = {codes[order[i]]: DEMO_COUNTS[i] for i in range(nsp)}
    centers = {c: (rng.uniform(-4.5, 4.0), rng.uniform(33.5, 41.0)) for c in codes}
    labels = [c for c in codes for _ in range(counts[c])]
    n = len(labels)
    xc_ids = np.sort(rng.choice(np.arange(100000, 800000), size=n, replace=False))
    hi_sr = sorted(_pick(rng, n, 0.20))
    stereo = _pick(rng, n, 0.05)
    violate = _pick(rng, n, 0.15)
    second = _pick(rng, n, 0.15)
    recs = []
    for i, lab in enumerate(labels):
        dur = float(np.clip(round(math.exp(rng.normal(math.log(median_seconds), 0.85)), 2), 3.0, 6 * median_seconds))
        sr = int(rng.choice([44100, 48000])) if i in hi_sr else 32000
        sec, listed = None, False
        if i in second:
            sec = str(rng.choice([c for c in codes if c != lab]))
            listed = bool(rng.random() < 0.8)
        lat = round(float(centers[lab][0] + rng.normal(0, 1.2)), 4)
        lon = round(float(centers[lab][1] + rng.normal(0, 1.2)), 4)
        rating = float(rng.choice(np.arange(0, 5.5, 0.5),
                                  p=np.array([2, .3, .5, .7, 1, 2, 3, 5, 6, 5, 4.5]) / 30))
        recs.append(dict(
            primary_label=lab, xc=int(xc_ids[i]), sr=sr, channels=2 if i in stereo else 1,
            n_samples=int(round(dur * sr)), violate=i in violate, secondary=sec,
            secondary_listed=listed, lat=lat, lon=lon, rating=rating,
            type=_TYPES[int(rng.integers(len(_TYPES)))],
            author=f"{_FIRST[int(rng.integers(len(_FIRST)))]} "
                   f"{_LAST[int(rng.integers(len(_LAST)))]}",
            seed=[seed, 1, i]))
    recs.sort(key=lambda r: (r["primary_label"], r["xc"]))
    lo_w = max(int(math.ceil(soundscape_minutes[0] * 12)), 1)
    hi_w = max(int(math.floor(soundscape_minutes[1] * 12)), lo_w)
    scapes = [dict(name=f"soundscape_{k + 1}", n_windows=int(rng.integers(lo_w, hi_w + 1)),
                   seed=[seed, 2, k]) for k in range(3)]
    return dict(species=codes, recordings=recs, soundscapes=scapes)


# ----------------------------------------------------------------------------
# audio synthesis
# ----------------------------------------------------------------------------
_KIND = {s[0]: s[3] for s in DEMO_SPECIES}
_BAND = {s[0]: s[4] for s in DEMO_SPECIES}


def _bouts(rng, kind, sr, t0, t_end, coverage):
    """Calls in bouts (1-5 calls, short gaps) separated by long gaps so that calls
    sound for ~coverage of the time.  Returns [(onset_sample, x, mask)]."""
    out = []
    t = t0
    while True:
        k = int(rng.integers(1, 6))
        bout_start, sound = t, 0.0
        for _ in range(k):
            x, m = make_call(kind, rng, sr)
            if t + len(x) / sr > t_end:
                return out
            out.append((int(round(t * sr)), x, m))
            sound += m.sum() * HOP_S
            t += len(x) / sr + rng.uniform(0.1, 0.6)
        t = max(t, bout_start + sound / coverage * rng.uniform(0.6, 1.4))


def _overlaps(calls, s, e):
    return any(c[0] < e and c[0] + len(c[1]) > s for c in calls)


def _ensure_call_in(rng, calls, kind, sr, n, lo, hi):
    """Make sure one call lies entirely within samples [lo, hi)."""
    if any(c[0] >= lo and c[0] + len(c[1]) <= hi for c in calls):
        return
    x, m = make_call(kind, rng, sr)
    hop = int(round(sr * HOP_S))
    if hi - lo < hop:
        return
    if len(x) > hi - lo:  # (never for >= 3 s recordings) truncate to fit
        keep = (hi - lo) // hop
        x, m = x[:keep * hop], m[:keep]
    room = hi - lo - len(x)
    s = lo
    for _ in range(20):
        s = lo + int(rng.integers(0, room + 1))
        if not _overlaps(calls, s, s + len(x)):
            break
    calls.append((s, x, m))


def synth_recording(rec):
    """Audio of one training recording (float32, (n,) or (n, 2)) and stats."""
    rng = np.random.default_rng(rec["seed"])
    sr, n, lab = rec["sr"], rec["n_samples"], rec["primary_label"]
    D = n / sr
    kind = _KIND[lab]
    bg = make_background(rng, n, sr)
    band = _band_rms(bg, sr)
    snr = rng.uniform(0, 20)
    start = rng.uniform(0, 6) if D > 20 else rng.uniform(0.05, 0.8)
    calls = _bouts(rng, kind, sr, start, D, rng.uniform(0.08, 0.30))
    w = int(round(8 * sr))
    if rec["violate"] and D >= 12:  # label noise: no primary call in first/last 8 s
        mode = str(rng.choice(["first", "last", "both"] if D >= 18 else ["first", "last"]))
        calls = [c for c in calls
                 if not ((mode != "last" and c[0] < w) or
                         (mode != "first" and c[0] + len(c[1]) > n - w))]
        # the primary still calls outside the emptied window(s)
        lo, hi = (w if mode != "last" else 0), (n - w if mode != "first" else n)
        if mode == "first":
            lo = max(w, n - w)
        elif mode == "last":
            hi = min(w, n - w)
        _ensure_call_in(rng, calls, kind, sr, n, lo, hi)
    else:
        _ensure_call_in(rng, calls, kind, sr, n, 0, min(w, n))
        _ensure_call_in(rng, calls, kind, sr, n, max(n - w, 0), n)
        if rec["violate"]:  # short recording: the label noise is a faint primary
            snr = rng.uniform(-8, -2)
    mix = bg.copy()
    lo, hi = _BAND[lab]
    sound = np.zeros(-(-n // int(round(sr * HOP_S))), bool)
    for s, x, m in calls:
        g = band(lo, hi) * 10 ** ((snr + rng.uniform(-3, 3)) / 20)
        L = min(len(x), n - s)
        mix[s:s + L] += g * x[:L]
        f0 = s // int(round(sr * HOP_S))
        sound[f0:f0 + len(m)][:len(sound) - f0] |= m[:len(sound) - f0]
    if rec["secondary"]:
        k2 = _KIND[rec["secondary"]]
        c2 = _bouts(rng, k2, sr, rng.uniform(0, max(D - 2, 0.1)), D, rng.uniform(0.04, 0.15))
        if not c2:
            _ensure_call_in(rng, c2, k2, sr, n, 0, n)
        lo2, hi2 = _BAND[rec["secondary"]]
        snr2 = snr - rng.uniform(6, 12)
        for s, x, _ in c2:
            L = min(len(x), n - s)
            mix[s:s + L] += band(lo2, hi2) * 10 ** ((snr2 + rng.uniform(-3, 3)) / 20) * x[:L]
    if rec["channels"] == 2:
        other = make_background(rng, n, sr, wind_prob=0.0, insect_prob=0.0)
        mix = np.stack([mix, rng.uniform(0.6, 1.0) * mix + 0.3 * other], axis=1)
    # peak-normalise to a random level <= 0.8 (Vorbis overshoots peaks by a few %, so the
    # decoded files stay below 0.9)
    mix *= rng.uniform(0.3, 0.8) / (np.abs(mix).max() + 1e-12)
    return mix.astype(np.float32), dict(coverage=float(sound.mean()), ncalls=len(calls))


def synth_soundscape(sc, species):
    """32 kHz mono soundscape and its per-5-s-window labels."""
    rng = np.random.default_rng(sc["seed"])
    sr = SOUNDSCAPE_SR
    hop = int(round(sr * HOP_S))
    nw = sc["n_windows"]
    n = nw * 5 * sr
    bg = make_background(rng, n, sr, wind_prob=0.7, insect_prob=0.5)
    band = _band_rms(bg, sr)
    mix = bg.copy()
    sound = {c: np.zeros(n // hop, bool) for c in species}
    # active windows: 2-state Markov chain (stationary ~50 %)
    active, state = [], rng.random() < 0.5
    for _ in range(nw):
        active.append(state)
        state = rng.random() < (0.6 if state else 0.4)
    # nudge towards ~50 % active: grow/shrink runs at their edges
    k_lo, k_hi = math.floor(0.45 * nw), math.ceil(0.55 * nw)
    while not k_lo <= sum(active) <= k_hi:
        grow = sum(active) < k_lo
        cand = [i for i in range(nw) if active[i] != grow and
                any(0 <= j < nw and active[j] == grow for j in (i - 1, i + 1))]
        if not cand:  # all windows equal: start a run anywhere
            cand = list(range(nw))
        active[int(rng.choice(cand))] = grow
    cycle = list(rng.permutation(species))  # cycle so rare species appear too
    for wi in np.flatnonzero(active):
        present = [cycle.pop(0)] if cycle else [str(rng.choice(species))]
        if rng.random() < 0.3:
            present.append(str(rng.choice([c for c in species if c not in present])))
        for code in present:
            kind, (lo, hi) = _KIND[code], _BAND[code]
            snr = rng.uniform(0, 20)
            t = wi * 5 + rng.uniform(0, 3.5)
            target, got = rng.uniform(0.5, 2.0), 0.0
            while got < target:
                x, m = make_call(kind, rng, sr)
                s = int(round(t / HOP_S)) * hop  # onsets on the 10-ms grid
                if s + len(x) > n:
                    break
                mix[s:s + len(x)] += band(lo, hi) * 10 ** ((snr + rng.uniform(-3, 3)) / 20) * x
                sound[code][s // hop:s // hop + len(m)] |= m
                got += m.sum() * HOP_S
                t += len(x) / sr + rng.uniform(0.1, 0.5)
    mix *= rng.uniform(0.5, 0.8) / (np.abs(mix).max() + 1e-12)
    fpw = int(round(5 / HOP_S))
    rows = []
    for wi in range(nw):
        labs = [c for c in sorted(species)
                if sound[c][wi * fpw:(wi + 1) * fpw].sum() * HOP_S >= 0.3 - 1e-9]
        rows.append(dict(file=sc["name"] + ".ogg", start_s=wi * 5, end_s=wi * 5 + 5,
                         labels=" ".join(labs)))
    return mix.astype(np.float32), rows


# ----------------------------------------------------------------------------
# the data set
# ----------------------------------------------------------------------------
_README = """Synthetic BirdCLEF-2023-style DEMO data (not real bird recordings).

Written by `python data.py demo --out DIR` (seed {seed}). Layout and CSV columns
follow the BirdCLEF 2023 Kaggle data set so the full pipeline runs offline.

* {nsp} invented species: {codes}.
  Each has a parametric synthetic call:
  rising sweep, falling sweep, trill, two-note whistle, harmonic stack, buzzy
  noise band, click train, FM warble, descending note cascade, low hoot; pitch
  +-5 %, duration +-15 % and level vary per call. Bands overlap, so frequency
  alone does not separate every pair.
* train_audio: {nrec} OGG Vorbis recordings, 3-60 s (long-tailed), mostly
  32 kHz, ~20 % at 44.1/48 kHz, ~5 % stereo; long-tailed counts per species.
  Calls come in sparse bouts over pink/brown noise (+ wind rumble, insects)
  at 0-20 dB in-band SNR. ~85 % of recordings have a primary call in the first
  and in the last 8 s; the rest are deliberately noisy labels. ~15 % contain
  a quieter second species, usually listed in secondary_labels.
* test_soundscapes: {nsc} soundscapes at 32 kHz with calls of several species;
  test_soundscapes_labels.csv (not part of Kaggle) gives, per 5-s window, the
  species with >= 0.3 s of call sound in it (empty = no call; read it with
  pandas keep_default_na=False).
* sample_submission.csv: row_id = <soundscape stem>_<end second>, one column
  per species code (sorted).
Metadata (authors, coordinates, XC ids, URLs) are invented.
"""


def write_demo_dataset(out_dir, seed: int = 0, soundscape_minutes=(1.0, 2.0),
                       median_seconds: float = 10.0) -> pathlib.Path:
    """Write the synthetic demo data set to ``out_dir`` (see module docstring)."""
    t_start = time.time()
    out = pathlib.Path(out_dir)
    plan = plan_demo(seed, soundscape_minutes, median_seconds)
    species = plan["species"]
    (out / "train_audio").mkdir(parents=True, exist_ok=True)
    (out / "test_soundscapes").mkdir(parents=True, exist_ok=True)
    total_bytes, train_s, rows = 0, 0.0, []
    for k, rec in enumerate(plan["recordings"]):
        audio, _ = synth_recording(rec)
        fn = f"{rec['primary_label']}/XC{rec['xc']}.ogg"
        (out / "train_audio" / rec["primary_label"]).mkdir(exist_ok=True)
        total_bytes += write_ogg(out / "train_audio" / fn, audio, rec["sr"],
                                 (seed * 1000003 + k * 7919 + 1) & 0x7FFFFFFF)
        train_s += rec["n_samples"] / rec["sr"]
        sec = [rec["secondary"]] if rec["secondary"] and rec["secondary_listed"] else []
        name = {s[0]: s for s in DEMO_SPECIES}[rec["primary_label"]]
        rows.append({
            "primary_label": rec["primary_label"], "secondary_labels": repr(sec),
            "type": repr(rec["type"]), "latitude": rec["lat"], "longitude": rec["lon"],
            "scientific_name": name[2], "common_name": name[1], "author": rec["author"],
            "license": LICENSE, "rating": rec["rating"],
            "url": f"https://www.xeno-canto.org/{rec['xc']}", "filename": fn})
    pd.DataFrame(rows, columns=METADATA_COLUMNS).to_csv(out / "train_metadata.csv", index=False)
    lab_rows, sc_s = [], 0.0
    for k, sc in enumerate(plan["soundscapes"]):
        audio, r = synth_soundscape(sc, species)
        total_bytes += write_ogg(out / "test_soundscapes" / (sc["name"] + ".ogg"), audio,
                                 SOUNDSCAPE_SR, (seed * 1000003 + 900001 + k) & 0x7FFFFFFF)
        lab_rows += r
        sc_s += len(audio) / SOUNDSCAPE_SR
    pd.DataFrame(lab_rows, columns=["file", "start_s", "end_s", "labels"]).to_csv(
        out / "test_soundscapes_labels.csv", index=False)
    first = plan["soundscapes"][0]["name"]
    sub = pd.DataFrame({"row_id": [f"{first}_{e}" for e in (5, 10, 15)]})
    for c in sorted(species):
        sub[c] = 0
    sub.to_csv(out / "sample_submission.csv", index=False)
    (out / "README.txt").write_text(_README.format(
        seed=seed, nsp=len(species), codes=", ".join(sorted(species)),
        nrec=len(rows), nsc=len(plan["soundscapes"])))
    mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    print(f"demo data: {len(species)} species, {len(rows)} recordings "
          f"({train_s / 60:.1f} min) + {len(plan['soundscapes'])} soundscapes "
          f"({sc_s / 60:.1f} min), {mb:.1f} MB, {time.time() - t_start:.1f} s -> {out}")
    return out


