"""Tests for learner.py: --init-from copies weights by species name, --compile / --channels-last leave
the checkpoint's parameter names as the plain model's, the learning-rate schedules against their
formulas (and torch's OneCycleLR), the optimisers, and which parameters weight decay reaches.

The references are the source checkpoint's own tensors and a learner built without the
flags. Only timm's tiny `test_efficientnet` is built; nothing is downloaded.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import quick_settings, settings_of

import learner as learner_lib
import model as model_lib
import options
import train

CPU = torch.device("cpu")


def test_init_from_copies_shared_species_rows_by_name(checkpoint, tiny_data, tmp_path):
    source = torch.load(checkpoint, weights_only=True)
    vocabulary = ["eeefff1", "zzzzzz1", "aaabbb1", "ggghhh1", "cccddd1"]  # permuted, plus a new species
    settings = quick_settings(tiny_data, tmp_path / "finetune", "--init-from", str(checkpoint))
    learner = learner_lib.build_learner(settings.learner, vocabulary, CPU, steps_per_epoch=3)
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
    plain = learner_lib.build_learner(quick_settings(tiny_data, tmp_path / "a").learner, ["a", "b"], CPU,
                                      steps_per_epoch=10)
    fast_settings = quick_settings(tiny_data, tmp_path / "b", "--compile", "--channels-last", "--ema", "0.9")
    fast = learner_lib.build_learner(fast_settings.learner, ["a", "b"], CPU, steps_per_epoch=10)
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())       # no "_orig_mod." names
    assert list(fast.ema.module.state_dict()) == list(plain.model.state_dict())
    weights = [p for p in fast.model.backbone.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert fast.model.backbone._compiled_call_impl is not None and plain.model.backbone._compiled_call_impl is None


# ----------------------------------------------------------------------------- optimiser and schedule

def schedule(*extra, epochs="10", steps_per_epoch=10):
    args = options.get_args_parser().parse_args(["--epochs", epochs, "--lr", "1e-3", *extra])
    return learner_lib.schedule_of(settings_of(args).learner.optimization, steps_per_epoch)


def test_cosine_after_a_warm_up_from_warmup_lr_against_the_formula():
    plain = schedule("--warmup-epochs", "1")                  # 10 warm-up steps of 100
    assert [plain(step) for step in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    for step in (10, 37, 55, 99):
        assert plain(step) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90)))
    assert plain(150) == 0.0                                   # past the end: stays at 0
    warm = schedule("--warmup-epochs", "1", "--warmup-lr", "1e-5")   # the log: warm up from 1e-5 to 1e-4
    assert warm(0) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 10) and warm(9) == pytest.approx(1e-3)


def test_schedule_epochs_fix_the_curve_whatever_epochs_training_runs():
    twelve = schedule("--schedule-epochs", "24", epochs="12")
    twenty_four = schedule(epochs="24")
    assert [twelve(step) for step in range(0, 120, 7)] == [twenty_four(step) for step in range(0, 120, 7)]
    assert twelve(119) > 1e-4                                  # half-way down at the 12th epoch, not at 0


def test_constant_and_step_schedules():
    constant = schedule("--lr-schedule", "constant", "--warmup-epochs", "0")
    assert {constant(step) for step in (0, 50, 99)} == {1e-3}
    stepped = schedule("--lr-schedule", "step", "--warmup-epochs", "0", "--step-epochs", "3", "--step-gamma", "0.5")
    assert [stepped(step) for step in (0, 29, 30, 59, 60, 90)] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4,
                                                                                1.25e-4])


def test_onecycle_equals_torchs_onecyclelr():
    ours = schedule("--lr-schedule", "onecycle", "--warmup-epochs", "3")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100, pct_start=0.3,
                                                    anneal_strategy="cos", cycle_momentum=False)
    expected = []
    for _ in range(100):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [ours(step) for step in range(100)] == pytest.approx(expected, rel=1e-9)


def test_weight_decay_reaches_convolution_and_linear_weights_only(tiny_data, tmp_path):
    settings = quick_settings(tiny_data, tmp_path, "--weight-decay", "0.05")
    learner = learner_lib.build_learner(settings.learner, ["a", "b"], CPU, steps_per_epoch=10)
    decay = {id(p): group["weight_decay"] for group in learner.optimizer.param_groups for p in group["params"]}
    names = dict(learner.model.named_parameters())
    assert len(decay) == len(names)                            # every parameter in exactly one group
    for name, parameter in names.items():
        decayed = name.endswith("weight") and parameter.ndim >= 2       # conv kernels, linear matrices
        assert decay[id(parameter)] == (0.05 if decayed else 0.0), name
    assert decay[id(names["head.weight"])] == 0.05 and decay[id(names["head.bias"])] == 0.0
    assert decay[id(names["backbone.bn1.weight"])] == 0.0      # BatchNorm scale


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                        ("sgd", torch.optim.SGD)])
def test_optimizer_and_momentum_flags(name, kind, tiny_data, tmp_path):
    settings = quick_settings(tiny_data, tmp_path, "--optimizer", name, "--momentum", "0.8")
    optimizer = learner_lib.build_learner(settings.learner, ["a", "b"], CPU, steps_per_epoch=10).optimizer
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert (group["momentum"] if name == "sgd" else group["betas"][0]) == 0.8


# ----------------------------------------------------------------------------- head surgery after --init-from

VOCABULARY = ["eeefff1", "zzzzzz1", "aaabbb1"]   # two of the pre-trained species and a new one


def fine_tune(checkpoint, tiny_data, tmp_path, *extra):
    settings = quick_settings(tiny_data, tmp_path / "finetune", "--init-from", str(checkpoint), *extra)
    return settings, learner_lib.build_learner(settings.learner, VOCABULARY, CPU, steps_per_epoch=3)


def a_step(learner, settings, epoch: int):
    """One real training step (train.train_step) in `epoch`, with that epoch's frozen parts."""
    learner_lib.set_train_mode(learner.model, *learner_lib.frozen_parts(settings.learner, epoch))
    batch = {"waveform": torch.randn(4, learner.model.window_samples) * 0.1,
             "target": torch.eye(len(VOCABULARY))[[0, 1, 2, 0]], "path": ["a", "b", "c", "d"]}
    state = train.TrainingState(epoch=epoch)
    assert train.train_step(learner, batch, state, settings.step, "ce") is not None


