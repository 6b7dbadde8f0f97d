"""Multi-label ranking metrics for bird-call recognition.

BirdCLEF 2023 scored submissions by padded cmAP (macro average precision after
appending all-positive rows), so that is what we optimise and report; unpadded
macro AP and LRAP are given alongside because padding flattens differences.
"""

import numpy as np
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score


def _validate(targets, scores):
    """Return (binary int targets, float scores) or raise ValueError."""
    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.ndim != 2 or scores.ndim != 2:
        raise ValueError(f"targets and scores must be 2-D (N, C); got {targets.shape} and {scores.shape}")
    if targets.shape != scores.shape:
        raise ValueError(f"targets shape {targets.shape} != scores shape {scores.shape}")
    if targets.shape[0] < 1 or targets.shape[1] < 1:
        raise ValueError(f"need at least one row and one column; got shape {targets.shape}")
    # A nan/inf prediction would otherwise be ranked arbitrarily by sklearn (or crash
    # it); a model emitting them is broken and must not get a plausible-looking score.
    n_bad = int(np.count_nonzero(~np.isfinite(scores)))
    if n_bad:
        raise ValueError(f"scores contain {n_bad} non-finite value(s) (nan/inf)")
    targets = targets.astype(np.float64)
    if not np.all(np.isfinite(targets)):
        raise ValueError("targets contain non-finite values")
    # Soft / label-smoothed targets are binarised at 0.5.
    return (targets >= 0.5).astype(int), scores


def padded_cmap(targets, scores, padding_factor=5):
    """BirdCLEF 2023 Kaggle metric: macro AP after appending `padding_factor` rows of
    ones to both targets and scores (Kaggle did it with pandas concat; same numbers).

    The padding gives every species a positive (so none is undefined) and pulls every
    per-species AP towards 1. padding_factor=0 means no padding; then species without
    positives are excluded, as in `macro_average_precision` (nan if none has one).
    """
    y, s = _validate(targets, scores)
    if padding_factor < 0:
        raise ValueError(f"padding_factor must be >= 0, got {padding_factor}")
    if padding_factor == 0:
        return macro_average_precision(y, s)
    n_cols = y.shape[1]
    y = np.concatenate([y, np.ones((padding_factor, n_cols), dtype=int)])
    s = np.concatenate([s, np.ones((padding_factor, n_cols))])
    return float(average_precision_score(y, s, average="macro"))


def macro_average_precision(targets, scores):
    """Unpadded macro AP over the species that have at least one positive
    (AP is undefined without positives); nan if no species has one."""
    y, s = _validate(targets, scores)
    keep = y.sum(axis=0) > 0
    if not keep.any():
        return float("nan")
    return float(average_precision_score(y[:, keep], s[:, keep], average="macro"))


def label_ranking_average_precision(targets, scores):
    """sklearn LRAP over rows with at least one positive.

    sklearn scores a row without positives as 1.0, which would inflate the number on
    soundscapes full of no-call windows, so those rows are excluded; nan if none remain.
    """
    y, s = _validate(targets, scores)
    keep = y.sum(axis=1) > 0
    if not keep.any():
        return float("nan")
    return float(label_ranking_average_precision_score(y[keep], s[keep]))


def classification_metrics(targets, scores):
    """The metric dict used by both training evaluation and inference scoring."""
    return {
        "cmap5": padded_cmap(targets, scores, padding_factor=5),
        "cmap3": padded_cmap(targets, scores, padding_factor=3),
        "macro_ap": macro_average_precision(targets, scores),
        "lrap": label_ranking_average_precision(targets, scores),
    }


# ----------------------------------------------------------------------------- calibration of probabilities

def _validate_probabilities(targets, probabilities):
    """As _validate, and every probability within [0, 1]."""
    y, p = _validate(targets, probabilities)
    outside = int(np.count_nonzero((p < 0) | (p > 1)))
    if outside:
        raise ValueError(f"probabilities contain {outside} value(s) outside [0, 1]")
    return y, p


def bin_edges(bins: int = 10) -> np.ndarray:
    """`bins` equal bins over [0, 1]: edges k / bins. Bin k holds lower <= p < upper, the last one also p = 1."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive whole number, got {bins}")
    return np.arange(int(bins) + 1) / int(bins)


def calibration_bins(targets, probabilities, bins: int = 10) -> dict:
    """Reliability of probabilities over every (row, species) pair: per bin of the predicted probability
    (bin_edges), the number of pairs, their mean predicted probability and the observed frequency of the
    species being present (targets binarised at 0.5). Empty bins have nan means.
    -> {"lower", "upper", "pairs", "mean_predicted", "observed"}, each an array of `bins` values."""
    y, p = _validate_probabilities(targets, probabilities)
    edges = bin_edges(bins)
    p, y = p.ravel(), y.ravel()
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    pairs = np.bincount(index, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=len(edges) - 1) / pairs
        observed = np.bincount(index, weights=y, minlength=len(edges) - 1) / pairs
    return {"lower": edges[:-1], "upper": edges[1:], "pairs": pairs, "mean_predicted": mean_predicted,
            "observed": observed}


def expected_calibration_error(targets, probabilities, bins: int = 10) -> float:
    """ECE: the pair-weighted mean over the non-empty bins of |mean predicted - observed frequency|."""
    table = calibration_bins(targets, probabilities, bins)
    used = table["pairs"] > 0
    gaps = np.abs(table["mean_predicted"][used] - table["observed"][used])
    return float((table["pairs"][used] * gaps).sum() / table["pairs"].sum())


def probability_metrics(targets, probabilities, bins: int = 10) -> dict:
    """How good a table of probabilities (e.g. pseudo-labels) is: classification_metrics (ranking) plus the
    expected calibration error over `bins` equal bins (do the probabilities mean what they say?)."""
    _validate_probabilities(targets, probabilities)
    return classification_metrics(targets, probabilities) | {
        "ece": expected_calibration_error(targets, probabilities, bins)}
