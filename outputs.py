"""What infer.py writes: a Kaggle submission, a per-row CSV, Raven selection tables, or a detections
table -- and the per-file parts that make a long job resumable.

Every scored file's rows are saved at once as a part (`<out>.parts/`, written atomically), so a
crash or Kaggle's time limit loses only the files in flight, and `--skip-existing` continues
the job without redoing finished files. When every file is done, the output is assembled from
the parts in file order, written to a temporary file and renamed: a reader never sees half of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

import runfolder
import soundscapes

log = logging.getLogger("birdclef")

RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Species Code", "Common Name", "Confidence", "Begin Path", "File Offset (s)"]


# ----------------------------------------------------------------------------- per-file parts

class PartStore:
    """One file's rows per part: <folder>/<hash of its path>.npz (rows float32 (n_rows, C), problem,
    source = the audio file's [size, mtime_ns] when it was scored).

    `settings` describes how the rows were computed (checkpoints, hop, smoothing, ...); parts made
    with other settings are never mixed in: resuming them is refused, naming the difference. A part
    is used again only while it still fits its file (`problem_with`); any other is scored again.
    """

    def __init__(self, folder: Path, settings: dict, resume: bool, prepare: bool = True):
        """Every process checks; only the one that `prepare`s (under torchrun rank 0, then a barrier)
        clears or creates the folder, so all refuse together and none deletes another's parts. The
        folder's lock (runfolder.LOCK, taken by the caller) is kept when a fresh job clears it."""
        self.folder = Path(folder)
        manifest = self.folder / "settings.json"
        resuming = resume and manifest.is_file()
        if resuming:
            before = json.loads(manifest.read_text())
            differing = sorted(key for key in set(before) | set(settings) if before.get(key) != settings.get(key))
            if differing:
                raise ValueError(f"{self.folder} holds rows made with other settings ({', '.join(differing)}: "
                                 f"{before.get(differing[0])!r}, not {settings.get(differing[0])!r}); run without "
                                 f"--skip-existing to start again")
        if not prepare:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if not resuming:                    # a fresh job does not reuse what another left
            for path in self.folder.iterdir():
                if path.name != runfolder.LOCK:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_atomic(manifest, lambda path: path.write_text(json.dumps(settings, indent=2) + "\n"))

    def path_of(self, audio_path) -> Path:
        return self.folder / f"{hashlib.sha1(str(Path(audio_path).resolve()).encode()).hexdigest()[:20]}.npz"

    def has(self, audio_path) -> bool:
        return self.path_of(audio_path).is_file()

    def save(self, audio_path, rows: np.ndarray, problem: str | None) -> None:
        with_rows = np.asarray(rows, dtype=np.float32)
        source = np.asarray(source_stamp(audio_path), dtype=np.int64)
        write_atomic(self.path_of(audio_path),
                     lambda path: np.savez(path, rows=with_rows, problem=np.array(problem or ""), source=source))

    def load(self, audio_path) -> tuple[np.ndarray, str | None]:
        with np.load(self.path_of(audio_path)) as part:
            return part["rows"], (str(part["problem"]) or None)

    def problem_with(self, audio_path, n_columns: int, n_rows: int) -> str | None:
        """Why this file's part cannot be used again (None: it can): absent, unreadable (a truncated
        write, a hand edit), made from another version of the file (size or mtime changed since), or
        rows that are not (n_rows, n_columns) scores, finite, within [0, 1]."""
        if not self.has(audio_path):
            return "no part"
        try:
            with np.load(self.path_of(audio_path)) as part:
                rows, source = np.asarray(part["rows"]), [int(value) for value in part["source"]]
        except Exception as error:          # BadZipFile, EOFError, KeyError (a part without source), ...
            return f"unreadable part ({type(error).__name__})"
        if source != source_stamp(audio_path):
            return "the audio file changed since it was scored (size or modification time)"
        if rows.ndim != 2 or rows.shape != (n_rows, n_columns):
            return f"rows of shape {rows.shape}, not ({n_rows}, {n_columns})"
        if not np.isfinite(rows).all() or rows.min(initial=0) < 0 or rows.max(initial=0) > 1 + SCORE_SLACK:
            return "scores that are not finite or not within [0, 1]"
        return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


