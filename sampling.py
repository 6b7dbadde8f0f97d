"""Sampling: which recordings an epoch visits, and an audit of what a sampler does to the epoch.

Weighted sampling in the original experiments "created more imbalance than it
removed" and went unnoticed for ten runs. Everything that decides the epoch's
draw is here, next to the audit that makes its effect visible before training
(`sampling_audit`, `python train.py --audit-sampling`) and the counter of what
each epoch actually drew (`DrawCounter`, drawn_counts.csv).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

# Which records an epoch visits. `draw_epoch` makes the whole epoch's draw at once
# from a generator seeded by (seed, epoch) only, so it is the same in every process:
# a distributed run gives rank r the slice `shard_draw(draw, r, world_size,
# batch_size)` (= the trimmed draw[r::world_size]); the shards are disjoint by
# position and together are exactly the trimmed single-process epoch. The global
# position of a shard's element i is r + i * world_size (use it as the crop
# position so crops do not depend on world_size).
#
# Samplers ("none" is the original recipe):
#   none     every record once, in a seeded random order
#   inverse  len(records) draws with replacement, every species the same total
#            weight (per record 1/N_species) -- torch's WeightedRandomSampler with
#            num_samples = len(dataset). On a long tail this draws a species' single
#            recording as often as 500 recordings of a common one: see sampling_audit.
#   sqrt     as inverse but species weight proportional to sqrt(N) (per record 1/sqrt(N))
#   cap      without replacement: at most `cap_per_class` random records of each
#            species per epoch (a fresh subset each epoch), all shuffled; the epoch is
#            sum(min(N, cap)) long.
# `sampling_audit` computes, analytically, what a sampler does to an epoch and
# warns in plain English when it is over-aggressive; `DrawCounter` counts what was
# actually drawn.

SAMPLERS = ("none", "inverse", "sqrt", "cap")
REPEAT_WARNING_DRAWS = 5.0     # warn when one recording is expected this many times per epoch
SEEN_WARNING_SHARE = 0.70      # warn when fewer recordings than this share are seen per epoch


def _check_sampler(sampler: str, cap_per_class: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "cap" and (int(cap_per_class) != cap_per_class or cap_per_class < 1):
        raise ValueError(f"sampler 'cap' needs cap_per_class >= 1, got {cap_per_class!r}")
    if cap_per_class and (int(cap_per_class) != cap_per_class or cap_per_class < 0 or sampler == "none"):
        raise ValueError(f"cap_per_class {cap_per_class!r} goes with samplers cap, inverse and sqrt (with none, "
                         f"use --sampler cap)")


def _species_index(primary_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (species sorted, species index of each record, records per species)."""
    labels = np.asarray(primary_labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("primary_labels must be a non-empty 1-D sequence")
    species, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return species, inverse.ravel(), counts


def _kept_per_species(counts: np.ndarray, cap_per_class: int) -> np.ndarray:
    """Records of each species in an epoch's subset: min(N, cap), or all of them without a cap."""
    return np.minimum(counts, cap_per_class) if cap_per_class else counts


def recording_weights(primary_labels, sampler: str, cap_per_class: int = 0) -> np.ndarray:
    """(n_records,) float64 summing to 1: the probability of each record at one draw.

    none: uniform; inverse: 1/N_species per record (every species the same total);
    sqrt: 1/sqrt(N_species) per record (species total proportional to sqrt(N));
    cap (needs cap_per_class): min(N, cap)/N per record, i.e. each record's share of
    a capped epoch. inverse and sqrt with a cap weigh by the capped count m = min(N, cap):
    a record is in the epoch's subset with probability m/N, then drawn with weight 1/m
    (or 1/sqrt(m)).
    """
    _check_sampler(sampler, cap_per_class)
    _, inverse, counts = _species_index(primary_labels)
    n = counts[inverse].astype(np.float64)
    m = _kept_per_species(counts, cap_per_class)[inverse].astype(np.float64)
    if sampler == "none":
        weights = np.ones_like(n)
    elif sampler == "inverse":
        weights = (m / n) / m
    elif sampler == "sqrt":
        weights = (m / n) / np.sqrt(m)
    else:  # cap
        weights = m / n
    return weights / weights.sum()


def epoch_length(primary_labels, sampler: str, cap_per_class: int = 0) -> int:
    """Draws in one epoch: the number of records, or sum(min(N, cap)) with a cap."""
    _check_sampler(sampler, cap_per_class)
    _, _, counts = _species_index(primary_labels)
    return int(_kept_per_species(counts, cap_per_class).sum())


def expected_draws(primary_labels, sampler: str, cap_per_class: int = 0) -> np.ndarray:
    """(n_records,) float64: expected times each record is drawn in one epoch (analytic).

    none: 1; inverse/sqrt: epoch length * weight; cap: min(N, cap)/N (a record is in
    the epoch's subset with that probability, and then exactly once).
    """
    weights = recording_weights(primary_labels, sampler, cap_per_class)
    if sampler == "none":
        return np.ones(len(weights))
    if sampler == "cap":
        _, inverse, counts = _species_index(primary_labels)
        n = counts[inverse].astype(np.float64)
        return np.minimum(n, cap_per_class) / n
    return epoch_length(primary_labels, sampler, cap_per_class) * weights


def draw_epoch(n_records: int, seed: int, epoch: int, primary_labels=None, sampler: str = "none",
               cap_per_class: int = 0) -> np.ndarray:
    """The records an epoch visits, in order (int64 indices), deterministic from (seed, epoch).

    sampler "none" (the default): a permutation seeded by (seed, epoch).
    "inverse"/"sqrt": n_records draws with replacement by `recording_weights`; with a
    cap, first each species' capped subset (as "cap" chooses it), then as many draws with
    replacement from that subset, weighted 1/m or 1/sqrt(m) by the capped counts.
    "cap": at most `cap_per_class` records of each species, chosen without replacement
    afresh each epoch, then shuffled. primary_labels (one per record) is needed by every
    sampler but "none". The full draw is made here once per epoch; `shard_draw` slices
    it for a distributed rank.
    """
    _check_sampler(sampler, cap_per_class)
    rng = np.random.default_rng([seed, epoch, 7919])
    if sampler == "none":
        if primary_labels is not None and len(primary_labels) != n_records:
            raise ValueError(f"{len(primary_labels)} primary labels for {n_records} records")
        return rng.permutation(n_records)
    if primary_labels is None:
        raise ValueError(f"sampler {sampler!r} needs the primary label of every record")
    if len(primary_labels) != n_records:
        raise ValueError(f"{len(primary_labels)} primary labels for {n_records} records")
    if sampler in ("inverse", "sqrt") and not cap_per_class:
        weights = recording_weights(primary_labels, sampler)
        return rng.choice(n_records, size=n_records, replace=True, p=weights).astype(np.int64)
    _, inverse, counts = _species_index(primary_labels)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.choice(group, size=min(len(group), cap_per_class), replace=False) for group in members]
    if sampler == "cap":
        return rng.permutation(np.concatenate(chosen)).astype(np.int64)
    subset = np.concatenate(chosen)                                         # the capped subset of this epoch
    kept = np.concatenate([np.full(len(group), len(group), dtype=np.float64) for group in chosen])   # m per record
    weights = 1.0 / kept if sampler == "inverse" else 1.0 / np.sqrt(kept)
    return rng.choice(subset, size=len(subset), replace=True, p=weights / weights.sum()).astype(np.int64)


