"""Data: BirdCLEF metadata, the label vocabulary, the split, and the datasets train.py trains on.

    python data.py demo --out DIR               the built-in synthetic demo data set
    python data.py extras --detections CSV ...  detector-built extra windows (train.py --extras)
    python data.py cache --out DIR ...          the crops' audio decoded once (train.py --cache)
    python data.py soundscapes --out DIR ...    labelled pseudo-soundscapes from the validation split
                                                (train.py --val-soundscapes)

Each subcommand's flags are defined in the module that does its work, by its `add_command`: demo in
demo.py, extras in extras.py, cache in cache.py, soundscapes in pseudo_soundscapes.py. `main` here
gathers them and, for cache and soundscapes, reads the recordings (and draws the split) they work on:
reading and splitting are this module's job, and those modules may not import it.

`build_datasets(settings, out_dir)` is the whole path from a DataSettings (train.py's data flags,
converted by its command line) to the training and validation datasets: metadata of one or more
BirdCLEF years, the vocabulary, a header check of every file (unreadable ones listed in
bad_files.csv), the stratified split, then the training set's extra windows (--extras) and no-call
windows (--nocall). Decoding and crops are audio.py's job, batches loader.py's, which records an
epoch visits sampling.py's. No function here takes the parsed command line but `main`.
"""
from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import audio
import cache as cache_lib
import cli
import demo
import distributed
import extras as extras_lib
import loader
import pseudo_labels
import pseudo_soundscapes
import soundscapes

log = logging.getLogger("birdclef")

DEMO_DIR = cli.DEMO_DIR     # defined once, in cli.py; this name is kept for the callers that read it here
SOUNDSCAPE_WINDOW = "(soundscape window)"   # the sampler's and drawn_counts.csv's name for --soundscape-labels rows


# ----------------------------------------------------------------------------- settings
#
# What build_datasets reads, typed. No field has a default: each comes from a flag, and a flag's
# default lives once, in its parser (cli.py for the flags several tools share, options.py for train.py's).

@dataclass(frozen=True)
class SplitSettings:
    """The split of the recordings (--seed, --val-fraction, --folds, --fold): train.py and
    `data.py soundscapes` draw the same one from the same values."""
    seed: int                 # also the seed of the training crops' random streams
    val_fraction: float
    folds: int
    fold: int


@dataclass(frozen=True)
class NocallSources:
    """Where the no-call class's windows come from (train.py --nocall); nocall_windows gathers them."""
    audio_dir: str | None     # --nocall-audio: whole files, a crop anywhere in each per epoch
    soundscapes: str | None   # --nocall-soundscapes: no-call rows of a labelled table, a teacher's quiet rows, or
                              # every row of a folder
    soundscape_audio: str | None   # --soundscape-audio: where a teacher's table's files are
    detections: str | None    # --nocall-detections: the quietest windows of training recordings
    max_score: float          # --nocall-max-score
    per_recording: int        # --nocall-per-recording


@dataclass(frozen=True)
class DataSettings:
    """Everything build_datasets needs to know from the command line."""
    data_dirs: tuple[str, ...]
    split: SplitSettings
    crop: audio.CropSettings
    secondary_weight: float
    strict: bool
    cache: str | None                 # --cache folder written by `data.py cache`
    extras: str | None                # --extras table written by `data.py extras`
    extras_chunk: float
    nocall: NocallSources | None      # None: no nocall class (no --nocall)
    background_dir: str | None        # --bg-dir (augmentation audio): only for the shared-bed warning
    val_soundscapes: str | None       # the shared-bed warning; its files lend no training window
    test_soundscapes: str | None      # its files lend no training window
    soundscape_windows: pseudo_labels.PseudoLabelSettings | None   # --soundscape-labels: windows to train on


# ----------------------------------------------------------------------------- metadata
#
# One BirdCLEF year per folder; `detect_layout` tells the years apart by their files:
#   2021  train_metadata.csv; audio in train_short_audio/<primary_label>/<filename> (the
#         filename has no folder); train_soundscapes/ with train_soundscape_labels.csv
#         (row_id, site, audio_id, seconds, birds); sample_submission.csv is row_id,birds
#   2022  train_metadata.csv; train_audio/<filename>, filename "<label>/XC....ogg";
#         scored_birds.json (the 21 scored species); sample_submission.csv is row_id,target
#   2023  train_metadata.csv; train_audio/; sample_submission.csv row_id + species columns
#   2024  as 2023, plus unlabeled_soundscapes/
#   2025  train.csv with a `collection` column (XC, iNat, CSA); train_audio/; taxonomy.csv
# Several folders (--data-dir A B C) are read one by one and concatenated; a
# xeno-canto recording that appears in more than one is kept once, from the first.

