"""CPU inference speed: model-only vs end-to-end throughput per backend, and peak memory.

    python bench/infer_speed.py [--backbone tf_efficientnet_b0.ns_jft_in1k] [--minutes 10] [--files 2]

Builds an untrained model of the given backbone (speed does not depend on the
weights) with the BirdCLEF 2023 vocabulary size, writes `--files` synthetic
soundscapes of `--minutes` each, then for every available backend measures
  - model-only: windows per second of the runner on in-memory 5-s windows
    (frontend + classifier, exactly what infer.py calls), and
  - end-to-end: `infer.main` on the folder (decode, resample, windows, model,
    submission), as audio seconds per wall second,
each in a fresh subprocess so that peak resident memory (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SPECIES = 264  # BirdCLEF 2023


def make_checkpoint(backbone: str, path: Path) -> None:
    import torch
    import model as model_lib
    config = {"backbone": backbone, "labels": [f"species{i:03d}" for i in range(N_SPECIES)],
              "activation": "softmax", "sample_rate": 32000, "window_seconds": 5.0, "n_fft": 1024,
              "hop": 512, "n_mels": 128, "fmin": 20.0, "fmax": 16000.0, "normalization": "standard",
              "dropout": 0.0}
    torch.manual_seed(0)
    model = model_lib.BirdCallModel(config)
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": config,
                "labels": config["labels"]}, path)


def make_soundscapes(folder: Path, files: int, minutes: float) -> None:
    import numpy as np
    import soundfile as sf
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rate = 32000
    for index in range(files):
        with sf.SoundFile(folder / f"soundscape_{index}.ogg", "w", rate, 1, format="OGG", subtype="VORBIS") as out:
            for _ in range(int(minutes * 60)):  # 1-s blocks: libsndfile's Vorbis encoder dislikes huge writes
                out.write((0.05 * rng.standard_normal(rate)).astype("float32"))


def model_only(checkpoint: str, backend: str, precision: str, threads: int, batch_size: int, seconds: float) -> dict:
    import torch
    import infer
    import model as model_lib
    if threads:
        torch.set_num_threads(threads)
    args = infer.get_args_parser().parse_args(["--ckpts", checkpoint, "--backend", backend, "--precision",
                                               precision, "--threads", str(threads)])
    model = model_lib.load_model(checkpoint)
    runner = infer.make_runner(model, args, torch.device("cpu"), infer.use_bf16(precision, torch.device("cpu")))
    batch = torch.randn(batch_size, model.window_samples) * 0.05
    runner(batch)  # warm-up (and the parity check for exported backends)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner(batch)
        done += batch_size
    return {"windows_per_second": done / (time.perf_counter() - started)}


def end_to_end(checkpoint: str, folder: str, backend: str, precision: str, threads: int, batch_size: int) -> dict:
    import infer
    args = infer.get_args_parser().parse_args(["--ckpts", checkpoint, "--soundscapes", folder, "--backend", backend,
                                               "--precision", precision, "--threads", str(threads),
                                               "--batch-size", str(batch_size),
                                               "--out", str(Path(folder).parent / f"submission_{backend}.csv")])
    result = infer.main(args)
    return {"audio_seconds": result["audio_seconds"], "wall_seconds": result["wall_seconds"],
            "realtime_factor": result["realtime_factor"]}


def child(argv) -> None:
    """Run one measurement in this process and print it as JSON with the peak memory."""
    kind, payload = argv[0], json.loads(argv[1])
    result = model_only(**payload) if kind == "model" else end_to_end(**payload)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(kind: str, payload: dict) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(payload)],
                            capture_output=True, text=True, cwd=ROOT)
    for line in output.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} {payload.get('backend')} failed:\n{output.stderr[-2000:]}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_b0.ns_jft_in1k")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each soundscape")
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch default (all cores)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each model-only measurement")
    parser.add_argument("--only", nargs="+", default=None, metavar="BACKEND:PRECISION",
                        help="measure only these, e.g. onnxruntime:fp32")
    args = parser.parse_args()

    import importlib.util
    configurations = [("torch", "fp32"), ("torch", "bf16")]
    configurations += [(name, precision) for name in ("onnxruntime", "openvino")
                       if importlib.util.find_spec(name) for precision in ("fp32", "bf16")
                       if not (name == "onnxruntime" and precision == "bf16")]  # ORT has no bf16 CPU path
    if args.only:
        configurations = [c for c in configurations if f"{c[0]}:{c[1]}" in args.only]
    with tempfile.TemporaryDirectory() as work:
        checkpoint, folder = str(Path(work) / "model.pt"), Path(work) / "soundscapes"
        make_checkpoint(args.backbone, Path(checkpoint))
        make_soundscapes(folder, args.files, args.minutes)
        rows = []
        for backend, precision in configurations:
            common = {"checkpoint": checkpoint, "backend": backend, "precision": precision,
                      "threads": args.threads, "batch_size": args.batch_size}
            only = measure("model", {**common, "seconds": args.seconds})
            full = measure("e2e", {**common, "folder": str(folder)})
            rows.append((backend, precision, only["windows_per_second"] * 5, full["realtime_factor"],
                         full["peak_rss_mb"]))
            print(f"{backend:12s} {precision:5s} model-only {only['windows_per_second'] * 5:7.1f} audio-s/s  "
                  f"end-to-end {full['realtime_factor']:7.1f} audio-s/s  peak {full['peak_rss_mb']:.0f} MB", flush=True)
    baseline = rows[0][2]
    print(f"\n{args.backbone}, {args.files} x {args.minutes:g} min, batch {args.batch_size}\n")
    print("| backend | precision | model-only (x real time) | end-to-end (x real time) | end-to-end / model-only "
          "| speed-up over torch fp32 model-only | peak RSS (MB) | BirdCLEF 2023 test set (200 x 10 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, precision, only, full, peak in rows:
        print(f"| {backend} | {precision} | {only:.0f} | {full:.0f} | {full / only:.0%} | {only / baseline:.1f}x "
              f"| {peak:.0f} | {200 * 600 / full / 60:.1f} min |")


if __name__ == "__main__":
    main()
