"""Data: BirdCLEF metadata, the label vocabulary, the split, and the datasets train.py trains on.

    python data.py demo --out DIR               writes the built-in synthetic demo data set
    python data.py cache --out DIR ...          decodes the crops' audio once (train.py --cache DIR)
    python data.py extras --detections CSV ...  selects detector-built extra windows (train.py --extras)
    python data.py soundscapes --out DIR ...    labelled pseudo-soundscapes from the validation split

`build_datasets(args, out_dir)` is the whole path from --data-dir to the training
and validation datasets: metadata of one or more BirdCLEF years, the vocabulary,
a header check of every file (unreadable ones listed in bad_files.csv), the
stratified split, then the training set's extra windows (--extras) and no-call
windows (--nocall). Decoding and crops are audio.py's job, batches loader.py's,
which records an epoch visits sampling.py's.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import audio
import cache as cache_lib
import demo
import distributed
import extras as extras_lib
import loader
import pseudo_soundscapes
import soundscapes

log = logging.getLogger("birdclef")

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"


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

def build_datasets(args, out_dir: Path) -> tuple[list[str], loader.RecordingDataset, loader.RecordingDataset]:
    """--data-dir and the other data flags -> (labels, training set, validation set).

    The training set is the training split's recordings (crops by --crop-policy), then
    --extras windows, then --nocall windows (both fixed 5-s windows); `train_set.extras`
    marks the extra windows for the sampling audit. Under torchrun every rank builds
    the same sets (checked).
    """
    crop = audio.CropSettings(args.sample_rate, args.window_seconds, args.crop_policy, args.ends_seconds, args.pad)
    table, labels, cache = read_usable_recordings(args, out_dir, crop)
    train_index, val_index = split_usable_recordings(table, args)
    targets = make_targets(table, labels, args.secondary_weight)
    windows = training_windows(args, table, train_index, out_dir)
    warn_if_training_hears_the_bed(args, windows)
    train_targets = np.zeros((len(windows), len(labels)), dtype=np.float32)       # (N, C)
    known = (windows["record"] >= 0).to_numpy()
    train_targets[known] = targets[windows["record"].to_numpy()[known]]          # a recording's own targets
    if not known.all():
        train_targets[~known, labels.index(soundscapes.NOCALL)] = 1.0
    train_set = loader.RecordingDataset(windows["path"], windows["duration"], train_targets, crop, args.seed,
                                        windows["primary_label"], windows["start_s"], cache, windows["cache_row"],
                                        chunks=np.where(windows["kind"] == "extra", args.extras_chunk, 0.0),
                                        anywhere=(windows["kind"] == "nocall").to_numpy())
    train_set.extras = (windows["kind"] == "extra").to_numpy()
    val = table.iloc[val_index]
    val_set = loader.RecordingDataset(val["path"], val["duration"], targets[val_index], crop, args.seed,
                                      val["primary_label"], cache=cache, cache_rows=val["cache_row"])
    counts = windows["kind"].value_counts()
    log.info("%d species, %d training recordings (+%d extra windows, +%d no-call windows), %d validation "
             "recordings", len(labels), len(train_index), counts.get("extra", 0), counts.get("nocall", 0),
             len(val_index))
    check_same_data_on_every_rank(labels, train_set, val_set)
    return labels, train_set, val_set


def read_usable_recordings(args, out_dir: Path, crop: audio.CropSettings):
    """Metadata of --data-dir (the demo folder written on first use), the vocabulary (+ nocall), the
    --cache, and a header check -> (usable recordings with their `duration` (s) and `cache_row`
    (row in the cache, which knows every recording), labels, cache or None)."""
    if distributed.is_main_process():  # bad_files.csv is rewritten, and the demo folder written, by rank 0
        (out_dir / "bad_files.csv").unlink(missing_ok=True)
        for folder in args.data_dir:
            ensure_demo_data(folder)
    distributed.barrier()
    table, labels = read_training_data(args.data_dir)
    if args.nocall and soundscapes.NOCALL not in labels:
        labels = labels + [soundscapes.NOCALL]
    cache = (cache_lib.open_for_training(args.cache, audio_names(table), list(table["path"]), crop)
             if args.cache else None)
    table["cache_row"] = np.arange(len(table))
    headers = usable_headers(table["path"], args, out_dir / "bad_files.csv")
    table["duration"] = [header[0] / header[1] if header else np.nan for header in headers]
    table = table[[header is not None for header in headers]].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"none of the recordings in {' '.join(args.data_dir)} can be read")
    missing = sorted(set(labels) - set(table["primary_label"]) - {soundscapes.NOCALL})
    if missing:
        log.warning("%d species of the vocabulary have no usable recording (they can never be predicted "
                    "well): %s", len(missing), " ".join(missing[:20]))
    return table, labels, cache


def split_usable_recordings(table: pd.DataFrame, args) -> tuple[np.ndarray, np.ndarray]:
    """The split of the usable recordings by --seed, --val-fraction, --folds and --fold -> (train rows,
    validation rows): the one split train.py and `python data.py soundscapes` both use."""
    train_index, val_index = split_recordings(table["primary_label"], args.val_fraction,
                                              args.folds, args.fold, args.seed)
    if len(val_index) == 0:
        raise ValueError("the validation split is empty (every species has fewer than 2 recordings)")
    return train_index, val_index


def training_windows(args, table: pd.DataFrame, train_index, out_dir: Path) -> pd.DataFrame:
    """The training set's rows, in order: the split's recordings (start_s NaN: cropped by
    --crop-policy), --extras windows, --nocall windows -> record (row of `table`; -1 for no-call),
    path, duration, start_s, primary_label, cache_row, kind (recording, extra, nocall)."""
    columns = ["record", "path", "duration", "start_s", "primary_label", "cache_row", "kind"]
    recordings = table.iloc[train_index].assign(record=train_index, start_s=np.nan, kind="recording")
    parts = [recordings[columns]]
    if args.extras:
        records, starts = extra_windows(args.extras, table, train_index)
        parts.append(table.iloc[records].assign(record=records, start_s=starts, kind="extra")[columns])
    if args.nocall:
        nocall = nocall_windows(args, table, train_index, out_dir)
        parts.append(nocall.assign(record=-1, primary_label=soundscapes.NOCALL, cache_row=-1, kind="nocall")[columns])
    return pd.concat(parts, ignore_index=True)


def usable_headers(paths, args, bad_files_path: Path) -> list:
    """Each file's (frames, rate), None for an unreadable one; those are listed in bad_files.csv
    and logged (or, with --strict, refused)."""
    headers, bad = audio.check_audio_files(paths)
    if bad and args.strict:
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


def nocall_windows(args, table: pd.DataFrame, train_index, out_dir: Path) -> pd.DataFrame:
    """Background windows for the nocall class -> path, start_s (NaN: a crop anywhere, drawn per epoch), duration."""
    parts = []
    if args.bg_dir:  # whole files of background audio, cropped anywhere (a bed has no calls at its ends)
        files = [str(path) for path in audio.audio_files(args.bg_dir)]
        parts.append(pd.DataFrame({"path": files, "start_s": np.nan, "source": "--bg-dir"}))
    if args.nocall_soundscapes:
        rows = soundscapes.nocall_soundscape_rows(args.nocall_soundscapes)
        parts.append(rows.assign(source="--nocall-soundscapes"))
    if args.nocall_detections:
        chosen = extras_lib.select_nocall_detections(pd.read_csv(args.nocall_detections, keep_default_na=False),
                                                     args.nocall_max_score, args.nocall_per_recording)
        recording = match_recordings(chosen["filename"], table)
        keep = np.isin(recording, np.asarray(train_index))  # quiet windows of validation recordings stay out
        parts.append(pd.DataFrame({"path": table["path"].to_numpy()[recording[keep]],
                                   "start_s": chosen["start_s"].to_numpy()[keep], "source": "--nocall-detections"}))
    if not parts:
        raise ValueError("--nocall needs background audio: --bg-dir, --nocall-soundscapes or --nocall-detections")
    windows = pd.concat(parts, ignore_index=True)
    headers = usable_headers(windows["path"], args, out_dir / "bad_files.csv")
    windows["duration"] = [header[0] / header[1] if header else np.nan for header in headers]
    windows = windows[windows["duration"].notna()].reset_index(drop=True)
    if windows.empty:
        raise ValueError("--nocall found no background window: give --bg-dir, --nocall-soundscapes or "
                         "--nocall-detections with at least one usable window")
    for source, count in windows.groupby("source", sort=False).size().items():
        log.info("nocall class: %d window(s) from %s", count, source)
    return windows


def warn_if_training_hears_the_bed(args, windows: pd.DataFrame) -> list[str]:
    """--bg-dir audio and no-call windows (`training_windows`' rows of kind nocall) that are also the bed of
    the --val-soundscapes pseudo-soundscapes (their beds.txt) -> those files, with a warning: a model that
    learnt the very bed scores better on them without scoring better in the field, so the pseudo-soundscape
    metric would flatter it."""
    beds_file = Path(args.val_soundscapes).parent / pseudo_soundscapes.BEDS_FILE if args.val_soundscapes else None
    if beds_file is None or not beds_file.is_file():
        return []
    beds = set(beds_file.read_text().split("\n")) - {""}
    heard = [str(path) for path in audio.audio_files(args.bg_dir)] if args.bg_dir else []
    heard += list(windows.loc[windows["kind"] == "nocall", "path"].unique())     # read once, by nocall_windows
    shared = sorted({str(Path(path).resolve()) for path in heard} & beds)
    if shared:
        log.warning("%d background file(s) that training hears (--bg-dir, --nocall-soundscapes) are the bed of the "
                    "pseudo-soundscapes in %s (e.g. %s): their score will flatter this run. Build the "
                    "pseudo-soundscapes over other files (split the folder)", len(shared), beds_file.parent,
                    Path(shared[0]).name)
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

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    demo_parser = commands.add_parser("demo", help="write the synthetic demo data set (BirdCLEF 2024 layout)",
                                      formatter_class=formatter)
    demo_parser.add_argument("--out", default=str(DEMO_DIR), help="folder to write")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo_parser.add_argument("--median-seconds", type=float, default=10.0,
                             help="median recording length (~40 for real-length xeno-canto recordings)")
    extras_parser = commands.add_parser("extras", help="select extra training windows from infer.py --detections",
                                        formatter_class=formatter)
    extras_parser.add_argument("--detections", required=True, help="CSV written by infer.py --detections")
    extras_parser.add_argument("--threshold", type=float, default=0.5, help="primary-label score of a detection")
    extras_parser.add_argument("--min", type=int, default=4, help="extras per recording, at least (if it has them)")
    extras_parser.add_argument("--max", type=int, default=12, help="extras per recording, at most")
    extras_parser.add_argument("--divisor", type=float, default=1.5, help="extras = floor(detections / divisor)")
    extras_parser.add_argument("--keep-all-below", type=int, default=12,
                               help="species with fewer recordings keep all their detections")
    extras_parser.add_argument("--score", choices=list(extras_lib.SCORES), default="primary",
                               help="a detection's score: its recording's primary label's, or the best of any species")
    extras_parser.add_argument("--choose", choices=extras_lib.CHOICES, default="best",
                               help="which detections of a recording become extras: the best-scoring, or random ones")
    extras_parser.add_argument("--seed", type=int, default=0, help="seed of --choose random")
    extras_parser.add_argument("--skip-start", type=float, default=0.0,
                               help="no extra from the first this many seconds of a recording")
    extras_parser.add_argument("--skip-end", type=float, default=0.0,
                               help="no extra from the last this many seconds of a recording")
    extras_parser.add_argument("--out", default="extras.csv", help="where to write the selection")
    extras_parser.add_argument("--write-audio", default=None, help="also write each extra as an ogg chunk here")
    extras_parser.add_argument("--audio-dir", default=None, help="train_audio folder, with --write-audio")
    extras_parser.add_argument("--chunk", type=float, default=8.0, help="seconds per written chunk")
    cache_parser = commands.add_parser("cache", help="decode the audio the crop policy needs, once, into a "
                                       "memory-mapped int16 cache for train.py --cache", formatter_class=formatter)
    cache_parser.add_argument("--data-dir", nargs="+", default=[str(DEMO_DIR)], help="as train.py --data-dir")
    cache_parser.add_argument("--out", required=True, help="cache folder (pass it to train.py --cache)")
    cache_parser.add_argument("--sample-rate", type=int, default=32000, help="as train.py --sample-rate")
    cache_parser.add_argument("--crop-policy", choices=audio.CROP_POLICIES, default="ends", help="as train.py")
    cache_parser.add_argument("--ends-seconds", type=float, default=8.0, help="as train.py")
    cache_parser.add_argument("--window-seconds", type=float, default=5.0, help="as train.py")
    cache_parser.add_argument("--max-seconds", type=float, default=0.0,
                              help="cache at most this many seconds per recording (0 = what the policy needs); "
                                   "crops outside are decoded during training")
    cache_parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    add_soundscapes_parser(commands)
    return parser


def add_soundscapes_parser(commands) -> None:
    defaults = pseudo_soundscapes.PlacementSettings()
    parser = commands.add_parser("soundscapes", help="labelled pseudo-soundscapes from the validation split's "
                                 "recordings, for train.py --val-soundscapes DIR/labels.csv",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", nargs="+", default=[str(DEMO_DIR)], help="as train.py --data-dir")
    parser.add_argument("--out", required=True, help="folder to write (soundscapes, labels.csv, placements.csv)")
    parser.add_argument("--seed", type=int, default=42, help="the split's seed: as train.py --seed")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="as train.py --val-fraction")
    parser.add_argument("--folds", type=int, default=0, help="as train.py --folds")
    parser.add_argument("--fold", type=int, default=0, help="as train.py --fold")
    parser.add_argument("--bg-dir", default=None, help="background audio to lay the calls over (e.g. 2024's "
                        "unlabeled_soundscapes/, no-call parts of 2021/2022 soundscapes, a noise collection)")
    parser.add_argument("--detections", default=None, help="infer.py --detections table of the training audio: "
                        "calls come from each recording's best windows, the bed (without --bg-dir) from the quietest")
    parser.add_argument("--count", type=int, default=defaults.count, help="soundscapes to write")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="length of each soundscape")
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate, help="of the written soundscapes")
    parser.add_argument("--empty-share", type=float, default=defaults.empty_share, help="share of rows without a call")
    parser.add_argument("--max-calls", type=int, default=defaults.max_calls,
                        help="calls of different species in one row, at most")
    parser.add_argument("--call-seconds", type=float, default=defaults.call_seconds, help="length of each call")
    parser.add_argument("--snr", type=float, nargs=2, default=list(defaults.snr_db), metavar=("LOW", "HIGH"),
                        help="SNR of a call over the bed where it lies, in dB, before the distance gain")
    parser.add_argument("--distance-prob", type=float, default=defaults.distance_prob,
                        help="share of calls heard from a distance (a gain and a low-pass)")
    parser.add_argument("--distance-db", type=float, nargs=2, default=list(defaults.distance_db),
                        metavar=("LOW", "HIGH"), help="gain of a distant call in dB")
    parser.add_argument("--distance-lowpass", type=float, nargs=2, default=list(defaults.distance_lowpass_hz),
                        metavar=("LOW_HZ", "HIGH_HZ"), help="low-pass cutoff of a distant call (log-uniform)")
    parser.add_argument("--reverb-prob", type=float, default=defaults.reverb_prob, help="share of calls reverberated")
    parser.add_argument("--reverb-rt60", type=float, nargs=2, default=list(defaults.reverb_rt60),
                        metavar=("LOW", "HIGH"), help="reverberation time range in seconds")
    parser.add_argument("--placement-seed", type=int, default=defaults.seed,
                        help="seed of every placement (the split has --seed)")
    parser.add_argument("--denoise-calls", action="store_true",
                        help="take each call piece's own noise floor out first (spectral subtraction), so a "
                             "call does not bring its recording's background into the soundscape")
    parser.set_defaults(nocall=False, cache=None, strict=False)   # read like train.py reads its data


def soundscapes_command(args) -> pd.DataFrame:
    """`python data.py soundscapes`: pseudo-soundscapes of the validation split's recordings only."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, _, _ = read_usable_recordings(args, out_dir, crop=None)
    _, val_index = split_usable_recordings(table, args)
    recordings = table.iloc[val_index].reset_index(drop=True)
    recordings["name"] = audio_names(recordings)
    settings = pseudo_soundscapes.PlacementSettings(
        count=args.count, seconds=args.seconds, sample_rate=args.sample_rate, empty_share=args.empty_share,
        max_calls=args.max_calls, call_seconds=args.call_seconds, snr_db=tuple(args.snr),
        distance_prob=args.distance_prob, distance_db=tuple(args.distance_db),
        distance_lowpass_hz=tuple(args.distance_lowpass), reverb_prob=args.reverb_prob,
        reverb_rt60=tuple(args.reverb_rt60), seed=args.placement_seed, denoise_calls=args.denoise_calls)
    detections = pd.read_csv(args.detections, keep_default_na=False) if args.detections else None
    return pseudo_soundscapes.build(recordings, out_dir, settings, args.bg_dir, detections)


def main(argv=None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "cache":
        settings = cache_lib.cache_settings(args.sample_rate, args.crop_policy, args.ends_seconds,
                                            args.window_seconds, args.max_seconds)
        table, _ = read_training_data([ensure_demo_data(folder) for folder in args.data_dir])
        cache_lib.build_cache(audio_names(table), list(table["path"]), args.out, settings, args.workers)
    elif args.command == "demo":
        demo.write_demo_dataset(args.out, seed=args.seed, median_seconds=args.median_seconds)
    elif args.command == "extras":
        if args.write_audio and not args.audio_dir:
            parser.error("--write-audio needs --audio-dir")
        extras_lib.extras_command(args)
    elif args.command == "soundscapes":
        soundscapes_command(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:   # CacheError is a ValueError
        log.error("%s", error)
        sys.exit(1)