METADATA_COLUMNS = ("primary_label", "secondary_labels", "filename")


@dataclass(frozen=True)
class Layout:
    year: str
    metadata: str                     # the metadata table's file name
    audio: str                        # the training audio folder
    folder_in_filename: bool          # False (2021): audio is <audio>/<primary_label>/<filename>
    extra_columns: tuple = ()         # columns this year must have besides METADATA_COLUMNS


LAYOUTS = {
    "2021": Layout("2021", "train_metadata.csv", "train_short_audio", False),
    "2022": Layout("2022", "train_metadata.csv", "train_audio", True),
    "2023": Layout("2023", "train_metadata.csv", "train_audio", True),
    "2024": Layout("2024", "train_metadata.csv", "train_audio", True),
    "2025": Layout("2025", "train.csv", "train_audio", True, ("collection",)),
}


def detect_layout(data_dir) -> Layout:
    """Which BirdCLEF year a folder is, from the files each year ships."""
    data_dir = Path(data_dir)
    if (data_dir / "train.csv").is_file():
        return LAYOUTS["2025"]
    if (data_dir / "train_metadata.csv").is_file():
        if (data_dir / "train_short_audio").is_dir():
            return LAYOUTS["2021"]
        if (data_dir / "scored_birds.json").is_file():
            return LAYOUTS["2022"]
        if (data_dir / "unlabeled_soundscapes").is_dir():
            return LAYOUTS["2024"]
        return LAYOUTS["2023"]
    raise FileNotFoundError(f"{data_dir / 'train_metadata.csv'} not found: --data-dir must be a BirdCLEF folder "
                            f"(2021-2024: train_metadata.csv with train_audio/ or train_short_audio/; "
                            f"2025: train.csv with train_audio/)")


def read_metadata(data_dir) -> pd.DataFrame:
    """The folder's metadata table -> one row per recording with parsed labels and an absolute path.

    Columns added: `secondary` (list of codes), `path`, `source` (the folder) and
    `recording_id` ("XC<number>" for xeno-canto recordings, else "").
    """
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    csv_path = data_dir / layout.metadata
    table = pd.read_csv(csv_path, dtype={"primary_label": str, "filename": str}, keep_default_na=False)
    missing = [column for column in METADATA_COLUMNS + layout.extra_columns if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks column(s) {missing} of the BirdCLEF {layout.year} layout; "
                         f"found {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{csv_path} has no rows")

    audio_root = (data_dir / layout.audio).absolute()
    urls = table["url"] if "url" in table.columns else [""] * len(table)
    secondary, paths, recording_ids = [], [], []
    for row_number, (primary, text, filename, url) in enumerate(
            zip(table["primary_label"], table["secondary_labels"], table["filename"], urls), start=2):
        secondary.append(parse_label_list(text, f"{csv_path} row {row_number}"))
        relative = filename if layout.folder_in_filename else Path(primary) / filename
        paths.append(str(audio.path_inside(audio_root, relative, f"{csv_path} row {row_number}")))
        recording_ids.append(xeno_canto_id(filename, url))
    table["secondary"] = secondary
    table["path"] = paths
    table["source"] = str(data_dir)
    table["recording_id"] = recording_ids
    # one row per file: a repeated row would put the same audio in training and validation
    table, repeated = drop_duplicate_recordings(table, key="path")
    if repeated:
        log.warning("%s: %d row(s) name a file listed before; each file is used once, from its first row "
                    "(secondary labels of its rows united)", csv_path, repeated)
    return table


def xeno_canto_id(filename: str, url: str = "") -> str:
    """"XC134896" from a filename like "asbfly/XC134896.ogg" or a xeno-canto URL; "" otherwise
    (iNaturalist and CSA recordings of 2025 have no xeno-canto id)."""
    match = re.fullmatch(r"XC(\d+)", Path(str(filename)).stem, flags=re.IGNORECASE)
    if match is None:
        match = re.search(r"xeno-canto\.org/(\d+)", str(url))
    return f"XC{int(match.group(1))}" if match else ""