SCORE_SLACK = 1e-5          # float32 rounding of a weighted mean of probabilities may pass 1 by a few ulps


def source_stamp(audio_path) -> list[int]:
    """[size, mtime_ns] of the audio file ([-1, -1] if it is gone): a part keyed on it goes stale when the
    file is replaced (a 60-s recording by a 20-s one under the same name)."""
    try:
        stat = Path(audio_path).stat()
    except OSError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


def write_atomic(path: Path, write) -> None:
    """write(temporary path), then rename it to `path`: the file is whole or absent, never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- row tables

def keep_top_k(rows: np.ndarray, k: int | None) -> np.ndarray:
    """Each row's k highest scores kept, the others 0 (k None or 0: all kept)."""
    if not k or k >= rows.shape[1]:
        return rows
    kept = np.zeros_like(rows)
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    np.put_along_axis(kept, top, np.take_along_axis(rows, top, axis=1), axis=1)
    return kept


def check_unique_names(files: list[Path]) -> None:
    """Row ids (<stem>_<end s>) and Raven tables (<stem>.selections.txt) are named by each file's stem:
    two files with one stem (a.wav and a.flac, or site1/a.ogg and site2/a.ogg) are refused, not merged."""
    first = {}
    for path in files:
        if first.get(Path(path).stem) == path:      # the same path again: listed twice
            raise ValueError(f"{path} is listed twice: its rows would be written twice")
        other = first.setdefault(Path(path).stem, path)
        if other != path:
            raise ValueError(f"{other} and {path} have the same name {Path(path).stem!r}: their rows would share "
                             f"row ids; rename one, or score them in separate runs")


def row_table(results: dict, files: list[Path], columns: list[str], top_k: int | None) -> pd.DataFrame:
    """row_id, file, start_s, end_s + one column per species, for every file in order."""
    blocks, ids, names, starts = [], [], [], []
    for path in files:
        if path not in results:
            continue
        rows = keep_top_k(results[path], top_k)
        blocks.append(rows)
        ids += soundscapes.row_ids(path.stem, len(rows))
        names += [path.name] * len(rows)
        starts += list(np.arange(len(rows)) * soundscapes.ROW_SECONDS)
    scores = np.concatenate(blocks) if blocks else np.zeros((0, len(columns)), dtype=np.float32)
    table = pd.DataFrame(scores, columns=columns)
    table.insert(0, "end_s", np.asarray(starts, dtype=np.float64) + soundscapes.ROW_SECONDS)
    table.insert(0, "start_s", np.asarray(starts, dtype=np.float64))
    table.insert(0, "file", names)
    table.insert(0, "row_id", ids)
    return table


def write_submission(table: pd.DataFrame, out: Path, kind: str) -> None:
    """kaggle: row_id + species; csv: file, start_s, end_s + species. Written atomically."""
    columns = ["row_id"] if kind == "kaggle" else ["file", "start_s", "end_s"]
    species = [column for column in table.columns if column not in ("row_id", "file", "start_s", "end_s")]
    write_atomic(out, lambda path: table[columns + species].to_csv(path, index=False))


def header_only_submission(columns: list[str], out: Path, kind: str = "kaggle") -> None:
    """A valid submission with no rows (Kaggle's visible run has no test soundscapes); kind as write_submission."""
    first = ["row_id"] if kind == "kaggle" else ["file", "start_s", "end_s"]
    write_atomic(out, lambda path: pd.DataFrame(columns=[*first, *columns]).to_csv(path, index=False))


# ----------------------------------------------------------------------------- Raven selection tables

def raven_tables(table: pd.DataFrame, paths: dict, min_conf: float, band_hz: tuple[float, float],
                 common_names: dict) -> dict:
    """Per audio file, its Raven selections: one per row and species scoring >= min_conf -> {file: table}."""
    species = [c for c in table.columns if c not in ("row_id", "file", "start_s", "end_s")]
    scores = table[species].to_numpy()
    tables = {}
    for name, rows in table.groupby("file", sort=False).groups.items():
        selections = []
        for row in rows:
            start = table.at[row, "start_s"]
            for column in np.flatnonzero(scores[row] >= min_conf):
                code = species[column]
                selections.append([len(selections) + 1, "Spectrogram 1", 1, f"{start:.3f}",
                                   f"{start + soundscapes.ROW_SECONDS:.3f}", f"{band_hz[0]:.1f}", f"{band_hz[1]:.1f}",
                                   code, common_names.get(code, code), f"{scores[row, column]:.4f}",
                                   str(paths[name]), f"{start:.3f}"])
        tables[name] = pd.DataFrame(selections, columns=RAVEN_COLUMNS)
    return tables


