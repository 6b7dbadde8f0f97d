"""Train a bird-call classifier on BirdCLEF recordings.

    python train.py --loss ce --lr 5e-4                      # the original recipe
    python train.py --no-pretrained --epochs 4               # offline, on the demo data
    torchrun --nproc_per_node 4 train.py --out-dir runs/x    # 4 processes (DDP); --batch-size is per process

Reads top to bottom: arguments, the loss, one training epoch, evaluation,
checkpoints, then main() which wires them together. Every evaluation (twice per
epoch by default) appends a row to metrics.csv, redraws metrics.png and writes a
checkpoint; --resume continues at the same step with the same random streams,
so an interrupted CPU run logs the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import distributed
import metrics
import model as model_lib

log = logging.getLogger("birdclef")

MONITORED = ("cmap5", "cmap3", "macro_ap", "lrap", "val_loss",
             "ema_cmap5", "ema_cmap3", "ema_macro_ap", "ema_lrap", "ema_val_loss",
             "soundscape_cmap5", "soundscape_cmap3", "soundscape_macro_ap", "soundscape_lrap")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a BirdCLEF bird-call classifier.",
                                     add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", nargs="+", default=[str(data.DEMO_DIR)],
                       help="one or more BirdCLEF folders (the 2021-2025 layouts are recognised); several "
                            "are merged: the vocabulary is their union and a xeno-canto recording in more "
                            "than one is used once. The default demo folder is generated on first use")
    group.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each species' recordings held out (ignored with --folds)")
    group.add_argument("--folds", type=int, default=0, help="K-fold split when > 1")
    group.add_argument("--fold", type=int, default=0, help="which fold is validation, with --folds")
    group.add_argument("--crop-policy", choices=data.CROP_POLICIES, default="ends",
                       help="ends: random window inside the first or last --ends-seconds (the "
                            "original recipe); random: anywhere in the recording")
    group.add_argument("--ends-seconds", type=float, default=8.0, help="length of the 'ends' segments")
    group.add_argument("--secondary-weight", type=float, default=0.0,
                       help="target value for secondary labels (0 = ignore them)")
    group.add_argument("--workers", type=int, default=2, help="data loader processes")
    group.add_argument("--pad", choices=data.PAD_MODES, default="zero",
                       help="recordings shorter than the window: pad with zeros or repeat the clip")
    group.add_argument("--strict", action="store_true",
                       help="stop if any recording cannot be read (default: skip it, listed in bad_files.csv)")
    group.add_argument("--sampler", choices=data.SAMPLERS, default="none",
                       help="none: every recording once per epoch; inverse / sqrt: draws weighted 1/N or "
                            "1/sqrt(N) per species (with replacement); cap: at most --cap-per-class "
                            "recordings per species per epoch. Check with --audit-sampling")
    group.add_argument("--cap-per-class", type=int, default=0, help="recordings per species per epoch, --sampler cap")
    group.add_argument("--cache", default=None,
                       help="folder written by `python data.py cache` with the same data, sample rate and "
                            "crop policy: crops are read from it instead of decoded (a mismatch is refused)")
    group.add_argument("--extras", default=None,
                       help="extras.csv from `python data.py extras`: fixed 5-s windows of training "
                            "recordings added to each epoch (windows of validation recordings are dropped)")
    group.add_argument("--nocall", action="store_true",
                       help="add a 'nocall' class trained on background windows: --bg-dir audio, "
                            "--nocall-soundscapes rows and --nocall-detections windows")
    group.add_argument("--nocall-soundscapes", default=None,
                       help="labelled-soundscape table (file,start_s,end_s,labels or BirdCLEF 2021's "
                            "train_soundscape_labels.csv) whose no-call rows train the nocall class")
    group.add_argument("--nocall-detections", default=None,
                       help="infer.py --detections table: windows whose best score is below "
                            "--nocall-max-score train the nocall class")
    group.add_argument("--nocall-max-score", type=float, default=0.05,
                       help="a detections window is no-call below this best score")
    group.add_argument("--nocall-per-recording", type=int, default=1,
                       help="no-call windows taken from each recording's detections, quietest first")
    group.add_argument("--audit-sampling", action="store_true",
                       help="build the sampler exactly as training would, write sampling_audit.csv, print "
                            "the summary and exit without training")

    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default="tf_efficientnet_b0.ns_jft_in1k", help="timm model name")
    pretrained = group.add_mutually_exclusive_group()
    pretrained.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                            help="start from the timm hub's pretrained weights")
    pretrained.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=argparse.SUPPRESS,
                            help="start from random weights (offline machines)")
    group.add_argument("--pretrained-file", default=None,
                       help="local pretrained weights for --backbone (implies pretrained)")
    group.add_argument("--sample-rate", type=int, default=32000, help="audio is resampled to this rate")
    group.add_argument("--window-seconds", type=float, default=5.0, help="length of one input window")
    group.add_argument("--n-fft", type=int, default=1024, help="STFT size")
    group.add_argument("--hop", type=int, default=512, help="STFT hop in samples")
    group.add_argument("--n-mels", type=int, default=128, help="mel bands")
    group.add_argument("--fmin", type=float, default=20.0, help="lowest mel frequency (Hz)")
    group.add_argument("--fmax", type=float, default=16000.0, help="highest mel frequency (Hz)")
    group.add_argument("--normalization", choices=("standard", "minmax", "none"), default="standard",
                       help="per-example normalisation of the dB spectrogram")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout in the head")
    group.add_argument("--head", choices=model_lib.HEADS, default="linear",
                       help="linear; mlp: Linear-ReLU-Dropout-Linear (the log's complex head); sed: "
                            "attention pooling over time with framewise outputs")
    group.add_argument("--frontend", choices=model_lib.FRONTENDS, default="mel",
                       help="mel: log-mel in dB; pcen: per-channel energy normalisation (log experiment 12)")
    group.add_argument("--pcen-gain", dest="pcen_gain", type=float, default=model_lib.PCEN_DEFAULTS["pcen_gain"],
                       help="PCEN gain")
    group.add_argument("--pcen-bias", dest="pcen_bias", type=float, default=model_lib.PCEN_DEFAULTS["pcen_bias"],
                       help="PCEN bias")
    group.add_argument("--pcen-power", dest="pcen_power", type=float, default=model_lib.PCEN_DEFAULTS["pcen_power"],
                       help="PCEN compression exponent")
    group.add_argument("--pcen-time-constant", dest="pcen_time_constant", type=float,
                       default=model_lib.PCEN_DEFAULTS["pcen_time_constant"], help="PCEN smoother time constant (s)")
    group.add_argument("--pcen-eps", dest="pcen_eps", type=float, default=model_lib.PCEN_DEFAULTS["pcen_eps"],
                       help="PCEN epsilon")
    group.add_argument("--pcen-input-scale", dest="pcen_input_scale", type=float,
                       default=model_lib.PCEN_DEFAULTS["pcen_input_scale"],
                       help="multiplier on the magnitude mel spectrogram before PCEN (librosa's defaults "
                            "assume int32-range audio; ours is in [-1, 1])")
    group.add_argument("--pcen-initial-state", dest="pcen_initial_state", choices=model_lib.PCEN_INITIAL_STATES,
                       default=model_lib.PCEN_DEFAULTS["pcen_initial_state"],
                       help="first_frame: smoother starts at the first frame's level; librosa: "
                            "librosa.pcen's default state")
    group.add_argument("--img-size", type=image_size, default=None,
                       help="resize the spectrogram image to HxW, e.g. 256x256 (the log's 256x157, 256x256)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--loss", choices=LOSSES, default="ce",
                       help="ce: softmax cross-entropy on soft targets; bce: sigmoid BCE; focal: sigmoid "
                            "focal loss. Sets the activation (softmax for ce, else sigmoid) used by "
                            "evaluation and inference")
    group.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss focusing parameter")
    group.add_argument("--focal-alpha", type=float, default=None, help="focal loss positive weight (None = off)")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="ce: mix targets with uniform; bce/focal: move targets towards 0.5")
    group.add_argument("--loss-switch-epoch", type=int, default=None,
                       help="epoch from which --loss-after replaces --loss")
    group.add_argument("--loss-after", choices=LOSSES, default=None, help="loss used from --loss-switch-epoch on")
    group.add_argument("--init-from", default=None,
                       help="start from a (pre-training) checkpoint with another vocabulary: frontend and "
                            "backbone copied, head rows of shared species copied by name")
    group.add_argument("--freeze-backbone-epochs", type=int, default=0,
                       help="train only the head for this many epochs (backbone frozen, BatchNorm statistics too)")
    group.add_argument("--ema", type=float, default=0.0,
                       help="decay of an exponential moving average of the weights, evaluated and saved "
                            "alongside (0 = off; e.g. 0.999)")
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on CUDA: BatchNorm statistics over the whole batch of all "
                            "processes (SyncBatchNorm) instead of each process's share")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format for the backbone (faster convolutions on recent GPUs)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the backbone (minutes of compilation first; checkpoints are unchanged)")
    group.add_argument("--flush-denormal", action="store_true",
                       help="flush denormal floats to zero on the CPU (log experiment 19)")
    group.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    group.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    group.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine")
    group.add_argument("--epochs", type=int, default=30, help="maximum number of epochs")
    group.add_argument("--batch-size", type=int, default=32, help="training batch size")
    group.add_argument("--mixup-alpha", type=float, default=0.2, help="Beta(alpha, alpha); 0 turns mixup off")
    group.add_argument("--mixup-prob", type=float, default=0.5, help="share of examples mixed")
    group.add_argument("--clip-grad-norm", type=float, default=0.0, help="gradient norm clip (0 = off)")
    group.add_argument("--skip-nonfinite", type=int, default=0,
                       help="skip up to this many batches with a non-finite loss or gradient (each logged); "
                            "0 = stop at the first, naming its files")
    group.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                       help="mixed precision; auto = bf16 or fp16+GradScaler on CUDA, off on CPU")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    group = parser.add_argument_group("augmentation (training only; all off by default except mixup)")
    group.add_argument("--aug-strength", type=float, default=1.0,
                       help="scales every augmentation's probability and magnitude at once (the log's AUG "
                            "factor); 0 turns all of them off, mixup included")
    group.add_argument("--noise-prob", type=float, default=0.0, help="probability of coloured noise")
    group.add_argument("--noise-snr", type=float, nargs=2, default=[3.0, 30.0], metavar=("LOW", "HIGH"),
                       help="SNR range of coloured (white, pink, brown) noise in dB")
    group.add_argument("--bg-dir", default=None,
                       help="folder of background audio (e.g. no-call soundscape segments) mixed into training crops")
    group.add_argument("--bg-prob", type=float, default=0.5, help="probability of background noise, with --bg-dir")
    group.add_argument("--bg-snr", type=float, nargs=2, default=[0.0, 2.0], metavar=("LOW", "HIGH"),
                       help="SNR range of background noise in dB")
    group.add_argument("--cutmix-prob", type=float, default=0.0, help="probability of cutmix along time")
    group.add_argument("--cutmix-alpha", type=float, default=1.0, help="cutmix Beta(alpha, alpha)")
    group.add_argument("--gain-prob", type=float, default=0.0, help="probability of a random gain")
    group.add_argument("--gain-db", type=float, default=6.0, help="random gain range, +-dB")
    group.add_argument("--shift-prob", type=float, default=0.0, help="probability of a circular time shift")
    group.add_argument("--shift-max", type=float, default=0.5, help="largest time shift, fraction of the window")
    group.add_argument("--freq-masks", type=int, default=0, help="SpecAugment frequency masks per example")
    group.add_argument("--time-masks", type=int, default=0, help="SpecAugment time masks per example")
    group.add_argument("--mask-max-pct", type=float, default=0.1,
                       help="SpecAugment: widest mask as a fraction of the bands or frames")

    group = parser.add_argument_group("evaluation and checkpoints")
    group.add_argument("--evals-per-epoch", type=int, default=2,
                       help="evaluations (each with a checkpoint) per epoch")
    group.add_argument("--monitor", choices=MONITORED, default="cmap5",
                       help="metric for best.pt and patience (val_loss: lower is better; ema_*: of the "
                            "--ema weights; soundscape_*: on --val-soundscapes)")
    group.add_argument("--val-soundscapes", default=None,
                       help="file,start_s,end_s,labels table of labelled soundscape segments (e.g. "
                            "demo_data/test_soundscapes_labels.csv): scored at every evaluation next to "
                            "the clip-level numbers")
    group.add_argument("--val-soundscape-audio", default=None,
                       help="folder of those soundscapes' audio (default: test_soundscapes/ beside the table)")
    group.add_argument("--patience", type=int, default=8,
                       help="stop after this many evaluations without improvement (0 = never)")
    group.add_argument("--min-delta", type=float, default=0.0,
                       help="smallest change of the monitored metric that counts as improvement")
    group.add_argument("--keep-last", type=int, default=3, help="periodic checkpoints kept on disk")
    group.add_argument("--out-dir", default=None, help="run folder (default runs/<date-time>)")
    group.add_argument("--resume", default=None,
                       help="checkpoint to continue from, or 'auto': the newest complete one in --out-dir")
    group.add_argument("--seed", type=int, default=42, help="seed of every random stream")
    group.add_argument("--max-steps", type=int, default=0,
                       help="stop after this many optimiser steps in total (0 = no limit; for smoke tests)")
    group.add_argument("--lr-find", action="store_true",
                       help="run a learning-rate range test instead of training: writes lr_find.png "
                            "and lr_find.csv and suggests --lr")
    group.add_argument("--lr-find-steps", type=int, default=200, help="steps of the range test")
    return parser


def image_size(text: str) -> list[int]:
    """'256x157' -> [256, 157]."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x157, got {text!r}") from None
    return [height, width]


