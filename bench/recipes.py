"""Train several recipes of the experiment log on the demo data for a fixed budget, on CPU.

    python bench/recipes.py [--epochs 8] [--recipes baseline bce pcen ...]

Each recipe is train.py with a few flags, from random weights, for the same
number of epochs; then its best checkpoint is applied to the demo soundscapes
(infer.py) and scored against their 5-second labels. The table shows both
numbers side by side: the clip-level validation cmAP the original experiments
optimised, and the soundscape cmAP that the leaderboard actually measured.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import infer  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402

RECIPES = {
    "baseline": [],                                          # CE, mixup 0.2, ends crops (log baseline)
    "bce": ["--loss", "bce"],
    "pcen": ["--frontend", "pcen"],
    "mlp-head": ["--head", "mlp", "--dropout", "0.5"],
    "inverse-sampling": ["--sampler", "inverse"],
    "label-smoothing": ["--label-smoothing", "0.1"],
    "noise": ["--noise-prob", "0.5", "--noise-snr", "1", "2", "--freq-masks", "3", "--time-masks", "3"],
    "random-crops": ["--crop-policy", "random"],
}


def train_recipe(name: str, flags: list[str], args, work: Path) -> dict:
    out = work / name
    train_args = options.get_args_parser().parse_args([
        "--data-dir", str(args.data_dir), "--no-pretrained", "--out-dir", str(out), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--patience", "0", "--keep-last", "1",
        "--seed", str(args.seed), *flags])
    started = time.time()
    state = train.main(train_args)
    seconds = time.time() - started
    scores = infer.main(infer.get_args_parser().parse_args([
        "--ckpts", str(out / "best.pt"), "--soundscapes", str(Path(args.data_dir) / "test_soundscapes"),
        "--labels", str(Path(args.data_dir) / "test_soundscapes_labels.csv"), "--out", str(out / "submission.csv"),
        "--precision", "fp32"]))["scores"]
    return {"recipe": name, "flags": " ".join(flags) or "(defaults)", "val_cmap5": state["best_metric"],
            "chance_cmap5": state["chance"]["cmap5"], "soundscape_cmap5": scores["cmap5"],
            "soundscape_macro_ap": scores["macro_ap"], "minutes": seconds / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(data.DEMO_DIR))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "recipes"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data.ensure_demo_data(args.data_dir)
    rows = []
    for name in args.recipes:
        rows.append(train_recipe(name, RECIPES[name], args, Path(args.work_dir)))
        print(f"{name}: {rows[-1]}", flush=True)
    print(f"\n{args.epochs} epochs each, batch {args.batch_size}, lr {args.lr}, random init, seed {args.seed}; "
          f"chance cmAP5 on the validation clips {rows[0]['chance_cmap5']:.3f}\n")
    print("| recipe | flags | best validation cmAP5 (clips) | soundscape cmAP5 | soundscape macro AP | minutes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | `{row['flags']}` | {row['val_cmap5']:.3f} | {row['soundscape_cmap5']:.3f} "
              f"| {row['soundscape_macro_ap']:.3f} | {row['minutes']:.1f} |")


if __name__ == "__main__":
    main()
