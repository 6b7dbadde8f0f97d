"""Pseudo-soundscapes: labelled soundscapes built from your own validation recordings.

    python data.py soundscapes --data-dir D --out DIR [--bed-dir BACKGROUND | --detections det.csv]
    python train.py --data-dir D --val-soundscapes DIR/labels.csv --monitor soundscape_cmap5

A competitor rarely has labelled soundscapes, and clean clip crops (the original
experiments' validation) say little about them. This builds soundscapes from the
recordings of the validation split only -- the split train.py makes for the same
--seed, --val-fraction, --folds and --fold -- placed on the 5-s row grid over
background audio at soundscape-like levels, distances and rooms. The labels are
the placements, so they are exact.

Per 5-s row: no call (a share --empty-share of the rows), or 1 to --max-calls calls
of different species, each a --call-seconds piece of a validation recording at a
random offset inside the row. Which piece: the recording's best windows in a
--detections table (infer.py --detections), else its loudest pieces in the birds'
band. Each call may be reverberated (a synthetic exponentially decaying impulse
response) and heard from a distance (a low-pass cutoff and a gain), then scaled so
that its SNR over the bed where it lies is the drawn --snr plus the distance gain.
The bed: files of --bed-dir (e.g. 2024's unlabeled_soundscapes/; each soundscape decodes
only its own stretch), else the quietest windows of the --detections table, else coloured
noise (the last resort; the log and README.txt say why). A near-silent stretch (no level
for an SNR) or an unreadable file is skipped with a warning. A row is labelled with each
call's species and its recording's secondary species. Everything is drawn from generators
seeded by --placement-seed; --out must be new or empty, and outside --bed-dir.

Keep the bed apart from what training hears: the bed files are listed in beds.txt,
and train.py warns when its --bg-dir, --nocall-audio or --nocall-soundscapes audio is
among them (a model that learnt those very files scores better here without scoring
better in the field). Split the background folder instead, e.g. half for each.

The `soundscapes` subcommand's flags are defined here (`add_command`, `command_from_args`).
The call flags are --call-distance-*/--call-reverb-*, not train.py's --distance-*/--reverb-*
(those are augmentation of training crops, with other defaults); the bed is --bed-dir, not
train.py's --bg-dir. The old spellings still work, with a warning. data.py's main reads the
recordings and the validation split (its job; this module may not import it) and calls `run`.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

import audio
import cli
import extras as extras_lib
import soundscapes

log = logging.getLogger("birdclef")

BIRD_BAND_HZ = (1000.0, 12000.0)    # where "the energy is" when no detections table says where calls are
CANDIDATES_PER_RECORDING = 3         # pieces of each recording that may supply a call
BED_NOISE_RMS = 0.01                 # level of the coloured-noise bed (the last resort)
BEDS_FILE = "beds.txt"              # the bed's audio files, one resolved path a line (train.py checks them)
BED_MAX_SCORE = 0.05                 # a detections window is a bed only below this score (train.py --nocall-max-score)
BED_MIN_DBFS = -80.0                 # a bed stretch under a call is this quiet only if (nearly) digital silence
BED_MAX_DRAWS = 20                   # near-silent or unreadable bed draws in a row before giving up
RESAMPLE_MARGIN = 2048               # input frames read beyond a bed stretch: the resampling filter reaches < 64
OGG_SEEK_BEFORE, OGG_TAIL_S = 16384, 10.0   # Ogg bed reads seek this many frames early, and never into the last 10 s


@dataclass
class PlacementSettings:
    """How pseudo-soundscapes are made (the flags of `python data.py soundscapes`)."""
    count: int = 20                               # soundscapes
    seconds: float = 60.0                         # length of each
    sample_rate: int = 32000
    empty_share: float = 0.3                      # rows without any call
    max_calls: int = 3                            # calls (of different species) in a row, at most
    call_seconds: float = 3.0                     # length of each placed call
    snr_db: tuple[float, float] = (-3.0, 12.0)    # SNR of a call over the bed, before distance
    distance_prob: float = 0.5
    distance_db: tuple[float, float] = (-12.0, 0.0)
    distance_lowpass_hz: tuple[float, float] = (3000.0, 16000.0)
    reverb_prob: float = 0.3
    reverb_rt60: tuple[float, float] = (0.2, 1.2)
    seed: int = 0                                 # placement seed (the split has its own)
    denoise_calls: bool = False                   # spectral subtraction of each piece's own noise floor


# ----------------------------------------------------------------------------- where calls come from

def call_pieces(recordings: pd.DataFrame, settings: PlacementSettings, detections: pd.DataFrame | None) -> dict:
    """Each validation recording -> the start times (s) of its candidate call pieces.

    With a detections table: the starts of its best-scoring 5-s windows for its primary label (the
    piece is the middle of the window); else the loudest non-overlapping pieces in BIRD_BAND_HZ.
    """
    pieces = {}
    for name, path, duration in zip(recordings["name"], recordings["path"], recordings["duration"]):
        if detections is not None:
            windows = detections[detections["filename"] == name]
            best = windows.sort_values(["primary_score", "start_s"], ascending=[False, True], kind="stable")
            centre = soundscapes.ROW_SECONDS / 2 - settings.call_seconds / 2
            starts = [min(max(start + centre, 0.0), max(duration - settings.call_seconds, 0.0))
                      for start in best["start_s"].head(CANDIDATES_PER_RECORDING)]
        else:
            starts = loudest_pieces(audio.read_audio(path, settings.sample_rate), settings.sample_rate,
                                    settings.call_seconds)
        if starts:
            pieces[name] = starts
    return pieces


def loudest_pieces(waveform: np.ndarray, sample_rate: int, seconds: float) -> list[float]:
    """Start times (s) of up to CANDIDATES_PER_RECORDING non-overlapping `seconds`-long pieces with
    the most energy in BIRD_BAND_HZ, loudest first."""
    piece = int(round(seconds * sample_rate))
    if len(waveform) <= piece:
        return [0.0]
    spectrum = np.fft.rfft(waveform)
    frequency = np.fft.rfftfreq(len(waveform), 1.0 / sample_rate)
    spectrum[(frequency < BIRD_BAND_HZ[0]) | (frequency > BIRD_BAND_HZ[1])] = 0
    band = np.fft.irfft(spectrum, len(waveform))
    hop = max(piece // 4, 1)
    cumulative = np.concatenate([[0.0], np.cumsum(band ** 2)])
    energy = (cumulative[piece:] - cumulative[:-piece])[::hop]                        # energy of each piece, per hop
    starts = []
    for index in np.argsort(-energy, kind="stable"):
        start = int(index) * hop
        if all(abs(start - other) >= piece for other in starts):
            starts.append(start)
        if len(starts) == CANDIDATES_PER_RECORDING:
            break
    return [start / sample_rate for start in starts]


# ----------------------------------------------------------------------------- beds
#
# A bed is read lazily: `background_beds` keeps only spans (file, start, length) and `bed_for` decodes the
# one stretch a soundscape lies on, so memory does not grow with the bed folder (2024's
# unlabeled_soundscapes/ is hundreds of hours: ~470 MB per hour once decoded at 32 kHz).

@dataclass(frozen=True)
class BedSpan:
    """`samples` samples at the soundscape rate of one file: a whole --bed-dir file (seconds 0), or the
    `seconds`-long window of a recording from start_s (a detections bed, read as audio.read_window reads it)."""
    path: str
    samples: int
    start_s: float = 0.0
    seconds: float = 0.0


# A bed source: spans laid end to end, read cyclically (a --bed-dir file alone; the detections' windows together).
BedSource = tuple[BedSpan, ...]


def background_beds(settings: PlacementSettings, bed_dir=None, detections: pd.DataFrame | None = None,
                    recordings_by_name: dict | None = None) -> tuple[list[BedSource], str, list]:
    """The audio soundscapes are laid over -> (bed sources, where they came from, --bed-dir files used or
    []). No source: coloured noise, and the text says why."""
    if bed_dir:
        sources = bed_dir_sources(bed_dir, settings.sample_rate)
        files = [source[0].path for source in sources]
        return sources, f"{len(files)} file(s) of {bed_dir}", files
    if detections is None:
        reason = "no --bed-dir or --detections given"
    elif "top1_score" not in detections.columns:
        reason = "the --detections table has no top1_score column to find quiet windows by"
    else:
        spans, reason = detections_spans(detections, recordings_by_name or {}, settings)
        if spans:
            # validation recordings: training never hears them, so no file to keep out of its --bg-dir
            return [tuple(spans)], f"the quietest window of {len(spans)} recording(s) in the detections", []
    log.warning("pseudo-soundscapes over coloured noise (%s): give --bed-dir (e.g. unlabeled soundscapes) or "
                "--detections for a bed that sounds like the field", reason)
    return [], f"coloured noise ({reason})", []


def bed_dir_sources(bed_dir, rate: int) -> list[BedSource]:
    """Each usable --bed-dir file as one source, from its header alone; an unreadable, empty or odd-rate
    file, or one in an earlier run's output (it holds calls), is skipped with a warning naming it."""
    files = audio.audio_files(bed_dir)
    if not files:
        raise ValueError(f"--bed-dir {bed_dir} holds no ogg/mp3/flac/wav file")
    headers, bad = audio.check_audio_files(files)
    reasons = dict(bad)
    sources = []
    for path, header in zip(files, headers):
        try:
            if (path.parent / BEDS_FILE).is_file():
                raise ValueError(f"its folder holds {BEDS_FILE}: pseudo-soundscapes, which hold calls")
            if header is None:
                raise ValueError(reasons[str(path)])
            samples = resampled_length(*header, rate)
            if samples < 1:
                raise ValueError(f"no sample at {rate} Hz")
        except ValueError as error:
            log.warning("--bed-dir file %s skipped: %s", path, error)
            reasons[str(path)] = str(error)
            continue
        sources.append((BedSpan(str(path), samples),))
    if not sources:
        example = next(iter(reasons.items()))
        raise ValueError(f"--bed-dir {bed_dir}: none of its {len(files)} audio file(s) is usable "
                         f"(e.g. {example[0]}: {example[1]})")
    return sources


