"""Soundscapes: the 5-second row grid, row ids, cutting windows, label tables, and scoring them.

BirdCLEF labels and scores long recordings in 5-s rows named `<file stem>_<end second>`.
infer.py and training's soundscape validation (validation.py) both cut their windows
with the functions here, so a checkpoint scored during training is scored exactly as
inference will score it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import audio
import metrics

log = logging.getLogger("birdclef")

ROW_SECONDS = 5.0           # BirdCLEF labels and scores 5-second rows
MIN_LAST_ROW = 1.0          # a final partial row needs at least this much audio
NOCALL = "nocall"           # a row without a bird (BirdCLEF 2021); train.py --nocall's class, never a submission column


# ----------------------------------------------------------------------------- row geometry

def row_count(n_samples: int, sample_rate: int) -> int:
    """5-s rows for a file: full rows, plus a padded last row holding at least 1 s of audio.

    A few samples of decoder padding past a multiple of 5 s therefore add no row;
    a file shorter than 5 s still gives one row.
    """
    seconds = n_samples / sample_rate
    full = int(seconds // ROW_SECONDS)
    remainder = seconds - full * ROW_SECONDS
    return max(full + (remainder >= MIN_LAST_ROW), 1)


def row_ids(stem: str, n_rows: int) -> list[str]:
    return [f"{stem}_{int(ROW_SECONDS * (i + 1))}" for i in range(n_rows)]


def window_plan(n_rows: int, window_seconds: float, hop_seconds: float):
    """Windows covering the row grid -> (start seconds (W,), weights (n_rows, W)).

    Window centres sit every `hop` seconds from the first row's centre; a model
    whose window is longer or shorter than a row sees that much context around
    it. A row's score is the overlap-weighted mean of the windows that overlap it,
    so hop = window = 5 s gives exactly one window per row.
    """
    centres = ROW_SECONDS / 2 + np.arange(0.0, n_rows * ROW_SECONDS - ROW_SECONDS / 2 + 1e-9, hop_seconds)
    starts = centres - window_seconds / 2
    row_starts = np.arange(n_rows) * ROW_SECONDS
    overlap = (np.minimum(row_starts[:, None] + ROW_SECONDS, starts[None, :] + window_seconds)
               - np.maximum(row_starts[:, None], starts[None, :])).clip(min=0)   # (n_rows, W)
    return starts, overlap / overlap.sum(axis=1, keepdims=True)


def fixed_window_start(row_start: float, duration: float, window: float) -> float:
    """Start of a `window`-second crop centred on the 5-s row starting at `row_start`,
    kept inside the recording (a 5-s window is the row itself)."""
    centred = row_start + (ROW_SECONDS - window) / 2
    return float(min(max(centred, 0.0), max(duration - window, 0.0)))


# ----------------------------------------------------------------------------- cutting windows

def window_offsets(starts: np.ndarray, sample_rate: int) -> np.ndarray:
    """Window start times (s) -> first sample of each window (negative: before the file)."""
    return np.round(np.asarray(starts) * sample_rate).astype(np.int64)


def copy_window(waveform: np.ndarray, offset: int, out: np.ndarray) -> None:
    """out[:] = waveform[offset:offset + len(out)], with zeros where that lies outside the waveform."""
    begin, end = max(offset, 0), min(offset + len(out), len(waveform))
    if begin >= end:
        out[:] = 0.0
        return
    out[:begin - offset] = 0.0
    out[begin - offset:end - offset] = waveform[begin:end]
    out[end - offset:] = 0.0


def cut_windows(waveform: np.ndarray, sample_rate: int, starts: np.ndarray, window_seconds: float) -> np.ndarray:
    """(samples,) -> (W, window_samples); zero-padded before the start and after the end."""
    windows = np.empty((len(starts), int(round(window_seconds * sample_rate))), dtype=np.float32)
    for row, offset in enumerate(window_offsets(starts, sample_rate)):
        copy_window(waveform, int(offset), windows[row])
    return windows


def fill_batch(sources: list[tuple[np.ndarray, int]], window_samples: int) -> np.ndarray:
    """(waveform, first sample) of each window -> (B, window_samples) float32.

    Each window is copied once, straight into its batch: no padded copy of the file and
    no array of all its windows, and the batch is still in the cache when the frontend reads it.
    """
    batch = np.empty((len(sources), window_samples), dtype=np.float32)
    for row, (waveform, offset) in enumerate(sources):
        copy_window(waveform, offset, batch[row])
    return batch


# ----------------------------------------------------------------------------- label tables

SOUNDSCAPE_2021_COLUMNS = {"row_id", "site", "audio_id", "seconds", "birds"}
SOUNDSCAPE_FILE_COLUMNS = {"file", "start_s", "end_s", "labels"}


def read_soundscape_labels(path, audio_dir=None) -> tuple[pd.DataFrame, Path]:
    """A labelled-soundscape table -> (rows file, start_s, end_s, labels; the audio folder).

    Two formats: file,start_s,end_s,labels (the demo's test_soundscapes_labels.csv,
    ../shared/real-soundscapes/labels_5s.csv) and BirdCLEF 2021's
    train_soundscape_labels.csv (row_id, site, audio_id, seconds, birds: `seconds` is
    the end of the 5-s row, `birds` space-separated codes or "nocall"), whose audio
    file <audio_id>_<site>_<date>.ogg is looked up in the audio folder. `labels` is a
    space-separated string ("nocall" or "" for a row without a target species). The
    audio folder is `audio_dir`, else train_soundscapes/ (2021) or test_soundscapes/
    beside the table, else the table's own folder.
    """
    path = Path(path)
    table = pd.read_csv(path, keep_default_na=False, dtype=str)
    is_2021 = SOUNDSCAPE_2021_COLUMNS <= set(table.columns)
    if audio_dir is None:
        beside = path.parent / ("train_soundscapes" if is_2021 else "test_soundscapes")
        audio_dir = beside if beside.is_dir() else path.parent
    audio_dir = Path(audio_dir)
    if SOUNDSCAPE_FILE_COLUMNS <= set(table.columns):
        for name in dict.fromkeys(table["file"]):
            audio.path_inside(audio_dir, name, f"{path} file")   # a name with '..' or a root is refused here
        rows = pd.DataFrame({"file": table["file"], "start_s": table["start_s"].astype(float),
                             "end_s": table["end_s"].astype(float), "labels": table["labels"]})
        return rows, audio_dir
    if not is_2021:
        raise ValueError(f"{path}: expected columns file,start_s,end_s,labels or BirdCLEF 2021's "
                         f"row_id,site,audio_id,seconds,birds; found {list(table.columns)}")
    files = {}
    for audio_id, site in dict.fromkeys(zip(table["audio_id"], table["site"])):
        found = sorted(audio_dir.glob(f"{audio_id}_{site}_*"))
        if not found:
            raise FileNotFoundError(f"{path}: no audio file {audio_id}_{site}_*.ogg in {audio_dir}")
        files[audio_id, site] = found[0].name
    end = table["seconds"].astype(float)
    rows = pd.DataFrame({"file": [files[key] for key in zip(table["audio_id"], table["site"])],
                         "start_s": end - ROW_SECONDS, "end_s": end, "labels": table["birds"]})
    return rows, audio_dir


def read_labels(path, columns: list[str], audio_dir=None) -> pd.DataFrame:
    """A row_id x species 0/1 table, or labelled 5-s rows (file,start_s,end_s,labels or BirdCLEF
    2021's train_soundscape_labels.csv, see read_soundscape_labels) -> row_id-indexed 0/1 frame."""
    header = set(pd.read_csv(path, nrows=0).columns)
    rows_of_files = SOUNDSCAPE_FILE_COLUMNS <= header or SOUNDSCAPE_2021_COLUMNS <= header
    if "row_id" in header and not rows_of_files:
        return pd.read_csv(path).set_index("row_id").reindex(columns=columns, fill_value=0).astype(np.int8)
    table, _ = read_soundscape_labels(path, audio_dir)
    row_index = [f"{Path(f).stem}_{int(round(end))}" for f, end in zip(table["file"], table["end_s"])]
    targets = pd.DataFrame(0, index=row_index, columns=columns, dtype=np.int8)
    unknown = set()
    for row_id, labels in zip(row_index, table["labels"]):
        for code in str(labels).split():
            if code in targets.columns:
                targets.loc[row_id, code] = 1
            elif code != NOCALL:
                unknown.add(code)
    if unknown:
        log.warning("labels of %d species no model predicts are ignored: %s", len(unknown),
                    " ".join(sorted(unknown)[:10]))
    return targets


def nocall_soundscape_rows(path, audio_dir=None) -> pd.DataFrame:
    """5-s rows of a labelled-soundscape table with no species ("nocall" or empty) -> path, start_s.
    A folder instead of a table: every row of each of its audio files (recordings without the
    vocabulary's birds, e.g. unlabeled soundscapes), on the grid infer.py cuts."""
    if Path(path).is_dir():
        files = audio.audio_files(path)
        headers, bad = audio.check_audio_files(files)
        for name, reason in bad:
            log.warning("no-call rows: skipping %s: %s", name, reason)
        rows = [(str(file), ROW_SECONDS * row) for file, header in zip(files, headers) if header
                for row in range(row_count(*header))]
        return pd.DataFrame(rows, columns=["path", "start_s"]).astype({"start_s": float})
    table, audio_dir = read_soundscape_labels(path, audio_dir)
    empty = [set(str(labels).split()) <= {NOCALL} for labels in table["labels"]]
    rows = table[empty]
    return pd.DataFrame({"path": [str(audio_dir / name) for name in rows["file"]],
                         "start_s": rows["start_s"].to_numpy(dtype=float)})


def score_submission(submission: pd.DataFrame, labels_path, audio_dir=None) -> dict:
    """A submission (row_id + species columns) against a label table -> metrics over the rows both have."""
    columns = [c for c in submission.columns if c != "row_id"]
    targets = read_labels(labels_path, columns, audio_dir)
    predictions = submission.set_index("row_id")
    common = [row for row in targets.index if row in predictions.index]
    if not common:
        raise ValueError(f"no row of {labels_path} matches a predicted row id")
    results = metrics.classification_metrics(targets.loc[common].to_numpy(),
                                             predictions.loc[common, columns].to_numpy())
    results["rows"] = len(common)
    return results
