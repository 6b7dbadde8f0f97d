"""The spectrogram frontend: waveform (B, samples) -> image (B, 1, n_mels, frames), a layer of the model.

Log-mel (`MelFrontend`) or PCEN (`PCENFrontend`, per-channel energy normalisation, checked
against librosa's formula in the tests). Both run in float32 even under autocast, and both are
rebuilt from a checkpoint's config by `build_frontend`, so training and inference cannot drift.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

FRONTENDS = ("mel", "pcen")
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
