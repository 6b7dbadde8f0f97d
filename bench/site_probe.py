"""Does a checkpoint hear the demo species over the test site's sound, or only over the training noise?

    python bench/site_probe.py runs/a/best.pt [runs/b/best.pt ...] [--snr 10] [--repeats 6]

For each of the demo's ten species, `--repeats` 5-s windows of its synthetic call
(demo_sounds.make_call, the generator of the demo data) at `--snr` dB in-band SNR
over three beds: the training recordings' pink/brown noise, the test site's
background (stream, rain, insects, hum: what test_soundscapes and
unlabeled_soundscapes are made of) and silence. Printed per checkpoint and bed:
top-1 accuracy over the species (chance 0.10) and the mean score of the true
species. A model that is right over pink noise and at chance over the site has
learnt the training recordings' sound, not the calls -- the gap between clip
validation and the test soundscapes, seen without any labelled soundscape.
The windows are drawn from a fixed seed, so every checkpoint hears the same ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
import demo_sounds  # noqa: E402
import infer  # noqa: E402

SAMPLE_RATE = 32000
BEDS = ("pink", "site", "silence")


def bed(kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "pink":      # as under the training recordings' calls, without wind or insects
        return demo_sounds.make_background(rng, samples, SAMPLE_RATE, wind_prob=0.0, insect_prob=0.0)
    if kind == "site":
        return demo_sounds.make_site_background(rng, samples, SAMPLE_RATE)
    return np.zeros(samples)


def probe_windows(snr_db: float, repeats: int, seed: int = 0) -> tuple[dict, list[str]]:
    """-> ({bed: [(samples,) float32 windows]}, true species of each window, the same order for every bed)."""
    rng = np.random.default_rng(seed)
    samples, species = 5 * SAMPLE_RATE, sorted(demo._KIND)
    windows, truth = {kind: [] for kind in BEDS}, []
    for _ in range(repeats):
        for code in species:
            truth.append(code)
            low, high = demo._BAND[code]
            for kind in BEDS:
                mix = bed(kind, samples, rng)
                # silence has no band level: the call is scaled against a faint reference instead
                reference = mix if kind != "silence" else 1e-3 * rng.standard_normal(samples)
                level = demo_sounds.band_rms(reference, SAMPLE_RATE)(low, high) * 10 ** (snr_db / 20)
                start = SAMPLE_RATE // 2
                while True:          # calls one after another, 0.3 s apart, as in a bout
                    call, _ = demo_sounds.make_call(demo._KIND[code], rng, SAMPLE_RATE)
                    if start + len(call) > samples - SAMPLE_RATE // 2:
                        break
                    mix[start:start + len(call)] += level * call
                    start += len(call) + int(0.3 * SAMPLE_RATE)
                windows[kind].append((0.6 * mix / np.abs(mix).max()).astype(np.float32))
    return windows, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--snr", type=float, default=10.0, help="in-band SNR of the calls (dB)")
    parser.add_argument("--repeats", type=int, default=6, help="windows per species and bed")
    args = parser.parse_args()
    windows, truth = probe_windows(args.snr, args.repeats)
    for ckpt in args.ckpts:
        predictor = infer.Predictor([ckpt])
        results = []
        for kind in BEDS:
            table = predictor.predict(windows[kind], sample_rate=SAMPLE_RATE)      # (windows, species)
            scores, columns = table.to_numpy(), list(table.columns)
            true_column = np.array([columns.index(code) for code in truth])
            accuracy = float(np.mean(scores.argmax(1) == true_column))
            true_score = float(scores[np.arange(len(truth)), true_column].mean())
            results.append(f"{kind} top-1 {accuracy:.2f} (true-species score {true_score:.3f})")
        print(f"{ckpt}: calls at {args.snr:g} dB over " + ", ".join(results))


if __name__ == "__main__":
    main()
