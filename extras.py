"""Windows chosen from a detector's scores: extra training windows, and quiet windows for no-call.

`infer.py --audio-dir train_audio --detections det.csv` scores every 5-s window of
every training recording. From that table, `python data.py extras` keeps each
recording's best-scoring windows of its primary label (`select_extras`,
`train.py --extras`), and `train.py --nocall-detections` takes its quietest
windows as no-call examples (`select_nocall_detections`). data.build_datasets
matches both to the training split, so no validation recording leaks in.

The `extras` subcommand's flags are defined here (`add_command`); data.py's main dispatches to
`run_command`, which turns the parsed flags into an ExtrasCommand at once.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

import audio
import progress
import soundscapes

SCORES = {"primary": "primary_score", "any": "top1_score"}   # --score: which column makes a detection
CHOICES = ("best", "random")                                   # --choose: which detections are kept

log = logging.getLogger("birdclef")


def select_extras(detections: pd.DataFrame, threshold: float, minimum: int, maximum: int, divisor: float,
                  keep_all_below: int, score: str = "primary", choose: str = "best", seed: int = 0,
                  skip_start: float = 0.0, skip_end: float = 0.0) -> pd.DataFrame:
    """Extra training windows from `infer.py --detections`.

    A window is a detection when its score -- of the recording's primary label (score "primary"),
    or of whichever species scores highest (score "any": the log's "no primary bird score" sets)
    -- is at least `threshold`, and it lies at least `skip_start` seconds after the recording's
    start and `skip_end` seconds before its end. Each recording keeps clip(floor(n / divisor),
    minimum, maximum) of its n detections, never more than n -- this project's reading of the log's
    "min-max//divisor" notation -- its best-scoring ones ("best") or a random choice seeded by `seed`
    ("random"); species with fewer than `keep_all_below` recordings keep all of theirs.
    -> filename, start_s, score, labels.
    """
    if score not in SCORES or choose not in CHOICES:
        raise ValueError(f"score must be one of {tuple(SCORES)} and choose one of {CHOICES}")
    column = SCORES[score]
    missing = [name for name in ("filename", "primary_label", "start_s", "end_s", column)
               if name not in detections.columns]
    if missing:
        raise ValueError(f"the detections table lacks column(s) {missing} (--score {score} reads {column}); "
                         f"write it with infer.py --detections")
    recordings_per_species = detections.groupby("primary_label")["filename"].nunique()
    ends = detections.groupby("filename")["end_s"].transform("max")          # each window's recording length
    eligible = (detections["start_s"] >= skip_start) & (detections["end_s"] <= ends - skip_end)
    hits = detections[eligible & (detections[column] >= threshold)]
    rng = np.random.default_rng(seed)
    chosen = []
    for _, windows in hits.groupby("filename", sort=True):  # one recording at a time
        keep = kept_per_recording(len(windows), recordings_per_species[windows["primary_label"].iloc[0]],
                                  minimum, maximum, divisor, keep_all_below)
        if choose == "random":
            chosen.append(windows.iloc[np.sort(rng.permutation(len(windows))[:keep])])
        else:
            best = windows.sort_values([column, "start_s"], ascending=[False, True], kind="stable")
            chosen.append(best.head(keep))
    if not chosen:
        return pd.DataFrame(columns=["filename", "start_s", "score", "labels"])
    extras = pd.concat(chosen)
    return pd.DataFrame({"filename": extras["filename"].to_numpy(), "start_s": extras["start_s"].to_numpy(),
                         "score": extras[column].to_numpy(), "labels": extras["primary_label"].to_numpy()})


def kept_per_recording(detections: int, species_recordings: int, minimum: int, maximum: int, divisor: float,
                       keep_all_below: int) -> int:
    """How many of a recording's detections become extras."""
    if species_recordings < keep_all_below:
        return detections
    return min(max(int(math.floor(detections / divisor)), minimum), maximum, detections)


def extras_totals(extras: pd.DataFrame, detections: pd.DataFrame, keep_all_below: int) -> pd.DataFrame:
    """Per species: its recordings (in the detections table), extras, whether all its detections were
    kept (fewer than keep_all_below recordings), and the two together: what an epoch draws of it."""
    recordings = detections.groupby("primary_label")["filename"].nunique()
    kept = extras.groupby("labels").size().reindex(recordings.index, fill_value=0)
    table = pd.DataFrame({"species": recordings.index, "recordings": recordings.to_numpy(),
                          "extras": kept.to_numpy(), "kept_whole": recordings.to_numpy() < keep_all_below})
    table["per_epoch"] = table["recordings"] + table["extras"]
    return table.sort_values(["per_epoch", "species"], ascending=[False, True]).reset_index(drop=True)


def read_extras(path) -> pd.DataFrame:
    """extras.csv written by `python data.py extras` -> filename, start_s (checked)."""
    extras = pd.read_csv(path, dtype={"filename": str}, keep_default_na=False)
    missing = [column for column in ("filename", "start_s") if column not in extras.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected the table `python data.py extras` writes")
    extras["start_s"] = pd.to_numeric(extras["start_s"], errors="raise").astype(float)
    return extras


def select_nocall_detections(detections: pd.DataFrame, max_score: float, per_recording: int) -> pd.DataFrame:
    """No-call windows from infer.py --detections: windows whose best score of any species is below
    `max_score`, the `per_recording` quietest of each recording -> filename, start_s."""
    if "top1_score" not in detections.columns:
        raise ValueError("the detections table lacks top1_score; write it with infer.py --detections")
    quiet = detections[detections["top1_score"] < max_score]
    quiet = quiet.sort_values(["filename", "top1_score", "start_s"], kind="stable")
    chosen = quiet.groupby("filename", sort=True).head(per_recording)
    return chosen[["filename", "start_s"]].reset_index(drop=True)


def write_extra_audio(extras: pd.DataFrame, audio_dir, out_dir, chunk_seconds: float) -> int:
    """Write each extra window as `<XC id>_<start s>.ogg` of `chunk_seconds`, centred on the 5-s window.
    Names are confined to `audio_dir` (reading) and `out_dir` (writing); a recording that is missing
    or unreadable is logged and skipped -> chunks written."""
    out_dir = Path(out_dir)
    written = 0
    for filename, start in progress.bar(list(zip(extras["filename"], extras["start_s"])), total=len(extras),
                                        desc="extra chunks", unit="chunk"):
        source = audio.path_inside(audio_dir, filename, "extras filename")
        name = Path(str(filename))
        target = audio.path_inside(out_dir, name.parent / f"{name.stem}_{int(round(float(start)))}.ogg",
                                   "extras filename")
        try:
            with sf.SoundFile(source) as handle:
                rate = handle.samplerate
            chunk_start = max(float(start) + soundscapes.ROW_SECONDS / 2 - chunk_seconds / 2, 0.0)
            samples = audio.read_window(source, chunk_start, chunk_seconds, rate)
        except (OSError, RuntimeError, ValueError) as error:     # soundfile's LibsndfileError is a RuntimeError
            log.warning("skipped %s at %.1f s: %s", source, float(start), error)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(target, "w", rate, 1, format="OGG", subtype="VORBIS") as handle:
            for block in range(0, len(samples), rate):  # blocks: libsndfile's Vorbis encoder crashes on huge writes
                handle.write(samples[block:block + rate])
        written += 1
    return written


# ----------------------------------------------------------------------------- `python data.py extras`

@dataclass(frozen=True)
class ExtrasCommand:
    """`python data.py extras`, parsed: which detections become extras, and what is written."""
    detections: str               # --detections: infer.py --detections CSV
    threshold: float
    minimum: int                  # --min
    maximum: int                  # --max
    divisor: float
    keep_all_below: int
    score: str
    choose: str
    seed: int
    skip_start: float
    skip_end: float
    out: str                      # extras.csv
    write_audio: str | None       # folder for the chunks, or None
    audio_dir: str | None         # where the recordings are, with write_audio
    chunk: float                  # seconds per written chunk


def add_command(subparsers) -> None:
    """The `extras` subcommand of data.py (`run_command` runs it)."""
    parser = subparsers.add_parser("extras", help="select extra training windows from infer.py --detections",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--detections", required=True, help="CSV written by infer.py --detections")
    parser.add_argument("--threshold", type=float, default=0.5, help="primary-label score of a detection")
    parser.add_argument("--min", type=int, default=4, help="extras per recording, at least (if it has them)")
    parser.add_argument("--max", type=int, default=12, help="extras per recording, at most")
    parser.add_argument("--divisor", type=float, default=1.5, help="extras = floor(detections / divisor)")
    parser.add_argument("--keep-all-below", type=int, default=12,
                        help="species with fewer recordings keep all their detections")
    parser.add_argument("--score", choices=list(SCORES), default="primary",
                        help="a detection's score: its recording's primary label's, or the best of any species")
    parser.add_argument("--choose", choices=CHOICES, default="best",
                        help="which detections of a recording become extras: the best-scoring, or random ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of --choose random")
    parser.add_argument("--skip-start", type=float, default=0.0,
                        help="no extra from the first this many seconds of a recording")
    parser.add_argument("--skip-end", type=float, default=0.0,
                        help="no extra from the last this many seconds of a recording")
    parser.add_argument("--out", default="extras.csv", help="where to write the selection")
    parser.add_argument("--write-audio", default=None, help="also write each extra as an ogg chunk here")
    parser.add_argument("--audio-dir", default=None, help="train_audio folder, with --write-audio")
    parser.add_argument("--chunk", type=float, default=8.0, help="seconds per written chunk")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> pd.DataFrame:
    """The parsed `extras` subcommand -> extras_command; `parser` reports a flag missing (as argparse does)."""
    if args.write_audio and not args.audio_dir:
        parser.error("--write-audio needs --audio-dir")
    return extras_command(ExtrasCommand(
        detections=args.detections, threshold=args.threshold, minimum=args.min, maximum=args.max,
        divisor=args.divisor, keep_all_below=args.keep_all_below, score=args.score, choose=args.choose,
        seed=args.seed, skip_start=args.skip_start, skip_end=args.skip_end, out=args.out,
        write_audio=args.write_audio, audio_dir=args.audio_dir, chunk=args.chunk))


def extras_command(command: ExtrasCommand) -> pd.DataFrame:
    """`python data.py extras`: select, write extras.csv, print the totals per species (with the
    recordings themselves, so the epoch's size is visible), and with --write-audio write the chunks."""
    detections = pd.read_csv(command.detections, dtype={"filename": str, "primary_label": str},
                             keep_default_na=False)
    extras = select_extras(detections, command.threshold, command.minimum, command.maximum, command.divisor,
                           command.keep_all_below, score=command.score, choose=command.choose, seed=command.seed,
                           skip_start=command.skip_start, skip_end=command.skip_end)
    extras.to_csv(command.out, index=False)
    totals = extras_totals(extras, detections, command.keep_all_below)
    print(totals.to_string(index=False))
    print(f"{len(extras)} extras from {extras['filename'].nunique()} recordings of {(totals['extras'] > 0).sum()} "
          f"species ({command.minimum}-{command.maximum}//{command.divisor:g}, {command.choose} by "
          f"{command.score} score >= {command.threshold:g}; {int(totals['kept_whole'].sum())} species kept whole "
          f"below {command.keep_all_below} recordings) + {int(totals['recordings'].sum())} recordings = "
          f"{int(totals['per_epoch'].sum())} per epoch (all recordings; training uses its split's) -> {command.out}")
    if command.write_audio:
        written = write_extra_audio(extras, command.audio_dir, command.write_audio, command.chunk)
        print(f"wrote {written} chunks to {command.write_audio}")
    return extras
