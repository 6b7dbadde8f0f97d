"""Kill a CPU training run with SIGKILL at N random moments, resume each time, compare.

    python bench/kill_resume.py [--kills 10] [--seed 0]

An uninterrupted reference run and a run that is killed N times (each time
restarted with `--resume auto`) train the same tiny model on the same tiny data
set. After every kill, every checkpoint left in the run folder must load (no
torn file). At the end, metrics.csv, steps.csv and the final weights of both
runs must be identical: no interruption may cost more than the steps since the
last checkpoint, and none may change the result.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import model as model_lib  # noqa: E402
import runfolder  # noqa: E402
from conftest import write_tiny_dataset  # noqa: E402

TRAIN_FLAGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--batch-size", "2", "--workers", "0",
               "--epochs", "60", "--n-mels", "32", "--n-fft", "512", "--hop", "256", "--sample-rate", "16000",
               "--fmax", "8000", "--window-seconds", "2", "--ends-seconds", "4", "--keep-last", "2",
               "--dropout", "0.3", "--mixup-prob", "1", "--patience", "0"]


def command(data_dir: Path, out_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--resume", "auto", *TRAIN_FLAGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data_dir = write_tiny_dataset(work / "data")
        started = time.time()
        subprocess.run(command(data_dir, work / "reference"), check=True, capture_output=True)
        reference_seconds = time.time() - started
        started = time.time()
        subprocess.run([sys.executable, "-c", "import train"], cwd=ROOT, check=True)
        startup_seconds = time.time() - started
        training_seconds = max(reference_seconds - startup_seconds, 1.0)
        print(f"uninterrupted run: {reference_seconds:.1f} s, of which {startup_seconds:.1f} s start-up")

        killed_dir, kills, torn = work / "killed", 0, 0
        while kills < args.kills:
            process = subprocess.Popen(command(data_dir, killed_dir), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            # Kills land while training runs (after start-up), early enough to reach --kills before the end.
            delay = startup_seconds + rng.uniform(0.0, training_seconds / 10)
            try:
                process.wait(timeout=delay)
                print("  the run finished before its kill; starting over is not needed")
                break
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL: no handler runs, no cleanup
                process.wait()
                kills += 1
            files = runfolder.periodic_checkpoints(killed_dir) if killed_dir.exists() else []
            for path in files + ([killed_dir / "best.pt"] if (killed_dir / "best.pt").exists() else []):
                try:
                    model_lib.read_checkpoint(path)
                except model_lib.CheckpointError:
                    torn += 1
            newest = files[-1].name if files else "none yet"
            print(f"  kill {kills} after {delay:.1f} s; newest checkpoint {newest}")
        subprocess.run(command(data_dir, killed_dir), check=True, capture_output=True)

        same_metrics = (work / "reference" / "metrics.csv").read_text() == (killed_dir / "metrics.csv").read_text()
        same_steps = (work / "reference" / "steps.csv").read_text() == (killed_dir / "steps.csv").read_text()
        reference = model_lib.read_checkpoint(runfolder.periodic_checkpoints(work / "reference")[-1])["model"]
        resumed = model_lib.read_checkpoint(runfolder.periodic_checkpoints(killed_dir)[-1])["model"]
        same_weights = all((reference[name] == resumed[name]).all() for name in reference)
        print(f"\n{kills} kills: metrics.csv identical: {same_metrics}; steps.csv identical: {same_steps}; "
              f"final weights identical: {same_weights}; checkpoints that failed to load after a kill: {torn}")
        if not (same_metrics and same_steps and same_weights and torn == 0):
            import difflib
            for name in ("metrics.csv", "steps.csv"):
                diff = difflib.unified_diff((work / "reference" / name).read_text().splitlines(),
                                            (killed_dir / name).read_text().splitlines(), lineterm="", n=0)
                print("\n".join(list(diff)[:20]))
            sys.exit(1)


if __name__ == "__main__":
    main()
