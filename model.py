"""The classifier: raw waveform in, logits out.

The spectrogram frontend is a layer of the model, so training, validation and
inference cannot preprocess differently (the original experiments lost days to a
train/infer mismatch). Everything needed to rebuild the model -- frontend
settings, backbone, head, label list, activation -- travels in `model.config`
and therefore in every checkpoint; `load_model(path)` needs nothing else.

The model returns logits. Turning logits into probabilities happens in exactly
one place, `activate()`, with the activation that matches the training loss.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

# Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT = 1

ACTIVATIONS = ("softmax", "sigmoid")
FRONTENDS = ("mel", "pcen")
HEADS = ("linear", "mlp", "sed")
HEAD_INITS = ("copy", "fresh", "extend")      # --init-from: what becomes of the pre-trained head
NORMALIZATIONS = ("standard", "minmax", "none")
PCEN_INITIAL_STATES = ("first_frame", "librosa")

# PCEN defaults. gain..eps: librosa's and the PCEN paper's (Wang et al. 2017).
PCEN_DEFAULTS = {"pcen_gain": 0.98, "pcen_bias": 2.0, "pcen_power": 0.5,
                 "pcen_time_constant": 0.4, "pcen_eps": 1e-6,
                 # librosa.pcen's docs: those defaults assume audio in the int32 range [-2**31, 2**31),
                 # not [-1, 1); our waveforms are floats in [-1, 1], so the magnitude mel
                 # spectrogram is multiplied by 2**31 (the mel magnitude is linear in amplitude).
                 # The filter starts in steady state for the first frame; see pcen().
                 "pcen_input_scale": float(2 ** 31),
                 "pcen_initial_state": "first_frame"}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; never fall back to random."""


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits (N, C) -> scores (N, C). The one place where activations live."""
    if activation == "softmax":
        return logits.float().softmax(dim=-1)
    if activation == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def checked_scores(logits: torch.Tensor, activation: str, source: str) -> np.ndarray:
    """Logits (N, C) -> activated scores as numpy, refusing non-finite logits.

    Evaluation, soundscape validation and inference all pass through here, so no
    nan/inf ever reaches a metric or a submission.
    """
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise FloatingPointError(f"{source} produced {bad} non-finite logits; refusing to score or submit them")
    return activate(logits, activation).numpy()


def pcen_smoothing_coefficient(time_constant: float, sample_rate: float, hop: int) -> float:
    """librosa.pcen's IIR coefficient b for a time constant in seconds.

    T = time_constant * sr / hop frames and b = (sqrt(1 + 4 T**2) - 1) / (2 T**2), the positive
    root of T**2 b**2 + b - 1 = 0 (librosa: approximates the full-width half-maximum of the
    squared frequency response of the low-pass filter). 0.4 s at 32 kHz, hop 512: T = 25, b = 0.039.
    """
    frames = time_constant * sample_rate / float(hop)
    return (math.sqrt(1 + 4 * frames ** 2) - 1) / (2 * frames ** 2)


def _first_order_scan(x: torch.Tensor, decay: float) -> torch.Tensor:
    """y[t] = x[t] + decay * y[t-1] along the last axis, with y[-1] = 0.

    Vectorised by doubling (log2(T) steps, not T): after the step with shift s,
    y[t] = sum_{j < 2s} decay**j x[t-j]. Only additions of non-negative terms for a
    non-negative x, so float32 keeps ~1e-6 relative precision (no cancellation, no
    matmul that TF32 could round), on CPU and CUDA alike.
    """
    length = x.shape[-1]
    y, shift, coefficient = x, 1, decay
    while shift < length:
        # right-hand side reads the previous y only: no in-place aliasing
        y = torch.cat([y[..., :shift], y[..., shift:] + coefficient * y[..., :-shift]], dim=-1)
        shift, coefficient = 2 * shift, coefficient * coefficient
    return y


def pcen(spec: torch.Tensor, b: float, gain: float = 0.98, bias: float = 2.0, power: float = 0.5,
         eps: float = 1e-6, initial_state: str = "first_frame") -> torch.Tensor:
    """Per-channel energy normalisation of a non-negative spectrogram (..., frequency, time).

    librosa.pcen's definition (librosa 0.11, max_size=1):
        M[t] = (1 - b) M[t-1] + b S[t]                 (scipy.signal.lfilter([b], [1, b-1]))
        P    = (S / (eps + M)**gain + bias)**power - bias**power
    evaluated in librosa's stable forms: (eps + M)**-gain = exp(-gain (log eps + log1p(M / eps)))
    and, for bias > 0, bias**power * expm1(power * log1p(S (eps + M)**-gain / bias)).

    initial_state: the filter state before the first frame.
      "first_frame": M[-1] = S[..., 0], the steady state for the first frame, so M[0] = S[0]
          (librosa.pcen(S, zi=scipy.signal.lfilter_zi([b], [1, b-1]) * S[..., :1])). A window
          cut from the middle of a recording then starts as if that level had lasted.
      "librosa": librosa.pcen's default zi = lfilter_zi([b], [1, b-1]) unscaled, i.e. M[-1] = 1
          in the units of S: with int32-scaled audio M starts near 0 and the first ~T frames
          of every window come out bright.
    Each example is filtered on its own: the output does not depend on the rest of the batch.
    """
    if initial_state not in PCEN_INITIAL_STATES:
        raise ValueError(f"unknown PCEN initial_state {initial_state!r}; expected one of {PCEN_INITIAL_STATES}")
    if not 0.0 < b <= 1.0:
        raise ValueError(f"PCEN smoothing coefficient b={b} must be in (0, 1]")
    decay = 1.0 - b
    length = spec.shape[-1]
    # M[t] = b sum_{j<=t} (1-b)**j S[t-j] + (1-b)**(t+1) M[-1]: both terms non-negative
    start = spec[..., :1] if initial_state == "first_frame" else torch.ones_like(spec[..., :1])
    carry = torch.pow(torch.tensor(decay, dtype=torch.float64),
                      torch.arange(1, length + 1, dtype=torch.float64)).to(spec)   # (T,) (1-b)**(t+1)
    smoothed = b * _first_order_scan(spec, decay) + start * carry                  # (..., F, T)
    # (eps + M)**-gain, in log space as librosa does: eps = 1e-6 and M up to ~1e12 stay finite
    agc = torch.exp(-gain * (math.log(eps) + torch.log1p(smoothed / eps)))
    if bias == 0:
        return torch.pow(spec * agc, power)
    return (bias ** power) * torch.expm1(power * torch.log1p(spec * agc / bias))


class MelFrontend(nn.Module):
    """Waveform (B, samples) -> normalised log-mel image (B, 1, n_mels, frames), or (B, 1, H, W).

    Always computed in float32, even under autocast: an STFT in fp16 loses the
    quiet high-frequency detail that bird calls live in.
    """

    # the mel spectrogram's exponent: 2 = power (for dB), 1 = magnitude (for PCEN)
    spectrogram_power = 2.0

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                 fmin: float, fmax: float, normalization: str = "standard",
                 img_size: list[int] | tuple[int, int] | None = None):
        super().__init__()
        if fmax > sample_rate / 2:
            raise ValueError(f"fmax {fmax} Hz is above the Nyquist frequency of {sample_rate} Hz audio")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
        if img_size is not None:
            if (len(img_size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                              for n in img_size)):
                raise ValueError(f"img_size must be None or [height, width] of positive ints, got {img_size!r}")
            img_size = (int(img_size[0]), int(img_size[1]))
        self.normalization = normalization
        self.img_size = img_size
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
            f_min=fmin, f_max=fmax, power=self.spectrogram_power, center=True, pad_mode="reflect")
        # Each mel filter is a triangle over a few frequency bins, so the (n_freqs, n_mels) filterbank
        # is mostly zeros: multiply blocks of 16 mel bands with just the bins they cover
        # (128 mels of a 1024-point FFT: 537 bins x 16 instead of 513 x 128, 7.6x fewer products).
        used = self.melspec.mel_scale.fb != 0                                          # (n_freqs, n_mels)
        self.mel_blocks = []                                   # (first mel, end mel, first bin, end bin)
        for first in range(0, n_mels, 16):
            bins = torch.nonzero(used[:, first:first + 16].any(dim=1)).flatten()
            low, high = (int(bins[0]), int(bins[-1]) + 1) if len(bins) else (0, 0)
            self.mel_blocks.append((first, min(first + 16, n_mels), low, high))
        self._init_compression()

    def _init_compression(self) -> None:
        # With a 4-D input torchaudio applies top_db per example, not per batch,
        # so a window's image does not depend on what else is in its batch.
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0)

    def compress(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel power (B, 1, n_mels, T) -> dB (B, 1, n_mels, T)."""
        return self.to_db(mel)

    def mel_spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_mels, T): torchaudio's MelSpectrogram (its window and filterbank),
        with |X|**2 taken as real**2 + imag**2 (no complex abs() then pow()) and the filterbank
        applied block by block without its zeros: the same to float rounding (tested against it)."""
        settings = self.melspec.spectrogram
        spectrum = torch.stft(waveform, settings.n_fft, settings.hop_length, settings.win_length,
                              settings.window, center=settings.center, pad_mode=settings.pad_mode,
                              normalized=False, onesided=True, return_complex=True)   # (B, n_fft // 2 + 1, T)
        power = spectrum.real.square() + spectrum.imag.square()
        if self.spectrogram_power == 1.0:
            power = power.sqrt()
        filterbank = self.melspec.mel_scale.fb                                        # (n_freqs, n_mels)
        mel = power.new_zeros((power.shape[0], filterbank.shape[1], power.shape[2]))  # (B, n_mels, T)
        for first, end, low, high in self.mel_blocks:
            mel[:, first:end] = filterbank[low:high, first:end].T @ power[:, low:high]  # (m, bins) @ (B, bins, T)
        return mel

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            image = self.mel_spectrogram(waveform.float()).unsqueeze(1)  # (B, 1, n_mels, T)
            image = self.compress(image)
            # per example, so a window's image does not depend on its batch mates
            if self.normalization == "standard":
                mean = image.mean(dim=(2, 3), keepdim=True)
                std = image.std(dim=(2, 3), keepdim=True)
                image = (image - mean) / (std + 1e-6)
            elif self.normalization == "minmax":
                low = image.amin(dim=(2, 3), keepdim=True)
                high = image.amax(dim=(2, 3), keepdim=True)
                image = (image - low) / (high - low + 1e-6)
            if self.img_size is not None:
                # after normalisation: a pure geometric resize of the finished image, (B, 1, H, W).
                # Bilinear weights are convex, so minmax images stay in [0, 1].
                image = F.interpolate(image, size=self.img_size, mode="bilinear", align_corners=False)
        return image


class PCENFrontend(MelFrontend):
    """Waveform (B, samples) -> normalised PCEN mel image (B, 1, n_mels, frames), or (B, 1, H, W).

    Input to PCEN: the magnitude (power=1) mel spectrogram -- librosa.pcen documents S as a
    magnitude spectrogram and its examples use melspectrogram(power=1) -- of the waveform
    scaled to the int32 range (x `input_scale`, default 2**31), as librosa recommends for the
    default gain/bias/eps. The mel filterbank is the mel frontend's (torchaudio: HTK scale,
    unnormalised triangles), not librosa's Slaney-normalised one, so absolute levels differ
    from librosa.feature.melspectrogram by a per-band factor; with gain 0.98 the output depends
    on that level only through (eps + M)**0.02 (a factor of ~1.15 for a 1000x level change).
    """

    spectrogram_power = 1.0

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                 fmin: float, fmax: float, normalization: str = "standard",
                 img_size: list[int] | tuple[int, int] | None = None, *,
                 gain: float = PCEN_DEFAULTS["pcen_gain"], bias: float = PCEN_DEFAULTS["pcen_bias"],
                 power: float = PCEN_DEFAULTS["pcen_power"],
                 time_constant: float = PCEN_DEFAULTS["pcen_time_constant"],
                 eps: float = PCEN_DEFAULTS["pcen_eps"],
                 input_scale: float = PCEN_DEFAULTS["pcen_input_scale"],
                 initial_state: str = PCEN_DEFAULTS["pcen_initial_state"]):
        # librosa.pcen's parameter checks
        for name, value, ok in (("pcen_gain", gain, gain >= 0), ("pcen_bias", bias, bias >= 0),
                                ("pcen_power", power, power > 0), ("pcen_eps", eps, eps > 0),
                                ("pcen_time_constant", time_constant, time_constant > 0),
                                ("pcen_input_scale", input_scale, input_scale > 0)):
            if not ok:
                raise ValueError(f"{name}={value} is out of range (gain, bias >= 0; power, eps, "
                                 f"time_constant, input_scale > 0)")
        if initial_state not in PCEN_INITIAL_STATES:
            raise ValueError(f"unknown pcen_initial_state {initial_state!r}; expected one of {PCEN_INITIAL_STATES}")
        super().__init__(sample_rate, n_fft, hop, n_mels, fmin, fmax, normalization, img_size)
        self.gain, self.bias, self.power, self.eps = float(gain), float(bias), float(power), float(eps)
        self.input_scale, self.initial_state = float(input_scale), initial_state
        self.b = pcen_smoothing_coefficient(time_constant, sample_rate, hop)

    def _init_compression(self) -> None:
        pass  # PCEN has no submodules or buffers

    def compress(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel magnitude (B, 1, n_mels, T) -> PCEN (B, 1, n_mels, T), IIR along T per example."""
        return pcen(mel * self.input_scale, self.b, self.gain, self.bias, self.power, self.eps,
                    self.initial_state)


