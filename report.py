"""A report over training runs: which recipe won, at which checkpoint, and does validation track the leaderboard?

    python report.py runs/a runs/b runs/c                          # table + overlaid curves -> report/
    python report.py runs/* --leaderboard leaderboard.csv          # + rank correlation with your public scores
    python report.py runs/a --per-species runs/a/best.pt           # + per-species AP against training recordings
    python report.py --pseudo-labels pseudo.csv --truth labels.csv # how good a teacher's pseudo-labels are

Everything comes from what train.py wrote in each run folder (config.json,
metrics.csv, checkpoints); nothing is re-trained. The table gives, per run, the
flags that differ between the runs, the best clip cmAP5, the soundscape cmAP5 of
that same checkpoint and the best soundscape cmAP5 (from --val-soundscapes), the
test cmAP5 where --test-soundscapes was scored, steps and minutes. Every plot
shows the chance level: what random scores get on the same rows. A run with no
evaluation yet is an empty row; a section whose checkpoint is absent (no best.pt
yet) is skipped with a warning; bad input ends as one logged line and exit status 1.

leaderboard.csv has the columns run, checkpoint, score: the public score of a
submission made with that run folder's checkpoint (best.pt or
checkpoint_stepNNNNNNNN.pt); run is the folder's name, or its path where two run
folders share a name; a blank, NaN or text score is refused. With three or more
rows the report gives, for each validation metric, its Spearman rank correlation
with the leaderboard over those submissions: "validation up, leaderboard flat"
shows after three submissions.

--pseudo-labels takes a table of probabilities (`infer.py --format csv`: file, start_s,
end_s and one column per species; row_id and nocall are ignored) and --truth the labelled
rows of the same recordings (file,start_s,end_s,labels); rows are matched on file and
start_s. It gives the ranking metrics (cmAP5 and the rest, with the chance level) and
the calibration: per probability bin, the (row, species) pairs, their mean probability
and how often the species is really there, and the expected calibration error
(pseudo_label_scores.csv, pseudo_label_calibration.csv).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import data
import evaluation
import loader
import metrics as metrics_lib
import model as model_lib
import options
import runfolder
import site_validation
import soundscapes

log = logging.getLogger("birdclef")

IGNORED_FLAGS = {"out_dir", "resume", "overwrite", "config", "workers", "device", "audit_sampling", "lr_find",
                 "log_every", "keep_last", "val_soundscape_audio", "test_soundscape_audio"}  # say nothing of the recipe
MONITORED_METRICS = (*options.MONITORED, "test_cmap5")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare training runs; check validation against the leaderboard.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders written by train.py (optional with --pseudo-labels)")
    parser.add_argument("--out", default="report", help="folder for runs.csv, curves.png and the rest")
    parser.add_argument("--leaderboard", default=None,
                        help="CSV with run, checkpoint, score (your public leaderboard scores)")
    parser.add_argument("--per-species", default=None, metavar="CHECKPOINT",
                        help="a checkpoint of one of the runs: per-species AP on its validation clips against the "
                             "number of training recordings (re-reads the run's data)")
    parser.add_argument("--pseudo-labels", default=None, metavar="TABLE",
                        help="probabilities per 5-s row and species (infer.py --format csv) to score against --truth")
    parser.add_argument("--truth", default=None, metavar="TABLE",
                        help="file,start_s,end_s,labels rows of the recordings --pseudo-labels scored")
    parser.add_argument("--bins", type=int, default=10, help="equal probability bins over [0, 1] for the calibration")
    parser.add_argument("--site-labels", default=None, metavar="TABLE",
                        help="review.py's labelled site windows: each run's best.pt scored on the random rows, cmAP5 "
                             "with a 95%% bootstrap interval, Spearman with the runs' other metrics")
    parser.add_argument("--site-audio", default=None, metavar="DIR", help="the folder of --site-labels' recordings")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Run folders, or --pseudo-labels with --truth, or both; anything else is a usage error."""
    if not args.runs and not args.pseudo_labels:
        parser.error("give run folders to compare, or --pseudo-labels TABLE --truth TABLE to score pseudo-labels")
    if args.pseudo_labels and not args.truth:
        parser.error("--pseudo-labels needs --truth (file,start_s,end_s,labels rows of the same recordings)")
    if args.truth and not args.pseudo_labels:
        parser.error("--truth is only read with --pseudo-labels")
    if not args.runs and args.leaderboard:
        parser.error("--leaderboard needs run folders")
    if args.bins < 1:
        parser.error(f"--bins {args.bins}: at least 1")
    if args.site_labels and not (args.runs and args.site_audio):
        parser.error("--site-labels needs run folders and --site-audio")


