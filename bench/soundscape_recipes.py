"""Which validation tracks the test soundscapes, and which recipe carries over to them.

    python bench/soundscape_recipes.py [--seeds 42 7] [--epochs 20] [--recipes readme soundscape ...]

On the demo data, for each seed: pseudo-soundscapes are built from that seed's
validation split (`python data.py soundscapes`) over half of demo_data/unlabeled_soundscapes
(--work-dir/bed_pseudo); the recipes that train on the test site's sound get the other
half (--work-dir/bed_train), so the pseudo-soundscapes never hold a bed a model has
learnt. Every recipe trains from random weights with the README's budget, scoring
at every evaluation the clip validation (cmap5), the pseudo-soundscapes
(soundscape_cmap5) and, for the record only, the demo test soundscapes
(test_cmap5, never used for selection). Its figures in bench/README.md were measured when
unlabeled_soundscapes/ held the site's sound without its birds; since the demo's unlabelled
recordings hold the species (as BirdCLEF 2024/2025's do), its beds and no-call windows hold calls:
bench/self_training.py measures that case. Printed and written to --work-dir:
per run the best clip cmAP5 and the test cmAP5 of that checkpoint, the best
pseudo cmAP5 and the test cmAP5 of that checkpoint; the mean and spread per
recipe; and the Spearman rank correlation, over the runs, of each validation
metric with the test score of the checkpoint it selects (and over every
evaluation of every run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import report  # noqa: E402
import runfolder  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402

README_RECIPE = ["--no-pretrained", "--lr", "1e-3", "--batch-size", "16"]
BED = ["--bg-dir", "{bg}", "--bg-prob", "0.5", "--bg-snr", "0", "15"]       # the test site's own sound
NOCALL = ["--nocall", "--nocall-soundscapes", "{bg}", "--nocall-audio", "{bg}"]   # every 5-s row and crops of it
SOUNDSCAPE_STYLE = ["--mix-prob", "0.5", "--distance-prob", "0.5", "--reverb-prob", "0.3", "--bg-dir", "{bg}",
                    "--bg-prob", "0.8", "--bg-snr", "-3", "12"]
RECIPES = {
    "readme": [],
    "bed": BED,
    "nocall-bed": NOCALL + BED,
    "pcen": ["--frontend", "pcen"],
    "pcen-bed": ["--frontend", "pcen"] + BED,
    "pcen-nocall-bed": ["--frontend", "pcen"] + NOCALL + BED,
    "mix": ["--mix-prob", "0.3"],
    "bed-mix": BED + ["--mix-prob", "0.3"],
    "bce": ["--loss", "bce"],
    "bed-bce": BED + ["--loss", "bce"],
    "soundscape": SOUNDSCAPE_STYLE,
    "random-crops": ["--crop-policy", "random"],
}


def split_bed(data_dir: Path, work: Path, train_files: int | None = None) -> tuple[Path, Path]:
    """unlabeled_soundscapes/ -> (bed_pseudo, bed_train): alternate files linked into two folders, or, with
    `train_files`, that many evenly spaced files into bed_train and the rest into bed_pseudo (audio no
    recipe hears: bench/site_labels.py labels its site set there)."""
    files = sorted(path for path in (data_dir / "unlabeled_soundscapes").iterdir() if path.suffix == ".ogg")
    if len(files) < 2:
        raise SystemExit(f"{data_dir}/unlabeled_soundscapes needs at least 2 files to split")
    if train_files is None:
        in_train = {index for index in range(len(files)) if index % 2}
    elif 1 <= train_files < len(files):
        in_train = set(np.linspace(0, len(files) - 1, train_files).round().astype(int).tolist())
    else:
        raise SystemExit(f"--bed-train-files must be 1 to {len(files) - 1} (the folder holds {len(files)} files)")
    folders = work / "bed_pseudo", work / "bed_train"
    for side, folder in enumerate(folders):     # a work folder split otherwise before would mix the two
        wanted = {path.name for index, path in enumerate(files) if (index in in_train) == side}
        if folder.is_dir() and {path.name for path in folder.iterdir()} - wanted:
            raise SystemExit(f"{folder} was split otherwise (another --bed-train-files); choose another --work-dir")
    for index, path in enumerate(files):
        folder = folders[index in in_train]
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    return folders


def pseudo_soundscapes(data_dir: Path, seed: int, work: Path) -> Path:
    """This seed's pseudo-soundscapes (built once, over bed_pseudo) -> their labels.csv."""
    out = work / f"pseudo_seed{seed}"
    if not (out / "labels.csv").is_file():
        data.main(["soundscapes", "--data-dir", str(data_dir), "--out", str(out), "--seed", str(seed),
                   "--bed-dir", str(work / "bed_pseudo")])
    return out / "labels.csv"


def finished(run: Path, epochs: int) -> bool:
    return (run / "metrics.csv").is_file() and len(pd.read_csv(run / "metrics.csv")) >= 2 * epochs