# ----------------------------------------------------------------------------- loss

LOSSES = ("ce", "bce", "focal")


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, loss_name: str, label_smoothing: float = 0.0,
                 focal_gamma: float = 2.0, focal_alpha: float | None = None) -> torch.Tensor:
    """Mean loss of logits (B, C) against soft targets (B, C), in float32.

    Always a mean, never a sum: a summed loss grows with batch and class count and
    was what sent the original experiments' predictions to inf (log experiment 64).
    """
    logits, targets = logits.float(), targets.float()
    if loss_name == "ce":
        # Soft-target cross-entropy; targets renormalised to a distribution so that
        # secondary labels share the mass instead of inflating it.
        distribution = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-8)
        distribution = distribution * (1 - label_smoothing) + label_smoothing / logits.shape[1]
        return F.cross_entropy(logits, distribution)
    targets = targets * (1 - label_smoothing) + label_smoothing / 2  # towards 0.5 for a binary target
    if loss_name == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if loss_name == "focal":
        # Sigmoid focal loss (Lin et al. 2017): BCE down-weighted by (1 - p_t)^gamma on
        # easy examples; with gamma 0 and no alpha it is exactly BCE.
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")   # (B, C)
        probability = logits.sigmoid()
        p_t = probability * targets + (1 - probability) * (1 - targets)
        loss = bce * (1 - p_t) ** focal_gamma
        if focal_alpha is not None:
            loss = loss * (focal_alpha * targets + (1 - focal_alpha) * (1 - targets))
        return loss.mean()
    raise ValueError(f"unknown loss {loss_name!r}")


