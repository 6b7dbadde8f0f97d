"""The run folder: checkpoints written atomically, keep-last-N from the files on disk, and the logs.

What a run writes (README, "What a run writes"): config.json, metrics.csv (one row
per evaluation), steps.csv (one row per optimiser step), metrics.png, drawn_counts.csv,
sampling_audit.csv, bad_files.csv, checkpoint_stepNNNNNNNN.pt and best.pt. Logs are
appended at each evaluation before its checkpoint is written; on resume they are cut
back to what the checkpoint had reached, so a kill at any moment never duplicates
or loses a row.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import pandas as pd
import torch

import model as model_lib

log = logging.getLogger("birdclef")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_step(\d+)\.pt$")


# ----------------------------------------------------------------------------- checkpoints and config


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions); earlier ones are untouched."""


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then os.replace: never a half file.

    A kill at any moment leaves either the old file or the new one; a failed write
    (a full disk) removes the temporary file and leaves the earlier checkpoints as they were.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise CheckpointSaveError(
            f"could not write {path} ({error.strerror or error}); the previous checkpoints in {path.parent} "
            f"are intact: free some space and continue with --resume auto") from error
    finally:
        if temporary.exists():
            temporary.unlink()


def periodic_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint_step*.pt files on disk, oldest first (by step, from the names)."""
    found = [(int(match.group(1)), path) for path in out_dir.iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def newest_complete_checkpoint(out_dir: Path) -> Path:
    """--resume auto: the newest periodic checkpoint that loads; broken ones are reported and passed over."""
    for path in reversed(periodic_checkpoints(out_dir) if out_dir.is_dir() else []):
        try:
            model_lib.read_checkpoint(path)
            return path
        except model_lib.CheckpointError as error:
            log.warning("passing over %s: %s", path, error)
    raise FileNotFoundError(f"--resume auto: no complete checkpoint in {out_dir}")


def save_checkpoint(out_dir: Path, checkpoint: dict, keep_last: int, best: bool = False) -> Path:
    """checkpoint_step<global step>.pt (and best.pt when `best`), then prune to the newest `keep_last`."""
    path = out_dir / f"checkpoint_step{checkpoint['global_step']:08d}.pt"
    save_atomic(checkpoint, path)
    if best:
        save_atomic(checkpoint, out_dir / "best.pt")
    prune_checkpoints(out_dir, keep_last)
    return path


BEST_PATTERN = re.compile(r"^best-step(\d+)\.pt$")


def keep_best(out_dir: Path, checkpoint: dict, monitor: str, keep: int) -> None:
    """--keep-best K: best-stepNNNNNNNN.pt for the K best evaluations by `monitor` (lowest for losses;
    the earlier of equals), ranked from metrics.csv and the files on disk, so restarts and crashes
    keep the right ones. Write this evaluation's file if it ranks, then delete the ones that no longer do."""
    table = pd.read_csv(out_dir / "metrics.csv").drop_duplicates("global_step", keep="last").set_index("global_step")
    existing = {int(match.group(1)): path for path in out_dir.iterdir() if (match := BEST_PATTERN.match(path.name))}
    steps = [step for step in {*existing, int(checkpoint["global_step"])} if step in table.index]
    sign = 1.0 if monitor.endswith("val_loss") else -1.0
    kept = set(sorted(steps, key=lambda step: (sign * float(table.loc[step, monitor]), step))[:keep])
    step = int(checkpoint["global_step"])
    if step in kept and step not in existing:
        save_atomic(checkpoint, out_dir / f"best-step{step:08d}.pt")
    for old_step, path in existing.items():
        if old_step not in kept:   # outranked, or from past the point a resumed run restarted at
            path.unlink()


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` periodic checkpoints; works from disk, so restarts prune too."""
    existing = periodic_checkpoints(out_dir)
    for path in existing[:max(len(existing) - keep_last, 0)]:
        path.unlink()


def plain_args(args) -> dict:
    """vars(args) with only JSON/weights_only-safe values (no Namespace, no Path objects)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def write_config(out_dir: Path, args) -> None:
    """config.json: every resolved argument."""
    (out_dir / "config.json").write_text(json.dumps(plain_args(args), indent=2) + "\n")


# ----------------------------------------------------------------------------- logs

def start_logs(out_dir: Path, resumed_from: dict | None = None) -> None:
    """A fresh run in an old folder starts fresh logs; a run resumed from a checkpoint drops the
    rows written after it (past its evaluations, steps and finished epochs), so no row is duplicated."""
    if resumed_from is None:
        for name in ("metrics.csv", "steps.csv", "drawn_counts.csv"):
            (out_dir / name).unlink(missing_ok=True)
        return
    truncate_log(out_dir / "metrics.csv", "evaluation", resumed_from["evaluations"])
    truncate_log(out_dir / "steps.csv", "global_step", resumed_from["global_step"] - 1)
    truncate_log(out_dir / "drawn_counts.csv", "epoch", resumed_from["epoch"] - 1)


SCORE_COLUMNS = ["val_loss", "cmap5", "cmap3", "macro_ap", "lrap"]


def metric_columns(with_ema: bool, with_soundscapes: bool = False, with_test: bool = False) -> list[str]:
    ema_columns = [f"ema_{column}" for column in SCORE_COLUMNS] if with_ema else []
    soundscape_columns = [f"soundscape_{column}" for column in SCORE_COLUMNS[1:]] if with_soundscapes else []
    test_columns = [f"test_{column}" for column in SCORE_COLUMNS[1:]] if with_test else []
    chance = ["chance_cmap5"] + ["soundscape_chance_cmap5"] * with_soundscapes + ["test_chance_cmap5"] * with_test
    return ["evaluation", "epoch", "global_step", "train_loss", *SCORE_COLUMNS, *ema_columns,
            *soundscape_columns, *test_columns, "lr", *chance]


def write_evaluation(out_dir: Path, row: dict, step_rows: list[tuple], checkpoint: dict, improved: bool,
                     keep_last: int) -> None:
    """One evaluation: its metrics row, the steps since the last one, the plot, then the checkpoint.
    Logs first, checkpoint second: a crash in between leaves rows that the resume from the
    previous checkpoint truncates, never a gap."""
    append_metrics(out_dir / "metrics.csv", row)
    append_steps(out_dir / "steps.csv", step_rows)
    plot_metrics(out_dir / "metrics.csv", out_dir / "metrics.png")
    save_checkpoint(out_dir, checkpoint, keep_last, best=improved)


def append_metrics(path: Path, row: dict) -> None:
    """One row of metrics.csv; its columns follow from the row (EMA and soundscape ones when present)."""
    columns = metric_columns("ema_val_loss" in row, "soundscape_cmap5" in row, "test_cmap5" in row)
    new_file = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerow({key: row[key] for key in columns})


STEP_COLUMNS = ["global_step", "epoch", "step_in_epoch", "loss", "lr"]


def append_steps(path: Path, rows: list[tuple]) -> None:
    """Per-step training losses, flushed at each evaluation (so they match the checkpoints)."""
    new_file = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(STEP_COLUMNS)
        writer.writerows(rows)


def truncate_log(path: Path, column: str, last: int) -> None:
    """On resume, drop rows past what the checkpoint had reached, so logs never hold duplicates.

    A kill can tear the last appended line; such a line is dropped too. The file is
    rewritten through a temporary file and os.replace, so a kill during the rewrite
    cannot lose the rows before it.
    """
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fieldnames = reader.fieldnames or []
        rows = [row for row in reader if is_complete_row(row, fieldnames) and int(row[column]) <= last]
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def is_complete_row(row: dict, fieldnames: list[str]) -> bool:
    """A line torn by a kill has missing fields (or, as DictReader says, surplus ones under None)."""
    return None not in row and all(row.get(name) not in (None, "") for name in fieldnames)


def plot_metrics(csv_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(csv_path)
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(table["epoch"], table["train_loss"], marker=".", label="train loss")
    loss_axis.plot(table["epoch"], table["val_loss"], marker=".", label="validation loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.legend()
    for column in ("cmap5", "cmap3", "macro_ap", "lrap", "soundscape_cmap5", "soundscape_macro_ap", "test_cmap5"):
        if column in table:
            score_axis.plot(table["epoch"], table[column], marker=".", label=column)
    score_axis.set_xlabel("epoch")
    score_axis.set_ylim(0, 1)
    score_axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


