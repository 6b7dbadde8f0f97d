"""Train a bird-call classifier on BirdCLEF recordings.

    python train.py --loss ce --lr 5e-4                      # the original recipe
    python train.py --no-pretrained --epochs 4               # offline, on the demo data
    torchrun --nproc_per_node 4 train.py --out-dir runs/x    # 4 processes (DDP); --batch-size is per process

Reads top to bottom: arguments, the loss, the schedule, what a step updates
(`learner_lib.Learner`), one training step, evaluation, checkpoints, then the loop (`train`)
and `main`, which sets a run up. Every evaluation (twice per epoch by default)
appends a row to metrics.csv, redraws metrics.png and writes a checkpoint;
--resume continues at the same step with the same random streams, so an
interrupted CPU run logs the same numbers as an uninterrupted one.

Under torchrun each rank trains on its shard of the epoch's single draw with the
model wrapped in DistributedDataParallel, evaluates its share of the validation
windows and gathers everyone's predictions before any metric is computed. Only
rank 0 writes files, logs at INFO and shows progress bars. Every decision that
ends or skips a step (a batch that failed to decode, a non-finite loss, Ctrl-C,
patience) is taken on values all ranks share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import audio
import augment
import data
import distributed
import evaluation
import learner as learner_lib
import loader
import losses
import lr_find
import model as model_lib
import options
import progress
import runfolder
import sampling

log = logging.getLogger("birdclef")

# ----------------------------------------------------------------------------- where training is

@dataclass
class TrainingState:
    """Where training is. The fields from `epoch` to `skipped_nonfinite` travel in every checkpoint."""
    epoch: int = 0
    step_in_epoch: int = 0               # steps (global batches) done in this epoch
    global_step: int = 0
    evaluations: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    patience_counter: int = 0            # evaluations since the best one
    train_loss_sum: float = 0.0          # since the last evaluation: non-zero only in a Ctrl-C checkpoint
    train_loss_count: int = 0
    skipped_nonfinite: int = 0
    step_log: list = field(default_factory=list)   # (global_step, epoch, step_in_epoch, loss, lr) rows for steps.csv
    stop_reason: str | None = None
    out_dir: Path | None = None
    chance: dict | None = None           # metrics of random scores on the validation set
    data_fingerprint: str | None = None  # data.data_fingerprint of the training and validation sets
    amp: str = ""                        # the --amp the steps run with (auto resolved); in every checkpoint

    CHECKPOINTED = ("epoch", "step_in_epoch", "global_step", "evaluations", "best_metric", "best_step",
                    "patience_counter", "train_loss_sum", "train_loss_count", "skipped_nonfinite")

    def load(self, checkpoint: dict) -> None:
        for name in self.CHECKPOINTED:
            setattr(self, name, checkpoint[name])

    def record_step(self, loss: float | None, lr: float) -> None:
        """A step is done: its loss (None: skipped) joins the running mean and steps.csv."""
        if loss is not None:
            self.train_loss_sum += loss
            self.train_loss_count += 1
            self.step_log.append((self.global_step, self.epoch, self.step_in_epoch, loss, lr))
        self.step_in_epoch += 1
        self.global_step += 1

    def update_best(self, value: float, monitor: str, min_delta: float) -> bool:
        """The monitored metric of an evaluation -> whether it is the best so far (patience restarts)."""
        improved = is_improvement(value, self.best_metric, monitor, min_delta)
        if improved:
            self.best_metric, self.best_step, self.patience_counter = value, self.global_step, 0
        else:
            self.patience_counter += 1
        return improved


def is_improvement(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    if monitor.endswith("val_loss"):
        return value < best - min_delta
    return value > best + min_delta


# ----------------------------------------------------------------------------- one training step

def train_step(learner: learner_lib.Learner, batch, state: TrainingState, settings: learner_lib.StepSettings,
               loss_name: str, window_weights: np.ndarray | None = None) -> float | None:
    """One optimiser step -> the loss of the whole (global) batch, or None if the step was skipped.

    Every random choice (augmentation, mixup, dropout) is seeded from (seed, epoch, step, rank),
    so a resumed run draws exactly what the uninterrupted run drew. `window_weights` (N,): the loss
    weight of each row of the training set (--soundscape-weight), None: all 1.
    """
    epoch, step, device = state.epoch, state.step_in_epoch, learner.device
    if distributed.any_rank(batch is None):  # under torchrun every rank takes or skips a step together
        log.warning("epoch %d step %d: no file of the batch could be decoded; step skipped", epoch, step)
        return None
    rank = distributed.rank_and_world_size()[0]  # each rank draws its own augmentation and dropout
    torch.manual_seed(learner_lib.step_seed(settings.seed, epoch, step, rank))
    rng = np.random.default_rng([settings.seed, epoch, step, 1] + ([rank] if rank else []))
    waveforms = audio.as_float(batch["waveform"].to(device, non_blocking=True))  # (B, samples)
    targets = batch["target"].to(device, non_blocking=True)                    # (B, C)
    if window_weights is not None:
        # the weight rides along as a last target column, so every augmentation that mixes targets
        # (mixup, cutmix, mix_clips) mixes the weights the same way
        weights = torch.from_numpy(window_weights[batch["index"].numpy()]).to(device)
        targets = torch.cat([targets, weights[:, None]], dim=1)                # (B, C + 1)
    waveforms, targets = augment.augment_waveforms(waveforms, targets, learner.augment, rng, learner.background)
    waveforms, targets = augment.mixup(waveforms, targets, settings.mixup_alpha, settings.mixup_prob, rng)
    weights = None
    if window_weights is not None:
        targets, weights = targets[:, :-1], targets[:, -1]                    # (B, C), (B,)
    for group in learner.optimizer.param_groups:
        group["lr"] = learner.schedule(state.global_step)
    autocast_on, autocast_dtype, _ = learner_lib.precision_settings(settings.amp, device)
    spec_augment = functools.partial(augment.augment_images, settings=learner.augment, rng=rng)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_on):
        logits = learner.trainer(waveforms, image_augment=spec_augment)    # SpecAugment on (B, 1, n_mels, T)
    loss = (losses.batch_loss(logits, targets, settings.loss, loss_name) if weights is None   # this rank's mean
            else losses.batch_loss(logits, targets, settings.loss, loss_name, weights))
    global_loss = distributed.mean_over_ranks(loss.detach())               # the whole batch's mean
    learner.optimizer.zero_grad(set_to_none=True)
    problem = None if torch.isfinite(global_loss) else f"non-finite training loss ({global_loss.item()})"
    if problem is None:
        learner.scaler.scale(loss).backward()
        problem = check_gradients(learner, settings.clip_grad_norm)
    if problem is not None:
        skip_or_stop(problem, state, settings.skip_nonfinite, batch["path"])
        learner.optimizer.zero_grad(set_to_none=True)
        return None
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return global_loss.item()


def check_gradients(learner: learner_lib.Learner, clip_grad_norm: float) -> str | None:
    """Unscale and clip; return a description if the gradient norm is not finite.

    With fp16 and a GradScaler, inf gradients are routine (the scaler skips that step
    and lowers its scale), so only the unscaled, non-fp16 case is treated as a fault.
    """
    if learner.scaler.is_enabled():
        if clip_grad_norm > 0:
            learner.scaler.unscale_(learner.optimizer)
            torch.nn.utils.clip_grad_norm_(learner.model.parameters(), clip_grad_norm)
        return None
    max_norm = clip_grad_norm if clip_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), max_norm)  # (also the check's cost)
    return None if torch.isfinite(norm) else f"non-finite gradient norm ({norm.item()})"


def skip_or_stop(problem: str, state: TrainingState, skip_nonfinite: int, paths) -> None:
    """--skip-nonfinite K: skip up to K bad batches, logging each; otherwise stop naming the files."""
    where = f"epoch {state.epoch} step {state.step_in_epoch}; batch files: {', '.join(paths)}"
    if state.skipped_nonfinite < skip_nonfinite:
        state.skipped_nonfinite += 1
        log.warning("skipping batch %d of at most %d with a %s at %s", state.skipped_nonfinite,
                    skip_nonfinite, problem, where)
        return
    raise losses.NonFiniteLossError(f"{problem} at {where}")


def evaluate_and_save(learner: learner_lib.Learner, validation: evaluation.Validation, state: TrainingState,
                      settings: options.TrainingSettings, loss_name: str, steps_per_epoch: int) -> None:
    """An evaluation point: evaluate -> best and patience -> metrics.csv, steps.csv, plot -> checkpoint."""
    state.evaluations += 1
    run = settings.run
    results = evaluation.evaluate_all(learner.model, learner.ema, validation, loss_name, learner.device)
    row = {"evaluation": state.evaluations,
           "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4),
           "global_step": state.global_step,
           # NaN, not 0, when every step since the last evaluation was skipped (--skip-nonfinite)
           "train_loss": state.train_loss_sum / state.train_loss_count if state.train_loss_count else float("nan"),
           "lr": learner.optimizer.param_groups[0]["lr"], **results, **evaluation.chance_columns(validation)}
    state.train_loss_sum, state.train_loss_count = 0.0, 0
    improved = state.update_best(results[run.monitor], run.monitor, run.min_delta)
    if distributed.is_main_process():
        checkpoint = make_checkpoint(learner, settings.config, state)
        runfolder.write_evaluation(state.out_dir, row, state.step_log, checkpoint, improved, run.monitor,
                                   run.keep_best, run.keep_last)
    state.step_log.clear()
    log.info("epoch %.2f  train_loss %.4f  val_loss %.4f  cmAP5 %.4f  cmAP3 %.4f  macroAP %.4f  LRAP %.4f%s%s",
             row["epoch"], row["train_loss"], row["val_loss"], row["cmap5"], row["cmap3"],
             row["macro_ap"], row["lrap"],
             (f"  EMA cmAP5 {row['ema_cmap5']:.4f}" if learner.ema is not None else "")
             + (f"  soundscape cmAP5 {row['soundscape_cmap5']:.4f} macroAP {row['soundscape_macro_ap']:.4f}"
                if validation.soundscapes is not None else "")
             + (f"  test cmAP5 {row['test_cmap5']:.4f}" if validation.test_soundscapes is not None else ""),
             "  (best)" if improved else "")


# ----------------------------------------------------------------------------- checkpoints

def make_checkpoint(learner: learner_lib.Learner, config: dict, state: TrainingState) -> dict:
    """A plain dict of state_dicts and plain values, loadable with weights_only=True."""
    checkpoint = {
        "format": model_lib.CHECKPOINT_FORMAT,
        "model": learner.model.state_dict(),
        "model_config": learner.model.config,
        "labels": list(learner.model.labels),
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "args": config,                                      # every resolved argument (config.json)
        **{name: getattr(state, name) for name in TrainingState.CHECKPOINTED},
        "world_size": distributed.rank_and_world_size()[1],  # step_in_epoch counts global batches
        "data_fingerprint": state.data_fingerprint,          # a resume on other data is refused
        "amp_resolved": state.amp,                           # what --amp auto chose: a resume keeps it
    }
    if learner.ema is not None:  # the averaged weights, loadable with load_model(path, ema=True)
        checkpoint["model_ema"] = learner.ema.module.state_dict()
        checkpoint["ema_updates"] = int(learner.ema.n_averaged)
    return checkpoint


def save_step_checkpoint(learner: learner_lib.Learner, state: TrainingState, config: dict, keep_last: int) -> None:
    """A checkpoint between evaluation points (Ctrl-C), with the steps since the last evaluation."""
    if distributed.is_main_process():
        runfolder.append_steps(state.out_dir / "steps.csv", state.step_log)
        runfolder.save_checkpoint(state.out_dir, make_checkpoint(learner, config, state), keep_last)
    state.step_log.clear()


class CtrlC:
    """Ctrl-C during training: finish the step in flight, save a checkpoint there, then stop.
    A second Ctrl-C quits at once. Signals reach only the main thread; elsewhere this does nothing."""

    def __enter__(self) -> CtrlC:
        self.requested = False
        self.installed = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signal.SIGINT, self.request) if self.installed else None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)

    def request(self, signum, frame) -> None:
        log.warning("Ctrl-C: saving a checkpoint after the current step (press again to quit at once)")
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------- the loop

def train(learner: learner_lib.Learner, train_set, validation: evaluation.Validation, state: TrainingState,
          settings: options.TrainingSettings, ctrl_c: CtrlC) -> None:
    """Epochs of steps until --epochs, patience, --max-steps or Ctrl-C. Each step:
    step -> (at an evaluation point) evaluate -> log -> checkpoint -> patience/stop."""
    run, batch_settings = settings.run, settings.loader
    # per-window loss weights only when some window has another weight than 1 (--soundscape-weight confidence)
    weights = getattr(train_set, "weights", None)
    window_weights = weights if weights is not None and (weights != 1).any() else None
    while state.epoch < run.epochs and state.stop_reason is None:
        epoch, loss_name = state.epoch, settings.step.loss.at_epoch(state.epoch)
        frozen = learner_lib.frozen_parts(settings.learner, epoch)                  # (backbone, head)
        learner_lib.set_activation(learner, loss_name)
        learner_lib.set_train_mode(learner.model, *frozen)
        batches = loader.epoch_batches(train_set, batch_settings, epoch, state.step_in_epoch)
        evaluation_points = {max(1, round(batches.steps * k / run.evals_per_epoch))
                             for k in range(1, run.evals_per_epoch + 1)}
        bar = progress.bar(loader.training_loader(train_set, batch_settings, learner.device, batches),
                           total=len(batches), desc=f"epoch {epoch}", unit="step", every=run.log_every)
        for batch in bar:
            loss = train_step(learner, batch, state, settings.step, loss_name, window_weights)
            state.record_step(loss, learner.optimizer.param_groups[0]["lr"])
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
            evaluation_point = (state.step_in_epoch in evaluation_points
                                or bool(run.max_steps and state.global_step >= run.max_steps))
            if state.step_in_epoch == batches.steps:       # the one place an epoch ends
                finish_epoch(state, train_set, batches.draw, batch_settings.batch_size)
            if evaluation_point:
                evaluate_and_save(learner, validation, state, settings, loss_name, batches.steps)
                learner_lib.set_train_mode(learner.model, *frozen)
            state.stop_reason = stop_reason(state, run, evaluation_point, ctrl_c)
            if state.stop_reason is not None:
                if not evaluation_point:                   # an evaluation point has saved this step already
                    save_step_checkpoint(learner, state, settings.config, run.keep_last)
                break


def finish_epoch(state: TrainingState, train_set, draw, batch_size: int) -> None:
    """drawn_counts.csv gets the species the epoch drew (rank 0); the state moves to the start of
    the next epoch, where this step's checkpoint resumes."""
    if distributed.is_main_process():
        counter = sampling.DrawCounter(len(train_set))
        counter.add(draw[:state.step_in_epoch * batch_size * distributed.rank_and_world_size()[1]])
        with runfolder.writing(state.out_dir / "drawn_counts.csv"):
            sampling.append_drawn_counts(state.out_dir / "drawn_counts.csv",
                                         counter.to_frame(train_set.primary_labels, state.epoch))
    state.epoch, state.step_in_epoch = state.epoch + 1, 0


