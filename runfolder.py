"""The run folder: checkpoints written atomically, keep-last-N from the files on disk, and the logs.

What a run writes (README, "What a run writes"): config.json, metrics.csv (one row
per evaluation), steps.csv (one row per optimiser step), metrics.png, drawn_counts.csv,
sampling_audit.csv, bad_files.csv, checkpoint_stepNNNNNNNN.pt and best.pt. Logs are
appended at each evaluation before its checkpoint is written; on resume they are cut
back to what the checkpoint had reached, so a kill at any moment never duplicates
or loses a row.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import torch

import model as model_lib

log = logging.getLogger("birdclef")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_step(\d+)\.pt$")


# ----------------------------------------------------------------------------- checkpoints and config


class CheckpointSaveError(RuntimeError):
    """A file of the run folder could not be written (full disk, permissions); earlier ones are untouched."""


def _space_needed(path: Path, bytes_needed: int | None) -> str:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    needed = f"{bytes_needed / 1e6:.1f} MB needed, " if bytes_needed else ""
    return f"{needed}{free / 1e6:.1f} MB free on its disk"


@contextlib.contextmanager
def writing(path: Path, bytes_needed: int | None = None):
    """Any failure to write `path` (a full disk: OSError, or torch's RuntimeError from its zip writer)
    becomes one CheckpointSaveError naming the file and the space, with what to do next."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(word in str(error) for word in ("write", "unexpected pos")):
            raise                                       # not a write failure
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise CheckpointSaveError(
            f"could not write {path} ({reason}; {_space_needed(path, bytes_needed)}); the files written before are "
            f"intact: free some space and continue with --resume auto") from error


def checkpoint_bytes(payload: dict) -> int:
    """About what torch.save writes: the bytes of every tensor in the checkpoint."""
    total = 0
    for value in payload.values():
        if isinstance(value, dict):
            total += checkpoint_bytes(value)
        elif torch.is_tensor(value):
            total += value.numel() * value.element_size()
    return total


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then os.replace: never a half file.

    A kill at any moment leaves either the old file or the new one; a failed write
    (a full disk) removes the temporary file and leaves the earlier checkpoints as they were.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path, checkpoint_bytes(payload)):
            with open(temporary, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# ----------------------------------------------------------------------------- one folder, one run

LOCK = ".lock"


def claim_folder(out_dir: Path, resuming: bool, overwrite: bool, move_aside: bool = True) -> None:
    """A run folder belongs to one run: an existing one with files in it is refused unless the run
    resumes it, or --overwrite moves its files aside (to <folder>.previous-N, never deleting them).
    Under torchrun every rank checks (so all refuse together) and only rank 0 moves (`move_aside`)."""
    if not out_dir.is_dir() or resuming or not any(path.name != LOCK for path in out_dir.iterdir()):
        return
    if not overwrite:
        names = ", ".join(sorted(path.name for path in out_dir.iterdir())[:5])
        raise FileExistsError(f"{out_dir} already holds files ({names}, ...): continue that run with --resume auto, "
                              f"choose another --out-dir, or pass --overwrite to move them aside")
    owner = live_owner(out_dir)
    if owner:      # moving a live run's folder aside would leave two runs writing one metrics.csv
        raise FileExistsError(f"{out_dir} is in use by a running process (pid {owner}): --overwrite moves a "
                              f"folder aside only when no run is using it; wait for it, or choose another --out-dir")
    if not move_aside:
        return
    aside = next(out_dir.with_name(f"{out_dir.name}.previous-{n}") for n in range(1, 10_000)
                 if not out_dir.with_name(f"{out_dir.name}.previous-{n}").exists())
    out_dir.rename(aside)
    log.warning("--overwrite: moved the files of %s to %s", out_dir, aside)


@contextlib.contextmanager
def locked(out_dir: Path, enabled: bool = True, holder: str = "training process", other: str = "--out-dir"):
    """A lock file with this process's id while the run lasts: a second process on the same folder is
    refused (the message names the `holder` and the flag to change, `other`). A lock left by a process
    that no longer exists (killed) is taken over."""
    if not enabled:
        yield
        return
    lock = out_dir / LOCK
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = live_owner(out_dir)
            if owner:
                raise FileExistsError(f"{out_dir} is in use by another {holder} (pid {owner}); wait for "
                                      f"it, or choose another {other}") from None
            lock.unlink(missing_ok=True)         # left by a killed run
    else:
        raise FileExistsError(f"could not lock {out_dir}")
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


class SetupGuard:
    """What `undone_if_setup_fails` yields: set `started` once the run has begun training."""
    started = False


@contextlib.contextmanager
def undone_if_setup_fails(out_dir: Path, enabled: bool = True):
    """A fresh run that fails before training starts (a bad table, an unreadable folder: errors found
    only once the data is read) removes what it wrote (config.json, train.log, sampling_audit.csv), so
    the corrected command is not refused for a folder "already holding files". A failure once training
    has started keeps everything: its logs say what went wrong."""
    out_dir = Path(out_dir)
    guard = SetupGuard()
    before = set(out_dir.iterdir()) if enabled and out_dir.is_dir() else set()
    try:
        yield guard
    except BaseException:
        if enabled and not guard.started and out_dir.is_dir():
            written = sorted(set(out_dir.iterdir()) - before)
            for path in written:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            if not before and not any(out_dir.iterdir()):
                out_dir.rmdir()
            log.warning("the run stopped before training: removed what it had written in %s (%s)", out_dir,
                        ", ".join(path.name for path in written) or "nothing")
        raise


def live_owner(out_dir: Path) -> int:
    """The id of the live process holding out_dir's lock, or 0 (no lock, or one left by a killed process)."""
    lock = Path(out_dir) / LOCK
    try:
        owner = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):           # absent, or half written by a process being started
        return 0
    return owner if owner and _alive(owner) else 0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False                                   # left by an earlier run in this same process
    try:
        os.kill(pid, 0)                                # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Settings a resumed run may change (README, "Resume"): where and how fast it runs, how long, how often
