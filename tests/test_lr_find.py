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
