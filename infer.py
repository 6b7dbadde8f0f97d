"""Apply one or more checkpoints to long recordings and write a BirdCLEF submission.

    python infer.py --ckpts a.pt b.pt --soundscapes DIR --out submission.csv
    python infer.py --ckpts a.pt --soundscapes DIR --labels labels.csv      # also score it
    torchrun --nproc_per_node 4 infer.py --ckpts a.pt --device cuda ...     # files split across processes

Each file is decoded once, resampled to each checkpoint's rate and cut into
windows on the 5-s row grid (soundscapes.py); each checkpoint scores them with its
own activation (from the checkpoint); a row's score is the overlap-weighted mean
of its windows; members are aligned by species name and combined; rows named
`<file stem>_<end second>`, as Kaggle expects, are written. How the windows get
through the model fast (batches across files, threads, exported engines) is
engines.py's job.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import audio
import data
import distributed
import engines
import model as model_lib
import outputs
import progress
import runfolder
import soundscapes

log = logging.getLogger("birdclef")

NOCALL = soundscapes.NOCALL


# ----------------------------------------------------------------------------- settings
#
# infer.py's flags by concern. The defaults below are the only ones: the parser and
# Predictor's keyword options both take them from here.

@dataclass(frozen=True)
class Job:
    """What is scored and what is written: the command line's inputs and outputs (--ckpts ... --log-every)."""
    ckpts: tuple[str, ...]
    soundscapes: str = str(data.DEMO_DIR / "test_soundscapes")
    file_list: str | None = None
    out: str | None = None
    format: str = "kaggle"
    min_conf: float | None = None
    combined: bool = False
    top_k: int | None = None
    skip_existing: bool = False
    labels: str | None = None
    audio_dir: str | None = None
    detections: str | None = None
    metadata: str | None = None
    log_every: float = progress.LOG_EVERY_SECONDS

    def __post_init__(self):
        object.__setattr__(self, "ckpts", tuple(self.ckpts))   # argparse gives a list; frozen means frozen

    @property
    def detections_mode(self) -> bool:
        """Per-window detections of training audio instead of a submission."""
        return self.detections is not None


@dataclass(frozen=True)
class Scoring:
    """How the checkpoints' window scores become a file's rows. A stopped job is continued
    (--skip-existing) only with the same (job_settings); of sample_submission, the columns it gives."""
    ema: bool = False
    average_weights: bool = False
    sample_submission: str | None = None
    combine: str = "mean"
    power: float = 2.0
    nocall_gate: bool = False
    hop: float = soundscapes.ROW_SECONDS
    smooth: str | None = None
    file_prior: float = 0.0

    def check(self) -> None:
        """Settings that would put non-finite numbers into a submission are refused before any work."""
        if self.combine == "power" and not self.power > 0:
            raise ValueError(f"--power {self.power}: the exponent of --combine power must be positive")
        if self.smooth:
            try:
                weights = [float(weight) for weight in self.smooth.split(",")]
            except ValueError:
                raise ValueError(f"--smooth {self.smooth!r}: expected comma-separated numbers such as "
                                 f"0.1,0.8,0.1") from None
            if (len(weights) % 2 != 1 or min(weights) < 0 or not max(weights) > 0
                    or not all(map(math.isfinite, weights))):
                raise ValueError(f"--smooth {self.smooth}: needs an odd number of non-negative weights with a "
                                 f"positive sum (each row is their weighted mean)")
        if not 0 <= self.file_prior <= 1:
            raise ValueError(f"--file-prior {self.file_prior}: a weight between 0 and 1")
        if not 0 < self.hop <= soundscapes.ROW_SECONDS:     # a longer hop would leave rows without a window
            raise ValueError(f"--hop {self.hop}: seconds between windows, above 0 and at most "
                             f"{soundscapes.ROW_SECONDS:g}")


SETTINGS = (Job, Scoring, engines.EngineSettings)
OPTIONS = frozenset(item.name for kind in SETTINGS for item in dataclasses.fields(kind))   # = the flags' dests


