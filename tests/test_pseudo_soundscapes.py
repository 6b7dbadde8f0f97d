"""Tests for pseudo_soundscapes.py and `python data.py soundscapes`: only validation recordings, labels
equal to the placements, deterministic, each call at the drawn SNR plus distance gain (measured from
the mixture minus the bed), and a table train.py --val-soundscapes reads as it is."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import quick_args, quick_settings, tone_recording

import audio
import data
import pseudo_soundscapes
import soundscapes
import train


def build(tiny_data, out, *extra):
    data.main(["soundscapes", "--data-dir", str(tiny_data), "--out", str(out), "--count", "3", "--seconds", "30",
               "--sample-rate", "16000", "--call-seconds", "2", *extra])
    placements = pd.read_csv(out / "placements.csv")
    placements["species"] = placements["species"].fillna("")        # a row without a call
    return pd.read_csv(out / "labels.csv", keep_default_na=False), placements


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pseudo")
    labels, placements = build(tiny_data, out)
    return out, labels, placements


def test_only_the_validation_split_supplies_calls(tiny_data, built, tmp_path):
    _, _, placements = built
    sources = set(placements.loc[placements["species"] != "", "source"])
    # the split train.py makes for the same --seed, read through train.py's own data path
    _, train_set, val_set = data.build_datasets(quick_settings(tiny_data, tmp_path / "run").data, tmp_path)
    root = (tiny_data / "train_audio").resolve()
    validation = {Path(path).relative_to(root).as_posix() for path in val_set.paths}
    training = {Path(path).relative_to(root).as_posix() for path in train_set.paths}
    assert sources and sources <= validation and not sources & training
    # another split seed, another set of sources: the split follows --seed
    _, other = build(tiny_data, tmp_path / "seed7", "--seed", "7")
    _, _, val_7 = data.build_datasets(quick_settings(tiny_data, tmp_path / "run7", "--seed", "7").data, tmp_path)
    names_7 = {Path(path).relative_to(root).as_posix() for path in val_7.paths}
    assert set(other.loc[other["species"] != "", "source"]) <= names_7


def test_labels_are_the_placements_row_by_row(built):
    out, labels, placements = built
    assert len(labels) == 3 * 6 and list(labels.columns) == ["file", "start_s", "end_s", "labels"]
    for (name, row), group in placements.groupby(["file", "row"]):
        placed = sorted(set(group["species"]) - {""})
        line = labels[(labels["file"] == name) & (labels["start_s"] == row * 5.0)]
        assert len(line) == 1 and line["labels"].iloc[0] == " ".join(placed)
        assert line["end_s"].iloc[0] == row * 5.0 + 5.0
    calls = placements[placements["species"] != ""]
    assert ((calls["offset_s"] >= 0) & (calls["offset_s"] + 2 <= 5)).all()       # each call inside its row
    assert 0 < (labels["labels"] == "").sum() < len(labels)                        # some rows without a call
    # what --val-soundscapes reads: every row, and exactly these species
    species = sorted(set(calls["species"]))
    targets = soundscapes.read_labels(out / "labels.csv", species)
    for row_id, labels_of_row in zip(targets.index, targets.to_numpy()):
        stem, end = row_id.rsplit("_", 1)
        line = labels[(labels["file"] == f"{stem}.ogg") & (labels["end_s"] == float(end))]
        assert sorted(np.array(species)[labels_of_row == 1]) == sorted(line["labels"].iloc[0].split())


def test_the_same_seed_makes_the_same_soundscapes(tiny_data, built, tmp_path):
    out, labels, placements = built
    again_labels, again_placements = build(tiny_data, tmp_path / "again")
    pd.testing.assert_frame_equal(labels, again_labels)
    pd.testing.assert_frame_equal(placements, again_placements)
    for name in labels["file"].unique():
        np.testing.assert_array_equal(sf.read(out / name)[0], sf.read(tmp_path / "again" / name)[0])
    _, other = build(tiny_data, tmp_path / "other", "--placement-seed", "1")
    assert not placements.equals(other)
    assert "Settings:" in (out / "README.txt").read_text() and "validation" in (out / "README.txt").read_text()


def test_each_call_is_at_its_snr_plus_distance_gain_within_half_a_db(tmp_path):
    """Measured from the mixture minus the bed, over each row holding a single call."""
    rate = 16000
    paths = {}
    for index, frequency in enumerate((900.0, 2500.0, 5000.0)):
        paths[f"sp{index}/XC{index}.wav"] = tmp_path / f"{index}.wav"
        sf.write(paths[f"sp{index}/XC{index}.wav"], tone_recording(frequency, 6.0, rate, np.random.default_rng(index)),
                 rate)
    species_pieces = {f"sp{index}": [(f"sp{index}/XC{index}.wav", [0.5, 2.0])] for index in range(3)}
    settings = pseudo_soundscapes.PlacementSettings(
        count=1, seconds=60, sample_rate=rate, empty_share=0.0, max_calls=1, call_seconds=2.0, snr_db=(-6.0, 10.0),
        distance_prob=0.5, distance_db=(-10.0, 0.0), distance_lowpass_hz=(1500.0, 6000.0), reverb_prob=0.5)
    noise = 0.02 * np.random.default_rng(9).standard_normal(rate * 20).astype(np.float32)
    sf.write(tmp_path / "bed.wav", noise, rate, subtype="FLOAT")                      # read back exactly
    beds = [(pseudo_soundscapes.BedSpan(str(tmp_path / "bed.wav"), len(noise)),)]
    mix, placements = pseudo_soundscapes.make_soundscape(0, species_pieces, paths, beds, settings)
    # the bed make_soundscape laid, read lazily: its generator's first draws (the file, the start) applied
    # to the whole noise, wrapping round
    rng = np.random.default_rng([settings.seed, 0])
    rng.integers(1)
    bed = np.resize(np.roll(noise, -int(rng.integers(len(noise)))), len(mix))
    residual = mix.astype(np.float64) - bed
    for placement in placements:
        start = int(round((placement["row"] * 5 + placement["offset_s"]) * rate))
        span = slice(start, start + 2 * rate)
        level = 10 * np.log10((residual[span] ** 2).mean() / (bed[span].astype(np.float64) ** 2).mean())
        assert level == pytest.approx(placement["snr_db"] + placement["distance_db"], abs=0.5)
    assert {p["lowpass_hz"] > 0 for p in placements} == {True, False}                 # some calls far, some near
    assert {p["rt60_s"] > 0 for p in placements} == {True, False}


def test_without_a_bed_it_uses_coloured_noise_and_says_so(built):
    out, _, _ = built
    assert "coloured noise" in (out / "README.txt").read_text()


def test_soundscape_style_training_with_extras_validates_on_the_pseudo_soundscapes(tiny_data, built, tmp_path):
    """Every soundscape-style lever at once, with detector-built extras, monitored on the pseudo-soundscapes."""
    out, labels, _ = built
    table = data.read_metadata(tiny_data)
    pd.DataFrame({"filename": table["filename"].head(6), "start_s": 0.0}).to_csv(tmp_path / "extras.csv", index=False)
    background = tmp_path / "beds"
    background.mkdir()
    sf.write(background / "bed.wav", 0.05 * np.random.default_rng(0).standard_normal(16000 * 4).astype("float32"),
             16000)
    state = train.main(quick_args(
        tiny_data, tmp_path / "run", "--epochs", "1", "--extras", str(tmp_path / "extras.csv"), "--extras-chunk", "4",
        "--mix-prob", "1", "--distance-prob", "0.5", "--reverb-prob", "0.5", "--bg-dir", str(background),
        "--bg-prob", "1", "--bg-snr", "-3", "12", "--val-soundscapes", str(out / "labels.csv"),
        "--monitor", "soundscape_cmap5"))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics) == 2 and metrics["soundscape_cmap5"].between(0, 1).all()
    assert state.best_metric == metrics["soundscape_cmap5"].max()


def test_a_detections_bed_takes_only_windows_the_detector_calls_empty(tmp_path):
    """The quietest window of a recording is a bed only if its best score is below BED_MAX_SCORE: else it
    may hold an unlabelled call, and the bed falls back to coloured noise. A digitally silent window (z.wav,
    all zeros) is no bed either: a call's SNR over it has no level."""
    rate = 16000
    for name, seed in (("a.wav", 1), ("b.wav", 2)):
        sf.write(tmp_path / name, tone_recording(2000.0, 12.0, rate, np.random.default_rng(seed)), rate)
    sf.write(tmp_path / "z.wav", np.zeros(12 * rate, np.float32), rate)
    paths = {name: tmp_path / name for name in ("a.wav", "b.wav", "z.wav")}
    detections = pd.DataFrame({"filename": ["a.wav", "a.wav", "b.wav", "b.wav", "z.wav"],
                               "start_s": [0.0, 5.0, 0.0, 5.0, 0.0], "top1_score": [0.9, 0.01, 0.6, 0.3, 0.0]})
    settings = pseudo_soundscapes.PlacementSettings(sample_rate=rate)
    beds, source, files = pseudo_soundscapes.background_beds(settings, None, detections, paths)
    assert files == [] and source.startswith("the quietest window of 1 recording")            # a.wav at 5 s; b.wav has none
    assert [[(span.path, span.start_s, span.samples) for span in bed] for bed in beds] == [[(str(paths["a.wav"]), 5.0,
                                                                                            5 * rate)]]
    beds, source, _ = pseudo_soundscapes.background_beds(settings, None,
                                                         detections[detections["filename"] == "b.wav"], paths)
    assert beds == [] and source.startswith("coloured noise")