def build_frontend(config: dict) -> MelFrontend:
    """The frontend a config describes; keys added after format 1 default to the old behaviour."""
    kind = config.get("frontend", "mel")
    common = (config["sample_rate"], config["n_fft"], config["hop"], config["n_mels"],
              config["fmin"], config["fmax"], config["normalization"], config.get("img_size"))
    if kind == "mel":
        return MelFrontend(*common)
    if kind == "pcen":
        return PCENFrontend(*common, gain=config.get("pcen_gain", PCEN_DEFAULTS["pcen_gain"]),
                            bias=config.get("pcen_bias", PCEN_DEFAULTS["pcen_bias"]),
                            power=config.get("pcen_power", PCEN_DEFAULTS["pcen_power"]),
                            time_constant=config.get("pcen_time_constant", PCEN_DEFAULTS["pcen_time_constant"]),
                            eps=config.get("pcen_eps", PCEN_DEFAULTS["pcen_eps"]),
                            input_scale=config.get("pcen_input_scale", PCEN_DEFAULTS["pcen_input_scale"]),
                            initial_state=config.get("pcen_initial_state", PCEN_DEFAULTS["pcen_initial_state"]))
    raise ValueError(f"unknown frontend {kind!r}; expected one of {FRONTENDS}")


def check_backbone_name(name: str) -> None:
    """Fail with timm's own "Unknown model (...)" message for a name timm does not know."""
    if not timm.is_model(name):
        try:
            timm.create_model(name)
        except RuntimeError as error:
            raise ValueError(f"--backbone {name!r}: {error} (see timm.list_models())") from error