def settings_of(kind, options: dict):
    """The settings dataclass `kind` from the options named as its fields (absent ones take its defaults)."""
    return kind(**{item.name: options[item.name] for item in dataclasses.fields(kind) if item.name in options})


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Apply checkpoints to soundscapes; write a submission.",
                                     add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_job_flags(parser)
    add_scoring_flags(parser.add_argument_group("how the classifier is applied"))
    add_engine_flags(parser.add_argument_group("speed"))
    return parser


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument("--ckpts", nargs="+", required=True,
                       help="checkpoints written by train.py (a run folder stands for its best.pt)")
    group.add_argument("--soundscapes", default=Job.soundscapes,
                       help="folder of ogg/mp3/flac/wav files to score, searched recursively")
    group.add_argument("--file-list", default=Job.file_list, help="text file of audio paths to score, one a line "
                       "(instead of --soundscapes)")
    group.add_argument("--out", default=Job.out,
                       help="submission.csv (kaggle, csv) or a folder of selection tables (raven: "
                            "raven_selections/ by default)")
    group.add_argument("--format", choices=("kaggle", "csv", "raven"), default=Job.format,
                       help="kaggle: row_id + species columns; csv: file, start_s, end_s + species "
                            "columns; raven: one Raven selection table per file")
    group.add_argument("--min-conf", type=float, default=Job.min_conf,
                       help="raven: smallest score written (default 0.25 for sigmoid checkpoints, as BirdNET; "
                            "0.1 for softmax ones, whose scores share 1 among the species)")
    group.add_argument("--combined", action="store_true", default=Job.combined,
                       help="raven: also one table of every file's selections")
    group.add_argument("--top-k", type=int, default=Job.top_k,
                       help="keep each row's k best species (the others 0 in a submission); detections list "
                            "k per window (default: all species, and 3 for --detections)")
    group.add_argument("--skip-existing", action="store_true", default=Job.skip_existing,
                       help="continue a job that was stopped: files whose rows <out>.parts/ already holds "
                            "are not scored again (refused if they were made with other settings)")
    group.add_argument("--sample-submission", default=Scoring.sample_submission,
                       help="take exactly these columns in this order (species no model knows get 0)")
    group.add_argument("--labels", default=Job.labels,
                       help="score the predictions against a row_id x species 0/1 table or a "
                            "file,start_s,end_s,labels table")

    group = parser.add_argument_group("detections mode (score training audio)")
    group.add_argument("--audio-dir", default=Job.audio_dir, help="train_audio folder, searched recursively")
    group.add_argument("--detections", default=Job.detections,
                       help="write per-window detections here instead of a submission")
    group.add_argument("--metadata", default=Job.metadata,
                       help="train_metadata.csv: each file's primary label (default: beside --audio-dir), and the "
                            "common names in Raven tables")


def add_scoring_flags(group) -> None:
    group.add_argument("--combine", choices=("mean", "power"), default=Scoring.combine,
                       help="how checkpoints' scores are combined")
    group.add_argument("--power", type=float, default=Scoring.power, help="exponent of --combine power")
    group.add_argument("--ema", action="store_true", default=Scoring.ema,
                       help="use the checkpoints' exponential-moving-average weights (trained with --ema)")
    group.add_argument("--average-weights", action="store_true", default=Scoring.average_weights,
                       help="average the checkpoints' weights into one model (same run, same config)")
    group.add_argument("--nocall-gate", action="store_true", default=Scoring.nocall_gate,
                       help="checkpoints trained with --nocall: scale every species by 1 - p(nocall)")
    group.add_argument("--hop", type=float, default=Scoring.hop,
                       help="seconds between window starts; below 5, overlapping windows are "
                            "averaged into the rows, weighted by overlap")
    group.add_argument("--smooth", default=Scoring.smooth,
                       help="odd number of comma-separated weights over neighbouring rows, e.g. 0.1,0.8,0.1")
    group.add_argument("--file-prior", type=float, default=Scoring.file_prior,
                       help="mix each row with the file's per-species maximum: (1-w)*row + w*max")


