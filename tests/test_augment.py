"""Tests for augment.py, checked against plain re-derivations (SNR measured from
output - input, spectral slopes fitted with numpy, masks found from the output),
not against the code's own intermediate values. CPU, float32, a few seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

import augment
from augment import AugmentSettings, BackgroundBank

SAMPLES = 4096


# ----------------------------------------------------------------------------- helpers

def signals(batch: int = 16, samples: int = SAMPLES, seed: int = 0) -> torch.Tensor:
    """Tones of random frequency and level over a little noise: (batch, samples) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    frequency = rng.uniform(200, 6000, size=(batch, 1))
    level = 10 ** rng.uniform(-2, 0, size=(batch, 1))
    audio = level * (np.sin(2 * np.pi * frequency * t) + 0.1 * rng.standard_normal((batch, samples)))
    return torch.from_numpy(audio.astype(np.float32))


def measured_snr_db(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """10 * log10(P_signal / P_noise) per example, noise = after - before, in float64."""
    signal = before.double().numpy()
    noise = (after.double() - before.double()).numpy()
    return 10 * np.log10((signal ** 2).mean(axis=1) / (noise ** 2).mean(axis=1))


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    return (before != after).flatten(1).any(dim=1).numpy()


def spectral_slope(noise: np.ndarray) -> float:
    """Slope of log10(power) against log10(frequency bin), power averaged over examples, DC excluded."""
    power = (np.abs(np.fft.rfft(noise, axis=1)) ** 2).mean(axis=0)
    bins = np.arange(1, power.size)
    # log-spaced bins, so that low and high frequencies weigh alike in the fit
    chosen = np.unique(np.round(np.logspace(0, np.log10(bins[-1]), 200)).astype(int))
    slope, _ = np.polyfit(np.log10(chosen), np.log10(power[chosen]), 1)
    return float(slope)


def write_ogg(path, audio: np.ndarray, sample_rate: int) -> None:
    """libsndfile's Vorbis encoder can crash on one big write: write in blocks."""
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, format="OGG", subtype="VORBIS") as file:
        for start in range(0, len(audio), 4096):
            file.write(audio[start:start + 4096])


@pytest.fixture
def noise_bank(tmp_path) -> BackgroundBank:
    rng = np.random.default_rng(5)
    sf.write(tmp_path / "rain.wav", (0.3 * rng.standard_normal(3 * SAMPLES)).astype(np.float32), 16000,
             subtype="FLOAT")
    sf.write(tmp_path / "wind.wav", (0.05 * rng.standard_normal(SAMPLES // 3)).astype(np.float32), 16000,
             subtype="FLOAT")
    return BackgroundBank(tmp_path, sample_rate=16000, window_samples=SAMPLES)


def everything_on() -> AugmentSettings:
    return AugmentSettings(noise_prob=0.5, bg_prob=0.5, cutmix_prob=0.5, gain_prob=0.5, shift_prob=0.5,
                           freq_masks=2, time_masks=2, mask_max_pct=0.1)


# ----------------------------------------------------------------------------- coloured noise

@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 12.5, 30.0])
def test_coloured_noise_reaches_requested_snr(colour, snr_db):
    before = signals(32)
    after = augment.coloured_noise(before, (snr_db, snr_db), probability=1.0, rng=np.random.default_rng(1),
                                   colours=(colour,))
    measured = measured_snr_db(before, after)
    assert np.all(np.abs(measured - snr_db) < 0.5), measured


def test_coloured_noise_snr_is_drawn_over_the_range():
    before = signals(400)
    after = augment.coloured_noise(before, (-5.0, 20.0), probability=1.0, rng=np.random.default_rng(1))
    measured = measured_snr_db(before, after)
    assert measured.min() > -5.5 and measured.max() < 20.5
    # uniform on [-5, 20]: quartiles near 1.25, 7.5, 13.75
    assert np.allclose(np.percentile(measured, [25, 50, 75]), [1.25, 7.5, 13.75], atol=1.5)