def detections_spans(detections: pd.DataFrame, recordings_by_name: dict,
                     settings: PlacementSettings) -> tuple[list[BedSpan], str]:
    """The quietest 5-s window of each validation recording that the detector calls empty (a quieter
    window may still hold an unlabelled call), without near-silent ones -> (spans, why none if none)."""
    quiet = extras_lib.select_nocall_detections(detections, max_score=BED_MAX_SCORE, per_recording=1)
    quiet = quiet[quiet["filename"].isin(list(recordings_by_name))]
    if not len(quiet):
        return [], (f"no window of the --detections table in a validation recording has a top1_score below "
                    f"{BED_MAX_SCORE:g}: none is quiet enough to be a bed")
    rate, spans = settings.sample_rate, []
    for name, start in zip(quiet["filename"], quiet["start_s"]):
        span = BedSpan(str(recordings_by_name[name]), int(round(soundscapes.ROW_SECONDS * rate)), float(start),
                       soundscapes.ROW_SECONDS)
        level, _ = quietest_level_db(read_span(span, 0, span.samples, rate), int(round(settings.call_seconds * rate)))
        if level < BED_MIN_DBFS:
            log.warning("detections bed window %s at %g s skipped: near-silent (%.0f dBFS)", name, start, level)
            continue
        spans.append(span)
    return spans, "every quiet window of the --detections table is near-silent"


