"""Rank finished recipe runs with another set of pseudo-soundscapes, after the fact.

    python bench/pseudo_rescore.py --work-dir runs/soundscape_recipes --name denoised -- --denoise-calls

For each seed, pseudo-soundscapes are built like bench/soundscape_recipes.py builds
them (that seed's validation split over --work-dir/bed_pseudo) plus the `data.py
soundscapes` flags after `--`. Every run of the work dir then has its kept
checkpoints (best.pt, chosen by clip validation, and the last periodic checkpoint)
scored on them. Printed: per checkpoint the clip cmAP5, the original pseudo cmAP5
and the test cmAP5 (metrics.csv's row of that step) beside the new pseudo cmAP5;
then the Spearman correlation of each validation score with the test score, over
these checkpoints and within each seed (one split). Written to --work-dir/rescore_<name>.csv.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import infer  # noqa: E402
import report  # noqa: E402
import runfolder  # noqa: E402


def build_variant(data_dir: Path, work: Path, name: str, seed: int, flags: list[str]) -> Path:
    out = work / f"{name}_seed{seed}"
    if not (out / "labels.csv").is_file():
        data.main(["soundscapes", "--data-dir", str(data_dir), "--out", str(out), "--seed", str(seed),
                   "--bed-dir", str(work / "bed_pseudo"), *flags])
    return out


def score(checkpoint: Path, variant: Path) -> float:
    """cmAP5 of `checkpoint` on the labelled soundscapes in `variant`, scored by infer.py."""
    with tempfile.TemporaryDirectory() as scratch:
        args = infer.get_args_parser().parse_args(["--ckpts", str(checkpoint), "--soundscapes", str(variant),
                                                   "--labels", str(variant / "labels.csv"),
                                                   "--out", str(Path(scratch) / "submission.csv")])
        return infer.main(args)["scores"]["cmap5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=data.DEMO_DIR)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "soundscape_recipes")
    parser.add_argument("--name", default="variant", help="names the new pseudo-soundscape folders and the CSV")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="after --: data.py soundscapes flags")
    args = parser.parse_args()
    flags = [flag for flag in args.flags if flag != "--"]
    rows = []
    for metrics_path in sorted(args.work_dir.glob("*_seed*/metrics.csv")):
        run = metrics_path.parent
        if not (run / "best.pt").is_file() or (run / runfolder.LOCK).exists():   # none yet, or still training
            continue
        seed = int(run.name.rsplit("_seed", 1)[1])
        variant = build_variant(args.data_dir, args.work_dir, args.name, seed, flags)
        metrics = pd.read_csv(metrics_path)
        for checkpoint in [run / "best.pt", runfolder.periodic_checkpoints(run)[-1]]:
            step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
            row = metrics[metrics["global_step"] == step].iloc[-1]
            rows.append({"run": run.name, "checkpoint": checkpoint.name, "clip_cmap5": row["cmap5"],
                         "pseudo_cmap5": row["soundscape_cmap5"], f"{args.name}_cmap5": score(checkpoint, variant),
                         "test_cmap5": row["test_cmap5"]})
    table = pd.DataFrame(rows)
    table.to_csv(args.work_dir / f"rescore_{args.name}.csv", index=False)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    table["seed"] = [run.rsplit("_seed", 1)[1] for run in table["run"]]
    for column in ("clip_cmap5", "pseudo_cmap5", f"{args.name}_cmap5"):
        within = [report.spearman(group[column], group["test_cmap5"]) for _, group in table.groupby("seed")
                  if len(group) > 2]
        print(f"Spearman with test, {column}: over all {len(table)} checkpoints "
              f"{report.spearman(table[column], table['test_cmap5']):.3f}; within a seed (mean of "
              f"{len(within)}) {sum(within) / max(len(within), 1):.3f}")


if __name__ == "__main__":
    main()
