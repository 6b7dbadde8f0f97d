"""CPU inference speed: model-only vs end-to-end throughput per backend, and peak memory.

    python bench/infer_speed.py [--backbone tf_efficientnet_b0.ns_jft_in1k] [--soundscapes DIR]

Builds an untrained model of the given backbone (speed does not depend on the
weights) with the BirdCLEF 2023 vocabulary size, then for every available backend
measures, each in a fresh subprocess so that peak resident memory (ru_maxrss) is its own:
  - model-only: windows per second of the runner on in-memory 5-s windows
    (frontend + classifier, exactly what infer.py calls), as audio seconds per second;
  - end-to-end: `infer.main` on --soundscapes (decode, resample, windows, model,
    submission), as audio seconds per wall second; by default the real field
    recordings in ../shared/real-soundscapes/audio (mp3, 22.05-48 kHz, 67 min), else
    --files synthetic 32 kHz ogg soundscapes of --minutes;
  - peak memory: `infer.main` on the longest file alone (a 10-minute soundscape).
Throughputs are the median of --repeats interleaved measurements. The header and the table
name the CPU (model and the flags that decide bf16's speed: avx2, avx512f, avx512_bf16,
amx_bf16); the "auto" row runs --precision auto (timed once per machine and cached, see
engines.choose_bf16; the timing is not in its figures) and names what it chose.
The first row, "torch-plain", is the plain fp32 eager path (no channels-last, no
bf16, no export, one batch at a time) that the speed-ups are measured against; the
others run infer.py's defaults (--streams 2: two batches at once).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SPECIES = 264  # BirdCLEF 2023
REAL_SOUNDSCAPES = ROOT.parent / "shared" / "real-soundscapes" / "audio"


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


def cpu_line() -> str:
    """The machine, as the header and the table name it: bf16's speed depends on these flags (issue 28)."""
    import os
    import platform
    import torch
    import precision
    return (f"CPU: {precision.cpu_info().describe()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
            f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")


def backend_flags(backend: str, precision: str, threads: int, batch_size: int, streams: int) -> list[str]:
    """infer.py flags for a row; "torch-plain" is torch without channels-last, one batch at a time."""
    flags = ["--backend", "torch" if backend == "torch-plain" else backend, "--precision", precision,
             "--threads", str(threads), "--batch-size", str(batch_size)]
    if backend == "torch-plain":
        return flags + ["--no-channels-last", "--streams", "1"]
    return flags + ["--streams", str(streams)]


def model_only(checkpoint: str, backend: str, precision: str, threads: int, batch_size: int, streams: int,
               seconds: float) -> dict:
    import torch
    import engines
    import infer
    import model as model_lib
    if threads:
        torch.set_num_threads(threads)
    args = infer.get_args_parser().parse_args(["--ckpts", checkpoint,
                                               *backend_flags(backend, precision, threads, batch_size, streams)])
    model = model_lib.load_model(checkpoint)
    settings = infer.settings_of(engines.EngineSettings, vars(args))
    bf16 = engines.choose_bf16([model], settings, torch.device("cpu"))   # auto: the cached choice, as infer.py's
    runner = engines.make_runner(model, settings, torch.device("cpu"), bf16)
    batch = torch.randn(batch_size, model.window_samples) * 0.05
    list(runner.map([batch] * 4))  # warm-up (and the parity check for exported backends)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += batch_size * len(list(runner.map([batch] * 8)))  # several in flight, as infer.py runs them
    return {"windows_per_second": done / (time.perf_counter() - started), "bf16": bf16}


def end_to_end(checkpoint: str, folder: str, out_dir: str, backend: str, precision: str, threads: int,
               batch_size: int, streams: int) -> dict:
    import infer
    args = infer.get_args_parser().parse_args(["--ckpts", checkpoint, "--soundscapes", folder,
                                               *backend_flags(backend, precision, threads, batch_size, streams),
                                               "--out", str(Path(out_dir) / f"submission_{backend}.csv")])
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
    parser.add_argument("--soundscapes", default=str(REAL_SOUNDSCAPES),
                        help="folder of soundscapes for the end-to-end runs (synthetic ones if it does not exist)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each synthetic soundscape")
    parser.add_argument("--files", type=int, default=4, help="synthetic soundscapes")
    parser.add_argument("--threads", type=int, default=0, help="0 = torch default (all cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--streams", type=int, default=2,
                        help="infer.py --streams for every row but the plain baseline")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each model-only measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per backend; the median is reported")
    parser.add_argument("--only", nargs="+", default=None, metavar="BACKEND:PRECISION",
                        help="measure only these, e.g. onnxruntime:fp32 (torch-plain:fp32 is the baseline)")
    args = parser.parse_args()

    import importlib.util
    import soundfile as sf
    configurations = [("torch-plain", "fp32"), ("torch", "fp32"), ("torch", "bf16"), ("torch", "auto")]
    configurations += [(name, precision) for name in ("onnxruntime", "openvino")
                       if importlib.util.find_spec(name) for precision in ("fp32", "bf16")
                       if not (name == "onnxruntime" and precision == "bf16")]  # ORT has no bf16 CPU path
    if args.only:
        configurations = [c for c in configurations if f"{c[0]}:{c[1]}" in args.only]
    with tempfile.TemporaryDirectory() as work:
        checkpoint = str(Path(work) / "model.pt")
        make_checkpoint(args.backbone, Path(checkpoint))
        folder = Path(args.soundscapes)
        if not folder.is_dir():
            folder = Path(work) / "soundscapes"
            make_soundscapes(folder, args.files, args.minutes)
        import infer
        files = infer.list_audio(folder)
        longest = max(files, key=lambda path: sf.info(path).duration)
        single = Path(work) / "longest"
        single.mkdir()
        (single / longest.name).symlink_to(longest.resolve())
        audio_minutes = sum(sf.info(path).duration for path in files) / 60
        print(cpu_line(), flush=True)
        print(f"end-to-end: {len(files)} files, {audio_minutes:.0f} min in {folder}; "
              f"memory: {longest.name} ({sf.info(longest).duration / 60:.1f} min)", flush=True)
        rows = []
        for backend, precision in configurations:
            common = {"checkpoint": checkpoint, "backend": backend, "precision": precision,
                      "threads": args.threads, "batch_size": args.batch_size, "streams": args.streams}
            # this shared 2-core machine varies by up to ~25% between runs: median of --repeats, interleaved
            only, full = [], []
            for _ in range(args.repeats):
                result = measure("model", {**common, "seconds": args.seconds})
                only.append(result["windows_per_second"] * 5)
                if precision == "auto":                 # name what auto chose on this machine
                    precision = "auto: " + ("bf16" if result["bf16"] else "fp32")   # common keeps "auto"
                full.append(measure("e2e", {**common, "folder": str(folder), "out_dir": work})["realtime_factor"])
            memory = measure("e2e", {**common, "folder": str(single), "out_dir": work})
            rows.append((backend, precision, statistics.median(only), statistics.median(full),
                         memory["peak_rss_mb"]))
            print(f"{backend:12s} {precision:5s} model-only {' '.join(f'{x:.0f}' for x in only)} audio-s/s  "
                  f"end-to-end {' '.join(f'{x:.0f}' for x in full)} audio-s/s  peak (longest file) "
                  f"{memory['peak_rss_mb']:.0f} MB", flush=True)
    baseline_only, baseline_full = rows[0][2], rows[0][3]
    print(f"\n{cpu_line()}\n`python bench/infer_speed.py {' '.join(sys.argv[1:])}`: {args.backbone}, batch "
          f"{args.batch_size}, streams {args.streams} (baseline 1); end-to-end on {len(files)} files "
          f"({audio_minutes:.0f} min), peak memory on {longest.name}\n")
    print("| backend | precision | model-only (x real time) | end-to-end (x real time) | end-to-end / model-only "
          "| model-only / plain | end-to-end / plain | peak RSS, one 10-min file (MB) "
          "| BirdCLEF 2023 test set (200 x 10 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, precision, only, full, peak in rows:
        print(f"| {backend} | {precision} | {only:.0f} | {full:.0f} | {full / only:.0%} | {only / baseline_only:.1f}x "
              f"| {full / baseline_full:.1f}x | {peak:.0f} | {200 * 600 / full / 60:.1f} min |")


if __name__ == "__main__":
    main()
