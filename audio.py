"""Audio in: decode with soundfile, mix to mono, resample, cut a crop; the int16 sample format; distance and rooms.

Everything that turns a file into float32 samples at the model's rate goes through
`to_mono_resampled`, so training crops, background noise, validation soundscapes
and inference windows are decoded and resampled the same way. The spectrogram is
the model's job (model.py). The low-pass (distance) and synthetic-room filters at
the end serve both training augmentation (augment.py) and pseudo-soundscapes.
"""
from __future__ import annotations

import math
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

log = logging.getLogger("birdclef")

AUDIO_EXTENSIONS = (".ogg", ".mp3", ".flac", ".wav")
CROP_POLICIES = ("ends", "random")
PAD_MODES = ("zero", "repeat")
INT16_SCALE = 32767.0       # the cache stores samples as int16: float = int16 / INT16_SCALE


def path_inside(folder, relative, where: str) -> Path:
    """`folder`/`relative` for a file named by a table, refused when the name is absolute or climbs
    out with '..' (a hostile table must not read or write elsewhere). The check is on the names, not
    on resolved links, so a species folder that is a symlink to another disk still works."""
    relative = Path(str(relative))
    joined = Path(os.path.normpath(Path(folder) / relative))
    if relative.is_absolute() or relative.drive or not joined.is_relative_to(os.path.normpath(folder)):
        raise ValueError(f"{where}: {str(relative)!r} points outside {folder}; names there are relative to it")
    return joined


def audio_files(folder, recursive: bool = True) -> list[Path]:
    """The ogg/mp3/flac/wav files in `folder` (and below it, if recursive), sorted; may be empty."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file())


def check_audio_files(paths) -> tuple[list[tuple[int, float]], list[tuple[str, str]]]:
    """Read each file's header once: -> ([(frames, samplerate) or None], [(path, reason)])."""
    headers, bad = [], []
    for path in paths:
        try:
            if not Path(path).is_file():
                raise FileNotFoundError("file does not exist")
            info = sf.info(path)
            if info.frames <= 0 or info.samplerate <= 0:
                raise ValueError("no audio frames")
            if info.samplerate < MIN_SAMPLE_RATE:
                raise ValueError(f"sample rate {info.samplerate} Hz is below {MIN_SAMPLE_RATE} Hz")
            headers.append((info.frames, info.samplerate))
        except Exception as error:  # missing, unreadable, not audio: all reported, none fatal
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            headers.append(None)
            bad.append((str(path), reason))
    return headers, bad


# ----------------------------------------------------------------------------- resampling

