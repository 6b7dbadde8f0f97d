"""Tests for losses.py: focal loss, label smoothing and soft-target cross-entropy against their
formulas written out by hand (and torch's plain BCE).

What the training loop does with the loss (a switch of loss mid-run, non-finite losses)
is tested in test_train.py and test_faults.py.
"""
from __future__ import annotations

import pytest
import torch

import losses


def test_focal_loss_is_bce_at_gamma_zero_and_matches_its_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) > 0.7).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(losses.compute_loss(logits, targets, "focal", focal_gamma=0.0), bce, atol=1e-7)
    # Hand formula: -alpha_t (1 - p_t)^gamma log(p_t).
    p = logits.sigmoid()
    p_t = torch.where(targets == 1, p, 1 - p)
    alpha_t = torch.where(targets == 1, torch.tensor(0.25), torch.tensor(0.75))
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    got = losses.compute_loss(logits, targets, "focal", focal_gamma=2.0, focal_alpha=0.25)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    smoothed = torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    expected = -(smoothed * logits.log_softmax(dim=1)).sum()
    assert torch.allclose(losses.compute_loss(logits, target, "ce", label_smoothing=0.1), expected)
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.95, 0.05, 0.05]]))
    assert torch.allclose(losses.compute_loss(logits, target, "bce", label_smoothing=0.1), expected_bce)


def test_ce_renormalises_secondary_targets():
    logits = torch.tensor([[1.0, 0.5, -1.0]])
    with_secondary = torch.tensor([[1.0, 0.5, 0.0]])
    expected = -(torch.tensor([[2 / 3, 1 / 3, 0.0]]) * logits.log_softmax(dim=1)).sum()
    assert torch.allclose(losses.compute_loss(logits, with_secondary, "ce"), expected)


def test_every_loss_is_a_mean_that_does_not_grow_with_the_batch():
    """The log's reduction='sum' bug: a summed loss grows with the batch (and sent predictions to inf).
    The same examples repeated 1, 4 and 16 times give the same loss, for every loss."""
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 7) * 2, torch.zeros(3, 7)
    targets[torch.arange(3), torch.tensor([0, 4, 6])] = 1.0
    for name in losses.LOSSES:
        values = [losses.compute_loss(logits.repeat(k, 1), targets.repeat(k, 1), name).item() for k in (1, 4, 16)]
        assert values == [values[0]] * 3 or max(values) - min(values) < 1e-6 * abs(values[0]), (name, values)
        per_example = [losses.compute_loss(logits[i:i + 1], targets[i:i + 1], name).item() for i in range(3)]
        assert values[0] == pytest.approx(sum(per_example) / 3, rel=1e-6)       # the mean of the examples
