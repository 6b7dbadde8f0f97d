"""Losses: always means over the batch, never sums.

A summed loss grows with the batch and the class count; in the original
experiments a `reduction='sum'` loss sent predictions to inf. Each loss goes with
one activation (model.activation_for_loss): softmax for ce, sigmoid for bce and
focal, applied by model.activate() at evaluation and inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("ce", "bce", "focal")


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, loss_name: str, label_smoothing: float = 0.0,
                 focal_gamma: float = 2.0, focal_alpha: float | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of logits (B, C) against soft targets (B, C), in float32; with `weights` (B,), each
    example's loss is weighted (a weighted mean over the batch: sum(w * loss) / B, so weights of 1 give
    the plain mean and a weight of 0 removes an example).

    Always a mean, never a sum: a summed loss grows with batch and class count and
    was what sent the original experiments' predictions to inf.
    """
    logits, targets = logits.float(), targets.float()
    if loss_name == "ce":
        # Soft-target cross-entropy; targets renormalised to a distribution so that
        # secondary labels share the mass instead of inflating it (a teacher's probabilities too:
        # CE learns their ratios, not their level; without smoothing, all-zero targets add nothing)
        distribution = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-8)
        distribution = distribution * (1 - label_smoothing) + label_smoothing / logits.shape[1]
        if weights is None:
            return F.cross_entropy(logits, distribution)
        return (F.cross_entropy(logits, distribution, reduction="none") * weights.float()).mean()
    targets = targets * (1 - label_smoothing) + label_smoothing / 2  # towards 0.5 for a binary target
    if loss_name == "bce":
        if weights is None:
            return F.binary_cross_entropy_with_logits(logits, targets)
        per_example = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)   # (B,)
        return (per_example * weights.float()).mean()
    if loss_name == "focal":
        # Sigmoid focal loss (Lin et al. 2017): BCE down-weighted by (1 - p_t)^gamma on
        # easy examples; with gamma 0 and no alpha it is exactly BCE.
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")   # (B, C)
        probability = logits.sigmoid()
        p_t = probability * targets + (1 - probability) * (1 - targets)
        loss = bce * (1 - p_t) ** focal_gamma
        if focal_alpha is not None:
            loss = loss * (focal_alpha * targets + (1 - focal_alpha) * (1 - targets))
        return loss.mean() if weights is None else (loss.mean(dim=1) * weights.float()).mean()
    raise ValueError(f"unknown loss {loss_name!r}")


@dataclass(frozen=True)
class LossSettings:
    """--loss and its parameters; --loss-after replaces --loss from --loss-switch-epoch on."""
    loss: str
    label_smoothing: float
    focal_gamma: float
    focal_alpha: float | None
    loss_after: str | None
    loss_switch_epoch: int | None

    def at_epoch(self, epoch: int) -> str:
        """The loss in use in `epoch`."""
        if self.loss_after and self.loss_switch_epoch is not None and epoch >= self.loss_switch_epoch:
            return self.loss_after
        return self.loss


def batch_loss(logits, targets, settings: LossSettings, loss_name: str,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a batch: `loss_name` (settings.at_epoch) with the settings' parameters;
    `weights` (B,): each window's loss weight (--soundscape-weight), None: all 1."""
    return compute_loss(logits, targets, loss_name, settings.label_smoothing, settings.focal_gamma,
                        settings.focal_alpha, weights)


class NonFiniteLossError(RuntimeError):
    pass


