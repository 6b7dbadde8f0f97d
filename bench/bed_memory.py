"""Peak memory of `python data.py soundscapes --bed-dir` against the size of the bed folder.

    python bench/bed_memory.py --work-dir /tmp/bed_memory [--hours 1 20] [--file-minutes 10] [--distinct 6]

Writes `--distinct` different `--file-minutes`-long 32-kHz mono Ogg Vorbis files of field-like background
(pink noise, a hum, bursts of a tone) once, copies them into one bed folder per `--hours`, and runs

    /usr/bin/time -v python data.py soundscapes --data-dir demo_data --bed-dir BED --out OUT --count 20

for each (a new OUT each time: --out must be new or empty), printing the "Maximum resident set size" and
the wall time. The bed is read a span at a time (pseudo_soundscapes.bed_for), so the peaks should be
equal; decoding the folder whole, as before, took ~470 MB per hour of bed. `--repo` runs another
checkout's data.py (e.g. one at the commit before, for the old figures); the bed files are written under
--work-dir, never into the repository.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 32000


def field_background(seconds: int, rng: np.random.Generator) -> np.ndarray:
    """(seconds * RATE,) float32 at about -30 dBFS: pink noise, a 50-Hz hum, a 3-kHz tone burst every 7 s."""
    samples = seconds * RATE
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))                     # 1/f power: pink
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, samples)
    time_s = np.arange(samples) / RATE
    burst = (time_s % 7.0 < 0.4) * np.sin(2 * np.pi * 3000 * time_s)
    return (0.03 * pink / pink.std() + 0.005 * np.sin(2 * np.pi * 50 * time_s) + 0.02 * burst).astype(np.float32)


def write_distinct_files(folder: Path, count: int, minutes: float, seed: int = 0) -> list[Path]:
    """`count` different Ogg files of `minutes` each (written once; kept between calls)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for index in range(count):
        path = folder / f"site_{index:02d}.ogg"
        paths.append(path)
        if path.is_file():
            continue
        with sf.SoundFile(path, "w", RATE, 1, format="OGG", subtype="VORBIS") as handle:
            for _ in range(int(minutes)):      # a minute at a time: libsndfile's Vorbis encoder fails on huge writes
                audio = field_background(60, rng)
                for start in range(0, len(audio), RATE):
                    handle.write(audio[start:start + RATE])
    return paths


def bed_folder(work_dir: Path, sources: list[Path], hours: float, minutes: float) -> Path:
    """A folder of copies of `sources`, in turn, adding up to `hours` of audio."""
    folder = work_dir / f"bed_{hours:g}h"
    wanted = int(round(hours * 60 / minutes))
    if folder.is_dir() and len(list(folder.glob("*.ogg"))) == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index in range(wanted):
        shutil.copyfile(sources[index % len(sources)], folder / f"recording_{index:04d}.ogg")
    return folder


def peak_rss(repo: Path, bed: Path, out: Path, count: int) -> tuple[int, float, str]:
    """Run the command under /usr/bin/time -v -> (maximum resident set size in kB, wall seconds, command)."""
    shutil.rmtree(out, ignore_errors=True)
    command = ["/usr/bin/time", "-v", sys.executable, "data.py", "soundscapes", "--data-dir", "demo_data",
               "--bed-dir", str(bed), "--out", str(out), "--count", str(count)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)), wall, \
        " ".join(command)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, help="where the bed files and outputs go (not the repository)")
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 20.0], help="bed folder sizes to compare")
    parser.add_argument("--file-minutes", type=float, default=10.0, help="length of each bed file")
    parser.add_argument("--distinct", type=int, default=6, help="different files written (the rest are copies)")
    parser.add_argument("--count", type=int, default=20, help="soundscapes per run (data.py's default)")
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose data.py runs")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir).resolve()
    if work_dir.is_relative_to(ROOT) or work_dir.is_relative_to(Path(args.repo).resolve()):
        raise SystemExit("--work-dir must lie outside the repository")
    sources = write_distinct_files(work_dir / "distinct", args.distinct, args.file_minutes)
    for hours in args.hours:
        bed = bed_folder(work_dir, sources, hours, args.file_minutes)
        kilobytes, wall, command = peak_rss(Path(args.repo), bed, work_dir / f"out_{hours:g}h", args.count)
        print(f"bed {hours:g} h ({len(list(bed.glob('*.ogg')))} files): max RSS {kilobytes / 1024:.0f} MiB, "
              f"{wall:.0f} s wall  [{command}]", flush=True)


if __name__ == "__main__":
    main()
