"""Tests for model.py's options: the PCEN frontend, img_size resizing, the linear/mlp/sed heads,
and that configs written before these options existed still build and load the old model_lib.

PCEN is checked against an independent numpy/scipy re-derivation that follows librosa.pcen
(librosa 0.11, librosa/core/spectrum.py) line by line. Only timm's tiny `test_efficientnet` is
built; nothing is downloaded.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

import frontend as frontend_lib
import model as model_lib

SAMPLE_RATE, N_FFT, HOP, N_MELS, FMIN, FMAX = 16000, 512, 256, 32, 50.0, 8000.0
PCEN = dict(gain=0.98, bias=2.0, power=0.5, time_constant=0.4, eps=1e-6)


def make_config(**overrides) -> dict:
    """A config with only the keys checkpoints had before the options existed."""
    config = {"backbone": "test_efficientnet", "labels": ["aaa1", "bbb1", "ccc1"],
              "activation": "sigmoid", "sample_rate": SAMPLE_RATE, "window_seconds": 2.0,
              "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX,
              "normalization": "standard", "dropout": 0.0}
    config.update(overrides)
    return config


def pcen_frontend(normalization="none", img_size=None, **overrides) -> frontend_lib.PCENFrontend:
    return frontend_lib.PCENFrontend(SAMPLE_RATE, N_FFT, HOP, N_MELS, FMIN, FMAX, normalization, img_size,
                              **overrides)


def signal(batch: int = 2, seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Real-ish bird audio: chirping tone bursts over quiet noise, a silent gap, varied loudness."""
    generator = torch.Generator().manual_seed(seed)
    samples = int(seconds * SAMPLE_RATE)
    t = torch.arange(samples, dtype=torch.float64) / SAMPLE_RATE
    rows = []
    for i in range(batch):
        chirp = torch.sin(2 * math.pi * (1500 + 800 * i) * t + 2 * math.pi * 600 * t ** 2)
        bursts = (torch.sin(2 * math.pi * (3 + i) * t) > 0.4).double()
        noise = 0.01 * torch.randn(samples, generator=generator, dtype=torch.float64)
        row = 0.4 * bursts * chirp + noise
        row[samples // 2: samples // 2 + 2000] = 0.0
        rows.append(row * 10.0 ** (-i))
    return torch.stack(rows).float()


def librosa_b(time_constant, sr, hop_length):
    """librosa.pcen, verbatim: the smoothing coefficient from the time constant."""
    t_frames = time_constant * sr / float(hop_length)
    return (np.sqrt(1 + 4 * t_frames ** 2) - 1) / (2 * t_frames ** 2)


def librosa_pcen(S, sr, hop_length, gain, bias, power, time_constant, eps, zi=None, axis=-1):
    """librosa.pcen (0.11, max_size=1, b=None, ref=None), line by line, in float64."""
    b = librosa_b(time_constant, sr, hop_length)
    ref = S
    if zi is None:
        # Make sure zi matches dimension to input
        shape = tuple([1] * ref.ndim)
        zi = np.empty(shape)
        zi[:] = scipy.signal.lfilter_zi([b], [1, b - 1])[:]
    S_smooth, zf = scipy.signal.lfilter([b], [1, b - 1], ref, zi=zi, axis=axis)
    smooth = np.exp(-gain * (np.log(eps) + np.log1p(S_smooth / eps)))
    if power == 0:
        S_out = np.log1p(S * smooth)
    elif bias == 0:
        with np.errstate(divide="ignore"):
            S_out = np.exp(power * (np.log(S) + np.log(smooth)))
    else:
        S_out = (bias ** power) * np.expm1(power * np.log1p(S * smooth / bias))
    return S_out


def first_frame_zi(S, b):
    """The steady state for the first frame: lfilter_zi scaled by S[..., 0] (our default)."""
    return scipy.signal.lfilter_zi([b], [1, b - 1]) * S[..., :1]


def reference_magnitude_mel(x: torch.Tensor) -> np.ndarray:
    """|STFT| (hann, centred, reflect) -> torchaudio's mel filters, in float64: (B, n_mels, T)."""
    x = x.double()
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.stft(x, N_FFT, HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs()                                          # (B, F, T)
    fbank = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, FMIN, FMAX, N_MELS, SAMPLE_RATE)
    return torch.einsum("bft,fm->bmt", spec, fbank.double()).numpy()


def assert_close_relative(actual: np.ndarray, expected: np.ndarray, tolerance=1e-4):
    """max |actual - expected| < tolerance * max |expected|."""
    error = np.abs(actual - expected).max()
    assert error < tolerance * np.abs(expected).max(), f"max abs error {error:.3g}, scale {np.abs(expected).max():.3g}"


# ----------------------------------------------------------------------------- PCEN

def random_spectrograms(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = 10.0 ** rng.uniform(-4, 12, size=(3, 24, 313))        # a huge dynamic range
    S[0, :, 0] = 1e12                                          # a loud first frame, then quiet
    S[0, :, 1:] = 10.0 ** rng.uniform(0, 3, size=(24, 312))
    S[1, 5, 100:200] = 0.0                                     # digital silence in one band
    S[2] = 10.0 ** rng.uniform(-8, -5, size=(24, 313))         # quieter than eps throughout
    return S


def test_smoothing_coefficient_is_librosas():
    for time_constant, sr, hop in ((0.4, 32000, 512), (0.4, 16000, 256), (0.06, 22050, 512), (2.0, 32000, 320)):
        b = frontend_lib.pcen_smoothing_coefficient(time_constant, sr, hop)
        assert b == pytest.approx(librosa_b(time_constant, sr, hop), rel=1e-12)
        frames = time_constant * sr / hop
        assert frames ** 2 * b ** 2 + b - 1 == pytest.approx(0.0, abs=1e-12)  # the root it is
        assert 0 < b < 1
    # 32 kHz, hop 512, 0.4 s: T = 25 frames
    b = frontend_lib.pcen_smoothing_coefficient(time_constant=0.4, sample_rate=32000, hop=512)
    assert b == pytest.approx((math.sqrt(2501) - 1) / 1250)


@pytest.mark.parametrize("params", [
    PCEN,
    dict(gain=0.8, bias=10.0, power=0.25, time_constant=0.06, eps=1e-6),
    dict(gain=0.5, bias=0.0, power=0.5, time_constant=1.0, eps=1e-3),
])
@pytest.mark.parametrize("initial_state", ["first_frame", "librosa"])
def test_pcen_matches_librosa_rederivation_on_random_spectrograms(params, initial_state):
    S = random_spectrograms()
    b = librosa_b(params["time_constant"], SAMPLE_RATE, HOP)
    zi = first_frame_zi(S, b) if initial_state == "first_frame" else None  # None: librosa's default
    expected = librosa_pcen(S, SAMPLE_RATE, HOP, zi=zi, **params)
    actual = frontend_lib.pcen(torch.tensor(S, dtype=torch.float32), frontend_lib.pcen_smoothing_coefficient(
        params["time_constant"], SAMPLE_RATE, HOP), params["gain"], params["bias"], params["power"],
        params["eps"], initial_state).double().numpy()
    assert np.isfinite(actual).all()
    assert_close_relative(actual, expected)
    # also element by element, relative to each value (float32 input rounding is ~6e-8)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_pcen_stable_form_equals_the_definition():
    """librosa's log-space form == (S / (eps + M)**gain + bias)**power - bias**power, M from lfilter."""
    S = random_spectrograms(seed=1)
    b = librosa_b(PCEN["time_constant"], SAMPLE_RATE, HOP)
    M = scipy.signal.lfilter([b], [1, b - 1], S, zi=first_frame_zi(S, b), axis=-1)[0]
    definition = (S / (PCEN["eps"] + M) ** PCEN["gain"] + PCEN["bias"]) ** PCEN["power"] - PCEN["bias"] ** PCEN["power"]
    actual = frontend_lib.pcen(torch.tensor(S, dtype=torch.float32), b, PCEN["gain"], PCEN["bias"],
                        PCEN["power"], PCEN["eps"]).double().numpy()
    assert_close_relative(actual, definition)


def test_pcen_first_frame_starts_in_steady_state():
    S = random_spectrograms(seed=2)
    b = librosa_b(PCEN["time_constant"], SAMPLE_RATE, HOP)
    gain, bias, power, eps = PCEN["gain"], PCEN["bias"], PCEN["power"], PCEN["eps"]
    out = frontend_lib.pcen(torch.tensor(S, dtype=torch.float32), b, gain, bias, power, eps).double().numpy()
    # M[-1] = S[0] gives M[0] = (1 - b) S[0] + b S[0] = S[0]
    S0 = S[..., 0]
    first = (S0 / (eps + S0) ** gain + bias) ** power - bias ** power
    np.testing.assert_allclose(out[..., 0], first, rtol=1e-4)
    # a constant spectrogram stays in steady state: the same output in every frame
    constant = torch.full((2, 4, 50), 3e8)
    flat = frontend_lib.pcen(constant, b, gain, bias, power, eps)
    torch.testing.assert_close(flat, flat[..., :1].expand_as(flat), rtol=1e-5, atol=0)
    # librosa's unscaled zi (M[-1] = 1) does not: with int32-range levels M starts near 0
    ramp = frontend_lib.pcen(constant, b, gain, bias, power, eps, initial_state="librosa")
    assert float(ramp[..., 0].min()) > 3 * float(flat[..., 0].max())
    np.testing.assert_allclose(ramp.double().numpy(),
                               librosa_pcen(constant.double().numpy(), SAMPLE_RATE, HOP, **PCEN), rtol=1e-4)


def test_pcen_frontend_matches_rederivation_on_a_real_signal():
    """Waveform -> |STFT| -> mel (float64, by hand) -> x 2**31 -> librosa's pcen == the frontend."""
    x = signal(3)
    S = reference_magnitude_mel(x) * 2.0 ** 31                                     # (B, n_mels, T)
    b = librosa_b(PCEN["time_constant"], SAMPLE_RATE, HOP)
    expected = librosa_pcen(S, SAMPLE_RATE, HOP, zi=first_frame_zi(S, b), **PCEN)
    image = pcen_frontend("none")(x)
    assert image.shape == (3, 1, N_MELS, 1 + x.shape[1] // HOP) and image.dtype == torch.float32
    for example in range(3):  # each example on its own scale: they differ by 10x in loudness
        assert_close_relative(image[example, 0].double().numpy(), expected[example])
    # and the defaults are the log's experiment-12 parameters
    layer = frontend_lib.build_frontend(make_config(frontend="pcen", normalization="none"))
    assert isinstance(layer, frontend_lib.PCENFrontend)
    assert (layer.gain, layer.bias, layer.power, layer.eps) == (0.98, 2.0, 0.5, 1e-6)
    assert layer.b == pytest.approx(b) and layer.input_scale == 2.0 ** 31
    assert torch.equal(layer(x), image)


def test_pcen_frontend_normalisation_and_float32_under_autocast():
    x = signal(2)
    raw = pcen_frontend("none")(x)
    standard = pcen_frontend("standard")(x)
    mean, std = raw.mean(dim=(2, 3), keepdim=True), raw.std(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(standard, (raw - mean) / (std + 1e-6), atol=1e-5, rtol=1e-5)
    minmax = pcen_frontend("minmax")(x)
    for example in minmax:
        assert float(example.min()) == pytest.approx(0.0, abs=1e-6)
        assert float(example.max()) == pytest.approx(1.0, abs=1e-5)
    layer = pcen_frontend("standard")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, standard, atol=1e-5, rtol=0)


def test_pcen_example_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(1)
    quiet = signal(1, seed=3)[0] * 1e-3
    loud = 0.9 * torch.rand(2 * SAMPLE_RATE, generator=generator) - 0.45
    for normalization in ("standard", "minmax", "none"):
        for img_size in (None, [40, 50]):
            layer = pcen_frontend(normalization, img_size)
            alone = layer(quiet[None])
            in_batch = layer(torch.stack([loud, quiet, loud]))
            torch.testing.assert_close(in_batch[1:2], alone, atol=1e-5, rtol=1e-5,
                                       msg=f"{normalization}/{img_size}: example changed by its batch")
            torch.testing.assert_close(in_batch[0:1], layer(loud[None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", [dict(gain=0.8), dict(bias=10.0), dict(power=0.25),
                                    dict(time_constant=0.06), dict(eps=1e6), dict(input_scale=1.0),
                                    dict(initial_state="librosa")])
def test_pcen_parameters_change_the_output(change):
    x = signal(2)
    default = pcen_frontend("none")(x)
    changed = pcen_frontend("none", **change)(x)
    assert changed.shape == default.shape == (2, 1, N_MELS, 1 + x.shape[1] // HOP)
    assert (changed - default).abs().max() > 1e-2 * default.abs().max(), change
    # the config keys reach the frontend
    key, value = next(iter(change.items()))
    built = frontend_lib.build_frontend(make_config(frontend="pcen", normalization="none", **{f"pcen_{key}": value}))
    torch.testing.assert_close(built(x), changed, atol=0, rtol=0)


def test_pcen_and_frontend_reject_bad_settings():
    for bad in (dict(power=0.0), dict(gain=-0.1), dict(bias=-1.0), dict(eps=0.0), dict(time_constant=0.0),
                dict(input_scale=0.0)):
        with pytest.raises(ValueError, match="pcen_"):
            pcen_frontend(**bad)
    with pytest.raises(ValueError, match="initial_state"):
        pcen_frontend(initial_state="zeros")
    with pytest.raises(ValueError, match="frontend"):
        model_lib.BirdCallModel(make_config(frontend="cqt"))
    with pytest.raises(ValueError, match="Nyquist"):
        frontend_lib.build_frontend(make_config(frontend="pcen", fmax=9000.0))


# ----------------------------------------------------------------------------- img_size

@pytest.mark.parametrize("frontend", frontend_lib.FRONTENDS)
@pytest.mark.parametrize("img_size", [[64, 40], [256, 157], [256, 256], (16, 300)])
def test_img_size_gives_exactly_h_by_w(frontend, img_size):
    x = signal(2)
    layer = frontend_lib.build_frontend(make_config(frontend=frontend, img_size=img_size))
    image = layer(x)
    assert image.shape == (2, 1, img_size[0], img_size[1]) and image.dtype == torch.float32
    # the resize is a bilinear interpolation of the un-resized (normalised) image
    plain = frontend_lib.build_frontend(make_config(frontend=frontend))(x)
    expected = F.interpolate(plain, size=tuple(img_size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


def test_img_size_is_part_of_the_frontend_and_validated():
    torch.manual_seed(0)
    net = model_lib.BirdCallModel(make_config(img_size=[64, 96])).eval()
    x = signal(2)
    with torch.no_grad():
        assert net.frontend(x).shape == (2, 1, 64, 96)
        torch.testing.assert_close(net(x), net.classify(net.frontend(x)), atol=0, rtol=0)
    for bad in ([64], [64, 0], [64.0, 96], "64x96", [64, 96, 1]):
        with pytest.raises(ValueError, match="img_size"):
            frontend_lib.build_frontend(make_config(img_size=bad))


# ----------------------------------------------------------------------------- heads

@pytest.fixture(scope="module")
def heads() -> dict:
    """One model per head, all with the same backbone weights.

    The tiny random backbone's features are ~1e-3 (its last conv's output sits near SiLU's zero),
    so they barely vary over time and every head would give near-equal logits, which would make
    the comparisons below vacuous. Its last BatchNorm's scale is raised to give O(0.3) features.
    """
    nets = {}
    for head in model_lib.HEADS:
        torch.manual_seed(0)
        nets[head] = model_lib.BirdCallModel(make_config(head=head)).eval()
        with torch.no_grad():
            nets[head].backbone.bn2.weight.mul_(300.0)
    with torch.no_grad():
        features = nets["sed"].backbone(nets["sed"].frontend(signal(2))).mean(dim=2)   # (B, C, T')
    assert float(features.std(dim=-1).mean()) > 0.05, "sanity: features must vary over time"
    return nets


def test_heads_return_logits_of_shape_b_by_classes(heads):
    x = signal(4)
    outputs = {}
    with torch.no_grad():
        for head, net in heads.items():
            outputs[head] = net(x)
            assert outputs[head].shape == (4, 3) and outputs[head].dtype == torch.float32, head
            torch.testing.assert_close(outputs[head], net.classify(net.frontend(x)), atol=0, rtol=0)
    # same backbone weights, different heads: the head changes the output
    assert torch.equal(heads["linear"].backbone.conv_stem.weight, heads["sed"].backbone.conv_stem.weight)
    assert not torch.allclose(outputs["linear"], outputs["mlp"], atol=1e-2)
    assert not torch.allclose(outputs["linear"], outputs["sed"], atol=1e-2)


def test_sed_with_uniform_attention_and_the_linear_weights_is_the_linear_head(heads):
    """mean over (F', T') then W equals W framewise then mean over T': attention is what sed adds."""
    linear = heads["linear"]
    torch.manual_seed(0)
    sed = model_lib.BirdCallModel(make_config(head="sed")).eval()
    sed.load_state_dict({k: v for k, v in linear.state_dict().items() if not k.startswith("head.")}, strict=False)
    x = signal(3)
    with torch.no_grad():
        sed.head.framewise.weight.copy_(linear.head.weight[..., None])
        sed.head.framewise.bias.copy_(linear.head.bias)
        sed.head.attention.weight.normal_(0.0, 0.5)
        sed.head.attention.bias.zero_()
        attended = sed(x)
        sed.head.attention.weight.zero_()                  # tanh(0) = 0 everywhere: uniform weights
        uniform = sed(x)
        expected = linear(x)
    torch.testing.assert_close(uniform, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attended, expected, atol=1e-2)


def test_mlp_head_has_the_extra_layer(heads):
    net, channels = heads["mlp"], heads["mlp"].backbone.num_features
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(channels, channels), (channels, 3)]
    kinds = [type(m) for m in net.head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert isinstance(heads["linear"].head, nn.Linear)
    x = signal(3)
    with torch.no_grad():
        pooled = net.backbone(net.frontend(x)).mean(dim=(2, 3))                  # (B, C)
        expected = linears[1](torch.relu(linears[0](pooled)))
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    # its dropout is the config's
    assert model_lib.BirdCallModel(make_config(head="mlp", dropout=0.3)).head[2].p == 0.3


def test_sed_head_attention_pooling_rederived(heads):
    net = heads["sed"]
    x = signal(3)
    with torch.no_grad():
        features = net.backbone(net.frontend(x))                                 # (B, C, F', T')
        frames = net.framewise_logits(x)
        clip, framewise, weights = net.sed_outputs(x)
        logits = net(x)
    time_steps = features.shape[-1]
    assert time_steps > 1
    assert frames.shape == framewise.shape == weights.shape == (3, time_steps, 3)
    assert torch.equal(frames, framewise)
    # by hand: mean over frequency, two 1x1 convolutions, softmax over time of tanh
    pooled = features.mean(dim=2)                                                # (B, C, T')
    by_hand_frames = torch.einsum("bct,kc->btk", pooled, net.head.framewise.weight[..., 0]) + net.head.framewise.bias
    attention = torch.einsum("bct,kc->btk", pooled, net.head.attention.weight[..., 0]) + net.head.attention.bias
    by_hand_weights = torch.tanh(attention).softmax(dim=1)                       # over time
    torch.testing.assert_close(framewise, by_hand_frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, by_hand_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 3))
    torch.testing.assert_close(logits, (weights * framewise).sum(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, (by_hand_weights * by_hand_frames).sum(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip, logits, atol=0, rtol=0)
    # not a plain mean: the attention weights are not uniform
    assert float((weights.amax(dim=1) - weights.amin(dim=1)).min()) > 1e-3
    assert not torch.allclose(logits, framewise.mean(dim=1), atol=1e-3)


def test_sed_head_with_uniform_attention_is_the_mean_of_framewise_logits():
    torch.manual_seed(2)
    net = model_lib.BirdCallModel(make_config(head="sed", img_size=[32, 200])).eval()
    with torch.no_grad():
        net.head.attention.weight.zero_()
        net.head.attention.bias.zero_()                   # tanh(0) = 0 for every frame: uniform
        x = signal(2)
        frames = net.framewise_logits(x)
        assert frames.shape == (2, net.backbone(net.frontend(x)).shape[-1], 3)
        assert frames.shape[1] == 7                       # test_efficientnet: 200 columns -> 7
        torch.testing.assert_close(net(x), frames.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_framewise_logits_only_for_the_sed_head(heads):
    for head in ("linear", "mlp"):
        with pytest.raises(ValueError, match="sed"):
            heads[head].framewise_logits(signal(1))
    with pytest.raises(ValueError, match="head"):
        model_lib.BirdCallModel(make_config(head="gem"))


# ----------------------------------------------------------------------------- old configs, checkpoints

OLD_HEAD_AND_FRONTEND_KEYS = {"frontend.melspec.spectrogram.window", "frontend.melspec.mel_scale.fb",
                              "head.weight", "head.bias"}


def test_old_config_builds_the_old_model_and_loads_an_old_state_dict():
    old_config = make_config()
    assert not {"frontend", "head", "img_size"} & set(old_config)
    torch.manual_seed(4)
    old = model_lib.BirdCallModel(old_config).eval()
    assert type(old.frontend) is frontend_lib.MelFrontend and old.frontend.img_size is None
    assert isinstance(old.head, nn.Linear) and old.head_type == "linear"
    assert {k for k in old.state_dict() if not k.startswith("backbone.")} == OLD_HEAD_AND_FRONTEND_KEYS
    assert old.config == old_config, "the config must not be rewritten"
    # an old-style state dict (these keys only) loads strictly, into old and explicit-default configs
    state = {k: v.clone() for k, v in old.state_dict().items()}
    explicit = model_lib.BirdCallModel(make_config(frontend="mel", head="linear", img_size=None)).eval()
    explicit.load_state_dict(state)
    fresh = model_lib.BirdCallModel(old_config).eval()
    fresh.load_state_dict(state)
    x = signal(2)
    with torch.no_grad():
        assert torch.equal(fresh(x), old(x)) and torch.equal(explicit(x), old(x))
        # and it is today's linear head: mean over (freq, time), then Linear
        expected = old.head(old.backbone(old.frontend(x)).mean(dim=(2, 3)))
        torch.testing.assert_close(old(x), expected, atol=1e-6, rtol=1e-6)


class ModelBeforeBackboneFitting(nn.Module):
    """BirdCallModel as it was before backbones were fitted to the image (issue 18), re-derived: the head
    on `num_features` channels, built right after the backbone, and no padding."""

    def __init__(self, config: dict):
        super().__init__()
        self.frontend = frontend_lib.build_frontend(config)
        self.backbone = model_lib.create_backbone(config["backbone"], pretrained=False, pretrained_file=None)
        channels, n_classes = self.backbone.num_features, len(config["labels"])
        self.head_type = config.get("head", "linear")
        self.dropout = nn.Dropout(config["dropout"])
        if self.head_type == "linear":
            self.head = nn.Linear(channels, n_classes)
        elif self.head_type == "mlp":
            self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Dropout(config["dropout"]),
                                      nn.Linear(channels, n_classes))
        else:
            self.head = model_lib.SEDHead(channels, n_classes, config["dropout"])

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        features = self.backbone(self.frontend(waveform))                    # (B, C, H/32, W/32)
        if self.head_type == "sed":
            return self.head(features)
        if self.head_type == "mlp":
            return self.head(features.mean(dim=(2, 3)))
        return self.head(self.dropout(features.mean(dim=(2, 3))))


@pytest.mark.parametrize("head", model_lib.HEADS)
def test_a_checkpoint_from_before_backbone_fitting_loads_and_scores_bit_for_bit(head, tmp_path):
    """Same parameter names and shapes, same random draws when built, same logits to the last bit."""
    config = make_config(dropout=0.2) if head == "linear" else make_config(head=head, dropout=0.2)
    torch.manual_seed(11)
    old = ModelBeforeBackboneFitting(config)
    initial, rng_after_build = copy.deepcopy(old.state_dict()), torch.random.get_rng_state()
    with torch.no_grad():
        old(signal(4, seed=5))                     # training mode: BatchNorm statistics move
    old.eval()
    path = tmp_path / "old.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": old.state_dict(), "model_config": config,
                "labels": config["labels"]}, path)
    loaded = model_lib.load_model(path)
    assert loaded.config == config and loaded.pad_multiple == (1, 1)
    assert ([(name, tensor.shape) for name, tensor in loaded.state_dict().items()]
            == [(name, tensor.shape) for name, tensor in old.state_dict().items()])
    x = signal(3, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))
    # and today's model, from the same seed, draws the same weights (the probe forward draws nothing)
    torch.manual_seed(11)
    new = model_lib.BirdCallModel(config)
    assert torch.equal(torch.random.get_rng_state(), rng_after_build)
    assert all(torch.equal(tensor, initial[name]) for name, tensor in new.state_dict().items())
    assert list(new.state_dict()) == list(initial)


def test_model_config_writes_the_new_keys_with_defaults_when_settings_are_absent():
    settings = dict(backbone="test_efficientnet", activation="sigmoid", sample_rate=SAMPLE_RATE,
                    window_seconds=2.0, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, fmin=FMIN,
                    fmax=FMAX, normalization="standard", dropout=0.1)
    config = model_lib.model_config(settings, ["aaa1"])
    assert config["frontend"] == "mel" and config["head"] == "linear" and config["img_size"] is None
    assert {k: config[k] for k in frontend_lib.PCEN_DEFAULTS} == frontend_lib.PCEN_DEFAULTS
    settings |= dict(frontend="pcen", head="sed", img_size=(256, 157), pcen_gain=0.9)
    config = model_lib.model_config(settings, ["aaa1"])
    assert ((config["frontend"], config["head"], config["img_size"], config["pcen_gain"])
            == ("pcen", "sed", [256, 157], 0.9))
    for value in config.values():   # plain data only: checkpoints are read with weights_only=True
        assert value is None or isinstance(value, (str, int, float, bool, list))


def test_checkpoint_round_trip_pcen_sed_img_size(tmp_path):
    torch.manual_seed(5)
    config = make_config(frontend="pcen", head="sed", img_size=[48, 160], pcen_gain=0.9, pcen_bias=3.0,
                         pcen_power=0.4, pcen_time_constant=0.2, pcen_eps=1e-5,
                         pcen_input_scale=float(2 ** 31), pcen_initial_state="first_frame", dropout=0.2)
    original = model_lib.BirdCallModel(config).eval()
    with torch.no_grad():                      # non-default BatchNorm statistics must travel too
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "best.pt"
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": original.state_dict(),
                "model_config": original.config, "labels": original.labels}, path)
    loaded = model_lib.load_model(path)
    assert loaded.config == config
    assert isinstance(loaded.frontend, frontend_lib.PCENFrontend) and isinstance(loaded.head, model_lib.SEDHead)
    assert loaded.frontend.img_size == (48, 160) and loaded.frontend.gain == 0.9
    x = signal(3, seed=8)
    with torch.no_grad():
        assert loaded.frontend(x).shape == (3, 1, 48, 160)
        assert torch.equal(loaded(x), original(x))
        assert torch.equal(loaded.framewise_logits(x), original.framewise_logits(x))


def test_the_logs_efficientnetv2_backbone_builds_with_one_channel():
    """tf_efficientnetv2_s.in21k (log experiments 1-6) must work too; random weights, no download."""
    config = {"backbone": "tf_efficientnetv2_s.in21k", "labels": ["a", "b", "c"], "activation": "softmax",
              "sample_rate": 32000, "window_seconds": 1.0, "n_fft": 1024, "hop": 512, "n_mels": 64,
              "fmin": 20.0, "fmax": 16000.0, "normalization": "standard", "dropout": 0.0}
    net = model_lib.BirdCallModel(config).eval()
    assert net.backbone.conv_stem.in_channels == 1
    with torch.inference_mode():
        assert net(torch.randn(2, 32000)).shape == (2, 3)
