"""Tests for model.py: the mel frontend, logits vs activations, backbones, checkpoints.

Only timm's tiny `test_efficientnet` is ever built; nothing is downloaded (the hub
path is forced offline, or timm.create_model is replaced). Other timm families: test_backbones.py.
"""
from __future__ import annotations

import math
import os
import random
import runpy
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import timm
import torch
import torchaudio

import frontend as frontend_lib
import model as model_lib

SAMPLE_RATE, N_FFT, HOP, N_MELS, FMIN, FMAX = 16000, 512, 256, 32, 50.0, 8000.0


def make_config(**overrides) -> dict:
    config = {"backbone": "test_efficientnet", "labels": ["aaa1", "bbb1", "ccc1"],
              "activation": "softmax", "sample_rate": SAMPLE_RATE, "window_seconds": 1.0,
              "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX,
              "normalization": "standard", "dropout": 0.0}
    config.update(overrides)
    return config


def frontend(normalization="standard") -> frontend_lib.MelFrontend:
    return frontend_lib.MelFrontend(SAMPLE_RATE, N_FFT, HOP, N_MELS, FMIN, FMAX, normalization)


def waveforms(batch: int, samples: int = SAMPLE_RATE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SAMPLE_RATE
    tones = torch.stack([torch.sin(2 * math.pi * (500 + 700 * i) * t) for i in range(batch)])
    return 0.3 * tones + 0.05 * torch.randn(batch, samples, generator=generator)


@pytest.fixture(scope="module")
def small_model() -> model_lib.BirdCallModel:
    torch.manual_seed(0)
    return model_lib.BirdCallModel(make_config()).eval()


# ----------------------------------------------------------------------------- frontend

@pytest.mark.parametrize("samples", [16000, 16001, 16100, 8192, 1000])
def test_frontend_output_shape(samples):
    image = frontend()(waveforms(3, samples))
    assert image.shape == (3, 1, N_MELS, 1 + samples // HOP)
    assert image.dtype == torch.float32


def test_frontend_none_matches_hand_log_mel():
    """Re-derivation: |STFT|^2 (hann, centred, reflect) -> mel filters -> 10 log10 -> per-example top 80 dB."""
    x = waveforms(2)
    x[1] *= 10.0
    x[1, 4000:12000] = 0.0  # digital silence: the 80 dB floor matters
    window = torch.hann_window(N_FFT)
    spec = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2                      # (B, F, T)
    fbank = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, FMIN, FMAX, N_MELS, SAMPLE_RATE)
    mel = torch.einsum("bft,fm->bmt", spec, fbank)
    db = 10 * torch.log10(mel.clamp(min=1e-10))
    floor = db.amax(dim=(1, 2), keepdim=True) - 80.0
    expected = torch.maximum(db, floor).unsqueeze(1)
    image = frontend("none")(x)
    assert (expected[1] == floor[1]).any(), "the reference must exercise the top_db floor"
    torch.testing.assert_close(image, expected, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("kind", [frontend_lib.MelFrontend, frontend_lib.PCENFrontend])
def test_mel_spectrogram_equals_torchaudio_mel_spectrogram(kind):
    """Power (mel) or magnitude (PCEN) mel spectrogram, against the torchaudio transform it replaces."""
    layer = kind(SAMPLE_RATE, N_FFT, HOP, N_MELS, FMIN, FMAX)
    x = waveforms(3)
    x[2] = 0.0                                                      # silence: exact zeros both ways
    expected = layer.melspec(x)                                     # torchaudio: |X|.pow(power) -> mel
    torch.testing.assert_close(layer.mel_spectrogram(x), expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_frontend_example_does_not_depend_on_its_batch():
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    generator = torch.Generator().manual_seed(1)
    quiet = 0.01 * torch.sin(2 * math.pi * 1000 * t) + 1e-7 * torch.randn(SAMPLE_RATE, generator=generator)
    loud = 100.0 * torch.randn(SAMPLE_RATE, generator=generator)
    for normalization in ("standard", "minmax", "none"):
        layer = frontend(normalization)
        alone = layer(quiet[None])
        in_batch = layer(torch.stack([loud, quiet, loud]))
        torch.testing.assert_close(in_batch[1:2], alone, atol=1e-5, rtol=0,
                                   msg=f"{normalization}: example changed by a loud batch mate")
        torch.testing.assert_close(in_batch[0:1], layer(loud[None]), atol=1e-5, rtol=0)


def test_frontend_standard_normalisation_per_example():
    x = waveforms(4)
    x[0] *= 50.0
    x[3] *= 1e-3
    image = frontend("standard")(x)
    for example in image:
        assert abs(float(example.mean())) < 1e-4
        assert abs(float(example.std()) - 1.0) < 1e-3


def test_frontend_minmax_normalisation_per_example():
    x = waveforms(3)
    x[2] *= 100.0
    image = frontend("minmax")(x)
    for example in image:
        assert float(example.min()) == pytest.approx(0.0, abs=1e-6)
        assert float(example.max()) == pytest.approx(1.0, abs=1e-5)


def test_frontend_rejects_fmax_above_nyquist_and_unknown_normalisation():
    with pytest.raises(ValueError, match="Nyquist"):
        frontend_lib.MelFrontend(sample_rate=16000, n_fft=512, hop=256, n_mels=32, fmin=50.0, fmax=8001.0)
    frontend_lib.MelFrontend(sample_rate=16000, n_fft=512, hop=256, n_mels=32, fmin=50.0, fmax=8000.0)  # Nyquist: allowed
    with pytest.raises(ValueError, match="normalization"):
        frontend_lib.MelFrontend(sample_rate=16000, n_fft=512, hop=256, n_mels=32, fmin=50.0, fmax=8000.0,
                              normalization="zscore")


def test_frontend_is_float32_under_bf16_autocast():
    layer = frontend("standard")
    x = waveforms(2)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer(x)
        from_bf16_input = layer(x.to(torch.bfloat16))
    assert inside.dtype == torch.float32
    assert from_bf16_input.dtype == torch.float32
    torch.testing.assert_close(inside, reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- model and activations

def test_model_forward_returns_logits(small_model):
    x = waveforms(4)
    logits = small_model(x)
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    # re-derivation: frontend -> backbone -> mean over (freq, time) -> linear head, no activation
    with torch.no_grad():
        features = small_model.backbone(small_model.frontend(x))
        assert features.ndim == 4
        expected = small_model.head(features.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_model_output_is_not_a_probability():
    torch.manual_seed(1)
    net = model_lib.BirdCallModel(make_config()).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-3.0, 2.0, 0.5]))
        out = net(torch.randn(3, SAMPLE_RATE))
    # a zero-weight head outputs its bias for every input: logits, untouched
    assert torch.equal(out, torch.tensor([[-3.0, 2.0, 0.5]] * 3))
    assert not torch.allclose(out.sum(dim=1), torch.ones(3))
    assert (out < 0).any() and (out > 1).any()


def test_model_properties(small_model):
    assert small_model.labels == ["aaa1", "bbb1", "ccc1"]
    assert small_model.activation == "softmax"
    assert small_model.window_samples == SAMPLE_RATE
    assert model_lib.BirdCallModel(make_config(window_seconds=2.5, activation="sigmoid")).window_samples == 40000


def test_model_config_is_a_copy():
    config = make_config()
    net = model_lib.BirdCallModel(config)
    config["labels"].append("zzz9")
    assert net.labels == ["aaa1", "bbb1", "ccc1"]
    assert net.head.out_features == 3


def test_activate_softmax_sigmoid_and_unknown():
    logits = torch.tensor([[-3.0, 2.0, 0.5], [10.0, 10.0, -10.0], [0.0, 0.0, 0.0]])
    soft = model_lib.activate(logits, "softmax")
    exp = [[math.exp(v) for v in row] for row in logits.tolist()]
    expected_soft = torch.tensor([[v / sum(row) for v in row] for row in exp])
    torch.testing.assert_close(soft, expected_soft)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(3))
    sig = model_lib.activate(logits, "sigmoid")
    expected_sig = torch.tensor([[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()])
    torch.testing.assert_close(sig, expected_sig)
    assert torch.equal(sig, torch.sigmoid(logits))
    assert model_lib.activate(logits.to(torch.bfloat16), "softmax").dtype == torch.float32
    with pytest.raises(ValueError, match="tanh"):
        model_lib.activate(logits, "tanh")


# ----------------------------------------------------------------------------- backbones

def test_check_backbone_name_unknown_raises_with_timms_message():
    with pytest.raises(ValueError, match=r"Unknown model") as raised:
        model_lib.check_backbone_name("efficientnet_b99_nonexistent")
    assert "efficientnet_b99_nonexistent" in str(raised.value)
    with pytest.raises(ValueError, match=r"Unknown model"):
        model_lib.create_backbone("efficientnet_b99_nonexistent", pretrained=False, pretrained_file=None)


def test_check_backbone_name_accepts_real_names_without_building(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("check_backbone_name must not build a known model")
    monkeypatch.setattr(timm, "create_model", no_build)
    model_lib.check_backbone_name("efficientnet_b0")   # the train.py default
    model_lib.check_backbone_name("test_efficientnet")


def test_create_backbone_random_init_has_one_channel_and_no_classifier():
    backbone = model_lib.create_backbone("test_efficientnet", pretrained=False, pretrained_file=None)
    assert backbone.conv_stem.weight.shape[1] == 1
    features = backbone(torch.zeros(2, 1, N_MELS, 63))
    assert features.ndim == 4 and features.shape[:2] == (2, backbone.num_features)


def check_args(**overrides) -> dict:
    """train.py's model settings (options.model_settings); the check must not download anything."""
    values = dict(backbone="test_efficientnet", activation="softmax", sample_rate=SAMPLE_RATE, window_seconds=1.0,
                  n_fft=N_FFT, hop=HOP, n_mels=N_MELS, fmin=FMIN, fmax=FMAX, normalization="standard", dropout=0.0)
    values.update(overrides)
    return values


def test_check_model_builds_random_weights_runs_one_forward_and_leaves_random_streams_alone(monkeypatch):
    real_create, pretrained_flags, forwards = timm.create_model, [], []

    def create(name, pretrained=False, **kwargs):
        pretrained_flags.append(pretrained)
        backbone = real_create(name, pretrained=pretrained, **kwargs)
        backbone.register_forward_hook(lambda module, inputs, output: forwards.append(tuple(inputs[0].shape)))
        return backbone

    monkeypatch.setattr(timm, "create_model", create)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    states = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    model_lib.check_model(check_args())
    assert pretrained_flags == [False], "one build, with random weights: no download"
    assert forwards == [(1, 1, N_MELS, 63)], "one forward, of one window"
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_check_model_stops_on_a_frontend_or_backbone_that_cannot_work():
    with pytest.raises(ValueError, match="Nyquist"):
        model_lib.check_model(check_args(fmax=9000.0))
    with pytest.raises(ValueError, match="Unknown model"):
        model_lib.check_model(check_args(backbone="efficientnet_b99_nonexistent"))


def test_building_the_model_probes_in_eval_mode_and_changes_no_weight():
    """The probe forward runs without gradients in eval mode: BatchNorm statistics stay at their
    initial values and the model comes back in training mode."""
    torch.manual_seed(8)
    net = model_lib.BirdCallModel(make_config())
    assert net.training and all(module.training for module in net.modules())
    for module in net.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
            assert int(module.num_batches_tracked) == 0
    assert net.pad_multiple == (1, 1) and net.feature_layout == "NCHW" and net.image_size == (N_MELS, 63)
    assert "pad_to_multiple" not in net.config


def test_pretrained_from_hub_offline_raises_pretrained_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the constant is read at import, so set it too; and an empty cache
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(model_lib.PretrainedWeightsError) as raised:
        model_lib.create_backbone("test_efficientnet", pretrained=True, pretrained_file=None)
    message = str(raised.value)
    assert "--pretrained-file" in message and "--no-pretrained" in message
    assert "test_efficientnet" in message


def test_pretrained_failure_never_falls_back_to_random(monkeypatch):
    real_create = timm.create_model
    calls = []

    def create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("simulated: weights unreachable")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(model_lib.PretrainedWeightsError) as raised:
        model_lib.create_backbone("test_efficientnet", pretrained=True, pretrained_file=None)
    message = str(raised.value)
    assert "--pretrained-file" in message and "--no-pretrained" in message
    assert "simulated: weights unreachable" in message
    assert isinstance(raised.value.__cause__, OSError)
    assert calls == [True], "after the failed pretrained load no random model may be built"
    with pytest.raises(model_lib.PretrainedWeightsError):
        model_lib.BirdCallModel(make_config(), pretrained=True)


def test_missing_pretrained_file_raises(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(model_lib.PretrainedWeightsError) as raised:
        model_lib.create_backbone("test_efficientnet", pretrained=True, pretrained_file=str(missing))
    message = str(raised.value)
    assert str(missing) in message
    assert "--no-pretrained" in message


def test_pretrained_file_loads_weights_and_sums_rgb_stem(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("test_efficientnet")          # 3 channels, 1000 classes
    saved = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    path = tmp_path / "test_efficientnet.pth"
    torch.save(source.state_dict(), path)

    backbone = model_lib.create_backbone("test_efficientnet", pretrained=True, pretrained_file=str(path))
    loaded = backbone.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"],
                               saved["conv_stem.weight"].sum(dim=1, keepdim=True), atol=0, rtol=0)
    compared = 0
    for name, tensor in loaded.items():
        if name == "conv_stem.weight":
            continue
        assert name in saved, name
        assert torch.equal(tensor, saved[name]), name
        compared += 1
    assert compared >= 50
    assert not any(name.startswith("classifier") for name in loaded)

    torch.manual_seed(7)
    fresh = model_lib.create_backbone("test_efficientnet", pretrained=False, pretrained_file=None).state_dict()
    assert not torch.equal(fresh["blocks.0.0.conv.weight"], saved["blocks.0.0.conv.weight"]), \
        "sanity: random initialisation must differ from the saved weights"


def test_pretrained_file_of_another_backbone_is_one_line_naming_it(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)      # the user meant --backbone resnet18
    with pytest.raises(model_lib.PretrainedWeightsError) as raised:
        model_lib.create_backbone("test_efficientnet", pretrained=True, pretrained_file=str(path))
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith(f"--pretrained-file {path} does not fit --backbone test_efficientnet")
    assert message.endswith("it looks like weights for --backbone resnet18")
    assert model_lib.backbone_of_weights(path, "resnet50") == "resnet18"


# ----------------------------------------------------------------------------- checkpoints

class Payload:
    """A custom class: pickling it stores code to run on load."""

    def __reduce__(self):
        return (_record_execution, ("payload ran",))


EXECUTED = []


def _record_execution(message):
    EXECUTED.append(message)
    return message


def test_read_checkpoint_missing_path(tmp_path):
    path = tmp_path / "nope" / "best.pt"
    with pytest.raises(model_lib.CheckpointError, match="not found") as raised:
        model_lib.read_checkpoint(path)
    assert str(path) in str(raised.value)


def test_read_checkpoint_refuses_pickled_code(tmp_path, small_model):
    path = tmp_path / "evil.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": small_model.state_dict(),
                "model_config": small_model.config, "extra": Payload()}, path)
    EXECUTED.clear()
    with pytest.raises(model_lib.CheckpointError, match="weights_only") as raised:
        model_lib.read_checkpoint(path)
    assert str(path) in str(raised.value)
    assert EXECUTED == [], "the pickled code ran"


def test_read_checkpoint_plain_dict_without_model(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "weights": {"a": torch.zeros(2)}}, path)
    with pytest.raises(model_lib.CheckpointError, match="'model'"):
        model_lib.read_checkpoint(path)
    tensor_path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_path)
    with pytest.raises(model_lib.CheckpointError):
        model_lib.read_checkpoint(tensor_path)


