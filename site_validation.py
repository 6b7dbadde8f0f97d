"""A site's labelled windows (review.py's table) as a validation set: each run's cmAP5 on them, how
uncertain that number is with N windows (a bootstrap interval), and how the set ranks runs.

    rows = site_validation.read_site_rows("site_labels.csv", random_only=True)     # the unbiased rows
    scores = site_validation.run_scores(["runs/a", "runs/b"], rows, "site_dir", cache_dir="report/site")
    table = site_validation.site_table(rows, scores)          # run, site_cmap5, low, high, rows

The interval resamples the labelled windows with replacement (`rounds` times) and recomputes padded
cmAP5 (metrics.padded_cmap), so it answers "would another N windows of this site give the same number?";
it says nothing about other sites. Two runs whose intervals overlap widely are not told apart by the set.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

import metrics
import outputs
import soundscapes

log = logging.getLogger("birdclef")


def read_site_rows(path, random_only: bool = True) -> pd.DataFrame:
    """review.py's table (or any file,start_s,end_s,labels table) -> its rows; with random_only and a
    chosen_by column, the rows drawn at random only (the windows chosen to teach are not a fair sample)."""
    table, _ = soundscapes.read_soundscape_labels(path, audio_dir=Path(path).parent)
    chosen = pd.read_csv(path, keep_default_na=False, dtype=str)
    if random_only and "chosen_by" in chosen.columns:
        table = table[(chosen["chosen_by"] == "random").to_numpy()]
    if table.empty:
        raise ValueError(f"{path}: no {'random ' if random_only else ''}labelled rows")
    return table.reset_index(drop=True)


def targets_of(rows: pd.DataFrame, species: list[str]) -> np.ndarray:
    """Rows' labels -> (rows, species) 0/1; codes outside `species` (and nocall) are ignored."""
    column = {code: position for position, code in enumerate(species)}
    targets = np.zeros((len(rows), len(species)), dtype=np.int64)
    for row, labels in enumerate(rows["labels"]):
        for code in str(labels).split():
            if code in column:
                targets[row, column[code]] = 1
    return targets


def run_scores(folders, rows: pd.DataFrame, audio_dir, cache_dir=None) -> dict[str, pd.DataFrame]:
    """Each run's best.pt (or a checkpoint) scored with infer.Predictor on the files `rows` name ->
    {run: table indexed (file, start_s) with one column per species}. Cached in cache_dir/<run>.csv,
    reused while the checkpoint's mtime and the files are the same."""
    import infer
    files = sorted(set(rows["file"]))
    paths = [Path(audio_dir) / name for name in files]
    results = {}
    for folder in folders:
        checkpoint = infer.checkpoint_path(folder)
        name = Path(folder).name if Path(folder).is_dir() else checkpoint.stem
        key = {"checkpoint": str(checkpoint.resolve()), "mtime": os.stat(checkpoint).st_mtime_ns, "files": files}
        cache = Path(cache_dir) / f"{name}.csv" if cache_dir else None
        if cache and cache.is_file() and cache.with_suffix(".json").is_file() \
                and json.loads(cache.with_suffix(".json").read_text()) == key:
            table = pd.read_csv(cache, keep_default_na=False)
        else:
            log.info("site: scoring %d file(s) with %s", len(paths), checkpoint)
            table = infer.Predictor([checkpoint]).predict(paths).reset_index()
            if cache:
                outputs.write_atomic(cache, lambda path: table.to_csv(path, index=False))
                outputs.write_atomic(cache.with_suffix(".json"), lambda path: path.write_text(json.dumps(key)))
        table["start_s"] = table["start_s"].astype(float)
        results[name] = table.drop(columns="end_s").set_index(["file", "start_s"])
    return results