@pytest.mark.parametrize("settings, flag", [({"call_seconds": 6.0}, "--call-seconds"),
                                            ({"call_seconds": 0.0}, "--call-seconds"), ({"max_calls": 0}, "--max-calls")])
def test_calls_that_cannot_stay_in_their_row_are_refused(tmp_path, settings, flag):
    with pytest.raises(ValueError, match=flag):
        pseudo_soundscapes.build(pd.DataFrame(), tmp_path, pseudo_soundscapes.PlacementSettings(**settings))


def test_training_on_the_pseudo_soundscapes_bed_is_warned_about(tiny_data, tmp_path, caplog):
    """beds.txt lists the --bed-dir files laid under the calls; a run whose --bg-dir, --nocall-audio or
    --nocall-soundscapes audio is among them is warned (its pseudo-soundscape score would flatter it); a split
    folder is not."""
    beds, other = tmp_path / "beds", tmp_path / "other"
    for folder, seed in ((beds, 1), (other, 2)):
        folder.mkdir()
        sf.write(folder / "site.wav", 0.05 * np.random.default_rng(seed).standard_normal(16000 * 10).astype("float32"),
                 16000)
    out = tmp_path / "pseudo"
    build(tiny_data, out, "--bed-dir", str(beds))
    assert (out / "beds.txt").read_text().split() == [str((beds / "site.wav").resolve())]
    pd.DataFrame({"file": ["site.wav"], "start_s": [0], "end_s": [5], "labels": [""]}).to_csv(beds / "rows.csv",
                                                                                              index=False)
    cases = {("--bg-dir", beds): 1, ("--bg-dir", other): 0,
             ("--bg-dir", other, "--nocall", "--nocall-soundscapes", beds / "rows.csv"): 1,
             ("--bg-dir", other, "--nocall", "--nocall-audio", beds): 1,
             ("--bg-dir", other, "--nocall", "--nocall-audio", other): 0}
    for flags, warned in cases.items():
        caplog.clear()
        settings = quick_settings(tiny_data, tmp_path / "run", "--val-soundscapes", str(out / "labels.csv"),
                                  *map(str, flags))
        data.build_datasets(settings.data, tmp_path)
        assert len([r for r in caplog.records if "bed of the pseudo-soundscapes" in r.getMessage()]) == warned, flags


