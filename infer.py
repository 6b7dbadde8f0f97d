"""Apply one or more checkpoints to long recordings and write a BirdCLEF submission.

    python infer.py --ckpts a.pt b.pt --soundscapes DIR --out submission.csv
    python infer.py --ckpts a.pt --soundscapes DIR --labels labels.csv      # also score it
    torchrun --nproc_per_node 4 infer.py --ckpts a.pt --device cuda ...     # files split across processes

Every file is decoded once, resampled to each checkpoint's rate and cut into
windows; windows from several files share batches. Each checkpoint's own
activation (from the checkpoint) is applied before its scores are aligned by
species name and combined. Rows are 5-second segments named
`<file stem>_<end second>`, as Kaggle expects.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

import data
import distributed
import metrics
import model as model_lib

log = logging.getLogger("birdclef")

AUDIO_EXTENSIONS = data.AUDIO_EXTENSIONS
ROW_SECONDS = data.ROW_SECONDS   # BirdCLEF scores 5-second rows
MIN_LAST_ROW = 1.0               # a final partial row needs at least this much audio
NOCALL = data.NOCALL


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Apply checkpoints to soundscapes; write a submission.",
                                     add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("input and output")
    group.add_argument("--ckpts", nargs="+", required=True, help="checkpoint files written by train.py")
    group.add_argument("--soundscapes", default=str(data.DEMO_DIR / "test_soundscapes"),
                       help="folder of ogg/mp3/flac/wav files to score")
    group.add_argument("--out", default="submission.csv",
                       help="submission CSV (kaggle, csv) or folder of selection tables (raven)")
    group.add_argument("--format", choices=("kaggle", "csv", "raven"), default="kaggle",
                       help="kaggle: row_id + species columns; csv: file, start_s, end_s + species "
                            "columns; raven: one Raven selection table per file")
    group.add_argument("--min-conf", type=float, default=0.5, help="raven: smallest score written")
    group.add_argument("--sample-submission", default=None,
                       help="take exactly these columns in this order (species no model knows get 0)")
    group.add_argument("--labels", default=None,
                       help="score the predictions against a row_id x species 0/1 table or a "
                            "file,start_s,end_s,labels table")

    group = parser.add_argument_group("detections mode (score training audio)")
    group.add_argument("--audio-dir", default=None, help="train_audio folder, searched recursively")
    group.add_argument("--detections", default=None,
                       help="write per-window detections here instead of a submission")
    group.add_argument("--metadata", default=None,
                       help="train_metadata.csv giving each file's primary label (default: beside --audio-dir)")
    group.add_argument("--top-k", type=int, default=3, help="species listed per window")

    group = parser.add_argument_group("how the classifier is applied")
    group.add_argument("--combine", choices=("mean", "power"), default="mean",
                       help="how checkpoints' scores are combined")
    group.add_argument("--power", type=float, default=2.0, help="exponent of --combine power")
    group.add_argument("--ema", action="store_true",
                       help="use the checkpoints' exponential-moving-average weights (trained with --ema)")
    group.add_argument("--average-weights", action="store_true",
                       help="average the checkpoints' weights into one model (same run, same config)")
    group.add_argument("--nocall-gate", action="store_true",
                       help="checkpoints trained with --nocall: scale every species by 1 - p(nocall)")
    group.add_argument("--hop", type=float, default=ROW_SECONDS,
                       help="seconds between window starts; below 5, overlapping windows are "
                            "averaged into the rows, weighted by overlap")
    group.add_argument("--smooth", default=None,
                       help="odd number of comma-separated weights over neighbouring rows, e.g. 0.1,0.8,0.1")
    group.add_argument("--file-prior", type=float, default=0.0,
                       help="mix each row with the file's per-species maximum: (1-w)*row + w*max")

    group = parser.add_argument_group("speed")
    group.add_argument("--batch-size", type=int, default=16,
                       help="windows per forward pass (16 was fastest on a 2-core CPU for every backend, "
                            "64 was 25-50%% slower; raise it on a GPU)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="torch backend on the CPU: channels-last convolutions (faster with oneDNN); "
                            "--no-channels-last is the plain eager path, for comparison")
    group.add_argument("--threads", type=int, default=0,
                       help="CPU threads in all, shared among --streams (0 = torch's default: one per core)")
    group.add_argument("--workers", type=int, default=1, help="threads decoding audio ahead of the model")
    group.add_argument("--streams", type=int, default=2,
                       help="CPU: batches run at once, each on --threads / streams threads (at most one "
                            "stream per thread); on a 2-core CPU 2 streams were 4-51%% faster than 1 for "
                            "every backend")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto: bf16 on CPUs with native bf16 (torch autocast, OpenVINO), else fp32")
    group.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                       help="CPU engine for the classifier; onnxruntime and openvino are optional "
                            "installs, checked against torch on the first batch")
    group.add_argument("--parity-tolerance", type=float, default=0.02,
                       help="largest score difference from torch fp32 accepted on the first batch")
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


# ----------------------------------------------------------------------------- row layout

def row_count(n_samples: int, sample_rate: int) -> int:
    """5-s rows for a file: full rows, plus a padded last row holding at least 1 s of audio.

    A few samples of decoder padding past a multiple of 5 s therefore add no row;
    a file shorter than 5 s still gives one row.
    """
    seconds = n_samples / sample_rate
    full = int(seconds // ROW_SECONDS)
    remainder = seconds - full * ROW_SECONDS
    return max(full + (remainder >= MIN_LAST_ROW), 1)


def row_ids(stem: str, n_rows: int) -> list[str]:
    return [f"{stem}_{int(ROW_SECONDS * (i + 1))}" for i in range(n_rows)]


def window_plan(n_rows: int, window_seconds: float, hop_seconds: float):
    """Windows covering the row grid -> (start seconds (W,), weights (n_rows, W)).

    Window centres sit every `hop` seconds from the first row's centre; a model
    whose window is longer or shorter than a row sees that much context around
    it. A row's score is the overlap-weighted mean of the windows that overlap it,
    so hop = window = 5 s gives exactly one window per row.
    """
    centres = ROW_SECONDS / 2 + np.arange(0.0, n_rows * ROW_SECONDS - ROW_SECONDS / 2 + 1e-9, hop_seconds)
    starts = centres - window_seconds / 2
    row_starts = np.arange(n_rows) * ROW_SECONDS
    overlap = (np.minimum(row_starts[:, None] + ROW_SECONDS, starts[None, :] + window_seconds)
               - np.maximum(row_starts[:, None], starts[None, :])).clip(min=0)   # (n_rows, W)
    return starts, overlap / overlap.sum(axis=1, keepdims=True)


def copy_window(waveform: np.ndarray, offset: int, out: np.ndarray) -> None:
    """out[:] = waveform[offset:offset + len(out)], with zeros where that lies outside the waveform."""
    begin, end = max(offset, 0), min(offset + len(out), len(waveform))
    if begin >= end:
        out[:] = 0.0
        return
    out[:begin - offset] = 0.0
    out[begin - offset:end - offset] = waveform[begin:end]
    out[end - offset:] = 0.0


def window_offsets(starts: np.ndarray, sample_rate: int) -> np.ndarray:
    """Window start times (s) -> first sample of each window (negative: before the file)."""
    return np.round(np.asarray(starts) * sample_rate).astype(np.int64)


def cut_windows(waveform: np.ndarray, sample_rate: int, starts: np.ndarray, window_seconds: float) -> np.ndarray:
    """(samples,) -> (W, window_samples); zero-padded before the start and after the end."""
    windows = np.empty((len(starts), int(round(window_seconds * sample_rate))), dtype=np.float32)
    for row, offset in enumerate(window_offsets(starts, sample_rate)):
        copy_window(waveform, int(offset), windows[row])
    return windows


def fill_batch(sources: list[tuple[np.ndarray, int]], window_samples: int) -> np.ndarray:
    """(waveform, first sample) of each window -> (B, window_samples) float32.

    Each window is copied once, straight into its batch: no padded copy of the file and
    no array of all its windows (for a 10-minute file those were 77 MB each), and the
    batch is still in the cache when the frontend reads it.
    """
    batch = np.empty((len(sources), window_samples), dtype=np.float32)
    for row, (waveform, offset) in enumerate(sources):
        copy_window(waveform, offset, batch[row])
    return batch


# ----------------------------------------------------------------------------- ensemble members

@dataclass
class Member:
    """One model of the ensemble, with what is needed to feed it and read its output."""
    name: str
    model: model_lib.BirdCallModel
    column_index: np.ndarray = field(default=None)  # for each model label: output column, or -1
    runner: object = None                           # waveforms (B, samples) -> logits (B, C)

    @property
    def sample_rate(self) -> int:
        return self.model.config["sample_rate"]

    @property
    def window_seconds(self) -> float:
        return self.model.config["window_seconds"]


def load_members(paths, average_weights: bool, ema: bool = False) -> list[Member]:
    models = [model_lib.load_model(path, ema=ema) for path in paths]
    if average_weights and len(models) > 1:
        reference = models[0].config
        for path, other in zip(paths[1:], models[1:]):
            if other.config != reference:
                raise ValueError(f"--average-weights needs checkpoints of one configuration; {path} "
                                 f"differs from {paths[0]}")
        states = [m.state_dict() for m in models]
        averaged = {key: (sum(state[key].double() for state in states) / len(states)).to(value.dtype)
                    if value.is_floating_point() else value
                    for key, value in states[0].items()}
        models[0].load_state_dict(averaged)
        return [Member(f"mean of {len(paths)}", models[0])]
    return [Member(str(path), m) for path, m in zip(paths, models)]


def output_columns(members: list[Member], sample_submission: str | None) -> list[str]:
    """The submission's species columns: the sample submission's, else the union of labels."""
    if sample_submission:
        columns = [c for c in pd.read_csv(sample_submission, nrows=0).columns if c != "row_id"]
    else:
        columns = []
        for member in members:
            columns += [label for label in member.model.labels if label not in columns]
    return [c for c in columns if c != NOCALL]  # nocall takes part in the softmax, never in the output


def align(members: list[Member], columns: list[str]) -> None:
    index = {column: i for i, column in enumerate(columns)}
    for member in members:
        member.column_index = np.array([index.get(label, -1) for label in member.model.labels])
        if (member.column_index < 0).all():
            raise ValueError(f"{member.name} shares no species with the output columns")


# ----------------------------------------------------------------------------- prediction

def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Runner:
    """Waveforms (B, samples) -> logits (B, C): `runner(batch)` for one batch, `runner.map(batches)`
    for many, `streams` of them at a time.

    Streams: on a CPU with few cores a batch on every core at once (each stream one
    thread) keeps the cores busier than one batch spread over all of them, whose threads
    wait for each other after every layer. The very first batch runs alone, so an
    exported engine's check against torch happens once, before any other batch.
    Results are collected in order: `submit` returns a callable that waits for them.
    """

    streams, stream_threads, pool = 1, 1, None

    @property
    def max_in_flight(self) -> int:
        """Batches started and not yet collected. Results are collected in order, so with
        only one batch per stream a stream slowed by a decoding thread would hold up the
        others; 4 per stream let them run on (5% faster end to end on 2 cores)."""
        return 4 * self.streams if self.streams > 1 else 1

    def submit(self, batch: torch.Tensor):
        """Start one batch -> a callable that waits for its logits and returns them."""
        if self.streams <= 1:
            logits = self(batch)
            return lambda: logits
        if self.pool is None:  # made once and kept: each thread keeps its engine state
            self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="stream",
                                           initializer=torch.set_num_threads, initargs=(self.stream_threads,))
            # alone, and in a stream thread: an OpenVINO request made in this thread too would
            # keep its own buffers (~130 MB more at the peak)
            logits = self.pool.submit(self, batch).result()
            return lambda: logits
        return self.pool.submit(self, batch).result

    def map(self, batches):
        """Logits of each batch, in order, with up to max_in_flight + 1 batches held at a time."""
        in_flight = deque()
        for batch in batches:
            in_flight.append(self.submit(batch))
            if len(in_flight) > self.max_in_flight:
                yield in_flight.popleft()()
        while in_flight:
            yield in_flight.popleft()()


def split_threads(threads: int, streams: int) -> tuple[int, int]:
    """--threads (0 = torch's default) and --streams -> (streams, threads of each): never more
    streams than threads."""
    total = threads or torch.get_num_threads()
    streams = max(1, min(streams, total))
    return streams, total // streams


class TorchRunner(Runner):
    """Waveforms (B, samples) -> logits (B, C) float32 on the CPU, with plain PyTorch."""

    def __init__(self, model: model_lib.BirdCallModel, device: torch.device, bf16: bool, channels_last: bool = True,
                 streams: int = 1, threads: int = 0):
        self.model, self.device, self.bf16 = model.to(device), device, bf16
        if device.type == "cpu":
            self.streams, self.stream_threads = split_threads(threads, streams)
            if channels_last:
                self.model.to(memory_format=torch.channels_last)  # faster convolutions with oneDNN

    @torch.inference_mode()
    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(waveforms.to(self.device)).float().cpu()


class _Classifier(torch.nn.Module):
    """The exported part: spectrogram image -> logits (the frontend stays the model's torch layer)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.classify(image)


def import_optional(name: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ValueError(f"--backend {name} needs the optional package '{name}' "
                         f"(pip install {name}); it is not installed") from error


class ExportedRunner(Runner):
    """The model's own torch frontend, then its classifier exported to ONNX Runtime or OpenVINO.

    The first batch is also run through plain fp32 PyTorch and the scores compared,
    so an export that changes the predictions is refused instead of submitted.
    """

    def __init__(self, model: model_lib.BirdCallModel, backend: str, bf16: bool, threads: int,
                 tolerance: float, streams: int = 1):
        self.model, self.backend, self.tolerance, self.checked = model.float().cpu().eval(), backend, tolerance, False
        self.streams, self.stream_threads = split_threads(threads, streams)
        if self.streams > 1:
            threads = self.stream_threads  # ONNX Runtime: threads of each run; OpenVINO: of each stream
        with torch.no_grad():  # not inference_mode: exporters trace with these tensors
            example = model.frontend(torch.randn(2, model.window_samples))     # (2, 1, n_mels, T)
        if backend == "onnxruntime":
            ort = import_optional("onnxruntime")
            import tempfile
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "classifier.onnx"
                torch.onnx.export(_Classifier(model).eval(), (example,), str(path), input_names=["image"],
                                  output_names=["logits"], dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
                options = ort.SessionOptions()
                options.enable_cpu_mem_arena = False  # the arena keeps every batch's peak: ~1 GB more RSS
                if threads:
                    options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda image: session.run(None, {"image": image})[0]   # safe from several threads
        elif backend == "openvino":
            ov = import_optional("openvino")
            config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
            if self.streams > 1:  # one executor stream per concurrent batch
                config.update({"NUM_STREAMS": self.streams, "INFERENCE_NUM_THREADS": threads * self.streams})
            elif threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(ov.convert_model(_Classifier(model), example_input=example),
                                               "CPU", config)
            requests = threading.local()   # an infer request serves one batch at a time: one per thread

            def run(image):
                if not hasattr(requests, "request"):
                    requests.request = compiled.create_infer_request()
                return requests.request.infer([image])[0]
            self.run = run
        else:
            raise ValueError(f"unknown backend {backend!r}")
        self.model.eval()  # exporters restore the wrapper's train/eval mode onto the model; keep eval

    @torch.inference_mode()
    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        image = self.model.frontend(waveforms).numpy()                         # (B, 1, n_mels, T)
        logits = torch.from_numpy(np.asarray(self.run(image), dtype=np.float32))
        if not self.checked:
            self.check_against_torch(waveforms[:8], logits[:8])
        return logits

    def check_against_torch(self, waveforms, logits):
        check_parity(self.model, waveforms, logits, self.backend, self.tolerance)
        self.checked = True


def check_parity(model, waveforms: torch.Tensor, logits: torch.Tensor, backend: str, tolerance: float) -> float:
    """Compare a backend's logits for `waveforms` with plain fp32 PyTorch; raise if the scores differ."""
    with torch.inference_mode():
        reference = model_lib.activate(model(waveforms), model.activation)
    difference = (model_lib.activate(logits, model.activation) - reference).abs().max().item()
    if not difference <= tolerance:  # also catches nan
        raise FloatingPointError(f"--backend {backend} disagrees with PyTorch on the first batch: "
                                 f"scores differ by up to {difference:.4f} (> --parity-tolerance "
                                 f"{tolerance}); use --backend torch")
    log.info("%s matches PyTorch on the first batch (largest score difference %.2e)", backend, difference)
    return difference


def make_runner(model, args, device, bf16):
    if args.streams < 1:
        raise ValueError(f"--streams must be at least 1, got {args.streams}")
    if args.backend == "torch":
        return TorchRunner(model, device, bf16, args.channels_last, args.streams, args.threads)
    if device.type != "cpu":
        raise ValueError(f"--backend {args.backend} runs on the CPU; use --backend torch with --device {device}")
    return ExportedRunner(model, args.backend, bf16, args.threads, args.parity_tolerance, args.streams)


class MemberStream:
    """One ensemble member's windows on their way through its runner.

    Windows queue up across files and go in whole batches, so a batch may end one file
    and start the next: one partial batch per run instead of one per file, and with
    --streams the engine never drains at a file's end (draining left a core idle at the
    end of every file: OpenVINO's time on the 11 real soundscapes, decoded beforehand,
    went from 5.2 to 4.5 s). A file's rows are ready once all its windows are scored.
    """

    def __init__(self, member: Member, batch_size: int, hop: float, nocall_gate: bool):
        self.member, self.batch_size, self.hop, self.nocall_gate = member, batch_size, hop, nocall_gate
        self.windows = deque()     # (waveform, first sample) of each window not yet in a batch
        self.files = deque()       # (key, its windows, row weights (n_rows, W)), oldest first
        self.in_flight = deque()   # batches in the runner, oldest first: callables returning logits
        self.scored, self.n_scored = [], 0   # activated (b, C_m) scores not yet handed to a file
        self.rows = {}             # key -> (n_rows, C_m) row scores of each finished file

    def add(self, key, waveform: np.ndarray, n_rows: int) -> None:
        starts, weights = window_plan(n_rows, self.member.window_seconds, self.hop)
        self.windows.extend((waveform, int(offset)) for offset in window_offsets(starts, self.member.sample_rate))
        self.files.append((key, len(starts), weights))
        self.run()

    def run(self, final: bool = False) -> None:
        """Start every whole batch (and with final, the rest); collect those that must finish first."""
        while len(self.windows) >= self.batch_size or (final and self.windows):
            sources = [self.windows.popleft() for _ in range(min(self.batch_size, len(self.windows)))]
            batch = torch.from_numpy(fill_batch(sources, self.member.model.window_samples))    # (B, window_samples)
            self.in_flight.append(self.member.runner.submit(batch))
            while len(self.in_flight) > self.member.runner.max_in_flight:
                self.collect()
        while final and self.in_flight:
            self.collect()

    def collect(self) -> None:
        logits = self.in_flight.popleft()()                                   # (B, C_m)
        scores = model_lib.checked_scores(logits, self.member.model.activation, self.member.name)
        self.scored.append(gate_by_nocall(scores, self.member.model.labels) if self.nocall_gate else scores)
        self.n_scored += len(scores)
        while self.files and self.n_scored >= self.files[0][1]:
            key, n_windows, weights = self.files.popleft()
            scores = np.concatenate(self.scored)                               # (n_scored, C_m)
            self.rows[key] = weights @ scores[:n_windows]                      # (n_rows, C_m)
            self.scored, self.n_scored = [scores[n_windows:]], self.n_scored - n_windows


def gate_by_nocall(scores: np.ndarray, labels: list[str]) -> np.ndarray:
    """(W, C) scores -> every species times 1 - p(nocall); unchanged for a model without nocall."""
    if NOCALL not in labels:
        return scores
    nocall = labels.index(NOCALL)
    gated = scores * (1.0 - scores[:, nocall:nocall + 1])
    gated[:, nocall] = scores[:, nocall]
    return gated


def combine(per_member: list[np.ndarray], members: list[Member], n_columns: int, how: str,
            power: float) -> np.ndarray:
    """Members' row scores (R, C_m) -> (R, n_columns), averaged over the members knowing each species."""
    n_rows = per_member[0].shape[0]
    total = np.zeros((n_rows, n_columns), dtype=np.float64)
    count = np.zeros(n_columns, dtype=np.float64)
    exponent = power if how == "power" else 1.0
    for scores, member in zip(per_member, members):
        known = member.column_index >= 0
        total[:, member.column_index[known]] += scores[:, known].astype(np.float64) ** exponent
        count[member.column_index[known]] += 1
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return (mean ** (1.0 / exponent)).astype(np.float32)


def smooth_rows(scores: np.ndarray, weights: list[float]) -> np.ndarray:
    """Weighted mean over neighbouring rows (R, C); at the file's edges the weights are renormalised."""
    if len(weights) % 2 != 1:
        raise ValueError(f"--smooth needs an odd number of weights, got {weights}")
    half = len(weights) // 2
    kernel = np.asarray(weights, dtype=np.float64)
    total = np.zeros(scores.shape, dtype=np.float64)
    norm = np.zeros((scores.shape[0], 1), dtype=np.float64)
    for offset, weight in zip(range(-half, half + 1), kernel):
        source = np.arange(scores.shape[0]) + offset
        valid = (source >= 0) & (source < scores.shape[0])
        total[valid] += weight * scores[source[valid]]
        norm[valid] += weight
    return (total / norm).astype(np.float32)


def apply_file_prior(scores: np.ndarray, weight: float) -> np.ndarray:
    return ((1 - weight) * scores + weight * scores.max(axis=0, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- files

def list_audio(folder, recursive: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(e[1:] for e in AUDIO_EXTENSIONS)} files in {folder}")
    return files


class DecodedFiles:
    """Decode each file once, to every sample rate the members need (in decoding threads)."""

    def __init__(self, files: list[Path], rates: list[int]):
        self.files, self.rates = files, sorted(set(rates))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            audio, source_rate = sf.read(path, dtype="float32", always_2d=True)
            if len(audio) == 0:
                raise ValueError("no audio frames")
            waveforms = {rate: torch.from_numpy(data.to_mono_resampled(audio, source_rate, rate))
                         for rate in self.rates}
            return {"path": path, "waveforms": waveforms, "error": None,
                    "seconds": len(audio) / source_rate}
        except Exception as error:  # reported in the summary; the submission is still written
            seconds = header_seconds(path)
            return {"path": path, "waveforms": None, "seconds": seconds,
                    "error": f"{type(error).__name__}: {error}".replace("\n", " ")}


def header_seconds(path) -> float | None:
    """The file's length from its header (the same check training runs), or None if unreadable."""
    header = data.check_audio_files([path])[0][0]
    return header[0] / header[1] if header is not None else None


def file_scores(per_member: list[np.ndarray], members: list[Member], n_columns: int, args) -> np.ndarray:
    """Each member's (n_rows, C_m) row scores of one file -> its (n_rows, n_columns) output rows."""
    scores = combine(per_member, members, n_columns, args.combine, args.power)
    if args.smooth:
        scores = smooth_rows(scores, [float(w) for w in args.smooth.split(",")])
    if args.file_prior:
        scores = apply_file_prior(scores, args.file_prior)
    return scores


# ----------------------------------------------------------------------------- labels and scoring

def read_labels(path, columns: list[str], audio_dir=None) -> pd.DataFrame:
    """A row_id x species 0/1 table, or labelled 5-s rows (file,start_s,end_s,labels or BirdCLEF
    2021's train_soundscape_labels.csv, see data.read_soundscape_labels) -> row_id-indexed 0/1 frame."""
    header = set(pd.read_csv(path, nrows=0).columns)
    rows_of_files = data.SOUNDSCAPE_FILE_COLUMNS <= header or data.SOUNDSCAPE_2021_COLUMNS <= header
    if "row_id" in header and not rows_of_files:
        return pd.read_csv(path).set_index("row_id").reindex(columns=columns, fill_value=0).astype(np.int8)
    table, _ = data.read_soundscape_labels(path, audio_dir)
    row_index = [f"{Path(f).stem}_{int(round(end))}" for f, end in zip(table["file"], table["end_s"])]
    targets = pd.DataFrame(0, index=row_index, columns=columns, dtype=np.int8)
    unknown = set()
    for row_id, labels in zip(row_index, table["labels"]):
        for code in str(labels).split():
            if code in targets.columns:
                targets.loc[row_id, code] = 1
            elif code != NOCALL:
                unknown.add(code)
    if unknown:
        log.warning("labels of %d species no model predicts are ignored: %s", len(unknown),
                    " ".join(sorted(unknown)[:10]))
    return targets


def score_submission(submission: pd.DataFrame, labels_path, audio_dir=None) -> dict:
    columns = [c for c in submission.columns if c != "row_id"]
    targets = read_labels(labels_path, columns, audio_dir)
    predictions = submission.set_index("row_id")
    common = [row for row in targets.index if row in predictions.index]
    if not common:
        raise ValueError(f"no row of {labels_path} matches a predicted row id")
    results = metrics.classification_metrics(targets.loc[common].to_numpy(),
                                             predictions.loc[common, columns].to_numpy())
    results["rows"] = len(common)
    return results


# ----------------------------------------------------------------------------- output

def write_output(submission: pd.DataFrame, files_rows: list[tuple[Path, int]], args, members) -> None:
    out = Path(args.out)
    if args.format == "kaggle":
        out.parent.mkdir(parents=True, exist_ok=True)
        submission.to_csv(out, index=False)
        return
    starts = np.concatenate([np.arange(n) * ROW_SECONDS for _, n in files_rows])
    files = np.concatenate([[path.name] * n for path, n in files_rows])
    if args.format == "csv":
        table = submission.drop(columns="row_id")
        table.insert(0, "end_s", starts + ROW_SECONDS)
        table.insert(0, "start_s", starts)
        table.insert(0, "file", files)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        return
    write_raven_tables(submission, files, starts, out, args.min_conf,
                       min(m.model.config["fmin"] for m in members), max(m.model.config["fmax"] for m in members))


RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)",
                 "Low Freq (Hz)", "High Freq (Hz)", "Species Code", "Confidence"]


def write_raven_tables(submission, files, starts, out_dir: Path, min_conf: float, low_hz: float, high_hz: float):
    """One tab-separated Raven selection table per audio file: a selection per row and species >= min_conf."""
    out_dir.mkdir(parents=True, exist_ok=True)
    species = [c for c in submission.columns if c != "row_id"]
    scores = submission[species].to_numpy()
    for name in dict.fromkeys(files):
        selections = []
        for row in np.flatnonzero(files == name):
            for column in np.flatnonzero(scores[row] >= min_conf):
                selections.append([len(selections) + 1, "Spectrogram 1", 1, f"{starts[row]:.3f}",
                                   f"{starts[row] + ROW_SECONDS:.3f}", f"{low_hz:.1f}", f"{high_hz:.1f}",
                                   species[column], f"{scores[row, column]:.4f}"])
        table = pd.DataFrame(selections, columns=RAVEN_COLUMNS)
        table.to_csv(out_dir / f"{Path(name).stem}.selections.txt", sep="\t", index=False)


# ----------------------------------------------------------------------------- main

def decoded_ahead(files: DecodedFiles, threads: int):
    """Decoded files in order, `threads` files decoded ahead of the model.

    Threads, not processes: libsndfile and torch release the GIL while they work, and
    a thread hands over a 10-minute file's waveform (77 MB) without copying it
    through shared memory. At most threads + 1 decoded files wait in memory.
    """
    if threads <= 0:
        yield from (files[index] for index in range(len(files)))
        return
    # one torch thread each for resampling: the engine keeps the other cores
    with ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        pending = deque()
        for index in range(len(files)):
            pending.append(pool.submit(files.__getitem__, index))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def score_all(files: list[Path], members: list[Member], columns: list[str], args):
    """Stream every file through the ensemble -> ({path: (n_rows, n_columns)}, problems, audio seconds)."""
    loader = decoded_ahead(DecodedFiles(files, [m.sample_rate for m in members]), args.workers)
    streams = [MemberStream(member, args.batch_size, args.hop, args.nocall_gate) for member in members]
    reference_rate = members[0].sample_rate
    results, problems, audio_seconds, waiting = {}, [], 0.0, []

    def finish_ready_files():
        for path in [p for p in waiting if all(p in stream.rows for stream in streams)]:
            waiting.remove(path)
            results[path] = file_scores([stream.rows.pop(path) for stream in streams], members, len(columns), args)

    for decoded in loader:
        path = decoded["path"]
        if decoded["error"] is None:
            audio_seconds += decoded["seconds"]
            n_rows = row_count(len(decoded["waveforms"][reference_rate]), reference_rate)
            waiting.append(path)
            for stream in streams:
                stream.add(path, decoded["waveforms"][stream.member.sample_rate].numpy(), n_rows)
            finish_ready_files()
        elif decoded["seconds"] is None:
            problems.append(f"{path}: {decoded['error']}; no rows (length unknown)")
            log.warning("%s: %s; no rows written", path, decoded["error"])
        else:
            n_rows = row_count(int(round(decoded["seconds"] * 1000)), 1000)
            results[path] = np.zeros((n_rows, len(columns)), dtype=np.float32)
            problems.append(f"{path}: {decoded['error']}; {n_rows} row(s) of zeros")
            log.warning("%s: %s; writing %d row(s) of zeros", path, decoded["error"], n_rows)
    for stream in streams:
        stream.run(final=True)
    finish_ready_files()
    return results, problems, audio_seconds


def primary_labels_of(files: list[Path], audio_dir: Path, metadata: str | None) -> list[str]:
    """Each training file's primary label: from train_metadata.csv, else its folder name."""
    lookup = {}
    metadata_path = Path(metadata) if metadata else audio_dir.parent / "train_metadata.csv"
    if metadata_path.is_file():
        table = pd.read_csv(metadata_path, usecols=["primary_label", "filename"], dtype=str)
        lookup = dict(zip(table["filename"], table["primary_label"]))
    return [lookup.get(path.relative_to(audio_dir).as_posix(), path.parent.name) for path in files]


def write_detections(results: dict, files: list[Path], columns: list[str], args) -> pd.DataFrame:
    """Per file and 5-s window: the top-k species with scores and the score of the file's primary label."""
    audio_dir = Path(args.audio_dir)
    index = {column: i for i, column in enumerate(columns)}
    rows = []
    for path, primary in zip(files, primary_labels_of(files, audio_dir, args.metadata)):
        if path not in results:
            continue
        scores = results[path]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :args.top_k]
        for window, window_scores in enumerate(scores):
            row = {"filename": path.relative_to(audio_dir).as_posix(), "start_s": window * ROW_SECONDS,
                   "end_s": (window + 1) * ROW_SECONDS, "primary_label": primary,
                   "primary_score": float(window_scores[index[primary]]) if primary in index else float("nan")}
            for rank, column in enumerate(top[window], start=1):
                row[f"top{rank}_label"] = columns[column]
                row[f"top{rank}_score"] = float(window_scores[column])
            rows.append(row)
    table = pd.DataFrame(rows)
    Path(args.detections).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.detections, index=False)
    return table


def main(args) -> dict:
    """Score every file and write the output. Under torchrun each process scores every
    world_size-th file and rank 0 gathers the scores and writes one output."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.local_device(args.device)
    return distributed.run_in_group(device, lambda: run(args, device))


def run(args, device: torch.device) -> dict:
    members = load_members(args.ckpts, args.average_weights, args.ema)
    bf16 = use_bf16(args.precision, device)
    for member in members:
        member.runner = make_runner(member.model, args, device, bf16)
    columns = output_columns(members, args.sample_submission)
    align(members, columns)
    if args.nocall_gate and not any(NOCALL in member.model.labels for member in members):
        log.warning("--nocall-gate has no effect: no checkpoint has a '%s' class (train with --nocall)", NOCALL)
    detections_mode = args.detections is not None
    if detections_mode:
        if not args.audio_dir:
            raise ValueError("--detections needs --audio-dir (the train_audio folder)")
        files = list_audio(args.audio_dir, recursive=True)
    else:
        files = list_audio(args.soundscapes)
    rank, world_size = distributed.rank_and_world_size()
    log.info("%d file(s), %d model(s), %d species, backend %s, %s%s", len(files), len(members), len(columns),
             args.backend, "bf16" if bf16 else "fp32", f", {world_size} processes" if world_size > 1 else "")

    started = time.perf_counter()
    shares = distributed.gather_objects(score_all(files[rank::world_size], members, columns, args))
    if rank != 0:
        return {"rank": rank}
    results = {path: scores for share_results, _, _ in shares for path, scores in share_results.items()}
    problems = [line for _, share_problems, _ in shares for line in share_problems]
    audio_seconds = sum(seconds for _, _, seconds in shares)
    wall = time.perf_counter() - started
    speed = audio_seconds / wall if wall > 0 else float("inf")
    summary = {"audio_seconds": audio_seconds, "wall_seconds": wall, "realtime_factor": speed,
               "problems": problems}
    if detections_mode:
        summary["detections"] = write_detections(results, files, columns, args)
        log.info("wrote %s: %d windows from %d file(s)", args.detections, len(summary["detections"]), len(results))
    else:
        files_rows = [(path, len(results[path])) for path in files if path in results]
        blocks = [results[path] for path, _ in files_rows]
        submission = pd.DataFrame(np.concatenate(blocks) if blocks else np.zeros((0, len(columns))),
                                  columns=columns)
        submission.insert(0, "row_id", [row_id for path, n in files_rows for row_id in row_ids(path.stem, n)])
        write_output(submission, files_rows, args, members)
        log.info("wrote %s: %d rows from %d file(s)", args.out, len(submission), len(files_rows))
        summary.update(rows=len(submission), submission=submission)
    log.info("audio %.1f min, wall %.1f s, %.0fx real time; BirdCLEF 2023 test set (200 x 10 min) "
             "projected at %.1f min", audio_seconds / 60, wall, speed, 200 * 600 / speed / 60 if speed else float("nan"))
    for line in problems:
        log.warning("problem: %s", line)
    if args.labels and not detections_mode:
        scores = score_submission(summary["submission"], args.labels, args.soundscapes)
        log.info("scored %d labelled rows: cmAP5 %.4f  cmAP3 %.4f  macro AP %.4f  LRAP %.4f",
                 scores["rows"], scores["cmap5"], scores["cmap3"], scores["macro_ap"], scores["lrap"])
        summary["scores"] = scores
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(get_args_parser().parse_args())
    except (model_lib.CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as error:
        log.error("%s", error)
        sys.exit(1)