def parse_label_list(text: str, where: str) -> list[str]:
    """"['abethr1', 'gnbcam2']" -> ['abethr1', 'gnbcam2'], with the row named on error.

    Empty codes are dropped: 2025's train.csv writes "no secondary label" as "['']".
    """
    if text is None or str(text).strip() in ("", "[]"):
        return []
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: secondary_labels {text!r} is not a Python list string") from error
    if not isinstance(value, (list, tuple)) or not all(isinstance(code, str) for code in value):
        raise ValueError(f"{where}: secondary_labels {text!r} is not a list of species codes")
    return [code.strip() for code in value if code.strip()]


def read_vocabulary(data_dir, table: pd.DataFrame) -> list[str]:
    """Species columns of sample_submission.csv in their order, else the sorted primary labels.

    Only a wide sample submission (row_id + one column per species: 2023-2025)
    names species; 2021's (row_id, birds) and 2022's (row_id, target) do not.
    """
    sample_submission = Path(data_dir) / "sample_submission.csv"
    if sample_submission.is_file():
        columns = submission_columns(sample_submission)
        if columns and not set(columns) <= {"birds", "target"}:
            return columns
    return sorted(table["primary_label"].unique())


def submission_columns(path) -> list[str]:
    """A sample submission's columns but row_id, as written: a repeated column is refused (pandas
    would silently rename it "x.1", and one species' scores would sit under another's name)."""
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise ValueError(f"{path} has the column(s) {repeated} more than once")
    return [column for column in header if column != "row_id"]


def scored_species(data_dir) -> list[str] | None:
    """BirdCLEF 2022's scored_birds.json (the species the leaderboard scored), else None."""
    path = Path(data_dir) / "scored_birds.json"
    if not path.is_file():
        return None
    species = json.loads(path.read_text())
    if not isinstance(species, list) or not all(isinstance(code, str) for code in species):
        raise ValueError(f"{path} must be a JSON list of species codes")
    return species


def read_training_data(data_dirs) -> tuple[pd.DataFrame, list[str]]:
    """One or more BirdCLEF folders -> (recordings, vocabulary).

    One folder: its table and vocabulary as they are. Several: the tables
    concatenated in the order given, a xeno-canto recording present in more than
    one folder kept once (from the first; the secondary labels of all its copies
    united), and the vocabulary the sorted union of the folders' vocabularies.
    """
    if isinstance(data_dirs, (str, Path)):
        data_dirs = [data_dirs]
    tables, vocabularies = [], []
    for data_dir in data_dirs:
        table = read_metadata(data_dir)
        tables.append(table)
        vocabularies.append(read_vocabulary(data_dir, table))
        scored = scored_species(data_dir)
        log.info("%s: BirdCLEF %s layout, %d recordings of %d species%s", data_dir, detect_layout(data_dir).year,
                 len(table), table["primary_label"].nunique(),
                 f", {len(scored)} scored species in scored_birds.json" if scored else "")
    if len(tables) == 1:
        return tables[0], vocabularies[0]
    table, merged = drop_duplicate_recordings(pd.concat(tables, ignore_index=True))
    labels = sorted(set().union(*vocabularies))
    log.info("%d folders: %d recordings of %d species after merging %d xeno-canto recording(s) that appear in "
             "more than one folder (each is used once, from the first folder listed)",
             len(tables), len(table), len(labels), merged)
    return table, labels


def drop_duplicate_recordings(table: pd.DataFrame, key: str = "recording_id") -> tuple[pd.DataFrame, int]:
    """Keep the first row of each xeno-canto id (`key`; rows without one are all kept) -> (table, rows dropped).

    The kept row's secondary labels become the union over its copies (a later
    year may list more background species), without its own primary label.
    """
    has_id = table[key] != ""
    duplicate = has_id & table[key].duplicated(keep="first")
    if not duplicate.any():
        return table.reset_index(drop=True), 0
    united = {}
    for recording_id, secondary in zip(table[key][has_id], table["secondary"][has_id]):
        codes = united.setdefault(recording_id, [])
        codes += [code for code in secondary if code not in codes]
    kept = table[~duplicate].copy()
    kept["secondary"] = [
        [code for code in united[recording_id] if code != primary] if recording_id else secondary
        for recording_id, secondary, primary in zip(kept[key], kept["secondary"], kept["primary_label"])]
    return kept.reset_index(drop=True), int(duplicate.sum())