# ----------------------------------------------------------------------------- the command line

CALL_FLAGS = {"--distance-prob": ["0.9"], "--distance-db": ["-6", "-1"], "--distance-lowpass": ["2000", "9000"],
              "--reverb-prob": ["0.7"], "--reverb-rt60": ["0.4", "0.8"]}


def parse_soundscapes(folder: Path, *flags) -> pseudo_soundscapes.SoundscapesCommand:
    """The command as data.py's main gets it, with --out a new folder below `folder` (an --out that is not
    empty is refused while parsing)."""
    args = data.get_args_parser().parse_args(["soundscapes", "--out", str(folder / "pseudo"), *flags])
    return pseudo_soundscapes.command_from_args(args)


def test_old_spellings_of_the_soundscapes_flags_still_work_and_say_which_to_use(tmp_path, caplog):
    """--bg-dir is the bed (now --bed-dir) and --distance-*/--reverb-* the placed calls' (now --call-*):
    train.py's flags of those names are augmentation, with other defaults."""
    bed = tmp_path / "bed"
    bed.mkdir()
    new = ["--bed-dir", str(bed)] + [text for flag, values in CALL_FLAGS.items()
                                          for text in (f"--call-{flag[2:]}", *values)]
    old = ["--bg-dir", str(bed)] + [text for flag, values in CALL_FLAGS.items() for text in (flag, *values)]
    with caplog.at_level("WARNING", logger="birdclef"):
        assert parse_soundscapes(tmp_path, *old) == parse_soundscapes(tmp_path, *new)
    warnings = [record.getMessage() for record in caplog.records]
    assert "--bg-dir is deprecated: use --bed-dir" in warnings
    assert {f"{flag} is deprecated: use --call-{flag[2:]}" for flag in CALL_FLAGS} <= set(warnings)
    assert len(warnings) == 1 + len(CALL_FLAGS)                             # only the old spellings warn
    placement = parse_soundscapes(tmp_path, *new).placement
    assert (placement.distance_prob, placement.distance_db, placement.distance_lowpass_hz, placement.reverb_prob,
            placement.reverb_rt60) == (0.9, (-6.0, -1.0), (2000.0, 9000.0), 0.7, (0.4, 0.8))
    assert parse_soundscapes(tmp_path, *new).bed_dir == str(bed)