# ----------------------------------------------------------------------------- reading runs

class MissingCheckpoint(FileNotFoundError):
    """A checkpoint a report section needs is not there (a run with no best.pt yet): that section is
    skipped, the rest of the report is still written."""


def read_table(path, what: str, **read_options) -> pd.DataFrame:
    """pd.read_csv, its errors as one line naming the file (pandas' own do not: "No columns to parse")."""
    try:
        return pd.read_csv(path, **read_options)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: the {what} cannot be read ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'empty'})") from None


def read_run(folder) -> dict:
    """A run folder -> name, folder, config (dict), metrics (DataFrame), minutes (config.json written to
    the last metrics.csv row, wall clock). metrics.csv may have no evaluation yet (header only)."""
    folder = Path(folder)
    metrics_path, config_path = folder / "metrics.csv", folder / "config.json"
    if not metrics_path.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a run folder (no metrics.csv and config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:      # its message names no file
        raise ValueError(f"{config_path}: not JSON ({error})") from None
    metrics = read_table(metrics_path, "metrics table")
    missing = [column for column in ("epoch", "global_step", "cmap5") if column not in metrics.columns]
    if missing or not isinstance(config, dict):
        raise ValueError(f"{folder} is not a run folder of train.py: " + (
            f"metrics.csv has no column(s) {missing}" if missing else "config.json is not a JSON object"))
    minutes = (metrics_path.stat().st_mtime - config_path.stat().st_mtime) / 60
    return {"name": folder.name, "folder": folder, "config": config, "metrics": metrics,
            "minutes": max(minutes, 0.0)}


def differing_flags(configs: list[dict]) -> list[str]:
    """Per run, the flags whose values are not the same in every run, as "--flag value" text."""
    keys = sorted({key for config in configs for key in config} - IGNORED_FLAGS)
    differing = [key for key in keys if len({json.dumps(config.get(key)) for config in configs}) > 1]
    return [" ".join(f"--{key.replace('_', '-')} {format_value(config.get(key))}" for key in differing)
            for config in configs]


def format_value(value) -> str:
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def last_value(metrics: pd.DataFrame, column: str) -> float:
    """The column's last value that is not empty; nan without one (no column, no evaluation yet)."""
    values = metrics[column].dropna() if column in metrics else pd.Series(dtype=float)
    return float(values.iloc[-1]) if len(values) else np.nan


def summary_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run: the differing flags, clip and soundscape scores, steps, minutes, whether best.pt is
    there. A run with no evaluation yet is an empty row (warned about) beside the others; with no
    evaluation in any run there is nothing to report: ValueError."""
    empty = [run for run in runs if runfolder.best_row(run["metrics"], "cmap5") is None]
    if len(empty) == len(runs):
        files = ", ".join(str(run["folder"] / "metrics.csv") for run in runs)
        raise ValueError(f"no evaluation to report: no cmap5 value in {files} (header only, or empty values)")
    for run in empty:
        log.warning("%s: no evaluation in metrics.csv yet (no cmap5 value): its row is empty", run["folder"])
    rows = [summary_row(run, flags) for run, flags in zip(runs, differing_flags([run["config"] for run in runs]))]
    table = pd.DataFrame(rows)
    # steps as whole numbers still where an empty run leaves a gap
    table[["at_step", "steps"]] = table[["at_step", "steps"]].astype("Int64")
    return table


def summary_row(run: dict, flags: str) -> dict:
    """summary_table's row of one run; nan where metrics.csv has no value."""
    metrics, no_row = run["metrics"], pd.Series(dtype=float)      # no_row: every .get gives nan
    by_clip = runfolder.best_row(metrics, "cmap5")
    by_clip = no_row if by_clip is None else by_clip
    by_soundscape = runfolder.best_row(metrics, "soundscape_cmap5")
    by_soundscape = no_row if by_soundscape is None else by_soundscape
    return {"run": run["name"], "flags": flags,
            "best_clip_cmap5": by_clip.get("cmap5", np.nan), "at_step": by_clip.get("global_step", np.nan),
            "soundscape_cmap5_there": by_clip.get("soundscape_cmap5", np.nan),
            "best_soundscape_cmap5": by_soundscape.get("soundscape_cmap5", np.nan),
            "test_cmap5_at_best_clip": by_clip.get("test_cmap5", np.nan),
            "test_cmap5_at_best_soundscape": by_soundscape.get("test_cmap5", np.nan),
            "chance_clip_cmap5": last_value(metrics, "chance_cmap5"),
            "chance_soundscape_cmap5": last_value(metrics, "soundscape_chance_cmap5"),
            "steps": metrics["global_step"].max(), "minutes": round(run["minutes"], 1),
            "has_best_pt": (run["folder"] / "best.pt").is_file()}


# ----------------------------------------------------------------------------- rank correlation

def ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    position = 0
    while position < len(values):
        end = position
        while end + 1 < len(values) and values[order[end + 1]] == values[order[position]]:
            end += 1
        result[order[position:end + 1]] = (position + end) / 2 + 1
        position = end + 1
    return result


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks; nan if either is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    rank_x, rank_y = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rank_x ** 2).sum() * (rank_y ** 2).sum())
    return float((rank_x * rank_y).sum() / denominator) if denominator > 0 else float("nan")


