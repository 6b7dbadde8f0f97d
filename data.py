"""Data: BirdCLEF metadata, the label vocabulary, the split, audio crops, the demo set.

Audio is decoded with soundfile, mixed to mono, resampled to the model's rate
with torchaudio and returned as float32 waveforms; the spectrogram is the
model's job (model.py), so nothing here can drift from inference.

Randomness: every random choice for a training draw (which crop) comes from a
generator seeded by (seed, epoch, position in the epoch). A run therefore
produces the same batches whatever the number of loader workers, and a resumed
run continues exactly where the interrupted one stopped.

    python data.py demo --out DIR               writes the built-in synthetic demo data set
    python data.py cache --out DIR ...          decodes the crops' audio once (train.py --cache DIR)
    python data.py extras --detections CSV ...  selects detector-built extra windows (train.py --extras)
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import multiprocessing
import os
import queue
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

log = logging.getLogger("birdclef")

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
CROP_POLICIES = ("ends", "random")
ROW_SECONDS = 5.0           # BirdCLEF labels and scores 5-second rows
AUDIO_EXTENSIONS = (".ogg", ".mp3", ".flac", ".wav")
NOCALL = "nocall"           # the no-call class (train.py --nocall); never a submission column


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

    audio_root = (data_dir / layout.audio).resolve()
    urls = table["url"] if "url" in table.columns else [""] * len(table)
    secondary, paths, recording_ids = [], [], []
    for row_number, (primary, text, filename, url) in enumerate(
            zip(table["primary_label"], table["secondary_labels"], table["filename"], urls), start=2):
        secondary.append(parse_label_list(text, f"{csv_path} row {row_number}"))
        relative = filename if layout.folder_in_filename else Path(primary) / filename
        path = (audio_root / relative).resolve()
        if not path.is_relative_to(audio_root):
            raise ValueError(f"{csv_path} row {row_number}: filename {filename!r} points outside {audio_root}")
        paths.append(str(path))
        recording_ids.append(xeno_canto_id(filename, url))
    table["secondary"] = secondary
    table["path"] = paths
    table["source"] = str(data_dir)
    table["recording_id"] = recording_ids
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
        columns = [column for column in pd.read_csv(sample_submission, nrows=0).columns if column != "row_id"]
        if columns and not set(columns) <= {"birds", "target"}:
            return columns
    return sorted(table["primary_label"].unique())


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


def drop_duplicate_recordings(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of each xeno-canto id (rows without one are all kept) -> (table, rows dropped).

    The kept row's secondary labels become the union over its copies (a later
    year may list more background species), without its own primary label.
    """
    has_id = table["recording_id"] != ""
    duplicate = has_id & table["recording_id"].duplicated(keep="first")
    if not duplicate.any():
        return table.reset_index(drop=True), 0
    united = {}
    for recording_id, secondary in zip(table["recording_id"][has_id], table["secondary"][has_id]):
        codes = united.setdefault(recording_id, [])
        codes += [code for code in secondary if code not in codes]
    kept = table[~duplicate].copy()
    kept["secondary"] = [
        [code for code in united[recording_id] if code != primary] if recording_id else secondary
        for recording_id, secondary, primary in zip(kept["recording_id"], kept["secondary"], kept["primary_label"])]
    return kept.reset_index(drop=True), int(duplicate.sum())


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


def check_audio_files(paths) -> tuple[list[tuple[int, float]], list[tuple[str, str]]]:
    """Read each file's header once: -> ([(frames, samplerate) or None], [(path, reason)])."""
    headers, bad = [], []
    for path in paths:
        try:
            if not Path(path).is_file():
                raise FileNotFoundError("file does not exist")
            info = sf.info(path)
            if info.frames <= 0 or info.samplerate <= 0:
                raise ValueError("no audio frames")
            headers.append((info.frames, info.samplerate))
        except Exception as error:  # missing, unreadable, not audio: all reported, none fatal
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            headers.append(None)
            bad.append((str(path), reason))
    return headers, bad


# ----------------------------------------------------------------------------- audio