def test_the_soundscapes_defaults_are_the_placement_settings(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="birdclef"):
        command = parse_soundscapes(tmp_path)
    assert command.placement == pseudo_soundscapes.PlacementSettings() and command.bed_dir is None
    assert not caplog.records


def test_remove_noise_floor_takes_out_stationary_noise_and_keeps_the_call():
    """White noise with a 0.5-s tone: the noise where the tone is absent falls by >= 15 dB, the tone's own
    power changes by < 1 dB (measured against the input, sample by sample)."""
    rate = 32000
    time = np.arange(3 * rate) / rate
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(time))
    tone = np.where((time > 1.0) & (time < 1.5), 0.3 * np.sin(2 * np.pi * 3000 * time), 0.0)
    cleaned = pseudo_soundscapes.remove_noise_floor(torch.tensor(noise + tone, dtype=torch.float32)).numpy()
    quiet, call = (time < 0.8) | (time > 1.7), (time > 1.1) & (time < 1.4)
    assert 10 * np.log10(np.mean(noise[quiet] ** 2) / np.mean(cleaned[quiet] ** 2)) >= 15
    assert abs(10 * np.log10(np.mean(cleaned[call] ** 2) / np.mean((noise + tone)[call] ** 2))) < 1


def test_denoise_calls_changes_the_sound_but_not_the_placements(tiny_data, built, tmp_path):
    out, labels, placements = built
    denoised_labels, denoised_placements = build(tiny_data, tmp_path / "denoised", "--denoise-calls")
    pd.testing.assert_frame_equal(denoised_labels, labels)
    pd.testing.assert_frame_equal(denoised_placements, placements)
    assert "denoise_calls: True" in (tmp_path / "denoised" / "README.txt").read_text()
    with_call = placements.loc[placements["species"] != "", "file"].iloc[0]
    assert not np.array_equal(sf.read(out / with_call)[0], sf.read(tmp_path / "denoised" / with_call)[0])


