"""Evaluation: what every evaluation scores, on every rank's share, gathered before any metric.

- the validation clips (the first window of each held-out recording): validation
  loss, padded cmAP (pad 5 and 3), macro AP, LRAP -- for the model and its EMA;
- labelled soundscapes (--val-soundscapes), cut into windows exactly as infer.py cuts
  them (soundscapes.py), decoded once and scored at every evaluation;
- the chance level: what random scores get on the same validation clips.
No metric sees the no-call class (--nocall): it is not a species.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

import audio
import distributed
import loader
import losses
import metrics
import model as model_lib
import progress
import soundscapes

log = logging.getLogger("birdclef")


@dataclass
class Validation:
    """What every evaluation scores: the validation clips, --val-soundscapes and --test-soundscapes."""
    loader: torch.utils.data.DataLoader
    soundscapes: "SoundscapeValidation | None"     # soundscape_* columns: may select best.pt
    test_soundscapes: "SoundscapeValidation | None"  # test_* columns: for the record only
    chance: dict                                   # metrics of random scores on the validation clips
    settings: ValidationSettings


@dataclass(frozen=True)
class ValidationSettings:
    """What every evaluation reads and how: --batch-size, --workers, --seed (of the chance level),
    the focal loss's parameters (for val_loss), --val-soundscapes and --test-soundscapes with their audio."""
    batch_size: int
    workers: int
    seed: int
    focal_gamma: float
    focal_alpha: float | None
    soundscapes: str | None
    soundscape_audio: str | None
    test_soundscapes: str | None
    test_soundscape_audio: str | None


def build_validation(model, val_set, settings: ValidationSettings, device) -> Validation:
    """This rank's share of the validation windows, the soundscapes, and the chance level."""
    rank, world_size = distributed.rank_and_world_size()
    mine = list(range(rank, len(val_set), world_size))                     # every world_size-th window
    size = settings.batch_size
    batches = [mine[start:start + size] for start in range(0, len(mine), size)]
    scapes = (SoundscapeValidation(settings.soundscapes, settings.soundscape_audio, model, "soundscape", settings.seed)
              if settings.soundscapes else None)
    test = (SoundscapeValidation(settings.test_soundscapes, settings.test_soundscape_audio, model, "test",
                                 settings.seed) if settings.test_soundscapes else None)
    chance = chance_level(val_set.targets[:, scored_columns(model.labels)], settings.seed)
    log.info("chance level on this validation set (random scores): cmAP5 %.4f  cmAP3 %.4f  macroAP %.4f",
             chance["cmap5"], chance["cmap3"], chance["macro_ap"])
    clips = loader.make_loader(val_set, settings.batch_size, settings.workers, device, batches)
    return Validation(clips, scapes, test, chance, settings)