def add_engine_flags(group) -> None:
    engine = engines.EngineSettings
    group.add_argument("--batch-size", type=int, default=engine.batch_size,
                       help="windows per forward pass (raise it on a GPU)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=engine.channels_last,
                       help="torch backend on the CPU: channels-last convolutions (faster with oneDNN); "
                            "--no-channels-last is the plain eager path, for comparison")
    group.add_argument("--threads", type=int, default=engine.threads,
                       help="CPU threads in all, shared among --streams (0 = torch's default: one per core)")
    group.add_argument("--workers", type=int, default=engine.workers, help="threads decoding audio ahead of the model")
    group.add_argument("--streams", type=int, default=engine.streams,
                       help="CPU: batches run at once, each on --threads / streams threads (at most one "
                            "stream per thread)")
    group.add_argument("--precision", choices=engines.PRECISIONS, default=engine.precision,
                       help="auto: on the CPU, the faster of fp32 and bf16 (torch autocast, OpenVINO), timed "
                            "on these models once per CPU model, backend and batch setting and cached in "
                            f"~/.cache/birdclef_pipeline/precision.json (${engines.precision.CACHE_ENV}: another "
                            "file); measure: time again; on CUDA, bf16 where the GPU supports it. bf16 on a "
                            "CPU without native bf16 (avx512_bf16, amx_bf16) is emulated: it warns with the "
                            "slowdown")
    group.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default=engine.backend,
                       help="CPU engine for the classifier; onnxruntime and openvino are optional "
                            "installs, checked against torch on the first batch")
    group.add_argument("--parity-tolerance", type=float, default=engine.parity_tolerance,
                       help="largest score difference from torch fp32 accepted on the first batch")
    group.add_argument("--device", default=engine.device, help="cpu, cuda or cuda:N")
    group.add_argument("--log-every", type=float, default=Job.log_every,
                       help="without a terminal (nohup, pipes, Kaggle's saved runs): a progress line every this "
                            "many seconds instead of a bar")


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


def checkpoint_path(path) -> Path:
    """A checkpoint file, or a run folder standing for its best.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise FileNotFoundError(f"{path} is a folder without best.pt: pass one of its checkpoints")
        return path / "best.pt"
    return path


def load_members(paths, average_weights: bool, ema: bool = False) -> list[Member]:
    paths = [checkpoint_path(path) for path in paths]
    models = [model_lib.load_model(path, ema=ema) for path in paths]
    for path, model in zip(paths, models):
        repeated = sorted({label for label in model.labels if list(model.labels).count(label) > 1})
        if repeated:
            raise ValueError(f"{path} lists label(s) {repeated} more than once: its columns would be ambiguous")
    if average_weights and len(models) > 1:
        reference = models[0].config
        for path, other in zip(paths[1:], models[1:]):
            differing = [key for key in sorted(set(reference) | set(other.config))
                         if reference.get(key) != other.config.get(key)]
            if differing:
                key = differing[0]
                raise ValueError(f"--average-weights needs checkpoints of one configuration; {path} has {key} "
                                 f"{other.config.get(key)!r}, {paths[0]} has {reference.get(key)!r}"
                                 + (f" (and {len(differing) - 1} more setting(s) differ)" if len(differing) > 1 else ""))
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
        columns = data.submission_columns(sample_submission)
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


# ----------------------------------------------------------------------------- decode

def list_audio(folder, recursive: bool = True) -> list[Path]:
    """The audio files to score (the folder searched recursively); an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = audio.audio_files(folder, recursive)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(e[1:] for e in audio.AUDIO_EXTENSIONS)} files in {folder}")
    return files


def decode(item, rates: list[int]) -> dict:
    """A file, or (name, samples (frames,) or (frames, channels), sample rate) -> path (or name), waveforms
    {rate: (samples,)} at every rate the members need, seconds, error (None, or why it failed; then
    seconds from the header if it can be read)."""
    if isinstance(item, tuple):
        name, samples, source_rate = item
        frames = np.asarray(samples, dtype=np.float32).reshape(len(samples), -1)        # (frames, channels)
        waveforms = {rate: torch.from_numpy(audio.to_mono_resampled(frames, source_rate, rate))
                     for rate in sorted(set(rates))}
        return {"path": name, "waveforms": waveforms, "error": None, "seconds": len(frames) / source_rate}
    try:
        samples, source_rate = audio.read_whole(item)
        if len(samples) == 0:
            raise ValueError("no audio frames")
        waveforms = {rate: torch.from_numpy(audio.to_mono_resampled(samples, source_rate, rate))
                     for rate in sorted(set(rates))}
        return {"path": item, "waveforms": waveforms, "error": None, "seconds": len(samples) / source_rate}
    except Exception as error:  # reported in the summary; the submission is still written
        return {"path": item, "waveforms": None, "seconds": header_seconds(item),
                "error": f"{type(error).__name__}: {error}".replace("\n", " ")}