def make_targets(table: pd.DataFrame, labels: list[str], secondary_weight: float) -> np.ndarray:
    """(N, C) float32: 1.0 for the primary label, `secondary_weight` for secondary ones."""
    index = {label: i for i, label in enumerate(labels)}
    unknown_primary = sorted(set(table["primary_label"]) - set(index))
    if unknown_primary:
        raise ValueError(f"primary labels not in the vocabulary: {unknown_primary[:10]}")
    targets = np.zeros((len(table), len(labels)), dtype=np.float32)
    unknown_secondary = set()
    for row, (primary, secondary) in enumerate(zip(table["primary_label"], table["secondary"])):
        for code in secondary:
            if code in index:
                targets[row, index[code]] = max(targets[row, index[code]], secondary_weight)
            else:
                unknown_secondary.add(code)
        targets[row, index[primary]] = 1.0
    if unknown_secondary:
        log.warning("ignoring %d secondary label(s) outside the vocabulary, e.g. %s",
                    len(unknown_secondary), sorted(unknown_secondary)[:5])
    return targets


def split_recordings(primary_labels, val_fraction: float, folds: int, fold: int, seed: int):
    """Stratified by primary label -> (train_indices, val_indices), deterministic under `seed`.

    Species with fewer than two recordings stay in train (they cannot be both
    learned and validated). With `folds` > 1, recordings of each species are dealt
    round-robin into folds from a random start and `fold` is held out; otherwise
    round(val_fraction * n) recordings of each species (at least one, never all).
    """
    primary_labels = np.asarray(primary_labels)
    rng = np.random.default_rng(seed)
    val = []
    for species in sorted(set(primary_labels)):
        members = np.flatnonzero(primary_labels == species)
        if len(members) < 2:
            continue
        members = rng.permutation(members)
        if folds > 1:
            offset = rng.integers(folds)
            val.extend(members[(np.arange(len(members)) + offset) % folds == fold])
        else:
            n_val = min(max(int(round(val_fraction * len(members))), 1), len(members) - 1)
            val.extend(members[:n_val])
    val = np.sort(np.asarray(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(primary_labels)), val)
    return train, val




def audio_names(table: pd.DataFrame) -> list[str]:
    """Each recording's path relative to its folder's audio root, as infer.py --detections and
    extras.csv name it ("asbfly/XC134896.ogg"; 2021: "<primary_label>/<filename>")."""
    roots = {source: (Path(source) / detect_layout(source).audio).resolve() for source in set(table["source"])}
    return [Path(path).relative_to(roots[source]).as_posix() for path, source in zip(table["path"], table["source"])]


def match_recordings(filenames, table: pd.DataFrame) -> np.ndarray:
    """extras.csv / detections filenames -> row of `table` (-1 where no recording has that name)."""
    index = {}
    for row, name in enumerate(audio_names(table)):
        index.setdefault(name, row)          # several folders: the first, as read_training_data keeps it
    return np.array([index.get(str(name), -1) for name in filenames], dtype=np.int64)


def ensure_demo_data(data_dir) -> Path:
    """The default --data-dir is the demo folder, generated on first use."""
    data_dir = Path(data_dir)
    if data_dir.resolve() == DEMO_DIR and not (data_dir / "train_metadata.csv").is_file():
        log.warning("writing the built-in demo data set to %s (first use)", data_dir)
        demo.write_demo_dataset(data_dir)
    return data_dir


# ----------------------------------------------------------------------------- the datasets

