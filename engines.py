"""Engines: how inference gets its speed on a CPU, behind one small interface.

    bf16 = choose_bf16(models, settings, device)        # --precision: auto times fp32 and bf16 here
    runner = make_runner(model, settings, device, bf16)  # waveforms (B, samples) -> logits (B, C)
    stream = WindowStream(runner, model, batch_size)     # windows of many files -> each file's scores
    for item in in_threads(decode, files, threads): ...  # decoding ahead of the model, in order

A runner is plain PyTorch (`TorchRunner`) or the model's classifier exported to
ONNX Runtime or OpenVINO (`ExportedRunner`, optional installs, checked against
PyTorch on the first batch). With --streams, several batches run at once, each on
its share of the threads. `WindowStream` queues windows across files, so a batch
may end one file and start the next and the engine never drains at a file's end.
infer.py reads as its job -- decode, windows, model, rows, write -- on top of this.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import distributed
import model as model_lib
import precision
import soundscapes

log = logging.getLogger("birdclef")


@dataclass(frozen=True)
class EngineSettings:
    """How the windows get through the model (infer.py's speed flags; these are their defaults). They
    change the speed, not the scores, except backend, precision and device: a resumed job checks those."""
    batch_size: int = 16          # windows per forward pass
    channels_last: bool = True    # torch backend on the CPU
    threads: int = 0              # CPU threads in all, shared among the streams; 0 = torch's default
    workers: int = 1              # threads decoding audio ahead of the model
    streams: int = 2              # CPU: batches run at once
    precision: str = "auto"       # auto, measure, fp32 or bf16 (choose_bf16)
    backend: str = "torch"        # torch, onnxruntime or openvino
    parity_tolerance: float = 0.02  # largest score difference of an exported engine from torch fp32
    device: str = "cpu"


PRECISIONS = ("auto", "measure", "fp32", "bf16")


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

    def close(self) -> None:
        """Let the stream threads go (a runner made only to time it is dropped after)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    @property
    def max_in_flight(self) -> int:
        """Batches started and not yet collected. Results are collected in order, so with
        only one batch per stream a stream slowed by a decoding thread would hold up the
        others; 4 per stream let them run on."""
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
            # keep buffers of its own
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
            self.session = onnxruntime_session(model, example, threads)
        elif backend == "openvino":
            self.compiled = openvino_model(model, example, bf16, threads, self.streams)
            self.requests = threading.local()   # an infer request serves one batch at a time: one per thread
        else:
            raise ValueError(f"unknown backend {backend!r}")
        self.model.eval()  # exporters restore the wrapper's train/eval mode onto the model; keep eval

    def classify(self, image: np.ndarray) -> np.ndarray:
        """Spectrogram images (B, 1, n_mels, T) -> logits (B, C) in the exported engine; thread-safe."""
        if self.backend == "onnxruntime":
            return self.session.run(None, {"image": image})[0]
        if not hasattr(self.requests, "request"):
            self.requests.request = self.compiled.create_infer_request()
        return self.requests.request.infer([image])[0]

    @torch.inference_mode()
    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        image = self.model.frontend(waveforms).numpy()                         # (B, 1, n_mels, T)
        logits = torch.from_numpy(np.asarray(self.classify(image), dtype=np.float32))
        if not self.checked:
            self.check_against_torch(waveforms[:8], logits[:8])
        return logits

    def check_against_torch(self, waveforms, logits):
        check_parity(self.model, waveforms, logits, self.backend, self.tolerance)
        self.checked = True


def onnxruntime_session(model, example: torch.Tensor, threads: int):
    """The classifier exported to ONNX (dynamic batch) in an ONNX Runtime CPU session."""
    ort = import_optional("onnxruntime")
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "classifier.onnx"
        torch.onnx.export(_Classifier(model).eval(), (example,), str(path), input_names=["image"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # the arena would keep every batch's peak allocation
        if threads:
            options.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_model(model, example: torch.Tensor, bf16: bool, threads: int, streams: int):
    """The classifier converted to OpenVINO and compiled for the CPU, one executor stream per --streams."""
    ov = import_optional("openvino")
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if streams > 1:  # one executor stream per concurrent batch
        config.update({"NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads * streams})
    elif threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(ov.convert_model(_Classifier(model), example_input=example), "CPU", config)


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


def make_runner(model, settings: EngineSettings, device: torch.device, bf16: bool) -> Runner:
    """The runner `settings.backend` names for `model` on `device` (settings.device made a torch.device)."""
    if settings.streams < 1:
        raise ValueError(f"--streams must be at least 1, got {settings.streams}")
    if settings.backend == "torch":
        return TorchRunner(model, device, bf16, settings.channels_last, settings.streams, settings.threads)
    if device.type != "cpu":
        raise ValueError(f"--backend {settings.backend} runs on the CPU; use --backend torch with --device {device}")
    return ExportedRunner(model, settings.backend, bf16, settings.threads, settings.parity_tolerance, settings.streams)


# ----------------------------------------------------------------------------- --precision

def choose_bf16(models: list, settings: EngineSettings, device: torch.device) -> bool:
    """--precision -> whether `models` run in bf16 (autocast, or OpenVINO's precision hint).

    auto on the CPU: the faster of fp32 and bf16, timed on these models as the job will run them
    (precision.py), cached per CPU model, backend, torch version, models, batch size, streams and
    threads; measure: the same, timed again. On CUDA, auto keeps the GPU's capability (no timing).
    ONNX Runtime has no bf16 CPU path: auto is fp32 there. A forced bf16 on a CPU without native
    bf16 warns once, with its slowdown (cached, else timed on a small probe batch each)."""
    flag = settings.precision
    if flag not in PRECISIONS:
        raise ValueError(f"--precision {flag!r}: one of {', '.join(PRECISIONS)}")
    if flag == "fp32":
        return False
    if device.type != "cpu":                     # CUDA: the GPU's capability decides; nothing is timed there
        return flag == "bf16" or torch.cuda.is_bf16_supported()
    if flag == "bf16":
        warn_if_emulated(models, settings, device)
        return True
    if settings.backend == "onnxruntime":        # no bf16 path to time
        return False
    measurement = timed(models, settings, device, precision_key(models, settings), remeasure=flag == "measure")
    precision.report(measurement, f"--precision {flag} ({settings.backend})")
    # under torchrun each rank timed its own: bf16 only where all chose it, so that every rank's rows are alike
    return not distributed.any_rank(measurement.choice != "bf16")


def warn_if_emulated(models: list, settings: EngineSettings, device: torch.device) -> None:
    """A forced bf16 on a CPU without native bf16: one warning naming the slowdown, cached or timed on a
    small probe batch each (ONNX Runtime ignores bf16: nothing to warn of)."""
    if settings.backend == "onnxruntime" or precision.cpu_info().native_bf16 is not False:
        return
    try:
        measurement = timed(models, settings, device, precision_key(models, settings), remeasure=False, rounds=0)
    except Exception as error:                   # a warning's timing must never stop the job
        measurement = precision.Measurement(error=f"{type(error).__name__}: {error}")
    precision.warn_emulated("--precision bf16", measurement)


def timed(models: list, settings: EngineSettings, device: torch.device, key: str, remeasure: bool,
          rounds: int = precision.ROUNDS) -> precision.Measurement:
    """precision.decide for these models, with the runners made for the timing closed after."""
    runners = []
    try:
        return precision.decide(key, lambda: precision_timers(models, settings, device, runners), remeasure, rounds)
    finally:
        for runner in runners:
            runner.close()


def precision_timers(models: list, settings: EngineSettings, device: torch.device, runners: list) -> dict:
    """{"fp32": timer, "bf16": timer} for precision.measure, through runners made as the job makes them:
    timer(probe=True) scores a PROBE_WINDOWS batch per model (the first call: it also pays oneDNN's set-up,
    an export's compilation is not timed), timer() a round of noise batches keeping every stream busy
    -> seconds per batch."""
    generator = torch.Generator().manual_seed(0)
    batches = [0.05 * torch.randn(settings.batch_size, model.window_samples, generator=generator) for model in models]

    def timer(bf16: bool):
        made = []

        def one_round(probe: bool = False) -> float:
            if not made:                         # made outside the clock
                made.extend(make_runner(model, settings, device, bf16) for model in models)
                runners.extend(made)
            count = 1 if probe else max(runner.streams for runner in made)
            started = time.perf_counter()
            for runner, batch in zip(made, batches):
                for logits in runner.map([batch[:precision.PROBE_WINDOWS] if probe else batch] * count):
                    if not torch.isfinite(logits).all():
                        raise FloatingPointError("non-finite scores")
            return (time.perf_counter() - started) / count
        return one_round
    return {"fp32": timer(False), "bf16": timer(True)}


def precision_key(models: list, settings: EngineSettings) -> str:
    """What the speeds of fp32 and bf16 depend on, besides the CPU (precision.cache_key adds it)."""
    streams, threads = split_threads(settings.threads, settings.streams)
    backend = settings.backend
    if backend != "torch":
        backend += " " + package_version(backend)
    else:
        backend += " channels-last" if settings.channels_last else " plain"
    return precision.cache_key("infer", backend, f"torch {torch.__version__}",
                               *(precision.model_part(model.config) for model in models),
                               f"batch {settings.batch_size}", f"{streams} streams x {threads} threads")


def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


class WindowStream:
    """One model's windows on their way through its runner -> each file's window scores.

    Windows queue up across files and go in whole batches, so a batch may end one file
    and start the next: one partial batch per run instead of one per file, and with
    --streams the engine never drains at a file's end. A file's scores are in `finished`
    once all its windows are scored.
    """

    def __init__(self, runner, model: model_lib.BirdCallModel, batch_size: int, name: str):
        self.runner, self.model, self.batch_size, self.name = runner, model, batch_size, name
        self.windows = deque()     # (waveform, first sample) of each window not yet in a batch
        self.files = deque()       # (key, number of its windows), oldest first
        self.in_flight = deque()   # batches in the runner, oldest first: callables returning logits
        self.scored, self.n_scored = [], 0   # activated (b, C) scores not yet handed to a file
        self.finished = {}         # key -> (W, C) activated scores of each of its windows

    def add(self, key, waveform: np.ndarray, offsets: np.ndarray) -> None:
        """A file's windows, each starting at a sample offset of `waveform` (soundscapes.window_offsets)."""
        self.windows.extend((waveform, int(offset)) for offset in offsets)
        self.files.append((key, len(offsets)))
        self.start_batches()

    def start_batches(self, final: bool = False) -> None:
        """Start every whole batch (and with final, the rest); collect those that must finish first."""
        while len(self.windows) >= self.batch_size or (final and self.windows):
            sources = [self.windows.popleft() for _ in range(min(self.batch_size, len(self.windows)))]
            batch = torch.from_numpy(soundscapes.fill_batch(sources, self.model.window_samples))  # (B, samples)
            self.in_flight.append(self.runner.submit(batch))
            while len(self.in_flight) > self.runner.max_in_flight:
                self.collect()
        while final and self.in_flight:
            self.collect()

    def collect(self) -> None:
        logits = self.in_flight.popleft()()                                   # (B, C)
        scores = model_lib.checked_scores(logits, self.model.activation, self.name)
        self.scored.append(scores)
        self.n_scored += len(scores)
        while self.files and self.n_scored >= self.files[0][1]:
            key, n_windows = self.files.popleft()
            scores = np.concatenate(self.scored)                               # (n_scored, C)
            self.finished[key] = scores[:n_windows]                           # (W, C)
            self.scored, self.n_scored = [scores[n_windows:]], self.n_scored - n_windows


def in_threads(function, items: list, threads: int):
    """function(item) for each item, in order, computed `threads` items ahead of the caller.

    Threads, not processes: libsndfile and torch release the GIL while they work, and
    a thread hands over a long file's waveform without copying it through shared
    memory. At most threads + 1 results wait in memory.
    """
    if threads <= 0:
        yield from (function(item) for item in items)
        return
    # one torch thread each (for resampling): the engine keeps the other cores
    with ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
