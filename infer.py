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
import functools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

import audio
import data
import distributed
import engines
import model as model_lib
import soundscapes

log = logging.getLogger("birdclef")

NOCALL = soundscapes.NOCALL


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
    group.add_argument("--hop", type=float, default=soundscapes.ROW_SECONDS,
                       help="seconds between window starts; below 5, overlapping windows are "
                            "averaged into the rows, weighted by overlap")
    group.add_argument("--smooth", default=None,
                       help="odd number of comma-separated weights over neighbouring rows, e.g. 0.1,0.8,0.1")
    group.add_argument("--file-prior", type=float, default=0.0,
                       help="mix each row with the file's per-species maximum: (1-w)*row + w*max")

    group = parser.add_argument_group("speed")
    group.add_argument("--batch-size", type=int, default=16,
                       help="windows per forward pass (raise it on a GPU)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="torch backend on the CPU: channels-last convolutions (faster with oneDNN); "
                            "--no-channels-last is the plain eager path, for comparison")
    group.add_argument("--threads", type=int, default=0,
                       help="CPU threads in all, shared among --streams (0 = torch's default: one per core)")
    group.add_argument("--workers", type=int, default=1, help="threads decoding audio ahead of the model")
    group.add_argument("--streams", type=int, default=2,
                       help="CPU: batches run at once, each on --threads / streams threads (at most one "
                            "stream per thread)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto: bf16 on CPUs with native bf16 (torch autocast, OpenVINO), else fp32")
    group.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                       help="CPU engine for the classifier; onnxruntime and openvino are optional "
                            "installs, checked against torch on the first batch")
    group.add_argument("--parity-tolerance", type=float, default=0.02,
                       help="largest score difference from torch fp32 accepted on the first batch")
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser



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


# ----------------------------------------------------------------------------- decode

def list_audio(folder, recursive: bool = False) -> list[Path]:
    """The audio files to score; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = audio.audio_files(folder, recursive)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(e[1:] for e in audio.AUDIO_EXTENSIONS)} files in {folder}")
    return files


def decode_file(path: Path, rates: list[int]) -> dict:
    """A file decoded once, resampled to every rate the members need -> path, waveforms {rate:
    (samples,)}, seconds, error (None, or why it failed; then seconds from its header if readable)."""
    try:
        samples, source_rate = sf.read(path, dtype="float32", always_2d=True)
        if len(samples) == 0:
            raise ValueError("no audio frames")
        waveforms = {rate: torch.from_numpy(audio.to_mono_resampled(samples, source_rate, rate))
                     for rate in sorted(set(rates))}
        return {"path": path, "waveforms": waveforms, "error": None, "seconds": len(samples) / source_rate}
    except Exception as error:  # reported in the summary; the submission is still written
        return {"path": path, "waveforms": None, "seconds": header_seconds(path),
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


def file_rows(per_member: list[np.ndarray], members: list[Member], n_columns: int, args) -> np.ndarray:
    """Each member's (n_rows, C_m) row scores of one file -> its (n_rows, n_columns) output rows."""
    scores = combine(per_member, members, n_columns, args.combine, args.power)
    if args.smooth:
        scores = smooth_rows(scores, [float(w) for w in args.smooth.split(",")])
    if args.file_prior:
        scores = apply_file_prior(scores, args.file_prior)
    return scores


# ----------------------------------------------------------------------------- decode -> windows -> model -> rows