def build_datasets(settings: DataSettings, out_dir: Path) -> tuple[list[str], loader.RecordingDataset,
                                                                   loader.RecordingDataset]:
    """The data settings -> (labels, training set, validation set).

    The training set is the training split's recordings (crops by --crop-policy), then
    --extras windows, then --nocall windows, then --soundscape-labels windows (all fixed 5-s
    windows); `train_set.extras` and `train_set.soundscape` mark the extra and the soundscape
    windows for the sampler and its audit, `train_set.weights` holds each window's loss weight.
    Under torchrun every rank builds the same sets (checked).
    """
    crop = settings.crop
    table, labels, cache = read_usable_recordings(settings.data_dirs, out_dir, strict=settings.strict,
                                                  add_nocall=settings.nocall is not None,
                                                  cache_dir=settings.cache, crop=crop)
    train_index, val_index = split_usable_recordings(table, settings.split)
    targets = make_targets(table, labels, settings.secondary_weight)
    windows = training_windows(table, train_index, out_dir, settings.extras, settings.nocall, settings.strict)
    warn_if_training_hears_the_bed(windows, settings.background_dir, settings.val_soundscapes)
    train_targets = np.zeros((len(windows), len(labels)), dtype=np.float32)       # (N, C)
    known = (windows["record"] >= 0).to_numpy()
    train_targets[known] = targets[windows["record"].to_numpy()[known]]          # a recording's own targets
    if not known.all():
        train_targets[~known, labels.index(soundscapes.NOCALL)] = 1.0
    weights = np.ones(len(windows), dtype=np.float32)
    if settings.soundscape_windows is not None:
        frame, scapes = soundscape_windows(settings.soundscape_windows, labels, settings)
        windows = pd.concat([windows, frame], ignore_index=True)
        train_targets = np.concatenate([train_targets, scapes.targets])
        weights = np.concatenate([weights, scapes.weights])
    seed = settings.split.seed            # train.py's --seed: the split's and the crops' streams
    train_set = loader.RecordingDataset(windows["path"], windows["duration"], train_targets, crop, seed,
                                        windows["primary_label"], windows["start_s"], cache, windows["cache_row"],
                                        chunks=np.where(windows["kind"] == "extra", settings.extras_chunk, 0.0),
                                        anywhere=(windows["kind"] == "nocall").to_numpy())
    train_set.extras = (windows["kind"] == "extra").to_numpy()
    train_set.soundscape = (windows["kind"] == "soundscape").to_numpy()
    train_set.weights = weights
    val = table.iloc[val_index]
    val_set = loader.RecordingDataset(val["path"], val["duration"], targets[val_index], crop, seed,
                                      val["primary_label"], cache=cache, cache_rows=val["cache_row"])
    counts = windows["kind"].value_counts()
    log.info("%d species, %d training recordings (+%d extra windows, +%d no-call windows, +%d soundscape windows), "
             "%d validation recordings", len(labels), len(train_index), counts.get("extra", 0),
             counts.get("nocall", 0), counts.get("soundscape", 0), len(val_index))
    check_same_data_on_every_rank(labels, train_set, val_set)
    return labels, train_set, val_set


def read_usable_recordings(data_dirs: Sequence[str], out_dir: Path, *, strict: bool, add_nocall: bool,
                           cache_dir: str | None, crop: audio.CropSettings | None):
    """Metadata of `data_dirs` (the demo folder written on first use), the vocabulary (+ nocall with
    `add_nocall`), the cache in `cache_dir` (read with `crop`'s settings), and a header check (unreadable
    files refused with `strict`) -> (usable recordings with their `duration` (s) and `cache_row` (row in
    the cache, which knows every recording), labels, cache or None)."""
    if distributed.is_main_process():  # bad_files.csv is rewritten, and the demo folder written, by rank 0
        (out_dir / "bad_files.csv").unlink(missing_ok=True)
        for folder in data_dirs:
            ensure_demo_data(folder)
    distributed.barrier()
    table, labels = read_training_data(data_dirs)
    if add_nocall and soundscapes.NOCALL not in labels:
        labels = labels + [soundscapes.NOCALL]
    cache = (cache_lib.open_for_training(cache_dir, audio_names(table), list(table["path"]), crop)
             if cache_dir else None)
    table["cache_row"] = np.arange(len(table))
    headers = usable_headers(table["path"], strict, out_dir / "bad_files.csv")
    table["duration"] = [header[0] / header[1] if header else np.nan for header in headers]
    table = table[[header is not None for header in headers]].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"none of the recordings in {' '.join(map(str, data_dirs))} can be read")
    missing = sorted(set(labels) - set(table["primary_label"]) - {soundscapes.NOCALL})
    if missing:
        log.warning("%d species of the vocabulary have no usable recording (they can never be predicted "
                    "well): %s", len(missing), " ".join(missing[:20]))
    return table, labels, cache


