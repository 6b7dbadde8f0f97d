"""Tests for metrics.py against independent plain-Python references."""

import math
import os
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import label_ranking_average_precision_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import (  # noqa: E402
    bin_edges,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    label_ranking_average_precision,
    macro_average_precision,
    padded_cmap,
    probability_metrics,
)


# ---------------------------------------------------------------- references

def plain_ap(y, s):
    """AP of one column: walk distinct thresholds high to low, tied scores enter
    together; AP = sum_k (R_k - R_{k-1}) * P_k."""
    y = [int(v) for v in y]
    s = [float(v) for v in s]
    n_pos = sum(y)
    assert n_pos > 0
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        tp = sum(1 for yi, si in zip(y, s) if si >= t and yi == 1)
        fp = sum(1 for yi, si in zip(y, s) if si >= t and yi == 0)
        recall, precision = tp / n_pos, tp / (tp + fp)
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def plain_macro_ap(targets, scores):
    cols = [c for c in range(targets.shape[1]) if targets[:, c].sum() > 0]
    return sum(plain_ap(targets[:, c], scores[:, c]) for c in cols) / len(cols)


def kaggle_padded_cmap(targets, scores, padding_factor=5):
    """Padding built as in the BirdCLEF 2023 Kaggle notebook (pandas concat of
    rows of ones), then the per-column plain AP averaged."""
    solution = pd.DataFrame(targets.astype(int))
    submission = pd.DataFrame(scores)
    new_rows = pd.DataFrame([[1 for _ in solution.columns] for _ in range(padding_factor)])
    new_rows.columns = solution.columns
    padded_solution = pd.concat([solution, new_rows]).reset_index(drop=True).copy()
    padded_submission = pd.concat([submission, new_rows]).reset_index(drop=True).copy()
    y, s = padded_solution.values, padded_submission.values
    return sum(plain_ap(y[:, c], s[:, c]) for c in range(y.shape[1])) / y.shape[1]


def plain_lrap(targets, scores):
    """Mean over rows with positives of the mean over their positive labels of
    |{positive j: s_j >= s_i}| / |{j: s_j >= s_i}|."""
    per_row = []
    for y, s in zip(targets, scores):
        pos = [i for i in range(len(y)) if y[i] == 1]
        if not pos:
            continue
        vals = []
        for i in pos:
            n_pos_above = sum(1 for j in pos if s[j] >= s[i])
            n_above = sum(1 for j in range(len(y)) if s[j] >= s[i])
            vals.append(n_pos_above / n_above)
        per_row.append(sum(vals) / len(vals))
    return sum(per_row) / len(per_row)