def score_files(files: list[Path], members: list[Member], columns: list[str], args):
    """Every file through the ensemble -> ({path: (n_rows, n_columns)}, problems, audio seconds)."""
    decode = functools.partial(decode_file, rates=[member.sample_rate for member in members])
    streams = [engines.WindowStream(member.runner, member.model, args.batch_size, member.name) for member in members]
    row_weights = {}           # path -> each member's (n_rows, W) weights of its windows in the rows
    results, problems, audio_seconds = {}, [], 0.0
    for decoded in engines.in_threads(decode, files, args.workers):
        path = decoded["path"]
        if decoded["error"] is None:
            audio_seconds += decoded["seconds"]
            reference_rate = members[0].sample_rate
            n_rows = soundscapes.row_count(len(decoded["waveforms"][reference_rate]), reference_rate)
            row_weights[path] = []
            for member, stream in zip(members, streams):
                starts, weights = soundscapes.window_plan(n_rows, member.window_seconds, args.hop)
                row_weights[path].append(weights)
                stream.add(path, decoded["waveforms"][member.sample_rate].numpy(),
                           soundscapes.window_offsets(starts, member.sample_rate))
        elif decoded["seconds"] is None:
            problems.append(f"{path}: {decoded['error']}; no rows (length unknown)")
            log.warning("%s: %s; no rows written", path, decoded["error"])
        else:
            n_rows = soundscapes.row_count(int(round(decoded["seconds"] * 1000)), 1000)
            results[path] = np.zeros((n_rows, len(columns)), dtype=np.float32)
            problems.append(f"{path}: {decoded['error']}; {n_rows} row(s) of zeros")
            log.warning("%s: %s; writing %d row(s) of zeros", path, decoded["error"], n_rows)
        results.update(finished_rows(streams, members, row_weights, len(columns), args))
    for stream in streams:
        stream.start_batches(final=True)
    results.update(finished_rows(streams, members, row_weights, len(columns), args))
    return results, problems, audio_seconds


def finished_rows(streams, members: list[Member], row_weights: dict, n_columns: int, args) -> dict:
    """The output rows of every file whose windows all members have scored (taken out of row_weights)."""
    done = [path for path in row_weights if all(path in stream.finished for stream in streams)]
    rows = {}
    for path in done:
        per_member = []
        for member, stream, weights in zip(members, streams, row_weights.pop(path)):
            scores = stream.finished.pop(path)                                  # (W, C_m)
            if args.nocall_gate:
                scores = gate_by_nocall(scores, member.model.labels)
            per_member.append(weights @ scores)                                 # (n_rows, C_m)
        rows[path] = file_rows(per_member, members, n_columns, args)
    return rows


# ----------------------------------------------------------------------------- write

def write_output(submission: pd.DataFrame, files_rows: list[tuple[Path, int]], args, members) -> None:
    out = Path(args.out)
    if args.format == "kaggle":
        out.parent.mkdir(parents=True, exist_ok=True)
        submission.to_csv(out, index=False)
        return
    starts = np.concatenate([np.arange(n) * soundscapes.ROW_SECONDS for _, n in files_rows])
    files = np.concatenate([[path.name] * n for path, n in files_rows])
    if args.format == "csv":
        table = submission.drop(columns="row_id")
        table.insert(0, "end_s", starts + soundscapes.ROW_SECONDS)
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
                                   f"{starts[row] + soundscapes.ROW_SECONDS:.3f}", f"{low_hz:.1f}", f"{high_hz:.1f}",
                                   species[column], f"{scores[row, column]:.4f}"])
        table = pd.DataFrame(selections, columns=RAVEN_COLUMNS)
        table.to_csv(out_dir / f"{Path(name).stem}.selections.txt", sep="\t", index=False)


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
            row = {"filename": path.relative_to(audio_dir).as_posix(), "start_s": window * soundscapes.ROW_SECONDS,
                   "end_s": (window + 1) * soundscapes.ROW_SECONDS, "primary_label": primary,
                   "primary_score": float(window_scores[index[primary]]) if primary in index else float("nan")}
            for rank, column in enumerate(top[window], start=1):
                row[f"top{rank}_label"] = columns[column]
                row[f"top{rank}_score"] = float(window_scores[column])
            rows.append(row)
    table = pd.DataFrame(rows)
    Path(args.detections).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.detections, index=False)
    return table