def split_usable_recordings(table: pd.DataFrame, split: SplitSettings) -> tuple[np.ndarray, np.ndarray]:
    """The split of the usable recordings by --seed, --val-fraction, --folds and --fold -> (train rows,
    validation rows): the one split train.py and `python data.py soundscapes` both use."""
    train_index, val_index = split_recordings(table["primary_label"], split.val_fraction,
                                              split.folds, split.fold, split.seed)
    if len(val_index) == 0:
        raise ValueError("the validation split is empty (every species has fewer than 2 recordings)")
    return train_index, val_index


def training_windows(table: pd.DataFrame, train_index, out_dir: Path, extras: str | None,
                     nocall: NocallSources | None, strict: bool) -> pd.DataFrame:
    """The training set's rows, in order: the split's recordings (start_s NaN: cropped by
    --crop-policy), the `extras` table's windows, the `nocall` sources' windows -> record (row of
    `table`; -1 for no-call), path, duration, start_s, primary_label, cache_row, kind (recording,
    extra, nocall)."""
    columns = ["record", "path", "duration", "start_s", "primary_label", "cache_row", "kind"]
    recordings = table.iloc[train_index].assign(record=train_index, start_s=np.nan, kind="recording")
    parts = [recordings[columns]]
    if extras:
        records, starts = extra_windows(extras, table, train_index)
        parts.append(table.iloc[records].assign(record=records, start_s=starts, kind="extra")[columns])
    if nocall is not None:
        windows = nocall_windows(nocall, table, train_index, out_dir, strict)
        parts.append(windows.assign(record=-1, primary_label=soundscapes.NOCALL, cache_row=-1, kind="nocall")[columns])
    return pd.concat(parts, ignore_index=True)


def usable_headers(paths, strict: bool, bad_files_path: Path) -> list:
    """Each file's (frames, rate), None for an unreadable one; those are listed in bad_files.csv
    and logged (or, with `strict` (--strict), refused)."""
    headers, bad = audio.check_audio_files(paths)
    if bad and strict:
        raise ValueError(f"--strict: {len(bad)} of {len(headers)} recordings cannot be read, e.g. "
                         f"{bad[0][0]} ({bad[0][1]})")
    if bad and distributed.is_main_process():
        with open(bad_files_path, "a", newline="") as handle:  # recordings, then --nocall files
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(["path", "reason"])
            writer.writerows(bad)
        for path, reason in bad:
            log.warning("skipping unreadable recording %s (%s)", path, reason)
        log.warning("%d of %d files skipped; listed in %s", len(bad), len(headers), bad_files_path)
    return headers


def extra_windows(extras_path, table: pd.DataFrame, train_index) -> tuple[list[int], list[float]]:
    """--extras rows -> (recording index, window start) for windows of training-split recordings.

    Windows of validation recordings are dropped (they would leak the validation
    clips into training); windows of recordings not in the metadata are dropped
    and counted. Each window gets its recording's targets (primary + secondary).
    """
    extras = extras_lib.read_extras(extras_path)
    recording = match_recordings(extras["filename"], table)
    in_train = np.isin(recording, np.asarray(train_index))
    unknown, in_validation = int((recording < 0).sum()), int(((recording >= 0) & ~in_train).sum())
    log.info("--extras %s: %d windows of %d training recordings used; %d dropped (their recording is in the "
             "validation split), %d dropped (no such usable recording)", extras_path, int(in_train.sum()),
             len(np.unique(recording[in_train])), in_validation, unknown)
    return [int(r) for r in recording[in_train]], [float(s) for s in extras["start_s"][in_train]]