def resampled_length(frames: int, source_rate: int, rate: int) -> int:
    """Samples of a `frames`-long file at `rate`, as audio.read_audio returns them (ValueError for a rate
    it cannot resample)."""
    usable = source_rate if source_rate == rate else audio.usable_rate(source_rate, rate)
    if usable == rate:
        return frames
    divisor = math.gcd(usable, rate)
    return -(-frames * (rate // divisor) // (usable // divisor))


def read_span(span: BedSpan, first: int, count: int, rate: int) -> np.ndarray:
    """Samples [first, first + count) of a span at `rate` -> (count,) float32."""
    if span.seconds:
        return audio.read_window(span.path, span.start_s, span.seconds, rate)[first:first + count]
    return read_file_samples(span.path, first, count, rate)


def read_file_samples(path: str, first: int, count: int, rate: int) -> np.ndarray:
    """Samples [first, first + count) of a whole file at `rate` -> (count,) float32 (zeros past its end),
    decoding only them: the same samples as audio.read_audio(path, rate)[first:first + count] (tested; mp3
    within float rounding), since the read starts on a frame where the resampler's rows of the whole file
    start, and reaches RESAMPLE_MARGIN frames beyond the wanted ones on both sides (the filter reaches
    less). libsndfile's Ogg seek into a file's last page lands elsewhere, and near-seeks may be a Vorbis
    block off (libsndfile issue #885): in Ogg it seeks OGG_SEEK_BEFORE frames and >= OGG_TAIL_S from the end."""
    with sf.SoundFile(path) as handle:
        source_rate, frames = handle.samplerate, handle.frames
        usable = source_rate if source_rate == rate else audio.usable_rate(source_rate, rate)
        if usable == rate:
            begin, end, skip = first, first + count, first
        else:
            divisor = math.gcd(usable, rate)
            orig, new = usable // divisor, rate // divisor       # frames in -> samples out, per period
            row = orig * -(-4 * audio.Resampler.PHASES_PER_BLOCK // new)   # input frames per resampler row
            margin = row * -(-RESAMPLE_MARGIN // row)
            begin = max(first // new * orig // row * row - margin, 0)
            end = -(-(first + count) // new) * orig + margin
            skip = begin // orig * new                          # output sample of input frame `begin`
        end, seek = min(end, frames), min(begin, frames)
        if handle.format == "OGG":
            seek = max(min(seek - OGG_SEEK_BEFORE, frames - int(OGG_TAIL_S * source_rate)), 0)
        handle.seek(seek)
        block = handle.read(max(end - seek, 0), dtype="float32", always_2d=True)[begin - seek:]   # (frames, channels)
    samples = audio.to_mono_resampled(block, source_rate, rate)
    return audio.fit_length(samples[first - skip:first - skip + count], count)


def read_bed(source: BedSource, start: int, samples: int, rate: int) -> np.ndarray:
    """(samples,) float32: the source's spans end to end from sample `start`, wrapping round (a short
    source repeats), as np.resize(np.roll(whole, -start), samples) of the whole source."""
    total = sum(span.samples for span in source)
    out, filled, position = np.empty(samples, dtype=np.float32), 0, start % total
    while filled < samples:
        span, offset = span_at(source, position)
        take = min(samples - filled, span.samples - offset)
        out[filled:filled + take] = read_span(span, offset, take, rate)
        filled, position = filled + take, (position + take) % total
    return out


def span_at(source: BedSource, position: int) -> tuple[BedSpan, int]:
    """The span holding sample `position` of a source, and the position inside it."""
    for span in source:
        if position < span.samples:
            return span, position
        position -= span.samples
    raise IndexError(f"sample {position} past the end of the bed")


def quietest_level_db(samples: np.ndarray, window: int) -> tuple[float, int]:
    """The lowest mean power of any `window`-long stretch of (N,) samples in dBFS, and where it starts:
    a call may lie on any such stretch, and its SNR needs a bed level there."""
    window = min(window, len(samples))
    energy = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])    # (N + 1,)
    power = (energy[window:] - energy[:-window]) / window                           # (N - window + 1,)
    index = int(np.argmin(power))
    return 10 * math.log10(max(float(power[index]), 1e-30)), index


def bed_for(beds: list[BedSource], samples: int, rng: np.random.Generator, settings: PlacementSettings) -> np.ndarray:
    """A (samples,) float32 bed: a random source from a random start, repeated if short; or pink noise.

    A draw that is near-silent where a call could lie (its SNR scaling would have no level to scale to),
    or whose file fails to decode past its header, is skipped with a warning and another drawn, up to
    BED_MAX_DRAWS times (without a draw of its own, the first draw is the one it always was)."""
    if not beds:
        return pink_noise(samples, rng)
    for _ in range(BED_MAX_DRAWS):
        source = beds[int(rng.integers(len(beds)))]
        total = sum(span.samples for span in source)
        start = int(rng.integers(total))
        try:
            bed = read_bed(source, start, samples, settings.sample_rate)
        except (RuntimeError, OSError) as error:     # soundfile's LibsndfileError is a RuntimeError
            log.warning("bed %s skipped: it cannot be decoded (%s)", source[0].path, error)
            continue
        level, where = quietest_level_db(bed, int(round(settings.call_seconds * settings.sample_rate)))
        if level >= BED_MIN_DBFS:
            return bed
        span, offset = span_at(source, (start + where) % total)
        log.warning("bed %s at %.1f s skipped: near-silent (%.0f dBFS over %g s, below %g dBFS)", span.path,
                    span.start_s + offset / settings.sample_rate, level, settings.call_seconds, BED_MIN_DBFS)
    raise ValueError(f"no usable bed: {BED_MAX_DRAWS} draws in a row were near-silent (below {BED_MIN_DBFS:g} "
                     f"dBFS) or unreadable, the last in {source[0].path}; give a --bed-dir with audible background")


def pink_noise(samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples,) float32 pink noise at BED_NOISE_RMS: the bed of the last resort."""
    white = rng.standard_normal(samples)
    spectrum = np.fft.rfft(white)
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))                              # 1/f power: pink
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, samples)
    return (BED_NOISE_RMS * pink / (pink.std() + 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- placing calls

def scale_to_snr(call: np.ndarray, bed_span: np.ndarray, snr_db: float) -> np.ndarray:
    """`call` scaled so that mean(call**2) / mean(bed_span**2) is snr_db (dB); silence stays silence. A
    near-silent bed_span is refused: no SNR over it is audible (bed_for never draws one)."""
    call_power, bed_power = float(np.mean(call.astype(np.float64) ** 2)), float(np.mean(bed_span.astype(np.float64) ** 2))
    if call_power <= 0:
        return call
    if bed_power < 10 ** ((BED_MIN_DBFS - 1) / 10):   # 1 dB below bed_for's check: its sums round otherwise
        raise ValueError(f"the bed where a call lies is near-silent ({10 * math.log10(max(bed_power, 1e-30)):.0f} "
                         f"dBFS): a call at an SNR over it would be inaudible yet labelled")
    return (call * math.sqrt(bed_power * 10 ** (snr_db / 10) / call_power)).astype(np.float32)


def draw_row(species_pieces: dict, settings: PlacementSettings, rng: np.random.Generator) -> list[dict]:
    """What one 5-s row holds: [] or 1..max_calls calls of different species, each with its source,
    offset in the row, SNR and distance and room."""
    if rng.random() < settings.empty_share:
        return []
    species = sorted(species_pieces)
    n_calls = int(rng.integers(1, min(settings.max_calls, len(species)) + 1))
    calls = []
    for code in rng.choice(species, size=n_calls, replace=False):
        name, starts = species_pieces[code][int(rng.integers(len(species_pieces[code])))]
        far = rng.random() < settings.distance_prob
        room = rng.random() < settings.reverb_prob
        calls.append({
            "species": str(code), "source": name, "source_start_s": float(starts[int(rng.integers(len(starts)))]),
            "offset_s": float(rng.uniform(0.0, soundscapes.ROW_SECONDS - settings.call_seconds)),
            "snr_db": float(rng.uniform(*settings.snr_db)),
            "distance_db": float(rng.uniform(*settings.distance_db)) if far else 0.0,
            "lowpass_hz": float(np.exp(rng.uniform(*np.log(settings.distance_lowpass_hz)))) if far else 0.0,
            "rt60_s": float(rng.uniform(*settings.reverb_rt60)) if room else 0.0,
            "room_seed": int(rng.integers(2**63))})
    return calls


def render_call(call: dict, path, bed_span: np.ndarray, settings: PlacementSettings) -> np.ndarray:
    """One placed call's samples: decoded, reverberated, low-passed, then scaled so that its SNR over
    `bed_span` (the bed where it lies) is snr_db + distance_db."""
    samples = audio.read_window(path, call["source_start_s"], settings.call_seconds, settings.sample_rate)
    waveform = torch.from_numpy(samples)[None]                                         # (1, samples)
    if settings.denoise_calls:
        waveform = remove_noise_floor(waveform[0])[None]
    if call["rt60_s"] > 0:
        generator = torch.Generator().manual_seed(call["room_seed"])
        waveform = audio.reverberate(waveform, [call["rt60_s"]], settings.sample_rate, generator)
    if call["lowpass_hz"] > 0:
        waveform = audio.lowpass(waveform, [call["lowpass_hz"]], settings.sample_rate)
    return scale_to_snr(waveform[0].numpy(), bed_span, call["snr_db"] + call["distance_db"])


def remove_noise_floor(waveform: torch.Tensor, n_fft: int = 1024, quantile: float = 0.2, over: float = 3.0,
                      min_gain: float = 0.05) -> torch.Tensor:
    """(samples,) -> the same with its stationary background taken out: per frequency, the `quantile` of
    the piece's STFT magnitudes over time is its noise floor, and each bin keeps 1 - over * floor / |bin|
    of itself (at least min_gain, which limits musical noise). Without it a call piece brings its
    recording's noise (often the very cue a model learnt) into the soundscape with it."""
    if len(waveform) < n_fft:
        return waveform
    window = torch.hann_window(n_fft, dtype=waveform.dtype)
    spectrum = torch.stft(waveform, n_fft, n_fft // 4, window=window, return_complex=True)  # (F, T)
    magnitude = spectrum.abs()
    floor = torch.quantile(magnitude, quantile, dim=1, keepdim=True)                          # (F, 1)
    gain = (1.0 - over * floor / magnitude.clamp_min(1e-12)).clamp(min=min_gain)
    return torch.istft(spectrum * gain, n_fft, n_fft // 4, window=window, length=len(waveform))


def make_soundscape(index: int, species_pieces: dict, paths: dict, beds: list[BedSource],
                    settings: PlacementSettings, secondary: dict | None = None) -> tuple[np.ndarray, list[dict]]:
    """Soundscape `index` -> ((samples,) float32 in [-1, 1], its placements: one dict per call, with the
    source's `secondary` species (space-separated, from `secondary`: source name -> codes), and one per
    empty row with species "")."""
    rng = np.random.default_rng([settings.seed, index])
    rate, rows = settings.sample_rate, int(round(settings.seconds / soundscapes.ROW_SECONDS))
    bed = bed_for(beds, int(rows * soundscapes.ROW_SECONDS * rate), rng, settings)
    mix, placements = bed.astype(np.float64), []
    for row in range(rows):
        calls = draw_row(species_pieces, settings, rng)
        for call in calls:
            start = int(round((row * soundscapes.ROW_SECONDS + call["offset_s"]) * rate))
            under = bed[start:start + int(round(settings.call_seconds * rate))]
            piece = render_call(call, paths[call["source"]], under, settings)
            mix[start:start + len(piece)] += piece
            placements.append({"row": row, **call, "secondary": (secondary or {}).get(call["source"], "")})
        if not calls:
            placements.append({"row": row, "species": ""})
    peak = np.abs(mix).max()
    if peak > 0.99:  # the whole soundscape scaled down together: every SNR stays as drawn
        mix *= 0.99 / peak
    return mix.astype(np.float32), placements


# ----------------------------------------------------------------------------- the command

def build(recordings: pd.DataFrame, out_dir, settings: PlacementSettings, bed_dir=None,
          detections: pd.DataFrame | None = None, vocabulary: list[str] | None = None) -> pd.DataFrame:
    """Write settings.count pseudo-soundscapes of `recordings` (the validation split: name, path,
    duration, primary_label, and `secondary` code lists where known) to out_dir with labels.csv,
    placements.csv and README.txt -> labels. A row holding a call is labelled with its species and the
    source's secondary species of `vocabulary` (default: the recordings' primary labels)."""
    check_placement(settings)
    check_out_dir(out_dir, bed_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = call_pieces(recordings, settings, detections)
    species_pieces = {}
    for name, code in zip(recordings["name"], recordings["primary_label"]):
        if name in pieces:
            species_pieces.setdefault(code, []).append((name, pieces[name]))
    if not species_pieces:
        raise ValueError("no validation recording has a piece to place")
    paths = dict(zip(recordings["name"], recordings["path"]))
    secondary = secondary_species(recordings, vocabulary)
    beds, bed_source, bed_files = background_beds(settings, bed_dir, detections, paths)
    label_rows, placement_rows = [], []
    for index in range(settings.count):
        name = f"pseudo_{index:03d}.ogg"
        mix, placements = make_soundscape(index, species_pieces, paths, beds, settings, secondary)
        write_ogg(out_dir / name, mix, settings.sample_rate)
        placement_rows += [{"file": name, **placement} for placement in placements]
        label_rows += row_labels(name, placements)
    labels = pd.DataFrame(label_rows, columns=["file", "start_s", "end_s", "labels"])
    labels.to_csv(out_dir / "labels.csv", index=False)
    pd.DataFrame(placement_rows).drop(columns=["room_seed"], errors="ignore").to_csv(out_dir / "placements.csv",
                                                                                    index=False)
    (out_dir / BEDS_FILE).write_text("".join(f"{Path(path).resolve()}\n" for path in bed_files))
    write_readme(out_dir, settings, recordings, species_pieces, bed_source, detections is not None)
    log.info("%d pseudo-soundscapes (%d rows, %d empty) from %d validation recordings of %d species over %s -> %s",
             settings.count, len(labels), int((labels["labels"] == "").sum()), len(pieces), len(species_pieces),
             bed_source, out_dir)
    return labels


def secondary_species(recordings: pd.DataFrame, vocabulary: list[str] | None) -> dict[str, str]:
    """Recording name -> its secondary species in the vocabulary, space-separated: they may be heard in
    any piece of it, so a row holding its call is labelled with them too (none without a `secondary` column)."""
    if "secondary" not in recordings.columns:
        return {}
    known = set(vocabulary) if vocabulary is not None else set(recordings["primary_label"])
    return {name: " ".join(dict.fromkeys(code for code in codes if code in known and code != primary))
            for name, primary, codes in zip(recordings["name"], recordings["primary_label"], recordings["secondary"])}


def row_labels(name: str, placements: list[dict]) -> list[dict]:
    """One soundscape's labels.csv rows: each row's placed species and their sources' secondary species."""
    rows = []
    for row in sorted({placement["row"] for placement in placements}):
        codes = set()
        for placement in placements:
            if placement["row"] == row and placement["species"]:
                codes |= {placement["species"], *placement.get("secondary", "").split()}
        start = row * soundscapes.ROW_SECONDS
        rows.append({"file": name, "start_s": start, "end_s": start + soundscapes.ROW_SECONDS,
                     "labels": " ".join(sorted(codes))})
    return rows


# ----------------------------------------------------------------------------- checks before any work

def check_placement(settings: PlacementSettings) -> None:
    """Refuse settings that cannot make soundscapes, naming the flag (before any audio is read)."""
    row, rows = soundscapes.ROW_SECONDS, settings.seconds / soundscapes.ROW_SECONDS
    problems = [
        (settings.count < 1, f"--count {settings.count} must be at least 1"),
        (not (math.isfinite(rows) and rows >= 1 and abs(rows - round(rows)) < 1e-9), f"--seconds {settings.seconds:g} "
         f"must be a whole number of {row:g}-s rows (labels.csv has a line per row)"),
        (settings.sample_rate < audio.MIN_SAMPLE_RATE,
         f"--sample-rate {settings.sample_rate} must be at least {audio.MIN_SAMPLE_RATE}"),
        (settings.max_calls < 1, f"--max-calls {settings.max_calls} must be at least 1"),
        (not 0 < settings.call_seconds <= row,
         f"--call-seconds {settings.call_seconds:g} must lie in (0, {row:g}] (a call stays inside its row)")]
    for flag, share in (("--empty-share", settings.empty_share), ("--call-distance-prob", settings.distance_prob),
                        ("--call-reverb-prob", settings.reverb_prob)):
        problems.append((not 0 <= share <= 1, f"{flag} {share:g} must lie in [0, 1]"))
    for flag, (low, high), floor in (("--snr", settings.snr_db, None),        # each drawn uniformly in [LOW, HIGH]
                                     ("--call-distance-db", settings.distance_db, None),
                                     ("--call-distance-lowpass", settings.distance_lowpass_hz, 0.0),
                                     ("--call-reverb-rt60", settings.reverb_rt60, 0.0)):
        usable = math.isfinite(low) and math.isfinite(high) and (floor is None or floor < low) and low <= high
        problems.append((not usable, f"{flag} {low:g} {high:g} must be LOW HIGH with "
                                     f"{'' if floor is None else f'{floor:g} < '}LOW <= HIGH"))
    for failed, message in problems:
        if failed:
            raise ValueError(message)


def check_out_dir(out, bed_dir=None) -> None:
    """Refuse an --out that holds anything but data.py's bad_files.csv (rewritten by every run): a data
    folder's README.txt would be overwritten, and an old run's pseudo_*.ogg that labels.csv no longer
    lists would stay beside it; and an --out inside --bed-dir, where a later run over that bed would lay
    calls over these soundscapes, which hold calls."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if bed_dir and out.resolve().is_relative_to(Path(bed_dir).resolve()):
        raise ValueError(f"--out {out} lies inside --bed-dir {bed_dir}: a later run over that bed would lay "
                         f"calls over these soundscapes; write them elsewhere")
    held = sorted(path.name for path in out.iterdir() if path.name != "bad_files.csv") if out.is_dir() else []
    if held:
        raise ValueError(f"--out {out} is not empty (it holds {held[0]}{' and more' if len(held) > 1 else ''}): "
                         f"give a new or empty folder, nothing is overwritten")


DETECTION_COLUMNS = ("filename", "start_s", "primary_score")   # what call_pieces reads; top1_score: the bed


def read_detections(path) -> pd.DataFrame:
    """An infer.py --detections table with its columns checked: start_s a number on every row, the
    scores numbers or empty (infer.py leaves primary_score empty for a species its model lacks)."""
    table = pd.read_csv(path, keep_default_na=False, dtype={"filename": str})
    missing = [column for column in DETECTION_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"--detections {path} lacks column(s) {', '.join(missing)} (write it with infer.py "
                         f"--detections)")
    for column in [name for name in ("start_s", "primary_score", "top1_score") if name in table.columns]:
        text = table[column].astype(str).str.strip()
        values = pd.to_numeric(text.where(text != "", "nan"), errors="coerce")
        bad = ~np.isfinite(values) if column == "start_s" else values.isna() & ~text.str.lower().isin(["", "nan"])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"--detections {path} row {row + 2}: {column} {table[column].iloc[row]!r} is not "
                             f"{'a finite number' if column == 'start_s' else 'a number'}")
        table[column] = values
    return table


def write_ogg(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    with sf.SoundFile(path, "w", sample_rate, 1, format="OGG", subtype="VORBIS") as handle:
        for block in range(0, len(waveform), sample_rate):  # blocks: libsndfile's Vorbis encoder crashes on huge writes
            handle.write(waveform[block:block + sample_rate])


def write_readme(out_dir: Path, settings: PlacementSettings, recordings, species_pieces, bed_source: str,
                 from_detections: bool) -> None:
    lines = [
        "Pseudo-soundscapes written by `python data.py soundscapes` (pseudo_soundscapes.py).",
        "",
        f"Calls: {settings.call_seconds:g}-s pieces of the {len(recordings)} validation-split recordings "
        f"({len(species_pieces)} species), only the validation split: no training recording is used.",
        "Which piece: " + ("the best-scoring windows of the --detections table." if from_detections else
                           f"the loudest pieces in {BIRD_BAND_HZ[0]:g}-{BIRD_BAND_HZ[1]:g} Hz of each recording."),
        f"Bed: {bed_source} (files listed in {BEDS_FILE}; keep them out of training's --bg-dir and "
        f"--nocall-audio).",
        "labels.csv: file,start_s,end_s,labels (space-separated species: each call's, and its recording's "
        "secondary species; empty = no call), for train.py --val-soundscapes. placements.csv: every call with "
        "its source recording, offset in the row, SNR, distance gain and low-pass cutoff, RT60 (0 = none) and "
        "secondary species.",
        "",
        "Settings:",
        *[f"  {key}: {value}" for key, value in asdict(settings).items()],
    ]
    (out_dir / "README.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- `python data.py soundscapes`

@dataclass(frozen=True)
class SoundscapesCommand:
    """`python data.py soundscapes`, parsed, but for --data-dir and the split flags (data.py reads the
    recordings and draws the split, and hands `run` the validation recordings)."""
    out: str
    placement: PlacementSettings
    bed_dir: str | None           # --bed-dir: audio laid under the calls
    detections: str | None        # --detections: infer.py --detections table of the training audio


def add_command(subparsers) -> None:
    """The `soundscapes` subcommand of data.py: --data-dir, --seed and the split flags are train.py's own
    (cli.py), since the calls must come from the validation split train.py draws; the placement flags'
    defaults are PlacementSettings'."""
    parser = subparsers.add_parser("soundscapes", help="labelled pseudo-soundscapes from the validation split's "
                                   "recordings, for train.py --val-soundscapes DIR/labels.csv",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_data_dir(parser)
    parser.add_argument("--out", required=True, help="folder to write (soundscapes, labels.csv, placements.csv)")
    cli.add_seed(parser, "the split's seed: as train.py --seed")
    cli.add_split_flags(parser)
    parser.add_argument("--bed-dir", default=None, help="background audio to lay the calls over (e.g. 2024's "
                        "unlabeled_soundscapes/, no-call parts of 2021/2022 soundscapes, a noise collection)")
    # --bg-dir is train.py's augmentation audio; here it named the bed, and still does
    parser.add_argument("--bg-dir", dest="bed_dir", action=cli.Deprecated, new="--bed-dir")
    parser.add_argument("--detections", default=None, help="infer.py --detections table of the training audio: "
                        "calls come from each recording's best windows, the bed (without --bed-dir) from the "
                        "quietest")
    add_placement_flags(parser)


def add_placement_flags(parser) -> None:
    """How calls are placed; the defaults are PlacementSettings' (its one definition)."""
    defaults = PlacementSettings()
    parser.add_argument("--count", type=int, default=defaults.count, help="soundscapes to write")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="length of each soundscape")
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate, help="of the written soundscapes")
    parser.add_argument("--empty-share", type=float, default=defaults.empty_share, help="share of rows without a call")
    parser.add_argument("--max-calls", type=int, default=defaults.max_calls,
                        help="calls of different species in one row, at most")
    parser.add_argument("--call-seconds", type=float, default=defaults.call_seconds, help="length of each call")
    parser.add_argument("--snr", type=float, nargs=2, default=list(defaults.snr_db), metavar=("LOW", "HIGH"),
                        help="SNR of a call over the bed where it lies, in dB, before the distance gain")
    add_call_flag(parser, "distance-prob", type=float, default=defaults.distance_prob,
                  help="share of calls heard from a distance (a gain and a low-pass)")
    add_call_flag(parser, "distance-db", type=float, nargs=2, default=list(defaults.distance_db),
                  metavar=("LOW", "HIGH"), help="gain of a distant call in dB")
    add_call_flag(parser, "distance-lowpass", type=float, nargs=2, default=list(defaults.distance_lowpass_hz),
                  metavar=("LOW_HZ", "HIGH_HZ"), help="low-pass cutoff of a distant call (log-uniform)")
    add_call_flag(parser, "reverb-prob", type=float, default=defaults.reverb_prob, help="share of calls reverberated")
    add_call_flag(parser, "reverb-rt60", type=float, nargs=2, default=list(defaults.reverb_rt60),
                  metavar=("LOW", "HIGH"), help="reverberation time range in seconds")
    parser.add_argument("--placement-seed", type=int, default=defaults.seed,
                        help="seed of every placement (the split has --seed)")
    parser.add_argument("--denoise-calls", action="store_true",
                        help="take each call piece's own noise floor out first (spectral subtraction), so a "
                             "call does not bring its recording's background into the soundscape")


def add_call_flag(parser, name: str, **kwargs) -> None:
    """--call-NAME, and its old spelling --NAME: train.py's --NAME is an augmentation of training crops
    with another default, so the same spelling here meant something else."""
    new = f"--call-{name}"
    parser.add_argument(new, **kwargs)
    dest = new[2:].replace("-", "_")
    old_kwargs = {key: value for key, value in kwargs.items() if key in ("type", "nargs", "metavar")}
    parser.add_argument(f"--{name}", dest=dest, action=cli.Deprecated, new=new, **old_kwargs)


def command_from_args(args: argparse.Namespace) -> SoundscapesCommand:
    placement = PlacementSettings(
        count=args.count, seconds=args.seconds, sample_rate=args.sample_rate, empty_share=args.empty_share,
        max_calls=args.max_calls, call_seconds=args.call_seconds, snr_db=tuple(args.snr),
        distance_prob=args.call_distance_prob, distance_db=tuple(args.call_distance_db),
        distance_lowpass_hz=tuple(args.call_distance_lowpass), reverb_prob=args.call_reverb_prob,
        reverb_rt60=tuple(args.call_reverb_rt60), seed=args.placement_seed, denoise_calls=args.denoise_calls)
    command = SoundscapesCommand(out=args.out, placement=placement, bed_dir=args.bed_dir, detections=args.detections)
    check_command(command)      # here: data.py creates --out and reads the data right after
    return command


def check_command(command: SoundscapesCommand) -> None:
    """Refuse, before any work or writing, what `run` could only refuse later: a flag's value, an --out
    that is not empty or lies in --bed-dir, a --bed-dir that is no folder, a --detections table's columns."""
    check_placement(command.placement)
    check_out_dir(command.out, command.bed_dir)
    if command.bed_dir and not Path(command.bed_dir).is_dir():
        raise ValueError(f"--bed-dir {command.bed_dir} is not a folder")
    if command.detections:
        read_detections(command.detections)


def run(recordings: pd.DataFrame, command: SoundscapesCommand, vocabulary: list[str] | None = None) -> pd.DataFrame:
    """`python data.py soundscapes` once data.py has read the validation `recordings` (name, path,
    duration, primary_label, secondary) and the `vocabulary` -> labels."""
    detections = read_detections(command.detections) if command.detections else None
    return build(recordings, command.out, command.placement, command.bed_dir, detections, vocabulary)