class Resampler:
    """torchaudio.transforms.Resample's filter, applied without its zero taps.

    torchaudio resamples with one windowed-sinc kernel per output phase, each as long
    as `orig` input samples plus the filter's reach, by a dense strided convolution.
    Between rates with a small common divisor nearly all taps are exactly zero
    (22.05 -> 32 kHz: 640 phases of 455 taps, 12-13 of them non-zero), so most of its
    work multiplies zeros. Here each row of a matrix holds the input of `frames_per_row`
    consecutive frames (enough for >= 64 output samples, so a ratio like 3:2 still
    makes a well-shaped matrix product), and blocks of 16 output phases are multiplied
    with just the columns where their taps are non-zero. Same kernel, padding and
    length as torchaudio, so the same audio to float rounding (tested).
    """

    PHASES_PER_BLOCK = 16

    def __init__(self, source_rate: int, target_rate: int):
        reference = torchaudio.transforms.Resample(source_rate, target_rate)
        divisor = math.gcd(int(source_rate), int(target_rate))
        self.orig, self.new = int(source_rate) // divisor, int(target_rate) // divisor
        self.width = int(reference.width)
        kernel = reference.kernel[:, 0].float()           # (new, 2 * width + orig): one row per output phase
        self.frames_per_row = -(-4 * self.PHASES_PER_BLOCK // self.new)
        self.taps = kernel.shape[1] + (self.frames_per_row - 1) * self.orig
        expanded = torch.zeros((self.frames_per_row * self.new, self.taps))
        for frame in range(self.frames_per_row):    # frame m's phases read the input m * orig later
            expanded[frame * self.new:(frame + 1) * self.new,
                     frame * self.orig:frame * self.orig + kernel.shape[1]] = kernel
        self.blocks = []                            # (first phase, end phase, first tap, end tap, weights)
        for first in range(0, len(expanded), self.PHASES_PER_BLOCK):
            block = expanded[first:first + self.PHASES_PER_BLOCK]   # (phases, taps)
            used = torch.nonzero(block.abs().sum(dim=0)).flatten()
            low, high = int(used[0]), int(used[-1]) + 1
            self.blocks.append((first, first + len(block), low, high, block[:, low:high].T.contiguous()))

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) float32 -> (ceil(samples * new / orig),) float32."""
        length = len(waveform)
        n_rows = -(-(length // self.orig + 1) // self.frames_per_row)   # torchaudio's frames, grouped
        stride = self.frames_per_row * self.orig
        right = (n_rows - 1) * stride + self.taps - length - self.width  # torchaudio pads width + orig
        padded = torch.nn.functional.pad(waveform[None], (self.width, right))[0]
        rows = padded.as_strided((n_rows, self.taps), (stride, 1))      # (R, taps): each row's input
        out = torch.empty((n_rows, self.frames_per_row * self.new))        # (R, phases)
        for first, end, low, high, weights in self.blocks:
            out[:, first:end] = rows[:, low:high] @ weights                # (R, used taps) @ (used taps, phases)
        return out.reshape(-1)[:math.ceil(self.new * length / self.orig)]


_resamplers: dict[tuple[int, int], Resampler] = {}


def to_mono_resampled(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """(frames, channels) float -> (samples,) float32 mono at target_rate, NaN/inf zeroed."""
    if audio.ndim == 2 and audio.shape[1] > 1:
        mono = audio.mean(axis=1, dtype=np.float32)
    else:  # already one channel: a view, not a 77 MB average over one column for a 10-min file
        mono = np.asarray(audio.reshape(len(audio)), dtype=np.float32)
    if not np.isfinite(mono).all():
        mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    if source_rate == target_rate or len(mono) == 0:
        return mono
    key = (source_rate, target_rate)
    if key not in _resamplers:  # the kernel is computed once per rate pair and process
        _resamplers[key] = Resampler(source_rate, target_rate)
    return _resamplers[key](torch.from_numpy(mono)).numpy()


def read_audio(path, sample_rate: int) -> np.ndarray:
    """A whole file -> (samples,) float32 mono at sample_rate (soundscapes; crops use read_window)."""
    audio, source_rate = sf.read(path, dtype="float32", always_2d=True)
    return to_mono_resampled(audio, source_rate, sample_rate)


def read_window(path, start_seconds: float, seconds: float, sample_rate: int, pad: str = "zero") -> np.ndarray:
    """Decode only [start, start + seconds) of a file -> (round(seconds*sample_rate),) float32.

    Seeks instead of decoding the whole file; pads with zeros past the end.
    """
    with sf.SoundFile(path) as audio_file:
        source_rate = audio_file.samplerate
        start = min(int(round(start_seconds * source_rate)), audio_file.frames)
        audio_file.seek(start)
        audio = audio_file.read(int(math.ceil(seconds * source_rate)), dtype="float32", always_2d=True)
    return fit_length(to_mono_resampled(audio, source_rate, sample_rate), int(round(seconds * sample_rate)), pad)


PAD_MODES = ("zero", "repeat")


def fit_length(waveform: np.ndarray, samples: int, pad: str = "zero") -> np.ndarray:
    """Cut or pad to `samples`: zeros after the end, or the clip repeated ("repeat")."""
    if len(waveform) >= samples:
        return waveform[:samples]
    if pad == "repeat" and len(waveform) > 0:
        return np.tile(waveform, -(-samples // len(waveform)))[:samples]
    if pad not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad!r}; expected one of {PAD_MODES}")
    return np.pad(waveform, (0, samples - len(waveform)))


def choose_crop_start(duration: float, window: float, policy: str, ends_seconds: float,
                      rng: np.random.Generator | None) -> float:
    """Start time (s) of the window to read. rng=None means evaluation: the first window.

    "ends" (the original recipe): pick the first or the last `ends_seconds` of the
    recording, then a random `window` inside it -- calls in xeno-canto recordings
    cluster at the start and the end. "random": anywhere in the recording.
    """
    if rng is None or duration <= window:
        return 0.0
    if policy == "random":
        return float(rng.uniform(0.0, duration - window))
    if policy == "ends":
        segment = min(max(ends_seconds, window), duration)  # never shorter than the window
        segment_start = 0.0 if rng.random() < 0.5 else duration - segment
        return segment_start + float(rng.uniform(0.0, max(segment - window, 0.0)))
    raise ValueError(f"unknown crop policy {policy!r}; expected one of {CROP_POLICIES}")


def fixed_window_start(row_start: float, duration: float, window: float) -> float:
    """Start of a `window`-second crop centred on the 5-s row starting at `row_start`,
    kept inside the recording (a 5-s window is the row itself)."""
    centred = row_start + (ROW_SECONDS - window) / 2
    return float(min(max(centred, 0.0), max(duration - window, 0.0)))


@dataclass
class CropSettings:
    sample_rate: int = 32000
    window_seconds: float = 5.0
    policy: str = "ends"
    ends_seconds: float = 8.0
    pad: str = "zero"          # clips shorter than the window: "zero" or "repeat"


class RecordingDataset(torch.utils.data.Dataset):
    """One crop per draw: item (record, epoch, position) -> dict, or None if the file fails.

    Training items are tuples from `EpochBatchSampler`, so the crop depends only on
    (seed, epoch, position). Evaluation items are plain indices: the first window.
    """

    def __init__(self, paths, durations, targets: np.ndarray, crop: CropSettings, seed: int = 0,
                 primary_labels=None, starts=None, cache: "AudioCache | None" = None, cache_rows=None):
        self.paths = list(paths)
        self.durations = list(durations)
        self.targets = targets
        self.crop = crop
        self.seed = seed
        self.primary_labels = list(primary_labels) if primary_labels is not None else None  # for samplers
        # a fixed 5-s window (extras, no-call rows of soundscapes) instead of a crop by policy; NaN: by policy
        self.starts = np.full(len(self.paths), np.nan) if starts is None else np.asarray(starts, dtype=np.float64)
        if len(self.starts) != len(self.paths):
            raise ValueError(f"{len(self.starts)} starts for {len(self.paths)} recordings")
        self.cache = cache  # decoded crops (python data.py cache); row -1: not in the cache
        self.cache_rows = np.full(len(self.paths), -1) if cache_rows is None else np.asarray(cache_rows)
        self.ring = None  # set for loader workers by `Loader`

    def __len__(self):
        return len(self.paths)

    @property
    def crop_samples(self) -> int:
        return int(round(self.crop.window_seconds * self.crop.sample_rate))

    def crop_start(self, item) -> tuple[int, float]:
        """item -> (record, start second of its crop)."""
        if isinstance(item, tuple):
            index, epoch, position = item
            rng = np.random.default_rng([self.seed, epoch, position])
        else:
            index, rng = item, None
        if np.isnan(self.starts[index]):
            return index, choose_crop_start(self.durations[index], self.crop.window_seconds,
                                            self.crop.policy, self.crop.ends_seconds, rng)
        return index, fixed_window_start(self.starts[index], self.durations[index], self.crop.window_seconds)

    def __getitem__(self, item):
        index, start = self.crop_start(item)
        try:
            waveform = None
            if self.cache is not None and self.cache_rows[index] >= 0:
                waveform = self.cache.window(self.cache_rows[index], start, self.crop.window_seconds, self.crop.pad)
            if waveform is None:  # not cached, or a crop the cache does not cover
                waveform = self.decode(index, start)
        except Exception as error:  # the header was fine but decoding failed: skip, never crash
            log.warning("skipping %s: %s: %s", self.paths[index], type(error).__name__, error)
            return None
        return {"waveform": torch.from_numpy(waveform), "target": torch.from_numpy(self.targets[index]),
                "path": self.paths[index], "index": index}

    def decode(self, index: int, start: float) -> np.ndarray:
        waveform = read_window(self.paths[index], start, self.crop.window_seconds, self.crop.sample_rate,
                               self.crop.pad)
        return waveform if self.cache is None else to_int16(waveform)  # with a cache, batches are int16

    def __getitems__(self, items: list) -> list:
        """A whole batch (the DataLoader calls this when it exists). From the cache, every crop is
        read straight into its row of one (B, samples) int16 batch -- in a loader worker, in
        shared memory -- which `collate` then passes on without copying it again."""
        if self.cache is None:
            return [self[item] for item in items]
        samples = self.crop_samples
        ring = self.ring if torch.utils.data.get_worker_info() is not None else None
        if ring is not None and len(items) <= ring.waveforms.shape[1]:
            slot = ring.take()
            batch = ring.waveforms[slot, :len(items)]                      # (B, samples) in shared memory
        else:
            slot, batch = None, _empty_batch((len(items), samples), torch.int16)
        results = []
        for row, item in enumerate(items):
            index, start = self.crop_start(item)
            try:
                cache_row = self.cache_rows[index]
                if cache_row < 0 or not self.cache.read_into(cache_row, start, self.crop.window_seconds,
                                                             self.crop.pad, batch[row].numpy()):
                    batch[row] = torch.from_numpy(self.decode(index, start))
            except Exception as error:  # as in __getitem__
                log.warning("skipping %s: %s: %s", self.paths[index], type(error).__name__, error)
                results.append(None)
                continue
            if slot is None:
                results.append({"waveform": batch[row], "target": torch.from_numpy(self.targets[index]),
                                "path": self.paths[index], "index": index})
            else:  # the waveform stays in the ring: `collate` sends (slot, row), BatchRing.receive copies it
                results.append({"ring_row": (slot, row), "target": self.targets[index],
                                "path": self.paths[index], "index": index})
        if slot is not None and all(result is None for result in results):
            ring.give_back(slot)   # nothing to send, so the trainer would never free it
        return results


def collate(items):
    """Stack the items that decoded; drop the Nones (failures were already logged)."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    if "ring_row" in items[0]:  # a cached batch in a BatchRing slot: plain arrays, pickled with the message
        return {"ring_slot": items[0]["ring_row"][0],
                "ring_rows": np.array([item["ring_row"][1] for item in items]),   # (B,) rows of the slot
                "target": np.stack([item["target"] for item in items]),            # (B, C)
                "path": [item["path"] for item in items],
                "index": np.array([item["index"] for item in items])}
    return {"waveform": _stack([item["waveform"] for item in items]),        # (B, samples)
            "target": _stack([item["target"] for item in items]),            # (B, C)
            "path": [item["path"] for item in items],
            "index": torch.tensor([item["index"] for item in items])}        # (B,) rows of the dataset


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 (rounded, clipped): the cache's sample format."""
    return np.clip(np.round(waveform * INT16_SCALE), -32768, 32767).astype(np.int16)