def with_soundscape_windows(draw: np.ndarray, soundscape_rows: np.ndarray, per_batch: int, batch_size: int,
                            world_size: int, seed: int, epoch: int) -> np.ndarray:
    """An epoch's draw of recordings -> the draw with `per_batch` soundscape windows (rows of the dataset,
    --soundscape-labels) in every batch of `batch_size` per process.

    Each global batch of batch_size * world_size draws holds (batch_size - per_batch) * world_size draws of
    `draw`, in order, then per_batch * world_size soundscape windows: a permutation of all of them seeded by
    (seed, epoch), repeated as needed. As shard_draw gives each rank every world_size-th draw, every rank's
    batch has the same split. The epoch is as many batches as `draw` fills.
    """
    recordings_per_batch, windows_per_batch = (batch_size - per_batch) * world_size, per_batch * world_size
    steps = len(draw) // recordings_per_batch
    rng = np.random.default_rng([seed, epoch, 104729])
    needed = steps * windows_per_batch
    rounds = -(-needed // max(len(soundscape_rows), 1))
    windows = np.concatenate([rng.permutation(soundscape_rows) for _ in range(rounds)] or [np.zeros(0, np.int64)])
    batches = np.empty((steps, recordings_per_batch + windows_per_batch), dtype=np.int64)
    batches[:, :recordings_per_batch] = np.asarray(draw)[:steps * recordings_per_batch].reshape(steps, -1)
    batches[:, recordings_per_batch:] = windows[:needed].reshape(steps, windows_per_batch)
    return batches.reshape(-1)


def soundscape_windows_per_batch(share: float, batch_size: int) -> int:
    """--soundscape-share of a batch of `batch_size` (per process), as a whole number of windows."""
    return int(round(share * batch_size))


def shard_draw(draw: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Rank `rank`'s share of an epoch's draw: draw trimmed to a multiple of
    world_size * batch_size, then every world_size-th element from `rank`.

    Every rank gets the same number of whole batches; element i of the shard sits
    at global position rank + i * world_size of the draw.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    draw = np.asarray(draw)
    usable = len(draw) // (world_size * batch_size) * (world_size * batch_size)
    return draw[:usable][rank::world_size]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (record, epoch, position) for one epoch, starting at `start_batch`.

    Starting mid-epoch is how an exact resume skips the batches already trained on
    without decoding them. Incomplete last batches are dropped (BatchNorm and
    mixup need whole batches). With world_size > 1 (torchrun) this rank gets its
    `shard_draw` of the epoch's single draw; `position` is always the position in
    the whole draw, so a crop does not depend on the number of ranks, and batch k
    of all ranks together is batch k of a one-process run with world_size times
    the batch size.
    """

    def __init__(self, draw: np.ndarray, batch_size: int, epoch: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.draw = draw                                   # the whole epoch's draw, every rank's share
        self.shard = shard_draw(draw, rank, world_size, batch_size)
        self.positions = rank + np.arange(len(self.shard)) * world_size
        self.batch_size, self.epoch, self.start_batch = batch_size, epoch, start_batch

    @property
    def steps(self) -> int:
        """Batches in the whole epoch (the same on every rank), including those before start_batch."""
        return len(self.shard) // self.batch_size

    def __len__(self):
        return max(self.steps - self.start_batch, 0)

    def __iter__(self):
        for batch in range(self.start_batch, self.steps):
            chosen = range(batch * self.batch_size, (batch + 1) * self.batch_size)
            yield [(int(self.shard[i]), self.epoch, int(self.positions[i])) for i in chosen]


def _unseen_fraction(expected: np.ndarray, sampler: str, n_draws: int, weights: np.ndarray,
                     in_subset: np.ndarray) -> np.ndarray:
    """Per record: probability it is not drawn at all in an epoch (in_subset: the probability that it
    is in the epoch's capped subset; 1 without a cap)."""
    if sampler in ("inverse", "sqrt"):  # n_draws independent draws with replacement from the subset
        with np.errstate(divide="ignore"):  # a weight of 1 (a single record) -> log(0) -> never unseen
            stays_unseen = np.exp(n_draws * np.log1p(-weights / in_subset))
        return (1.0 - in_subset) + in_subset * stays_unseen
    return 1.0 - np.minimum(expected, 1.0)  # none and cap: each record at most once


def sampling_audit(primary_labels, sampler: str, cap_per_class: int = 0, extras=None):
    """What `sampler` does to an epoch, computed analytically -> (per_species, summary).

    per_species (most recordings first): species, recordings, expected_draws_per_epoch, share (of
    the epoch), draws_per_recording [, extra_recordings when `extras` is given]. summary: recordings,
    epoch_length, species, imbalance_before / _after (max/min recordings resp. expected draws per
    species), recording_imbalance (max/min expected draws per recording; 1 without weighting),
    expected_distinct_recordings, distinct_share, max_draws_of_one_recording, most_repeated_species,
    top10_species_share (and _before), [extra_share,] warnings (plain-English lines).
    extras: optional boolean array marking rows that are extra (detector-built) windows rather
    than recordings; they count as rows of their species.
    """
    _check_sampler(sampler, cap_per_class)
    species, inverse, counts = _species_index(primary_labels)
    n_records = len(inverse)
    weights = recording_weights(primary_labels, sampler, cap_per_class)
    expected = expected_draws(primary_labels, sampler, cap_per_class)
    length = epoch_length(primary_labels, sampler, cap_per_class)
    if sampler == "cap":  # exact: min(N, cap) per species
        per_species_draws = np.minimum(counts, cap_per_class).astype(np.float64)
    else:
        per_species_draws = np.bincount(inverse, weights=expected, minlength=len(species))
    frame = pd.DataFrame({"species": species, "recordings": counts.astype(np.int64),
                          "expected_draws_per_epoch": per_species_draws,
                          "share": per_species_draws / length,
                          "draws_per_recording": per_species_draws / counts})
    extra_share = None
    if extras is not None:
        frame["extra_recordings"], extra_share = _extras_per_species(extras, inverse, len(species), expected, length)
    frame = frame.sort_values(["recordings", "species"], ascending=[False, True], kind="stable").reset_index(drop=True)
    in_subset = (_kept_per_species(counts, cap_per_class) / counts)[inverse]
    unseen = _unseen_fraction(expected, sampler, length, weights, in_subset)
    # with replacement: sum of 1 - (1 - p)^n; none and cap draw each record at most once
    distinct = float(np.sum(1.0 - unseen)) if sampler in ("inverse", "sqrt") else float(length)
    top = int(np.argmax(expected))
    summary = {
        "sampler": sampler,
        "recordings": int(n_records),
        "epoch_length": length,
        "species": int(len(species)),
        "imbalance_before": float(counts.max() / counts.min()),
        "imbalance_after": float(per_species_draws.max() / per_species_draws.min()),
        "recording_imbalance": float(expected.max() / expected.min()),
        "expected_distinct_recordings": distinct,
        "distinct_share": distinct / n_records,
        "max_draws_of_one_recording": float(expected[top]),
        "most_repeated_species": str(species[inverse[top]]),
        "most_repeated_species_recordings": int(counts[inverse[top]]),
        "top10_species_share": float(np.sort(per_species_draws)[::-1][:10].sum() / length),
        "top10_species_share_before": float(np.sort(counts)[::-1][:10].sum() / n_records),
    }
    if cap_per_class:
        summary["cap_per_class"] = int(cap_per_class)
    if extra_share is not None:
        summary["extra_share"] = extra_share
    species_unseen = np.bincount(inverse, weights=unseen, minlength=len(species)) / counts
    summary["warnings"] = _audit_warnings(summary, species, counts, per_species_draws, species_unseen)
    return frame, summary


def _extras_per_species(extras, inverse, n_species: int, expected, length: int) -> tuple[np.ndarray, float]:
    """extras (n_records,) bool -> (extra windows per species, the extras' share of the epoch)."""
    extras = np.asarray(extras, dtype=bool)
    if extras.shape != (len(inverse),):
        raise ValueError(f"extras has shape {extras.shape}; expected ({len(inverse)},)")
    per_species = np.bincount(inverse, weights=extras, minlength=n_species).astype(np.int64)
    return per_species, float(expected[extras].sum() / length)


def _audit_warnings(summary: dict, species, counts, per_species_draws, species_unseen) -> list[str]:
    """Plain-English warnings for an over-aggressive sampler. Per species (arrays in the order of
    `species`): recordings, expected draws per epoch, and the share of its recordings never drawn."""
    warnings = []
    if summary["max_draws_of_one_recording"] > REPEAT_WARNING_DRAWS:
        times = f"drawn ~{summary['max_draws_of_one_recording']:.0f} times per epoch"
        top_species, top_count = summary["most_repeated_species"], summary["most_repeated_species_recordings"]
        if top_count == 1:
            warnings.append(f"the single recording of {top_species} is {times}: it will be memorised")
        else:
            warnings.append(f"each of the {top_count} recordings of {top_species} is {times}: "
                            f"they will be memorised")
    if summary["distinct_share"] < SEEN_WARNING_SHARE:
        starved = max(range(len(species)), key=lambda i: (round(float(species_unseen[i]), 9), counts[i]))
        warnings.append(f"only {summary['distinct_share']:.0%} of the {summary['recordings']} recordings are "
                        f"seen in an epoch; e.g. the {counts[starved]} recordings of {species[starved]} are drawn "
                        f"~{per_species_draws[starved] / counts[starved]:.2f} times each "
                        f"({species_unseen[starved]:.0%} of them unseen per epoch)")
    if summary["imbalance_after"] > summary["imbalance_before"] * (1 + 1e-9):
        warnings.append(f"the sampler increases the species imbalance from {summary['imbalance_before']:.1f}x "
                        f"to {summary['imbalance_after']:.1f}x")
    return warnings


def add_soundscape_windows(per_species: pd.DataFrame, summary: dict, windows: int, per_batch: int, batch_size: int,
                           world_size: int) -> tuple[pd.DataFrame, dict]:
    """The audit of the recordings' draw -> the audit of the epoch with `per_batch` of every batch of `batch_size`
    (per process) from `windows` soundscape windows (with_soundscape_windows): a row for them in the table, and
    in the summary their count, draws and share; epoch_length becomes the whole epoch's draws."""
    steps = summary["epoch_length"] // ((batch_size - per_batch) * world_size)
    draws = steps * per_batch * world_size
    summary = summary | {"recording_draws": steps * (batch_size - per_batch) * world_size,
                         "epoch_length": steps * batch_size * world_size, "soundscape_windows": int(windows),
                         "soundscape_draws": int(draws), "soundscape_share": per_batch / batch_size}
    row = pd.DataFrame([{"species": "(soundscape window)", "recordings": int(windows), "expected_draws_per_epoch":
                         float(draws), "share": per_batch / batch_size, "draws_per_recording": draws / windows}])
    return pd.concat([per_species, row], ignore_index=True), summary


def format_sampling_audit(per_species: pd.DataFrame, summary: dict, sampler: str) -> str:
    """A few lines that make an over-aggressive sampler visible at a glance."""
    cap = f" (cap {summary['cap_per_class']} per species)" if "cap_per_class" in summary else ""
    lines = [
        f"sampling audit, sampler '{sampler}'{cap}: {summary['recordings']} recordings of "
        f"{summary['species']} species, {summary['epoch_length']} draws per epoch",
        f"  species imbalance (max/min per species): {summary['imbalance_before']:.1f}x before -> "
        f"{summary['imbalance_after']:.1f}x after",
        f"  draws per recording: {per_species['draws_per_recording'].min():.3g} to "
        f"{per_species['draws_per_recording'].max():.3g} ({summary['recording_imbalance']:.1f}x spread; "
        f"1.0x without weighting)",
        f"  distinct recordings seen per epoch: {summary['expected_distinct_recordings']:.0f} of "
        f"{summary['recordings']} ({summary['distinct_share']:.1%})",
        f"  most repeated recording: {summary['max_draws_of_one_recording']:.2f} draws per epoch "
        f"({summary['most_repeated_species']}, {summary['most_repeated_species_recordings']} recording(s))",
        f"  top-10 species share of the epoch: {summary['top10_species_share_before']:.1%} before -> "
        f"{summary['top10_species_share']:.1%} after",
    ]
    if "extra_share" in summary:
        lines.append(f"  extra windows share of the epoch: {summary['extra_share']:.1%}")
    if "soundscape_windows" in summary:
        lines.append(f"  soundscape windows (--soundscape-labels): {summary['soundscape_draws']} draws of "
                     f"{summary['soundscape_windows']} windows per epoch, {summary['soundscape_share']:.1%} of "
                     f"every batch")
    lines += [f"WARNING: {warning}" for warning in summary["warnings"]]
    return "\n".join(lines)


def _csv_path(path, default_name: str) -> Path:
    path = Path(path)
    return path / default_name if path.is_dir() else path


def write_sampling_audit(per_species: pd.DataFrame, path) -> Path:
    """Write the per-species table; `path` is the csv file or a folder (-> sampling_audit.csv)."""
    path = _csv_path(path, "sampling_audit.csv")
    per_species.to_csv(path, index=False)
    return path


class DrawCounter:
    """Counts the records actually drawn (e.g. the batches an epoch trained on).

    add(record_indices) any number of times, then to_frame(labels_of_records, epoch)
    -> one row per species (epoch, species, draws); reset() between epochs.
    """

    def __init__(self, n_records: int = 0):
        self.counts = np.zeros(n_records, dtype=np.int64)

    def add(self, record_indices) -> None:
        indices = np.asarray(record_indices, dtype=np.int64).ravel()
        if indices.size == 0:
            return
        if indices.min() < 0:
            raise ValueError("record indices must be >= 0")
        added = np.bincount(indices)
        if len(added) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(added) - len(self.counts)))
        self.counts[:len(added)] += added

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        self.counts[:] = 0

    def to_frame(self, labels_of_records, epoch: int) -> pd.DataFrame:
        """-> DataFrame(epoch, species, draws), every species of labels_of_records, most drawn first."""
        labels = np.asarray(labels_of_records)
        if len(self.counts) > len(labels):
            raise ValueError(f"record index {len(self.counts) - 1} drawn but only {len(labels)} labels given")
        counts = np.pad(self.counts, (0, len(labels) - len(self.counts)))
        species, inverse = np.unique(labels, return_inverse=True)
        draws = np.bincount(inverse.ravel(), weights=counts, minlength=len(species)).astype(np.int64)
        frame = pd.DataFrame({"epoch": int(epoch), "species": species, "draws": draws})
        return frame.sort_values(["draws", "species"], ascending=[False, True], kind="stable").reset_index(drop=True)


def append_drawn_counts(path, frame: pd.DataFrame) -> Path:
    """Append DrawCounter.to_frame rows to drawn_counts.csv (`path`: the file or its folder);
    the header is written only when the file is new or empty."""
    path = _csv_path(path, "drawn_counts.csv")
    missing = [column for column in ("epoch", "species", "draws") if column not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}")
    new = not path.is_file() or path.stat().st_size == 0
    frame[["epoch", "species", "draws"]].to_csv(path, mode="a", header=new, index=False)
    return path


