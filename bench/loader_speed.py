"""Training-loader throughput with and without the decoded-audio cache, for 0, 1 and 2 workers.

    python bench/loader_speed.py [--median-seconds 40] [--seconds 20]

Makes (once) a demo data set of real-length recordings (log-normal lengths around
--median-seconds, 32/44.1/48 kHz ogg, some stereo), caches it with
`python data.py cache` (ends policy: first and last 8 s at 32 kHz), then runs
train.py's own loader (loader.make_loader over loader.epoch_batches of
epoch after epoch, 5-s crops, batch 32) for about --seconds per setting and
counts samples per second. Steady state: the loader is built once per setting and
its first batch (worker start-up) is not timed.
"""
from __future__ import annotations

import dataclasses
import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo  # noqa: E402
import loader  # noqa: E402
import options  # noqa: E402


def measure(train_set, args, workers: int, seconds: float) -> tuple[float, int]:
    """-> (samples per second, samples timed) of train.py's loader with `workers` processes."""
    run_args = options.get_args_parser().parse_args(["--workers", str(workers), "--batch-size", str(args.batch_size)])
    settings = options.training_settings(run_args).loader
    batches = itertools.chain.from_iterable(
        loader.epoch_batches(train_set, settings, epoch)
        for epoch in itertools.count())
    batches_loader = loader.training_loader(train_set, settings, torch.device("cpu"), batches)
    iterator = iter(batches_loader)
    next(iterator)                                   # workers started, first batch decoded
    samples, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = next(iterator)
        samples += len(batch["waveform"])
    elapsed = time.perf_counter() - started
    del iterator, batches_loader
    return samples / elapsed, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "loader_speed"))
    parser.add_argument("--median-seconds", type=float, default=40.0, help="median recording length")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work_dir)
    data_dir = work / f"data_{args.median_seconds:g}s"
    if not (data_dir / "train_metadata.csv").is_file():
        demo.write_demo_dataset(data_dir, seed=1, median_seconds=args.median_seconds)
    cache_dir = work / f"cache_{args.median_seconds:g}s"
    started = time.perf_counter()
    data.main(["cache", "--data-dir", str(data_dir), "--out", str(cache_dir), "--workers", "2"])
    cache_seconds = time.perf_counter() - started

    run_args = options.get_args_parser().parse_args(["--data-dir", str(data_dir), "--val-fraction", "0.01"])
    settings = options.training_settings(run_args).data
    _, uncached, _ = data.build_datasets(settings, work)
    _, cached, _ = data.build_datasets(dataclasses.replace(settings, cache=str(cache_dir)), work)
    hours = sum(uncached.durations) / 3600
    print(f"\n{len(uncached)} training recordings, {hours:.2f} h of audio (median length "
          f"{sorted(uncached.durations)[len(uncached) // 2]:.0f} s); cache built in {cache_seconds:.0f} s, "
          f"{(cache_dir / 'audio.int16').stat().st_size / 1e6:.0f} MB\n")
    print("| workers | uncached samples/s | cached samples/s | cached / uncached |")
    print("|---|---|---|---|")
    for workers in args.workers:
        slow, _ = measure(uncached, args, workers, args.seconds)
        fast, _ = measure(cached, args, workers, args.seconds)
        print(f"| {workers} | {slow:.0f} | {fast:.0f} | {fast / slow:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