class Resampler:
    """torchaudio.transforms.Resample's filter, applied without its zero taps.

    torchaudio resamples with one windowed-sinc kernel per output phase, each as long
    as `orig` input samples plus the filter's reach, by a dense strided convolution.
    Between rates with a small common divisor nearly all taps are exactly zero
    (22.05 -> 32 kHz: 640 phases of 455 taps, 12-13 of them non-zero), so most of its
    work multiplies zeros. Here each row of a matrix holds the input of `frames_per_row`
    consecutive frames (enough for >= 64 output samples, so a ratio like 3:2 still
    makes a well-shaped matrix product), and blocks of 16 output phases are multiplied
    with just the columns where their taps are non-zero. Same kernel, padding and
    length as torchaudio, so the same audio to float rounding (tested).
    """

    PHASES_PER_BLOCK = 16

    def __init__(self, source_rate: int, target_rate: int):
        reference = torchaudio.transforms.Resample(source_rate, target_rate)
        divisor = math.gcd(int(source_rate), int(target_rate))
        self.orig, self.new = int(source_rate) // divisor, int(target_rate) // divisor
        self.width = int(reference.width)
        kernel = reference.kernel[:, 0].float()           # (new, 2 * width + orig): one row per output phase
        self.frames_per_row = -(-4 * self.PHASES_PER_BLOCK // self.new)
        self.taps = kernel.shape[1] + (self.frames_per_row - 1) * self.orig
        expanded = torch.zeros((self.frames_per_row * self.new, self.taps))
        for frame in range(self.frames_per_row):    # frame m's phases read the input m * orig later
            expanded[frame * self.new:(frame + 1) * self.new,
                     frame * self.orig:frame * self.orig + kernel.shape[1]] = kernel
        self.blocks = []                            # (first phase, end phase, first tap, end tap, weights)
        for first in range(0, len(expanded), self.PHASES_PER_BLOCK):
            block = expanded[first:first + self.PHASES_PER_BLOCK]   # (phases, taps)
            used = torch.nonzero(block.abs().sum(dim=0)).flatten()
            low, high = int(used[0]), int(used[-1]) + 1
            self.blocks.append((first, first + len(block), low, high, block[:, low:high].T.contiguous()))

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) float32 -> (ceil(samples * new / orig),) float32."""
        length = len(waveform)
        n_rows = -(-(length // self.orig + 1) // self.frames_per_row)   # torchaudio's frames, grouped
        stride = self.frames_per_row * self.orig
        right = (n_rows - 1) * stride + self.taps - length - self.width  # torchaudio pads width + orig
        padded = torch.nn.functional.pad(waveform[None], (self.width, right))[0]
        rows = padded.as_strided((n_rows, self.taps), (stride, 1))      # (R, taps): each row's input
        out = torch.empty((n_rows, self.frames_per_row * self.new))        # (R, phases)
        for first, end, low, high, weights in self.blocks:
            out[:, first:end] = rows[:, low:high] @ weights                # (R, used taps) @ (used taps, phases)
        return out.reshape(-1)[:math.ceil(self.new * length / self.orig)]


_resamplers: dict[tuple[int, int], Resampler] = {}

# Bounds on what one file may ask of memory. A header is only a claim: a WAV declaring 1 Hz, or
# 44,101 Hz (no common divisor with 32 kHz: a 32000 x 44101 kernel), would ask for gigabytes.
STANDARD_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
MIN_SAMPLE_RATE = 4000              # below this no bird call is left in the audio
MAX_KERNEL_TAPS = 20_000_000        # 80 MB of float32: every standard rate pair needs far less
MAX_DECODED_SECONDS = 2 * 3600      # a whole file decoded at once (soundscapes, inference): ~0.9 GB at 32 kHz
_snapped_rates: set[int] = set()


def kernel_taps(source_rate: int, target_rate: int) -> int:
    """Size of torchaudio's resampling kernel between two rates: phases x (orig + 2 x its reach)."""
    divisor = math.gcd(source_rate, target_rate)
    orig, new = source_rate // divisor, target_rate // divisor
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))    # Resample's defaults: 6 zero crossings, rolloff 0.99
    return new * (orig + 2 * width)


def usable_rate(source_rate: int, target_rate: int) -> int:
    """The rate to resample from: the file's own; the nearest standard rate when it is within 0.1 %
    of one (a header written as 44101 Hz; the pitch moves by less than that); an error when it is
    implausibly low or its kernel would not fit in MAX_KERNEL_TAPS."""
    source_rate = int(source_rate)
    if source_rate in STANDARD_RATES or source_rate == target_rate:
        return source_rate
    if source_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample rate {source_rate} Hz is below {MIN_SAMPLE_RATE} Hz: not usable audio")
    nearest = min(STANDARD_RATES, key=lambda rate: abs(rate - source_rate))
    if abs(nearest - source_rate) <= 0.001 * nearest:
        if source_rate not in _snapped_rates:
            _snapped_rates.add(source_rate)
            log.warning("sample rate %d Hz read as %d Hz (within 0.1 %%)", source_rate, nearest)
        return nearest
    if kernel_taps(source_rate, target_rate) > MAX_KERNEL_TAPS:
        raise ValueError(f"sample rate {source_rate} Hz: resampling it to {target_rate} Hz needs a "
                         f"{kernel_taps(source_rate, target_rate):,}-tap kernel; convert the file to a standard rate")
    return source_rate


def check_length(frames: int, source_rate: int, where) -> None:
    """A whole file decoded at once must stay under MAX_DECODED_SECONDS."""
    if source_rate > 0 and frames / source_rate > MAX_DECODED_SECONDS:
        raise ValueError(f"{where}: {frames / source_rate / 3600:.1f} h of audio; files are decoded whole up to "
                         f"{MAX_DECODED_SECONDS / 3600:g} h: split it into shorter files")


MAX_CHANNELS = 8        # more columns than this in a (frames, channels) array means it is (channels, frames)


