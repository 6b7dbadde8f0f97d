"""Training-time augmentations on batches of waveforms (B, samples) and targets (B, C).

Every random choice comes from the generator passed in, which train.py seeds
from (seed, epoch, step): a resumed run draws exactly what the uninterrupted
run drew. Nothing here runs in evaluation or inference.
"""
from __future__ import annotations

import numpy as np
import torch


def mixup(waveforms: torch.Tensor, targets: torch.Tensor, alpha: float, probability: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with a partner from a random permutation of the batch.

    lambda ~ Beta(alpha, alpha) per example; waveforms and targets are mixed with
    the same lambda. Each example is mixed with `probability`, else left as it is.
    """
    if alpha <= 0 or probability <= 0:
        return waveforms, targets
    batch = waveforms.shape[0]
    partner = torch.from_numpy(rng.permutation(batch)).to(waveforms.device)
    lam = rng.beta(alpha, alpha, size=batch).astype(np.float32)
    lam[rng.random(batch) >= probability] = 1.0  # examples left unmixed
    lam = torch.from_numpy(lam).to(waveforms.device)
    mixed_waveforms = lam[:, None] * waveforms + (1 - lam[:, None]) * waveforms[partner]   # (B, samples)
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]         # (B, C)
    return mixed_waveforms, mixed_targets