def loss_at_epoch(args, epoch: int) -> str:
    """--loss, or --loss-after from --loss-switch-epoch on (log experiments 28-29)."""
    if args.loss_after and args.loss_switch_epoch is not None and epoch >= args.loss_switch_epoch:
        return args.loss_after
    return args.loss


def batch_loss(logits, targets, args, loss_name: str) -> torch.Tensor:
    return compute_loss(logits, targets, loss_name, args.label_smoothing, args.focal_gamma, args.focal_alpha)


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- schedule, precision

def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero, as a pure function of the step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def precision_settings(amp: str, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """-> (autocast enabled, autocast dtype, use GradScaler)."""
    if amp == "auto":
        if device.type != "cuda":
            return False, torch.float32, False
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return False, torch.float32, False
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or off on CPU")
        return True, torch.float16, True  # fp16 gradients underflow without loss scaling
    return True, torch.bfloat16, False


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """Seed of the global torch RNG (dropout, drop-path) for one step: resumable by construction.
    Each torchrun rank draws its own (rank 0's, like a single process's, has no rank in it)."""
    entropy = [seed, epoch, step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# ----------------------------------------------------------------------------- distributed (torchrun)
#
# `torchrun --nproc_per_node N train.py ...`: see distributed.py for how ranks join
# and share values. Each rank trains on its shard of the epoch's single draw with
# the model wrapped in DistributedDataParallel (gradients averaged across ranks),
# evaluates its share of the validation windows and gathers everyone's
# predictions before any metric is computed. Only rank 0 writes files, logs at
# INFO and shows progress bars. Every decision that ends or skips a step (a batch
# that failed to decode, a non-finite loss, Ctrl-C, patience) is taken on values
# all ranks share.

def wrap_for_training(model: torch.nn.Module, args, device) -> torch.nn.Module:
    """The module the training forward calls: DistributedDataParallel under torchrun, else the model."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        # a frozen backbone produces no gradients, which DDP must be told to expect
        find_unused_parameters=args.freeze_backbone_epochs > 0)


def validation_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    """This rank's share of the validation rows (every world_size-th), in batches."""
    rank, world_size = distributed.rank_and_world_size()
    mine = list(range(rank, n_rows, world_size))
    return [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]


# ----------------------------------------------------------------------------- phases

@dataclass
class TrainingParts:
    """What one optimiser step touches, bundled to keep the phase functions' signatures short."""
    model: model_lib.BirdCallModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    schedule: tuple            # (total steps, warm-up steps, peak learning rate)
    ema: object = None         # torch.optim.swa_utils.AveragedModel, with --ema
    augment: augment.AugmentSettings = None
    background: augment.BackgroundBank | None = None
    trainer: torch.nn.Module = None  # what the training forward calls: the model, or its DDP wrapper


def set_train_mode(model, frozen_backbone: bool) -> None:
    """Train mode; with a frozen backbone its weights get no gradients and its BatchNorm statistics stay."""
    model.train()
    model.backbone.requires_grad_(not frozen_backbone)
    if frozen_backbone:
        model.backbone.eval()


def train_one_epoch(parts: TrainingParts, loader, args, state, on_eval) -> bool:
    """Run the optimiser steps of one epoch from state['step_in_epoch'].

    `on_eval()` is called after each step that completes an evaluation interval;
    it returns True when training must stop. Returns True if training must stop.
    """
    model, optimizer, scaler, device = parts.model, parts.optimizer, parts.scaler, parts.device
    rank = distributed.rank_and_world_size()[0]  # each rank draws its own augmentation and dropout
    autocast_on, autocast_dtype, _ = precision_settings(args.amp, device)
    loss_name = loss_at_epoch(args, state["epoch"])
    frozen = state["epoch"] < args.freeze_backbone_epochs
    set_train_mode(model, frozen)
    progress = tqdm(loader, total=len(loader), desc=f"epoch {state['epoch']}", leave=False,
                    dynamic_ncols=True, disable=not sys.stderr.isatty() or not distributed.is_main_process())
    for batch in progress:
        epoch, step = state["epoch"], state["step_in_epoch"]
        if not distributed.any_rank(batch is None):  # under torchrun every rank takes or skips a step together
            torch.manual_seed(step_seed(args.seed, epoch, step, rank))
            rng = np.random.default_rng([args.seed, epoch, step, 1] + ([rank] if rank else []))
            waveforms = data.as_float(batch["waveform"].to(device, non_blocking=True))  # (B, samples)
            targets = batch["target"].to(device, non_blocking=True)       # (B, C)
            waveforms, targets = augment.augment_waveforms(waveforms, targets, parts.augment, rng, parts.background)
            waveforms, targets = augment.mixup(waveforms, targets, args.mixup_alpha,
                                               min(args.mixup_prob * args.aug_strength, 1.0), rng)

            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["global_step"], *parts.schedule)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_on):
                logits = parts.trainer(waveforms, image_augment=lambda images:            # SpecAugment on
                                       augment.augment_images(images, parts.augment, rng))  # (B, 1, n_mels, T)
            loss = batch_loss(logits, targets, args, loss_name)                # this rank's mean
            global_loss = distributed.mean_over_ranks(loss.detach())           # the whole batch's mean
            optimizer.zero_grad(set_to_none=True)
            problem = None if torch.isfinite(global_loss) else f"non-finite training loss ({global_loss.item()})"
            if problem is None:
                scaler.scale(loss).backward()
                problem = check_gradients(parts, args)
            if problem is None:
                scaler.step(optimizer)
                scaler.update()
                if parts.ema is not None:
                    parts.ema.update_parameters(model)
                loss_value = global_loss.item()
                state["train_loss_sum"] += loss_value
                state["train_loss_count"] += 1
                state["step_log"].append((state["global_step"], epoch, step, loss_value,
                                          optimizer.param_groups[0]["lr"]))
                progress.set_postfix(loss=f"{loss_value:.4f}")
            else:
                skip_or_stop(problem, state, args, batch["path"])
                optimizer.zero_grad(set_to_none=True)
        else:
            log.warning("epoch %d step %d: no file of the batch could be decoded; step skipped", epoch, step)
        state["step_in_epoch"] += 1
        state["global_step"] += 1
        if state["step_in_epoch"] in state["eval_steps"] or (args.max_steps and state["global_step"] >= args.max_steps):
            if on_eval():
                return True
            set_train_mode(model, frozen)
        elif distributed.any_rank(state["interrupt_requested"]):
            state["interrupt_requested"] = True
            return True  # main() saves a checkpoint at this step
    return False