def write_submission(results: dict, files: list[Path], columns: list[str], args, members) -> pd.DataFrame:
    """The submission: each scored file's rows, in the order of `files`."""
    files_rows = [(path, len(results[path])) for path in files if path in results]
    blocks = [results[path] for path, _ in files_rows]
    submission = pd.DataFrame(np.concatenate(blocks) if blocks else np.zeros((0, len(columns))), columns=columns)
    submission.insert(0, "row_id", [row_id for path, n in files_rows for row_id in soundscapes.row_ids(path.stem, n)])
    write_output(submission, files_rows, args, members)
    log.info("wrote %s: %d rows from %d file(s)", args.out, len(submission), len(files_rows))
    return submission


# ----------------------------------------------------------------------------- main

def main(args) -> dict:
    """Score every file and write the output. Under torchrun each process scores every
    world_size-th file and rank 0 gathers the scores and writes one output."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.local_device(args.device)
    return distributed.call_in_group(device, functools.partial(infer, args, device))


def infer(args, device: torch.device) -> dict:
    """Checkpoints -> members and their runners -> every file scored -> the output (rank 0) -> a summary."""
    members = load_members(args.ckpts, args.average_weights, args.ema)
    bf16 = engines.use_bf16(args.precision, device)
    for member in members:
        member.runner = engines.make_runner(member.model, args, device, bf16)
    columns = output_columns(members, args.sample_submission)
    align(members, columns)
    if args.nocall_gate and not any(NOCALL in member.model.labels for member in members):
        log.warning("--nocall-gate has no effect: no checkpoint has a '%s' class (train with --nocall)", NOCALL)
    detections_mode = args.detections is not None
    if detections_mode and not args.audio_dir:
        raise ValueError("--detections needs --audio-dir (the train_audio folder)")
    files = list_audio(args.audio_dir, recursive=True) if detections_mode else list_audio(args.soundscapes)
    rank, world_size = distributed.rank_and_world_size()
    log.info("%d file(s), %d model(s), %d species, backend %s, %s%s", len(files), len(members), len(columns),
             args.backend, "bf16" if bf16 else "fp32", f", {world_size} processes" if world_size > 1 else "")
    started = time.perf_counter()
    shares = distributed.gather_objects(score_files(files[rank::world_size], members, columns, args))
    if rank != 0:
        return {"rank": rank}
    results = {path: scores for share_results, _, _ in shares for path, scores in share_results.items()}
    audio_seconds, wall = sum(seconds for _, _, seconds in shares), time.perf_counter() - started
    summary = {"audio_seconds": audio_seconds, "wall_seconds": wall,
               "realtime_factor": audio_seconds / wall if wall > 0 else float("inf"),
               "problems": [line for _, share_problems, _ in shares for line in share_problems]}
    if detections_mode:
        summary["detections"] = write_detections(results, files, columns, args)
        log.info("wrote %s: %d windows from %d file(s)", args.detections, len(summary["detections"]), len(results))
    else:
        summary["submission"] = write_submission(results, files, columns, args, members)
        summary["rows"] = len(summary["submission"])
    report(summary, args, detections_mode)
    return summary


def report(summary: dict, args, detections_mode: bool) -> None:
    """Speed, problems, and with --labels the scores of the submission."""
    speed = summary["realtime_factor"]
    log.info("audio %.1f min, wall %.1f s, %.0fx real time; BirdCLEF 2023 test set (200 x 10 min) "
             "projected at %.1f min", summary["audio_seconds"] / 60, summary["wall_seconds"], speed,
             200 * 600 / speed / 60 if speed else float("nan"))
    for line in summary["problems"]:
        log.warning("problem: %s", line)
    if args.labels and not detections_mode:
        scores = soundscapes.score_submission(summary["submission"], args.labels, args.soundscapes)
        log.info("scored %d labelled rows: cmAP5 %.4f  cmAP3 %.4f  macro AP %.4f  LRAP %.4f",
                 scores["rows"], scores["cmap5"], scores["cmap3"], scores["macro_ap"], scores["lrap"])
        summary["scores"] = scores


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(get_args_parser().parse_args())
    except (model_lib.CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as error:
        log.error("%s", error)
        sys.exit(1)
