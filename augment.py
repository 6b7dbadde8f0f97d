"""Training-time augmentations on batches of waveforms (B, samples), targets (B, C)
and spectrogram images (B, 1, n_mels, T).

Every random choice comes from the numpy generator passed in, which train.py
seeds from (seed, epoch, step): a resumed run draws exactly what the
uninterrupted run drew. Where noise is generated with torch it comes from a
`torch.Generator` seeded from that numpy generator, never from torch's global
generator. Every function works on the device the batch is on and returns a new
tensor (or the input itself when it has nothing to do); none modifies its input
in place. Nothing here runs in evaluation or inference.

Signal-to-noise ratio, wherever it appears, is per example:
    SNR_dB = 10 * log10(mean(signal ** 2) / mean(added_noise ** 2))
where `signal` is the example before the noise is added. Examples whose power is
0 (digital silence) get no noise: no SNR can be defined for them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import audio

log = logging.getLogger("birdclef")

# Exponent of 1/f in each colour's power spectrum: power(f) ∝ 1 / f ** exponent.
NOISE_POWER_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}


# ----------------------------------------------------------------------------- helpers

def _check_probability(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")


def _require_rng(rng: np.random.Generator | None) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (every random choice comes from it), "
                        f"got {type(rng).__name__}")
    return rng


def _check_range(name: str, value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be a finite (low, high) with low <= high, got {value_range}")
    return low, high


def _torch_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator on `device`, seeded from `rng` (one draw), so torch noise is reproducible too."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(2**63)))
    return generator


def _add_at_snr(waveforms: torch.Tensor, rows: torch.Tensor, noise: torch.Tensor,
                snr_db: torch.Tensor) -> torch.Tensor:
    """Return a copy of `waveforms` (B, samples) with `noise` (K, samples) added to the K
    examples `rows` (K,), each scaled so that its SNR is exactly `snr_db` (K,).

    Rows whose signal or noise power is 0 are left unchanged: scaling cannot reach
    a finite SNR there. Power is computed in float32 whatever the batch dtype.
    """
    signal = waveforms[rows].float()                                  # (K, samples)
    signal_power = signal.square().mean(dim=1)                        # (K,)
    noise = noise.float()
    noise_power = noise.square().mean(dim=1)                          # (K,)
    usable = (signal_power > 0) & (noise_power > 0)                   # (K,)
    # scale**2 * noise_power = signal_power / 10**(snr/10)  <=>  the SNR is exactly snr_db
    scale = torch.sqrt(signal_power / (noise_power.clamp_min(torch.finfo(torch.float32).tiny)
                                       * torch.pow(10.0, snr_db / 10)))
    scale = torch.where(usable, scale, torch.zeros_like(scale))      # (K,)
    output = waveforms.clone()
    output[rows] = (signal + scale[:, None] * noise).to(waveforms.dtype)
    return output


# ----------------------------------------------------------------------------- mixing

def mixup(waveforms: torch.Tensor, targets: torch.Tensor, alpha: float, probability: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with a partner from a random permutation of the batch.

    lambda ~ Beta(alpha, alpha) per example; waveforms and targets are mixed with
    the same lambda. Each example is mixed with `probability`, else left as it is.
    """
    if alpha <= 0 or probability <= 0:
        return waveforms, targets
    batch = waveforms.shape[0]
    partner = torch.from_numpy(rng.permutation(batch)).to(waveforms.device)
    lam = rng.beta(alpha, alpha, size=batch).astype(np.float32)
    lam[rng.random(batch) >= probability] = 1.0  # examples left unmixed
    lam = torch.from_numpy(lam).to(waveforms.device)
    mixed_waveforms = lam[:, None] * waveforms + (1 - lam[:, None]) * waveforms[partner]   # (B, samples)
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]         # (B, C)
    return mixed_waveforms, mixed_targets