def checkpoint_row(run: dict, checkpoint: str) -> pd.Series:
    """The metrics.csv row of a run's checkpoint: checkpoint_stepN.pt is step N; best.pt is read for its step
    (MissingCheckpoint where it is absent)."""
    match = re.fullmatch(r"checkpoint_step(\d+)\.pt", Path(checkpoint).name)
    if match:
        step = int(match.group(1))
    else:
        path = run["folder"] / Path(checkpoint).name
        if not path.is_file():
            raise MissingCheckpoint(f"{path} is absent, so the step of that submission is unknown (name its "
                                    f"checkpoint_stepNNNNNNNN.pt in the leaderboard instead)")
        step = model_lib.read_checkpoint(path).get("global_step")
        if step is None:
            raise ValueError(f"{path} holds no global_step: name the run's checkpoint_stepNNNNNNNN.pt instead")
        step = int(step)
    rows = run["metrics"][run["metrics"]["global_step"] == step]
    if rows.empty:
        raise ValueError(f"{run['folder']}: no evaluation at step {step} (checkpoint {checkpoint})")
    return rows.iloc[-1]


LEADERBOARD_COLUMNS = ("run", "checkpoint", "score")


def checked_leaderboard(leaderboard: pd.DataFrame, source: str = "the leaderboard") -> pd.DataFrame:
    """The run, checkpoint and score columns, scores as floats. Refused in one line naming the CSV line: a
    missing column, an empty run or checkpoint, a score that is blank, text, NaN or infinite (ranked as a
    number it would make any correlation up)."""
    missing = [column for column in LEADERBOARD_COLUMNS if column not in leaderboard.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}: expected run, checkpoint, score; found "
                         f"{list(leaderboard.columns)}")
    scores = pd.to_numeric(leaderboard["score"], errors="coerce").to_numpy(dtype=np.float64)
    for row, (run, checkpoint, score) in enumerate(zip(*(leaderboard[c] for c in LEADERBOARD_COLUMNS))):
        where = f"{source} line {row + 2} (run {run}, checkpoint {checkpoint})"      # line 1 is the header
        if pd.isna(run) or pd.isna(checkpoint) or not str(run).strip() or not str(checkpoint).strip():
            raise ValueError(f"{where}: the run and checkpoint columns must both be filled in")
        if not np.isfinite(scores[row]):
            raise ValueError(f"{where}: score {'(blank or NaN)' if pd.isna(score) else repr(score)} is not a finite "
                             f"number: give each submission its public score, or leave its line out")
    return pd.DataFrame({"run": leaderboard["run"].astype(str).str.strip(),
                         "checkpoint": leaderboard["checkpoint"].astype(str).str.strip(), "score": scores})