def aligned(rows: pd.DataFrame, scores: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(targets (rows, species), scores (rows, species)) of the labelled rows, in their order."""
    keys = list(zip(rows["file"], rows["start_s"].astype(float)))
    missing = [key for key in keys if key not in scores.index]
    if missing:
        raise ValueError(f"{len(missing)} labelled row(s) have no score, e.g. {missing[0][0]} at {missing[0][1]:g} s")
    species = list(scores.columns)
    return targets_of(rows, species), scores.loc[keys].to_numpy(dtype=np.float64)


def padded_cmap5(targets: np.ndarray, scores: np.ndarray, padding: int = 5) -> float:
    """metrics.padded_cmap(targets, scores, 5) to the last digit (ties grouped as sklearn's average precision
    groups them), without sklearn's per-call checks: a bootstrap calls it rounds x runs times (~40x faster)."""
    columns = targets.shape[1]
    targets = np.concatenate([targets >= 0.5, np.ones((padding, columns), dtype=bool)])             # (N + pad, C)
    scores = np.concatenate([np.asarray(scores, dtype=np.float64), np.ones((padding, columns))])
    precisions = []
    for column in range(columns):
        order = np.argsort(-scores[:, column], kind="stable")
        hits, values = targets[order, column], scores[order, column]
        last = np.r_[values[1:] != values[:-1], True]         # the last row of each run of tied scores
        found = np.cumsum(hits)[last]                           # true positives at each distinct threshold
        precision = found / (np.flatnonzero(last) + 1)
        recall_step = np.diff(np.r_[0, found]) / found[-1]
        precisions.append(float((recall_step * precision).sum()))
    return float(np.mean(precisions))


def bootstrap_cmap5(targets, scores, rounds: int = 1000, seed: int = 0, level: float = 0.95,
                    draws: np.ndarray | None = None) -> dict:
    """Padded cmAP5 of the rows and its percentile bootstrap interval over `rounds` resamplings of the rows
    (`draws`, (rounds, rows) row indices, lets several runs share the same resamplings). Skewed upwards on
    small sets: a resample that misses a rare species' few positives leaves it only the padding rows, AP 1;
    and too narrow there: it held the N-window mean in 83 % / 87 % / 93 % of simulated sets of 50 / 150 / 300
    windows (bench/bootstrap_coverage.py), so below ~200 windows read it as an ~85 % interval."""
    if draws is None:
        draws = np.random.default_rng(seed).integers(0, len(targets), size=(rounds, len(targets)))
    resampled = np.array([padded_cmap5(targets[draw], scores[draw]) for draw in draws])            # (rounds,)
    tail = (1.0 - level) / 2 * 100
    return {"site_cmap5": metrics.padded_cmap(targets, scores, 5), "low": float(np.percentile(resampled, tail)),
            "high": float(np.percentile(resampled, 100 - tail)), "rows": len(targets), "resampled": resampled}


def site_table(rows: pd.DataFrame, scores: dict[str, pd.DataFrame], rounds: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per run: site_cmap5, its 95 % bootstrap interval (low, high), rows, positives; every run is
    resampled with the same row draws, so `resampled` (a list per run) also gives ranking uncertainty."""
    draws = np.random.default_rng(seed).integers(0, len(rows), size=(rounds, len(rows)))      # (rounds, rows)
    results = []
    for run, table in scores.items():
        targets, values = aligned(rows, table)
        result = bootstrap_cmap5(targets, values, draws=draws)
        results.append({"run": run, **result, "positives": int(targets.sum())})
    return pd.DataFrame(results)


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties sharing ranks); nan if either is constant."""
    rank_x = pd.Series(np.asarray(x, dtype=np.float64)).rank().to_numpy()
    rank_y = pd.Series(np.asarray(y, dtype=np.float64)).rank().to_numpy()
    rank_x, rank_y = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    denominator = np.sqrt((rank_x ** 2).sum() * (rank_y ** 2).sum())
    return float((rank_x * rank_y).sum() / denominator) if denominator > 0 else float("nan")


def ranking_agreement(table: pd.DataFrame, reference, level: float = 0.95) -> dict:
    """How the site set ranks the runs against `reference` (one number per run, e.g. the full test cmAP5):
    Spearman of site_cmap5 with it, and the bootstrap interval of that Spearman over the same row draws."""
    resampled = np.stack(table["resampled"].to_numpy())                                    # (runs, rounds)
    rhos = np.array([spearman(resampled[:, round_], reference) for round_ in range(resampled.shape[1])])
    rhos = rhos[np.isfinite(rhos)]
    tail = (1.0 - level) / 2 * 100
    return {"spearman": spearman(table["site_cmap5"], reference),
            "low": float(np.percentile(rhos, tail)) if len(rhos) else float("nan"),
            "high": float(np.percentile(rhos, 100 - tail)) if len(rhos) else float("nan"), "runs": len(table)}


def run_references(folder) -> dict:
    """What a run folder says of itself: best clip validation cmAP5, best pseudo-soundscape cmAP5
    (soundscape_cmap5, with --val-soundscapes) and the test cmAP5 of test_scores.json where present."""
    folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
    values = {}
    if (folder / "metrics.csv").is_file():
        table = pd.read_csv(folder / "metrics.csv")
        for column, name in (("cmap5", "clip_cmap5"), ("soundscape_cmap5", "pseudo_soundscape_cmap5")):
            if column in table and table[column].notna().any():
                values[name] = float(table[column].max())
    if (folder / "test_scores.json").is_file():
        values["test_cmap5"] = json.loads((folder / "test_scores.json").read_text()).get("test_cmap5")
    return values


def site_report(folders, labels_path, audio_dir, out, rounds: int = 1000) -> pd.DataFrame:
    """Each run scored on the site table's random rows: site_cmap5 with its 95 % bootstrap interval, beside
    what the run says of itself (run_references), and the Spearman of the site set with each of those.
    Written to out/site_validation.csv (scores cached in out/site_scores/) and printed."""
    rows = read_site_rows(labels_path, random_only=True)
    table = site_table(rows, run_scores(folders, rows, audio_dir, Path(out) / "site_scores"), rounds=rounds)
    references = pd.DataFrame([run_references(folder) for folder in folders])
    table = pd.concat([table.drop(columns="resampled"), references], axis=1)
    table.to_csv(Path(out) / "site_validation.csv", index=False)
    narrow = " (nearer 85 % below 200 windows: bench/README.md)" if len(rows) < 200 else ""
    print(f"\nsite set {labels_path}: {len(rows)} random windows; cmAP5 with its 95 % bootstrap interval{narrow}")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    if len(table) >= 3:
        for column in references.columns:
            if table[column].notna().all():
                print(f"Spearman of the site cmAP5 with {column}: {spearman(table['site_cmap5'], table[column]):.2f}")
    return table