def header_seconds(path) -> float | None:
    """The file's length from its header (the same check training runs), or None if unreadable."""
    header = audio.check_audio_files([path])[0][0]
    return header[0] / header[1] if header is not None else None


# ----------------------------------------------------------------------------- windows -> rows

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
    kernel = kernel / kernel.max()          # scale-free: 1e308,1e308,1e308 would overflow their sum to inf
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


def file_rows(per_member: list[np.ndarray], members: list[Member], n_columns: int, scoring: Scoring) -> np.ndarray:
    """Each member's (n_rows, C_m) row scores of one file -> its (n_rows, n_columns) output rows."""
    scores = combine(per_member, members, n_columns, scoring.combine, scoring.power)
    if scoring.smooth:
        scores = smooth_rows(scores, [float(w) for w in scoring.smooth.split(",")])
    if scoring.file_prior:
        scores = apply_file_prior(scores, scoring.file_prior)
    return scores


# ----------------------------------------------------------------------------- decode -> windows -> model -> rows

class Predictor:
    """Checkpoints ready to score audio exactly as the command line does.

        predictor = Predictor(["a.pt", "runs/b"], hop=2.5)          # any infer.py option, by its name
        table = predictor.predict(["x.ogg", "site/y.wav"])          # rows indexed by (file, start_s, end_s)
        table = predictor.predict([waveform], sample_rate=32000)    # arrays too, named array_0, array_1, ...
    """

    def __init__(self, ckpts, **options):
        """options: infer.py's flags by their dests, defaults as there; those of the job's inputs and
        outputs (`Job`: out, format, ...) are accepted and mean nothing here."""
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are infer.py's (python infer.py --help)")
        self.ckpts = tuple(map(str, ckpts))
        if not self.ckpts:
            raise ValueError("no checkpoints: --ckpts needs at least one")
        self.scoring, self.engine = settings_of(Scoring, options), settings_of(engines.EngineSettings, options)
        self.scoring.check()
        if self.engine.threads:
            torch.set_num_threads(self.engine.threads)
        self.device = distributed.local_device(self.engine.device)
        self.members = load_members(self.ckpts, self.scoring.average_weights, self.scoring.ema)
        self.bf16 = engines.choose_bf16([member.model for member in self.members], self.engine, self.device)
        for member in self.members:
            member.runner = engines.make_runner(member.model, self.engine, self.device, self.bf16)
        self.columns = output_columns(self.members, self.scoring.sample_submission)
        align(self.members, self.columns)
        if self.scoring.nocall_gate and not any(NOCALL in member.model.labels for member in self.members):
            log.warning("--nocall-gate has no effect: no checkpoint has a '%s' class (train with --nocall)", NOCALL)

    def scored(self, items):
        """Each file (or (name, samples, rate)) -> (path or name, rows (n_rows, n_columns) or None, problem
        or None, seconds of audio), as soon as every member has scored it; files in order."""
        members, engine, scoring = self.members, self.engine, self.scoring
        streams = [engines.WindowStream(member.runner, member.model, engine.batch_size, member.name)
                   for member in members]
        row_weights, seconds = {}, {}   # key -> each member's (n_rows, W) weights of its windows; its length (s)
        for decoded in engines.in_threads(functools.partial(decode, rates=[m.sample_rate for m in members]),
                                          items, engine.workers):
            key = decoded["path"]
            if decoded["error"] is None:
                rate = members[0].sample_rate
                n_rows = soundscapes.row_count(len(decoded["waveforms"][rate]), rate)
                row_weights[key], seconds[key] = [], decoded["seconds"]
                for member, stream in zip(members, streams):
                    starts, weights = soundscapes.window_plan(n_rows, member.window_seconds, scoring.hop)
                    row_weights[key].append(weights)
                    stream.add(key, decoded["waveforms"][member.sample_rate].numpy(),
                               soundscapes.window_offsets(starts, member.sample_rate))
            elif decoded["seconds"] is None:
                log.warning("%s: %s; no rows written", key, decoded["error"])
                yield key, None, f"{key}: {decoded['error']}; no rows (length unknown)", 0.0
            else:
                n_rows = soundscapes.row_count(int(round(decoded["seconds"] * 1000)), 1000)
                log.warning("%s: %s; writing %d row(s) of zeros", key, decoded["error"], n_rows)
                yield (key, np.zeros((n_rows, len(self.columns)), dtype=np.float32),
                       f"{key}: {decoded['error']}; {n_rows} row(s) of zeros", 0.0)
            for done, rows in finished_rows(streams, members, row_weights, len(self.columns), scoring).items():
                yield done, *finite_rows(done, rows), seconds.pop(done)
        for stream in streams:
            stream.start_batches(final=True)
        for done, rows in finished_rows(streams, members, row_weights, len(self.columns), scoring).items():
            yield done, *finite_rows(done, rows), seconds.pop(done)

    def predict(self, inputs, sample_rate: int | None = None) -> pd.DataFrame:
        """Files and/or arrays (with their `sample_rate`) -> a DataFrame indexed by (file, start_s, end_s)
        with one column per species: the rows infer.py writes, to the same numbers."""
        items = []
        for number, item in enumerate(inputs):
            if isinstance(item, (str, Path)):
                items.append(Path(item))
            elif sample_rate is None:
                raise ValueError("arrays need sample_rate=")
            else:
                items.append((f"array_{number}", audio.pcm_frames(item, f"array_{number}"), int(sample_rate)))
        keys = [item if isinstance(item, Path) else Path(item[0]) for item in items]
        outputs.check_unique_names(keys)
        results = {key: rows for key, rows, _, _ in self.scored(items) if rows is not None}
        table = outputs.row_table({Path(key): rows for key, rows in results.items()}, keys, self.columns, None)
        return table.drop(columns="row_id").set_index(["file", "start_s", "end_s"])