def test_read_checkpoint_wrong_format(tmp_path, small_model):
    path = tmp_path / "old.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT + 1, "model": small_model.state_dict(),
                "model_config": small_model.config}, path)
    with pytest.raises(model_lib.CheckpointError, match="format"):
        model_lib.read_checkpoint(path)


def test_read_checkpoint_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is a text file, not a checkpoint\n")
    with pytest.raises(model_lib.CheckpointError) as raised:
        model_lib.read_checkpoint(path)
    assert str(path) in str(raised.value)


def test_load_model_rebuilds_the_exact_model(tmp_path):
    torch.manual_seed(5)
    config = make_config(activation="sigmoid", dropout=0.3, labels=["zzz1", "aaa1", "mmm1", "bbb1"])
    original = model_lib.BirdCallModel(config)
    with torch.no_grad():
        original.train()
        original(waveforms(4, seed=3))       # move the BatchNorm running statistics
    original.eval()
    path = tmp_path / "best.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": original.state_dict(),
                "model_config": original.config, "labels": original.labels, "epoch": 3}, path)

    loaded = model_lib.load_model(path)
    assert not loaded.training and not any(module.training for module in loaded.modules())
    assert loaded.labels == ["zzz1", "aaa1", "mmm1", "bbb1"]
    assert loaded.activation == "sigmoid"
    assert loaded.config == original.config
    x = waveforms(3, seed=8)
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(loaded(x), loaded(x))   # eval: dropout off
        torch.manual_seed(6)
        other = model_lib.BirdCallModel(config).eval()
        assert not torch.allclose(other(x), expected), "sanity: another initialisation differs"


