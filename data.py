"""Data: BirdCLEF metadata, the label vocabulary, the split, audio crops, the demo set.

Audio is decoded with soundfile, mixed to mono, resampled to the model's rate
with torchaudio and returned as float32 waveforms; the spectrogram is the
model's job (model.py), so nothing here can drift from inference.

Randomness: every random choice for a training draw (which crop) comes from a
generator seeded by (seed, epoch, position in the epoch). A run therefore
produces the same batches whatever the number of loader workers, and a resumed
run continues exactly where the interrupted one stopped.

    python data.py demo --out DIR     writes the built-in synthetic demo data set
"""
from __future__ import annotations

import argparse
import ast
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

log = logging.getLogger("birdclef")

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
METADATA_COLUMNS = ("primary_label", "secondary_labels", "filename")
CROP_POLICIES = ("ends", "random")


# ----------------------------------------------------------------------------- metadata

def read_metadata(data_dir) -> pd.DataFrame:
    """train_metadata.csv -> one row per recording with parsed labels and an absolute path.

    Columns added: `secondary` (list of codes) and `path`.
    """
    data_dir = Path(data_dir)
    csv_path = data_dir / "train_metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: --data-dir must be a BirdCLEF 2023 folder "
                                f"(train_metadata.csv, train_audio/)")
    table = pd.read_csv(csv_path, dtype={"primary_label": str, "filename": str},
                        keep_default_na=False)
    missing = [column for column in METADATA_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks column(s) {missing}; found {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{csv_path} has no rows")

    audio_root = (data_dir / "train_audio").resolve()
    secondary, paths = [], []
    for row_number, (text, filename) in enumerate(zip(table["secondary_labels"], table["filename"]), start=2):
        secondary.append(parse_label_list(text, f"{csv_path} row {row_number}"))
        path = (audio_root / filename).resolve()
        if not path.is_relative_to(audio_root):
            raise ValueError(f"{csv_path} row {row_number}: filename {filename!r} points outside {audio_root}")
        paths.append(str(path))
    table["secondary"] = secondary
    table["path"] = paths
    return table


def parse_label_list(text: str, where: str) -> list[str]:
    """"['abethr1', 'gnbcam2']" -> ['abethr1', 'gnbcam2'], with the row named on error."""
    if text is None or str(text).strip() in ("", "[]"):
        return []
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: secondary_labels {text!r} is not a Python list string") from error
    if not isinstance(value, (list, tuple)) or not all(isinstance(code, str) for code in value):
        raise ValueError(f"{where}: secondary_labels {text!r} is not a list of species codes")
    return list(value)


def read_vocabulary(data_dir, table: pd.DataFrame) -> list[str]:
    """Species columns of sample_submission.csv in their order, else the sorted primary labels."""
    sample_submission = Path(data_dir) / "sample_submission.csv"
    if sample_submission.is_file():
        columns = list(pd.read_csv(sample_submission, nrows=0).columns)
        return [column for column in columns if column != "row_id"]
    return sorted(table["primary_label"].unique())


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

_resamplers: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


def to_mono_resampled(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """(frames, channels) float -> (samples,) float32 mono at target_rate, NaN/inf zeroed."""
    mono = audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio.astype(np.float32)
    if not np.isfinite(mono).all():
        mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    if source_rate == target_rate or len(mono) == 0:
        return mono
    key = (source_rate, target_rate)
    if key not in _resamplers:  # the kernel is computed once per rate pair and process
        _resamplers[key] = torchaudio.transforms.Resample(source_rate, target_rate)
    return _resamplers[key](torch.from_numpy(mono)).numpy()


def read_window(path, start_seconds: float, seconds: float, sample_rate: int) -> np.ndarray:
    """Decode only [start, start + seconds) of a file -> (round(seconds*sample_rate),) float32.

    Seeks instead of decoding the whole file; pads with zeros past the end.
    """
    with sf.SoundFile(path) as audio_file:
        source_rate = audio_file.samplerate
        start = min(int(round(start_seconds * source_rate)), audio_file.frames)
        audio_file.seek(start)
        audio = audio_file.read(int(math.ceil(seconds * source_rate)), dtype="float32", always_2d=True)
    return fit_length(to_mono_resampled(audio, source_rate, sample_rate), int(round(seconds * sample_rate)))


def fit_length(waveform: np.ndarray, samples: int) -> np.ndarray:
    if len(waveform) >= samples:
        return waveform[:samples]
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


@dataclass
class CropSettings:
    sample_rate: int = 32000
    window_seconds: float = 5.0
    policy: str = "ends"
    ends_seconds: float = 8.0


class RecordingDataset(torch.utils.data.Dataset):
    """One crop per draw: item (record, epoch, position) -> dict, or None if the file fails.

    Training items are tuples from `EpochBatchSampler`, so the crop depends only on
    (seed, epoch, position). Evaluation items are plain indices: the first window.
    """

    def __init__(self, paths, durations, targets: np.ndarray, crop: CropSettings, seed: int = 0):
        self.paths = list(paths)
        self.durations = list(durations)
        self.targets = targets
        self.crop = crop
        self.seed = seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, epoch, position = item
            rng = np.random.default_rng([self.seed, epoch, position])
        else:
            index, rng = item, None
        path = self.paths[index]
        start = choose_crop_start(self.durations[index], self.crop.window_seconds,
                                  self.crop.policy, self.crop.ends_seconds, rng)
        try:
            waveform = read_window(path, start, self.crop.window_seconds, self.crop.sample_rate)
        except Exception as error:  # the header was fine but decoding failed: skip, never crash
            log.warning("skipping %s: %s: %s", path, type(error).__name__, error)
            return None
        return {"waveform": torch.from_numpy(waveform), "target": torch.from_numpy(self.targets[index]),
                "path": path}


def collate(items):
    """Stack the items that decoded; drop the Nones (failures were already logged)."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    return {"waveform": torch.stack([item["waveform"] for item in items]),   # (B, samples)
            "target": torch.stack([item["target"] for item in items]),       # (B, C)
            "path": [item["path"] for item in items]}


def epoch_draw(n_records: int, seed: int, epoch: int) -> np.ndarray:
    """The records an epoch visits, in order: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(n_records)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (record, epoch, position) for one epoch, starting at `start_batch`.

    Starting mid-epoch is how an exact resume skips the batches already trained on
    without decoding them. Incomplete last batches are dropped (BatchNorm and
    mixup need whole batches).
    """

    def __init__(self, draw: np.ndarray, batch_size: int, epoch: int, start_batch: int = 0):
        self.draw, self.batch_size, self.epoch, self.start_batch = draw, batch_size, epoch, start_batch

    def __len__(self):
        return max(len(self.draw) // self.batch_size - self.start_batch, 0)

    def __iter__(self):
        for batch in range(self.start_batch, len(self.draw) // self.batch_size):
            positions = range(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield [(int(self.draw[position]), self.epoch, position) for position in positions]


def ensure_demo_data(data_dir) -> Path:
    """The default --data-dir is the demo folder, generated on first use."""
    data_dir = Path(data_dir)
    if data_dir.resolve() == DEMO_DIR and not (data_dir / "train_metadata.csv").is_file():
        import demo
        log.warning("writing the built-in demo data set to %s (first use)", data_dir)
        demo.write_demo_dataset(data_dir)
    return data_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="write the synthetic demo data set (BirdCLEF 2023 layout)",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo_parser.add_argument("--out", default=str(DEMO_DIR), help="folder to write")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    if args.command == "demo":
        import demo
        demo.write_demo_dataset(args.out, seed=args.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    main()
