"""Shared fixtures and helpers: a tiny BirdCLEF-2023-layout data set made in the test, quick train
arguments, one trained run that many tests read, and writers of audio files with known content.

Nothing here is downloaded: every recording is synthesised, and only timm's tiny
`test_efficientnet` is built.
"""
from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules, also when pytest is not started from ROOT

# --precision auto / --amp auto cache what they measure: the tests' own file, never the user's ~/.cache
# (set before the project is imported, and inherited by the subprocesses and torchrun workers tests start)
os.environ.setdefault("BIRDCLEF_PRECISION_CACHE", str(Path(tempfile.mkdtemp(prefix="precision-")) / "precision.json"))
import infer  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402

TINY_SPECIES = {"aaabbb1": 900.0, "cccddd1": 2500.0, "eeefff1": 5000.0, "ggghhh1": 9000.0}
TINY_COUNTS = (6, 5, 4, 3)


# ----------------------------------------------------------------------------- audio with known content

def tone_recording(frequency: float, seconds: float, sample_rate: int, rng) -> np.ndarray:
    """A species' call: a repeated tone burst at `frequency` over quiet noise."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    bursts = (np.sin(2 * np.pi * 2.0 * t) > 0.3).astype(np.float32)
    audio = 0.4 * bursts * np.sin(2 * np.pi * frequency * (1 + 0.02 * rng.standard_normal()) * t)
    return (audio + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_tone(path, seconds, sample_rate=16000, frequency=2500.0, channels=1) -> Path:
    """A tone recording (seed 1) written to `path` in the format its suffix names."""
    audio = tone_recording(frequency, seconds, sample_rate, np.random.default_rng(1))
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    # Written in blocks: libsndfile 1.2's Vorbis encoder segfaults on one very large write.
    with sf.SoundFile(path, "w", sample_rate, channels) as handle:
        for start in range(0, len(audio), sample_rate):
            handle.write(audio[start:start + sample_rate])
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """FLOAT wav: the samples read back exactly."""
    sf.write(path, samples, rate, subtype="FLOAT")
    return path


def ramp(n: int) -> np.ndarray:
    """Distinct, exactly representable float32 values: sample k is k / 2**20."""
    return (np.arange(n, dtype=np.float64) / 2 ** 20).astype(np.float32)


# ----------------------------------------------------------------------------- the tiny data set

def write_tiny_dataset(root: Path, seed: int = 0, with_sample_submission: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    rows, xc_id = [], 1000
    for (code, frequency), count in zip(TINY_SPECIES.items(), TINY_COUNTS):
        (root / "train_audio" / code).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            xc_id += 1
            sample_rate = int(rng.choice([32000, 32000, 22050, 44100]))
            seconds = float(rng.uniform(3.0, 12.0))
            sf.write(root / "train_audio" / code / f"XC{xc_id}.ogg",
                     tone_recording(frequency, seconds, sample_rate, rng), sample_rate,
                     format="OGG", subtype="VORBIS")
            rows.append({"primary_label": code, "secondary_labels": "[]", "type": "['call']",
                         "latitude": 0.0, "longitude": 0.0, "scientific_name": code,
                         "common_name": code, "author": "test", "license": "CC",
                         "rating": 4.0, "url": f"https://www.xeno-canto.org/{xc_id}",
                         "filename": f"{code}/XC{xc_id}.ogg"})
    pd.DataFrame(rows).to_csv(root / "train_metadata.csv", index=False)
    if with_sample_submission:
        pd.DataFrame(columns=["row_id", *sorted(TINY_SPECIES)]).to_csv(root / "sample_submission.csv", index=False)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Read only: a test that breaks files copies or rewrites the data set first."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_birdclef"))


# ----------------------------------------------------------------------------- running train.py and infer.py

# --amp off: quick runs train in fp32 on every CPU (auto times bf16 and may pick it where it is native)
QUICK_FLAGS = ["--amp", "off", "--backbone", "test_efficientnet", "--no-pretrained", "--batch-size", "4",
               "--workers", "0", "--epochs", "2", "--n-mels", "32", "--n-fft", "512", "--hop", "256", "--sample-rate", "16000",
               "--fmax", "8000", "--window-seconds", "2", "--ends-seconds", "4"]


def quick_args(data_dir, out_dir, *extra):
    """train.py arguments for a seconds-long CPU run on the tiny data set."""
    return options.get_args_parser().parse_args(["--data-dir", str(data_dir), "--out-dir", str(out_dir),
                                                 *QUICK_FLAGS, *extra])


def settings_of(args) -> options.TrainingSettings:
    """The settings train.main builds from these arguments."""
    options.resolve_deprecated(args)
    return options.training_settings(args)


def quick_settings(data_dir, out_dir, *extra) -> options.TrainingSettings:
    """The settings of quick_args's run."""
    return settings_of(quick_args(data_dir, out_dir, *extra))


def run_infer(*argv) -> dict:
    """infer.py with these command-line arguments (paths may be Path objects)."""
    return infer.main(infer.get_args_parser().parse_args([str(a) for a in argv]))


def read_rows(path) -> list[dict]:
    """A CSV log's rows as written (strings): equal rows are equal to the last digit."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """One epoch of quick_args on tiny_data (3 steps, evaluations after steps 2 and 3, softmax):
    metrics.csv, steps.csv, checkpoint_step00000002.pt, checkpoint_step00000003.pt, best.pt.

    Trained once for the whole session; read only: tests copy what they change.
    """
    out = tmp_path_factory.mktemp("trained_run")
    train.main(quick_args(tiny_data, out, "--epochs", "1"))
    return out


@pytest.fixture(scope="session")
def checkpoint(trained_run) -> Path:
    """trained_run's best.pt."""
    return trained_run / "best.pt"


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str):
    """A real small disk: a tmpfs of `size` ("64k", "2m") at mount_point, unmounted afterwards. The
    test is skipped where mounting is not allowed (needs root)."""
    mount_point.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