def stop_reason(state: TrainingState, run: options.RunSettings, evaluated: bool, ctrl_c: CtrlC) -> str | None:
    """The one place that decides whether training stops after this step, and says why."""
    if evaluated and run.patience and state.patience_counter >= run.patience:
        return (f"{run.monitor} did not improve by more than {run.min_delta} for {run.patience} evaluations "
                f"(best {state.best_metric:.4f} at step {state.best_step})")
    if evaluated and run.max_steps and state.global_step >= run.max_steps:
        return f"reached --max-steps {run.max_steps}"
    if distributed.any_rank(ctrl_c.requested):  # shared: Ctrl-C may reach only some ranks
        return (f"interrupted: saved checkpoint_step{state.global_step:08d}.pt; continue with --resume auto "
                f"--out-dir {state.out_dir}")
    return None


# ----------------------------------------------------------------------------- setting a run up

def main(args):
    """Train -> the final TrainingState (with --audit-sampling or --lr-find: a dict of what they found).
    Under torchrun, every rank runs this. Nothing is written before the arguments and the weights are
    known to be usable."""
    options.resolve_deprecated(args)
    options.check_arguments(args)
    model_lib.check_model(options.model_settings(args))   # one forward on silence: a backbone that cannot work stops here
    device = distributed.local_device(args.device)
    with flush_denormal(args.flush_denormal), distributed.process_group(device):
        world_size = distributed.rank_and_world_size()[1]
        continuing = args.resume == "auto"
        checkpoint = checkpoint_to_resume(args)               # sets --resume (auto) and --out-dir (its folder)
        if checkpoint is None:
            learner_lib.check_pretrained_weights(args.backbone, args.pretrained, args.pretrained_file)
        else:
            options.check_resume(checkpoint, args, world_size)  # may keep the schedule's length
        settings = options.training_settings(args)
        out_dir = make_run_folder(args, checkpoint, continuing)
        main_process = distributed.is_main_process()
        fresh = main_process and checkpoint is None and not continuing
        with runfolder.undone_if_setup_fails(out_dir, fresh) as setup, runfolder.locked(out_dir, main_process), \
                runfolder.log_file(out_dir / "train.log", main_process):
            if main_process:
                runfolder.write_config(out_dir, settings.config)
                if checkpoint is not None:
                    runfolder.set_aside_later_checkpoints(out_dir, checkpoint["global_step"])
            # the data: the datasets (the same as the resumed run's) and what the sampler will draw
            labels, train_set, val_set = data.build_datasets(settings.data, out_dir)
            fingerprint = check_resumed_data(checkpoint, labels, train_set, val_set, args.resume, args.data_dir)
            audit_table, audit = audit_sampling(train_set, settings.loader, out_dir)
            if args.audit_sampling:
                return {"audit": audit, "audit_table": audit_table, "out_dir": out_dir}
            # the model with its optimiser, scaler and EMA (restored when resumed)
            steps_per_epoch = steps_in_epoch(audit["epoch_length"], args.batch_size, world_size)
            learner = learner_lib.build_learner(settings.learner, labels, device, steps_per_epoch, checkpoint)
            amp = resolved_amp(settings.step.amp, checkpoint, learner.model, device, args.batch_size)
            settings = dataclasses.replace(settings, step=dataclasses.replace(settings.step, amp=amp))
            if args.lr_find:
                if world_size > 1:
                    raise ValueError("--lr-find runs in one process: start it without torchrun")
                return {"suggested_lr": lr_find.find_learning_rate(learner, train_set, settings.loader,
                                                                   settings.step.loss, args.lr_find_steps, out_dir),
                        "out_dir": out_dir}
            # the loop, with its evaluation and checkpoint points
            state = TrainingState(out_dir=out_dir, data_fingerprint=fingerprint, amp=amp)
            if checkpoint is not None:
                state.load(checkpoint)
                log.info("resumed from %s at epoch %d step %d", args.resume, state.epoch, state.step_in_epoch)
            if main_process:
                runfolder.start_logs(out_dir, checkpoint)
            validation = evaluation.build_validation(learner.model, val_set, settings.validation, device)
            state.chance = validation.chance
            started, setup.started = time.time(), True
            with CtrlC() as ctrl_c:
                train(learner, train_set, validation, state, settings, ctrl_c)
            log.info("stopped: %s; %.0f s; best %s %.4f; run folder %s", state.stop_reason or f"completed "
                     f"{args.epochs} epochs", time.time() - started, args.monitor,
                     state.best_metric if state.best_metric is not None else float("nan"), out_dir)
            state.stop_reason = state.stop_reason or "epochs"
            return state