def finite_rows(key, rows: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A file's rows, or zeros with a problem line when any score is NaN or infinite: the last guard
    (NaN samples are zeroed when decoded, non-finite logits stop the job, --hop and --smooth are
    checked), so that non-finite numbers never reach a submission whatever changes upstream."""
    if np.isfinite(rows).all():
        return rows, None
    log.warning("%s: non-finite scores; writing rows of zeros", key)
    return np.zeros_like(rows), f"{key}: non-finite scores; {len(rows)} row(s) of zeros"


def finished_rows(streams, members: list[Member], row_weights: dict, n_columns: int, scoring: Scoring) -> dict:
    """The output rows of every file whose windows all members have scored (taken out of row_weights)."""
    done = [path for path in row_weights if all(path in stream.finished for stream in streams)]
    rows = {}
    for path in done:
        per_member = []
        for member, stream, weights in zip(members, streams, row_weights.pop(path)):
            scores = stream.finished.pop(path)                                  # (W, C_m)
            if scoring.nocall_gate:
                scores = gate_by_nocall(scores, member.model.labels)
            per_member.append(weights @ scores)                                 # (n_rows, C_m)
        rows[path] = file_rows(per_member, members, n_columns, scoring)
    return rows


# ----------------------------------------------------------------------------- main

def main(args) -> dict:
    """Score every file and write the output. Under torchrun each process scores every
    world_size-th file and rank 0 writes the output. The flags become settings here; nothing below sees them."""
    options = vars(args)
    job, scoring, engine = (settings_of(kind, options) for kind in SETTINGS)
    with distributed.process_group(distributed.local_device(engine.device)):
        return infer(job, scoring, engine)


def infer(job: Job, scoring: Scoring, engine: engines.EngineSettings) -> dict:
    """Files -> the predictor -> each file's rows saved as a part as soon as it is scored -> the output,
    assembled by rank 0 from the parts -> a summary."""
    out = output_path(job)
    files = input_files(job)
    if not job.detections_mode:                  # row ids and Raven tables are named by the file's stem
        outputs.check_unique_names(files)
    if job.format == "raven" and not job.detections_mode:
        outputs.check_raven_folder(out, files, job.combined)
    predictor = Predictor(job.ckpts, **dataclasses.asdict(scoring), **dataclasses.asdict(engine))
    if not files:  # Kaggle's visible run: an empty test folder still needs a valid submission
        kind = "kaggle" if job.detections_mode else job.format
        if kind == "raven":
            out.mkdir(parents=True, exist_ok=True)
        else:
            outputs.header_only_submission(predictor.columns, out, kind)
        log.warning("no audio to score in %s: wrote %s with %s only", job.file_list or job.soundscapes, out,
                    "no table" if kind == "raven" else "the header")
        return {"rows": 0, "problems": [], "audio_seconds": 0.0, "wall_seconds": 0.0, "realtime_factor": 0.0}
    rank, world_size = distributed.rank_and_world_size()
    parts = Path(f"{out}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    # One job per output: a second one on the same --out would clear this one's parts and write over its output.
    with runfolder.locked(parts, enabled=rank == 0, holder="infer.py job writing there", other="--out"):
        store = outputs.PartStore(parts, job_settings(predictor), job.skip_existing, prepare=rank == 0)
        distributed.barrier()                 # the other ranks write parts only once rank 0 has the folder ready
        summary = score_files(files[rank::world_size], predictor, store, job)
        if rank != 0:
            return summary
        summary |= write_outputs(job, predictor, files, store, out)
        store.remove()
    summary["wall_seconds"] = wall = time.perf_counter() - summary.pop("started")      # scoring and writing
    summary["realtime_factor"] = summary["audio_seconds"] / wall if wall > 0 else float("inf")
    report(summary, job)
    return summary


def score_files(files: list[Path], predictor: Predictor, store, job: Job) -> dict:
    """This process's share of the files -> a part each (unscorable ones too: no rows, their problem),
    files whose usable part --skip-existing finds left out -> rank 0: seconds of audio scored by all ranks
    and when scoring started; other ranks: {rank}."""
    rank, world_size = distributed.rank_and_world_size()
    todo = files if not job.skip_existing else redo_list(files, store, len(predictor.columns))
    log.info("%d file(s) (%d done before), %d model(s), %d species, backend %s, %s%s", len(files),
             len(files) - len(todo), len(predictor.members), len(predictor.columns),
             predictor.engine.backend, "bf16" if predictor.bf16 else "fp32",
             f", {world_size} processes" if world_size > 1 else "")
    started, seconds = time.perf_counter(), 0.0
    for path, rows, problem, file_seconds in progress.bar(predictor.scored(todo), total=len(todo), desc="scoring",
                                                          unit="file", every=job.log_every):
        seconds += file_seconds
        store.save(path, np.zeros((0, len(predictor.columns))) if rows is None else rows, problem)
    shares = distributed.gather_objects(seconds)                   # and every rank's parts are written
    return {"rank": rank} if rank != 0 else {"audio_seconds": sum(shares), "started": started}


def redo_list(files: list[Path], store, n_columns: int) -> list[Path]:
    """--skip-existing: the files without a usable part (absent, damaged, edited, or of a replaced file);
    why the used-to-be-done ones are scored again is logged."""
    todo, stale = [], []
    for path in files:
        problem = store.problem_with(path, n_columns, expected_rows(path))
        if problem is not None:
            todo.append(path)
            stale += [f"{path.name}: {problem}"] if problem != "no part" else []
    if stale:
        log.warning("--skip-existing: %d part(s) are scored again, e.g. %s", len(stale), stale[0])
    return todo


def expected_rows(path: Path) -> int:
    """How many 5-s rows the file gives, from its header (0 when unreadable: scored, it gives none)."""
    header = audio.check_audio_files([path])[0][0]
    return soundscapes.row_count(*header) if header is not None else 0


def input_files(job: Job) -> list[Path]:
    """--file-list, or every audio file below --audio-dir (detections) or --soundscapes; [] for an empty
    or missing soundscapes folder (Kaggle's visible run has no test soundscapes)."""
    if job.detections_mode:
        if not job.audio_dir:
            raise ValueError("--detections needs --audio-dir (the train_audio folder)")
        return list_audio(job.audio_dir)
    if job.file_list:
        files = [Path(line.strip()) for line in Path(job.file_list).read_text().splitlines() if line.strip()]
        missing = [path for path in files if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{job.file_list}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
        return files
    folder = Path(job.soundscapes)
    return audio.audio_files(folder) if folder.is_dir() else []


def output_path(job: Job) -> Path:
    """Where the output goes: --detections, --out, or by format submission.csv / raven_selections/;
    checked before any work (a Raven folder is never written over a file, a CSV never over a folder)."""
    out = Path(job.detections if job.detections_mode else job.out or
               ("raven_selections" if job.format == "raven" else "submission.csv"))
    if job.format == "raven" and not job.detections_mode and out.is_file():
        raise FileExistsError(f"--format raven writes a folder of tables and {out} is a file: give --out a folder")
    if (job.format != "raven" or job.detections_mode) and out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: give --out a file name")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"--out {out}: {blocking} is a file, not a folder")
    return out


def job_settings(predictor: Predictor) -> dict:
    """How the predictor computes the rows: a stopped job is continued (--skip-existing) only with the
    same. Its keys and values are those of settings.json files already written: keep them."""
    checkpoints = [[str(checkpoint_path(path).resolve()), checkpoint_path(path).stat().st_size,
                    checkpoint_path(path).stat().st_mtime_ns] for path in predictor.ckpts]
    scoring, engine = predictor.scoring, predictor.engine
    return {"checkpoints": checkpoints, "columns": predictor.columns,
            "bf16": predictor.bf16,
            **{key: getattr(scoring, key) for key in ("ema", "average_weights", "hop", "smooth", "file_prior",
                                                      "combine", "power", "nocall_gate")},
            "backend": engine.backend, "device": engine.device}


def write_outputs(job: Job, predictor: Predictor, files: list[Path], store, out: Path) -> dict:
    """Every file's rows, from its part -> the output (atomically) -> a summary."""
    results, problems = {}, []
    missing = [path for path in files if not store.has(path)]
    if missing:     # removed under this job (by hand, or a job on the same --out before the lock existed)
        raise FileNotFoundError(f"{len(missing)} of {len(files)} file(s) have no rows in {store.folder}, e.g. "
                                f"{missing[0]}: nothing written; run again with --skip-existing")
    for path in files:
        rows, problem = store.load(path)
        results |= {path: rows} if len(rows) else {}               # unscorable files give no rows
        problems += [problem] if problem else []
    summary = {"problems": problems}
    if job.detections_mode:
        table = outputs.detections_table(results, files, predictor.columns, Path(job.audio_dir), job.metadata,
                                         job.top_k or 3)
        outputs.write_atomic(out, lambda path: table.to_csv(path, index=False))
        log.info("wrote %s: %d windows from %d file(s)", out, len(table), len(results))
        return summary | {"detections": table}
    table = outputs.row_table(results, files, predictor.columns, job.top_k)
    summary |= {"submission": table[["row_id", *predictor.columns]], "rows": len(table)}
    if job.format == "raven":
        members = predictor.members
        band = (min(m.model.config["fmin"] for m in members), max(m.model.config["fmax"] for m in members))
        min_conf = job.min_conf if job.min_conf is not None else (
            0.25 if all(m.model.activation == "sigmoid" for m in members) else 0.1)
        tables = outputs.raven_tables(table, {path.name: path.resolve() for path in files}, min_conf, band,
                                      outputs.common_names_of(job.metadata))
        written = outputs.write_raven(tables, out, job.combined)
        log.info("wrote %d selection table(s) to %s: %d detection(s) scoring >= %g over %d rows", len(tables), out,
                 written, min_conf, len(table))
    else:
        outputs.write_submission(table, out, job.format)
        log.info("wrote %s: %d rows from %d file(s)", out, len(table), len(results))
    return summary


def report(summary: dict, job: Job) -> None:
    """Speed, problems, and with --labels the scores of the submission."""
    speed = summary["realtime_factor"]
    log.info("audio %.1f min, wall %.1f s, %.0fx real time; BirdCLEF 2023 test set (200 x 10 min) "
             "projected at %.1f min", summary["audio_seconds"] / 60, summary["wall_seconds"], speed,
             200 * 600 / speed / 60 if speed else float("nan"))
    for line in summary["problems"]:
        log.warning("problem: %s", line)
    if job.labels and not job.detections_mode:
        # with --file-list, the label table's own audio folder (2021: train_soundscapes/ beside it)
        scores = soundscapes.score_submission(summary["submission"], job.labels,
                                              None if job.file_list else job.soundscapes)
        log.info("scored %d labelled rows: cmAP5 %.4f  cmAP3 %.4f  macro AP %.4f  LRAP %.4f",
                 scores["rows"], scores["cmap5"], scores["cmap3"], scores["macro_ap"], scores["lrap"])
        summary["scores"] = scores


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(get_args_parser().parse_args())
    except (model_lib.CheckpointError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            ValueError, FloatingPointError) as error:
        log.error("%s", error)
        sys.exit(1)