def test_head_init_fresh_replaces_the_whole_head(checkpoint, tiny_data, tmp_path):
    source = torch.load(checkpoint, weights_only=True)["model"]
    settings, learner = fine_tune(checkpoint, tiny_data, tmp_path, "--head-init", "fresh")
    state = learner.model.state_dict()
    for name in source:
        if name.startswith(("frontend.", "backbone.")):
            assert torch.equal(state[name], source[name]), name
    torch.manual_seed(42)                                      # what a fresh model of this run starts with
    fresh = model_lib.build_model(settings.learner.model, VOCABULARY, pretrained=False).state_dict()
    assert torch.equal(state["head.weight"], fresh["head.weight"]) and torch.equal(state["head.bias"], fresh["head.bias"])


def test_head_init_extend_keeps_the_head_adds_a_layer_of_ones_and_trains_only_that_first(checkpoint, tiny_data,
                                                                                           tmp_path):
    source = torch.load(checkpoint, weights_only=True)
    settings, learner = fine_tune(checkpoint, tiny_data, tmp_path, "--head-init", "extend",
                              "--freeze-backbone-epochs", "2", "--freeze-head-epochs", "1")
    model = learner.model
    assert model.head.out_features == len(source["labels"]) == 4                 # the pre-trained vocabulary
    assert model.extension.in_features == 4 and model.extension.out_features == len(VOCABULARY)
    assert (model.extension.weight == 1).all() and (model.extension.bias == 0).all()   # "initialised to ones"
    for name, tensor in source["model"].items():                                   # the rest: the source's
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        assert model(torch.randn(2, model.window_samples)).shape == (2, len(VOCABULARY))
    # which parameters train in which epoch: backbone frozen 2 epochs, pre-trained head 1, new layer never
    expected = {0: (False, False, True), 1: (False, True, True), 2: (True, True, True)}
    for epoch, (backbone, head, extension) in expected.items():
        learner_lib.set_train_mode(model, *learner_lib.frozen_parts(settings.learner, epoch))
        assert {p.requires_grad for p in model.backbone.parameters()} == {backbone}
        assert {p.requires_grad for p in model.head.parameters()} == {head}
        assert {p.requires_grad for p in model.extension.parameters()} == {extension}
    # and which change after a step of epoch 0: only the new layer; the rest still equals the source
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    a_step(learner, settings, epoch=0)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"extension.weight", "extension.bias"}
    a_step(learner, settings, epoch=1)                                                 # now the head trains too
    changed = {name for name in before if not torch.equal(before[name], model.state_dict()[name])}
    assert {"head.weight", "head.bias"} <= changed and not any(name.startswith("backbone.") for name in changed)
    # a checkpoint of the extended model resumes to the same model
    resumed = learner_lib.build_learner(settings.learner, VOCABULARY, CPU, 3,
                                        train.make_checkpoint(learner, settings.config, train.TrainingState()))
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_resume_with_fp16_from_a_checkpoint_saved_without_a_loss_scaler():
    """--amp may change on resume: a CPU or bf16 checkpoint holds an empty scaler state, which an enabled
    fp16 GradScaler refuses to load; the scaler then starts fresh instead of the resume failing."""
    import types
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()}
    assert saved["scaler"] == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError):
        scaler.load_state_dict(saved["scaler"])                      # what the resume did before
    learner = types.SimpleNamespace(model=model, optimizer=optimizer, scaler=scaler, ema=None)
    learner_lib.restore_learner(learner, saved)
    assert scaler.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()
