"""Tests for sampling.py: weights, epoch draws, batches and shards, the audit, draw counts.

Metadata tables are plain arrays made here; no audio is read. Reference values are
computed by hand (plain loops over species), not with the code under test.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sampling

SMALL_COUNTS = {"a": 50, "b": 20, "c": 10, "d": 5, "e": 2, "f": 1}


def labels_from_counts(counts: dict[str, int], shuffle_seed: int | None = 0) -> np.ndarray:
    labels = np.array([species for species, n in counts.items() for _ in range(n)])
    if shuffle_seed is not None:  # records of a species need not be contiguous
        labels = np.random.default_rng(shuffle_seed).permutation(labels)
    return labels


def long_tail_counts() -> dict[str, int]:
    """BirdCLEF-2023-like: 264 species, Zipf-like from 500 recordings down to 1."""
    return {f"sp{rank:03d}": max(int(round(500 / rank ** 1.1)), 1) for rank in range(1, 265)}


@pytest.fixture(scope="module")
def long_tail():
    counts = long_tail_counts()
    return counts, labels_from_counts(counts)


def per_species(labels, values) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label, value in zip(labels, values):
        totals[label] = totals.get(label, 0.0) + float(value)
    return totals


# ----------------------------------------------------------------------------- weights, expected draws

def test_recording_weights_by_hand():
    labels = labels_from_counts(SMALL_COUNTS)
    for sampler, per_record in [("none", lambda n: 1.0), ("inverse", lambda n: 1.0 / n),
                                ("sqrt", lambda n: n ** -0.5)]:
        weights = sampling.recording_weights(labels, sampler)
        assert weights.dtype == np.float64 and weights.shape == (len(labels),)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        raw = np.array([per_record(SMALL_COUNTS[label]) for label in labels])
        np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-12)
    totals = per_species(labels, sampling.recording_weights(labels, "inverse"))
    np.testing.assert_allclose(list(totals.values()), 1 / 6, rtol=1e-12)
    sqrt_totals = per_species(labels, sampling.recording_weights(labels, "sqrt"))
    norm = sum(n ** 0.5 for n in SMALL_COUNTS.values())
    for species, n in SMALL_COUNTS.items():
        assert sqrt_totals[species] == pytest.approx(n ** 0.5 / norm, rel=1e-12)


def test_unknown_sampler_and_missing_cap_are_errors():
    labels = labels_from_counts(SMALL_COUNTS)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.recording_weights(labels, "balanced")
    with pytest.raises(ValueError, match="cap_per_class"):
        sampling.draw_epoch(len(labels), seed=0, epoch=0, primary_labels=labels, sampler="cap", cap_per_class=0)
    with pytest.raises(ValueError, match="primary label"):
        sampling.draw_epoch(len(labels), seed=0, epoch=0, primary_labels=None, sampler="inverse")
    with pytest.raises(ValueError, match="primary labels for"):
        sampling.draw_epoch(len(labels) + 1, seed=0, epoch=0, primary_labels=labels, sampler="sqrt")


def test_expected_draws_by_hand():
    labels = labels_from_counts(SMALL_COUNTS)
    n = len(labels)
    np.testing.assert_array_equal(sampling.expected_draws(labels, "none", cap_per_class=0), np.ones(n))
    np.testing.assert_allclose(sampling.expected_draws(labels, "inverse", cap_per_class=0),
                               [n / 6 / SMALL_COUNTS[label] for label in labels], rtol=1e-12)
    np.testing.assert_allclose(sampling.expected_draws(labels, "cap", cap_per_class=4),
                               [min(SMALL_COUNTS[label], 4) / SMALL_COUNTS[label] for label in labels], rtol=1e-12)
    assert sampling.expected_draws(labels, "cap", cap_per_class=4).sum() == pytest.approx(4 + 4 + 4 + 4 + 2 + 1)


# ----------------------------------------------------------------------------- epoch draws

def test_none_is_exactly_the_old_permutation():
    for n, seed, epoch in [(1, 0, 0), (50, 1, 0), (123, 7, 3), (2421, 42, 11)]:
        old = np.random.default_rng([seed, epoch, 7919]).permutation(n)
        np.testing.assert_array_equal(sampling.draw_epoch(n, seed=seed, epoch=epoch), old)
        np.testing.assert_array_equal(sampling.draw_epoch(n, seed=seed, epoch=epoch, sampler="none"), old)
        ignored = sampling.draw_epoch(n, seed=seed, epoch=epoch, primary_labels=np.zeros(n), sampler="none")
        np.testing.assert_array_equal(ignored, old)                     # labels play no part
        with pytest.raises(ValueError, match="use --sampler cap"):      # a cap is never silently ignored
            sampling.draw_epoch(n, seed=seed, epoch=epoch, primary_labels=np.zeros(n), sampler="none",
                                cap_per_class=3)


@pytest.mark.parametrize("sampler", ["inverse", "sqrt"])
def test_weighted_draw_frequencies_match_the_weights(sampler):
    """Species frequencies over many epochs within a 4-sigma binomial bound of the weights."""
    labels = labels_from_counts(SMALL_COUNTS)
    n, epochs = len(labels), 2000
    draws = np.concatenate([sampling.draw_epoch(n, seed=3, epoch=epoch, primary_labels=labels, sampler=sampler)
                            for epoch in range(epochs)])
    assert len(draws) == n * epochs and draws.min() >= 0 and draws.max() < n
    total = len(draws)
    norm = sum((1.0 if sampler == "inverse" else m ** 0.5) for m in SMALL_COUNTS.values())
    drawn_labels = labels[draws]
    for species, count in SMALL_COUNTS.items():
        p = (1.0 if sampler == "inverse" else count ** 0.5) / norm
        observed = int(np.sum(drawn_labels == species))
        sigma = (total * p * (1 - p)) ** 0.5
        assert abs(observed - total * p) < 4 * sigma, (species, observed, total * p, sigma)
    # within a species every recording equally likely: the singleton's one record gets all of "f"
    single = np.flatnonzero(labels == "f")[0]
    assert np.sum(draws == single) == np.sum(drawn_labels == "f")


def test_weighted_draw_is_deterministic_per_seed_and_epoch():
    labels = labels_from_counts(SMALL_COUNTS)
    n = len(labels)
    def draw_inverse(seed, epoch):
        return sampling.draw_epoch(n, seed=seed, epoch=epoch, primary_labels=labels, sampler="inverse")
    a = draw_inverse(seed=5, epoch=2)
    np.testing.assert_array_equal(a, draw_inverse(seed=5, epoch=2))
    assert not np.array_equal(a, draw_inverse(seed=5, epoch=3))
    assert not np.array_equal(a, draw_inverse(seed=6, epoch=2))
    assert a.dtype == np.int64 and len(a) == n


@pytest.mark.parametrize("sampler", ["inverse", "sqrt"])
def test_weighting_within_a_capped_subset(sampler):
    """--sampler inverse/sqrt --cap-per-class 4: each epoch at most 4 records of a species (a fresh subset),
    drawn with replacement weighted by the capped counts m = min(N, 4); checked by hand and by frequency."""
    labels = labels_from_counts(SMALL_COUNTS)                  # 50, 20, 10, 5, 2, 1
    n, cap = len(labels), 4
    kept = {species: min(count, cap) for species, count in SMALL_COUNTS.items()}     # 4, 4, 4, 4, 2, 1
    length = sum(kept.values())
    assert sampling.epoch_length(labels, sampler, cap) == length == 19
    weight = {species: 1.0 / (m if sampler == "inverse" else m ** 0.5) for species, m in kept.items()}
    species_total = {species: kept[species] * weight[species] for species in kept}   # weight of the species in a draw
    norm = sum(species_total.values())
    expected = sampling.expected_draws(labels, sampler, cap)
    for species, count in SMALL_COUNTS.items():                # per record: in the subset m/N, then weighted
        by_hand = length * (kept[species] / count) * weight[species] / norm
        np.testing.assert_allclose(expected[labels == species], by_hand)
    epochs = 3000
    draws = [sampling.draw_epoch(n, seed=1, epoch=epoch, primary_labels=labels, sampler=sampler, cap_per_class=cap)
             for epoch in range(epochs)]
    for draw in draws[:50]:                                    # a subset of at most `cap` records per species
        assert len(draw) == length
        for species in SMALL_COUNTS:
            assert len(set(draw[labels[draw] == species])) <= kept[species]
    drawn_labels = labels[np.concatenate(draws)]
    total = length * epochs
    for species in SMALL_COUNTS:
        p = species_total[species] / norm
        sigma = (total * p * (1 - p)) ** 0.5
        assert abs(np.sum(drawn_labels == species) - total * p) < 4 * sigma
    _, summary = sampling.sampling_audit(labels, sampler, cap)
    assert summary["cap_per_class"] == cap and summary["epoch_length"] == length
    with pytest.raises(ValueError, match="goes with samplers"):
        sampling.draw_epoch(n, seed=1, epoch=0, primary_labels=labels, sampler="none", cap_per_class=cap)


def test_cap_takes_min_n_cap_distinct_records_per_species():
    labels = labels_from_counts(SMALL_COUNTS)
    n, cap = len(labels), 4

    def draw_capped(epoch, cap_per_class):
        return sampling.draw_epoch(n, seed=9, epoch=epoch, primary_labels=labels, sampler="cap",
                                   cap_per_class=cap_per_class)
    subsets = []
    for epoch in range(5):
        draw = draw_capped(epoch, cap)
        assert draw.dtype == np.int64
        assert len(draw) == sum(min(m, cap) for m in SMALL_COUNTS.values())
        assert len(set(draw.tolist())) == len(draw)  # without replacement
        for species, count in SMALL_COUNTS.items():
            assert np.sum(labels[draw] == species) == min(count, cap)
        np.testing.assert_array_equal(draw, draw_capped(epoch, cap))
        subsets.append(frozenset(draw[labels[draw] == "a"].tolist()))
    assert len(set(subsets)) > 1  # a fresh subset of the big species each epoch
    # small species always contribute all their records
    for epoch in range(3):
        draw = draw_capped(epoch, cap)
        assert set(np.flatnonzero(labels == "e")) <= set(draw.tolist())
    # the order is shuffled, not grouped by species
    draw = draw_capped(0, cap)
    assert not np.array_equal(np.sort(draw), draw)
    # a cap above every species count is a permutation of all records
    np.testing.assert_array_equal(np.sort(draw_capped(0, 1000)), np.arange(n))


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 3), (3, 4), (4, 1), (8, 2)])
def test_shards_are_disjoint_and_together_the_trimmed_draw(world_size, batch_size):
    labels = labels_from_counts(SMALL_COUNTS)
    # with repeats: compare positions
    draw = sampling.draw_epoch(len(labels), seed=1, epoch=0, primary_labels=labels, sampler="inverse")
    usable = len(draw) // (world_size * batch_size) * (world_size * batch_size)
    shards = [sampling.shard_draw(draw, rank=rank, world_size=world_size, batch_size=batch_size)
              for rank in range(world_size)]
    assert all(len(shard) == usable // world_size for shard in shards)
    assert all(len(shard) % batch_size == 0 for shard in shards)
    positions = [np.arange(rank, usable, world_size) for rank in range(world_size)]
    assert len(set(np.concatenate(positions).tolist())) == usable  # disjoint, all covered
    rebuilt = np.empty(usable, dtype=draw.dtype)
    for rank, shard in enumerate(shards):
        np.testing.assert_array_equal(shard, draw[positions[rank]])
        rebuilt[rank::world_size] = shard
    np.testing.assert_array_equal(rebuilt, draw[:usable])
    with pytest.raises(ValueError):
        sampling.shard_draw(draw, rank=world_size, world_size=world_size, batch_size=batch_size)


# ----------------------------------------------------------------------------- batches of an epoch

def test_epoch_draw_is_a_seeded_permutation_changing_with_epoch():
    a = sampling.draw_epoch(50, seed=1, epoch=0)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, sampling.draw_epoch(50, seed=1, epoch=0))
    b = sampling.draw_epoch(50, seed=1, epoch=1)
    np.testing.assert_array_equal(np.sort(b), np.arange(50))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, sampling.draw_epoch(50, seed=2, epoch=0))


def test_sampler_batches_length_and_drop_last():
    draw = sampling.draw_epoch(10, seed=0, epoch=2)
    sampler = sampling.EpochBatchSampler(draw, batch_size=3, epoch=2)
    batches = list(sampler)
    assert len(sampler) == 3 == len(batches)
    expected = [[(int(draw[p]), 2, p) for p in range(3 * b, 3 * b + 3)] for b in range(3)]
    assert batches == expected
    # the incomplete last batch (position 9) is dropped
    assert all(position != 9 for batch in batches for _, _, position in batch)
    exact = sampling.EpochBatchSampler(draw[:9], batch_size=3, epoch=2)
    assert len(exact) == 3 and sorted(r for b in exact for r, _, _ in b) == sorted(draw[:9].tolist())
    too_small = sampling.EpochBatchSampler(draw[:2], batch_size=3, epoch=2)
    assert len(too_small) == 0 and list(too_small) == []


@pytest.mark.parametrize("start_batch", [0, 1, 2, 3, 4, 7])
def test_sampler_start_batch_yields_the_tail_of_the_epoch(start_batch):
    draw = sampling.draw_epoch(17, seed=4, epoch=1)
    full = list(sampling.EpochBatchSampler(draw, batch_size=4, epoch=1))
    assert len(full) == 4
    resumed = sampling.EpochBatchSampler(draw, batch_size=4, epoch=1, start_batch=start_batch)
    assert list(resumed) == full[start_batch:]
    assert len(resumed) == len(full[start_batch:])


def test_sharded_sampler_positions_do_not_depend_on_the_number_of_processes():
    draw = sampling.draw_epoch(23, seed=3, epoch=1)
    one = [item for batch in sampling.EpochBatchSampler(draw, batch_size=6, epoch=1) for item in batch]
    three = [item for rank in range(3)
             for batch in sampling.EpochBatchSampler(draw, batch_size=2, epoch=1, start_batch=0, rank=rank,
                                                     world_size=3)
             for item in batch]
    assert sorted(three, key=lambda item: item[2]) == one


# ----------------------------------------------------------------------------- audit

def test_inverse_audit_on_the_long_tail(long_tail):
    counts, labels = long_tail
    frame, summary = sampling.sampling_audit(labels, "inverse")
    n, n_species = len(labels), len(counts)
    assert summary["recordings"] == summary["epoch_length"] == n and summary["species"] == n_species == 264
    # by hand: every species gets n/264 draws; a singleton species' record gets them all
    reference_per_species = {species: n / n_species for species in counts}
    reference_max = 0.0
    for species, count in counts.items():
        reference_max = max(reference_max, reference_per_species[species] / count)
    assert min(counts.values()) == 1
    assert reference_max == pytest.approx(n / n_species, rel=1e-12)
    np.testing.assert_allclose(frame["expected_draws_per_epoch"], n / n_species, rtol=0, atol=1e-9)
    assert summary["max_draws_of_one_recording"] == pytest.approx(reference_max, abs=1e-9)
    assert summary["imbalance_before"] == 500.0
    assert summary["imbalance_after"] == pytest.approx(1.0, abs=1e-9)
    assert summary["imbalance_after"] < summary["imbalance_before"]
    assert summary["top10_species_share"] == pytest.approx(10 / n_species, rel=1e-9)
    # expected distinct recordings, by hand: 1 - (1 - p)^n summed over recordings
    reference_distinct = 0.0
    for count in counts.values():
        p = (1 / n_species) / count
        reference_distinct += count * (1 - (1 - p) ** n)
    assert summary["expected_distinct_recordings"] == pytest.approx(reference_distinct, rel=1e-9)
    assert summary["distinct_share"] == pytest.approx(reference_distinct / n, rel=1e-9)
    assert any("single recording" in w and f"~{n / n_species:.0f} times" in w and "memorised" in w
               for w in summary["warnings"])
    assert any("seen in an epoch" in w for w in summary["warnings"])
    # the table: sorted by recordings, shares sum to 1, columns as documented
    assert list(frame.columns) == ["species", "recordings", "expected_draws_per_epoch", "share",
                                   "draws_per_recording"]
    assert frame["recordings"].is_monotonic_decreasing and frame["species"].iloc[0] == "sp001"
    assert frame["share"].sum() == pytest.approx(1.0)
    assert dict(zip(frame["species"], frame["recordings"])) == counts


def test_none_audit_has_no_repetition(long_tail):
    counts, labels = long_tail
    frame, summary = sampling.sampling_audit(labels, "none")
    np.testing.assert_allclose(sampling.expected_draws(labels, "none"), 1.0)
    np.testing.assert_allclose(frame["expected_draws_per_epoch"], frame["recordings"])
    assert summary["max_draws_of_one_recording"] == 1.0
    assert summary["imbalance_after"] == summary["imbalance_before"] == 500.0
    assert summary["expected_distinct_recordings"] == len(labels) and summary["distinct_share"] == 1.0
    assert summary["warnings"] == []


def test_sqrt_is_between_none_and_inverse(long_tail):
    _, labels = long_tail
    audits = {s: sampling.sampling_audit(labels, s)[1] for s in ("none", "sqrt", "inverse")}
    maxima = [audits[s]["max_draws_of_one_recording"] for s in ("none", "sqrt", "inverse")]
    assert maxima[0] < maxima[1] < maxima[2]
    assert audits["inverse"]["imbalance_after"] < audits["sqrt"]["imbalance_after"] < audits["none"]["imbalance_after"]
    assert audits["sqrt"]["imbalance_after"] == pytest.approx(500 ** 0.5, rel=1e-9)
    distinct = [audits[s]["distinct_share"] for s in ("none", "sqrt", "inverse")]
    assert distinct[0] > distinct[1] > distinct[2]


def test_cap_audit(long_tail):
    counts, labels = long_tail
    frame, summary = sampling.sampling_audit(labels, "cap", cap_per_class=20)
    length = sum(min(c, 20) for c in counts.values())
    assert summary["epoch_length"] == length == summary["expected_distinct_recordings"]
    np.testing.assert_allclose(frame["expected_draws_per_epoch"], np.minimum(frame["recordings"], 20))
    assert summary["max_draws_of_one_recording"] == 1.0
    assert summary["imbalance_after"] == 20.0


def test_audit_extras():
    labels = labels_from_counts(SMALL_COUNTS, shuffle_seed=None)
    extras = np.zeros(len(labels), dtype=bool)
    extras[:10] = True  # 10 of species "a"'s 50 rows are extra windows
    frame, summary = sampling.sampling_audit(labels, "none", extras=extras)
    assert dict(zip(frame["species"], frame["extra_recordings"])) == {"a": 10, "b": 0, "c": 0, "d": 0,
                                                                       "e": 0, "f": 0}
    assert summary["extra_share"] == pytest.approx(10 / len(labels))
    _, inverse_summary = sampling.sampling_audit(labels, "inverse", extras=extras)
    assert inverse_summary["extra_share"] == pytest.approx(10 / 50 / 6)
    assert "extra_share" not in sampling.sampling_audit(labels, "none")[1]


def test_format_sampling_audit_shows_the_problem(long_tail):
    _, labels = long_tail
    frame, summary = sampling.sampling_audit(labels, "inverse")
    text = sampling.format_sampling_audit(frame, summary, "inverse")
    assert "500.0x before" in text and "1.0x after" in text
    assert "WARNING: the single recording of" in text
    assert f"{summary['distinct_share']:.1%}" in text
    assert len(text.splitlines()) <= 12
    calm = sampling.format_sampling_audit(*sampling.sampling_audit(labels, "none"), "none")
    assert "WARNING" not in calm and "500.0x before -> 500.0x after" in calm


def test_write_sampling_audit(tmp_path, long_tail):
    _, labels = long_tail
    frame, _ = sampling.sampling_audit(labels, "sqrt")
    path = sampling.write_sampling_audit(frame, tmp_path)
    assert path == tmp_path / "sampling_audit.csv"
    back = pd.read_csv(path)
    assert list(back.columns) == list(frame.columns) and len(back) == 264
    np.testing.assert_allclose(back["share"], frame["share"])


# ----------------------------------------------------------------------------- drawn counts

def test_draw_counter_and_append_drawn_counts(tmp_path):
    labels = np.array(["b", "a", "a", "c", "b", "a"])
    counter = sampling.DrawCounter(len(labels))
    counter.add([1, 2, 1])
    counter.add(np.array([0, 5]))
    counter.add([])
    assert counter.total == 5
    frame = counter.to_frame(labels, epoch=0)
    assert list(frame.columns) == ["epoch", "species", "draws"]
    assert dict(zip(frame["species"], frame["draws"])) == {"a": 4, "b": 1, "c": 0}
    assert (frame["epoch"] == 0).all() and frame["draws"].iloc[0] == 4
    path = sampling.append_drawn_counts(tmp_path / "drawn_counts.csv", frame)
    counter.reset()
    counter.add([3, 3])
    sampling.append_drawn_counts(tmp_path, counter.to_frame(labels, epoch=1))
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,species,draws"
    assert sum(line.startswith("epoch") for line in lines) == 1 and len(lines) == 1 + 3 + 3
    back = pd.read_csv(path)
    assert back.loc[back["epoch"] == 1].set_index("species")["draws"].to_dict() == {"a": 0, "b": 0, "c": 2}
    too_far = sampling.DrawCounter()
    too_far.add([1])
    with pytest.raises(ValueError, match="labels given"):  # record 1 drawn, only one label
        too_far.to_frame(["a"], 0)


def test_draw_counter_matches_a_real_epoch(long_tail):
    _, labels = long_tail
    draw = sampling.draw_epoch(len(labels), seed=0, epoch=0, primary_labels=labels, sampler="inverse")
    counter = sampling.DrawCounter()
    for start in range(0, len(draw), 32):  # batch by batch, as a training loop would
        counter.add(draw[start:start + 32])
    frame = counter.to_frame(labels, epoch=0)
    assert frame["draws"].sum() == len(draw)
    by_hand = pd.Series(labels[draw]).value_counts()
    for species, draws in zip(frame["species"], frame["draws"]):
        assert draws == by_hand.get(species, 0)