def check_raven_folder(folder: Path, files: list[Path], combined: bool) -> None:
    """Before any work: a Raven folder holding selection tables this job will not write again (another
    job's files, or a combined table this job will not replace) is refused, so that it never ends as a
    mix of two jobs' tables."""
    if not folder.is_dir():
        return
    ours = {f"{Path(path).stem}.selections.txt" for path in files} | ({COMBINED} if combined else set())
    stale = sorted(path.name for path in folder.glob("*.selections.txt") if path.name not in ours)
    if stale:
        raise FileExistsError(f"{folder} holds {len(stale)} selection table(s) this job would not replace (e.g. "
                              f"{stale[0]}): they would mix with its own; give --out an empty or new folder")


COMBINED = "combined.selections.txt"


def write_raven(tables: dict, folder: Path, combined: bool) -> int:
    """<stem>.selections.txt per file (tab-separated), and with `combined` one table of them all
    (Selection renumbered) -> selections written."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--format raven writes a folder of tables, and {folder} is a file: give --out a "
                              f"folder name")
    folder.mkdir(parents=True, exist_ok=True)
    for name, selections in tables.items():
        write_atomic(folder / f"{Path(name).stem}.selections.txt",
                     lambda path, s=selections: s.to_csv(path, sep="\t", index=False))
    if combined:
        everything = pd.concat(list(tables.values()), ignore_index=True) if tables else pd.DataFrame(
            columns=RAVEN_COLUMNS)
        everything["Selection"] = np.arange(1, len(everything) + 1)
        write_atomic(folder / COMBINED, lambda path: everything.to_csv(path, sep="\t", index=False))
    return sum(len(selections) for selections in tables.values())


def common_names_of(metadata: str | None) -> dict:
    """Species code -> common name, from a BirdCLEF metadata table (train_metadata.csv, or 2025's
    taxonomy.csv) when one is given and has the columns; else {} (the code stands in)."""
    if not metadata or not Path(metadata).is_file():
        return {}
    table = pd.read_csv(metadata, dtype=str, keep_default_na=False)
    code = "primary_label" if "primary_label" in table.columns else "species_code"
    if code not in table.columns or "common_name" not in table.columns:
        return {}
    return dict(zip(table[code], table["common_name"]))


# ----------------------------------------------------------------------------- detections (training audio)

def primary_labels_of(files: list[Path], audio_dir: Path, metadata: str | None) -> list[str]:
    """Each training file's primary label: from train_metadata.csv, else its folder name."""
    lookup = {}
    metadata_path = Path(metadata) if metadata else audio_dir.parent / "train_metadata.csv"
    if metadata_path.is_file():
        table = pd.read_csv(metadata_path, usecols=["primary_label", "filename"], dtype=str)
        lookup = dict(zip(table["filename"], table["primary_label"]))
    return [lookup.get(path.relative_to(audio_dir).as_posix(), path.parent.name) for path in files]


def detections_table(results: dict, files: list[Path], columns: list[str], audio_dir: Path, metadata: str | None,
                     top_k: int) -> pd.DataFrame:
    """Per file and 5-s window: the top-k species with scores and the score of the file's primary label."""
    index = {column: i for i, column in enumerate(columns)}
    rows = []
    for path, primary in zip(files, primary_labels_of(files, audio_dir, metadata)):
        if path not in results:
            continue
        scores = results[path]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        for window, window_scores in enumerate(scores):
            row = {"filename": path.relative_to(audio_dir).as_posix(), "start_s": window * soundscapes.ROW_SECONDS,
                   "end_s": (window + 1) * soundscapes.ROW_SECONDS, "primary_label": primary,
                   "primary_score": float(window_scores[index[primary]]) if primary in index else float("nan")}
            for rank, column in enumerate(top[window], start=1):
                row[f"top{rank}_label"] = columns[column]
                row[f"top{rank}_score"] = float(window_scores[column])
            rows.append(row)
    return pd.DataFrame(rows)
