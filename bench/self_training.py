"""Self-training on the site's unlabelled recordings: does a student trained on its teacher's pseudo-labels
of demo_data/unlabeled_soundscapes beat the teacher on the test soundscapes?

    python bench/self_training.py [--seeds 42 7 1] [--epochs 20] [--recipes readme pcen round1 round2 distill3]
    python bench/self_training.py --collect          # tabulate what --work-dir holds, train nothing

On the demo data, for each seed, from random weights with the README's budget (recipes/demo.json, --epochs):

- readme:   recipes/demo-site-nocall.json, the README's first command until the demo's unlabelled folder held
            the site's birds (its no-call class and background bed are that folder)
- pcen:     that recipe without the unlabelled audio (keys UNLABELLED_KEYS dropped): recipes/demo.json
- round1:   the seed's pcen best.pt labels the unlabelled folder (infer.py --format csv); a student with
            pcen's flags + STUDENT (+ STUDENT_NOCALL with --student-nocall) trains on those pseudo-labels
- round2:   the seed's round1 student labels the folder again; a new student (STUDENT) learns from it
- distill3: the ensemble of every seed's pcen best.pt labels the folder; one student per seed (STUDENT)
- oracle:   a student (STUDENT) of perfect labels: the folder's truth (demo_data/unlabeled_soundscapes_labels.csv)
            stands in for a teacher. Not a recipe a user can run: the ceiling of what better pseudo-labels
            can give on this site and budget, for telling a weak teacher from a weak mechanism

Each run's best.pt (chosen by clip validation cmAP5, as train.py does) is scored on the test soundscapes
with infer.py --labels demo_data/test_soundscapes_labels.csv. Each teacher's pseudo-labels are scored
against demo_data/unlabeled_soundscapes_labels.csv (report.pseudo_label_quality: cmAP5, and ECE, whether
its probabilities mean what they say); without that file those columns are empty. Written to --work-dir:
runs.csv (one row per run), teachers.csv (one row per set of pseudo-labels), summary.csv and summary.md
(per recipe: test cmAP5 mean (min-max) over the seeds, best clip cmAP5, its teachers' pseudo-label cmAP5
and ECE). Every step is skipped when its output exists, and an unfinished training run continues from its
last checkpoint (--resume auto): a killed bench is started again with the same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import infer  # noqa: E402
import options  # noqa: E402
import report  # noqa: E402
import runfolder  # noqa: E402
import train  # noqa: E402

log = logging.getLogger("birdclef")

RECIPE_FILE = ROOT / "recipes" / "demo-site-nocall.json"     # the README's former recipe: `readme`
UNLABELLED_KEYS = ("nocall", "nocall_soundscapes", "nocall_audio", "bg_dir", "bg_snr")   # dropped for `pcen`
# What a student adds to pcen's flags; {labels} is its teacher's pseudo-label table, {audio} the folder
# it labelled. Noisy student: stronger augmentation than the teacher had (pcen: none of these). The teacher
# is a softmax model (CE, no no-call class): its rows sum to 1 even where nothing calls, so probabilities
# below 0.3 count as 0 and a window it is unsure about adds nothing to the student's CE.
STUDENT = ["--soundscape-labels", "{labels}", "--soundscape-audio", "{audio}", "--soundscape-share", "0.25",
           "--soundscape-threshold", "0.3", "--mix-prob", "0.5", "--freq-masks", "2", "--time-masks", "2"]
# --student-nocall: a no-call class on the windows the teacher scores below --nocall-max-score (0.05) for
# every species. A softmax teacher without a no-call class (pcen: --loss ce) has none: its rows sum to 1.
STUDENT_NOCALL = ["--nocall", "--nocall-soundscapes", "{labels}"]
NOCALL_MAX_SCORE = 0.05                                     # train.py's --nocall-max-score default
RECIPES = ("readme", "pcen", "round1", "round2", "distill3", "oracle")
TEACHER_OF = {"round1": "pcen", "round2": "round1"}         # distill3: every seed's pcen
UNLABELLED = "unlabeled_soundscapes"
TRUTH = "unlabeled_soundscapes_labels.csv"                  # for evaluation only: never trained on


# ----------------------------------------------------------------------------- recipes

def recipe_files(data_dir: Path, work: Path) -> dict[str, Path]:
    """recipes/demo-site-nocall.json -> work/recipes/readme.json (its demo_data/ paths pointed at --data-dir) and
    work/recipes/pcen.json (the same without UNLABELLED_KEYS): what --config the runs get."""
    recipe = json.loads(RECIPE_FILE.read_text())
    prefix = "demo_data/"
    readme = {key: str(data_dir / value[len(prefix):]) if isinstance(value, str) and value.startswith(prefix)
              else value for key, value in recipe.items()}
    missing = [key for key in UNLABELLED_KEYS if key not in readme]
    if missing:
        log.warning("%s has no %s any more: the pcen recipe is the readme one less what is left", RECIPE_FILE,
                    missing)
    pcen = {key: value for key, value in readme.items() if key not in UNLABELLED_KEYS}
    folder = work / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, values in (("readme", readme), ("pcen", pcen)):
        files[name] = folder / f"{name}.json"
        text = json.dumps(values, indent=2) + "\n"
        if not files[name].is_file() or files[name].read_text() != text:
            files[name].write_text(text)
    return files


def student_flags(labels: Path, audio: Path, nocall: bool) -> list[str]:
    """STUDENT (and STUDENT_NOCALL) for this teacher's table; with nocall, the table must hold a quiet row."""
    if nocall:
        table = pd.read_csv(labels)
        species = [column for column in table.columns if column not in report.NOT_SPECIES]
        if not (table[species].max(axis=1) < NOCALL_MAX_SCORE).any():
            raise SystemExit(f"--student-nocall: no row of {labels} scores every species below {NOCALL_MAX_SCORE} "
                             f"(a softmax teacher without a no-call class never does: its rows sum to 1)")
    return [flag.format(labels=labels, audio=audio) for flag in STUDENT + (STUDENT_NOCALL if nocall else [])]


