"""What a training step updates: the model with its optimiser, learning-rate schedule, AMP
scaler, EMA and DDP wrapper, and the augmentation it applies.

`build_learner` makes all of it at once, from scratch (or --init-from's weights) or
restored from a --resume checkpoint. The schedule and the random streams are pure
functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import augment
import losses
import model as model_lib
import precision

log = logging.getLogger("birdclef")


# ----------------------------------------------------------------------------- schedule, precision, random streams

LR_SCHEDULES = ("cosine", "constant", "step", "onecycle")
OPTIMIZERS = ("adamw", "adam", "sgd")
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4     # torch's OneCycleLR defaults: start at peak/25, end 1e4 lower


@dataclass(frozen=True)
class Schedule:
    """The learning rate as a pure function of the optimiser step (so a resumed run continues exactly).

    Every kind but onecycle warms up linearly from `warmup_start` to `peak` over `warmup_steps`, then:
      cosine    decays to 0 at `total_steps` (half a cosine), and stays there;
      constant  stays at `peak`;
      step      is multiplied by `gamma` every `step_size` steps;
      onecycle  torch's OneCycleLR: a cosine from `warmup_start` (or peak / 25) up to `peak` over
                `warmup_steps`, then a cosine down to 1e4 times below the start at `total_steps`.
    `total_steps` is the schedule's length (--schedule-epochs), independent of when training stops.
    """
    kind: str = "cosine"
    total_steps: int = 1
    warmup_steps: int = 0
    peak: float = 5e-4
    warmup_start: float = 0.0
    step_size: int = 1
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            return self.one_cycle(step)
        if step < self.warmup_steps:
            return self.warmup_start + (self.peak - self.warmup_start) * (step + 1) / self.warmup_steps
        after = step - self.warmup_steps
        if self.kind == "constant":
            return self.peak
        if self.kind == "step":
            return self.peak * self.gamma ** (after // max(self.step_size, 1))
        progress = after / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def one_cycle(self, step: int) -> float:
        start = self.warmup_start or self.peak / ONECYCLE_DIV
        end = start / ONECYCLE_FINAL_DIV
        rise_end, last = max(self.warmup_steps, 1) - 1, max(self.total_steps, 2) - 1
        if step <= rise_end:
            low, high, progress = start, self.peak, step / max(rise_end, 1)
        else:
            low, high, progress = self.peak, end, min((step - rise_end) / max(last - rise_end, 1), 1.0)
        return high + (low - high) / 2 * (math.cos(math.pi * progress) + 1)


@dataclass(frozen=True)
class OptimizerSettings:
    """--optimizer with --lr (the schedule's peak), --momentum, --weight-decay, and the schedule's flags."""
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    schedule_epochs: float          # the schedule's length: --schedule-epochs, else --epochs
    warmup_epochs: float
    warmup_lr: float
    step_epochs: float
    step_gamma: float


def schedule_of(settings: OptimizerSettings, steps_per_epoch: int) -> Schedule:
    """--lr-schedule and its flags, in optimiser steps."""
    return Schedule(kind=settings.lr_schedule, total_steps=int(settings.schedule_epochs * steps_per_epoch),
                    warmup_steps=int(settings.warmup_epochs * steps_per_epoch), peak=settings.lr,
                    warmup_start=settings.warmup_lr, step_size=max(int(settings.step_epochs * steps_per_epoch), 1),
                    gamma=settings.step_gamma)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for the weights of convolutions and linear layers only (parameters of 2 or more
    dimensions); biases and normalisation layers' scales and shifts (1-D) are not decayed: shrinking
    them only pulls activations towards zero, which normalisation then has to undo."""
    decayed = [parameter for parameter in model.parameters() if parameter.ndim >= 2]
    undecayed = [parameter for parameter in model.parameters() if parameter.ndim < 2]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """--optimizer adamw (decoupled weight decay), adam (decay as an L2 term in the gradient) or sgd;
    --momentum is SGD's momentum and the Adams' beta1."""
    groups = parameter_groups(model, settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.momentum, 0.999))
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, betas=(settings.momentum, 0.999))
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; expected one of {OPTIMIZERS}")