def check_gradients(parts: TrainingParts, args) -> str | None:
    """Unscale and clip; return a description if the gradient norm is not finite.

    With fp16 and a GradScaler, inf gradients are routine (the scaler skips that step
    and lowers its scale), so only the unscaled, non-fp16 case is treated as a fault.
    """
    if parts.scaler.is_enabled():
        if args.clip_grad_norm > 0:
            parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), args.clip_grad_norm)
        return None
    max_norm = args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm)  # (also the check's cost)
    return None if torch.isfinite(norm) else f"non-finite gradient norm ({norm.item()})"


def skip_or_stop(problem: str, state: dict, args, paths) -> None:
    """--skip-nonfinite K: skip up to K bad batches, logging each; otherwise stop naming the files."""
    where = f"epoch {state['epoch']} step {state['step_in_epoch']}; batch files: {', '.join(paths)}"
    if state["skipped_nonfinite"] < args.skip_nonfinite:
        state["skipped_nonfinite"] += 1
        log.warning("skipping batch %d of at most %d with a %s at %s", state["skipped_nonfinite"],
                    args.skip_nonfinite, problem, where)
        return
    raise NonFiniteLossError(f"{problem} at {where}")


@torch.inference_mode()
def evaluate(model, loader, args, loss_name: str, device) -> dict:
    """Validation loss and ranking metrics on the fixed validation windows."""
    model.eval()
    all_logits, all_targets, all_indices = [], [], []
    for batch in loader:
        if batch is None:
            continue
        all_logits.append(model(data.as_float(batch["waveform"].to(device))).float().cpu())  # (B, C)
        all_targets.append(batch["target"])
        all_indices.append(batch["index"])
    logits, targets = distributed.gather_rows(all_indices, all_logits, all_targets)  # (N, C) from every rank
    if logits is None:
        raise RuntimeError("no validation window could be decoded")
    scores = model_lib.checked_scores(logits, model.activation, "the model on the validation windows")
    # Validation loss without label smoothing, so runs with and without it compare.
    loss = compute_loss(logits, targets, loss_name, 0.0, args.focal_gamma, args.focal_alpha)
    results = {"val_loss": loss.item()}
    species = np.array([label != data.NOCALL for label in model.labels])  # nocall is not scored
    results.update(metrics.classification_metrics(targets.numpy()[:, species], scores[:, species]))
    return results


class SoundscapeValidation:
    """Labelled soundscape segments, decoded once, scored at every evaluation.

    Clip crops from the training recordings say little about soundscapes (the
    log's own conclusion); this is the number a leaderboard measures. Windows are
    cut exactly as infer.py cuts them, so the two agree.
    """

    def __init__(self, table_path, audio_dir, model):
        import infer  # the one implementation of soundscape windows and label tables
        table, audio_dir = data.read_soundscape_labels(table_path, audio_dir)
        rate, window = model.config["sample_rate"], model.config["window_seconds"]
        windows, weights, row_ids = [], [], []
        for name in dict.fromkeys(table["file"]):
            waveform = data.read_audio(audio_dir / name, rate)
            n_rows = infer.row_count(len(waveform), rate)
            starts, row_weights = infer.window_plan(n_rows, window, infer.ROW_SECONDS)
            windows.append(infer.cut_windows(waveform, rate, starts, window))
            weights.append(row_weights)
            row_ids += infer.row_ids(Path(name).stem, n_rows)
        # the no-call column (--nocall) is scored by no metric: it is not a species
        self.columns = np.array([label != data.NOCALL for label in model.labels])
        labelled = infer.read_labels(table_path, list(np.array(model.labels)[self.columns]), audio_dir)
        keep = np.array([row_id in labelled.index for row_id in row_ids])
        self.windows = torch.from_numpy(np.concatenate(windows))                  # (W, samples)
        self.weights = scipy.linalg.block_diag(*weights)[keep]                     # (labelled rows, W)
        self.targets = labelled.loc[np.array(row_ids)[keep]].to_numpy()            # (labelled rows, species)
        log.info("soundscape validation: %d labelled 5-s rows from %d file(s) in %s", len(self.targets),
                 len(windows), audio_dir)

    @torch.inference_mode()
    def evaluate(self, model, batch_size: int, device) -> dict:
        model.eval()
        rank, world_size = distributed.rank_and_world_size()
        mine = torch.arange(rank, len(self.windows), world_size)               # this rank's share of the windows
        batches = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
        (logits,) = distributed.gather_rows(batches, [model(self.windows[index].to(device)).float().cpu()
                                          for index in batches])               # (W, C) from every rank
        scores = self.weights @ model_lib.checked_scores(logits, model.activation,
                                                         "the model on the validation soundscapes")
        scores = scores[:, self.columns]
        return {f"soundscape_{key}": value for key, value in metrics.classification_metrics(self.targets, scores).items()}


def draw_for_epoch(train_set, args, epoch: int) -> np.ndarray:
    """The records one epoch visits, in order, as --sampler draws them."""
    return data.epoch_draw(len(train_set), args.seed, epoch, train_set.primary_labels, args.sampler,
                           args.cap_per_class)


def epoch_sampler(train_set, args, epoch: int, start_batch: int = 0) -> data.EpochBatchSampler:
    """This process's batches of one epoch: its shard of the epoch's single draw under torchrun."""
    return data.EpochBatchSampler(draw_for_epoch(train_set, args, epoch), args.batch_size, epoch, start_batch,
                                  *distributed.rank_and_world_size())


def endless_batches(train_set, args, device):
    """Decoded training batches, epoch after epoch (for the range test, which ignores epochs)."""
    for epoch in itertools.count():
        for batch in make_loader(train_set, args, device, epoch_sampler(train_set, args, epoch)):
            if batch is not None:
                yield batch