def train_recipe(name: str, seed: int, args, work: Path) -> Path:
    """One recipe at one seed -> its run folder (skipped if it already finished)."""
    out = work / f"{name}_seed{seed}"
    if finished(out, args.epochs):
        return out
    flags = [flag.format(bg=work / "bed_train") for flag in RECIPES[name]]
    train.main(options.get_args_parser().parse_args([
        "--data-dir", str(args.data_dir), *README_RECIPE, "--epochs", str(args.epochs), "--patience", "0",
        "--seed", str(seed), "--out-dir", str(out), "--keep-last", "1",
        "--val-soundscapes", str(pseudo_soundscapes(args.data_dir, seed, work)),
        "--test-soundscapes", str(args.data_dir / "test_soundscapes_labels.csv"), *flags]))
    return out


def run_row(name: str, seed: int, folder: Path) -> dict:
    metrics = pd.read_csv(folder / "metrics.csv")
    by_clip, by_pseudo = runfolder.best_row(metrics, "cmap5"), runfolder.best_row(metrics, "soundscape_cmap5")
    return {"recipe": name, "seed": seed, "best_clip_cmap5": by_clip["cmap5"], "test_at_best_clip": by_clip["test_cmap5"],
            "best_pseudo_cmap5": by_pseudo["soundscape_cmap5"], "test_at_best_pseudo": by_pseudo["test_cmap5"],
            "best_test_cmap5": metrics["test_cmap5"].max(), "final_test_cmap5": metrics["test_cmap5"].iloc[-1],
            "chance_clip": metrics["chance_cmap5"].iloc[-1], "chance_pseudo": metrics["soundscape_chance_cmap5"].iloc[-1],
            "chance_test": metrics["test_chance_cmap5"].iloc[-1]}


def correlations(table: pd.DataFrame, evaluations: pd.DataFrame) -> dict:
    """Spearman over the runs (each metric against the test score of the checkpoint it selects), within
    each seed (one split, one pseudo-soundscape set: how a user compares recipes) averaged over the
    seeds, and over every evaluation of every run."""
    def within_seeds(metric: str, test: str) -> float:
        return float(np.mean([report.spearman(runs[metric], runs[test])
                              for _, runs in table.groupby("seed") if len(runs) > 2]))
    return {"runs: clip validation vs test": report.spearman(table["best_clip_cmap5"], table["test_at_best_clip"]),
            "runs: pseudo-soundscapes vs test": report.spearman(table["best_pseudo_cmap5"],
                                                                table["test_at_best_pseudo"]),
            "runs within a seed (mean): clip validation vs test": within_seeds("best_clip_cmap5", "test_at_best_clip"),
            "runs within a seed (mean): pseudo-soundscapes vs test": within_seeds("best_pseudo_cmap5",
                                                                                  "test_at_best_pseudo"),
            "evaluations: clip validation vs test": report.spearman(evaluations["cmap5"], evaluations["test_cmap5"]),
            "evaluations: pseudo-soundscapes vs test": report.spearman(evaluations["soundscape_cmap5"],
                                                                       evaluations["test_cmap5"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=data.DEMO_DIR)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "soundscape_recipes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--bed-train-files", type=int, default=None,
                        help="unlabelled files the bed recipes train on (default: every other one); the rest "
                             "build the pseudo-soundscapes and stay unheard")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: tabulate the runs of --work-dir that have finished")
    args = parser.parse_args()
    data.ensure_demo_data(args.data_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    split_bed(args.data_dir, args.work_dir, args.bed_train_files)
    rows, evaluations = [], []
    for seed in args.seeds:
        for name in args.recipes:
            started = time.time()
            if args.collect and not finished(args.work_dir / f"{name}_seed{seed}", args.epochs):
                continue
            folder = train_recipe(name, seed, args, args.work_dir)
            rows.append(run_row(name, seed, folder) | {"minutes": round((time.time() - started) / 60, 1)})
            evaluations.append(pd.read_csv(folder / "metrics.csv").assign(recipe=name, seed=seed))
            pd.DataFrame(rows).to_csv(args.work_dir / "runs.csv", index=False)
    table, evaluations = pd.DataFrame(rows), pd.concat(evaluations, ignore_index=True)
    summary = table.groupby("recipe", sort=False).agg(["mean", "min", "max"])[
        ["best_clip_cmap5", "test_at_best_clip", "best_pseudo_cmap5", "test_at_best_pseudo"]]
    rho = correlations(table, evaluations)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    print(summary.to_string(float_format=lambda value: f"{value:.4f}"))
    for key, value in rho.items():
        print(f"Spearman, {key}: {value:.3f}")
    summary.to_csv(args.work_dir / "summary.csv")
    (args.work_dir / "spearman.json").write_text(json.dumps(rho, indent=2) + "\n")


if __name__ == "__main__":
    main()