def submission_run(runs: list[dict], name: str, where: str) -> dict:
    """The run a leaderboard row names: by its folder path, or by its folder name where only one run has it."""
    by_folder = {run["folder"].resolve(): run for run in runs}           # a folder given twice is one run
    if Path(name).resolve() in by_folder:
        return by_folder[Path(name).resolve()]
    named = [run for run in by_folder.values() if run["name"] == name]
    if len(named) > 1:
        raise ValueError(f"{where}: run {name!r} names two or more of the run folders given "
                         f"({', '.join(str(run['folder']) for run in named)}): write the folder's path in the run "
                         f"column instead (e.g. {named[0]['folder']})")
    if not named:
        raise ValueError(f"{where}: run {name!r} is not among the runs given "
                         f"({', '.join(str(run['folder']) for run in runs)})")
    return named[0]


def leaderboard_correlations(runs: list[dict], leaderboard: pd.DataFrame,
                             source: str = "the leaderboard") -> pd.DataFrame:
    """Each validation metric's Spearman correlation with the public scores of the listed submissions."""
    leaderboard = checked_leaderboard(leaderboard, source)
    rows = []
    for row, (run_name, checkpoint) in enumerate(zip(leaderboard["run"], leaderboard["checkpoint"])):
        run = submission_run(runs, run_name, f"{source} line {row + 2}")
        rows.append(checkpoint_row(run, checkpoint))
    table = pd.DataFrame(rows).reset_index(drop=True)
    if len(table) < 3:
        log.warning("%d submission(s) in the leaderboard: a rank correlation needs 3 or more to say anything",
                    len(table))
    results = []
    for metric in MONITORED_METRICS:
        if metric in table and table[metric].notna().all():
            rho = spearman(table[metric], leaderboard["score"])
            results.append({"metric": metric, "spearman": rho, "submissions": len(table),
                            "note": "lower is better" if metric.endswith("val_loss") else ""})
    return pd.DataFrame(results)


# ----------------------------------------------------------------------------- plots

def plot_curves(runs: list[dict], path: Path) -> None:
    """Clip cmAP5 (solid) and soundscape cmAP5 (dashed) of every run against the epoch, chance levels dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(9, 5))
    chance_levels = {}
    for index, run in enumerate(runs):
        metrics, colour = run["metrics"], f"C{index % 10}"
        axis.plot(metrics["epoch"], metrics["cmap5"], color=colour, label=f"{run['name']} clips")
        if "soundscape_cmap5" in metrics:
            axis.plot(metrics["epoch"], metrics["soundscape_cmap5"], color=colour, linestyle="--",
                      label=f"{run['name']} soundscapes")
        for column, kind in (("chance_cmap5", "clips"), ("soundscape_chance_cmap5", "soundscapes")):
            if np.isfinite(last_value(metrics, column)):                 # a run with no evaluation has none
                chance_levels[f"chance, {kind}"] = last_value(metrics, column)
    for index, (label, level) in enumerate(sorted(chance_levels.items())):
        axis.axhline(level, color="grey", linestyle=":" if "clips" in label else "-.", linewidth=1, label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("cmAP (pad 5)")
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- per species

def average_precision_per_species(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N, C) 0/1 targets and scores -> (C,) AP of each species; nan for a species without a positive."""
    from sklearn.metrics import average_precision_score
    targets = (np.asarray(targets) >= 0.5).astype(int)
    return np.array([average_precision_score(targets[:, column], scores[:, column])
                     if targets[:, column].any() else np.nan for column in range(targets.shape[1])])


def species_table(labels: list[str], targets: np.ndarray, scores: np.ndarray, training_recordings: dict,
                  seed: int = 0) -> pd.DataFrame:
    """Per species: training recordings, validation clips (positives), AP of the scores and of random
    scores (the chance level), sorted by training recordings."""
    chance = average_precision_per_species(targets, np.random.default_rng(seed).random(targets.shape))
    table = pd.DataFrame({"species": labels, "training_recordings": [training_recordings.get(code, 0)
                                                                     for code in labels],
                          "validation_clips": (np.asarray(targets) >= 0.5).sum(axis=0),
                          "ap": average_precision_per_species(targets, scores), "chance_ap": chance})
    return table.sort_values(["training_recordings", "species"], ascending=[False, True]).reset_index(drop=True)


