"""Clip-level vs soundscape cmAP for three ways of sampling training crops, on the demo data, on CPU.

    python bench/crop_policies.py [--epochs 8]

1. ends:   a random 5-s window inside the first or last 8 s (the original recipe)
2. random: a 5-s window anywhere in the recording
3. extras: ends, plus detector-built extra windows: run 1's
           best checkpoint scores every 5-s window of every training recording
           (infer.py --detections), `data.select_extras` keeps the confident ones,
           and train.py --extras adds them to every epoch.

Every run validates on the held-out clips and on the demo's labelled soundscapes
(--val-soundscapes) at every evaluation; the table shows the best clip cmAP5,
the soundscape cmAP5 of that same checkpoint, and the best soundscape cmAP5 seen.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import extras as extras_lib  # noqa: E402
import infer  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402


def train_and_score(name: str, flags: list[str], args, work: Path) -> dict:
    out = work / name
    labels = Path(args.data_dir) / "test_soundscapes_labels.csv"
    started = time.time()
    train.main(options.get_args_parser().parse_args([
        "--data-dir", str(args.data_dir), "--no-pretrained", "--out-dir", str(out), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--patience", "0", "--keep-last", "1",
        "--seed", str(args.seed), "--val-soundscapes", str(labels), *flags]))
    logged = pd.read_csv(out / "metrics.csv")
    best = logged.loc[logged["cmap5"].idxmax()]
    return {"run": name, "flags": " ".join(flags) or "(defaults)", "clip_cmap5": best["cmap5"],
            "soundscape_cmap5_at_best_clip": best["soundscape_cmap5"],
            "best_soundscape_cmap5": logged["soundscape_cmap5"].max(), "minutes": (time.time() - started) / 60}


def make_extras(checkpoint: Path, args, work: Path) -> tuple[Path, int]:
    """Detections of the ends run on every training recording -> extras.csv."""
    detections = work / "detections.csv"
    infer.main(infer.get_args_parser().parse_args([
        "--ckpts", str(checkpoint), "--audio-dir", str(Path(args.data_dir) / "train_audio"),
        "--detections", str(detections), "--precision", "fp32"]))
    extras = extras_lib.select_extras(pd.read_csv(detections), args.threshold, args.min, args.max, args.divisor,
                                args.keep_all_below)
    path = work / "extras.csv"
    extras.to_csv(path, index=False)
    return path, len(extras)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(data.DEMO_DIR))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threshold", type=float, default=0.5, help="extras: primary-label score of a detection")
    parser.add_argument("--min", type=int, default=1, help="extras per recording, at least")
    parser.add_argument("--max", type=int, default=6, help="extras per recording, at most")
    parser.add_argument("--divisor", type=float, default=1.5)
    parser.add_argument("--keep-all-below", type=int, default=0)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "crop_policies"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data.ensure_demo_data(args.data_dir)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [train_and_score("ends", [], args, work), train_and_score("random", ["--crop-policy", "random"], args, work)]
    extras, n_extras = make_extras(work / "ends" / "best.pt", args, work)
    rows.append(train_and_score("extras", ["--extras", str(extras)], args, work))
    rows[-1]["flags"] = f"--extras extras.csv ({n_extras} windows, {args.min}-{args.max}//{args.divisor:g}, " \
                        f"threshold {args.threshold:g})"
    print(f"\n{args.epochs} epochs each, batch {args.batch_size}, lr {args.lr}, random init, seed {args.seed}\n")
    print("| crops | flags | best clip cmAP5 | soundscape cmAP5 (same checkpoint) | best soundscape cmAP5 | minutes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | `{row['flags']}` | {row['clip_cmap5']:.3f} | "
              f"{row['soundscape_cmap5_at_best_clip']:.3f} | {row['best_soundscape_cmap5']:.3f} | "
              f"{row['minutes']:.1f} |")


if __name__ == "__main__":
    main()