# it evaluates and what it keeps. Every other setting (model, frontend, loss, optimiser, schedule,
# data, sampling, augmentation, seed) must equal the checkpoint's, or the run would continue with
# weights, optimiser state or random streams that belong to other settings.
CHANGEABLE_ON_RESUME = (
    "data_dir", "cache", "workers", "strict", "device", "amp", "compile", "channels_last", "flush_denormal",
    "epochs", "max_steps", "patience", "min_delta", "evals_per_epoch", "keep_last", "keep_best", "log_every",
    "val_soundscapes", "val_soundscape_audio", "test_soundscapes", "test_soundscape_audio", "soundscape_audio",
    "out_dir", "resume", "overwrite", "config", "audit_sampling", "lr_find", "lr_find_steps",
    "pretrained", "pretrained_file", "init_from",           # the weights come from the checkpoint
)


def check_resume_settings(checkpoint: dict, config: dict, resume: str, world_size: int = 1) -> float | None:
    """Refuse a resume whose settings (`config`: this run's plain arguments) differ from the checkpoint's,
    naming each difference; or whose number of processes does (a step there is another number of
    examples). -> the schedule length in epochs the run must keep, where --epochs changed without
    --schedule-epochs (else None)."""
    if checkpoint.get("world_size", 1) != world_size:
        raise ValueError(f"{resume} was written by {checkpoint.get('world_size', 1)} process(es) and this run "
                         f"has {world_size}: a step there is another number of examples, so resume with "
                         f"--nproc_per_node {checkpoint.get('world_size', 1)}")
    saved, now = checkpoint.get("args", {}), dict(config)
    # without --schedule-epochs the schedule's length is --epochs, which may change on resume: the length
    # the run's curve was made with is kept (given again, it must be that length)
    kept_schedule = saved.get("schedule_epochs") or saved.get("epochs")
    if "schedule_epochs" in saved:
        saved = saved | {"schedule_epochs": kept_schedule}
        now["schedule_epochs"] = now.get("schedule_epochs") or kept_schedule
    differences = [f"--{name.replace('_', '-')} {saved[name]!r} -> {now[name]!r}" for name in sorted(now)
                   if name in saved and name not in CHANGEABLE_ON_RESUME and not _same(saved[name], now[name])]
    if differences:
        raise ValueError(f"{resume} was trained with other settings: {'; '.join(differences)}. Resume with the "
                         f"checkpoint's settings (its config.json), or start a new run in another --out-dir")
    if "schedule_epochs" in saved and config.get("schedule_epochs") is None and kept_schedule != config["epochs"]:
        log.info("--epochs %s on resume: the learning-rate schedule keeps its length of %s epochs "
                 "(--schedule-epochs %s)", config["epochs"], kept_schedule, kept_schedule)
        return kept_schedule
    return None