@pytest.mark.parametrize("colour, expected_slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_colour_has_its_spectral_slope(colour, expected_slope):
    before = signals(64)
    after = augment.coloured_noise(before, (10.0, 10.0), probability=1.0, rng=np.random.default_rng(2),
                                   colours=(colour,))
    noise = (after.double() - before.double()).numpy()
    assert abs(spectral_slope(noise) - expected_slope) < 0.3
    assert np.all(np.abs(noise.mean(axis=1)) < 1e-3 * np.sqrt((noise ** 2).mean(axis=1)))  # no DC offset


def test_coloured_noise_picks_every_colour():
    before = torch.zeros(300, SAMPLES)
    before[:, ::2] = 1.0  # any non-silent signal; its power sets the noise level only
    after = augment.coloured_noise(before, (0.0, 0.0), probability=1.0, rng=np.random.default_rng(3))
    slopes = [spectral_slope((after[i:i + 1] - before[i:i + 1]).double().numpy()) for i in range(300)]
    # single-example slopes are noisy but the three colours stay well apart
    counts = np.histogram(slopes, bins=[-3, -1.5, -0.5, 0.5])[0]   # brown, pink, white
    assert counts.sum() == 300 and np.all(counts > 70), counts


def test_coloured_noise_skips_digital_silence():
    before = signals(4)
    before[1] = 0.0
    after = augment.coloured_noise(before, (5.0, 5.0), probability=1.0, rng=np.random.default_rng(0))
    assert torch.isfinite(after).all()
    assert torch.equal(after[1], before[1])
    assert changed_rows(before, after).sum() == 3


def test_coloured_noise_checks_its_arguments():
    with pytest.raises(ValueError, match="colours"):
        augment.coloured_noise(signals(2), (0.0, 1.0), probability=1.0, rng=np.random.default_rng(0),
                               colours=("blue",))
    with pytest.raises(ValueError, match="snr_db_range"):
        augment.coloured_noise(signals(2), (5.0, 1.0), probability=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="probability"):
        augment.coloured_noise(signals(2), (0.0, 1.0), probability=1.5, rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- probability, determinism

def apply_op(name: str, waveforms: torch.Tensor, probability: float, rng, bank=None) -> torch.Tensor:
    if name == "coloured_noise":
        return augment.coloured_noise(waveforms, (0.0, 20.0), probability=probability, rng=rng)
    if name == "background_noise":
        return augment.background_noise(waveforms, bank, (0.0, 20.0), probability=probability, rng=rng)
    if name == "gain":
        return augment.random_gain(waveforms, (-6.0, 6.0), probability=probability, rng=rng)
    if name == "shift":
        return augment.time_shift(waveforms, max_fraction=0.5, probability=probability, rng=rng)
    if name == "cutmix":
        targets = torch.eye(waveforms.shape[0])
        return augment.cutmix_time(waveforms, targets, alpha=1.0, probability=probability, rng=rng)[0]
    raise AssertionError(name)


WAVEFORM_OPS = ["coloured_noise", "background_noise", "gain", "shift", "cutmix"]


@pytest.mark.parametrize("name", WAVEFORM_OPS)
def test_probability_zero_returns_input_unchanged(name, noise_bank):
    before = signals(8)
    copy = before.clone()
    after = apply_op(name, before, 0.0, np.random.default_rng(0), noise_bank)
    assert torch.equal(after, copy) and torch.equal(before, copy)


@pytest.mark.parametrize("name", ["coloured_noise", "background_noise", "gain", "shift"])
def test_probability_one_changes_every_example(name, noise_bank):
    before = signals(32)
    copy = before.clone()
    after = apply_op(name, before, 1.0, np.random.default_rng(0), noise_bank)
    assert changed_rows(before, after).all()
    assert torch.equal(before, copy)  # the input is not modified in place


@pytest.mark.parametrize("name", ["coloured_noise", "background_noise", "gain", "shift"])
def test_changed_fraction_matches_probability(name, tmp_path):
    batch, samples = 2000, 256
    sf.write(tmp_path / "hiss.wav", np.random.default_rng(1).standard_normal(1000).astype(np.float32), 16000)
    short_bank = BackgroundBank(tmp_path, sample_rate=16000, window_samples=samples)
    before = signals(batch, samples=samples, seed=4)
    after = apply_op(name, before, 0.3, np.random.default_rng(7), short_bank)
    fraction = changed_rows(before, after).mean()
    assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / batch), fraction


@pytest.mark.parametrize("name", WAVEFORM_OPS)
def test_same_seed_same_output_other_seed_other_output(name, noise_bank):
    before = signals(16)
    first = apply_op(name, before, 0.7, np.random.default_rng(11), noise_bank)
    again = apply_op(name, before, 0.7, np.random.default_rng(11), noise_bank)
    other = apply_op(name, before, 0.7, np.random.default_rng(12), noise_bank)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_no_global_random_state_is_used():
    before = signals(8)
    torch.manual_seed(0)
    np.random.seed(0)
    state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    augment.augment_waveforms(before, torch.eye(8), everything_on(), np.random.default_rng(0))
    augment.augment_images(torch.randn(8, 1, 16, 20, generator=torch.Generator().manual_seed(1)),
                           everything_on(), np.random.default_rng(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


# ----------------------------------------------------------------------------- background noise

@pytest.mark.parametrize("snr_db", [-3.0, 0.0, 2.0, 15.0])
def test_background_noise_reaches_requested_snr(noise_bank, snr_db):
    before = signals(32)
    after = augment.background_noise(before, noise_bank, (snr_db, snr_db), probability=1.0,
                                     rng=np.random.default_rng(8))
    measured = measured_snr_db(before, after)
    assert np.all(np.abs(measured - snr_db) < 0.5), measured


def test_background_noise_snr_is_drawn_over_the_range(noise_bank):
    before = signals(400)
    measured = measured_snr_db(before, augment.background_noise(before, noise_bank, (-3.0, 3.0), probability=1.0,
                                                                rng=np.random.default_rng(8)))
    assert measured.min() > -3.5 and measured.max() < 3.5
    assert np.allclose(np.percentile(measured, [25, 50, 75]), [-1.5, 0.0, 1.5], atol=0.6)


def test_background_noise_adds_scaled_crops_of_the_bank(tmp_path):
    clip = np.random.default_rng(6).standard_normal(3 * SAMPLES).astype(np.float32)
    sf.write(tmp_path / "only.wav", clip, 16000, subtype="FLOAT")
    bank = BackgroundBank(tmp_path, sample_rate=16000, window_samples=SAMPLES)
    before = signals(8)
    after = augment.background_noise(before, bank, (5.0, 5.0), probability=1.0, rng=np.random.default_rng(9))
    added = (after.double() - before.double()).numpy()
    clip = clip.astype(np.float64)
    size = clip.size + SAMPLES
    starts = []
    for row in added:
        # cross-correlation with the clip finds where the crop starts
        correlation = np.fft.irfft(np.fft.rfft(clip, size) * np.conj(np.fft.rfft(row, size)), size)
        start = int(np.argmax(correlation[:clip.size - SAMPLES + 1]))
        crop = clip[start:start + SAMPLES]
        scale = row @ crop / (crop @ crop)
        assert np.allclose(row, scale * crop, atol=1e-5 * np.abs(row).max()), start
        starts.append(start)
    assert len(set(starts)) == len(starts)


def test_background_noise_rejects_wrong_window(noise_bank):
    with pytest.raises(ValueError, match="samples"):
        augment.background_noise(signals(2, samples=SAMPLES + 1), noise_bank, (0.0, 1.0), probability=1.0,
                                 rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- background bank

def test_bank_loads_resamples_and_mixes_to_mono(tmp_path):
    duration = 0.5
    for rate in (8000, 16000, 44100):
        t = np.arange(int(duration * rate)) / rate
        sf.write(tmp_path / f"tone_{rate}.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate,
                 subtype="FLOAT")
    t = np.arange(int(duration * 22050)) / 22050
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 440 * t), 0.6 * np.sin(2 * np.pi * 440 * t)], axis=1)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "stereo.flac", stereo.astype(np.float32), 22050)  # a sub-folder too
    write_ogg(tmp_path / "tone.ogg", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    (tmp_path / "notes.txt").write_text("not audio")

    bank = BackgroundBank(tmp_path, sample_rate=16000, window_samples=4000)
    assert len(bank) == 5
    assert sorted(p.name for p in bank.paths) == ["stereo.flac", "tone.ogg", "tone_16000.wav",
                                                  "tone_44100.wav", "tone_8000.wav"]
    reference = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(duration * 16000)) / 16000)
    middle = slice(400, 7600)  # resampling filters ring at the ends
    for path, clip in zip(bank.paths, bank.clips):
        assert clip.dtype == torch.float32 and clip.ndim == 1
        assert abs(clip.numel() - duration * 16000) <= 1, (path.name, clip.numel())
        # stereo (0.2, 0.6) mixes to 0.4; ogg is lossy
        amplitude = 0.4 if path.name == "stereo.flac" else 0.5
        tolerance = 0.02 if path.suffix in (".wav", ".flac") else 0.05
        assert np.abs(clip.numpy()[middle] - reference[middle] * amplitude / 0.5).max() < tolerance, path.name