def as_float(waveforms: torch.Tensor) -> torch.Tensor:
    """A batch of waveforms as float32: int16 batches (from the cache) are scaled to [-1, 1].

    With --cache, batches stay int16 until here -- half the bytes through the loader
    workers' shared memory and the host-to-GPU copy -- and are converted on the device.
    """
    return waveforms.float() / INT16_SCALE if waveforms.dtype == torch.int16 else waveforms


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a loader worker straight into shared memory, which saves the copy the
    worker would otherwise make to send the batch (as torch's default_collate does). Rows that
    already are one whole batch, in order (RecordingDataset.__getitems__), are that batch."""
    first = tensors[0]
    storage = first.untyped_storage()
    if (storage.nbytes() == len(tensors) * first.numel() * first.element_size()
            and all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.is_contiguous()
                    and t.storage_offset() == row * first.numel() for row, t in enumerate(tensors))):
        return first.new_empty(0).set_(storage, 0, (len(tensors), *first.shape))
    out = _empty_batch((len(tensors), *first.shape), first.dtype)
    return torch.stack(tensors, out=out)


class BatchRing:
    """Shared-memory buffers through which loader workers send cached batches.

    torch sends each batch from a worker in a new shared-memory tensor: made and
    page-faulted in the worker, mapped and faulted again in the trainer, unmapped
    later. For a batch read from the cache that costs more than the read (on 2 cores
    ~9 ms against ~4 ms for 32 crops of 5 s). Here a worker takes a free slot, reads
    the batch into it and sends only (slot, rows); the trainer copies the rows out
    and frees the slot at once (`receive`), so a batch it keeps is never overwritten.
    One slot per batch the DataLoader can have in flight (workers * prefetch_factor)
    plus one, so a worker never waits for a slot.
    """

    WAIT_SECONDS = 300.0  # a worker waiting longer for a free slot stops with an error instead of hanging

    def __init__(self, slots: int, batch_size: int, samples: int):
        self.waveforms = torch.zeros((slots, batch_size, samples), dtype=torch.int16).share_memory_()
        self.free = multiprocessing.Queue()  # slot numbers; made before the workers start
        for slot in range(slots):
            self.free.put(slot)

    def take(self) -> int:
        try:
            return self.free.get(timeout=self.WAIT_SECONDS)
        except queue.Empty:
            raise RuntimeError(f"no free batch slot in {self.WAIT_SECONDS:.0f} s: more batches in flight than the "
                               f"{len(self.waveforms)} slots of the ring") from None

    def give_back(self, slot: int) -> None:
        self.free.put(slot)

    def receive(self, batches, pin_memory: bool = False):
        """Batches as `collate` makes them: waveforms copied out of their slot (which is freed)."""
        for batch in batches:
            if batch is not None and "ring_slot" in batch:
                rows = torch.from_numpy(batch["ring_rows"])
                waveform = torch.empty((len(rows), self.waveforms.shape[2]), dtype=torch.int16,
                                       pin_memory=pin_memory)
                slot = self.waveforms[batch["ring_slot"]]                                    # (batch, samples)
                if torch.equal(rows, torch.arange(len(rows))):
                    waveform.copy_(slot[:len(rows)])           # every crop decoded: a plain copy, faster
                else:
                    torch.index_select(slot, 0, rows, out=waveform)                           # (B, samples)
                self.give_back(batch["ring_slot"])
                target = torch.from_numpy(batch["target"])                                  # (B, C)
                batch = {"waveform": waveform, "target": target.pin_memory() if pin_memory else target,
                         "path": batch["path"], "index": torch.from_numpy(batch["index"])}
            yield batch


class Loader(torch.utils.data.DataLoader):
    """torch's DataLoader; with workers and a cache, batches of up to `ring_batch_size` crops come
    through a BatchRing made for each pass (each set of workers)."""

    def __init__(self, dataset, *args, ring_batch_size: int = 0, **kwargs):
        self.ring_batch_size = ring_batch_size
        super().__init__(dataset, *args, **kwargs)

    def __iter__(self):
        if (not self.ring_batch_size or not self.num_workers or self.persistent_workers
                or getattr(self.dataset, "cache", None) is None):
            return super().__iter__()
        ring = BatchRing(self.num_workers * self.prefetch_factor + 1, self.ring_batch_size, self.dataset.crop_samples)
        self.dataset.ring = ring
        try:
            batches = super().__iter__()     # the workers start here, each with its copy of the dataset
        finally:
            self.dataset.ring = None
        return ring.receive(batches, self.pin_memory)


def _empty_batch(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a loader worker in shared memory, ready to be sent to the main process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, shape)


# ----------------------------------------------------------------------------- sampling
#
# Which records an epoch visits. `epoch_draw` makes the whole epoch's draw at once
# from a generator seeded by (seed, epoch) only, so it is the same in every process:
# a distributed run gives rank r the slice `shard_draw(draw, r, world_size,
# batch_size)` (= the trimmed draw[r::world_size]); the shards are disjoint by
# position and together are exactly the trimmed single-process epoch. The global
# position of a shard's element i is r + i * world_size (use it as the crop
# position so crops do not depend on world_size).
#
# Samplers ("none" is today's recipe):
#   none     every record once, in a seeded random order
#   inverse  len(records) draws with replacement, every species the same total
#            weight (per record 1/N_species) -- torch's WeightedRandomSampler with
#            num_samples = len(dataset). On a long tail this draws a species' single
#            recording as often as 500 recordings of a common one: see sampling_audit.
#   sqrt     as inverse but species weight proportional to sqrt(N) (per record 1/sqrt(N))
#   cap      without replacement: at most `cap_per_class` random records of each
#            species per epoch (a fresh subset each epoch), all shuffled; the epoch is
#            sum(min(N, cap)) long.
# `sampling_audit` computes, analytically, what a sampler does to an epoch and
# warns in plain English when it is over-aggressive; `DrawCounter` counts what was
# actually drawn.

SAMPLERS = ("none", "inverse", "sqrt", "cap")
REPEAT_WARNING_DRAWS = 5.0     # warn when one recording is expected this many times per epoch
SEEN_WARNING_SHARE = 0.70      # warn when fewer recordings than this share are seen per epoch


def _check_sampler(sampler: str, cap_per_class: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "cap" and (int(cap_per_class) != cap_per_class or cap_per_class < 1):
        raise ValueError(f"sampler 'cap' needs cap_per_class >= 1, got {cap_per_class!r}")


def _species_index(primary_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (species sorted, species index of each record, records per species)."""
    labels = np.asarray(primary_labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("primary_labels must be a non-empty 1-D sequence")
    species, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return species, inverse.ravel(), counts


def recording_weights(primary_labels, sampler: str, cap_per_class: int = 0) -> np.ndarray:
    """(n_records,) float64 summing to 1: the probability of each record at one draw.

    none: uniform; inverse: 1/N_species per record (every species the same total);
    sqrt: 1/sqrt(N_species) per record (species total proportional to sqrt(N));
    cap (needs cap_per_class): min(N, cap)/N per record, i.e. each record's share of
    a capped epoch.
    """
    _check_sampler(sampler, cap_per_class)
    _, inverse, counts = _species_index(primary_labels)
    n = counts[inverse].astype(np.float64)
    if sampler == "none":
        weights = np.ones_like(n)
    elif sampler == "inverse":
        weights = 1.0 / n
    elif sampler == "sqrt":
        weights = 1.0 / np.sqrt(n)
    else:  # cap
        weights = np.minimum(n, cap_per_class) / n
    return weights / weights.sum()


def epoch_length(primary_labels, sampler: str, cap_per_class: int = 0) -> int:
    """Draws in one epoch: the number of records, or sum(min(N, cap)) for 'cap'."""
    _check_sampler(sampler, cap_per_class)
    _, _, counts = _species_index(primary_labels)
    if sampler == "cap":
        return int(np.minimum(counts, cap_per_class).sum())
    return int(counts.sum())


def expected_draws(primary_labels, sampler: str, cap_per_class: int = 0) -> np.ndarray:
    """(n_records,) float64: expected times each record is drawn in one epoch (analytic).

    none: 1; inverse/sqrt: n_records * weight; cap: min(N, cap)/N (a record is in
    the epoch's subset with that probability, and then exactly once).
    """
    weights = recording_weights(primary_labels, sampler, cap_per_class)
    if sampler == "none":
        return np.ones(len(weights))
    if sampler == "cap":
        _, inverse, counts = _species_index(primary_labels)
        n = counts[inverse].astype(np.float64)
        return np.minimum(n, cap_per_class) / n
    return len(weights) * weights


def epoch_draw(n_records: int, seed: int, epoch: int, primary_labels=None, sampler: str = "none",
               cap_per_class: int = 0) -> np.ndarray:
    """The records an epoch visits, in order (int64 indices), deterministic from (seed, epoch).

    sampler "none" (the default): a permutation seeded by (seed, epoch) -- exactly
    the draw of earlier versions. "inverse"/"sqrt": n_records draws with replacement
    by `recording_weights`. "cap": at most `cap_per_class` records of each species,
    chosen without replacement afresh each epoch, then shuffled. primary_labels (one
    per record) is needed by every sampler but "none". The full draw is made here
    once per epoch; `shard_draw` slices it for a distributed rank.
    """
    _check_sampler(sampler, cap_per_class)
    rng = np.random.default_rng([seed, epoch, 7919])
    if sampler == "none":
        if primary_labels is not None and len(primary_labels) != n_records:
            raise ValueError(f"{len(primary_labels)} primary labels for {n_records} records")
        return rng.permutation(n_records)
    if primary_labels is None:
        raise ValueError(f"sampler {sampler!r} needs the primary label of every record")
    if len(primary_labels) != n_records:
        raise ValueError(f"{len(primary_labels)} primary labels for {n_records} records")
    if sampler in ("inverse", "sqrt"):
        weights = recording_weights(primary_labels, sampler)
        return rng.choice(n_records, size=n_records, replace=True, p=weights).astype(np.int64)
    _, inverse, counts = _species_index(primary_labels)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.choice(group, size=min(len(group), cap_per_class), replace=False) for group in members]
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)