def check_student_flags() -> None:
    """The students need train.py's --soundscape-labels: refuse before any work if it is not there."""
    known = options.get_args_parser()._option_string_actions
    absent = [flag for flag in STUDENT + STUDENT_NOCALL if flag.startswith("--") and flag not in known]
    if absent:
        raise SystemExit(f"train.py has no {' '.join(absent)}: the round1, round2 and distill3 students need "
                         f"them (run --recipes readme pcen until they exist)")


# ----------------------------------------------------------------------------- one run

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.work_dir
        self.data_dir = args.data_dir
        self.audio = args.data_dir / UNLABELLED
        self.truth = args.data_dir / TRUTH
        self.recipes = recipe_files(args.data_dir, args.work_dir)

    def folder(self, name: str, seed: int) -> Path:
        return self.work / f"{name}_seed{seed}"

    def finished(self, name: str, seed: int) -> bool:
        run = self.folder(name, seed)
        if not (run / "metrics.csv").is_file() or not (run / "best.pt").is_file():
            return False
        return pd.read_csv(run / "metrics.csv")["epoch"].max() >= self.args.epochs - 1e-6

    def teacher(self, name: str, seed: int) -> tuple[str, list[Path]] | None:
        """The model(s) that label the unlabelled folder for this run: (teacher name, its best.pt files)."""
        if name == "oracle":
            return "truth", []
        if name == "distill3":
            ckpts = [self.trained("pcen", other) / "best.pt" for other in self.args.seeds]
            return f"pcen_ensemble_seeds{'-'.join(map(str, self.args.seeds))}", ckpts
        if name in TEACHER_OF:
            return f"{TEACHER_OF[name]}_seed{seed}", [self.trained(TEACHER_OF[name], seed) / "best.pt"]
        return None

    def pseudo_labels(self, teacher: str, ckpts: list[Path]) -> Path:
        """The teacher's probabilities for every 5-s row of the unlabelled folder (infer.py --format csv)."""
        if teacher == "truth":                      # oracle: the folder's own labels (hard)
            if not self.truth.is_file():
                raise SystemExit(f"--recipes oracle needs {self.truth}")
            return self.truth
        out = self.work / "pseudo_labels" / f"{teacher}.csv"
        if not out.is_file():
            if self.args.collect:
                raise FileNotFoundError(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            infer.main(infer.get_args_parser().parse_args([
                "--ckpts", *map(str, ckpts), "--soundscapes", str(self.audio), "--format", "csv", "--out", str(out),
                "--threads", str(self.args.threads)]))
        return out

    def pseudo_label_scores(self, teacher: str, table: Path) -> dict:
        """The teacher's pseudo-labels against the unlabelled folder's truth (nan without one)."""
        if teacher == "truth":                      # perfect by construction: nothing to measure
            return {"pseudo_cmap5": np.nan, "pseudo_ece": np.nan}
        out = table.with_suffix(".scores.json")
        if out.is_file() and out.stat().st_mtime >= table.stat().st_mtime:
            return json.loads(out.read_text())
        if not self.truth.is_file():
            log.warning("no %s: the pseudo-labels of %s are not scored", self.truth, teacher)
            return {"pseudo_cmap5": np.nan, "pseudo_ece": np.nan}
        result = report.pseudo_label_quality(table, self.truth)
        result["calibration"].to_csv(table.with_suffix(".calibration.csv"), index=False)
        scores = {f"pseudo_{key}": value for key, value in result["scores"].items()}
        out.write_text(json.dumps(scores, indent=2) + "\n")
        return scores

    def trained(self, name: str, seed: int) -> Path:
        """Train one recipe at one seed unless it finished -> its run folder."""
        run = self.folder(name, seed)
        if self.finished(name, seed):
            return run
        if self.args.collect:
            raise FileNotFoundError(run / "best.pt")
        flags = ["--config", str(self.recipes["readme" if name == "readme" else "pcen"])]
        teacher = self.teacher(name, seed)
        if teacher is not None:
            flags += student_flags(self.pseudo_labels(*teacher), self.audio, self.args.student_nocall)
        log.info("training %s: %s", run.name, " ".join(flags))
        train.main(options.parse_args([
            *flags, "--data-dir", str(self.data_dir), "--epochs", str(self.args.epochs), "--seed", str(seed),
            "--out-dir", str(run), "--resume", "auto", "--keep-last", "1",
            *shlex.split(self.args.train_flags)]))
        if not self.finished(name, seed):
            raise RuntimeError(f"{run}: training stopped before epoch {self.args.epochs} (see its log)")
        return run

    def test_scores(self, run: Path) -> dict:
        """best.pt on the test soundscapes, scored by infer.py --labels (redone when best.pt changed)."""
        out, best = run / "test_scores.json", run / "best.pt"
        stamp = best.stat().st_mtime_ns
        if out.is_file() and json.loads(out.read_text()).get("best_mtime_ns") == stamp:
            return json.loads(out.read_text())
        if self.args.collect:
            raise FileNotFoundError(out)
        summary = infer.main(infer.get_args_parser().parse_args([
            "--ckpts", str(best), "--soundscapes", str(self.data_dir / "test_soundscapes"),
            "--labels", str(self.data_dir / "test_soundscapes_labels.csv"),
            "--out", str(run / "test_submission.csv"), "--threads", str(self.args.threads)]))
        scores = {f"test_{key}": value for key, value in summary["scores"].items()} | {"best_mtime_ns": stamp}
        out.write_text(json.dumps(scores, indent=2) + "\n")
        return scores

    def row(self, name: str, seed: int) -> tuple[dict, dict | None]:
        """Train (or find) one run and score it -> (its runs.csv row, its teacher's teachers.csv row)."""
        started = time.time()
        run = self.trained(name, seed)
        teacher_row = None
        teacher = self.teacher(name, seed)
        if teacher is not None:
            table = self.pseudo_labels(*teacher)
            teacher_row = {"teacher": teacher[0], "members": len(teacher[1]),
                           **self.pseudo_label_scores(teacher[0], table)}
        metrics = pd.read_csv(run / "metrics.csv")
        by_clip = runfolder.best_row(metrics, "cmap5")
        test = self.test_scores(run)
        row = {"recipe": name, "seed": seed, "best_clip_cmap5": by_clip["cmap5"], "at_epoch": by_clip["epoch"],
               "test_cmap5": test["test_cmap5"], "test_lrap": test["test_lrap"],
               "teacher": teacher[0] if teacher else "",
               "teacher_pseudo_cmap5": teacher_row["pseudo_cmap5"] if teacher_row else np.nan,
               "teacher_pseudo_ece": teacher_row["pseudo_ece"] if teacher_row else np.nan,
               "train_minutes": round(report.read_run(run)["minutes"], 1),
               "bench_minutes": round((time.time() - started) / 60, 1)}
        return row, teacher_row


# ----------------------------------------------------------------------------- tables

def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per recipe (in RECIPES order): seeds, test cmAP5 mean/min/max, best clip cmAP5 mean, the teachers'
    pseudo-label cmAP5 and ECE (mean over the seeds' teachers)."""
    rows = []
    for name in [recipe for recipe in RECIPES if recipe in set(runs["recipe"])]:
        group = runs[runs["recipe"] == name]
        rows.append({"recipe": name, "seeds": len(group), "test_cmap5_mean": group["test_cmap5"].mean(),
                     "test_cmap5_min": group["test_cmap5"].min(), "test_cmap5_max": group["test_cmap5"].max(),
                     "best_clip_cmap5_mean": group["best_clip_cmap5"].mean(),
                     "teacher_pseudo_cmap5": group["teacher_pseudo_cmap5"].mean(),
                     "teacher_pseudo_ece": group["teacher_pseudo_ece"].mean()})
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame) -> str:
    def number(value) -> str:
        return "" if pd.isna(value) else f"{value:.3f}"
    lines = ["| recipe | seeds | test cmAP5, mean (min–max) | best clip cmAP5 | teacher's pseudo-labels: cmAP5 "
             "| ECE |", "|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        lines.append(f"| {row.recipe} | {row.seeds} | {number(row.test_cmap5_mean)} ({number(row.test_cmap5_min)}–"
                     f"{number(row.test_cmap5_max)}) | {number(row.best_clip_cmap5_mean)} | "
                     f"{number(row.teacher_pseudo_cmap5)} | {number(row.teacher_pseudo_ece)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=data.DEMO_DIR)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "self_training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="the runs to tabulate; the teachers they need are trained as well")
    parser.add_argument("--collect", action="store_true",
                        help="train and infer nothing: tabulate the runs of --work-dir that have finished")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)),
                        help="torch threads for training and inference (0: torch's default, all cores)")
    parser.add_argument("--student-nocall", action="store_true",
                        help="students also train a no-call class on their teacher's quiet windows (STUDENT_NOCALL)")
    parser.add_argument("--train-flags", default="",
                        help="more train.py flags for every run, e.g. '--max-steps 20' for a smoke test")
    args = parser.parse_args(argv)
    args.data_dir, args.work_dir = args.data_dir.resolve(), args.work_dir.resolve()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    data.ensure_demo_data(args.data_dir)
    if not args.collect and set(args.recipes) & {"round1", "round2", "distill3", "oracle"}:
        check_student_flags()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    rows, teachers = [], {}
    for name in args.recipes:                 # in the order asked for: a teacher is trained when first needed
        for seed in args.seeds:
            try:
                row, teacher = bench.row(name, seed)
            except FileNotFoundError as missing:            # --collect: not finished (yet)
                if not args.collect:
                    raise
                log.info("--collect: %s_seed%d left out (no %s)", name, seed, missing)
                continue
            rows.append(row)
            if teacher is not None:
                teachers[teacher["teacher"]] = teacher
            pd.DataFrame(rows).to_csv(args.work_dir / "runs.csv", index=False)
    if not rows:
        raise SystemExit(f"no finished run in {args.work_dir}")
    runs = pd.DataFrame(rows)
    pd.DataFrame(list(teachers.values())).to_csv(args.work_dir / "teachers.csv", index=False)
    summary = summary_table(runs)
    summary.to_csv(args.work_dir / "summary.csv", index=False)
    (args.work_dir / "summary.md").write_text(markdown(summary))
    print(runs.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    if teachers:
        print(pd.DataFrame(list(teachers.values())).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(markdown(summary))
    print(f"written to {args.work_dir}/")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    main()