def nocall_windows(sources: NocallSources, table: pd.DataFrame, train_index, out_dir: Path,
                   strict: bool) -> pd.DataFrame:
    """Background windows for the nocall class -> path, start_s (NaN: a crop anywhere, drawn per epoch),
    duration, source (the flag). In the order training draws them: --nocall-audio files, then
    --nocall-soundscapes rows, then --nocall-detections windows."""
    parts = []
    if sources.audio_dir:  # whole files of background audio, cropped anywhere (a bed has no calls at its ends)
        files = [str(path) for path in audio.audio_files(sources.audio_dir)]
        parts.append(pd.DataFrame({"path": files, "start_s": np.nan, "source": "--nocall-audio"}))
    if sources.soundscapes:
        parts.append(nocall_soundscape_rows(sources).assign(source="--nocall-soundscapes"))
    if sources.detections:
        chosen = extras_lib.select_nocall_detections(pd.read_csv(sources.detections, keep_default_na=False),
                                                     sources.max_score, sources.per_recording)
        recording = match_recordings(chosen["filename"], table)
        keep = np.isin(recording, np.asarray(train_index))  # quiet windows of validation recordings stay out
        parts.append(pd.DataFrame({"path": table["path"].to_numpy()[recording[keep]],
                                   "start_s": chosen["start_s"].to_numpy()[keep], "source": "--nocall-detections"}))
    if not parts:
        raise ValueError("--nocall needs background audio: --nocall-audio, --nocall-soundscapes or "
                         "--nocall-detections")
    windows = pd.concat(parts, ignore_index=True)
    headers = usable_headers(windows["path"], strict, out_dir / "bad_files.csv")
    windows["duration"] = [header[0] / header[1] if header else np.nan for header in headers]
    windows = windows[windows["duration"].notna()].reset_index(drop=True)
    if windows.empty:
        raise ValueError("--nocall found no background window: give --nocall-audio, --nocall-soundscapes or "
                         "--nocall-detections with at least one usable window")
    for source, count in windows.groupby("source", sort=False).size().items():
        log.info("nocall class: %d window(s) from %s", count, source)
    return windows


def nocall_soundscape_rows(sources: NocallSources) -> pd.DataFrame:
    """--nocall-soundscapes -> path, start_s: the no-call rows of a labelled table, the rows a teacher's
    probability table scores below --nocall-max-score for every species, or every row of a folder."""
    if Path(sources.soundscapes).is_dir():
        log.warning("--nocall-soundscapes %s: every window of a folder trains the no-call class, but unlabelled "
                    "recordings of a site usually hold the target birds. Label them with a teacher (infer.py "
                    "--format csv) and pass that table instead", sources.soundscapes)
    if Path(sources.soundscapes).is_file() and pseudo_labels.is_probability_table(sources.soundscapes):
        quiet = pseudo_labels.quiet_windows(sources.soundscapes, sources.max_score)
        audio_dir = Path(sources.soundscape_audio or Path(sources.soundscapes).parent)
        paths, _ = pseudo_labels.file_paths(quiet, audio_dir, sources.soundscapes)
        return pd.DataFrame({"path": paths, "start_s": quiet["start_s"].to_numpy(dtype=float)})
    return soundscapes.nocall_soundscape_rows(sources.soundscapes)


def soundscape_windows(source: pseudo_labels.PseudoLabelSettings, labels: list[str],
                       settings: DataSettings) -> tuple[pd.DataFrame, pseudo_labels.WindowTable]:
    """--soundscape-labels windows as training rows (training_windows' columns, kind "soundscape") with
    their targets and weights; the files --val-soundscapes or --test-soundscapes score lend none."""
    held_out = [path for path in (settings.val_soundscapes, settings.test_soundscapes) if path]
    table = pseudo_labels.without_held_out(pseudo_labels.read_windows(source, labels), held_out, source.table)
    frame = pd.DataFrame({"record": -1, "path": table.paths, "duration": table.durations, "start_s": table.starts,
                          "primary_label": SOUNDSCAPE_WINDOW, "cache_row": -1, "kind": "soundscape"})
    return frame, table