def lr_range_test(parts: TrainingParts, train_set, args, out_dir: Path) -> float:
    """Learning-rate range test: raise the rate exponentially over --lr-find-steps steps,
    record the smoothed loss, stop when it diverges; write lr_find.csv/png and suggest
    the rate where the loss falls fastest. Trains nothing that is kept."""
    model, optimizer, device = parts.model, parts.optimizer, parts.device
    low, high, steps = 1e-7, 1.0, args.lr_find_steps
    rates, losses, smoothed, best = [], [], 0.0, float("inf")
    set_train_mode(model, False)
    for step, batch in zip(range(steps), endless_batches(train_set, args, device)):
        rate = low * (high / low) ** (step / max(steps - 1, 1))
        for group in optimizer.param_groups:
            group["lr"] = rate
        waveforms = data.as_float(batch["waveform"].to(device))
        loss = batch_loss(model(waveforms), batch["target"].to(device), args, args.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = 0.9 * smoothed + 0.1 * loss.item()
        rates.append(rate)
        losses.append(smoothed / (1 - 0.9 ** (step + 1)))  # bias-corrected running mean
        best = min(best, losses[-1])
        if not math.isfinite(losses[-1]) or losses[-1] > 4 * best:
            break  # diverged: higher rates say nothing more
    log_rates = np.log10(rates)
    slopes = np.gradient(np.asarray(losses), log_rates) if len(rates) > 2 else np.zeros(len(rates))
    suggestion = float(rates[int(np.argmin(slopes))])
    with open(out_dir / "lr_find.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "smoothed_loss"])
        writer.writerows(zip(rates, losses))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(rates, losses)
    axis.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2e}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("smoothed training loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "lr_find.png", dpi=100)
    plt.close(figure)
    log.info("learning-rate range test over %d steps: steepest descent at %.2e -> try --lr %.2e "
             "(curve in %s)", len(rates), suggestion, suggestion, out_dir / "lr_find.png")
    return suggestion


# ----------------------------------------------------------------------------- checkpoints and logs

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_step(\d+)\.pt$")


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


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` periodic checkpoints; works from disk, so restarts prune too."""
    existing = periodic_checkpoints(out_dir)
    for path in existing[:max(len(existing) - keep_last, 0)]:
        path.unlink()


def plain_args(args) -> dict:
    """vars(args) with only JSON/weights_only-safe values (no Namespace, no Path objects)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def make_checkpoint(parts: TrainingParts, args, state) -> dict:
    checkpoint = {
        "format": model_lib.CHECKPOINT_FORMAT,
        "model": parts.model.state_dict(),
        "model_config": parts.model.config,
        "labels": list(parts.model.labels),
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "args": plain_args(args),
        "epoch": state["epoch"],
        "step_in_epoch": state["step_in_epoch"],
        "global_step": state["global_step"],
        "evaluations": state["evaluations"],
        "best_metric": state["best_metric"],
        "best_step": state["best_step"],
        "patience_counter": state["patience_counter"],
        "train_loss_sum": state["train_loss_sum"],       # non-zero only in a Ctrl-C checkpoint
        "train_loss_count": state["train_loss_count"],
        "skipped_nonfinite": state["skipped_nonfinite"],
        "world_size": distributed.rank_and_world_size()[1],  # step_in_epoch counts global batches
    }
    if parts.ema is not None:  # the averaged weights, loadable with load_model(path, ema=True)
        checkpoint["model_ema"] = parts.ema.module.state_dict()
        checkpoint["ema_updates"] = int(parts.ema.n_averaged)
    return checkpoint


SCORE_COLUMNS = ["val_loss", "cmap5", "cmap3", "macro_ap", "lrap"]


def metric_columns(with_ema: bool, with_soundscapes: bool = False) -> list[str]:
    ema_columns = [f"ema_{column}" for column in SCORE_COLUMNS] if with_ema else []
    soundscape_columns = [f"soundscape_{column}" for column in SCORE_COLUMNS[1:]] if with_soundscapes else []
    return ["evaluation", "epoch", "global_step", "train_loss", *SCORE_COLUMNS, *ema_columns,
            *soundscape_columns, "lr"]


def append_metrics(path: Path, row: dict, columns: list[str]) -> None:
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
    for column in ("cmap5", "cmap3", "macro_ap", "lrap", "soundscape_cmap5", "soundscape_macro_ap"):
        if column in table:
            score_axis.plot(table["epoch"], table[column], marker=".", label=column)
    score_axis.set_xlabel("epoch")
    score_axis.set_ylim(0, 1)
    score_axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def is_improvement(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    if monitor.endswith("val_loss"):
        return value < best - min_delta
    return value > best + min_delta


# ----------------------------------------------------------------------------- main

def resolve_device(name: str) -> torch.device:
    return distributed.local_device(name)


def prepare_data(args, out_dir: Path):
    """Metadata -> vocabulary, split, header check -> (labels, train dataset, val dataset).

    The training set is the training split's recordings (crops by --crop-policy),
    then --extras windows, then --nocall windows (both fixed 5-s windows);
    `train_set.extras` marks the extra windows for the sampling audit.
    """
    if distributed.is_main_process():  # bad_files.csv is rewritten, and the demo folder written, by rank 0
        (out_dir / "bad_files.csv").unlink(missing_ok=True)
        for folder in args.data_dir:
            data.ensure_demo_data(folder)
    distributed.barrier()
    table, labels = data.read_training_data(args.data_dir)
    if args.nocall and data.NOCALL not in labels:
        labels = labels + [data.NOCALL]
    cache = open_cache(args, table)
    table["cache_row"] = np.arange(len(table))          # rows of the cache, which knows every recording
    headers = usable_headers(table["path"], args, out_dir / "bad_files.csv")
    usable = np.array([header is not None for header in headers])
    table = table[usable].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"none of the recordings in {' '.join(args.data_dir)} can be read")
    missing = sorted(set(labels) - set(table["primary_label"]) - {data.NOCALL})
    if missing:
        log.warning("%d species of the vocabulary have no usable recording (they can never be predicted "
                    "well): %s", len(missing), " ".join(missing[:20]))
    durations = np.array([frames / rate for frames, rate in (header for header in headers if header is not None)])
    targets = data.make_targets(table, labels, args.secondary_weight)
    train_index, val_index = data.split_recordings(table["primary_label"], args.val_fraction,
                                                   args.folds, args.fold, args.seed)
    if len(val_index) == 0:
        raise ValueError("the validation split is empty (every species has fewer than 2 recordings)")
    crop = data.CropSettings(args.sample_rate, args.window_seconds, args.crop_policy, args.ends_seconds, args.pad)

    # rows of the training set: (recording index into table, fixed start or NaN)
    records, starts = list(train_index), [np.nan] * len(train_index)
    n_extras = 0
    if args.extras:
        extra_records, extra_starts = extra_windows(args.extras, table, train_index)
        records += extra_records
        starts += extra_starts
        n_extras = len(extra_records)
    paths = list(table["path"].iloc[records])
    train_durations, train_targets = list(durations[records]), targets[records]
    primary = list(table["primary_label"].iloc[records])
    if args.nocall:
        nocall = nocall_windows(args, table, train_index, out_dir)
        if nocall.empty:
            raise ValueError("--nocall found no background window: give --bg-dir, --nocall-soundscapes or "
                             "--nocall-detections with at least one usable window")
        one_hot = np.zeros((len(nocall), len(labels)), dtype=np.float32)
        one_hot[:, labels.index(data.NOCALL)] = 1.0
        paths += list(nocall["path"])
        train_durations += list(nocall["duration"])
        train_targets = np.concatenate([train_targets, one_hot])
        primary += [data.NOCALL] * len(nocall)
        starts += list(nocall["start_s"])
    cache_rows = list(table["cache_row"].iloc[records]) + [-1] * (len(paths) - len(records))
    train_set = data.RecordingDataset(paths, train_durations, train_targets, crop, args.seed, primary, starts,
                                      cache, cache_rows)
    train_set.extras = np.zeros(len(paths), dtype=bool)
    train_set.extras[len(train_index):len(train_index) + n_extras] = True
    val_set = data.RecordingDataset(table["path"].iloc[val_index], durations[val_index], targets[val_index], crop,
                                    args.seed, table["primary_label"].iloc[val_index], cache=cache,
                                    cache_rows=table["cache_row"].iloc[val_index])
    log.info("%d species, %d training recordings (+%d extra windows, +%d no-call windows), %d validation "
             "recordings", len(labels), len(train_index), n_extras, len(paths) - len(train_index) - n_extras,
             len(val_index))
    return labels, train_set, val_set


def open_cache(args, table: pd.DataFrame):
    """--cache -> data.AudioCache, refused (CacheError) unless made from this data with these crop settings."""
    if not args.cache:
        return None
    settings = data.cache_settings(args.sample_rate, args.crop_policy, args.ends_seconds, args.window_seconds)
    manifest_path = Path(args.cache) / "manifest.json"
    if manifest_path.is_file():  # --max-seconds is the cache's own choice: any value is accepted
        settings["max_seconds"] = json.loads(manifest_path.read_text()).get("max_seconds", 0.0)
    cache = data.AudioCache(args.cache, table, settings)
    log.info("reading crops from the cache %s (%.2f GB, %s crops at %d Hz%s); crops it does not cover are "
             "decoded", args.cache, cache.manifest["bytes"] / 1e9, args.crop_policy, args.sample_rate,
             f", at most {settings['max_seconds']:g} s per recording" if settings["max_seconds"] else "")
    return cache


def check_same_data_on_every_rank(labels, train_set, val_set) -> None:
    """Under torchrun each rank reads the metadata and file headers itself; a file that only some
    ranks can read (flaky shared storage) would give them different draws and hang the job."""
    summary = hashlib.sha1("\n".join(map(str, [labels, train_set.paths, train_set.starts.tolist(),
                                                 val_set.paths])).encode()).hexdigest()
    if len(set(distributed.gather_objects(summary))) > 1:
        raise ValueError("the processes read different data (labels, usable recordings or windows differ "
                         "between ranks): check that every machine sees the same --data-dir files")


def usable_headers(paths, args, bad_files_path: Path) -> list:
    """Each file's (frames, rate), None for an unreadable one; those are listed in bad_files.csv
    and logged (or, with --strict, refused)."""
    headers, bad = data.check_audio_files(paths)
    if bad and args.strict:
        raise ValueError(f"--strict: {len(bad)} of {len(headers)} recordings cannot be read, e.g. "
                         f"{bad[0][0]} ({bad[0][1]})")
    if bad and distributed.is_main_process():
        with open(bad_files_path, "a", newline="") as handle:  # recordings, then --nocall files
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(["path", "reason"])
            writer.writerows(bad)
        for path, reason in bad:
            log.warning("skipping unreadable recording %s (%s)", path, reason)
        log.warning("%d of %d files skipped; listed in %s", len(bad), len(headers), bad_files_path)
    return headers


def extra_windows(extras_path, table: pd.DataFrame, train_index) -> tuple[list[int], list[float]]:
    """--extras rows -> (recording index, window start) for windows of training-split recordings.

    Windows of validation recordings are dropped (they would leak the validation
    clips into training); windows of recordings not in the metadata are dropped
    and counted. Each window gets its recording's targets (primary + secondary).
    """
    extras = data.read_extras(extras_path)
    recording = data.match_recordings(extras["filename"], table)
    in_train = np.isin(recording, np.asarray(train_index))
    unknown, in_validation = int((recording < 0).sum()), int(((recording >= 0) & ~in_train).sum())
    log.info("--extras %s: %d windows of %d training recordings used; %d dropped (their recording is in the "
             "validation split), %d dropped (no such usable recording)", extras_path, int(in_train.sum()),
             len(np.unique(recording[in_train])), in_validation, unknown)
    return [int(r) for r in recording[in_train]], [float(s) for s in extras["start_s"][in_train]]


def nocall_windows(args, table: pd.DataFrame, train_index, out_dir: Path) -> pd.DataFrame:
    """Background windows for the nocall class -> path, start_s (NaN: crop by policy), duration."""
    parts = []
    if args.bg_dir:  # whole files of background audio, cropped like recordings
        files = [str(path) for path in sorted(Path(args.bg_dir).rglob("*"))
                 if path.suffix.lower() in data.AUDIO_EXTENSIONS]
        parts.append(pd.DataFrame({"path": files, "start_s": np.nan, "source": "--bg-dir"}))
    if args.nocall_soundscapes:
        rows = data.nocall_soundscape_rows(args.nocall_soundscapes)
        parts.append(rows.assign(source="--nocall-soundscapes"))
    if args.nocall_detections:
        chosen = data.select_nocall_detections(pd.read_csv(args.nocall_detections, keep_default_na=False),
                                               args.nocall_max_score, args.nocall_per_recording)
        recording = data.match_recordings(chosen["filename"], table)
        keep = np.isin(recording, np.asarray(train_index))  # quiet windows of validation recordings stay out
        parts.append(pd.DataFrame({"path": table["path"].to_numpy()[recording[keep]],
                                   "start_s": chosen["start_s"].to_numpy()[keep], "source": "--nocall-detections"}))
    if not parts:
        raise ValueError("--nocall needs background audio: --bg-dir, --nocall-soundscapes or --nocall-detections")
    windows = pd.concat(parts, ignore_index=True)
    headers = usable_headers(windows["path"], args, out_dir / "bad_files.csv")
    windows["duration"] = [header[0] / header[1] if header else np.nan for header in headers]
    windows = windows[windows["duration"].notna()].reset_index(drop=True)
    for source, count in windows.groupby("source", sort=False).size().items():
        log.info("nocall class: %d window(s) from %s", count, source)
    return windows


def make_loader(dataset, args, device, batch_sampler=None):
    common = dict(num_workers=args.workers, collate_fn=data.collate, pin_memory=device.type == "cuda",
                  worker_init_fn=_worker_init if args.workers else None)
    if batch_sampler is not None:
        return data.Loader(dataset, batch_sampler=batch_sampler, ring_batch_size=args.batch_size, **common)
    return data.Loader(dataset, batch_size=args.batch_size, shuffle=False, ring_batch_size=args.batch_size,
                       **common)


def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode and resample; don't fight the model for cores


def record_drawn_species(train_set, args, epoch: int, n_drawn: int, path: Path) -> None:
    """Append the species an epoch actually drew to drawn_counts.csv (the part of the draw its steps used)."""
    counter = data.DrawCounter(len(train_set))
    counter.add(draw_for_epoch(train_set, args, epoch)[:n_drawn])
    data.append_drawn_counts(path, counter.to_frame(train_set.primary_labels, epoch))


def set_activation(parts: TrainingParts, loss_name: str) -> None:
    """The activation follows the loss in use (a loss switch from ce to bce switches softmax to sigmoid)."""
    activation = model_lib.activation_for_loss(loss_name)
    for model in (parts.model, parts.ema.module if parts.ema is not None else None):
        if model is not None:
            model.config["activation"] = activation


def build_parts(args, labels, device) -> TrainingParts:
    torch.manual_seed(args.seed)  # the initial weights (later randomness is seeded per step)
    model = model_lib.build_model(args, labels)
    if args.init_from and not args.resume:
        counts = model_lib.transfer_weights(model, model_lib.read_checkpoint(args.init_from))
        log.info("--init-from %s: frontend and backbone copied; head rows of %d shared species copied by "
                 "name, %d new species start fresh, %d of the checkpoint's species unused", args.init_from,
                 counts["shared_species"], counts["new_species"], counts["dropped_species"])
    if args.sync_bn:
        if not dist.is_initialized() or device.type != "cuda":
            raise ValueError("--sync-bn needs torchrun on CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if args.channels_last:  # the spectrogram images follow the weights' layout inside the convolutions
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    _, _, use_scaler = precision_settings(args.amp, device)
    ema = None
    if args.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    if args.compile:  # in place, after the EMA copy: parameter names, and so checkpoints, stay the plain model's
        model.backbone.compile()
    settings = augment.AugmentSettings(
        noise_prob=args.noise_prob, noise_snr=tuple(args.noise_snr), bg_prob=args.bg_prob if args.bg_dir else 0.0,
        bg_snr=tuple(args.bg_snr), cutmix_prob=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha,
        gain_prob=args.gain_prob, gain_db=args.gain_db, shift_prob=args.shift_prob, shift_max=args.shift_max,
        freq_masks=args.freq_masks, time_masks=args.time_masks, mask_max_pct=args.mask_max_pct)
    background = None
    if args.bg_dir and args.aug_strength > 0:
        background = augment.BackgroundBank(args.bg_dir, args.sample_rate, model.window_samples)
        log.info("background noise: %d file(s) from %s", len(background), args.bg_dir)
    return TrainingParts(model, optimizer, torch.amp.GradScaler(device.type, enabled=use_scaler), device,
                         schedule=(), ema=ema, augment=settings.scaled(args.aug_strength), background=background)


def restore(parts: TrainingParts, checkpoint: dict, state: dict) -> None:
    parts.model.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    if parts.ema is not None:
        if "model_ema" not in checkpoint:
            raise ValueError("--ema was given but the checkpoint has no EMA weights to resume")
        parts.ema.module.load_state_dict(checkpoint["model_ema"])
        parts.ema.n_averaged.fill_(checkpoint["ema_updates"])
    for key in ("epoch", "step_in_epoch", "global_step", "evaluations", "best_metric",
                "best_step", "patience_counter", "train_loss_sum", "train_loss_count", "skipped_nonfinite"):
        state[key] = checkpoint[key]


def check_arguments(args) -> None:
    """Reject impossible combinations before any work is done."""
    if args.folds > 1 and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold {args.fold} must be in [0, {args.folds})")
    if args.monitor.startswith("ema_") and not args.ema:
        raise ValueError(f"--monitor {args.monitor} needs --ema")
    if args.monitor.startswith("soundscape_") and not args.val_soundscapes:
        raise ValueError(f"--monitor {args.monitor} needs --val-soundscapes")
    if (args.loss_after is None) != (args.loss_switch_epoch is None):
        raise ValueError("--loss-switch-epoch and --loss-after go together")
    precision_settings(args.amp, resolve_device(args.device))
    model_lib.check_backbone_name(args.backbone)  # fail before any data is read, with timm's error


def main(args) -> dict:
    """Train; returns the final state (used by tests). Under torchrun, every rank runs this."""
    check_arguments(args)
    return distributed.run_in_group(resolve_device(args.device),
                                    lambda: run_training(args, *distributed.rank_and_world_size()))


def run_training(args, rank: int, world_size: int) -> dict:
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.resume == "auto":
        if not args.out_dir:
            raise ValueError("--resume auto needs --out-dir (the run folder to continue)")
        try:
            args.resume = str(newest_complete_checkpoint(Path(args.out_dir)))
            log.info("--resume auto: continuing from %s", args.resume)
        except FileNotFoundError:  # killed before its first checkpoint: nothing to continue
            args.resume = None
            log.info("--resume auto: no checkpoint in %s yet, starting from the beginning", args.out_dir)
    resume = model_lib.read_checkpoint(args.resume) if args.resume else None
    if resume is not None and args.out_dir is None:
        args.out_dir = str(Path(args.resume).resolve().parent)
    if args.out_dir is None and world_size > 1:
        raise ValueError("under torchrun give --out-dir: every rank must use the same run folder")
    out_dir = Path(args.out_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(plain_args(args), indent=2) + "\n")
    if world_size > 1:
        log.info("torchrun: %d processes (%s), --batch-size %d per process = %d per step", world_size,
                 dist.get_backend(), args.batch_size, args.batch_size * world_size)

    if resume is not None and resume.get("world_size", 1) != world_size:
        raise ValueError(f"{args.resume} was written by {resume.get('world_size', 1)} process(es) and this run has "
                         f"{world_size}: a step there is another number of examples, so resume with "
                         f"--nproc_per_node {resume.get('world_size', 1)}")
    labels, train_set, val_set = prepare_data(args, out_dir)
    check_same_data_on_every_rank(labels, train_set, val_set)
    if resume is not None and resume["labels"] != labels:
        raise ValueError(f"{args.resume} was trained on another label list than {' '.join(args.data_dir)}")
    audit_table, audit = data.sampling_audit(train_set.primary_labels, args.sampler, args.cap_per_class,
                                             extras=train_set.extras if train_set.extras.any() else None)
    if rank == 0:
        data.write_sampling_audit(audit_table, out_dir / "sampling_audit.csv")
    for line in data.format_sampling_audit(audit_table, audit, args.sampler).splitlines():
        (log.warning if line.startswith("WARNING") else log.info)("%s", line)
    if args.audit_sampling:
        return {"audit": audit, "audit_table": audit_table, "out_dir": out_dir}
    parts = build_parts(args, labels, device)
    if args.lr_find:
        if world_size > 1:
            raise ValueError("--lr-find runs in one process: start it without torchrun")
        return {"suggested_lr": lr_range_test(parts, train_set, args, out_dir), "out_dir": out_dir}

    global_batch = args.batch_size * world_size
    steps_per_epoch = audit["epoch_length"] // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} x {world_size} process(es) is larger than an epoch's "
                         f"{audit['epoch_length']} draws")
    parts.schedule = (args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch), args.lr)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "evaluations": 0, "best_metric": None,
             "best_step": None, "patience_counter": 0, "train_loss_sum": 0.0, "train_loss_count": 0, "step_log": [],
             "skipped_nonfinite": 0, "interrupt_requested": False,
             "eval_steps": {max(1, round(steps_per_epoch * k / args.evals_per_epoch))
                            for k in range(1, args.evals_per_epoch + 1)}}
    metrics_path, steps_path, drawn_path = out_dir / "metrics.csv", out_dir / "steps.csv", out_dir / "drawn_counts.csv"
    soundscapes = (SoundscapeValidation(args.val_soundscapes, args.val_soundscape_audio, parts.model)
                   if args.val_soundscapes else None)
    columns = metric_columns(parts.ema is not None, soundscapes is not None)
    if resume is not None:
        restore(parts, resume, state)
        if rank == 0:
            truncate_log(metrics_path, "evaluation", state["evaluations"])
            truncate_log(steps_path, "global_step", state["global_step"] - 1)
            truncate_log(drawn_path, "epoch", state["epoch"] - 1)
        log.info("resumed from %s at epoch %d step %d", args.resume, state["epoch"], state["step_in_epoch"])
    elif rank == 0:  # a fresh run in an old folder starts fresh logs
        for path in (metrics_path, steps_path, drawn_path):
            path.unlink(missing_ok=True)
    parts.trainer = wrap_for_training(parts.model, args, device)  # after restore: DDP copies rank 0's weights

    val_loader = make_loader(val_set, args, device, validation_batches(len(val_set), args.batch_size))
    scored_targets = val_set.targets[:, [label != data.NOCALL for label in labels]]  # as evaluate scores them
    chance = metrics.classification_metrics(  # what random scores get on this validation set
        scored_targets, np.random.default_rng(args.seed).random(scored_targets.shape))
    log.info("chance level on this validation set (random scores): cmAP5 %.4f  cmAP3 %.4f  macroAP %.4f",
             chance["cmap5"], chance["cmap3"], chance["macro_ap"])
    state["chance"] = chance
    stop_reason = []

    def on_eval() -> bool:
        state["evaluations"] += 1
        loss_name = loss_at_epoch(args, state["epoch"])
        distributed.broadcast_buffers(parts.model)
        results = evaluate(parts.model, val_loader, args, loss_name, device)
        if parts.ema is not None:
            distributed.broadcast_buffers(parts.ema.module)
            ema_results = evaluate(parts.ema.module, val_loader, args, loss_name, device)
            results.update({f"ema_{key}": value for key, value in ema_results.items()})
        if soundscapes is not None:
            results.update(soundscapes.evaluate(parts.model, args.batch_size, device))
        row = {"evaluation": state["evaluations"],
               "epoch": round(state["epoch"] + state["step_in_epoch"] / steps_per_epoch, 4),
               "global_step": state["global_step"],
               "train_loss": state["train_loss_sum"] / max(state["train_loss_count"], 1),
               "lr": parts.optimizer.param_groups[0]["lr"], **results}
        state["train_loss_sum"], state["train_loss_count"] = 0.0, 0
        value = results[args.monitor]
        improved = is_improvement(value, state["best_metric"], args.monitor, args.min_delta)
        if improved:
            state["best_metric"], state["best_step"], state["patience_counter"] = value, state["global_step"], 0
        else:
            state["patience_counter"] += 1
        finished_epoch = state["step_in_epoch"] >= steps_per_epoch
        if finished_epoch:  # the checkpoint resumes at the next epoch
            state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
        if rank == 0:
            write_evaluation(row, finished_epoch, improved)
        state["step_log"].clear()
        log.info("epoch %.2f  train_loss %.4f  val_loss %.4f  cmAP5 %.4f  cmAP3 %.4f  macroAP %.4f  LRAP %.4f%s%s",
                 row["epoch"], row["train_loss"], row["val_loss"], row["cmap5"], row["cmap3"],
                 row["macro_ap"], row["lrap"],
                 (f"  EMA cmAP5 {row['ema_cmap5']:.4f}" if parts.ema is not None else "")
                 + (f"  soundscape cmAP5 {row['soundscape_cmap5']:.4f} macroAP {row['soundscape_macro_ap']:.4f}"
                    if soundscapes is not None else ""),
                 "  (best)" if improved else "")
        if args.patience and state["patience_counter"] >= args.patience:
            stop_reason.append(f"{args.monitor} did not improve by more than {args.min_delta} for "
                               f"{args.patience} evaluations (best {state['best_metric']:.4f} at step "
                               f"{state['best_step']})")
        elif args.max_steps and state["global_step"] >= args.max_steps:
            stop_reason.append(f"reached --max-steps {args.max_steps}")
        return bool(stop_reason)

    def write_evaluation(row: dict, finished_epoch: bool, improved: bool) -> None:
        """Rank 0: logs first, checkpoint second: a crash in between leaves rows that the
        resume from the previous checkpoint truncates, never a gap."""
        if finished_epoch:
            record_drawn_species(train_set, args, state["epoch"] - 1, steps_per_epoch * global_batch, drawn_path)
        append_metrics(metrics_path, row, columns)
        append_steps(steps_path, state["step_log"])  # on_eval clears step_log on every rank
        plot_metrics(metrics_path, out_dir / "metrics.png")
        checkpoint = make_checkpoint(parts, args, state)
        save_atomic(checkpoint, out_dir / f"checkpoint_step{state['global_step']:08d}.pt")
        if improved:
            save_atomic(checkpoint, out_dir / "best.pt")
        prune_checkpoints(out_dir, args.keep_last)

    def on_interrupt() -> None:
        """Ctrl-C: finish the step in flight, save a checkpoint at it, then stop."""
        path = out_dir / f"checkpoint_step{state['global_step']:08d}.pt"
        if rank == 0:
            append_steps(steps_path, state["step_log"])
            save_atomic(make_checkpoint(parts, args, state), path)
            prune_checkpoints(out_dir, args.keep_last)
        state["step_log"].clear()
        stop_reason.append(f"interrupted: saved {path.name}; continue with --resume auto --out-dir {out_dir}")

    def request_interrupt(signum, frame):
        log.warning("Ctrl-C: saving a checkpoint after the current step (press again to quit at once)")
        state["interrupt_requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    in_main_thread = threading.current_thread() is threading.main_thread()  # signals need the main thread
    previous_handler = signal.signal(signal.SIGINT, request_interrupt) if in_main_thread else None
    started = time.time()
    try:
        while state["epoch"] < args.epochs and not stop_reason:
            epoch = state["epoch"]
            set_activation(parts, loss_at_epoch(args, epoch))
            sampler = epoch_sampler(train_set, args, epoch, state["step_in_epoch"])
            train_one_epoch(parts, make_loader(train_set, args, device, sampler), args, state, on_eval)
            # shared: Ctrl-C may reach one rank between the epoch's last evaluation and this line
            state["interrupt_requested"] = distributed.any_rank(state["interrupt_requested"])
            if state["interrupt_requested"] and not stop_reason:
                on_interrupt()
            elif state["epoch"] == epoch and not stop_reason:  # epoch ended between evaluations
                state["epoch"], state["step_in_epoch"] = epoch + 1, 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
    log.info("stopped: %s; %.0f s; best %s %.4f; run folder %s",
             stop_reason[0] if stop_reason else f"completed {args.epochs} epochs", time.time() - started,
             args.monitor, state["best_metric"] if state["best_metric"] is not None else float("nan"), out_dir)
    state["stop_reason"] = stop_reason[0] if stop_reason else "epochs"
    state["out_dir"] = out_dir
    return state


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(get_args_parser().parse_args())
    except (model_lib.PretrainedWeightsError, model_lib.CheckpointError, NonFiniteLossError, FloatingPointError,
            CheckpointSaveError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        sys.exit(1)