def create_backbone(name: str, pretrained: bool, pretrained_file: str | None) -> nn.Module:
    """A timm feature extractor with one input channel and no classifier.

    Unknown names fail with timm's own error. When pretrained weights were asked
    for and cannot be loaded, raise PretrainedWeightsError naming the alternatives.
    """
    check_backbone_name(name)
    # num_classes=0 and global_pool='' give the feature map; pooling is the head's job.
    kwargs = dict(in_chans=1, num_classes=0, global_pool="")
    if pretrained_file:
        path = Path(pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"--pretrained-file {path} does not exist. Give the path of a local copy of the "
                f"'{name}' weights, or pass --no-pretrained to train from random initialisation.")
        # timm loads the local file and adapts the RGB stem to one channel (sums the filters).
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path.resolve())), **kwargs)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # network, hub or file errors: all mean "no weights"
            raise PretrainedWeightsError(
                f"could not load pretrained weights for '{name}' from the timm hub "
                f"({type(error).__name__}: {error}). Pass --pretrained-file PATH with a local copy "
                f"of the weights, or --no-pretrained to train from random initialisation.") from error
    return timm.create_model(name, pretrained=False, **kwargs)


class SEDHead(nn.Module):
    """Sound-event-detection head (PANNs attention pooling, as the BirdCLEF 2021-2023 winners used).

    Backbone features (B, C, F', T') -> mean over frequency -> (B, C, T') -> two 1x1 convolutions:
    framewise logits (B, n_classes, T') and attention logits (B, n_classes, T'). The attention
    weights are a softmax over time of tanh(attention logits) (tanh bounds them to [-1, 1], so no
    single frame can take all the weight early in training), and the clip logits are the
    attention-weighted sum of the framewise logits over time -- still logits, no activation.
    """

    def __init__(self, in_features: int, n_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.framewise = nn.Conv1d(in_features, n_classes, kernel_size=1)
        self.attention = nn.Conv1d(in_features, n_classes, kernel_size=1)

    def frames(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, C, F', T') -> framewise logits and attention weights, both (B, n_classes, T')."""
        x = self.dropout(features.mean(dim=2))                                 # (B, C, T')
        framewise = self.framewise(x)                                          # (B, n_classes, T')
        weights = torch.tanh(self.attention(x)).softmax(dim=-1)                # (B, n_classes, T'), sums to 1 over T'
        return framewise, weights

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        framewise, weights = self.frames(features)
        return (weights * framewise).sum(dim=-1)                               # (B, n_classes)


class BirdCallModel(nn.Module):
    """Waveform (B, samples) -> logits (B, n_classes).

    forward = classify(frontend(waveform)): train.py puts SpecAugment between the two (the
    `image_augment` argument, so that one forward call serves DistributedDataParallel too) and
    infer.py exports `classify` alone, so everything up to the backbone input (spectrogram,
    PCEN or dB, normalisation, resize) lives in `frontend`, and everything after in `classify`.
    """

    def __init__(self, config: dict, pretrained: bool = False, pretrained_file: str | None = None):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.frontend = build_frontend(config)
        self.backbone = create_backbone(config["backbone"], pretrained, pretrained_file)
        channels, n_classes = self.backbone.num_features, len(config["labels"])
        self.head_type = config.get("head", "linear")       # checkpoints before `head` existed: linear
        # --head-init extend: the head keeps the pre-trained vocabulary's outputs, and a new layer on top
        # maps them to this vocabulary
        extended_from = int(config.get("head_extended_from", 0))
        n_outputs = extended_from or n_classes
        self.dropout = nn.Dropout(config["dropout"])
        if self.head_type == "linear":
            self.head = nn.Linear(channels, n_outputs)
        elif self.head_type == "mlp":
            # the log's "complex head"; its own dropout sits between the two layers
            self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(),
                                      nn.Dropout(config["dropout"]), nn.Linear(channels, n_outputs))
        elif self.head_type == "sed":
            self.head = SEDHead(channels, n_outputs, config["dropout"])
        else:
            raise ValueError(f"unknown head {self.head_type!r}; expected one of {HEADS}")
        self.extension = nn.Linear(extended_from, n_classes) if extended_from else None

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def activation(self) -> str:
        return self.config["activation"]

    @property
    def window_samples(self) -> int:
        return int(round(self.config["window_seconds"] * self.config["sample_rate"]))

    def forward(self, waveform: torch.Tensor, image_augment=None) -> torch.Tensor:
        image = self.frontend(waveform)                # (B, 1, n_mels, T)
        if image_augment is not None:                  # training only: SpecAugment
            image = image_augment(image)
        return self.classify(image)                    # (B, n_classes)

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        """Spectrogram image (B, 1, H, W) -> logits (B, n_classes); the part exported to ONNX."""
        features = self.backbone(image)                # (B, C, H/32, W/32)
        if self.head_type == "sed":
            logits = self.head(features)               # (B, n_outputs), attention-pooled over time
        elif self.head_type == "mlp":
            logits = self.head(features.mean(dim=(2, 3)))                  # (B, n_outputs)
        else:
            logits = self.head(self.dropout(features.mean(dim=(2, 3))))    # (B, n_outputs)
        return self.extension(logits) if self.extension is not None else logits   # (B, n_classes)

    def sed_outputs(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sed head only: (clip logits (B, n_classes), framewise logits (B, T', n_classes),
        attention weights (B, T', n_classes)), T' the backbone's time resolution.
        clip logits == (attention weights * framewise logits).sum(dim=1) == forward(waveform)."""
        if self.head_type != "sed":
            raise ValueError(f"framewise outputs need head='sed'; this model's head is {self.head_type!r}")
        framewise, weights = self.head.frames(self.backbone(self.frontend(waveform)))  # (B, n_classes, T') each
        clip = (weights * framewise).sum(dim=-1)                                         # (B, n_classes)
        return clip, framewise.transpose(1, 2), weights.transpose(1, 2)

    def framewise_logits(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform (B, samples) -> framewise logits (B, T', n_classes); sed head only (else ValueError)."""
        return self.sed_outputs(waveform)[1]


def activation_for_loss(loss_name: str) -> str:
    """Softmax goes with cross-entropy; the per-species losses (bce, focal) go with sigmoid."""
    return "softmax" if loss_name == "ce" else "sigmoid"


def model_config(args, labels: list[str]) -> dict:
    """The plain-dict description of a model, from train.py's arguments.

    Options added after the first checkpoints are read with getattr defaults, so this works
    whether or not train.py defines their flags; the values are always written out.
    """
    img_size = getattr(args, "img_size", None)
    config = {
        "backbone": args.backbone,
        "labels": list(labels),
        "activation": activation_for_loss(args.loss),
        "sample_rate": args.sample_rate,
        "window_seconds": args.window_seconds,
        "n_fft": args.n_fft,
        "hop": args.hop,
        "n_mels": args.n_mels,
        "fmin": args.fmin,
        "fmax": args.fmax,
        "normalization": args.normalization,
        "dropout": args.dropout,
        "frontend": getattr(args, "frontend", "mel"),
        "img_size": [int(n) for n in img_size] if img_size else None,
        "head": getattr(args, "head", "linear"),
    }
    for key, default in PCEN_DEFAULTS.items():
        config[key] = getattr(args, key, default)
    return config


def build_model(args, labels: list[str], extended_from: int = 0) -> BirdCallModel:
    """A fresh model for train.py's arguments; extended_from > 0 (--head-init extend): the head keeps that
    many pre-trained outputs with a new layer on top."""
    config = model_config(args, labels)
    if extended_from:
        config["head_extended_from"] = int(extended_from)
    return BirdCallModel(config, pretrained=args.pretrained and not args.pretrained_file,
                         pretrained_file=args.pretrained_file)


class CheckpointError(RuntimeError):
    """A file that is not a checkpoint of this project, or cannot be read safely."""


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict with weights_only=True: a file carrying pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load {path} as a plain-data checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Checkpoints are loaded with "
            f"weights_only=True, so files that carry pickled code are refused.") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_config" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py "
                              f"(expected a dict with 'model' and 'model_config')")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('format')!r}, "
                              f"this code reads format {CHECKPOINT_FORMAT}")
    return checkpoint


def transfer_weights(model: BirdCallModel, checkpoint: dict, head_init: str = "copy") -> dict:
    """Initialise `model` from a checkpoint trained on another vocabulary (pre-train -> fine-tune).

    Frontend and backbone weights are copied. The head, by `head_init`:
      copy    every head tensor indexed by species (its first dimension is the label count) gets the
              rows of the species both vocabularies share, matched by name; others keep their fresh
              initialisation;
      fresh   nothing is copied: the whole head is replaced by a fresh one;
      extend  the pre-trained head is copied whole, and the new layer on top of it (model.extension,
              pre-trained vocabulary -> this one) starts with every weight 1 and bias 0, as in the log.
    Returns counts for the log.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"unknown head_init {head_init!r}; expected one of {HEAD_INITS}")
    source_config, target = checkpoint["model_config"], model.state_dict()
    for key in ("backbone", "head", "frontend", "n_mels", "sample_rate"):
        if source_config.get(key) != model.config.get(key):
            raise ValueError(f"--init-from: the checkpoint's {key} is {source_config.get(key)!r}, "
                             f"this run's is {model.config.get(key)!r}")
    source_labels, target_labels = source_config["labels"], model.labels
    source_row = {label: i for i, label in enumerate(source_labels)}
    shared = [(i, source_row[label]) for i, label in enumerate(target_labels) if label in source_row]
    rows_to, rows_from = [i for i, _ in shared], [j for _, j in shared]
    for key, value in checkpoint["model"].items():
        if key not in target or (key.startswith("head.") and head_init == "fresh"):
            continue
        if (key.startswith("head.") and head_init == "copy" and value.dim() >= 1
                and value.shape[0] == len(source_labels) and target[key].shape[0] == len(target_labels)
                and value.shape[1:] == target[key].shape[1:]):
            target[key][rows_to] = value[rows_from].to(target[key].dtype)     # species rows, by name
        elif value.shape == target[key].shape:
            target[key] = value
    if head_init == "extend":
        target["extension.weight"] = torch.ones_like(target["extension.weight"])
        target["extension.bias"] = torch.zeros_like(target["extension.bias"])
    model.load_state_dict(target)
    return {"shared_species": len(shared), "new_species": len(target_labels) - len(shared),
            "dropped_species": len(source_labels) - len(shared)}


def load_model(path, map_location="cpu", ema: bool = False) -> BirdCallModel:
    """Rebuild the exact trained model from a checkpoint alone, in eval mode.

    ema=True loads the exponential moving average of the weights (train.py --ema).
    """
    checkpoint = read_checkpoint(path, map_location)
    if ema and "model_ema" not in checkpoint:
        raise CheckpointError(f"{path} has no EMA weights (it was not trained with --ema)")
    model = BirdCallModel(checkpoint["model_config"], pretrained=False)
    model.load_state_dict(checkpoint["model_ema" if ema else "model"])
    return model.eval()
