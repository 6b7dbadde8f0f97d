"""The built-in synthetic demo data set: `python data.py demo --out DIR`.

A separate module because synthesising audio is a different job from reading
it (data.py); the sounds themselves are demo_sounds.py's. ``write_demo_dataset(out_dir)``
writes, in the BirdCLEF 2024 Kaggle layout::

    out_dir/train_metadata.csv
    out_dir/train_audio/<label>/XC<id>.ogg
    out_dir/sample_submission.csv
    out_dir/test_soundscapes/soundscape_<nn>.ogg
    out_dir/test_soundscapes_labels.csv     (file,start_s,end_s,labels; not in Kaggle)
    out_dir/unlabeled_soundscapes/site_<nn>.ogg
    out_dir/unlabeled_soundscapes_labels.csv (their truth, same columns; for evaluation only, not in Kaggle)
    out_dir/README.txt

Ten invented species, each with a parametric synthetic call (sweeps, trill,
whistle, harmonic stack, buzz, click train, warble, note cascade, hoot) with
per-call random variation, mixed at 0-20 dB in-band SNR into pink/brown
background noise with occasional wind rumble and insect chorus. The test
soundscapes are harder on purpose (another site, distance, rooms, lower SNR,
birds outside the vocabulary), as real soundscapes are. The unlabelled
soundscapes are other recordings from that site, made the same way (the ten
species call at the same density), as BirdCLEF 2024/2025's are: data for
self-training, whose truth is written apart for scoring only. Everything is
drawn from ``numpy.random.default_rng`` streams derived from ``seed``, so a
seed gives byte-identical CSVs and identical audio samples; the OGG files are
also byte-identical because the (otherwise random) Ogg stream serial number
that libsndfile writes is replaced by a seed-derived one.

The `demo` subcommand's flags are defined here (`add_command`); data.py's main dispatches to
`run_command`.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import numpy as np
import pandas as pd

import cli
import demo_sounds as sounds
import progress
from demo_sounds import HOP_S

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
TEST_SOUNDSCAPES = 20          # 1 minute each, at the test site
TEST_SNR_DB = (3.0, 18.0)      # in-band SNR of a call at the test site (training recordings: 0 to 20 dB)
TEST_DISTANCE_PROB = 0.3       # share of test-site calls from a distance: low-pass at 2-8 kHz and quieter by
TEST_DISTANCE_DB = (-10.0, 0.0)
TEST_REVERB_PROB = 0.3         # share of test-site calls in a room (RT60 0.3-1.5 s)
TEST_CALL_SECONDS = (1.0, 3.0) # seconds of calling per species in an active window
UNKNOWN_BIRDS = 0.2            # share of test-site windows with a bird outside the vocabulary
UNLABELED_SOUNDSCAPES = 16     # 1 minute each, more recordings from the test site (the species call there too)
UNLABELED_LABELS = "unlabeled_soundscapes_labels.csv"  # their truth, beside (not in) the folder: evaluation only


# ----------------------------------------------------------------------------
# planning (cheap, no audio): everything that goes into the CSVs
# ----------------------------------------------------------------------------
def _pick(rng, n, frac):
    k = int(round(n * frac))
    return set(rng.choice(n, size=k, replace=False).tolist())


def plan_demo(seed=0, soundscape_minutes=1.0, median_seconds=10.0):
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
    windows = max(int(round(soundscape_minutes * 12)), 1)
    scapes = [dict(name=f"soundscape_{k + 1:02d}", n_windows=windows, seed=[seed, 2, k])
              for k in range(TEST_SOUNDSCAPES)]
    unlabeled = [dict(name=f"site_{k + 1:02d}", n_windows=windows, seed=[seed, 3, k])
                 for k in range(UNLABELED_SOUNDSCAPES)]
    return dict(species=codes, recordings=recs, soundscapes=scapes, unlabeled=unlabeled)


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
            x, m = sounds.make_call(kind, rng, sr)
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
    x, m = sounds.make_call(kind, rng, sr)
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
    bg = sounds.make_background(rng, n, sr)
    band = sounds.band_rms(bg, sr)
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
        other = sounds.make_background(rng, n, sr, wind_prob=0.0, insect_prob=0.0)
        mix = np.stack([mix, rng.uniform(0.6, 1.0) * mix + 0.3 * other], axis=1)
    # peak-normalise to a random level <= 0.8 (Vorbis overshoots peaks by a few %, so the
    # decoded files stay below 0.9)
    mix *= rng.uniform(0.3, 0.8) / (np.abs(mix).max() + 1e-12)
    return mix.astype(np.float32), dict(coverage=float(sound.mean()), ncalls=len(calls))


def _active_windows(rng, nw):
    """Which 5-s windows hold calls: a 2-state Markov chain nudged to ~50 % active."""
    active, state = [], rng.random() < 0.5
    for _ in range(nw):
        active.append(state)
        state = rng.random() < (0.6 if state else 0.4)
    k_lo, k_hi = math.floor(0.45 * nw), math.ceil(0.55 * nw)
    while not k_lo <= sum(active) <= k_hi:  # grow/shrink runs at their edges
        grow = sum(active) < k_lo
        cand = [i for i in range(nw) if active[i] != grow and
                any(0 <= j < nw and active[j] == grow for j in (i - 1, i + 1))]
        if not cand:  # all windows equal: start a run anywhere
            cand = list(range(nw))
        active[int(rng.choice(cand))] = grow
    return active


def _unknown_birds(rng, mix, band, sr, n, probability):
    """Calls of birds outside the vocabulary, in a share `probability` of the 5-s windows (unlabelled)."""
    for wi in range(n // (5 * sr)):
        if rng.random() < probability:
            x, _ = sounds.make_unknown_call(rng, sr)
            s = int(round((wi * 5 + rng.uniform(0, 4)) * sr))
            L = min(len(x), n - s)
            mix[s:s + L] += band(1000, 8000) * 10 ** (rng.uniform(-3, 12) / 20) * x[:L]


def synth_soundscape(sc, species):
    """A 32 kHz test soundscape at the test site and its per-5-s-window labels.

    Harder than the training recordings on purpose: another background (stream, rain,
    insects, hum), birds outside the vocabulary, calls at 3 to 18 dB in-band SNR, 30 %
    of them from a distance (low-pass at 2-8 kHz, 0 to 10 dB quieter) and 30 % in a
    room (RT60 0.3-1.5 s). A window's labels are the species with >= 0.3 s of dry call in it.
    """
    rng = np.random.default_rng(sc["seed"])
    sr = SOUNDSCAPE_SR
    hop = int(round(sr * HOP_S))
    nw = sc["n_windows"]
    n = nw * 5 * sr
    bg = sounds.make_site_background(rng, n, sr)
    band = sounds.band_rms(bg, sr)
    mix = bg.copy()
    _unknown_birds(rng, mix, band, sr, n, UNKNOWN_BIRDS)
    sound = {c: np.zeros(n // hop, bool) for c in species}
    cycle = list(rng.permutation(species))  # cycle so rare species appear too
    for wi in np.flatnonzero(_active_windows(rng, nw)):
        present = [cycle.pop(0)] if cycle else [str(rng.choice(species))]
        if rng.random() < 0.3:
            present.append(str(rng.choice([c for c in species if c not in present])))
        for code in present:
            kind, (lo, hi) = _KIND[code], _BAND[code]
            snr = rng.uniform(*TEST_SNR_DB)
            far = (np.exp(rng.uniform(math.log(2000), math.log(8000))), rng.uniform(*TEST_DISTANCE_DB)) \
                if rng.random() < TEST_DISTANCE_PROB else None
            rt60 = rng.uniform(0.3, 1.5) if rng.random() < TEST_REVERB_PROB else None
            t = wi * 5 + rng.uniform(0, 3.5)
            target, got = rng.uniform(*TEST_CALL_SECONDS), 0.0
            while got < target:
                x, m = sounds.make_call(kind, rng, sr)
                s = int(round(t / HOP_S)) * hop  # onsets on the 10-ms grid
                if s + len(x) > n:
                    break
                wet = sounds.reverberate(x, rng, sr, rt60) if rt60 else x
                wet = sounds.far_away(wet, sr, *far) if far else wet
                L = min(len(wet), n - s)
                mix[s:s + L] += band(lo, hi) * 10 ** ((snr + rng.uniform(-3, 3)) / 20) * wet[:L]
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


def synth_unlabeled(sc, species):
    """An unlabelled soundscape: another recording from the test site, as BirdCLEF 2024/2025's
    unlabeled_soundscapes are, so the vocabulary's species call in it at the test soundscapes'
    density, distance, rooms, SNR and unknown-bird rate (`synth_soundscape` on the file's own seeded
    stream). Returns (audio, rows); the rows go to UNLABELED_LABELS, for scoring only, never training."""
    return synth_soundscape(sc, species)


# ----------------------------------------------------------------------------
# the data set
# ----------------------------------------------------------------------------
_README = """Synthetic BirdCLEF-style DEMO data (not real bird recordings).