@torch.inference_mode()
def predict_clips(model, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model on the validation windows -> (logits (N, C), targets (N, C)), gathered from every
    rank and ordered by window."""
    model.eval()
    all_logits, all_targets, all_indices = [], [], []
    for batch in progress.bar(batches, total=len(batches), desc="validation", unit="batch"):
        if batch is None:
            continue
        all_logits.append(model(audio.as_float(batch["waveform"].to(device))).float().cpu())  # (B, C)
        all_targets.append(batch["target"])
        all_indices.append(batch["index"])
    logits, targets = distributed.gather_rows(all_indices, all_logits, all_targets)  # (N, C) from every rank
    if logits is None:
        raise RuntimeError("no validation window could be decoded")
    return logits, targets


def evaluate(model, batches, settings: ValidationSettings, loss_name: str, device) -> dict:
    """Validation loss and ranking metrics on the fixed validation windows."""
    logits, targets = predict_clips(model, batches, device)
    scores = model_lib.checked_scores(logits, model.activation, "the model on the validation windows")
    # Validation loss without label smoothing, so runs with and without it compare.
    loss = losses.compute_loss(logits, targets, loss_name, 0.0, settings.focal_gamma, settings.focal_alpha)
    results = {"val_loss": loss.item()}
    species = scored_columns(model.labels)
    results.update(metrics.classification_metrics(targets.numpy()[:, species], scores[:, species]))
    return results


def scored_columns(labels: list[str]) -> np.ndarray:
    """(C,) bool: the columns metrics score -- every species, not the no-call class."""
    return np.array([label != soundscapes.NOCALL for label in labels])


def chance_level(targets: np.ndarray, seed: int) -> dict:
    """What random scores get on these targets: padded cmAP is far from 0 even then."""
    return metrics.classification_metrics(targets, np.random.default_rng(seed).random(targets.shape))


def evaluate_all(model, ema, validation: Validation, loss_name: str, device) -> dict:
    """The model (and its EMA, if any) on the validation clips, and the model on the soundscapes."""
    distributed.broadcast_buffers(model)
    results = evaluate(model, validation.loader, validation.settings, loss_name, device)
    if ema is not None:
        distributed.broadcast_buffers(ema.module)
        ema_results = evaluate(ema.module, validation.loader, validation.settings, loss_name, device)
        results.update({f"ema_{key}": value for key, value in ema_results.items()})
    for scapes in (validation.soundscapes, validation.test_soundscapes):
        if scapes is not None:
            results.update(scapes.evaluate(model, validation.settings.batch_size, device))
    return results


def chance_columns(validation: Validation) -> dict:
    """The chance level of each scored set, as metrics.csv columns: chance_cmap5 (the clips),
    soundscape_chance_cmap5, test_chance_cmap5."""
    columns = {"chance_cmap5": validation.chance["cmap5"]}
    for scapes in (validation.soundscapes, validation.test_soundscapes):
        if scapes is not None:
            columns[f"{scapes.prefix}_chance_cmap5"] = scapes.chance["cmap5"]
    return columns


class SoundscapeValidation:
    """Labelled soundscape segments, decoded once, scored at every evaluation.

    Clip crops from the training recordings say little about soundscapes; this is
    the number a leaderboard measures. Windows are cut with soundscapes.py's functions,
    exactly as infer.py cuts them, so the two agree. Metrics are named `<prefix>_cmap5` etc.
    """

    def __init__(self, table_path, audio_dir, model, prefix: str = "soundscape", seed: int = 0):
        self.prefix = prefix
        table, audio_dir = soundscapes.read_soundscape_labels(table_path, audio_dir)
        rate, window = model.config["sample_rate"], model.config["window_seconds"]
        windows, weights, ids = [], [], []
        for name in dict.fromkeys(table["file"]):
            waveform = audio.read_audio(audio_dir / name, rate)
            n_rows = soundscapes.row_count(len(waveform), rate)
            starts, row_weights = soundscapes.window_plan(n_rows, window, soundscapes.ROW_SECONDS)
            windows.append(soundscapes.cut_windows(waveform, rate, starts, window))
            weights.append(row_weights)
            ids += soundscapes.row_ids(Path(name).stem, n_rows)
        self.columns = scored_columns(model.labels)
        labelled = soundscapes.read_labels(table_path, list(np.array(model.labels)[self.columns]), audio_dir)
        keep = np.array([row_id in labelled.index for row_id in ids])
        self.windows = torch.from_numpy(np.concatenate(windows))                  # (W, samples)
        self.weights = scipy.linalg.block_diag(*weights)[keep]                     # (labelled rows, W)
        self.targets = labelled.loc[np.array(ids)[keep]].to_numpy()                # (labelled rows, species)
        self.chance = chance_level(self.targets, seed)
        log.info("%s soundscapes: %d labelled 5-s rows from %d file(s) in %s",
                 "validation" if prefix == "soundscape" else prefix, len(self.targets), len(windows), audio_dir)

    @torch.inference_mode()
    def evaluate(self, model, batch_size: int, device) -> dict:
        model.eval()
        rank, world_size = distributed.rank_and_world_size()
        mine = torch.arange(rank, len(self.windows), world_size)               # this rank's share of the windows
        batches = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
        logits = [model(self.windows[index].to(device)).float().cpu()
                  for index in progress.bar(batches, total=len(batches), desc=f"{self.prefix} soundscapes")]
        (logits,) = distributed.gather_rows(batches, logits)                  # (W, C) from every rank
        scores = self.weights @ model_lib.checked_scores(logits, model.activation,
                                                         "the model on the validation soundscapes")
        scores = scores[:, self.columns]
        return {f"{self.prefix}_{key}": value
                for key, value in metrics.classification_metrics(self.targets, scores).items()}