def pcm_frames(samples, name: str) -> np.ndarray:
    """An array of audio -> (frames, channels) float32 in [-1, 1]: 1-D is mono, 2-D is (frames, channels)
    with a few channels, as soundfile reads; integer PCM is scaled by its type's full scale (int16 32768).
    A (channels, frames) array, more dimensions, or no samples are refused: each would silently become
    the wrong number of rows."""
    array = np.asarray(samples)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] > MAX_CHANNELS:
        raise ValueError(f"{name}: shape {array.shape}; give 1-D samples or (frames, channels) with at most "
                         f"{MAX_CHANNELS} channels (transpose a (channels, frames) array)")
    if array.size == 0:
        raise ValueError(f"{name}: no samples")
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)        # unsigned PCM (uint8) is centred on its middle value
        middle = (int(info.max) + int(info.min) + 1) / 2
        return ((array.astype(np.float64) - middle) / (int(info.max) + 1 - middle)).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: samples of type {array.dtype}; give float or integer PCM")
    return array.astype(np.float32, copy=False)


def to_mono_resampled(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """(frames, channels) float -> (samples,) float32 mono at target_rate, NaN/inf zeroed."""
    if audio.ndim == 2 and audio.shape[1] > 1:
        mono = audio.mean(axis=1, dtype=np.float32)
    else:  # already one channel: a view, not an average over one column
        mono = np.asarray(audio.reshape(len(audio)), dtype=np.float32)
    if not np.isfinite(mono).all():
        mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    if source_rate == target_rate or len(mono) == 0:
        return mono
    source_rate = usable_rate(source_rate, target_rate)
    if source_rate == target_rate:
        return mono
    key = (source_rate, target_rate)
    if key not in _resamplers:  # the kernel is computed once per rate pair and process
        _resamplers[key] = Resampler(source_rate, target_rate)
    return _resamplers[key](torch.from_numpy(mono)).numpy()


# ----------------------------------------------------------------------------- reading

def read_audio(path, sample_rate: int) -> np.ndarray:
    """A whole file -> (samples,) float32 mono at sample_rate (soundscapes; crops use read_window)."""
    return to_mono_resampled(*read_whole(path), sample_rate)


def read_whole(path) -> tuple[np.ndarray, int]:
    """A whole file -> ((frames, channels) float32, its rate), refused past MAX_DECODED_SECONDS."""
    with sf.SoundFile(path) as audio_file:
        check_length(audio_file.frames, audio_file.samplerate, path)
        return audio_file.read(dtype="float32", always_2d=True), audio_file.samplerate


def read_window(path, start_seconds: float, seconds: float, sample_rate: int, pad: str = "zero") -> np.ndarray:
    """Decode only [start, start + seconds) of a file -> (round(seconds*sample_rate),) float32.

    Seeks instead of decoding the whole file; pads with zeros past the end.
    """
    with sf.SoundFile(path) as audio_file:
        source_rate = audio_file.samplerate
        start = min(int(round(start_seconds * source_rate)), audio_file.frames)
        audio_file.seek(start)
        audio = audio_file.read(int(math.ceil(seconds * source_rate)), dtype="float32", always_2d=True)
    return fit_length(to_mono_resampled(audio, source_rate, sample_rate), int(round(seconds * sample_rate)), pad)


def fit_length(waveform: np.ndarray, samples: int, pad: str = "zero") -> np.ndarray:
    """Cut or pad to `samples`: zeros after the end, or the clip repeated ("repeat")."""
    if len(waveform) >= samples:
        return waveform[:samples]
    if pad == "repeat" and len(waveform) > 0:
        return np.tile(waveform, -(-samples // len(waveform)))[:samples]
    if pad not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad!r}; expected one of {PAD_MODES}")
    return np.pad(waveform, (0, samples - len(waveform)))


# ----------------------------------------------------------------------------- training crops

@dataclass
class CropSettings:
    sample_rate: int = 32000
    window_seconds: float = 5.0
    policy: str = "ends"
    ends_seconds: float = 8.0
    pad: str = "zero"          # clips shorter than the window: "zero" or "repeat"


def choose_crop_start(duration: float, window: float, policy: str, ends_seconds: float,
                      rng: np.random.Generator | None) -> float:
    """Start time (s) of the window to read. rng=None means evaluation: the first window.

    "ends" (the original recipe): pick the first or the last `ends_seconds` of the
    recording, then a random `window` inside it -- calls in xeno-canto recordings
    cluster at the start and the end. "random": anywhere in the recording.
    """
    if rng is None or duration <= window:
        return 0.0
    if policy == "random":
        return float(rng.uniform(0.0, duration - window))
    if policy == "ends":
        segment = min(max(ends_seconds, window), duration)  # never shorter than the window
        segment_start = 0.0 if rng.random() < 0.5 else duration - segment
        return segment_start + float(rng.uniform(0.0, max(segment - window, 0.0)))
    raise ValueError(f"unknown crop policy {policy!r}; expected one of {CROP_POLICIES}")


# ----------------------------------------------------------------------------- int16 sample format

def to_int16(waveform: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 (rounded, clipped): the cache's sample format."""
    return np.clip(np.round(waveform * INT16_SCALE), -32768, 32767).astype(np.int16)


def as_float(waveforms: torch.Tensor) -> torch.Tensor:
    """A batch of waveforms as float32: int16 batches (from the cache) are scaled to [-1, 1].

    With --cache, batches stay int16 until here -- half the bytes through the loader
    workers' shared memory and the host-to-GPU copy -- and are converted on the device.
    """
    return waveforms.float() / INT16_SCALE if waveforms.dtype == torch.int16 else waveforms


# ----------------------------------------------------------------------------- distance and rooms

LOWPASS_ORDER = 4      # Butterworth magnitude: -24 dB per octave above the cutoff


def lowpass(waveforms: torch.Tensor, cutoff_hz, sample_rate: int) -> torch.Tensor:
    """Each row of (B, samples) low-passed at its own cutoff (B,) in Hz: the magnitude response of
    an order-4 Butterworth filter, 1 / sqrt(1 + (f / cutoff) ** 8), applied in the rFFT domain
    (zero phase, so the call does not move in time). Air absorbs high frequencies more than low
    ones, so a distant call is a duller one."""
    samples = waveforms.shape[-1]
    spectrum = torch.fft.rfft(waveforms.float(), dim=-1)                                   # (B, F)
    frequency = torch.fft.rfftfreq(samples, d=1.0 / sample_rate).to(waveforms.device)       # (F,)
    cutoff = torch.as_tensor(cutoff_hz, dtype=torch.float32, device=waveforms.device).reshape(-1, 1)  # (B, 1)
    response = torch.rsqrt(1 + (frequency / cutoff) ** (2 * LOWPASS_ORDER))               # (B, F)
    return torch.fft.irfft(spectrum * response, n=samples, dim=-1).to(waveforms.dtype)


def room_impulse_response(rt60: float, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """A synthetic room (or forest) impulse response (rt60 * sample_rate,): the direct path (1 at t=0)
    plus Gaussian noise whose amplitude falls by 60 dB in `rt60` seconds, exp(-ln(1000) t / rt60),
    scaled so that the tail carries as much energy as the direct path."""
    length = max(int(round(rt60 * sample_rate)), 2)
    time = torch.arange(length, dtype=torch.float32) / sample_rate                        # (n,)
    tail = torch.randn(length, generator=generator) * torch.exp(-math.log(1000.0) * time / rt60)
    tail[0] = 0.0
    response = tail / tail.norm().clamp_min(1e-12)
    response[0] = 1.0
    return response


def reverberate(waveforms: torch.Tensor, rt60_seconds, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Each row of (B, samples) convolved with its own room_impulse_response (rt60 (B,) seconds),
    cut to the input's length, and scaled back to the row's own power: a room changes how a call
    sounds, not how loud the example is. Rows of zero power stay zero."""
    batch, samples = waveforms.shape
    responses = [room_impulse_response(float(rt60), sample_rate, generator) for rt60 in rt60_seconds]
    size = 1 << (samples + max(len(response) for response in responses) - 1).bit_length()   # FFT length, no wrap
    kernels = torch.zeros((batch, size))
    for row, response in enumerate(responses):
        kernels[row, :len(response)] = response
    signal = waveforms.float()
    wet = torch.fft.irfft(torch.fft.rfft(signal, n=size) * torch.fft.rfft(kernels.to(signal.device)), n=size)
    wet = wet[:, :samples]                                                                  # (B, samples)
    power, wet_power = signal.square().mean(dim=1), wet.square().mean(dim=1)
    scale = torch.where(wet_power > 0, torch.sqrt(power / wet_power.clamp_min(1e-30)), torch.zeros_like(power))
    return (wet * scale[:, None]).to(waveforms.dtype)
