"""Tests for lr_find.py through `train.py --lr-find`: the curve rises from 1e-7, a rate is suggested,
and nothing trained is kept."""
from __future__ import annotations

import pytest
from conftest import quick_args, read_rows

import runfolder
import train


def test_lr_find_writes_curve_and_suggests_a_rate(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train.main(quick_args(tiny_data, out, "--lr-find", "--lr-find-steps", "12"))
    assert 1e-7 <= result["suggested_lr"] <= 1.0
    curve = read_rows(out / "lr_find.csv")
    rates = [float(row["lr"]) for row in curve]
    assert rates == sorted(rates) and rates[0] == pytest.approx(1e-7)
    assert (out / "lr_find.png").stat().st_size > 1000
    assert not runfolder.periodic_checkpoints(out)  # nothing trained is kept


def test_a_loss_that_turns_nan_never_wins_the_suggestion(tiny_data, tmp_path, monkeypatch):
    """The loss falls, then is NaN at the 6th step (the divergence): the NaN slope must not be taken
    for the steepest descent; the suggestion is one of the finite steps."""
    import numpy as np

    import lr_find
    losses_given = iter([3.0, 2.5, 2.0, 1.0, 0.9, float("nan")] + [1.0] * 20)

    def falling_then_nan(logits, targets, args, loss_name):
        return logits.sum() * 0 + next(losses_given)
    monkeypatch.setattr(lr_find.losses, "batch_loss", falling_then_nan)
    result = train.main(quick_args(tiny_data, tmp_path / "run", "--lr-find", "--lr-find-steps", "12"))
    curve = [row for row in read_rows(tmp_path / "run" / "lr_find.csv")]
    finite = [(float(row["lr"]), float(row["smoothed_loss"])) for row in curve if row["smoothed_loss"] != "nan"]
    assert len(curve) == 6 and len(finite) == 5                       # stopped at the NaN
    rates, smoothed = np.array(finite).T
    steepest = rates[int(np.argmin(np.gradient(smoothed, np.log10(rates))))]   # over the finite points only
    assert result["suggested_lr"] == pytest.approx(steepest)