# ----------------------------------------------------------------------------- what is refused, and when

def folder_state(folder: Path) -> dict:
    """Every file below `folder` -> its bytes: what a refused run must leave as it found it."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_an_out_that_is_not_empty_or_lies_in_the_bed_is_refused_before_anything_is_written(tiny_data, tmp_path):
    """--out at the data folder would overwrite its README.txt; a reused --out would keep the old run's
    pseudo_*.ogg beside a labels.csv that no longer lists them; an --out inside --bed-dir would be the
    next run's bed (soundscapes holding calls)."""
    data_copy = tmp_path / "data"
    shutil.copytree(tiny_data, data_copy)
    (data_copy / "README.txt").write_text("the data set's own readme\n")
    before = folder_state(data_copy)
    with pytest.raises(ValueError, match=f"--out {re.escape(str(data_copy))} is not empty"):
        build(data_copy, data_copy)
    assert folder_state(data_copy) == before
    out = tmp_path / "pseudo"
    build(tiny_data, out)
    before = folder_state(out)
    with pytest.raises(ValueError, match="--out .* is not empty"):
        build(tiny_data, out, "--count", "1")
    assert folder_state(out) == before
    beds = tmp_path / "beds"
    beds.mkdir()
    sf.write(beds / "site.wav", 0.05 * np.random.default_rng(0).standard_normal(16000 * 40).astype("float32"), 16000)
    for inside in (beds, beds / "pseudo"):
        with pytest.raises(ValueError, match="lies inside --bed-dir"):
            build(tiny_data, inside, "--bed-dir", str(beds))
    assert sorted(path.name for path in beds.iterdir()) == ["site.wav"]
    # what data.py leaves in --out when a run stops after reading the recordings does not block the next
    (tmp_path / "retry").mkdir()
    (tmp_path / "retry" / "bad_files.csv").write_text("path,reason\n")
    pseudo_soundscapes.check_out_dir(tmp_path / "retry")


@pytest.mark.parametrize("flags", [("--seconds", "2"), ("--seconds", "7"), ("--seconds", "0"), ("--snr", "12", "-3"),
                                   ("--count", "-3"), ("--count", "0"), ("--empty-share", "1.5"),
                                   ("--call-distance-prob", "-0.1"), ("--call-distance-db", "0", "-6"),
                                   ("--call-distance-lowpass", "0", "8000"), ("--call-reverb-rt60", "1", "nan"),
                                   ("--sample-rate", "0")], ids=" ".join)
def test_a_flag_that_cannot_make_soundscapes_is_refused_naming_it_before_any_work(tiny_data, tmp_path, flags):
    out = tmp_path / "pseudo"
    with pytest.raises(ValueError, match=f"^{flags[0]} "):
        build(tiny_data, out, *flags)
    assert not out.exists()                                          # refused before data.py creates --out


def write_bed_file(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), rate, subtype="FLOAT")
    return path