def test_export_keeps_weights_config_and_labels_only_and_every_loader_reads_it(checkpoint, tmp_path, capsys):
    model_lib.main(["export", str(checkpoint), str(tmp_path / "small.pt")])
    assert f"wrote {tmp_path / 'small.pt'}" in capsys.readouterr().out
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert set(exported) == {"format", "model", "model_config", "labels", "exported_from", "global_step"}
    assert (tmp_path / "small.pt").stat().st_size < 0.6 * checkpoint.stat().st_size    # no optimiser state
    full, small = model_lib.load_model(checkpoint), model_lib.load_model(tmp_path / "small.pt")
    x = waveforms(2, seed=4, samples=int(full.config["sample_rate"] * full.config["window_seconds"]))
    with torch.no_grad():
        assert torch.equal(full(x), small(x))
    with pytest.raises(model_lib.CheckpointError, match="no EMA weights"):
        model_lib.export_weights(checkpoint, tmp_path / "ema.pt", ema=True)


def training_checkpoint(folder: Path, model: model_lib.BirdCallModel) -> Path:
    """As train.py writes one: weights, config, and the optimiser state an export leaves out."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config,
                "labels": model.labels, "optimizer": [torch.randn_like(p) for p in model.parameters()]},
               folder / "best.pt")
    return folder / "best.pt"


def run_model_command(monkeypatch, *argv: str) -> int:
    """`python model.py ARGV`, its __main__ block included, in this process -> the exit status."""
    monkeypatch.setattr(sys, "argv", [model_lib.__file__, *argv])
    try:
        runpy.run_path(model_lib.__file__, run_name="__main__")
    except SystemExit as done:
        return done.code
    return 0


def same_file_spelling(tmp_path: Path, how: str) -> str:
    """run/best.pt (the cwd is tmp_path), named another way."""
    if how == "symlink":
        (tmp_path / "link.pt").symlink_to(tmp_path / "run" / "best.pt")
        return "link.pt"
    if how == "symlinked folder":
        (tmp_path / "alias").symlink_to(tmp_path / "run", target_is_directory=True)
        return "alias/best.pt"
    if how == "hard link":
        os.link(tmp_path / "run" / "best.pt", tmp_path / "hard.pt")
        return "hard.pt"
    return {"same": "run/best.pt", "dots": "./run/../run/best.pt", "absolute": str(tmp_path / "run" / "best.pt")}[how]


@pytest.mark.parametrize("how", ["same", "dots", "absolute", "symlink", "symlinked folder", "hard link"])
def test_export_onto_its_own_source_is_refused_and_the_source_kept(small_model, tmp_path, monkeypatch, capsys, how):
    source = training_checkpoint(tmp_path / "run", small_model)
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    target = same_file_spelling(tmp_path, how)
    assert run_model_command(monkeypatch, "export", "run/best.pt", target) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "itself" in error, error
    assert source.read_bytes() == before
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["best.pt"]     # no temporary left


def test_export_into_a_missing_folder_or_onto_a_folder_is_one_line(small_model, tmp_path, monkeypatch, capsys):
    source = training_checkpoint(tmp_path / "run", small_model)
    monkeypatch.chdir(tmp_path)
    assert run_model_command(monkeypatch, "export", "run/best.pt", "rnu/small.pt") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the folder rnu does not exist" in error and "typo" in error, error
    assert not (tmp_path / "rnu").exists(), "a typo'd folder is not created"
    assert run_model_command(monkeypatch, "export", "run/best.pt", "run") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "run is a folder" in error, error
    assert run_model_command(monkeypatch, "export", "run/best.pt", "run/small.pt") == 0     # an existing folder is fine
    assert "wrote run/small.pt" in capsys.readouterr().out
    assert model_lib.load_model("run/small.pt").labels == small_model.labels
    assert sorted(path.name for path in source.parent.iterdir()) == ["best.pt", "small.pt"]


def test_a_head_that_does_not_fit_the_label_list_is_one_line(checkpoint, tmp_path):
    edited = torch.load(checkpoint, weights_only=True)
    edited["model_config"]["labels"] = edited["model_config"]["labels"] + ["extra1"]
    torch.save(edited, tmp_path / "edited.pt")
    with pytest.raises(model_lib.CheckpointError) as raised:
        model_lib.load_model(tmp_path / "edited.pt")
    message = str(raised.value)
    assert "\n" not in message and "weights do not fit the model its config describes (5 labels" in message
    assert "size mismatch" in message
