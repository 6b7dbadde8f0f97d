"""Do a job's scores depend on --batch-size or the thread count? The same files scored at each setting,
compared with the first: the largest difference, how many rows differ, and how many rows' top species changed.

    python bench/batch_invariance.py --ckpts runs/demo/best.pt [--files 4] [--batch-sizes 16 1] [--threads 2 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import audio  # noqa: E402
import data  # noqa: E402
import infer  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpts", nargs="+", required=True)
    parser.add_argument("--soundscapes", type=Path, default=data.DEMO_DIR / "test_soundscapes")
    parser.add_argument("--files", type=int, default=4, help="the first N files of --soundscapes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args(argv)
    files = audio.audio_files(args.soundscapes)[:args.files]
    scores = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch_size in args.batch_sizes:
            predictor = infer.Predictor(args.ckpts, batch_size=batch_size, streams=1, workers=0, threads=threads)
            scores[(threads, batch_size)] = predictor.predict(files).to_numpy()     # (rows, species)
    first_key = next(iter(scores))
    first = scores[first_key]
    print(f"{len(files)} file(s), {len(first)} rows; compared with {first_key[0]} thread(s), batch {first_key[1]}")
    for (threads, batch_size), rows in scores.items():
        difference = np.abs(rows - first)
        top_changed = int((rows.argmax(axis=1) != first.argmax(axis=1)).sum())
        print(f"threads {threads}, batch {batch_size:3d}: max |difference| {difference.max():.3g}, rows differing "
              f"{int((difference.max(axis=1) > 0).sum())} of {len(rows)}, top species changed in {top_changed}")


if __name__ == "__main__":
    main()