Written by `python data.py demo --out DIR` (seed {seed}). Layout and CSV columns
follow the BirdCLEF 2024 Kaggle data set (2023's plus unlabeled_soundscapes/) so
the full pipeline runs offline.

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
* test_soundscapes: {nsc} one-minute soundscapes at 32 kHz, recorded at a "test
  site" that sounds unlike the training recordings: a stream, rain, an insect
  chorus, mains hum, and birds outside the vocabulary. Calls of the ten species
  at 3 to 18 dB in-band SNR, 30 % of them from a distance (low-passed, quieter),
  30 % in a reverberant space. test_soundscapes_labels.csv (not part of Kaggle)
  gives, per 5-s window, the species with >= 0.3 s of call sound in it (empty =
  no call; read it with pandas keep_default_na=False).
* unlabeled_soundscapes: {nunl} more one-minute recordings from the test site, made
  like test_soundscapes (as BirdCLEF 2024/2025's are): the ten species call in
  them at the same density, distance, rooms and SNR, among the same background
  and unknown birds. Data for self-training (a teacher's pseudo-labels), not a
  bed of pure background or a no-call class: about half the 5-s windows hold
  calls. {unl_labels} (beside the folder, same columns
  as test_soundscapes_labels.csv) is their truth, for evaluation and benchmarks
  only: never train on it.
* sample_submission.csv: row_id = <soundscape stem>_<end second>, one column
  per species code (sorted).
Metadata (authors, coordinates, XC ids, URLs) are invented.
"""


def write_demo_dataset(out_dir, seed: int = 0, soundscape_minutes: float = 1.0,
                       median_seconds: float = 10.0) -> pathlib.Path:
    """Write the synthetic demo data set to ``out_dir`` (see module docstring)."""
    t_start = time.time()
    out = pathlib.Path(out_dir)
    plan = plan_demo(seed, soundscape_minutes, median_seconds)
    species = plan["species"]
    rows, train_s = write_recordings(out, plan["recordings"], seed)
    lab_rows, sc_s = [], 0.0
    (out / "test_soundscapes").mkdir(parents=True, exist_ok=True)
    for k, sc in enumerate(progress.bar(plan["soundscapes"], total=len(plan["soundscapes"]), desc="demo soundscapes",
                                        unit="soundscape")):
        audio, r = synth_soundscape(sc, species)
        sounds.write_ogg(out / "test_soundscapes" / (sc["name"] + ".ogg"), audio, SOUNDSCAPE_SR,
                         (seed * 1000003 + 900001 + k) & 0x7FFFFFFF)
        lab_rows += r
        sc_s += len(audio) / SOUNDSCAPE_SR
    pd.DataFrame(lab_rows, columns=["file", "start_s", "end_s", "labels"]).to_csv(
        out / "test_soundscapes_labels.csv", index=False)
    (out / "unlabeled_soundscapes").mkdir(parents=True, exist_ok=True)
    unl_rows = []
    for k, sc in enumerate(progress.bar(plan["unlabeled"], total=len(plan["unlabeled"]),
                                        desc="demo unlabeled soundscapes", unit="soundscape")):
        audio, r = synth_unlabeled(sc, species)
        sounds.write_ogg(out / "unlabeled_soundscapes" / (sc["name"] + ".ogg"), audio, SOUNDSCAPE_SR,
                         (seed * 1000003 + 950001 + k) & 0x7FFFFFFF)
        unl_rows += r
        sc_s += len(audio) / SOUNDSCAPE_SR
    pd.DataFrame(unl_rows, columns=["file", "start_s", "end_s", "labels"]).to_csv(
        out / UNLABELED_LABELS, index=False)
    first = plan["soundscapes"][0]["name"]
    sub = pd.DataFrame({"row_id": [f"{first}_{e}" for e in (5, 10, 15)]})
    for c in sorted(species):
        sub[c] = 0
    sub.to_csv(out / "sample_submission.csv", index=False)
    (out / "README.txt").write_text(_README.format(
        seed=seed, nsp=len(species), codes=", ".join(sorted(species)), nrec=len(rows),
        nsc=len(plan["soundscapes"]), nunl=len(plan["unlabeled"]), unl_labels=UNLABELED_LABELS))
    mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    print(f"demo data: {len(species)} species, {len(rows)} recordings "
          f"({train_s / 60:.1f} min) + {len(plan['soundscapes'])} test and {len(plan['unlabeled'])} unlabeled "
          f"soundscapes ({sc_s / 60:.1f} min), {mb:.1f} MB, {time.time() - t_start:.1f} s -> {out}")
    return out


def write_recordings(out: pathlib.Path, recordings: list[dict], seed: int) -> tuple[list[dict], float]:
    """train_audio/<label>/XC<id>.ogg and train_metadata.csv -> (metadata rows, seconds of audio)."""
    (out / "train_audio").mkdir(parents=True, exist_ok=True)
    train_s, rows = 0.0, []
    for k, rec in enumerate(progress.bar(recordings, total=len(recordings), desc="demo recordings", unit="recording")):
        audio, _ = synth_recording(rec)
        fn = f"{rec['primary_label']}/XC{rec['xc']}.ogg"
        (out / "train_audio" / rec["primary_label"]).mkdir(exist_ok=True)
        sounds.write_ogg(out / "train_audio" / fn, audio, rec["sr"], (seed * 1000003 + k * 7919 + 1) & 0x7FFFFFFF)
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
    return rows, train_s


# ----------------------------------------------------------------------------
# `python data.py demo`
# ----------------------------------------------------------------------------

def add_command(subparsers) -> None:
    """The `demo` subcommand of data.py (`run_command` runs it)."""
    parser = subparsers.add_parser("demo", help="write the synthetic demo data set (BirdCLEF 2024 layout)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(cli.DEMO_DIR), help="folder to write")
    # not cli.add_seed: the synthetic data's own seed (0 is the data set every demo run uses), not train.py's
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--median-seconds", type=float, default=10.0,
                        help="median recording length (~40 for real-length xeno-canto recordings)")


def run_command(args: argparse.Namespace) -> pathlib.Path:
    return write_demo_dataset(args.out, seed=args.seed, median_seconds=args.median_seconds)
