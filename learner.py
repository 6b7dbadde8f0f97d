"""What a training step updates: the model with its optimiser, learning-rate schedule, AMP
scaler, EMA and DDP wrapper, and the augmentation it applies.

`build_learner` makes all of it at once, from scratch (or --init-from's weights) or
restored from a --resume checkpoint. The schedule and the random streams are pure
functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import augment
import model as model_lib

log = logging.getLogger("birdclef")


# ----------------------------------------------------------------------------- schedule, precision, random streams

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


# ----------------------------------------------------------------------------- what a training step updates

@dataclass
class Learner:
    """The model and everything a training step updates or uses with it; built whole by build_learner."""
    model: model_lib.BirdCallModel
    trainer: torch.nn.Module            # what the training forward calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    schedule: tuple                     # (total steps, warm-up steps, peak learning rate)
    augment: augment.AugmentSettings
    background: augment.BackgroundBank | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None   # with --ema


def build_learner(args, labels: list[str], device: torch.device, steps_per_epoch: int,
                  checkpoint: dict | None = None) -> Learner:
    """A fresh model (or --init-from's weights), its optimiser, scaler, EMA and augmentation; with
    `checkpoint` (--resume), all of their states restored from it."""
    torch.manual_seed(args.seed)  # the initial weights (later randomness is seeded per step)
    model = model_lib.build_model(args, labels)
    if args.init_from and checkpoint is None:
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
    scaler = torch.amp.GradScaler(device.type, enabled=precision_settings(args.amp, device)[2])
    ema = None
    if args.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    if args.compile:  # in place, after the EMA copy: parameter names, and so checkpoints, stay the plain model's
        model.backbone.compile()
    background = None
    if args.bg_dir and args.aug_strength > 0:
        background = augment.BackgroundBank(args.bg_dir, args.sample_rate, model.window_samples)
        log.info("background noise: %d file(s) from %s", len(background), args.bg_dir)
    learner = Learner(model, model, optimizer, scaler, device, augment=augment_settings(args), background=background,
                      schedule=(args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch), args.lr),
                      ema=ema)
    if checkpoint is not None:
        restore_learner(learner, checkpoint)
    learner.trainer = wrap_for_training(model, args, device)  # after restoring: DDP copies rank 0's weights
    return learner


def augment_settings(args) -> augment.AugmentSettings:
    """The augmentation flags, scaled by --aug-strength."""
    settings = augment.AugmentSettings(
        noise_prob=args.noise_prob, noise_snr=tuple(args.noise_snr), bg_prob=args.bg_prob if args.bg_dir else 0.0,
        bg_snr=tuple(args.bg_snr), cutmix_prob=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha,
        gain_prob=args.gain_prob, gain_db=args.gain_db, shift_prob=args.shift_prob, shift_max=args.shift_max,
        freq_masks=args.freq_masks, time_masks=args.time_masks, mask_max_pct=args.mask_max_pct,
        mix_prob=args.mix_prob, mix_clips=args.mix_clips, mix_gain_db=tuple(args.mix_gain_db),
        distance_prob=args.distance_prob, distance_db=tuple(args.distance_db),
        distance_lowpass_hz=tuple(args.distance_lowpass), reverb_prob=args.reverb_prob,
        reverb_rt60=tuple(args.reverb_rt60), sample_rate=args.sample_rate)
    return settings.scaled(args.aug_strength)


def wrap_for_training(model: torch.nn.Module, args, device) -> torch.nn.Module:
    """The module the training forward calls: DistributedDataParallel under torchrun, else the model."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        # a frozen backbone produces no gradients, which DDP must be told to expect
        find_unused_parameters=args.freeze_backbone_epochs > 0)


def set_activation(learner: Learner, loss_name: str) -> None:
    """The activation follows the loss in use (a loss switch from ce to bce switches softmax to sigmoid)."""
    activation = model_lib.activation_for_loss(loss_name)
    for model in (learner.model, learner.ema.module if learner.ema is not None else None):
        if model is not None:
            model.config["activation"] = activation


def set_train_mode(model, frozen_backbone: bool) -> None:
    """Train mode; with a frozen backbone its weights get no gradients and its BatchNorm statistics stay."""
    model.train()
    model.backbone.requires_grad_(not frozen_backbone)
    if frozen_backbone:
        model.backbone.eval()



def restore_learner(learner: Learner, checkpoint: dict) -> None:
    learner.model.load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    learner.scaler.load_state_dict(checkpoint["scaler"])
    if learner.ema is not None:
        if "model_ema" not in checkpoint:
            raise ValueError("--ema was given but the checkpoint has no EMA weights to resume")
        learner.ema.module.load_state_dict(checkpoint["model_ema"])
        learner.ema.n_averaged.fill_(checkpoint["ema_updates"])