def noise_bed(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    return 0.05 * np.random.default_rng(seed).standard_normal(int(seconds * rate))


def test_unreadable_or_empty_bed_files_are_skipped_naming_each_and_none_usable_is_one_error(tiny_data, tmp_path,
                                                                                          caplog):
    beds = tmp_path / "beds"
    write_bed_file(beds / "good.wav", noise_bed(40, 1))
    write_bed_file(beds / "no_frames.wav", np.zeros(0))
    (beds / "zero_bytes.ogg").write_bytes(b"")
    (beds / "corrupt.flac").write_bytes(np.random.default_rng(0).bytes(5000))
    with caplog.at_level("WARNING", logger="birdclef"):
        build(tiny_data, tmp_path / "pseudo", "--bed-dir", str(beds))
    warnings = " ".join(record.getMessage() for record in caplog.records)
    for name in ("no_frames.wav", "zero_bytes.ogg", "corrupt.flac"):
        assert str(beds / name) in warnings
    assert (tmp_path / "pseudo" / "beds.txt").read_text().split() == [str((beds / "good.wav").resolve())]
    (beds / "good.wav").unlink()
    with pytest.raises(ValueError, match=f"^--bed-dir {re.escape(str(beds))}: none of its 3 audio file"):
        build(tiny_data, tmp_path / "again", "--bed-dir", str(beds))


def test_a_digitally_silent_bed_is_refused_and_a_silent_file_beside_others_is_skipped(tiny_data, tmp_path, caplog):
    """All-zero bed audio has no level to scale a call's SNR to: such calls were written at about -131 dBFS
    and labelled. Measured on the written soundscapes: no 2-s stretch (a call's length) is near-silent."""
    silent = tmp_path / "silent"
    write_bed_file(silent / "zeros.wav", np.zeros(16000 * 40))
    with pytest.raises(ValueError, match="no usable bed.*near-silent"):
        build(tiny_data, tmp_path / "over_silence", "--bed-dir", str(silent))
    mixed = tmp_path / "mixed"
    write_bed_file(mixed / "zeros.wav", np.zeros(16000 * 40))
    write_bed_file(mixed / "site.wav", noise_bed(40, 2))
    with caplog.at_level("WARNING", logger="birdclef"):
        labels, _ = build(tiny_data, tmp_path / "pseudo", "--bed-dir", str(mixed), "--count", "6")
    assert any(str(mixed / "zeros.wav") in record.getMessage() and "near-silent" in record.getMessage()
               for record in caplog.records)
    for name in labels["file"].unique():
        mix = sf.read(tmp_path / "pseudo" / name)[0]
        energy = np.concatenate([[0.0], np.cumsum(mix ** 2)])
        power = (energy[2 * 16000:] - energy[:-2 * 16000]) / (2 * 16000)
        assert 10 * np.log10(power.min()) > -60, name          # the bed is 0.05 RMS: about -26 dBFS
    with pytest.raises(ValueError, match="near-silent"):
        pseudo_soundscapes.scale_to_snr(np.ones(100, np.float32), np.zeros(100, np.float32), 0.0)


def test_a_detections_table_with_missing_columns_or_bad_values_is_a_one_line_error(tiny_data, tmp_path):
    table = data.read_metadata(tiny_data)
    names = [Path(path).relative_to(tiny_data / "train_audio").as_posix() for path in table["path"]]
    good = pd.DataFrame({"filename": names, "start_s": 0.0, "primary_score": 0.9, "top1_score": 0.9})
    good.loc[1, "primary_score"] = np.nan           # infer.py leaves it empty for a species its model lacks
    good.to_csv(tmp_path / "good.csv", index=False)
    build(tiny_data, tmp_path / "pseudo", "--detections", str(tmp_path / "good.csv"))
    cases = {"no start_s": (good.drop(columns=["start_s"]), "lacks column.*start_s"),
             "NaN time": (good.assign(start_s=[0.0, np.nan] + [0.0] * (len(good) - 2)), "row 3: start_s '' is not"),
             "text score": (good.assign(primary_score=["high"] + [0.5] * (len(good) - 1)), "row 2: primary_score 'high'")}
    for case, (broken, message) in cases.items():
        broken.to_csv(tmp_path / "broken.csv", index=False)
        with pytest.raises(ValueError, match=f"^--detections {re.escape(str(tmp_path / 'broken.csv'))}.*{message}"):
            build(tiny_data, tmp_path / case, "--detections", str(tmp_path / "broken.csv"))
        assert not (tmp_path / case).exists(), case


def test_a_detections_table_without_a_quiet_window_says_so(tmp_path, caplog):
    rate = 16000
    sf.write(tmp_path / "a.wav", tone_recording(2000.0, 12.0, rate, np.random.default_rng(1)), rate)
    detections = pd.DataFrame({"filename": ["a.wav", "a.wav"], "start_s": [0.0, 5.0], "top1_score": [0.9, 0.6]})
    with caplog.at_level("WARNING", logger="birdclef"):
        beds, source, _ = pseudo_soundscapes.background_beds(pseudo_soundscapes.PlacementSettings(sample_rate=rate),
                                                             None, detections, {"a.wav": tmp_path / "a.wav"})
    assert beds == [] and "no --bed-dir" not in source
    assert "no window of the --detections table" in source and "top1_score below 0.05" in source
    assert any("no window of the --detections table" in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------- the bed, read lazily

def test_a_bed_span_read_alone_is_the_same_samples_as_the_whole_file_decoded(tmp_path):
    """At the file's own rate and through each resampling ratio the bed meets (44.1 k stereo, 48 k, 22.05 k):
    what audio.read_audio gives for the whole file, also at its ends and past them (zeros), to float32
    rounding (the resampler's convolution over another input length may sum in another order: 1.5e-8
    seen on a 2-core CI-like machine; a sample off by one would differ by ~0.1 here)."""
    rng = np.random.default_rng(0)
    files = {"same.ogg": (32000, 1), "cd.flac": (44100, 2), "dat.wav": (48000, 1), "half.ogg": (22050, 1)}
    for name, (rate, channels) in files.items():
        sf.write(tmp_path / name, 0.1 * rng.standard_normal((rate * 7, channels)).astype(np.float32), rate)
        whole = audio.read_audio(tmp_path / name, 32000)
        spans = [(0, 5000), (len(whole) - 3000, 3000), (len(whole) - 100, 600)]
        spans += [(int(first), int(count)) for first, count in zip(rng.integers(len(whole), size=6),
                                                                    rng.integers(1, 90000, size=6))]
        for first, count in spans:
            expected = np.pad(whole[first:first + count], (0, max(first + count - len(whole), 0)))
            np.testing.assert_allclose(pseudo_soundscapes.read_file_samples(str(tmp_path / name), first, count,
                                                                            32000), expected, rtol=0, atol=1e-6,
                                       err_msg=name)


def test_the_bed_folder_is_not_decoded_whole(tiny_data, tmp_path, monkeypatch):
    """Frames decoded from --bed-dir files while building 2 soundscapes of 30 s over 3 files of 60 s: about
    the 60 s the soundscapes lie on (plus the resampler's margins), not the folder's 180 s."""
    beds = tmp_path / "beds"
    for index in range(3):
        write_bed_file(beds / f"site{index}.wav", noise_bed(60, index, rate=22050), rate=22050)
    decoded, read = [], sf.SoundFile.read

    def counting_read(handle, *args, **kwargs):
        block = read(handle, *args, **kwargs)
        if Path(handle.name).parent == beds:
            decoded.append(len(block))
        return block

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    build(tiny_data, tmp_path / "pseudo", "--bed-dir", str(beds), "--count", "2")
    assert 60 <= sum(decoded) / 22050 < 62


# ----------------------------------------------------------------------------- secondary species

def test_a_recordings_secondary_species_is_labelled_where_its_call_lies(tiny_data, tmp_path):
    """Every aaabbb1 recording lists cccddd1 (in the vocabulary) and zzzzzz1 (not): a row holding an aaabbb1
    call is labelled cccddd1 too, no row zzzzzz1; reference: the placements and the metadata."""
    data_copy = tmp_path / "data"
    shutil.copytree(tiny_data, data_copy)
    metadata = pd.read_csv(data_copy / "train_metadata.csv")
    metadata.loc[metadata["primary_label"] == "aaabbb1", "secondary_labels"] = "['cccddd1', 'zzzzzz1']"
    metadata.to_csv(data_copy / "train_metadata.csv", index=False)
    labels, placements = build(data_copy, tmp_path / "pseudo", "--count", "4")
    lone = 0
    for (name, row), group in placements.groupby(["file", "row"]):
        species = set(group["species"]) - {""}
        expected = species | ({"cccddd1"} if "aaabbb1" in species else set())
        line = labels[(labels["file"] == name) & (labels["start_s"] == row * 5.0)]["labels"].iloc[0]
        assert set(line.split()) == expected, (name, row)
        lone += species == {"aaabbb1"}
    assert lone > 0                                  # some row's cccddd1 comes from the secondary label alone
