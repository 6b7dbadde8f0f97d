"""Soundscape windows as training data: tables of 5-s rows with hard labels or a teacher's probabilities.

Self-training on a site's unlabelled recordings (BirdCLEF 2024/2025's unlabeled_soundscapes/):

    python infer.py --ckpts teacher.pt --soundscapes SITE --format csv --out pseudo.csv      # round 0
    python train.py --config recipes/demo.json --soundscape-labels pseudo.csv --soundscape-audio SITE

A table is file,start_s,end_s plus either `labels` (space-separated species: a table labelled by
ear, or BirdCLEF 2021's rows converted) or one probability column per species (what `infer.py
--format csv` writes; the row_id column is ignored). Soft targets are the teacher's probabilities
after the transforms of `PseudoLabelSettings`; losses.compute_loss takes them as they are (BCE on
probabilities; CE renormalises them to a distribution over the species). Every row is checked:
an unknown file, a window off the 5-s grid, a probability outside [0, 1] or NaN stops the run in
one line naming the row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import audio
import soundscapes

log = logging.getLogger("birdclef")

# Columns that are never a species: the row's place, and how review.py's table says a row was labelled.
META_COLUMNS = ("row_id", "file", "start_s", "end_s", "chosen_by", "answered_at")
WEIGHTINGS = ("none", "confidence")


@dataclass(frozen=True)
class PseudoLabelSettings:
    """--soundscape-labels and how its probabilities become targets."""
    table: str                  # the table of windows
    audio_dir: str | None       # the folder of its files (default: the table's own folder)
    share: float                # share of each training batch drawn from these windows
    power: float                # targets p ** power (> 1 sharpens: low probabilities fade)
    threshold: float            # probabilities below this count as 0
    weighting: str              # none, or confidence: a window's loss weight is its top probability


@dataclass
class WindowTable:
    """Checked windows of a table: their files, starts and durations, targets (N, C) and weights (N,)."""
    paths: list[str]
    starts: np.ndarray          # (N,) seconds
    durations: np.ndarray       # (N,) seconds of each window's file
    targets: np.ndarray         # (N, C) float32 in [0, 1]
    weights: np.ndarray         # (N,) float32 loss weights


def read_table(path) -> tuple[pd.DataFrame, list[str]]:
    """A window table -> (its rows, its probability columns; empty for a `labels` table)."""
    table = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = {"file", "start_s", "end_s"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (expected file,start_s,end_s and labels "
                         f"or one probability column per species, as infer.py --format csv writes)")
    species = [column for column in table.columns if column not in (*META_COLUMNS, "labels")]
    if "labels" in table.columns and species:
        raise ValueError(f"{path}: both a labels column and probability columns ({species[0]}, ...): give one kind")
    if "labels" not in table.columns and not species:
        raise ValueError(f"{path}: neither a labels column nor probability columns")
    return table, species


def check_grid(table: pd.DataFrame, path) -> tuple[np.ndarray, np.ndarray]:
    """The rows' starts and ends as numbers on infer.py's 5-s grid; a row off it is refused, named."""
    for column in ("start_s", "end_s"):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{path} row {bad[0] + 2}: {column} {table[column].iloc[bad[0]]!r} is not a number")
        table[column] = values
    starts, ends = table["start_s"].to_numpy(), table["end_s"].to_numpy()
    off = (np.abs(starts / soundscapes.ROW_SECONDS - np.round(starts / soundscapes.ROW_SECONDS)) > 1e-6) \
        | (np.abs(ends - starts - soundscapes.ROW_SECONDS) > 1e-6) | (starts < 0)
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(f"{path} row {row + 2}: window {starts[row]:g}-{ends[row]:g} s is off the 5-s grid "
                         f"(rows start at multiples of {soundscapes.ROW_SECONDS:g} s and last "
                         f"{soundscapes.ROW_SECONDS:g} s, as infer.py cuts them)")
    return starts, ends


def probabilities(table: pd.DataFrame, columns: list[str], path) -> np.ndarray:
    """The probability columns as (N, K) float32; NaN, text or values outside [0, 1] are refused, named."""
    values = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, column = (int(axis[0]) for axis in np.nonzero(bad))
        raise ValueError(f"{path} row {row + 2}: {columns[column]} is {table[columns[column]].iloc[row]!r}, not a "
                         f"probability in [0, 1]")
    return values.astype(np.float32)


def file_paths(table: pd.DataFrame, audio_dir: Path, path) -> tuple[list[str], dict]:
    """Each row's audio file inside `audio_dir` (or below it, by name) and each file's duration (s);
    a file that is not there or cannot be read is refused, naming the row."""
    by_name = {}
    resolved, durations = [], {}
    for row, name in enumerate(table["file"]):
        candidate = audio.path_inside(audio_dir, name, f"{path} file")
        if not candidate.is_file():
            if not by_name:
                by_name = {found.name: found for found in audio.audio_files(audio_dir)}
            candidate = by_name.get(Path(name).name, candidate)
        if str(candidate) not in durations:
            header = audio.check_audio_files([candidate])[0][0]
            if header is None:
                raise ValueError(f"{path} row {row + 2}: {name} is not a readable audio file in {audio_dir}")
            durations[str(candidate)] = header[0] / header[1]
        resolved.append(str(candidate))
    return resolved, durations


def read_windows(settings: PseudoLabelSettings, labels: list[str]) -> WindowTable:
    """--soundscape-labels -> checked windows with targets over `labels` (the run's vocabulary)."""
    path = Path(settings.table)
    table, columns = read_table(path)
    if table.empty:
        raise ValueError(f"{path}: no rows")
    starts, _ = check_grid(table, path)
    audio_dir = Path(settings.audio_dir) if settings.audio_dir else path.parent
    paths, durations = file_paths(table, audio_dir, path)
    if columns:
        targets = soft_targets(probabilities(table, columns, path), columns, labels, settings)   # (N, C)
    else:
        targets = hard_targets(table["labels"], labels)                                          # (N, C)
    weights = window_weights(targets, labels, settings.weighting)
    return WindowTable(paths, starts, np.array([durations[p] for p in paths]), targets, weights)


def without_held_out(table: WindowTable, held_out_tables: list[str], source) -> WindowTable:
    """The windows of files none of `held_out_tables` (labelled soundscapes that validation or the test
    scores) names, so no file lends windows to training and validation both; says how many were left out."""
    held_out = held_out_files(held_out_tables)
    keep = np.array([not held_out(Path(path).name) for path in table.paths], dtype=bool)
    if not keep.all():
        log.warning("--soundscape-labels: %d window(s) of %d file(s) left out: those files are scored by "
                    "--val-soundscapes or --test-soundscapes", int((~keep).sum()),
                    len({path for path, kept in zip(table.paths, keep) if not kept}))
    if not keep.any():
        raise ValueError(f"--soundscape-labels {source}: no window left to train on")
    kept = WindowTable([path for path, k in zip(table.paths, keep) if k], table.starts[keep], table.durations[keep],
                       table.targets[keep], table.weights[keep])
    log.info("--soundscape-labels %s: %d windows of %d files, %.2f species per window on average", source,
             len(kept.paths), len(set(kept.paths)), float(kept.targets.sum(axis=1).mean()))
    return kept


def held_out_files(tables: list[str]):
    """The files that labelled-soundscape tables score -> is_held_out(file name): by name for
    file,start_s,end_s,labels tables, by the `<audio_id>_` prefix for BirdCLEF 2021's."""
    names, prefixes = set(), set()
    for path in tables:
        header = set(pd.read_csv(path, nrows=0).columns)
        column = "file" if "file" in header else "audio_id"
        values = pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False)[column]
        if column == "file":
            names |= {Path(name).name for name in values}
        else:
            prefixes |= {f"{audio_id}_" for audio_id in values}
    return lambda name: name in names or any(name.startswith(prefix) for prefix in prefixes)