def test_bank_crops_long_files_and_tiles_short_ones(tmp_path):
    # sample i holds (i + 1) / 2**16, exact in float32 wav, so every crop value names its position
    long_file = (np.arange(10000) + 1) / 2 ** 16
    short_file = (np.arange(10000, 10300) + 1) / 2 ** 16
    sf.write(tmp_path / "long.wav", long_file.astype(np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", short_file.astype(np.float32), 16000, subtype="FLOAT")
    bank = BackgroundBank(tmp_path, sample_rate=16000, window_samples=1000)
    crops = bank.sample(200, np.random.default_rng(0))
    assert crops.shape == (200, 1000) and crops.dtype == torch.float32
    positions = np.rint(crops.double().numpy() * 2 ** 16).astype(int) - 1
    kinds = set()
    for row in positions:
        if row[0] < 10000:        # from the long file: contiguous, inside the file
            assert np.array_equal(np.diff(row), np.ones(999)) and row[-1] < 10000
            kinds.add("long")
        else:                     # from the short file: read circularly, period 300
            local = row - 10000
            assert np.array_equal(local, (local[0] + np.arange(1000)) % 300)
            kinds.add("short")
    assert kinds == {"long", "short"}
    starts = positions[positions[:, 0] < 10000, 0]
    assert starts.min() < 2000 and starts.max() > 7000  # starts spread over the file
    assert torch.equal(crops, bank.sample(200, np.random.default_rng(0)))
    assert bank.sample(0, np.random.default_rng(0)).shape == (0, 1000)


def test_bank_empty_folder_raises_naming_it(tmp_path):
    empty = tmp_path / "no_noise_here"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio")
    with pytest.raises(ValueError, match="no_noise_here"):
        BackgroundBank(empty, sample_rate=16000, window_samples=1000)
    with pytest.raises(ValueError, match="missing_folder"):
        BackgroundBank(tmp_path / "missing_folder", sample_rate=16000, window_samples=1000)


# ----------------------------------------------------------------------------- cutmix

def test_cutmix_replaces_a_span_with_partner_samples_and_mixes_targets_by_it():
    batch, samples = 64, 1000
    # value b * samples + i names example b, position i (exact in float32)
    waveforms = torch.arange(batch * samples, dtype=torch.float32).reshape(batch, samples)
    targets = torch.eye(batch)
    mixed, mixed_targets = augment.cutmix_time(waveforms, targets, alpha=1.0, probability=1.0,
                                               rng=np.random.default_rng(3))
    source = mixed.long()
    source_example, source_position = source // samples, source % samples
    assert torch.equal(source_position, torch.arange(samples).expand(batch, samples))  # same positions
    replaced_fractions = []
    for b in range(batch):
        foreign = (source_example[b] != b).nonzero().flatten().numpy()
        fraction = foreign.size / samples
        expected = targets[b].clone()
        if foreign.size:
            assert np.array_equal(foreign, np.arange(foreign[0], foreign[-1] + 1))   # one contiguous span
            partners = source_example[b, foreign].unique()
            assert partners.numel() == 1                                             # from one partner
            expected = (1 - fraction) * targets[b] + fraction * targets[partners.item()]
        assert torch.allclose(mixed_targets[b], expected, atol=1e-6), b
        replaced_fractions.append(fraction)
    assert abs(mixed_targets.sum(dim=1) - 1).max() < 1e-5
    # Beta(1, 1): 1 - lambda is uniform, mean 1/2 (examples paired with themselves count as 0)
    assert 0.3 < np.mean(replaced_fractions) < 0.6


def test_cutmix_probability_zero_keeps_targets():
    waveforms, targets = signals(8), torch.eye(8)
    out_waveforms, out_targets = augment.cutmix_time(waveforms, targets, alpha=1.0, probability=0.0,
                                                     rng=np.random.default_rng(0))
    assert torch.equal(out_waveforms, waveforms) and torch.equal(out_targets, targets)


# ----------------------------------------------------------------------------- gain and shift

def test_gain_stays_within_db_range():
    before = signals(500)
    after = augment.random_gain(before, (-6.0, 3.0), probability=1.0, rng=np.random.default_rng(0))
    gain_db = 20 * np.log10(np.abs(after.double().numpy()).max(axis=1) / np.abs(before.double().numpy()).max(axis=1))
    assert gain_db.min() >= -6.0 - 1e-4 and gain_db.max() <= 3.0 + 1e-4
    assert gain_db.min() < -5.5 and gain_db.max() > 2.5           # the whole range is used
    ratio = after.double() / before.double()                       # one factor per example
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)


def test_time_shift_is_a_circular_roll_within_limit():
    samples = 1000
    before = signals(200, samples=samples)
    after = augment.time_shift(before, max_fraction=0.25, probability=1.0, rng=np.random.default_rng(0))
    shifts = []
    for b in range(200):
        assert torch.equal(after[b].sort().values, before[b].sort().values)
        # the values are distinct, so where the first sample went is the shift
        shift = int((after[b] == before[b, 0]).nonzero().item())
        assert torch.equal(after[b], torch.roll(before[b], shift))
        shift = shift - samples if shift > samples // 2 else shift
        assert shift != 0 and abs(shift) <= 250
        shifts.append(shift)
    assert min(shifts) < -200 and max(shifts) > 200                 # both directions, up to the limit


# ----------------------------------------------------------------------------- spec augment

def masked_runs(flags: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D boolean array."""
    padded = np.concatenate([[False], flags, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


@pytest.mark.parametrize("freq_masks, time_masks", [(1, 1), (3, 2)])
def test_spec_augment_masks(freq_masks, time_masks):
    batch, n_mels, frames, max_pct = 200, 64, 100, 0.2
    images = torch.randn(batch, 1, n_mels, frames, generator=torch.Generator().manual_seed(0))
    copy = images.clone()
    out = augment.spec_augment(images, freq_masks=freq_masks, time_masks=time_masks, max_pct=max_pct,
                               rng=np.random.default_rng(0))
    assert torch.equal(images, copy)                   # input untouched
    assert out.data_ptr() != images.data_ptr()
    max_bands, max_frames = math.floor(max_pct * n_mels), math.floor(max_pct * frames)
    widest_band_run = widest_frame_run = 0
    for b in range(batch):
        mean = images[b].mean()
        at_mean = (out[b, 0] == mean).numpy()           # (n_mels, T)
        bands, frame_flags = at_mean.all(axis=1), at_mean.all(axis=0)
        band_runs, frame_runs = masked_runs(bands), masked_runs(frame_flags)
        assert len(band_runs) <= freq_masks and len(frame_runs) <= time_masks
        assert sum(band_runs) <= freq_masks * max_bands and sum(frame_runs) <= time_masks * max_frames
        if freq_masks == 1:
            assert all(width <= max_bands for width in band_runs)
        if time_masks == 1:
            assert all(width <= max_frames for width in frame_runs)
        widest_band_run = max([widest_band_run, *band_runs])
        widest_frame_run = max([widest_frame_run, *frame_runs])
        # every changed cell lies in a masked band or frame; everything else is the input
        masked = bands[:, None] | frame_flags[None, :]
        assert np.array_equal(out[b, 0].numpy()[~masked], images[b, 0].numpy()[~masked])
        assert np.all(out[b, 0].numpy()[masked] == mean.item())
    if freq_masks == 1 and time_masks == 1:   # widths reach their limit
        assert widest_band_run == max_bands and widest_frame_run == max_frames


def test_spec_augment_determinism_and_no_masks():
    images = torch.randn(4, 1, 32, 40, generator=torch.Generator().manual_seed(0))
    def two_masks_each(seed):
        return augment.spec_augment(images, freq_masks=2, time_masks=2, max_pct=0.2, rng=np.random.default_rng(seed))
    first = two_masks_each(1)
    assert torch.equal(first, two_masks_each(1))
    assert not torch.equal(first, two_masks_each(2))
    unmasked = augment.spec_augment(images, freq_masks=0, time_masks=0, max_pct=0.2, rng=np.random.default_rng(1))
    assert torch.equal(unmasked, images) and unmasked.data_ptr() != images.data_ptr()


# ----------------------------------------------------------------------------- settings and pipelines

def test_default_settings_are_off(noise_bank):
    waveforms, targets = signals(8), torch.eye(8)
    out, out_targets = augment.augment_waveforms(waveforms, targets, AugmentSettings(),
                                                 np.random.default_rng(0), noise_bank)
    assert torch.equal(out, waveforms) and torch.equal(out_targets, targets)


def test_strength_zero_turns_everything_off(noise_bank):
    settings = everything_on().scaled(0.0)
    assert all(getattr(settings, name) == 0 for name in augment.PROBABILITY_FIELDS)
    assert settings.freq_masks == 0 and settings.time_masks == 0
    waveforms, targets = signals(8), torch.eye(8)
    out, out_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), noise_bank)
    assert torch.equal(out, waveforms) and torch.equal(out_targets, targets)
    images = torch.randn(8, 1, 16, 20)
    assert torch.equal(augment.augment_images(images, settings, np.random.default_rng(0)), images)


def test_strength_scales_probabilities_and_magnitudes():
    base = AugmentSettings(noise_prob=0.3, bg_prob=0.6, cutmix_prob=0.2, gain_prob=0.5, shift_prob=0.4,
                           freq_masks=2, time_masks=1, mask_max_pct=0.1, shift_max=0.3)
    assert base.scaled(1.0) == base
    one, two = base.scaled(1.0), base.scaled(2.0)
    for name in augment.PROBABILITY_FIELDS:
        assert getattr(two, name) == min(1.0, 2 * getattr(one, name))
    assert two.bg_prob == 1.0                                        # capped
    assert two.noise_snr[0] < one.noise_snr[0] and two.noise_snr[1] < one.noise_snr[1]   # more noise
    assert two.bg_snr[0] < one.bg_snr[0] and two.bg_snr[1] < one.bg_snr[1]
    assert two.gain_db > one.gain_db and two.shift_max > one.shift_max and two.mask_max_pct > one.mask_max_pct
    assert (two.freq_masks, two.time_masks) == (one.freq_masks, one.time_masks)
    half = base.scaled(0.5)
    assert half.noise_prob < one.noise_prob and half.noise_snr[0] > one.noise_snr[0]
    with pytest.raises(ValueError):
        base.scaled(-1.0)


def test_augment_waveforms_everything_on(noise_bank):
    waveforms, targets = signals(16), torch.eye(16)
    settings = AugmentSettings(noise_prob=1.0, bg_prob=1.0, cutmix_prob=1.0, gain_prob=1.0, shift_prob=1.0)
    out, out_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), noise_bank)
    again, again_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), noise_bank)
    assert out.shape == waveforms.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, again) and torch.equal(out_targets, again_targets)
    assert changed_rows(waveforms, out).all()
    assert torch.allclose(out_targets.sum(dim=1), torch.ones(16))
    # without a bank the background step is skipped, not an error
    augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), None)


def test_augment_waveforms_adds_background_only_with_a_bank(noise_bank):
    waveforms, targets = signals(16), torch.eye(16)
    settings = AugmentSettings(bg_prob=1.0, bg_snr=(4.0, 4.0))
    out, out_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), noise_bank)
    assert np.all(np.abs(measured_snr_db(waveforms, out) - 4.0) < 0.5)
    assert torch.equal(out_targets, targets)
    unbanked, _ = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0), None)
    assert torch.equal(unbanked, waveforms)


def test_augment_waveforms_applies_the_documented_order(noise_bank):
    """gain -> shift -> coloured noise -> background -> cutmix, each from the same generator in turn."""
    waveforms, targets = signals(16), torch.eye(16)
    settings = AugmentSettings(noise_prob=0.8, bg_prob=0.8, cutmix_prob=0.8, gain_prob=0.8, shift_prob=0.8)
    out, out_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(4), noise_bank)
    rng = np.random.default_rng(4)
    expected = augment.random_gain(waveforms, (-6.0, 6.0), probability=0.8, rng=rng)
    expected = augment.time_shift(expected, max_fraction=0.5, probability=0.8, rng=rng)
    expected = augment.coloured_noise(expected, (3.0, 30.0), probability=0.8, rng=rng)
    expected = augment.background_noise(expected, noise_bank, (0.0, 2.0), probability=0.8, rng=rng)
    expected, expected_targets = augment.cutmix_time(expected, targets, alpha=1.0, probability=0.8, rng=rng)
    assert torch.equal(out, expected) and torch.equal(out_targets, expected_targets)


def test_augment_images_applies_spec_augment():
    images = torch.randn(8, 1, 32, 50, generator=torch.Generator().manual_seed(0))
    settings = AugmentSettings(freq_masks=2, time_masks=3, mask_max_pct=0.2)
    out = augment.augment_images(images, settings, np.random.default_rng(5))
    expected = augment.spec_augment(images, freq_masks=2, time_masks=3, max_pct=0.2, rng=np.random.default_rng(5))
    assert torch.equal(out, expected)
    assert not torch.equal(out, images)


# ----------------------------------------------------------------------------- soundscape-style: distance, rooms, several calls

def reference_lowpass(row: np.ndarray, cutoff: float, sample_rate: int) -> np.ndarray:
    """A plain re-derivation: rFFT, times 1 / sqrt(1 + (f / cutoff) ** 8), inverse rFFT (float64)."""
    frequency = np.fft.rfftfreq(len(row), 1 / sample_rate)
    return np.fft.irfft(np.fft.rfft(row.astype(np.float64)) / np.sqrt(1 + (frequency / cutoff) ** 8), len(row))


def test_distance_is_a_low_pass_then_the_drawn_gain_within_half_a_db():
    before = signals(batch=32)
    rng = np.random.default_rng(3)
    after = augment.distance(before, (-20.0, -2.0), (1000.0, 6000.0), 0.5, rng, sample_rate=16000)
    # the draws, repeated in the order distance makes them
    replay = np.random.default_rng(3)
    gain_db = replay.uniform(-20.0, -2.0, size=32)
    cutoff = np.exp(replay.uniform(math.log(1000.0), math.log(6000.0), size=32))
    chosen = replay.random(32) < 0.5
    assert 5 < chosen.sum() < 27
    np.testing.assert_array_equal(after[~chosen].numpy(), before[~chosen].numpy())
    for row in np.flatnonzero(chosen):
        filtered = reference_lowpass(before[row].numpy(), cutoff[row], 16000)
        level = 10 * np.log10((after[row].double().numpy() ** 2).mean() / (filtered ** 2).mean())
        assert level == pytest.approx(gain_db[row], abs=0.5)
        np.testing.assert_allclose(after[row].numpy(), filtered * 10 ** (gain_db[row] / 20), atol=1e-5)


def test_reverb_keeps_each_examples_level_and_changes_its_sound():
    before = signals(batch=16)
    after = augment.reverb(before, (0.2, 0.8), 1.0, np.random.default_rng(0), sample_rate=16000)
    level = 10 * torch.log10((after.double() ** 2).mean(dim=1) / (before.double() ** 2).mean(dim=1))
    np.testing.assert_allclose(level.numpy(), 0.0, atol=0.5)
    assert changed_rows(before, after).all()
    silent = torch.zeros(2, SAMPLES)
    assert torch.equal(augment.reverb(silent, (0.2, 0.8), 1.0, np.random.default_rng(0), 16000), silent)


def test_mix_clips_adds_partners_at_the_drawn_level_and_takes_the_union_of_targets():
    waveforms = signals(batch=8)
    targets = torch.eye(8, 5)                                  # one species each (rows 5-7: none)
    rng = np.random.default_rng(1)
    mixed, mixed_targets = augment.mix_clips(waveforms, targets, 1.0, 2, (-6.0, 0.0), rng)
    replay = np.random.default_rng(1)                          # mix_clips' draws, in its order
    replay.integers(1, 2, size=8)
    replay.random(8)
    partners = (np.arange(8)[:, None] + replay.integers(1, 8, size=(8, 1))) % 8
    gain_db = replay.uniform(-6.0, 0.0, size=(8, 1))
    for row in range(8):
        partner = int(partners[row, 0])
        added = (mixed[row] - waveforms[row]).double()
        # what was added is the partner itself, scaled, at the drawn power relative to the example
        scale = float(added @ waveforms[partner].double() / (waveforms[partner].double() @ waveforms[partner].double()))
        np.testing.assert_allclose(added.numpy(), scale * waveforms[partner].double().numpy(), atol=1e-5)
        level = 10 * torch.log10((added ** 2).mean() / (waveforms[row].double() ** 2).mean()).item()
        assert float(level) == pytest.approx(gain_db[row, 0], abs=0.5)
        assert torch.equal(mixed_targets[row], torch.maximum(targets[row], targets[partner]))


def test_mix_clips_off_changes_nothing_and_draws_nothing():
    waveforms, targets = signals(batch=4), torch.eye(4)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    out, out_targets = augment.mix_clips(waveforms, targets, 0.0, 3, (-6.0, 0.0), rng)
    assert out is waveforms and out_targets is targets and rng.bit_generator.state == state


def test_soundscape_style_settings_run_in_order_and_scale_with_strength():
    settings = AugmentSettings(mix_prob=0.5, distance_prob=0.5, reverb_prob=0.5, sample_rate=16000)
    waveforms, targets = signals(batch=8), torch.eye(8, 3)
    out, out_targets = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(0))
    assert out.shape == waveforms.shape and (out_targets >= targets).all()
    assert settings.scaled(0.0).mix_prob == settings.scaled(0.0).distance_prob == settings.scaled(0.0).reverb_prob == 0
    assert settings.scaled(2.0).reverb_prob == 1.0 and settings.scaled(2.0).reverb_rt60 == settings.reverb_rt60


# ----------------------------------------------------------------------------- mixup

def test_mixup_mixes_targets_with_the_waveforms_own_lambda():
    """lambda recovered from each mixed waveform (least squares on the two sources) mixes its targets too."""
    waveforms, targets = signals(batch=64), torch.rand(64, 6)
    mixed, mixed_targets = augment.mixup(waveforms, targets, alpha=0.4, probability=1.0, rng=np.random.default_rng(2))
    partner = np.random.default_rng(2).permutation(64)           # mixup's first draw
    for row in range(64):
        own, other = waveforms[row].double().numpy(), waveforms[partner[row]].double().numpy()
        if partner[row] == row:
            continue
        lam = np.linalg.lstsq(np.stack([own, other], axis=1), mixed[row].double().numpy(), rcond=None)[0]
        assert lam.sum() == pytest.approx(1.0, abs=1e-4)         # a convex combination
        expected = lam[0] * targets[row].double().numpy() + lam[1] * targets[partner[row]].double().numpy()
        np.testing.assert_allclose(mixed_targets[row].numpy(), expected, atol=1e-4)


def test_mixup_respects_alpha_and_probability():
    """Over many examples: the share left unmixed is 1 - probability, and lambda ~ Beta(alpha, alpha) has
    the variance 1 / (4 (2 alpha + 1))."""
    batch = 4000
    waveforms, targets = torch.eye(batch)[:, :64].contiguous(), torch.eye(batch)     # one-hot: lambda is readable
    for alpha, probability in ((0.2, 0.5), (2.0, 0.8)):
        _, mixed_targets = augment.mixup(waveforms, targets, alpha, probability, np.random.default_rng(0))
        lam = mixed_targets[torch.arange(batch), torch.arange(batch)].double().numpy()   # own share
        partner = np.random.default_rng(0).permutation(batch)
        moved = lam[partner != np.arange(batch)]
        unmixed = np.mean(moved == 1.0)
        assert unmixed == pytest.approx(1 - probability, abs=0.03)
        mixed_lam = moved[moved < 1.0]
        assert mixed_lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    assert augment.mixup(waveforms, targets, 0.0, 1.0, np.random.default_rng(0))[1] is targets   # alpha 0: off


def test_a_distant_call_lies_quieter_under_the_same_bed_and_beside_near_calls(noise_bank):
    """The distance gain must survive the steps after it (each sets levels relative to the window, and
    the frontend normalises each example): the bed's SNR and a partner's level move by the gains."""
    waveforms, targets = signals(16), torch.eye(16)
    settings = AugmentSettings(distance_prob=0.5, distance_db=(-12.0, -12.0), distance_lowpass_hz=(7000.0, 7900.0),
                               bg_prob=1.0, bg_snr=(4.0, 4.0), sample_rate=16000)
    out, _ = augment.augment_waveforms(waveforms, targets, settings, np.random.default_rng(5), noise_bank)
    distanced, levels = augment.distance_with_levels(waveforms, (-12.0, -12.0), (7000.0, 7900.0), 0.5,
                                                     np.random.default_rng(5), 16000)
    assert set(np.unique(levels)) == {0.0, -12.0}
    np.testing.assert_allclose(measured_snr_db(distanced, out), 4.0 + levels, atol=0.5)   # far: -8 dB, near: 4 dB

    rng = np.random.default_rng(2)
    mixed, _ = augment.mix_clips(distanced, targets, 1.0, 2, (0.0, 0.0), rng, levels)
    replay = np.random.default_rng(2)
    replay.integers(1, 2, size=16)
    replay.random(16)
    partners = (np.arange(16)[:, None] + replay.integers(1, 16, size=(16, 1))) % 16
    for row in range(16):
        partner = int(partners[row, 0])
        added = (mixed[row] - distanced[row]).double()
        level = 10 * np.log10(added.square().mean().item() / distanced[row].double().square().mean().item())
        assert level == pytest.approx(levels[partner] - levels[row], abs=0.5)