def _same(saved, now) -> bool:
    return json.dumps(saved, sort_keys=True) == json.dumps(now, sort_keys=True)   # a tuple equals its list


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


ABANDONED = "abandoned-"


def set_aside_later_checkpoints(out_dir: Path, step: int) -> list[Path]:
    """A run resumed from the checkpoint of `step` abandons the branch that went past it: that branch's
    checkpoint_stepN.pt and best-stepN.pt (N > step) are renamed abandoned-<name> -- kept, never deleted,
    but no longer what --resume auto, pruning or --keep-best take for this run's. Without this, --resume
    auto after a manual --resume OLD.pt picked the abandoned branch's newer checkpoint. best.pt stays
    (a run folder always has one for infer.py); a warning says when that branch wrote it. -> the renamed files."""
    later = [path for path in out_dir.iterdir()
             if (match := CHECKPOINT_PATTERN.match(path.name) or BEST_PATTERN.match(path.name))
             and int(match.group(1)) > step]
    for path in later:
        os.replace(path, path.with_name(ABANDONED + path.name))   # a later abandoned branch replaces an earlier one's
    if later:
        log.warning("resumed at step %d: %d checkpoint(s) of the branch that went past it are now %s<name> in %s",
                    step, len(later), ABANDONED, out_dir)
    best = out_dir / "best.pt"
    try:
        best_step = model_lib.read_checkpoint(best).get("global_step", -1) if best.is_file() else -1
    except model_lib.CheckpointError:
        best_step = -1
    if best_step > step:
        log.warning("best.pt is from step %d of the abandoned branch: it stays until this run evaluates better",
                    best_step)
    return later


def save_checkpoint(out_dir: Path, checkpoint: dict, keep_last: int, best: bool = False) -> Path:
    """best.pt when `best`, then checkpoint_step<global step>.pt, then prune to the newest `keep_last`.
    The step checkpoint is written last because it is where a resume starts: if best.pt cannot be
    written, the resume repeats this evaluation and writes it then."""
    path = out_dir / f"checkpoint_step{checkpoint['global_step']:08d}.pt"
    if best:
        save_atomic(checkpoint, out_dir / "best.pt")
    save_atomic(checkpoint, path)
    prune_checkpoints(out_dir, keep_last, checkpoint["global_step"])
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


def prune_checkpoints(out_dir: Path, keep_last: int, step: int | None = None) -> None:
    """Keep the newest `keep_last` periodic checkpoints at or below `step` (this run's current one;
    default: all); works from the files on disk, so restarts prune too. A checkpoint past `step`
    (left by a branch a resume from an older checkpoint abandoned) is never touched."""
    existing = [path for path in periodic_checkpoints(out_dir)
                if step is None or int(CHECKPOINT_PATTERN.match(path.name).group(1)) <= step]
    for path in existing[:max(len(existing) - max(keep_last, 1), 0)]:
        path.unlink()


def write_config(out_dir: Path, config: dict) -> None:
    """config.json: every resolved argument (a plain dict)."""
    path = out_dir / "config.json"
    with writing(path):
        path.write_text(json.dumps(config, indent=2) + "\n")


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
                     monitor: str, keep_best_count: int, keep_last: int) -> None:
    """One evaluation: its metrics row, the steps since the last one, the plot, --keep-best's file,
    then the checkpoint. Logs first, checkpoint last: a crash or a full disk in between leaves rows
    and files that the resume from the previous checkpoint writes again, never a gap."""
    append_metrics(out_dir / "metrics.csv", row)
    append_steps(out_dir / "steps.csv", step_rows)
    with writing(out_dir / "metrics.png"):
        plot_metrics(out_dir / "metrics.csv", out_dir / "metrics.png", monitor)
    if keep_best_count:
        keep_best(out_dir, checkpoint, monitor, keep_best_count)
    save_checkpoint(out_dir, checkpoint, keep_last, best=improved)


def append_metrics(path: Path, row: dict) -> None:
    """One row of metrics.csv; its columns follow from the row (EMA and soundscape ones when present)."""
    columns = metric_columns("ema_val_loss" in row, "soundscape_cmap5" in row, "test_cmap5" in row)
    with writing(path), open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if handle.tell() == 0:          # new, or emptied by a resume after a full disk cut its header
            writer.writeheader()
        writer.writerow({key: row[key] for key in columns})