@contextlib.contextmanager
def flush_denormal(enabled: bool):
    """--flush-denormal: denormal floats flushed to zero on the CPU for the body (process-wide, so undone after)."""
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def check_resumed_data(checkpoint: dict | None, labels, train_set, val_set, resume: str | None, data_dirs) -> str:
    """The data's fingerprint; a resumed run must find the data its checkpoint was trained on."""
    fingerprint = data.data_fingerprint(labels, train_set, val_set)
    if checkpoint is not None and checkpoint["labels"] != labels:
        raise ValueError(f"{resume} was trained on another label list than {' '.join(data_dirs)}")
    if checkpoint is not None and checkpoint.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(f"{resume} was trained on other data: the recordings, their labels, the split or the "
                         f"training windows of {' '.join(data_dirs)} changed since (a metadata row added or "
                         f"removed, a file now unreadable: see bad_files.csv). Restore them, or start a new run")
    return fingerprint


def steps_in_epoch(epoch_length: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps in an epoch of `epoch_length` draws (a partial last batch is dropped)."""
    steps = epoch_length // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"--batch-size {batch_size} x {world_size} process(es) is larger than an epoch's "
                         f"{epoch_length} draws")
    return steps


def checkpoint_to_resume(args) -> dict | None:
    """--resume PATH or auto (the newest complete checkpoint in --out-dir) -> the checkpoint, or None.
    Sets --resume to the file chosen and --out-dir, if not given, to its folder."""
    if args.resume == "auto":
        if not args.out_dir:
            raise ValueError("--resume auto needs --out-dir (the run folder to continue)")
        try:
            args.resume = str(runfolder.newest_complete_checkpoint(Path(args.out_dir)))
            log.info("--resume auto: continuing from %s", args.resume)
        except FileNotFoundError:  # killed before its first checkpoint: nothing to continue
            args.resume = None
            log.info("--resume auto: no checkpoint in %s yet, starting from the beginning", args.out_dir)
    checkpoint = model_lib.read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None and "optimizer" not in checkpoint:
        raise ValueError(f"{args.resume} holds weights only (python model.py export): it cannot be resumed; start "
                         f"a new run from it with --init-from")
    if checkpoint is not None and args.out_dir is None:
        args.out_dir = str(Path(args.resume).resolve().parent)
    return checkpoint


def resolved_amp(amp: str, checkpoint: dict | None, model, device: torch.device, batch_size: int) -> str:
    """--amp as the steps run it. On the CPU, auto is timed (learner.measured_amp: bf16 only where its
    training steps are faster here, cached per CPU); a resumed run keeps what its checkpoint trained with,
    so a resume stays exact; under torchrun bf16 only if every rank chose it."""
    if amp != "auto" or device.type != "cpu":
        return amp
    chosen = (checkpoint or {}).get("amp_resolved") or learner_lib.measured_amp(amp, model, device, batch_size)
    return "off" if distributed.any_rank(chosen != "bf16") else chosen


def make_run_folder(args, checkpoint: dict | None, continuing: bool) -> Path:
    """--out-dir (default runs/<date-time>), claimed for this run: a folder holding files is refused
    unless the run continues it (--resume auto, or --resume of a checkpoint in it) or --overwrite
    moves them aside."""
    world_size = distributed.rank_and_world_size()[1]
    if args.out_dir is None and world_size > 1:
        raise ValueError("under torchrun give --out-dir: every rank must use the same run folder")
    out_dir = Path(args.out_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    continuing = continuing or (checkpoint is not None and Path(args.resume).resolve().parent == out_dir.resolve())
    runfolder.claim_folder(out_dir, continuing, args.overwrite, move_aside=distributed.is_main_process())
    distributed.barrier()                 # the other ranks wait until rank 0 has moved old files aside
    out_dir.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        log.info("torchrun: %d processes (%s), --batch-size %d per process = %d per step", world_size,
                 dist.get_backend(), args.batch_size, args.batch_size * world_size)
    return out_dir


def audit_sampling(train_set, settings: loader.LoaderSettings, out_dir: Path):
    """What --sampler (and --soundscape-share) does to an epoch: logged, and written to sampling_audit.csv
    -> (table, summary)."""
    soundscape = getattr(train_set, "soundscape", np.zeros(len(train_set), bool))
    recordings = int((~soundscape).sum())                     # the soundscape windows come last
    extras = train_set.extras[:recordings] if train_set.extras.any() else None
    audit_table, audit = sampling.sampling_audit(train_set.primary_labels[:recordings], settings.sampler,
                                                 settings.cap_per_class, extras=extras)
    if soundscape.any():
        audit_table, audit = sampling.add_soundscape_windows(
            audit_table, audit, int(soundscape.sum()),
            sampling.soundscape_windows_per_batch(settings.soundscape_share, settings.batch_size),
            settings.batch_size, distributed.rank_and_world_size()[1])
    if distributed.is_main_process():
        with runfolder.writing(out_dir / "sampling_audit.csv"):
            sampling.write_sampling_audit(audit_table, out_dir / "sampling_audit.csv")
    for line in sampling.format_sampling_audit(audit_table, audit, settings.sampler).splitlines():
        (log.warning if line.startswith("WARNING") else log.info)("%s", line)
    return audit_table, audit


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(options.parse_args())
    except (model_lib.PretrainedWeightsError, model_lib.CheckpointError, losses.NonFiniteLossError, FloatingPointError,
            runfolder.CheckpointSaveError, FileNotFoundError, FileExistsError, ValueError) as error:
        log.error("%s", error)
        sys.exit(1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("could not write %s (%s); the files written before are intact: free some space and continue "
                  "with --resume auto", error.filename, error.strerror)
        sys.exit(1)