def precision_settings(amp: str, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """-> (autocast enabled, autocast dtype, use GradScaler). On the CPU, auto is off unless measured_amp
    has resolved it; a forced bf16 on a CPU without native bf16 warns once (oneDNN emulates it)."""
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
    if device.type == "cpu":
        # not timed here (precision_settings runs every step); measured_amp times training steps
        precision.warn_emulated("--amp bf16 (training)", None, advice="--amp off trains in fp32")
    return True, torch.bfloat16, False


def measured_amp(amp: str, model: model_lib.BirdCallModel, device: torch.device, batch_size: int,
                 remeasure: bool = False) -> str:
    """--amp as training runs it: on the CPU, auto -> "bf16" where training steps of `model` at
    `batch_size` time faster in bf16 than in fp32 on this machine, else "off" (precision.py: cached per
    CPU model, torch version, model, batch size and threads; remeasure times again). Elsewhere, `amp`."""
    if amp != "auto" or device.type != "cpu":
        return amp
    measurement = precision.decide(training_key(model, batch_size), lambda: training_timers(model, batch_size),
                                   remeasure)
    precision.report(measurement, "--amp auto (training on the CPU)")
    return "bf16" if measurement.choice == "bf16" else "off"


def training_key(model: model_lib.BirdCallModel, batch_size: int) -> str:
    """What training's fp32 and bf16 speeds depend on, besides the CPU (precision.cache_key adds it)."""
    return precision.cache_key("train", f"torch {torch.__version__}", precision.model_part(model.config),
                               f"batch {batch_size}", f"{torch.get_num_threads()} threads")


def training_timers(model: model_lib.BirdCallModel, batch_size: int) -> dict:
    """{"fp32": timer, "bf16": timer} for precision.measure: a call times one training step (forward under
    autocast, a loss, backward) of a copy of `model` on noise (probe=True: precision.PROBE_WINDOWS windows),
    so the model's weights, gradients, batch-norm statistics and the run's random streams stay as they were."""
    trainee = copy.deepcopy(model).train()
    waveforms = 0.05 * torch.randn(batch_size, model.window_samples, generator=torch.Generator().manual_seed(0))

    def timer(bf16: bool):
        def step(probe: bool = False) -> float:
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):     # dropout's draws leave the run's random stream alone
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = trainee(waveforms[:precision.PROBE_WINDOWS] if probe else waveforms)
                loss = logits.float().square().mean()   # any loss: the backward pass costs the same
                loss.backward()
            trainee.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite training loss")
            return time.perf_counter() - started
        return step
    return {"fp32": timer(False), "bf16": timer(True)}


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """Seed of the global torch RNG (dropout, drop-path) for one step: resumable by construction.
    Each torchrun rank draws its own (rank 0's, like a single process's, has no rank in it)."""
    entropy = [seed, epoch, step] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# ----------------------------------------------------------------------------- what a training step updates

@dataclass(frozen=True)
class LearnerSettings:
    """Everything build_learner makes a Learner from."""
    model: dict                          # model_lib.MODEL_SETTINGS: the model flags and the loss's activation
    pretrained: bool                     # timm's pretrained weights (or pretrained_file's)
    pretrained_file: str | None
    init_from: str | None                # a checkpoint with another vocabulary to start from
    head_init: str                       # with init_from: copy, fresh or extend
    freeze_backbone_epochs: int
    freeze_head_epochs: int
    optimization: OptimizerSettings
    amp: str
    ema: float                           # EMA decay; 0 = no EMA
    sync_bn: bool
    channels_last: bool
    compile: bool
    augment: augment.AugmentSettings     # scaled by --aug-strength
    background_dir: str | None           # --bg-dir, when augmentation is on
    seed: int                            # of the initial weights


@dataclass(frozen=True)
class StepSettings:
    """What one training step needs besides the Learner."""
    seed: int
    loss: losses.LossSettings
    mixup_alpha: float
    mixup_prob: float                    # scaled by --aug-strength
    amp: str
    clip_grad_norm: float                # 0 = no clipping
    skip_nonfinite: int                  # bad batches skipped before the run stops


@dataclass
class Learner:
    """The model and everything a training step updates or uses with it; built whole by build_learner."""
    model: model_lib.BirdCallModel
    trainer: torch.nn.Module            # what the training forward calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    schedule: Schedule                  # step -> learning rate
    augment: augment.AugmentSettings
    background: augment.BackgroundBank | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None   # with --ema