def cutmix_time(waveforms: torch.Tensor, targets: torch.Tensor, alpha: float, probability: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a contiguous time span of a partner example into each chosen example.

    Each example is chosen with `probability`; its partner comes from a random
    permutation of the batch (it may be itself, which changes nothing). With
    lambda ~ Beta(alpha, alpha), a span of round((1 - lambda) * samples) samples at
    a uniformly random start is replaced by the partner's samples at the same
    positions, and the targets are mixed by the fraction actually replaced:
    targets = (1 - r) * targets + r * targets[partner], r = span / samples.
    """
    _check_probability(probability)
    if alpha <= 0 or probability <= 0:
        return waveforms, targets
    batch, samples = waveforms.shape
    device = waveforms.device
    partner = rng.permutation(batch)                                  # (B,)
    lam = rng.beta(alpha, alpha, size=batch)                          # (B,)
    chosen = rng.random(batch) < probability                          # (B,)
    span = np.where(chosen, np.rint((1.0 - lam) * samples), 0).astype(np.int64)   # (B,) samples replaced
    start = rng.integers(0, samples - span + 1)                       # (B,) first replaced sample
    if not span.any():
        return waveforms, targets

    position = torch.arange(samples, device=device)                   # (samples,)
    start_t = torch.from_numpy(start).to(device)[:, None]             # (B, 1)
    span_t = torch.from_numpy(span).to(device)[:, None]               # (B, 1)
    replaced = (position >= start_t) & (position < start_t + span_t)  # (B, samples)
    partner_t = torch.from_numpy(partner).to(device)
    mixed_waveforms = torch.where(replaced, waveforms[partner_t], waveforms)     # (B, samples)

    fraction = torch.from_numpy((span / samples).astype(np.float32)).to(device).to(targets.dtype)[:, None]  # (B, 1)
    mixed_targets = (1 - fraction) * targets + fraction * targets[partner_t]    # (B, C)
    return mixed_waveforms, mixed_targets


# ----------------------------------------------------------------------------- level and position

def random_gain(waveforms: torch.Tensor, db_range: tuple[float, float] = (-6.0, 6.0),
                probability: float = 0.0, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Multiply each chosen example (with `probability`) by a gain drawn uniformly in dB from `db_range`."""
    _check_probability(probability)
    low, high = _check_range("db_range", db_range)
    if probability <= 0:
        return waveforms
    rng = _require_rng(rng)
    batch = waveforms.shape[0]
    gain_db = rng.uniform(low, high, size=batch)                      # (B,)
    gain_db[rng.random(batch) >= probability] = 0.0                   # 0 dB: a factor of exactly 1
    factor = torch.from_numpy((10.0 ** (gain_db / 20.0)).astype(np.float32)).to(waveforms.device).to(waveforms.dtype)
    return waveforms * factor[:, None]                                # (B, samples)


def time_shift(waveforms: torch.Tensor, max_fraction: float = 0.5, probability: float = 0.0,
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """Circularly roll each chosen example (with `probability`) by a non-zero number of
    samples, up to floor(max_fraction * samples), in either direction.

    The shift is uniform over the non-zero shifts in [-max_shift, max_shift], so
    every chosen example really changes (unless it is constant).
    """
    _check_probability(probability)
    if max_fraction < 0:
        raise ValueError(f"max_fraction must be >= 0, got {max_fraction}")
    batch, samples = waveforms.shape
    max_shift = min(int(math.floor(max_fraction * samples)), samples - 1)
    if probability <= 0 or max_shift < 1:
        return waveforms
    rng = _require_rng(rng)
    magnitude = rng.integers(1, max_shift + 1, size=batch)            # (B,)
    sign = np.where(rng.random(batch) < 0.5, -1, 1)                   # (B,)
    shift = np.where(rng.random(batch) < probability, sign * magnitude, 0)   # (B,)
    # rolled[b, i] = waveforms[b, (i - shift[b]) mod samples], as torch.roll(row, shift[b])
    position = torch.arange(samples, device=waveforms.device)         # (samples,)
    shift_t = torch.from_numpy(shift).to(waveforms.device)[:, None]   # (B, 1)
    source = torch.remainder(position - shift_t, samples)             # (B, samples)
    return torch.gather(waveforms, 1, source)                         # (B, samples)


# ----------------------------------------------------------------------------- noise

def coloured_noise(waveforms: torch.Tensor, snr_db_range: tuple[float, float] = (3.0, 30.0),
                   probability: float = 0.0, rng: np.random.Generator | None = None,
                   colours: tuple[str, ...] = ("white", "pink", "brown"),
                   levels_db: np.ndarray | None = None) -> torch.Tensor:
    """Add white, pink or brown noise to each chosen example (with `probability`).

    The colour is drawn uniformly from `colours`, the SNR uniformly in dB from
    `snr_db_range`, and the noise is scaled so that the example's SNR is exactly
    that (see the module docstring). Noise is white Gaussian noise shaped in the
    rFFT domain: amplitude ∝ f ** (-exponent / 2), so power ∝ 1 / f ** exponent
    (exponent 0 white, 1 pink, 2 brown), with the DC bin zeroed so that no colour
    adds an offset. `levels_db` (B,), each example's distance gain, is added to its SNR.
    """
    _check_probability(probability)
    low, high = _check_range("snr_db_range", snr_db_range)
    unknown = [colour for colour in colours if colour not in NOISE_POWER_EXPONENTS]
    if not colours or unknown:
        raise ValueError(f"colours must be a non-empty subset of {tuple(NOISE_POWER_EXPONENTS)}, got {colours}")
    if probability <= 0:
        return waveforms
    rng = _require_rng(rng)
    batch, samples = waveforms.shape
    device = waveforms.device
    colour_index = rng.integers(len(colours), size=batch)             # (B,)
    snr_db = rng.uniform(low, high, size=batch)                       # (B,)
    chosen = np.flatnonzero(rng.random(batch) < probability)          # (K,)
    generator = _torch_generator(rng, device)
    if chosen.size == 0:
        return waveforms

    exponents = np.array([NOISE_POWER_EXPONENTS[colour] for colour in colours])[colour_index[chosen]]  # (K,)
    white = torch.randn((chosen.size, samples), generator=generator, device=device)  # (K, samples)
    spectrum = torch.fft.rfft(white, dim=1)                           # (K, samples // 2 + 1)
    frequency_bin = torch.arange(spectrum.shape[1], device=device, dtype=torch.float32)  # (F,)
    exponent_t = torch.from_numpy(exponents.astype(np.float32)).to(device)[:, None]  # (K, 1)
    amplitude = frequency_bin.clamp_min(1.0).pow(-exponent_t / 2)    # (K, F)
    amplitude[:, 0] = 0.0                                             # DC bin: no offset, and 1/0 avoided
    noise = torch.fft.irfft(spectrum * amplitude, n=samples, dim=1)   # (K, samples)

    if levels_db is not None:
        snr_db = snr_db + levels_db
    rows = torch.from_numpy(chosen).to(device)
    snr_t = torch.from_numpy(snr_db[chosen].astype(np.float32)).to(device)
    return _add_at_snr(waveforms, rows, noise, snr_t)


class BackgroundBank:
    """Every ogg/mp3/flac/wav file under `folder` (searched recursively), decoded once
    (audio.read_audio: mono, resampled to `sample_rate`) and kept in memory
    as float32 (an hour of 32 kHz audio takes about 460 MB).

    `sample(n, rng)` returns n random crops of `window_samples` samples: each crop
    picks a file uniformly (so one long recording does not dominate) and a
    uniformly random start; files shorter than the window are tiled (read
    circularly from the random start).
    """

    def __init__(self, folder: str | Path, sample_rate: int, window_samples: int):
        folder = Path(folder)
        if window_samples < 1:
            raise ValueError(f"window_samples must be >= 1, got {window_samples}")
        if not folder.is_dir():
            raise ValueError(f"background noise folder {folder} does not exist or is not a folder")
        self.folder = folder
        self.sample_rate = int(sample_rate)
        self.window_samples = int(window_samples)
        self.paths: list[Path] = []
        self.clips: list[torch.Tensor] = []      # each (samples_i,), float32, CPU
        for path in audio.audio_files(folder):
            clip = self._load(path)
            if clip.numel() == 0:
                log.warning("background noise file %s is empty; skipped", path)
                continue
            self.paths.append(path)
            self.clips.append(clip)
        if not self.clips:
            raise ValueError(f"no non-empty audio file ({', '.join(audio.AUDIO_EXTENSIONS)}) "
                             f"in background noise folder {folder}")
        # One flat buffer, so that a batch of crops is a single gather; `clips` become views into it.
        self._audio = torch.cat(self.clips)                                          # (total samples,)
        self._lengths = np.array([clip.numel() for clip in self.clips], dtype=np.int64)   # (files,)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)[:-1]])        # (files,)
        self.clips = [self._audio[offset:offset + length]
                      for offset, length in zip(self._offsets, self._lengths)]

    def _load(self, path: Path) -> torch.Tensor:
        try:
            mono = audio.read_audio(path, self.sample_rate)                    # (samples,) float32
        except Exception as error:  # name the file: the library's message does not always
            raise ValueError(f"cannot decode background noise file {path}: {error}") from error
        return torch.from_numpy(np.ascontiguousarray(mono))

    def __len__(self) -> int:
        return len(self.clips)

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """n random crops (n, window_samples), float32 on the CPU."""
        window = self.window_samples
        file_index = rng.integers(len(self.clips), size=n)            # (n,)
        lengths = self._lengths[file_index]                           # (n,)
        # A long file's crop lies inside it; a short file's starts anywhere and wraps.
        start_choices = np.where(lengths >= window, lengths - window + 1, lengths)
        starts = rng.integers(0, start_choices)                       # (n,)
        within_file = (starts[:, None] + np.arange(window)[None, :]) % lengths[:, None]   # (n, window)
        index = torch.from_numpy(self._offsets[file_index][:, None] + within_file)        # (n, window)
        return self._audio[index]                                     # (n, window)


def background_noise(waveforms: torch.Tensor, bank: BackgroundBank,
                     snr_db_range: tuple[float, float] = (0.0, 2.0), probability: float = 0.0,
                     rng: np.random.Generator | None = None, levels_db: np.ndarray | None = None) -> torch.Tensor:
    """Add a random crop from `bank` to each chosen example (with `probability`) at an SNR
    drawn uniformly in dB from `snr_db_range` (exact, as defined in the module
    docstring), plus the example's distance gain from `levels_db` (B,). A crop that is
    digital silence cannot reach an SNR and adds nothing.
    """
    _check_probability(probability)
    low, high = _check_range("snr_db_range", snr_db_range)
    if probability <= 0:
        return waveforms
    rng = _require_rng(rng)
    batch, samples = waveforms.shape
    if samples != bank.window_samples:
        raise ValueError(f"waveforms have {samples} samples but the background bank crops "
                         f"{bank.window_samples}; build the bank with the training window length")
    snr_db = rng.uniform(low, high, size=batch)                       # (B,)
    chosen = np.flatnonzero(rng.random(batch) < probability)          # (K,)
    if chosen.size == 0:
        return waveforms
    crops = bank.sample(chosen.size, rng).to(waveforms.device)        # (K, samples)
    if levels_db is not None:
        snr_db = snr_db + levels_db
    rows = torch.from_numpy(chosen).to(waveforms.device)
    snr_t = torch.from_numpy(snr_db[chosen].astype(np.float32)).to(waveforms.device)
    return _add_at_snr(waveforms, rows, crops, snr_t)


# ----------------------------------------------------------------------------- soundscape-style: distance, rooms, several calls

def distance(waveforms: torch.Tensor, gain_db_range: tuple[float, float], lowpass_hz_range: tuple[float, float],
             probability: float, rng: np.random.Generator | None, sample_rate: int) -> torch.Tensor:
    """A call heard from further away: each chosen example (with `probability`) is low-passed at a
    cutoff drawn log-uniformly from `lowpass_hz_range`, then multiplied by a gain drawn uniformly in dB
    from `gain_db_range` (negative: quieter). See distance_with_levels for how the gain survives the
    steps after it."""
    return distance_with_levels(waveforms, gain_db_range, lowpass_hz_range, probability, rng, sample_rate)[0]


def distance_with_levels(waveforms: torch.Tensor, gain_db_range: tuple[float, float],
                         lowpass_hz_range: tuple[float, float], probability: float,
                         rng: np.random.Generator | None, sample_rate: int) -> tuple[torch.Tensor, np.ndarray]:
    """distance(), and each example's gain in dB (B,), 0 where it was not chosen. The gain alone would
    be undone later: mix_clips and the noises set levels relative to the window's own power, and the
    frontend normalises each example. So augment_waveforms hands these levels on: a partner is added
    at its drawn power plus its own distance minus the example's, and noise or a bed at its drawn SNR
    plus the example's distance gain -- a far call lies quieter under the same bed and beside near calls."""
    _check_probability(probability)
    low_gain, high_gain = _check_range("gain_db_range", gain_db_range)
    low_hz, high_hz = _check_range("lowpass_hz_range", lowpass_hz_range)
    batch = waveforms.shape[0]
    levels = np.zeros(batch)                                                           # (B,) dB
    if probability <= 0:
        return waveforms, levels
    rng = _require_rng(rng)
    gain_db = rng.uniform(low_gain, high_gain, size=batch)                             # (B,)
    cutoff = np.exp(rng.uniform(math.log(max(low_hz, 1.0)), math.log(max(high_hz, 1.0)), size=batch))   # (B,)
    chosen = np.flatnonzero(rng.random(batch) < probability)                           # (K,)
    if chosen.size == 0:
        return waveforms, levels
    levels[chosen] = gain_db[chosen]
    rows = torch.from_numpy(chosen).to(waveforms.device)
    factor = torch.from_numpy((10.0 ** (gain_db[chosen] / 20.0)).astype(np.float32)).to(waveforms.device)
    output = waveforms.clone()
    output[rows] = (audio.lowpass(waveforms[rows], cutoff[chosen], sample_rate) * factor[:, None]).to(waveforms.dtype)
    return output, levels


def reverb(waveforms: torch.Tensor, rt60_range: tuple[float, float], probability: float,
           rng: np.random.Generator | None, sample_rate: int) -> torch.Tensor:
    """Each chosen example (with `probability`) reverberated (audio.reverberate) with an RT60 drawn
    uniformly in seconds from `rt60_range`, keeping its power."""
    _check_probability(probability)
    low, high = _check_range("rt60_range", rt60_range)
    if probability <= 0:
        return waveforms
    rng = _require_rng(rng)
    batch = waveforms.shape[0]
    rt60 = rng.uniform(max(low, 1e-3), max(high, 1e-3), size=batch)                     # (B,)
    chosen = np.flatnonzero(rng.random(batch) < probability)                           # (K,)
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    if chosen.size == 0:
        return waveforms
    rows = torch.from_numpy(chosen).to(waveforms.device)
    output = waveforms.clone()
    output[rows] = audio.reverberate(waveforms[rows], rt60[chosen], sample_rate, generator)
    return output


def mix_clips(waveforms: torch.Tensor, targets: torch.Tensor, probability: float, max_clips: int,
              gain_db_range: tuple[float, float], rng: np.random.Generator | None,
              levels_db: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Several calls in one window, as in a soundscape row: each chosen example (with `probability`)
    gets 1 to max_clips - 1 other examples of the batch added, each at a power drawn uniformly in dB
    from `gain_db_range` relative to the example's own power; its targets become the element-wise
    maximum of all of theirs (the union of the species). Unlike mixup, the example keeps its full
    level and its full target. Partners come from the batch as it was before any mixing; a partner
    or an example of zero power adds nothing (and no target). `levels_db` (B,): each example's distance
    gain (distance_with_levels), added to the drawn power of a partner and taken off for the example."""
    _check_probability(probability)
    low, high = _check_range("gain_db_range", gain_db_range)
    batch = waveforms.shape[0]
    if probability <= 0 or max_clips < 2 or batch < 2:
        return waveforms, targets
    rng = _require_rng(rng)
    levels_db = np.zeros(batch) if levels_db is None else levels_db                    # (B,) dB
    extra = rng.integers(1, max_clips, size=batch)                                     # (B,) partners per example
    chosen = rng.random(batch) < probability                                           # (B,)
    partners = (np.arange(batch)[:, None] + rng.integers(1, batch, size=(batch, max_clips - 1))) % batch  # never itself
    gain_db = rng.uniform(low, high, size=(batch, max_clips - 1))                       # (B, max_clips - 1)
    power = waveforms.float().square().mean(dim=1)                                     # (B,)
    mixed_waveforms, mixed_targets = waveforms.float().clone(), targets.clone()
    for row in np.flatnonzero(chosen):
        for slot in range(extra[row]):
            partner = int(partners[row, slot])
            if power[row] <= 0 or power[partner] <= 0:
                continue
            relative_db = gain_db[row, slot] + levels_db[partner] - levels_db[row]
            scale = torch.sqrt(power[row] * 10.0 ** (relative_db / 10.0) / power[partner])
            mixed_waveforms[row] += scale * waveforms[partner].float()
            mixed_targets[row] = torch.maximum(mixed_targets[row], targets[partner])
    return mixed_waveforms.to(waveforms.dtype), mixed_targets


# ----------------------------------------------------------------------------- spectrogram masks

def spec_augment(images: torch.Tensor, freq_masks: int, time_masks: int, max_pct: float,
                 rng: np.random.Generator) -> torch.Tensor:
    """SpecAugment frequency and time masking on images (B, channels, n_mels, T).

    Per example: `freq_masks` masks, each of a width drawn uniformly from
    [0, floor(max_pct * n_mels)] bands, and `time_masks` masks of width in
    [0, floor(max_pct * T)] frames, each at a uniformly random position where it
    fits. Masks may overlap. Masked cells are set to the mean of the input
    example (all its cells, before masking): the images are normalised per example, so the mean is
    "nothing here" and masking does not shift the example's level.
    Always returns a new tensor; the input is never modified.
    """
    if freq_masks < 0 or time_masks < 0:
        raise ValueError(f"mask counts must be >= 0, got freq_masks={freq_masks}, time_masks={time_masks}")
    if not 0.0 <= max_pct <= 1.0:
        raise ValueError(f"max_pct must be in [0, 1], got {max_pct}")
    batch, _, n_mels, frames = images.shape
    device = images.device

    def draw_masked(count: int, size: int) -> torch.Tensor:
        """(B, size) True where any of `count` random masks on an axis of `size` covers."""
        max_width = int(math.floor(max_pct * size))
        width = rng.integers(0, max_width + 1, size=(batch, count))     # (B, count)
        start = rng.integers(0, size - width + 1)                       # (B, count)
        position = torch.arange(size, device=device)[None, None, :]     # (1, 1, size)
        start_t = torch.from_numpy(start).to(device)[:, :, None]        # (B, count, 1)
        end_t = start_t + torch.from_numpy(width).to(device)[:, :, None]
        return ((position >= start_t) & (position < end_t)).any(dim=1)  # (B, size)

    if freq_masks == 0 and time_masks == 0:
        return images.clone()
    band_masked = draw_masked(freq_masks, n_mels)                        # (B, n_mels)
    frame_masked = draw_masked(time_masks, frames)                       # (B, T)
    masked = band_masked[:, None, :, None] | frame_masked[:, None, None, :]   # (B, 1, n_mels, T)
    example_mean = images.mean(dim=(1, 2, 3), keepdim=True)              # (B, 1, 1, 1)
    return torch.where(masked, example_mean, images)                     # (B, channels, n_mels, T)


# ----------------------------------------------------------------------------- settings and pipelines

PROBABILITY_FIELDS = ("noise_prob", "bg_prob", "cutmix_prob", "gain_prob", "shift_prob", "mix_prob",
                      "distance_prob", "reverb_prob")


@dataclass
class AugmentSettings:
    """What augment_waveforms / augment_images do. The defaults turn everything off.

    noise_prob, noise_snr:   coloured_noise probability and SNR range in dB (low, high)
    noise_colours:           the colours coloured_noise draws from
    bg_prob, bg_snr:         background_noise probability and SNR range in dB
    cutmix_prob, cutmix_alpha: cutmix_time probability and Beta(alpha, alpha)
    gain_prob, gain_db:      random_gain probability; gains drawn in [-gain_db, +gain_db] dB
    shift_prob, shift_max:   time_shift probability and largest roll (fraction of the length)
    freq_masks, time_masks, mask_max_pct: spec_augment mask counts and width limit
    mix_prob, mix_clips, mix_gain_db: mix_clips probability, most clips in a window, partner levels (dB)
    distance_prob, distance_db, distance_lowpass_hz: distance probability, gain range (dB), cutoff range (Hz)
    reverb_prob, reverb_rt60: reverb probability and RT60 range (s)
    sample_rate:             of the waveforms (for the low-pass and the rooms)
    """
    noise_prob: float = 0.0
    noise_snr: tuple[float, float] = (3.0, 30.0)
    noise_colours: tuple[str, ...] = ("white", "pink", "brown")
    bg_prob: float = 0.0
    bg_snr: tuple[float, float] = (0.0, 2.0)
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    gain_prob: float = 0.0
    gain_db: float = 6.0
    shift_prob: float = 0.0
    shift_max: float = 0.5
    freq_masks: int = 0
    time_masks: int = 0
    mask_max_pct: float = 0.1
    mix_prob: float = 0.0
    mix_clips: int = 3
    mix_gain_db: tuple[float, float] = (-12.0, 0.0)
    distance_prob: float = 0.0
    distance_db: tuple[float, float] = (-20.0, 0.0)
    distance_lowpass_hz: tuple[float, float] = (2000.0, 16000.0)
    reverb_prob: float = 0.0
    reverb_rt60: tuple[float, float] = (0.2, 1.5)
    sample_rate: int = 32000

    def scaled(self, strength: float) -> AugmentSettings:
        """These settings with every augmentation's probability and magnitude scaled by
        `strength` (--aug-strength) at once; strength 1 returns equal settings.

        Probabilities: p * strength, clipped to 1.
        Magnitudes, each monotone in strength:
          noise_snr, bg_snr:  both ends minus 10 * log10(strength) dB, i.e. the noise
                              power is multiplied by strength (2 -> 3 dB more noise);
          gain_db:            gain_db * strength (the ±dB range widens linearly);
          shift_max:          shift_max * strength, clipped to 1 (from 0.5 up every
                              circular shift is already reachable);
          mask_max_pct:       mask_max_pct * strength, clipped to 1 (wider masks);
                              the mask counts stay as set (they play the part of
                              a probability, which a count cannot be scaled like);
          cutmix_alpha:       unchanged: the mean replaced fraction is 1/2 for every
                              alpha, so alpha has no "stronger" direction;
          mix_gain_db, distance_db, distance_lowpass_hz, reverb_rt60: unchanged: they
                              describe soundscape conditions, set directly.
        Strength 0 turns everything off: all probabilities 0 and no masks (the SNR
        ranges are then left as they are; nothing uses them).
        """
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"augmentation strength must be a finite number >= 0, got {strength}")
        if strength == 0:
            off = {name: 0.0 for name in PROBABILITY_FIELDS}
            return dataclasses.replace(self, **off, gain_db=0.0, shift_max=0.0, mask_max_pct=0.0,
                                       freq_masks=0, time_masks=0)
        snr_shift_db = 10.0 * math.log10(strength)
        scaled_probabilities = {name: min(1.0, getattr(self, name) * strength) for name in PROBABILITY_FIELDS}
        return dataclasses.replace(
            self, **scaled_probabilities,
            noise_snr=(self.noise_snr[0] - snr_shift_db, self.noise_snr[1] - snr_shift_db),
            bg_snr=(self.bg_snr[0] - snr_shift_db, self.bg_snr[1] - snr_shift_db),
            gain_db=self.gain_db * strength,
            shift_max=min(1.0, self.shift_max * strength),
            mask_max_pct=min(1.0, self.mask_max_pct * strength))


def augment_waveforms(waveforms: torch.Tensor, targets: torch.Tensor, settings: AugmentSettings,
                      rng: np.random.Generator, bank: BackgroundBank | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the waveform augmentations of `settings` to (B, samples) and (B, C), in this order:

      1. random_gain       2. time_shift       3. reverb          4. distance
      5. mix_clips         6. coloured_noise   7. background_noise (only with a bank and bg_prob > 0)
      8. cutmix_time

    Level and position change first; each call gets its room and its distance before
    calls are summed (mix_clips), so a window may hold a near and a far call; noise
    and the background bed are then added at the requested SNR relative to the
    window as the model will hear it, and are not themselves rolled or filtered;
    cutmix comes last, so a pasted span carries the partner's own noise and the
    targets are mixed by the share of the final waveform that came from the
    partner. Mixup is a separate call in train.py, after this.
    """
    waveforms = random_gain(waveforms, (-settings.gain_db, settings.gain_db), settings.gain_prob, rng)
    waveforms = time_shift(waveforms, settings.shift_max, settings.shift_prob, rng)
    waveforms = reverb(waveforms, settings.reverb_rt60, settings.reverb_prob, rng, settings.sample_rate)
    # the distance gains travel on as levels: every later step sets levels relative to the window itself
    waveforms, levels_db = distance_with_levels(waveforms, settings.distance_db, settings.distance_lowpass_hz,
                                                settings.distance_prob, rng, settings.sample_rate)
    waveforms, targets = mix_clips(waveforms, targets, settings.mix_prob, settings.mix_clips, settings.mix_gain_db, rng,
                                   levels_db)
    waveforms = coloured_noise(waveforms, settings.noise_snr, settings.noise_prob, rng, settings.noise_colours,
                               levels_db)
    if bank is not None and settings.bg_prob > 0:
        waveforms = background_noise(waveforms, bank, settings.bg_snr, settings.bg_prob, rng, levels_db)
    return cutmix_time(waveforms, targets, settings.cutmix_alpha, settings.cutmix_prob, rng)


def augment_images(images: torch.Tensor, settings: AugmentSettings, rng: np.random.Generator) -> torch.Tensor:
    """Apply spec_augment with the masks of `settings` to images (B, 1, n_mels, T).

    With no masks asked for the input itself is returned (nothing to copy).
    """
    if settings.freq_masks == 0 and settings.time_masks == 0:
        return images
    return spec_augment(images, settings.freq_masks, settings.time_masks, settings.mask_max_pct, rng)
