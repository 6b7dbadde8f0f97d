"""Learning-rate range test (`python train.py --lr-find`): raise the rate exponentially over
--lr-find-steps steps, record the smoothed loss, stop when it diverges, write lr_find.csv
and lr_find.png, and suggest the rate where the loss falls fastest. Nothing it trains is kept.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
from pathlib import Path

import numpy as np

import audio
import learner as learner_lib
import loader
import losses

log = logging.getLogger("birdclef")

LOWEST_RATE, HIGHEST_RATE = 1e-7, 1.0


def find_learning_rate(learner: learner_lib.Learner, train_set, batches: loader.LoaderSettings,
                       loss_settings: losses.LossSettings, steps: int, out_dir: Path) -> float:
    """The range test over `steps` training batches, epoch after epoch -> the suggested --lr."""
    model, optimizer, device = learner.model, learner.optimizer, learner.device
    rates, smoothed_losses, smoothed, best = [], [], 0.0, float("inf")
    learner_lib.set_train_mode(model, False)
    for step, batch in zip(range(steps), endless_batches(train_set, batches, device)):
        rate = LOWEST_RATE * (HIGHEST_RATE / LOWEST_RATE) ** (step / max(steps - 1, 1))
        for group in optimizer.param_groups:
            group["lr"] = rate
        waveforms = audio.as_float(batch["waveform"].to(device))                   # (B, samples)
        loss = losses.batch_loss(model(waveforms), batch["target"].to(device), loss_settings, loss_settings.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = 0.9 * smoothed + 0.1 * loss.item()
        rates.append(rate)
        smoothed_losses.append(smoothed / (1 - 0.9 ** (step + 1)))  # bias-corrected running mean
        best = min(best, smoothed_losses[-1])
        if not math.isfinite(smoothed_losses[-1]) or smoothed_losses[-1] > 4 * best:
            break  # diverged: higher rates say nothing more
    # the slope only where the loss is finite: a NaN at the divergence would otherwise win argmin
    finite = np.isfinite(smoothed_losses)
    if not finite.any():
        raise RuntimeError(f"--lr-find: the loss was not finite even at {LOWEST_RATE:g}: check the data and the loss")
    kept_rates, kept_losses = np.asarray(rates)[finite], np.asarray(smoothed_losses)[finite]
    slopes = (np.gradient(kept_losses, np.log10(kept_rates)) if len(kept_rates) > 2
              else np.zeros(len(kept_rates)))
    suggestion = float(kept_rates[int(np.argmin(slopes))])
    write_curve(rates, smoothed_losses, suggestion, out_dir)
    log.info("learning-rate range test over %d steps: steepest descent at %.2e -> try --lr %.2e "
             "(curve in %s)", len(rates), suggestion, suggestion, out_dir / "lr_find.png")
    return suggestion


def endless_batches(train_set, settings: loader.LoaderSettings, device):
    """Decoded training batches, epoch after epoch (the range test ignores epochs)."""
    for epoch in itertools.count():
        for batch in loader.training_loader(train_set, settings, device, loader.epoch_batches(train_set, settings, epoch)):
            if batch is not None:
                yield batch


def write_curve(rates: list[float], smoothed_losses: list[float], suggestion: float, out_dir: Path) -> None:
    """lr_find.csv (lr, smoothed_loss) and lr_find.png, the suggestion marked."""
    with open(out_dir / "lr_find.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "smoothed_loss"])
        writer.writerows(zip(rates, smoothed_losses))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(rates, smoothed_losses)
    axis.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2e}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("smoothed training loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "lr_find.png", dpi=100)
    plt.close(figure)