def build_learner(settings: LearnerSettings, labels: list[str], device: torch.device, steps_per_epoch: int,
                  checkpoint: dict | None = None) -> Learner:
    """A fresh model (or --init-from's weights), its optimiser, scaler, EMA and augmentation; with
    `checkpoint` (--resume), all of their states restored from it."""
    model = initial_model(settings, labels, resumed=checkpoint)
    if settings.sync_bn:
        if not dist.is_initialized() or device.type != "cuda":
            raise ValueError("--sync-bn needs torchrun on CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if settings.channels_last:  # the spectrogram images follow the weights' layout inside the convolutions
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, settings.optimization)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_settings(settings.amp, device)[2])
    ema = None
    if settings.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema), use_buffers=True)
    if settings.compile:  # in place, after the EMA copy: parameter names, and so checkpoints, stay the plain model's
        model.backbone.compile()
    background = None
    if settings.background_dir:
        background = augment.BackgroundBank(settings.background_dir, settings.model["sample_rate"],
                                            model.window_samples)
        log.info("background noise: %d file(s) from %s", len(background), settings.background_dir)
    learner = Learner(model, model, optimizer, scaler, device, schedule=schedule_of(settings.optimization,
                      steps_per_epoch), augment=settings.augment, background=background, ema=ema)
    if checkpoint is not None:
        restore_learner(learner, checkpoint)
    # after restoring: DDP copies rank 0's weights; a frozen part produces no gradients, which DDP must expect
    learner.trainer = wrap_for_training(model, device, settings.freeze_backbone_epochs > 0
                                        or settings.freeze_head_epochs > 0)
    return learner


def initial_model(settings: LearnerSettings, labels: list[str], resumed: dict | None) -> model_lib.BirdCallModel:
    """The model before training: random or pretrained weights, or --init-from's (with its head grown by
    --head-init extend); a resumed run rebuilds the model it made (its weights are restored later)."""
    source = (model_lib.read_checkpoint(settings.init_from) if settings.init_from and resumed is None
              else None)
    if resumed is not None:  # resumed: the model the run made, extended head included
        extended_from = resumed["model_config"].get("head_extended_from", 0)
    else:
        extended_from = len(source["labels"]) if source is not None and settings.head_init == "extend" else 0
    torch.manual_seed(settings.seed)  # the initial weights (later randomness is seeded per step)
    model = model_lib.build_model(settings.model, labels, settings.pretrained, settings.pretrained_file,
                                  extended_from)
    if source is not None:
        counts = model_lib.transfer_weights(model, source, settings.head_init)
        log.info("--init-from %s (--head-init %s): frontend and backbone copied; %d species shared, %d new, "
                 "%d of the checkpoint's unused", settings.init_from, settings.head_init, counts["shared_species"],
                 counts["new_species"], counts["dropped_species"])
    return model


def check_pretrained_weights(backbone: str, pretrained: bool, pretrained_file: str | None) -> None:
    """With --pretrained or --pretrained-file, load the backbone's weights once now (timm keeps a download
    in its cache), so that weights that cannot be had stop the run before any file is written."""
    if pretrained or pretrained_file:
        model_lib.create_backbone(backbone, pretrained=not pretrained_file, pretrained_file=pretrained_file)


def wrap_for_training(model: torch.nn.Module, device, find_unused_parameters: bool) -> torch.nn.Module:
    """The module the training forward calls: DistributedDataParallel under torchrun, else the model."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def set_activation(learner: Learner, loss_name: str) -> None:
    """The activation follows the loss in use (a loss switch from ce to bce switches softmax to sigmoid)."""
    activation = model_lib.activation_for_loss(loss_name)
    for model in (learner.model, learner.ema.module if learner.ema is not None else None):
        if model is not None:
            model.config["activation"] = activation


def set_train_mode(model, frozen_backbone: bool = False, frozen_head: bool = False) -> None:
    """Train mode; a frozen backbone gets no gradients and keeps its BatchNorm statistics; a frozen head
    (--freeze-head-epochs: the pre-trained head, under the new layer of --head-init extend) gets no
    gradients. The extension layer always trains."""
    model.train()
    model.backbone.requires_grad_(not frozen_backbone)
    model.head.requires_grad_(not frozen_head)
    if frozen_backbone:
        model.backbone.eval()


def frozen_parts(settings: LearnerSettings, epoch: int) -> tuple[bool, bool]:
    """(backbone frozen, head frozen) in `epoch`: --freeze-backbone-epochs, --freeze-head-epochs."""
    return epoch < settings.freeze_backbone_epochs, epoch < settings.freeze_head_epochs


def restore_learner(learner: Learner, checkpoint: dict) -> None:
    """Weights, optimiser, loss scaler and EMA from a checkpoint, for --resume."""
    learner.model.load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:   # empty when saved without fp16 (CPU, bf16); --amp may change on resume
        learner.scaler.load_state_dict(checkpoint["scaler"])
    if learner.ema is not None:
        if "model_ema" not in checkpoint:
            raise ValueError("--ema was given but the checkpoint has no EMA weights to resume")
        learner.ema.module.load_state_dict(checkpoint["model_ema"])
        learner.ema.n_averaged.fill_(checkpoint["ema_updates"])
