"""Tests for learner.py's build_learner: --init-from copies weights by species name, and --compile /
--channels-last leave the checkpoint's parameter names as the plain model's.

The references are the source checkpoint's own tensors and a learner built without the
flags. Only timm's tiny `test_efficientnet` is built; nothing is downloaded.
"""
from __future__ import annotations

import torch
from conftest import quick_args

import learner as learner_lib

CPU = torch.device("cpu")


def test_init_from_copies_shared_species_rows_by_name(checkpoint, tiny_data, tmp_path):
    source = torch.load(checkpoint, weights_only=True)
    vocabulary = ["eeefff1", "zzzzzz1", "aaabbb1", "ggghhh1", "cccddd1"]  # permuted, plus a new species
    args = quick_args(tiny_data, tmp_path / "finetune", "--init-from", str(checkpoint))
    learner = learner_lib.build_learner(args, vocabulary, CPU, steps_per_epoch=3)
    assert learner.model.labels == vocabulary
    target = learner.model.state_dict()
    source_row = {label: i for i, label in enumerate(source["labels"])}
    for row, label in enumerate(vocabulary):
        if label in source_row:
            assert torch.equal(target["head.weight"][row], source["model"]["head.weight"][source_row[label]])
            assert torch.equal(target["head.bias"][row], source["model"]["head.bias"][source_row[label]])
        else:
            assert not any(torch.equal(target["head.weight"][row], source["model"]["head.weight"][i])
                           for i in range(4))
    # the frontend and the backbone are the source's, weights and BatchNorm statistics alike
    copied = [name for name in source["model"] if name.startswith(("frontend.", "backbone."))]
    assert "backbone.conv_stem.weight" in copied
    for name in copied:
        assert torch.equal(target[name], source["model"][name]), name


def test_compile_and_channels_last_leave_checkpoints_unchanged(tiny_data, tmp_path):
    plain = learner_lib.build_learner(quick_args(tiny_data, tmp_path / "a"), ["a", "b"], CPU, steps_per_epoch=10)
    fast_args = quick_args(tiny_data, tmp_path / "b", "--compile", "--channels-last", "--ema", "0.9")
    fast = learner_lib.build_learner(fast_args, ["a", "b"], CPU, steps_per_epoch=10)
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())       # no "_orig_mod." names
    assert list(fast.ema.module.state_dict()) == list(plain.model.state_dict())
    weights = [p for p in fast.model.backbone.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert fast.model.backbone._compiled_call_impl is not None and plain.model.backbone._compiled_call_impl is None
