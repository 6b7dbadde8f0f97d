"""Tests for pseudo_soundscapes.py and `python data.py soundscapes`: only validation recordings, labels
equal to the placements, deterministic, each call at the drawn SNR plus distance gain (measured from
the mixture minus the bed), and a table train.py --val-soundscapes reads as it is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import quick_args, quick_settings, tone_recording

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
    beds = [0.02 * np.random.default_rng(9).standard_normal(rate * 20).astype(np.float32)]
    mix, placements = pseudo_soundscapes.make_soundscape(0, species_pieces, paths, beds, settings)
    # the bed make_soundscape laid: its generator's first draws
    bed = pseudo_soundscapes.bed_for(beds, len(mix), np.random.default_rng([settings.seed, 0]))
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
    may hold an unlabelled call, and the bed falls back to coloured noise."""
    rate = 16000
    for name, seed in (("a.wav", 1), ("b.wav", 2)):
        sf.write(tmp_path / name, tone_recording(2000.0, 12.0, rate, np.random.default_rng(seed)), rate)
    paths = {"a.wav": tmp_path / "a.wav", "b.wav": tmp_path / "b.wav"}
    detections = pd.DataFrame({"filename": ["a.wav", "a.wav", "b.wav", "b.wav"], "start_s": [0.0, 5.0, 0.0, 5.0],
                               "top1_score": [0.9, 0.01, 0.6, 0.3]})
    settings = pseudo_soundscapes.PlacementSettings(sample_rate=rate)
    beds, source, files = pseudo_soundscapes.background_beds(settings, None, detections, paths)
    assert files == [] and source.startswith("the quietest window of 1 recording")            # a.wav at 5 s; b.wav has none
    assert len(beds) == 1 and len(beds[0]) == 5 * rate
    beds, source, _ = pseudo_soundscapes.background_beds(settings, None,
                                                         detections[detections["filename"] == "b.wav"], paths)
    assert beds == [] and source.startswith("coloured noise")


@pytest.mark.parametrize("settings", [{"call_seconds": 6.0}, {"call_seconds": 0.0}, {"max_calls": 0}])
def test_calls_that_cannot_stay_in_their_row_are_refused(tmp_path, settings):
    with pytest.raises(ValueError, match="--call-seconds"):
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


def parse_soundscapes(*flags) -> pseudo_soundscapes.SoundscapesCommand:
    args = data.get_args_parser().parse_args(["soundscapes", "--out", "pseudo", *flags])
    return pseudo_soundscapes.command_from_args(args)


def test_old_spellings_of_the_soundscapes_flags_still_work_and_say_which_to_use(tmp_path, caplog):
    """--bg-dir is the bed (now --bed-dir) and --distance-*/--reverb-* the placed calls' (now --call-*):
    train.py's flags of those names are augmentation, with other defaults."""
    new = ["--bed-dir", str(tmp_path)] + [text for flag, values in CALL_FLAGS.items()
                                          for text in (f"--call-{flag[2:]}", *values)]
    old = ["--bg-dir", str(tmp_path)] + [text for flag, values in CALL_FLAGS.items() for text in (flag, *values)]
    with caplog.at_level("WARNING", logger="birdclef"):
        assert parse_soundscapes(*old) == parse_soundscapes(*new)
    warnings = [record.getMessage() for record in caplog.records]
    assert "--bg-dir is deprecated: use --bed-dir" in warnings
    assert {f"{flag} is deprecated: use --call-{flag[2:]}" for flag in CALL_FLAGS} <= set(warnings)
    assert len(warnings) == 1 + len(CALL_FLAGS)                             # only the old spellings warn
    placement = parse_soundscapes(*new).placement
    assert (placement.distance_prob, placement.distance_db, placement.distance_lowpass_hz, placement.reverb_prob,
            placement.reverb_rt60) == (0.9, (-6.0, -1.0), (2000.0, 9000.0), 0.7, (0.4, 0.8))
    assert parse_soundscapes(*new).bed_dir == str(tmp_path)


def test_the_soundscapes_defaults_are_the_placement_settings(caplog):
    with caplog.at_level("WARNING", logger="birdclef"):
        command = parse_soundscapes()
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