STEP_COLUMNS = ["global_step", "epoch", "step_in_epoch", "loss", "lr"]


def append_steps(path: Path, rows: list[tuple]) -> None:
    """Per-step training losses, flushed at each evaluation (so they match the checkpoints)."""
    with writing(path), open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if handle.tell() == 0:
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
        if column not in fieldnames:     # empty, or cut short before its header (a full disk): start it again
            path.unlink()
            return
        rows = []
        for line, row in enumerate(reader, start=2):
            if not is_complete_row(row, fieldnames):
                continue
            try:
                step = int(row[column])
            except ValueError:
                raise ValueError(f"{path} line {line}: {column} is {row[column]!r}, not a number; remove that line "
                                 f"and resume again") from None
            if step <= last:
                rows.append(row)
    temporary = path.with_name(f".{path.name}.tmp")
    with writing(path):
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)


def is_complete_row(row: dict, fieldnames: list[str]) -> bool:
    """A line torn by a kill has missing fields (or, as DictReader says, surplus ones under None)."""
    return None not in row and all(row.get(name) not in (None, "") for name in fieldnames)


def best_row(metrics: pd.DataFrame, column: str) -> pd.Series | None:
    """The evaluation with the best value of `column` (lowest for losses; the first of equals)."""
    if column not in metrics or metrics[column].isna().all():
        return None
    values = metrics[column]
    return metrics.loc[values.idxmin() if column.endswith("val_loss") else values.idxmax()]


def plot_metrics(csv_path: Path, png_path: Path, monitor: str = "cmap5") -> dict:
    """Losses (left), scores with their chance levels and the best evaluation by `monitor` marked (middle
    for scores, left for losses: the evaluation best.pt holds), and the
    learning rate (right), against the epoch; score axes fitted to the data, not fixed at 0-1.
    -> what the panels show: the score panel's legend labels and y limits, the loss panel's labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(csv_path)
    figure, (loss_axis, score_axis, lr_axis) = plt.subplots(1, 3, figsize=(15, 4))
    loss_axis.plot(table["epoch"], table["train_loss"], marker=".", label="train loss")
    loss_axis.plot(table["epoch"], table["val_loss"], marker=".", label="validation loss")
    loss_axis.set_xlabel("epoch")
    levels = []
    for index, column in enumerate(("cmap5", "cmap3", "macro_ap", "lrap", "soundscape_cmap5", "soundscape_macro_ap",
                                    "test_cmap5")):
        if column in table:
            score_axis.plot(table["epoch"], table[column], marker=".", label=column, color=f"C{index}")
            levels += list(table[column])
            chance = {"cmap5": "chance_cmap5", "soundscape_cmap5": "soundscape_chance_cmap5",
                      "test_cmap5": "test_chance_cmap5"}.get(column)
            if chance in table:
                score_axis.axhline(table[chance].iloc[-1], color=f"C{index}", linestyle=":", linewidth=1,
                                   label=f"{column}, random scores")
                levels.append(table[chance].iloc[-1])
    best = best_row(table, monitor)
    if best is not None:
        axis = loss_axis if monitor.endswith("val_loss") else score_axis
        axis.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1,
                     label=f"best {monitor}, step {int(best['global_step'])}")
    if levels:
        low, high = min(levels), max(levels)
        margin = max((high - low) * 0.05, 0.01)
        score_axis.set_ylim(low - margin, high + margin)
    score_axis.set_xlabel("epoch")
    score_axis.legend(fontsize="x-small")
    loss_axis.legend()
    lr_axis.plot(table["epoch"], table["lr"], marker=".")
    lr_axis.set_xlabel("epoch")
    lr_axis.set_ylabel("learning rate at the evaluation")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    shown = {"labels": [line.get_label() for line in score_axis.get_lines()], "limits": score_axis.get_ylim(),
             "loss_labels": [line.get_label() for line in loss_axis.get_lines()]}
    plt.close(figure)
    return shown


@contextlib.contextmanager
def log_file(path: Path, enabled: bool = True):
    """The project's log lines also go to `path` (train.log, appended across resumes) while the block runs."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("birdclef")
    logger.addHandler(handler)
    previous_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)   # the file holds the INFO lines even when the console does not
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()