def random_case(seed, n=37, c=11):
    """Sparse labels, scores rounded to 1 decimal (many ties), two species and
    several rows without positives."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.2).astype(int)
    targets[:, [2, 7]] = 0
    targets[:5] = 0
    # Scores mildly informative so the metrics are not all near chance.
    scores = np.round(np.clip(0.35 * targets + 0.7 * rng.random((n, c)), 0, 1), 1)
    assert len(np.unique(scores)) < 12  # ties are present
    return targets, scores


SEEDS = [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- references agree

def test_plain_ap_reference_matches_hand_values():
    # No ties: thresholds 0.9 (P=1, R=.5), 0.8 (R unchanged), 0.4 (P=2/3, R=1).
    assert plain_ap([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == pytest.approx(5 / 6, abs=1e-15)
    # Tie at 0.5 between a positive and a negative counts as one step (P=1/2).
    assert plain_ap([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(7 / 12, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pad", [1, 3, 5])
def test_padded_cmap_matches_kaggle_rederivation(seed, pad):
    targets, scores = random_case(seed)
    assert padded_cmap(targets, scores, padding_factor=pad) == pytest.approx(
        kaggle_padded_cmap(targets, scores, pad), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_ap_matches_rederivation_over_positive_columns(seed):
    targets, scores = random_case(seed)
    got = macro_average_precision(targets, scores)
    assert got == pytest.approx(plain_macro_ap(targets, scores), abs=1e-12)
    # Columns without positives are excluded rather than averaged in as 0 / nan.
    assert not math.isnan(got)
    assert padded_cmap(targets, scores, padding_factor=0) == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_lrap_excludes_rows_without_positives(seed):
    targets, scores = random_case(seed)
    keep = targets.sum(axis=1) > 0
    got = label_ranking_average_precision(targets, scores)
    assert got == pytest.approx(label_ranking_average_precision_score(targets[keep], scores[keep]), abs=1e-12)
    assert got == pytest.approx(plain_lrap(targets, scores), abs=1e-12)
    # sklearn on all rows scores the empty rows 1.0, which is what we must avoid.
    assert label_ranking_average_precision_score(targets, scores) > got + 1e-6


# ---------------------------------------------------------------- hand cases

def test_hand_computed_single_column():
    # Unpadded: threshold .9 gives P=0, R=0; .1 gives P=1/2, R=1 -> AP 1/2.
    t = np.array([[0], [1]])
    s = np.array([[0.9], [0.1]])
    assert macro_average_precision(t, s) == pytest.approx(0.5, abs=1e-15)
    # Pad 1: targets [0,1,1], scores [.9,.1,1]: (R .5,P 1), (R .5,P .5), (R 1,P 2/3) -> 5/6.
    assert padded_cmap(t, s, padding_factor=1) == pytest.approx(5 / 6, abs=1e-15)


def test_hand_computed_tie_rule():
    # Tied scores enter as one threshold step. targets [1,0,1], scores [.5,.5,.2]:
    # (R .5, P 1/2), (R 1, P 2/3) -> 7/12; positive-first tie breaking would give 5/6.
    assert macro_average_precision(np.array([[1], [0], [1]]), np.array([[0.5], [0.5], [0.2]])) == pytest.approx(
        7 / 12, abs=1e-15
    )
    # All tied, targets [0,1,1]: one step (R 1, P 2/3) -> 2/3; negative-first would
    # give .5*.5 + .5*2/3 = 7/12, positive-first 1.
    assert macro_average_precision(np.array([[0], [1], [1]]), np.full((3, 1), 0.5)) == pytest.approx(
        2 / 3, abs=1e-15
    )


def test_hand_computed_lrap():
    t = np.array([[1, 0, 1], [0, 0, 0]])
    s = np.array([[0.9, 0.8, 0.1], [0.3, 0.2, 0.1]])
    # Row 0: label 0 -> 1/1, label 2 -> 2/3; mean 5/6. Row 1 (no positives) is excluded.
    assert label_ranking_average_precision(t, s) == pytest.approx(5 / 6, abs=1e-15)


def test_perfect_ranking_is_one():
    rng = np.random.default_rng(7)
    t = (rng.random((20, 6)) < 0.3).astype(int)
    t[0] = 1  # every column has a positive
    s = np.where(t == 1, 0.9, 0.1)
    m = classification_metrics(t, s)
    assert m == {"cmap5": 1.0, "cmap3": 1.0, "macro_ap": 1.0, "lrap": 1.0}


def test_padding_raises_poor_classifier_and_pad5_ge_pad3():
    rng = np.random.default_rng(11)
    t = (rng.random((30, 8)) < 0.2).astype(int)
    t[0] = 1
    s = np.where(t == 1, 0.1, 0.9) + 0.01 * rng.random(t.shape)  # inverted ranking
    unpadded = macro_average_precision(t, s)
    cmap3 = padded_cmap(t, s, padding_factor=3)
    cmap5 = padded_cmap(t, s, padding_factor=5)
    assert unpadded < cmap3 < cmap5 < 1.0
    assert padded_cmap(t, s, padding_factor=0) == pytest.approx(unpadded, abs=1e-15)


def test_soft_targets_are_binarised_at_half():
    targets, scores = random_case(3)
    soft = np.where(targets == 1, 0.9, 0.05)
    soft[0, 0] = 0.5  # exactly 0.5 counts as positive
    hard = targets.copy()
    hard[0, 0] = 1
    assert classification_metrics(soft, scores) == classification_metrics(hard, scores)


def test_no_positives_gives_nan_not_error():
    t = np.zeros((4, 3))
    s = np.full((4, 3), 0.5)
    assert math.isnan(macro_average_precision(t, s))
    assert math.isnan(label_ranking_average_precision(t, s))
    assert math.isnan(padded_cmap(t, s, padding_factor=0))
    # Padding gives every column positives, so padded cmAP is defined (all tied at top).
    assert not math.isnan(padded_cmap(t, s, padding_factor=5))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    targets, scores = random_case(0)
    scores = scores.copy()
    scores[3, 4] = bad
    scores[10, 1] = bad
    for fn in (padded_cmap, macro_average_precision, label_ranking_average_precision, classification_metrics):
        with pytest.raises(ValueError, match=r"2 non-finite"):
            fn(targets, scores)


@pytest.mark.parametrize(
    "t_shape,s_shape",
    [((5, 3), (5, 4)), ((5, 3), (6, 3)), ((5,), (5,)), ((0, 3), (0, 3)), ((2, 3, 1), (2, 3, 1))],
)
def test_bad_shapes_raise(t_shape, s_shape):
    with pytest.raises(ValueError):
        classification_metrics(np.zeros(t_shape), np.zeros(s_shape))


def test_classification_metrics_keys_and_types():
    targets, scores = random_case(1)
    m = classification_metrics(targets, scores)
    assert list(m) == ["cmap5", "cmap3", "macro_ap", "lrap"]
    for v in m.values():
        assert type(v) is float
    assert m["cmap5"] == padded_cmap(targets, scores, padding_factor=5)
    assert m["cmap3"] == padded_cmap(targets, scores, padding_factor=3)


# ---------------------------------------------------------------- calibration

def plain_calibration(targets, probabilities, n_bins):
    """Per bin [k/n, (k+1)/n) (the last one closed): pair count, mean probability, share present, by loops."""
    rows = []
    for k in range(n_bins):
        lower, upper = k / n_bins, (k + 1) / n_bins
        members = [(float(p), int(t)) for t_row, p_row in zip(targets, probabilities) for t, p in zip(t_row, p_row)
                   if lower <= p < upper or (k == n_bins - 1 and p == 1.0)]
        if members:
            rows.append((len(members), sum(p for p, _ in members) / len(members),
                         sum(t for _, t in members) / len(members)))
        else:
            rows.append((0, math.nan, math.nan))
    total = sum(count for count, _, _ in rows)
    ece = sum(count * abs(mean - seen) for count, mean, seen in rows if count) / total
    return rows, ece


def test_calibration_by_hand():
    # 3 rows x 2 species = 6 pairs; 4 bins [0,.25) [.25,.5) [.5,.75) [.75,1]
    targets = np.array([[1, 0], [0, 0], [1, 1]])
    probabilities = np.array([[0.9, 0.1], [0.25, 0.0], [0.6, 1.0]])
    table = calibration_bins(targets, probabilities, bins=4)
    # bin 0: .1 (absent), 0 (absent) -> 2 pairs, mean .05, observed 0
    # bin 1: .25 (absent)            -> 1 pair, mean .25, observed 0 (.25 is a lower edge)
    # bin 2: .6 (present)            -> 1 pair, mean .6, observed 1
    # bin 3: .9 (present), 1.0 (present) -> 2 pairs, mean .95, observed 1 (1.0 is in the last bin)
    assert list(table["pairs"]) == [2, 1, 1, 2]
    assert table["mean_predicted"] == pytest.approx([0.05, 0.25, 0.6, 0.95], abs=1e-15)
    assert table["observed"] == pytest.approx([0, 0, 1, 1], abs=1e-15)
    assert list(table["lower"]) == [0, 0.25, 0.5, 0.75] and list(table["upper"]) == [0.25, 0.5, 0.75, 1.0]
    # ECE = (2*.05 + 1*.25 + 1*.4 + 2*.05) / 6
    assert expected_calibration_error(targets, probabilities, bins=4) == pytest.approx(0.85 / 6, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [1, 3, 10])
def test_calibration_matches_plain_rederivation(seed, n_bins):
    targets, scores = random_case(seed)   # scores on a 0.1 grid: many on bin edges
    rows, ece = plain_calibration(targets, scores, n_bins)
    table = calibration_bins(targets, scores, bins=n_bins)
    assert list(table["pairs"]) == [count for count, _, _ in rows]
    assert table["pairs"].sum() == targets.size
    np.testing.assert_allclose(table["mean_predicted"], [mean for _, mean, _ in rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["observed"], [seen for _, _, seen in rows], rtol=0, atol=1e-12)
    assert expected_calibration_error(targets, scores, bins=n_bins) == pytest.approx(ece, abs=1e-12)


def test_empty_bins_have_nan_means_and_do_not_count():
    targets = np.array([[1, 0]])
    probabilities = np.array([[1.0, 0.0]])
    table = calibration_bins(targets, probabilities, bins=10)
    assert list(table["pairs"]) == [1] + [0] * 8 + [1]
    assert np.isnan(table["mean_predicted"][1:9]).all() and np.isnan(table["observed"][1:9]).all()
    assert expected_calibration_error(targets, probabilities) == 0.0
    # always wrong and sure of it: ECE 1
    assert expected_calibration_error(1 - targets, probabilities) == 1.0


def test_bin_edges_are_exact_fractions():
    assert list(bin_edges(10)) == [k / 10 for k in range(11)]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="bins"):
            bin_edges(bad)


def test_probability_metrics_adds_ece_to_the_ranking_metrics():
    targets, scores = random_case(2)
    result = probability_metrics(targets, scores, bins=5)
    assert list(result) == ["cmap5", "cmap3", "macro_ap", "lrap", "ece"]
    assert {key: result[key] for key in ("cmap5", "cmap3", "macro_ap", "lrap")} == classification_metrics(
        targets, scores)
    assert result["ece"] == pytest.approx(plain_calibration(targets, scores, 5)[1], abs=1e-12)


@pytest.mark.parametrize("bad", [-0.01, 1.01, np.nan])
def test_probabilities_outside_unit_interval_raise(bad):
    targets, scores = random_case(0)
    scores = scores.copy()
    scores[1, 1] = bad
    for fn in (calibration_bins, expected_calibration_error, probability_metrics):
        with pytest.raises(ValueError, match="outside|non-finite"):
            fn(targets, scores)