def shard_draw(draw: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Rank `rank`'s share of an epoch's draw: draw trimmed to a multiple of
    world_size * batch_size, then every world_size-th element from `rank`.

    Every rank gets the same number of whole batches; element i of the shard sits
    at global position rank + i * world_size of the draw.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    draw = np.asarray(draw)
    usable = len(draw) // (world_size * batch_size) * (world_size * batch_size)
    return draw[:usable][rank::world_size]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (record, epoch, position) for one epoch, starting at `start_batch`.

    Starting mid-epoch is how an exact resume skips the batches already trained on
    without decoding them. Incomplete last batches are dropped (BatchNorm and
    mixup need whole batches). With world_size > 1 (torchrun) this rank gets its
    `shard_draw` of the epoch's single draw; `position` is always the position in
    the whole draw, so a crop does not depend on the number of ranks, and batch k
    of all ranks together is batch k of a one-process run with world_size times
    the batch size.
    """

    def __init__(self, draw: np.ndarray, batch_size: int, epoch: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.shard = shard_draw(draw, rank, world_size, batch_size)
        self.positions = rank + np.arange(len(self.shard)) * world_size
        self.batch_size, self.epoch, self.start_batch = batch_size, epoch, start_batch

    def __len__(self):
        return max(len(self.shard) // self.batch_size - self.start_batch, 0)

    def __iter__(self):
        for batch in range(self.start_batch, len(self.shard) // self.batch_size):
            chosen = range(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield [(int(self.shard[i]), self.epoch, int(self.positions[i])) for i in chosen]


def _unseen_fraction(expected: np.ndarray, sampler: str, n_draws: int, weights: np.ndarray) -> np.ndarray:
    """Per record: probability it is not drawn at all in an epoch."""
    if sampler in ("inverse", "sqrt"):  # n_draws independent draws with replacement
        with np.errstate(divide="ignore"):  # a weight of 1 (a single record) -> log(0) -> never unseen
            return np.exp(n_draws * np.log1p(-weights))
    return 1.0 - np.minimum(expected, 1.0)  # none and cap: each record at most once


def sampling_audit(primary_labels, sampler: str, cap_per_class: int = 0, extras=None):
    """What `sampler` does to an epoch, computed analytically -> (per_species, summary).

    per_species (sorted by recordings, most first): species, recordings,
    expected_draws_per_epoch, share (of the epoch), draws_per_recording
    [, extra_recordings when `extras` is given].
    summary: recordings, epoch_length, species, imbalance_before / imbalance_after
    (max/min recordings resp. expected draws per species), recording_imbalance
    (max/min expected draws per recording; 1 without weighting),
    expected_distinct_recordings, distinct_share, max_draws_of_one_recording,
    most_repeated_species, top10_species_share (and _before, without weighting),
    [extra_share,] warnings (plain-English lines).
    extras: optional boolean array marking rows that are extra (detector-built)
    windows rather than recordings; they count as rows of their species.
    """
    _check_sampler(sampler, cap_per_class)
    species, inverse, counts = _species_index(primary_labels)
    n_records = len(inverse)
    weights = recording_weights(primary_labels, sampler, cap_per_class)
    expected = expected_draws(primary_labels, sampler, cap_per_class)
    length = epoch_length(primary_labels, sampler, cap_per_class)
    if sampler == "cap":  # exact: min(N, cap) per species
        per_species_draws = np.minimum(counts, cap_per_class).astype(np.float64)
    else:
        per_species_draws = np.bincount(inverse, weights=expected, minlength=len(species))

    frame = pd.DataFrame({"species": species, "recordings": counts.astype(np.int64),
                          "expected_draws_per_epoch": per_species_draws,
                          "share": per_species_draws / length,
                          "draws_per_recording": per_species_draws / counts})
    extra_share = None
    if extras is not None:
        extras = np.asarray(extras, dtype=bool)
        if extras.shape != (n_records,):
            raise ValueError(f"extras has shape {extras.shape}; expected ({n_records},)")
        frame["extra_recordings"] = np.bincount(inverse, weights=extras, minlength=len(species)).astype(np.int64)
        extra_share = float(expected[extras].sum() / length)
    frame = frame.sort_values(["recordings", "species"], ascending=[False, True], kind="stable")
    frame = frame.reset_index(drop=True)

    unseen = _unseen_fraction(expected, sampler, length, weights)
    # with replacement: sum of 1 - (1 - p)^n; none and cap draw each record at most once
    distinct = float(np.sum(1.0 - unseen)) if sampler in ("inverse", "sqrt") else float(length)
    top = int(np.argmax(expected))
    top_species = species[inverse[top]]
    top_count = int(counts[inverse[top]])
    top10 = float(np.sort(per_species_draws)[::-1][:10].sum() / length)
    summary = {
        "sampler": sampler,
        "recordings": int(n_records),
        "epoch_length": length,
        "species": int(len(species)),
        "imbalance_before": float(counts.max() / counts.min()),
        "imbalance_after": float(per_species_draws.max() / per_species_draws.min()),
        "recording_imbalance": float(expected.max() / expected.min()),
        "expected_distinct_recordings": distinct,
        "distinct_share": distinct / n_records,
        "max_draws_of_one_recording": float(expected[top]),
        "most_repeated_species": str(top_species),
        "most_repeated_species_recordings": top_count,
        "top10_species_share": top10,
        "top10_species_share_before": float(np.sort(counts)[::-1][:10].sum() / n_records),
    }
    if sampler == "cap":
        summary["cap_per_class"] = int(cap_per_class)
    if extra_share is not None:
        summary["extra_share"] = extra_share

    warnings = []
    if summary["max_draws_of_one_recording"] > REPEAT_WARNING_DRAWS:
        times = f"drawn ~{summary['max_draws_of_one_recording']:.0f} times per epoch"
        if top_count == 1:
            warnings.append(f"the single recording of {top_species} is {times}: it will be memorised")
        else:
            warnings.append(f"each of the {top_count} recordings of {top_species} is {times}: "
                            f"they will be memorised")
    if summary["distinct_share"] < SEEN_WARNING_SHARE:
        species_unseen = np.bincount(inverse, weights=unseen, minlength=len(species)) / counts
        starved = max(range(len(species)), key=lambda i: (round(float(species_unseen[i]), 9), counts[i]))
        warnings.append(f"only {summary['distinct_share']:.0%} of the {n_records} recordings are seen in an "
                        f"epoch; e.g. the {counts[starved]} recordings of {species[starved]} are drawn "
                        f"~{per_species_draws[starved] / counts[starved]:.2f} times each "
                        f"({species_unseen[starved]:.0%} of them unseen per epoch)")
    if summary["imbalance_after"] > summary["imbalance_before"] * (1 + 1e-9):
        warnings.append(f"the sampler increases the species imbalance from {summary['imbalance_before']:.1f}x "
                        f"to {summary['imbalance_after']:.1f}x")
    summary["warnings"] = warnings
    return frame, summary


def format_sampling_audit(per_species: pd.DataFrame, summary: dict, sampler: str) -> str:
    """A few lines that make an over-aggressive sampler visible at a glance."""
    cap = f" (cap {summary['cap_per_class']} per species)" if "cap_per_class" in summary else ""
    lines = [
        f"sampling audit, sampler '{sampler}'{cap}: {summary['recordings']} recordings of "
        f"{summary['species']} species, {summary['epoch_length']} draws per epoch",
        f"  species imbalance (max/min per species): {summary['imbalance_before']:.1f}x before -> "
        f"{summary['imbalance_after']:.1f}x after",
        f"  draws per recording: {per_species['draws_per_recording'].min():.3g} to "
        f"{per_species['draws_per_recording'].max():.3g} ({summary['recording_imbalance']:.1f}x spread; "
        f"1.0x without weighting)",
        f"  distinct recordings seen per epoch: {summary['expected_distinct_recordings']:.0f} of "
        f"{summary['recordings']} ({summary['distinct_share']:.1%})",
        f"  most repeated recording: {summary['max_draws_of_one_recording']:.2f} draws per epoch "
        f"({summary['most_repeated_species']}, {summary['most_repeated_species_recordings']} recording(s))",
        f"  top-10 species share of the epoch: {summary['top10_species_share_before']:.1%} before -> "
        f"{summary['top10_species_share']:.1%} after",
    ]
    if "extra_share" in summary:
        lines.append(f"  extra windows share of the epoch: {summary['extra_share']:.1%}")
    lines += [f"WARNING: {warning}" for warning in summary["warnings"]]
    return "\n".join(lines)


def _csv_path(path, default_name: str) -> Path:
    path = Path(path)
    return path / default_name if path.is_dir() else path


def write_sampling_audit(per_species: pd.DataFrame, path) -> Path:
    """Write the per-species table; `path` is the csv file or a folder (-> sampling_audit.csv)."""
    path = _csv_path(path, "sampling_audit.csv")
    per_species.to_csv(path, index=False)
    return path


class DrawCounter:
    """Counts the records actually drawn (e.g. the batches an epoch trained on).

    add(record_indices) any number of times, then to_frame(labels_of_records, epoch)
    -> one row per species (epoch, species, draws); reset() between epochs.
    """

    def __init__(self, n_records: int = 0):
        self.counts = np.zeros(n_records, dtype=np.int64)

    def add(self, record_indices) -> None:
        indices = np.asarray(record_indices, dtype=np.int64).ravel()
        if indices.size == 0:
            return
        if indices.min() < 0:
            raise ValueError("record indices must be >= 0")
        added = np.bincount(indices)
        if len(added) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(added) - len(self.counts)))
        self.counts[:len(added)] += added

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        self.counts[:] = 0

    def to_frame(self, labels_of_records, epoch: int) -> pd.DataFrame:
        """-> DataFrame(epoch, species, draws), every species of labels_of_records, most drawn first."""
        labels = np.asarray(labels_of_records)
        if len(self.counts) > len(labels):
            raise ValueError(f"record index {len(self.counts) - 1} drawn but only {len(labels)} labels given")
        counts = np.pad(self.counts, (0, len(labels) - len(self.counts)))
        species, inverse = np.unique(labels, return_inverse=True)
        draws = np.bincount(inverse.ravel(), weights=counts, minlength=len(species)).astype(np.int64)
        frame = pd.DataFrame({"epoch": int(epoch), "species": species, "draws": draws})
        return frame.sort_values(["draws", "species"], ascending=[False, True], kind="stable").reset_index(drop=True)


def append_drawn_counts(path, frame: pd.DataFrame) -> Path:
    """Append DrawCounter.to_frame rows to drawn_counts.csv (`path`: the file or its folder);
    the header is written only when the file is new or empty."""
    path = _csv_path(path, "drawn_counts.csv")
    missing = [column for column in ("epoch", "species", "draws") if column not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}")
    new = not path.is_file() or path.stat().st_size == 0
    frame[["epoch", "species", "draws"]].to_csv(path, mode="a", header=new, index=False)
    return path


# ----------------------------------------------------------------------------- decoded-audio cache
#
# Decoding ogg is most of an epoch's time (the log's epochs took 19-22 minutes).
# `python data.py cache --data-dir D --out C` decodes, once, exactly the parts of
# each recording that the crop policy draws from ("ends": the first and last
# --ends-seconds; "random": all of it; --max-seconds caps either) at the model's
# sample rate, into one int16 file. `train.py --cache C` then reads
# crops from it; a crop it does not cover (an --extras window in the middle of a
# recording, a segment cut short by --max-seconds) is decoded as before, so the
# cache changes the speed, never the crops.
#
# Layout of C: manifest.json (settings, data fingerprint, "complete"), segments.npz
# (per recording: duration; per segment: recording, start sample, length, offset),
# audio.int16 (all segments back to back) and done.npy (one byte per recording,
# set after its samples are flushed). A crash leaves "complete": false and the
# unfinished recordings unmarked: training refuses such a cache, and running the
# command again finishes it.

CACHE_FORMAT = 1
INT16_SCALE = 32767.0


class CacheError(ValueError):
    """A cache that does not fit this run: another data set, crop policy or sample rate, or unfinished."""


def cache_settings(sample_rate: int, policy: str, ends_seconds: float, window_seconds: float,
                   max_seconds: float = 0.0) -> dict:
    return {"format": CACHE_FORMAT, "sample_rate": int(sample_rate), "crop_policy": policy,
            "ends_seconds": float(ends_seconds), "window_seconds": float(window_seconds),
            "max_seconds": float(max_seconds)}


def cached_segments(duration: float, settings: dict) -> list[tuple[float, float]]:
    """The parts of a recording its crops are drawn from -> [(start s, seconds)] (see choose_crop_start)."""
    limit = settings["max_seconds"] or math.inf
    if settings["crop_policy"] == "ends":
        segment = min(max(settings["ends_seconds"], settings["window_seconds"]), duration, limit / 2)
        if 2 * segment < duration:
            return [(0.0, segment), (duration - segment, segment)]
    return [(0.0, min(duration, limit))]


def data_fingerprint(table: pd.DataFrame) -> str:
    """Which recordings, in which order, of which sizes: a cache is only used for the data it was made from."""
    digest = hashlib.sha1()
    for name, path in zip(audio_names(table), table["path"]):
        size = Path(path).stat().st_size if Path(path).is_file() else -1
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()


def _write_json_atomic(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def plan_cache(table: pd.DataFrame, settings: dict) -> dict:
    """Headers -> the segments of every recording and where they go in audio.int16."""
    headers, bad = check_audio_files(table["path"])
    rate = settings["sample_rate"]
    durations, owner, starts, lengths = [], [], [], []
    for row, header in enumerate(headers):
        duration = header[0] / header[1] if header else 0.0
        durations.append(duration)
        for start, seconds in (cached_segments(duration, settings) if header else []):
            owner.append(row)
            starts.append(int(round(start * rate)))
            lengths.append(int(round(seconds * rate)))
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    return {"duration": np.asarray(durations), "owner": np.asarray(owner, dtype=np.int64),
            "start": np.asarray(starts, dtype=np.int64), "length": lengths, "offset": offsets, "bad": bad}


def _cache_recording(job) -> tuple[int, str | None]:
    """Worker: decode one recording's segments into audio.int16 and flush them -> (its row, None),
    or (its row, the error) for a file whose header reads but whose audio does not decode."""
    folder, path, row, segments, rate = job
    try:
        audio = np.memmap(Path(folder) / "audio.int16", dtype=np.int16, mode="r+")
        for start, length, offset in segments:
            audio[offset:offset + length] = to_int16(read_window(path, start / rate, length / rate, rate)[:length])
        audio.flush()
    except Exception as error:  # left out of the cache; training decodes it and skips it as usual
        return row, f"{type(error).__name__}: {error}".replace("\n", " ")
    return row, None


def build_cache(data_dirs, out_dir, settings: dict, workers: int = 2) -> Path:
    """Write (or finish) the cache of `data_dirs` in `out_dir`; refuses a folder made with other settings."""
    from tqdm import tqdm
    out_dir = Path(out_dir)
    table, _ = read_training_data(data_dirs)
    fingerprint = data_fingerprint(table)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        _check_manifest(manifest, settings, fingerprint, out_dir, require_complete=False)
        if manifest["complete"]:
            print(f"{out_dir}: already complete ({manifest['bytes'] / 1e9:.2f} GB); nothing to do")
            return out_dir
        plan = dict(np.load(out_dir / "segments.npz"))
        print(f"{out_dir}: resuming an unfinished cache")
    else:
        plan = plan_cache(table, settings)
        for path, reason in plan.pop("bad"):
            log.warning("not cached (unreadable): %s (%s)", path, reason)
        out_dir.mkdir(parents=True, exist_ok=True)
        total = int(plan["length"].sum())
        manifest = {**settings, "data_fingerprint": fingerprint, "recordings": len(table),
                    "segments": len(plan["length"]), "samples": total, "bytes": 2 * total, "complete": False}
        print(f"caching {len(table)} recordings, {total / settings['sample_rate'] / 3600:.1f} h of audio at "
              f"{settings['sample_rate']} Hz: {2 * total / 1e9:.2f} GB in {out_dir} (--max-seconds lowers it)")
        with open(out_dir / "audio.int16", "wb") as handle:
            handle.truncate(2 * total)                    # sparse until written
        np.save(out_dir / "done.npy", np.zeros(len(table), dtype=np.uint8))
        np.savez(out_dir / ".segments.tmp.npz", **plan)
        os.replace(out_dir / ".segments.tmp.npz", out_dir / "segments.npz")
        _write_json_atomic(manifest_path, manifest)      # written last: the folder is now a cache in progress
    done = np.load(out_dir / "done.npy", mmap_mode="r+")
    by_row: dict[int, list] = {}
    for owner, start, length, offset in zip(plan["owner"], plan["start"], plan["length"], plan["offset"]):
        by_row.setdefault(int(owner), []).append((int(start), int(length), int(offset)))
    todo = [(str(out_dir), table["path"].iloc[row], row, by_row.get(row, []), settings["sample_rate"])
            for row in range(len(table)) if not done[row]]
    with tqdm(total=len(todo), desc="cache", unit="rec", disable=not todo) as progress:
        if workers > 0:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                finished = pool.imap_unordered(_cache_recording, todo, chunksize=4)
                _mark_done(finished, done, progress)
        else:
            _mark_done(map(_cache_recording, todo), done, progress)
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    print(f"cache complete: {manifest['recordings']} recordings, {manifest['bytes'] / 1e9:.2f} GB -> {out_dir}")
    return out_dir


def _mark_done(results, done: np.memmap, progress) -> None:
    """1: cached; 2: failed to decode (not cached, not retried)."""
    for count, (row, error) in enumerate(results, start=1):
        done[row] = 1 if error is None else 2
        if error is not None:
            log.warning("not cached (cannot be decoded): recording %d: %s", row, error)
        progress.update()
        if count % 64 == 0:
            done.flush()
    done.flush()


def _check_manifest(manifest: dict, settings: dict, fingerprint: str, folder: Path, require_complete: bool) -> None:
    for key, wanted in settings.items():
        if manifest.get(key) != wanted:
            raise CacheError(f"cache {folder} was made with {key}={manifest.get(key)!r}, not {wanted!r}: make "
                             f"a cache for these settings in another folder (python data.py cache --out ...), "
                             f"or train without --cache")
    if manifest.get("data_fingerprint") != fingerprint:
        raise CacheError(f"cache {folder} was made from another data set (other recordings or file sizes than "
                         f"--data-dir): make a new one in another folder, or train without --cache")
    if require_complete and not manifest.get("complete"):
        raise CacheError(f"cache {folder} is unfinished (interrupted while caching): run the same "
                         f"`python data.py cache` command again to finish it")


class AudioCache:
    """Read crops from a finished cache; `window` returns None for a crop it does not cover."""

    def __init__(self, folder, table: pd.DataFrame, settings: dict):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(f"{self.folder} is not a cache (no manifest.json); make one with python data.py cache")
        manifest = json.loads(manifest_path.read_text())
        _check_manifest(manifest, settings, data_fingerprint(table), self.folder, require_complete=True)
        plan = np.load(self.folder / "segments.npz")
        self.rate = settings["sample_rate"]
        self.duration = plan["duration"]
        self.owner, self.start, self.length, self.offset = plan["owner"], plan["start"], plan["length"], plan["offset"]
        self.first = np.searchsorted(self.owner, np.arange(len(self.duration)))    # owner is sorted
        self.cached = np.load(self.folder / "done.npy") == 1    # failed recordings are decoded (and skipped)
        self.manifest = manifest
        self._file = None                                                         # opened in each process

    def __getstate__(self):  # DataLoader workers open the file themselves
        return {**self.__dict__, "_file": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            os.close(self._file)

    def _read(self, offset: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """count int16 samples from sample `offset` (into `out` if given): one pread, which
        was faster here than slicing a memory map."""
        if self._file is None:
            self._file = os.open(self.folder / "audio.int16", os.O_RDONLY)
        samples = np.empty(count, dtype=np.int16) if out is None else out
        if os.preadv(self._file, [memoryview(samples).cast("B")], 2 * offset) != 2 * count:
            raise OSError(f"{self.folder / 'audio.int16'} is shorter than its manifest says")
        return samples

    def locate(self, row: int, start_seconds: float, seconds: float) -> tuple[int, int] | None:
        """Where the crop is -> (offset in audio.int16, samples there: fewer than asked when the
        recording ends inside the crop), or None if no segment of recording `row` covers it."""
        if not self.cached[row]:
            return None
        first = int(round(start_seconds * self.rate))
        n = int(round(seconds * self.rate))
        end_of_recording = int(round(self.duration[row] * self.rate))
        segment = self.first[row]
        while segment < len(self.owner) and self.owner[segment] == row:
            begin, length = self.start[segment], self.length[segment]
            reaches_end = begin + length >= end_of_recording - 1    # past the end is padding, as when decoding
            if begin <= first and (first + n <= begin + length or reaches_end):
                return int(self.offset[segment] + first - begin), max(min(n, int(begin + length) - first), 0)
            segment += 1
        return None

    def window(self, row: int, start_seconds: float, seconds: float, pad: str = "zero") -> np.ndarray | None:
        """(round(seconds*rate),) int16 of recording `row` from start_seconds, or None if not cached."""
        out = np.empty(int(round(seconds * self.rate)), dtype=np.int16)
        return out if self.read_into(row, start_seconds, seconds, pad, out) else None

    def read_into(self, row: int, start_seconds: float, seconds: float, pad: str, out: np.ndarray) -> bool:
        """The crop of recording `row` written into `out` ((samples,) int16, padded as decoding would)
        without a temporary; False if no cached segment covers it."""
        place = self.locate(row, start_seconds, seconds)
        if place is None:
            return False
        offset, count = place
        if count == len(out):
            self._read(offset, count, out)
        else:  # the recording ends inside the crop: pad as decoding would
            out[:] = fit_length(self._read(offset, count), len(out), pad)
        return True


# ----------------------------------------------------------------------------- demo data, command line


def ensure_demo_data(data_dir) -> Path:
    """The default --data-dir is the demo folder, generated on first use."""
    data_dir = Path(data_dir)
    if data_dir.resolve() == DEMO_DIR and not (data_dir / "train_metadata.csv").is_file():
        import demo
        log.warning("writing the built-in demo data set to %s (first use)", data_dir)
        demo.write_demo_dataset(data_dir)
    return data_dir


# ----------------------------------------------------------------------------- detector-built extras

def select_extras(detections: pd.DataFrame, threshold: float, minimum: int, maximum: int, divisor: float,
                  keep_all_below: int) -> pd.DataFrame:
    """Extra training windows from `infer.py --detections` (log experiments 61-91).

    A window whose score for its recording's primary label is at least `threshold`
    is a detection. Each recording keeps its best clip(floor(n / divisor), minimum,
    maximum) detections, never more than the n it has; species with fewer than
    `keep_all_below` recordings keep all of theirs. -> filename, start_s, primary_score, labels.
    """
    recordings_per_species = detections.groupby("primary_label")["filename"].nunique()
    hits = detections[detections["primary_score"] >= threshold]
    chosen = []
    for _, windows in hits.groupby("filename", sort=True):  # one recording at a time
        species = windows["primary_label"].iloc[0]
        n = len(windows)
        if recordings_per_species[species] < keep_all_below:
            keep = n
        else:
            keep = min(max(int(math.floor(n / divisor)), minimum), maximum, n)
        best = windows.sort_values(["primary_score", "start_s"], ascending=[False, True], kind="stable")
        chosen.append(best.head(keep))
    if not chosen:
        return pd.DataFrame(columns=["filename", "start_s", "primary_score", "labels"])
    extras = pd.concat(chosen)
    return pd.DataFrame({"filename": extras["filename"].to_numpy(), "start_s": extras["start_s"].to_numpy(),
                         "primary_score": extras["primary_score"].to_numpy(),
                         "labels": extras["primary_label"].to_numpy()})


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


def read_extras(path) -> pd.DataFrame:
    """extras.csv written by `python data.py extras` -> filename, start_s (checked)."""
    extras = pd.read_csv(path, dtype={"filename": str}, keep_default_na=False)
    missing = [column for column in ("filename", "start_s") if column not in extras.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected the table `python data.py extras` writes")
    extras["start_s"] = pd.to_numeric(extras["start_s"], errors="raise").astype(float)
    return extras


def select_nocall_detections(detections: pd.DataFrame, max_score: float, per_recording: int) -> pd.DataFrame:
    """No-call windows from infer.py --detections: windows whose best score of any species is below
    `max_score`, the `per_recording` quietest of each recording -> filename, start_s."""
    if "top1_score" not in detections.columns:
        raise ValueError("the detections table lacks top1_score; write it with infer.py --detections")
    quiet = detections[detections["top1_score"] < max_score]
    quiet = quiet.sort_values(["filename", "top1_score", "start_s"], kind="stable")
    chosen = quiet.groupby("filename", sort=True).head(per_recording)
    return chosen[["filename", "start_s"]].reset_index(drop=True)


def nocall_soundscape_rows(path, audio_dir=None) -> pd.DataFrame:
    """5-s rows of a labelled-soundscape table with no species ("nocall" or empty) -> path, start_s."""
    table, audio_dir = read_soundscape_labels(path, audio_dir)
    empty = [set(str(labels).split()) <= {NOCALL} for labels in table["labels"]]
    rows = table[empty]
    return pd.DataFrame({"path": [str(audio_dir / name) for name in rows["file"]],
                         "start_s": rows["start_s"].to_numpy(dtype=float)})


def write_extra_audio(extras: pd.DataFrame, audio_dir, out_dir, chunk_seconds: float) -> int:
    """Write each extra window as `<XC id>_<start s>.ogg` of `chunk_seconds`, centred on the 5-s window."""
    out_dir = Path(out_dir)
    written = 0
    for filename, start in zip(extras["filename"], extras["start_s"]):
        source = Path(audio_dir) / filename
        with sf.SoundFile(source) as handle:
            rate = handle.samplerate
        chunk_start = max(float(start) + 2.5 - chunk_seconds / 2, 0.0)
        audio = read_window(source, chunk_start, chunk_seconds, rate)
        target = out_dir / Path(filename).parent / f"{Path(filename).stem}_{int(round(float(start)))}.ogg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(target, "w", rate, 1, format="OGG", subtype="VORBIS") as handle:
            for block in range(0, len(audio), rate):  # blocks: libsndfile's Vorbis encoder crashes on huge writes
                handle.write(audio[block:block + rate])
        written += 1
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="write the synthetic demo data set (BirdCLEF 2023 layout)",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo_parser.add_argument("--out", default=str(DEMO_DIR), help="folder to write")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo_parser.add_argument("--median-seconds", type=float, default=10.0,
                             help="median recording length (~40 for real-length xeno-canto recordings)")
    extras_parser = commands.add_parser("extras", help="select extra training windows from infer.py --detections",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    extras_parser.add_argument("--detections", required=True, help="CSV written by infer.py --detections")
    extras_parser.add_argument("--threshold", type=float, default=0.5, help="primary-label score of a detection")
    extras_parser.add_argument("--min", type=int, default=4, help="extras per recording, at least (if it has them)")
    extras_parser.add_argument("--max", type=int, default=12, help="extras per recording, at most")
    extras_parser.add_argument("--divisor", type=float, default=1.5, help="extras = floor(detections / divisor)")
    extras_parser.add_argument("--keep-all-below", type=int, default=12,
                               help="species with fewer recordings keep all their detections")
    extras_parser.add_argument("--out", default="extras.csv", help="where to write the selection")
    extras_parser.add_argument("--write-audio", default=None, help="also write each extra as an ogg chunk here")
    extras_parser.add_argument("--audio-dir", default=None, help="train_audio folder, with --write-audio")
    extras_parser.add_argument("--chunk", type=float, default=8.0, help="seconds per written chunk")
    cache_parser = commands.add_parser("cache", help="decode the audio the crop policy needs, once, into a "
                                       "memory-mapped int16 cache for train.py --cache",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cache_parser.add_argument("--data-dir", nargs="+", default=[str(DEMO_DIR)], help="as train.py --data-dir")
    cache_parser.add_argument("--out", required=True, help="cache folder (pass it to train.py --cache)")
    cache_parser.add_argument("--sample-rate", type=int, default=32000, help="as train.py --sample-rate")
    cache_parser.add_argument("--crop-policy", choices=CROP_POLICIES, default="ends", help="as train.py")
    cache_parser.add_argument("--ends-seconds", type=float, default=8.0, help="as train.py")
    cache_parser.add_argument("--window-seconds", type=float, default=5.0, help="as train.py")
    cache_parser.add_argument("--max-seconds", type=float, default=0.0,
                              help="cache at most this many seconds per recording (0 = what the policy needs); "
                                   "crops outside are decoded during training")
    cache_parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    args = parser.parse_args(argv)
    if args.command == "cache":
        settings = cache_settings(args.sample_rate, args.crop_policy, args.ends_seconds, args.window_seconds,
                                  args.max_seconds)
        build_cache([ensure_demo_data(folder) for folder in args.data_dir], args.out, settings, args.workers)
    elif args.command == "demo":
        import demo
        demo.write_demo_dataset(args.out, seed=args.seed, median_seconds=args.median_seconds)
    elif args.command == "extras":
        detections = pd.read_csv(args.detections)
        extras = select_extras(detections, args.threshold, args.min, args.max, args.divisor, args.keep_all_below)
        extras.to_csv(args.out, index=False)
        per_species = extras.groupby("labels").size().sort_values(ascending=False)
        print(per_species.to_string(header=False))
        print(f"{len(extras)} extras from {extras['filename'].nunique()} recordings of {len(per_species)} species "
              f"({args.min}-{args.max}//{args.divisor:g}, keep all below {args.keep_all_below}, threshold "
              f"{args.threshold:g}) -> {args.out}")
        if args.write_audio:
            if not args.audio_dir:
                parser.error("--write-audio needs --audio-dir")
            print(f"wrote {write_extra_audio(extras, args.audio_dir, args.write_audio, args.chunk)} chunks to "
                  f"{args.write_audio}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    main()