def warn_if_training_hears_the_bed(windows: pd.DataFrame, background_dir: str | None,
                                   val_soundscapes: str | None) -> list[str]:
    """Audio training hears -- the `background_dir` (--bg-dir) files and the no-call windows (`training_windows`'
    rows of kind nocall) -- that is also the bed of the `val_soundscapes` pseudo-soundscapes (their beds.txt)
    -> those files, with a warning: a model that learnt the very bed scores better on them without scoring
    better in the field, so the pseudo-soundscape metric would flatter it."""
    beds_file = Path(val_soundscapes).parent / pseudo_soundscapes.BEDS_FILE if val_soundscapes else None
    if beds_file is None or not beds_file.is_file():
        return []
    beds = set(beds_file.read_text().split("\n")) - {""}
    heard = [str(path) for path in audio.audio_files(background_dir)] if background_dir else []
    heard += list(windows.loc[windows["kind"] == "nocall", "path"].unique())     # read once, by nocall_windows
    shared = sorted({str(Path(path).resolve()) for path in heard} & beds)
    if shared:
        log.warning("%d background file(s) that training hears (--bg-dir, --nocall-audio, --nocall-soundscapes) "
                    "are the bed of the pseudo-soundscapes in %s (e.g. %s): their score will flatter this run. "
                    "Build the pseudo-soundscapes over other files (split the folder)", len(shared),
                    beds_file.parent, Path(shared[0]).name)
    return shared


def data_fingerprint(labels, train_set, val_set) -> str:
    """A hash of what a run trains and validates on: the labels, each training window (its file by
    species folder and name, so a moved --data-dir matches; start; targets) and each validation
    file. A checkpoint stores it, so a resume on other data (a metadata row removed, another
    split) is refused instead of silently recomputing the split."""
    def names(paths):
        return ["/".join(Path(path).parts[-2:]) for path in paths]
    digest = hashlib.sha1("\n".join(map(str, [labels, names(train_set.paths), train_set.starts.tolist(),
                                                names(val_set.paths)])).encode())
    digest.update(np.ascontiguousarray(train_set.targets, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(val_set.targets, dtype=np.float32).tobytes())
    return digest.hexdigest()


def check_same_data_on_every_rank(labels, train_set, val_set) -> None:
    """Under torchrun each rank reads the metadata and file headers itself; a file that only some
    ranks can read (flaky shared storage) would give them different draws and hang the job."""
    summary = data_fingerprint(labels, train_set, val_set)
    if len(set(distributed.gather_objects(summary))) > 1:
        raise ValueError("the processes read different data (labels, usable recordings or windows differ "
                         "between ranks): check that every machine sees the same --data-dir files")


# ----------------------------------------------------------------------------- command line
#
# Each subcommand's flags are defined by the module that does its work (its `add_command`). Only
# `main` sees the parsed namespace: it turns it into plain values and settings at once.

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_command(commands)
    extras_lib.add_command(commands)
    cache_lib.add_command(commands)
    pseudo_soundscapes.add_command(commands)
    return parser


def cache_command(command: cache_lib.CacheCommand) -> Path:
    """`python data.py cache`: the recordings of --data-dir (read here: cache.py may not import this
    module) decoded into the cache."""
    table, _ = read_training_data([ensure_demo_data(folder) for folder in command.data_dirs])
    return cache_lib.build_cache(audio_names(table), list(table["path"]), command.out, command.settings,
                                 command.workers)


def soundscapes_command(data_dirs: Sequence[str], split: SplitSettings,
                        command: pseudo_soundscapes.SoundscapesCommand) -> pd.DataFrame:
    """`python data.py soundscapes`: pseudo-soundscapes of the validation split's recordings only, the
    split train.py draws from the same `split` (read here, as build_datasets reads it: without the no-call
    class, a cache or --strict, none of which changes which recordings are usable or how they split)."""
    out_dir = Path(command.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, labels, _ = read_usable_recordings(data_dirs, out_dir, strict=False, add_nocall=False, cache_dir=None,
                                              crop=None)
    _, val_index = split_usable_recordings(table, split)
    recordings = table.iloc[val_index].reset_index(drop=True)
    recordings["name"] = audio_names(recordings)
    return pseudo_soundscapes.run(recordings, command, labels)


def main(argv=None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run_command(args)
    elif args.command == "extras":
        extras_lib.run_command(args, parser)
    elif args.command == "cache":
        cache_command(cache_lib.command_from_args(args))
    elif args.command == "soundscapes":
        split = SplitSettings(seed=args.seed, val_fraction=args.val_fraction, folds=args.folds, fold=args.fold)
        soundscapes_command(tuple(args.data_dir), split, pseudo_soundscapes.command_from_args(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:   # CacheError is a ValueError
        log.error("%s", error)
        sys.exit(1)
