"""Windows chosen from a detector's scores: extra training windows, and quiet windows for no-call.

`infer.py --audio-dir train_audio --detections det.csv` scores every 5-s window of
every training recording. From that table, `python data.py extras` keeps each
recording's best-scoring windows of its primary label (`select_extras`,
`train.py --extras`), and `train.py --nocall-detections` takes its quietest
windows as no-call examples (`select_nocall_detections`). data.build_datasets
matches both to the training split, so no validation recording leaks in.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import soundfile as sf

import audio
import soundscapes

def select_extras(detections: pd.DataFrame, threshold: float, minimum: int, maximum: int, divisor: float,
                  keep_all_below: int) -> pd.DataFrame:
    """Extra training windows from `infer.py --detections`.

    A window whose score for its recording's primary label is at least `threshold`
    is a detection. Each recording keeps its best clip(floor(n / divisor), minimum,
    maximum) detections, never more than the n it has; species with fewer than
    `keep_all_below` recordings keep all of theirs. -> filename, start_s, primary_score, labels.
    """
    recordings_per_species = detections.groupby("primary_label")["filename"].nunique()
    hits = detections[detections["primary_score"] >= threshold]
    chosen = []
    for _, windows in hits.groupby("filename", sort=True):  # one recording at a time
        species = windows["primary_label"].iloc[0]
        n = len(windows)
        if recordings_per_species[species] < keep_all_below:
            keep = n
        else:
            keep = min(max(int(math.floor(n / divisor)), minimum), maximum, n)
        best = windows.sort_values(["primary_score", "start_s"], ascending=[False, True], kind="stable")
        chosen.append(best.head(keep))
    if not chosen:
        return pd.DataFrame(columns=["filename", "start_s", "primary_score", "labels"])
    extras = pd.concat(chosen)
    return pd.DataFrame({"filename": extras["filename"].to_numpy(), "start_s": extras["start_s"].to_numpy(),
                         "primary_score": extras["primary_score"].to_numpy(),
                         "labels": extras["primary_label"].to_numpy()})


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
    """Write each extra window as `<XC id>_<start s>.ogg` of `chunk_seconds`, centred on the 5-s window."""
    out_dir = Path(out_dir)
    written = 0
    for filename, start in zip(extras["filename"], extras["start_s"]):
        source = Path(audio_dir) / filename
        with sf.SoundFile(source) as handle:
            rate = handle.samplerate
        chunk_start = max(float(start) + soundscapes.ROW_SECONDS / 2 - chunk_seconds / 2, 0.0)
        samples = audio.read_window(source, chunk_start, chunk_seconds, rate)
        target = out_dir / Path(filename).parent / f"{Path(filename).stem}_{int(round(float(start)))}.ogg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(target, "w", rate, 1, format="OGG", subtype="VORBIS") as handle:
            for block in range(0, len(samples), rate):  # blocks: libsndfile's Vorbis encoder crashes on huge writes
                handle.write(samples[block:block + rate])
        written += 1
    return written


def extras_command(args) -> pd.DataFrame:
    """`python data.py extras`: select, write extras.csv, print the totals per species, and with
    --write-audio also write the chunks."""
    detections = pd.read_csv(args.detections)
    extras = select_extras(detections, args.threshold, args.min, args.max, args.divisor, args.keep_all_below)
    extras.to_csv(args.out, index=False)
    per_species = extras.groupby("labels").size().sort_values(ascending=False)
    print(per_species.to_string(header=False))
    print(f"{len(extras)} extras from {extras['filename'].nunique()} recordings of {len(per_species)} species "
          f"({args.min}-{args.max}//{args.divisor:g}, keep all below {args.keep_all_below}, threshold "
          f"{args.threshold:g}) -> {args.out}")
    if args.write_audio:
        print(f"wrote {write_extra_audio(extras, args.audio_dir, args.write_audio, args.chunk)} chunks to "
              f"{args.write_audio}")
    return extras