def per_species_report(checkpoint_path, out: Path) -> pd.DataFrame:
    """A checkpoint on its run's validation clips (the data read again from its arguments) -> per-species
    AP against training recordings: per_species.csv and per_species.png in `out`."""
    import tempfile
    settings = options.training_settings_from_saved(checkpoint_arguments(checkpoint_path))
    data_settings = dataclasses.replace(settings.data, cache=None)   # the same crops, without the cache
    with tempfile.TemporaryDirectory() as scratch:
        labels, train_set, val_set = data.build_datasets(data_settings, Path(scratch))
    model = model_lib.load_model(checkpoint_path)
    batch_size = settings.loader.batch_size
    batches = [list(range(start, min(start + batch_size, len(val_set))))
               for start in range(0, len(val_set), batch_size)]
    device = torch.device("cpu")
    # no loader processes: the validation clips are few and read once
    logits, targets = evaluation.predict_clips(model, loader.make_loader(val_set, batch_size, 0, device, batches),
                                               device)
    columns = evaluation.scored_columns(model.labels)
    scores = model_lib.checked_scores(logits, model.activation, str(checkpoint_path))[:, columns]
    recordings = [label for label, extra in zip(train_set.primary_labels, train_set.extras) if not extra]
    table = species_table(list(np.array(model.labels)[columns]), targets.numpy()[:, columns], scores,
                          pd.Series(recordings).value_counts().to_dict(), settings.data.split.seed)
    table.to_csv(out / "per_species.csv", index=False)
    plot_per_species(table, out / "per_species.png", Path(checkpoint_path))
    print(f"\nper-species AP of {checkpoint_path} on its validation clips:")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    return table


def checkpoint_arguments(checkpoint_path) -> dict:
    """The training arguments a checkpoint holds (they give its validation split). MissingCheckpoint where
    the file is absent; ValueError for an export (`python model.py export`), which holds none."""
    if not Path(checkpoint_path).is_file():
        raise MissingCheckpoint(f"{checkpoint_path} is absent (a run that has not evaluated yet has no best.pt)")
    checkpoint = model_lib.read_checkpoint(checkpoint_path)
    if "args" not in checkpoint:
        source = checkpoint.get("exported_from")
        raise ValueError(f"{checkpoint_path} holds no training arguments"
                         + (f" (exported by model.py export from {source}): pass that checkpoint instead"
                            if source else ", so its validation split cannot be rebuilt: pass the run's checkpoint"))
    return checkpoint["args"]