def soft_targets(values: np.ndarray, columns: list[str], labels: list[str], settings: PseudoLabelSettings) -> np.ndarray:
    """A teacher's (N, K) probabilities -> (N, C) targets over the vocabulary: below `threshold` -> 0,
    then p ** `power`. A species the table lacks gets 0; a column no species of the run has is ignored."""
    index = {label: column for column, label in enumerate(labels)}
    unknown = [column for column in columns if column not in index]
    absent = [label for label in labels if label not in columns and label != soundscapes.NOCALL]
    if unknown:
        log.warning("--soundscape-labels: %d column(s) are no species of this run and are ignored: %s", len(unknown),
                    " ".join(unknown[:10]))
    if absent:
        log.warning("--soundscape-labels: %d species of this run have no column (their targets are 0): %s",
                    len(absent), " ".join(absent[:10]))
    values = np.where(values < settings.threshold, 0.0, values) ** settings.power
    targets = np.zeros((len(values), len(labels)), dtype=np.float32)                 # (N, C)
    for column, name in enumerate(columns):
        if name in index:
            targets[:, index[name]] = values[:, column]
    return targets


def hard_targets(row_labels, labels: list[str]) -> np.ndarray:
    """Space-separated species per row -> (N, C) 0/1 targets; a row without a species is no-call
    (its nocall target is 1 where the run has that class)."""
    index = {label: column for column, label in enumerate(labels)}
    targets = np.zeros((len(row_labels), len(labels)), dtype=np.float32)
    unknown = set()
    for row, text in enumerate(row_labels):
        codes = set(str(text).split()) - {soundscapes.NOCALL}
        for code in codes:
            if code in index:
                targets[row, index[code]] = 1.0
            else:
                unknown.add(code)
        if not codes and soundscapes.NOCALL in index:
            targets[row, index[soundscapes.NOCALL]] = 1.0
    if unknown:
        log.warning("--soundscape-labels: labels of %d species this run does not have are ignored: %s", len(unknown),
                    " ".join(sorted(unknown)[:10]))
    return targets