def plot_per_species(table: pd.DataFrame, path: Path, checkpoint: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scored = table[table["ap"].notna()]
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.scatter(scored["training_recordings"].clip(lower=0.8), scored["ap"], label="AP of the checkpoint")
    axis.scatter(scored["training_recordings"].clip(lower=0.8), scored["chance_ap"], color="grey", marker="x",
                 label="AP of random scores (chance)")
    for _, row in scored.iterrows():
        axis.annotate(row["species"], (max(row["training_recordings"], 0.8), row["ap"]), fontsize=7)
    axis.set_xscale("log")
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("training recordings of the species")
    axis.set_ylabel("average precision on the validation clips")
    axis.set_title(f"{checkpoint.parent.name}/{checkpoint.name}: macro AP {scored['ap'].mean():.3f} "
                   f"(chance {scored['chance_ap'].mean():.3f})", fontsize=9)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- pseudo-label quality

KEY_COLUMNS = ("file", "start_s", "end_s")
NOT_SPECIES = {"row_id", *KEY_COLUMNS, soundscapes.NOCALL}


def row_keys(files, starts) -> list[tuple[str, float]]:
    """(file, start_s rounded to the millisecond): how a probability row finds its truth row."""
    return [(str(name), round(float(start), 3)) for name, start in zip(files, starts)]


def read_probability_table(path) -> tuple[pd.DataFrame, list[str]]:
    """infer.py --format csv output (file, start_s, end_s, one probability column per species; row_id and
    nocall are dropped) -> (the table, its species). Refused, in one line: missing columns, a repeated row,
    a value that is not a number, NaN or outside [0, 1]."""
    table = read_table(path, "probability table", dtype={"file": str})
    missing = [column for column in KEY_COLUMNS if column not in table.columns]
    species = [column for column in table.columns if column not in NOT_SPECIES]
    if missing or not species:
        raise ValueError(f"{path}: missing column(s) {missing or ['<species>']}: expected file,start_s,end_s and "
                         f"one probability column per species (infer.py --format csv); found {list(table.columns)}")
    values = table[species].apply(pd.to_numeric, errors="coerce")
    text = values.isna() & table[species].notna()
    if text.any().any():
        row, column = np.argwhere(text.to_numpy())[0]
        raise ValueError(f"{path}: {int(text.to_numpy().sum())} value(s) are not numbers, e.g. line {row + 2} "
                         f"{species[column]}: {table[species].iat[row, column]!r}")
    probabilities = values.to_numpy(dtype=np.float64)
    bad = ~((probabilities >= 0) & (probabilities <= 1))              # NaN compares false: bad too
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ValueError(f"{path}: {int(bad.sum())} probability value(s) are NaN or outside [0, 1], e.g. line "
                         f"{row + 2} {species[column]}: {probabilities[row, column]}")
    for column in ("start_s", "end_s"):
        if pd.to_numeric(table[column], errors="coerce").isna().any():
            raise ValueError(f"{path}: column {column} holds empty or non-numeric values")
    keys = row_keys(table["file"], table["start_s"])
    repeated = pd.Series(keys).duplicated()
    if repeated.any():
        name, start = keys[int(np.flatnonzero(repeated)[0])]
        raise ValueError(f"{path}: {int(repeated.sum())} repeated row(s), e.g. {name} at {start:g} s")
    table = pd.DataFrame({"file": table["file"], "start_s": table["start_s"].astype(float),
                          "end_s": table["end_s"].astype(float)}).join(pd.DataFrame(probabilities, columns=species))
    return table, species


def truth_targets(table: pd.DataFrame, species: list[str], truth_path, table_name="the table") -> np.ndarray:
    """The (rows, species) 0/1 truth of each probability row, from a file,start_s,end_s,labels table (or
    BirdCLEF 2021's). Every row must have a truth row with the same end_s; truth rows the table lacks and
    labels of species outside its columns are only warned about."""
    truth, _ = soundscapes.read_soundscape_labels(truth_path)
    truth_keys = row_keys(truth["file"], truth["start_s"])
    repeated = pd.Series(truth_keys).duplicated()
    if repeated.any():
        name, start = truth_keys[int(np.flatnonzero(repeated)[0])]
        raise ValueError(f"{truth_path}: {int(repeated.sum())} repeated row(s), e.g. {name} at {start:g} s")
    by_key = dict(zip(truth_keys, range(len(truth))))
    keys = row_keys(table["file"], table["start_s"])
    unmatched = [key for key in keys if key not in by_key]
    if unmatched:
        raise ValueError(f"{table_name}: {len(unmatched)} row(s) have no row in {truth_path} (matched on file and "
                         f"start_s), e.g. {unmatched[0][0]} at {unmatched[0][1]:g} s")
    index = np.array([by_key[key] for key in keys], dtype=np.int64)
    ends = truth["end_s"].to_numpy(dtype=np.float64)[index]
    differ = np.flatnonzero(np.abs(ends - table["end_s"].to_numpy(dtype=np.float64)) > 1e-3)
    if len(differ):
        name, start = keys[differ[0]]
        raise ValueError(f"{table_name}: {len(differ)} row(s) end elsewhere than in {truth_path}, e.g. {name} at "
                         f"{start:g} s: end_s {table['end_s'].iat[differ[0]]:g} against {ends[differ[0]]:g}")
    if len(truth) > len(keys):
        log.warning("%s: %d of its %d rows are not in %s and are not scored", truth_path, len(truth) - len(keys),
                    len(truth), table_name)
    column = {code: position for position, code in enumerate(species)}
    targets, unknown = np.zeros((len(keys), len(species)), dtype=np.int64), set()
    for row, labels in enumerate(truth["labels"].to_numpy()[index]):
        for code in str(labels).split():
            if code in column:
                targets[row, column[code]] = 1
            elif code != soundscapes.NOCALL:
                unknown.add(code)
    if unknown:
        log.warning("%s: labels of %d species without a column in %s are ignored: %s", truth_path, len(unknown),
                    table_name, " ".join(sorted(unknown)[:10]))
    return targets


def pseudo_label_quality(table_path, truth_path, bins: int = 10) -> dict:
    """A probability table (pseudo-labels) against the truth of the same rows -> {"scores": rows, species,
    pairs, positives, cmap5, cmap3, macro_ap, lrap, ece, chance_cmap5 (random scores), bins;
    "calibration": one row per bin: lower, upper, pairs, mean_predicted, observed, gap}."""
    table, species = read_probability_table(table_path)
    if table.empty:
        raise ValueError(f"{table_path}: no rows to score")
    targets = truth_targets(table, species, truth_path, str(table_path))
    probabilities = table[species].to_numpy(dtype=np.float64)
    calibration = pd.DataFrame(metrics_lib.calibration_bins(targets, probabilities, bins))
    calibration["gap"] = (calibration["mean_predicted"] - calibration["observed"]).abs()
    scores = {"rows": len(table), "species": len(species), "pairs": int(targets.size),
              "positives": int(targets.sum()), **metrics_lib.probability_metrics(targets, probabilities, bins),
              "chance_cmap5": evaluation.chance_level(targets, 0)["cmap5"], "bins": bins}
    return {"scores": scores, "calibration": calibration}


def pseudo_label_report(table_path, truth_path, out: Path, bins: int = 10) -> dict:
    """pseudo_label_quality printed and written to out/pseudo_label_scores.csv and pseudo_label_calibration.csv."""
    result = pseudo_label_quality(table_path, truth_path, bins)
    scores = result["scores"]
    pd.DataFrame([{"table": str(table_path), "truth": str(truth_path), **scores}]).to_csv(
        out / "pseudo_label_scores.csv", index=False)
    result["calibration"].to_csv(out / "pseudo_label_calibration.csv", index=False)
    print(f"\npseudo-labels {table_path} against {truth_path}: {scores['rows']} rows x {scores['species']} "
          f"species, {scores['positives']} present")
    print(f"cmAP5 {scores['cmap5']:.4f} (random scores: {scores['chance_cmap5']:.4f})  cmAP3 {scores['cmap3']:.4f}  "
          f"macro AP {scores['macro_ap']:.4f}  LRAP {scores['lrap']:.4f}  ECE {scores['ece']:.4f} ({bins} bins)")
    print(result["calibration"].to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    return result


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if args.pseudo_labels:
        result["pseudo_labels"] = pseudo_label_report(args.pseudo_labels, args.truth, out, args.bins)
    if args.runs:
        result |= runs_report(args.runs, out, args.leaderboard, args.per_species)
    if args.site_labels:
        result["site"] = site_validation.site_report(args.runs, args.site_labels, args.site_audio, out)
    print(f"\nwritten to {out}/")
    return result


def runs_report(folders: list[str], out: Path, leaderboard: str | None, per_species: str | None) -> dict:
    """The run folders' table and curves, with --leaderboard and --per-species if given. A section whose
    checkpoint is absent is skipped with a warning (result["skipped"]); the table and curves are still
    written, since a run without best.pt yet still has its curves to show."""
    runs = [read_run(folder) for folder in folders]
    table = summary_table(runs)
    result, skipped = {"runs": table}, {}
    correlations = None
    if leaderboard:              # before anything is written: a bad leaderboard stops the report whole
        try:
            submissions = read_table(leaderboard, "leaderboard", dtype={"run": str, "checkpoint": str})
            correlations = leaderboard_correlations(runs, submissions, str(leaderboard))
        except MissingCheckpoint as error:
            skipped["leaderboard"] = str(error)
    table.to_csv(out / "runs.csv", index=False)
    plot_curves(runs, out / "curves.png")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    if correlations is not None:
        correlations.to_csv(out / "leaderboard_correlation.csv", index=False)
        print("\nSpearman rank correlation with the leaderboard:")
        print(correlations.to_string(index=False))
        result["leaderboard"] = correlations
    if per_species:
        try:
            result["per_species"] = per_species_report(per_species, out)
        except MissingCheckpoint as error:
            skipped["per_species"] = str(error)
    for section, reason in skipped.items():
        log.warning("%s section skipped: %s", section.replace("_", "-"), reason)
    if skipped:
        result["skipped"] = skipped
    return result


def cli(argv=None) -> int:
    """main() as `python report.py` runs it -> its exit status: bad input ends as one logged line and 1."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError, model_lib.CheckpointError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(cli())