def window_weights(targets: np.ndarray, labels: list[str], weighting: str) -> np.ndarray:
    """(N,) loss weights: 1, or (confidence) each window's top species probability."""
    if weighting == "none":
        return np.ones(len(targets), dtype=np.float32)
    species = np.array([label != soundscapes.NOCALL for label in labels])
    return targets[:, species].max(axis=1).astype(np.float32)


def quiet_windows(path, max_score: float) -> pd.DataFrame:
    """A teacher's probability table -> the windows it scores below `max_score` for every species (the
    only safe no-call windows of recordings that hold the target birds): file, start_s; says how many
    windows were left out."""
    table, columns = read_table(path)
    starts, _ = check_grid(table, path)
    species = [column for column in columns if column != soundscapes.NOCALL]
    top = probabilities(table, species, path).max(axis=1) if species else np.zeros(len(table))
    quiet = top < max_score
    log.info("no-call windows from %s: %d of %d (the teacher scores the other %d at or above %g for some species)",
             path, int(quiet.sum()), len(table), int((~quiet).sum()), max_score)
    if not quiet.any() and species and np.allclose(probabilities(table, columns, path).sum(axis=1), 1.0, atol=0.02):
        log.warning("%s: every row sums to 1, as a softmax teacher's (--loss ce) without a no-call class does: it "
                    "never scores a window quiet. Label with a sigmoid teacher (--loss bce) or one with --nocall",
                    path)
    return pd.DataFrame({"file": table["file"].to_numpy()[quiet], "start_s": starts[quiet]})


def is_probability_table(path) -> bool:
    """Whether a --nocall-soundscapes table is a teacher's probabilities (not labels)."""
    header = set(pd.read_csv(path, nrows=0).columns)
    return {"file", "start_s", "end_s"} <= header and "labels" not in header and bool(header - set(META_COLUMNS))
