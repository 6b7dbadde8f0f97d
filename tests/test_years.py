"""BirdCLEF 2021-2025 folder layouts, several folders at once, and 2021's labelled soundscapes.

Each fixture mirrors one year's exact metadata columns and folder layout, with a
few seconds of synthetic audio per recording, written in the test.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import TINY_SPECIES, quick_args, tone_recording

import data
import model as model_lib
import train
import soundscapes

COLUMNS = {
    "2021": ["primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
             "common_name", "date", "filename", "license", "rating", "time", "url"],
    "2022": ["primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
             "common_name", "author", "license", "rating", "time", "url", "filename"],
    "2023": ["primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
             "common_name", "author", "license", "rating", "url", "filename"],
    "2024": ["primary_label", "secondary_labels", "type", "latitude", "longitude", "scientific_name",
             "common_name", "author", "license", "rating", "url", "filename"],
    "2025": ["primary_label", "secondary_labels", "type", "filename", "collection", "rating", "url",
             "latitude", "longitude", "scientific_name", "common_name", "author", "license"],
}
RATE = 16000
FREQUENCY = dict(zip(sorted(TINY_SPECIES), TINY_SPECIES.values()))


def write_audio(path, code, seed, seconds=4.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    frequency = FREQUENCY.get(code, 3000.0)
    sf.write(path, tone_recording(frequency, seconds, RATE, np.random.default_rng(seed)), RATE,
             format="OGG", subtype="VORBIS")


def write_year(root, year, recordings, sample_submission=None):
    """recordings: (primary_label, file stem, secondary list) -> a folder in `year`'s layout."""
    rows = []
    for index, (primary, stem, secondary) in enumerate(recordings):
        if year == "2021":
            filename, audio = f"{stem}.ogg", root / "train_short_audio" / primary / f"{stem}.ogg"
        else:
            filename = f"{primary}/{stem}.ogg"
            audio = root / "train_audio" / filename
        write_audio(audio, primary, index)
        number = stem[2:] if stem.startswith("XC") else "0"
        row = {"primary_label": primary, "secondary_labels": str(secondary), "type": "['song']",
               "latitude": 1.0, "longitude": 2.0, "scientific_name": primary, "common_name": primary,
               "date": "2020-01-01", "filename": filename, "license": "CC", "rating": 4.0, "time": "08:00",
               "author": "someone", "url": f"https://www.xeno-canto.org/{number}" if stem.startswith("XC") else
               f"https://www.inaturalist.org/observations/{index}",
               "collection": "XC" if stem.startswith("XC") else stem.rstrip("0123456789")}
        if year == "2025" and not secondary:
            row["secondary_labels"] = "['']"   # how 2025's train.csv writes "no secondary label"
        rows.append({column: row[column] for column in COLUMNS[year]})
    metadata = "train.csv" if year == "2025" else "train_metadata.csv"
    pd.DataFrame(rows, columns=COLUMNS[year]).to_csv(root / metadata, index=False)
    species = sorted({primary for primary, _, _ in recordings})
    if year == "2021":
        pd.DataFrame({"row_id": ["3575_COL_5"], "birds": ["nocall"]}).to_csv(root / "sample_submission.csv",
                                                                            index=False)
    elif year == "2022":
        (root / "scored_birds.json").write_text(json.dumps(species[:2]))
        pd.DataFrame({"row_id": ["soundscape_1000170626_akiapo_5"], "target": [False]}).to_csv(
            root / "sample_submission.csv", index=False)
    else:
        columns = sample_submission or species
        pd.DataFrame(columns=["row_id", *columns]).to_csv(root / "sample_submission.csv", index=False)
    if year == "2024":
        (root / "unlabeled_soundscapes").mkdir(exist_ok=True)
    if year == "2025":
        pd.DataFrame({"primary_label": species, "inat_taxon_id": range(len(species)), "scientific_name": species,
                      "common_name": species, "class_name": "Aves"}).to_csv(root / "taxonomy.csv", index=False)
    return root


RECORDINGS = [("aaabbb1", "XC101", []), ("aaabbb1", "XC102", ["cccddd1"]), ("cccddd1", "XC103", []),
              ("cccddd1", "XC104", ["aaabbb1", "eeefff1"]), ("eeefff1", "XC105", [])]


@pytest.mark.parametrize("year", sorted(COLUMNS))
def test_each_year_is_detected_and_read_with_its_exact_columns(tmp_path, year):
    root = write_year(tmp_path / year, year, RECORDINGS)
    assert data.detect_layout(root).year == year
    table = data.read_metadata(root)
    assert list(table.columns[:len(COLUMNS[year])]) == COLUMNS[year]
    assert len(table) == len(RECORDINGS)
    for path in table["path"]:
        assert sf.info(path).frames > 0          # every path points at the audio the layout stores
    audio_folder = "train_short_audio" if year == "2021" else "train_audio"
    assert all(f"/{audio_folder}/" in path for path in table["path"])
    assert table["secondary"].tolist() == [secondary for _, _, secondary in RECORDINGS]
    assert table["recording_id"].tolist() == ["XC101", "XC102", "XC103", "XC104", "XC105"]
    # 2021 and 2022 sample submissions are long-format (row_id,birds / row_id,target): never species
    assert data.read_vocabulary(root, table) == ["aaabbb1", "cccddd1", "eeefff1"]


def test_2022_scored_birds_are_read(tmp_path):
    root = write_year(tmp_path / "2022", "2022", RECORDINGS)
    assert data.scored_species(root) == ["aaabbb1", "cccddd1"]
    assert data.scored_species(write_year(tmp_path / "2023", "2023", RECORDINGS)) is None


def test_2025_non_xeno_canto_recordings_and_numeric_labels(tmp_path):
    recordings = [("1139490", "CSA36385", []), ("1139490", "iNat77", []), ("aaabbb1", "XC9", ["1139490"])]
    root = write_year(tmp_path / "2025", "2025", recordings)
    table = data.read_metadata(root)
    assert table["primary_label"].tolist() == ["1139490", "1139490", "aaabbb1"]   # kept as text, not numbers
    assert table["recording_id"].tolist() == ["", "", "XC9"]
    assert table["secondary"].tolist() == [[], [], ["1139490"]]
    assert data.read_vocabulary(root, table) == ["1139490", "aaabbb1"]


def test_2025_without_collection_column_is_refused_by_name(tmp_path):
    root = write_year(tmp_path / "2025", "2025", RECORDINGS)
    pd.read_csv(root / "train.csv").drop(columns="collection").to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"'collection'.*2025"):
        data.read_metadata(root)


def test_2021_filename_cannot_escape_the_species_folder(tmp_path):
    root = write_year(tmp_path / "2021", "2021", RECORDINGS)
    table = pd.read_csv(root / "train_metadata.csv")
    table.loc[0, "filename"] = "../../outside.ogg"
    table.to_csv(root / "train_metadata.csv", index=False)
    with pytest.raises(ValueError, match="row 2.*outside"):
        data.read_metadata(root)


def test_several_folders_merge_vocabulary_and_use_a_shared_recording_once(tmp_path, caplog):
    first = write_year(tmp_path / "2021", "2021", RECORDINGS[:3])                         # XC101-XC103
    second = write_year(tmp_path / "2023", "2023",
                        [("cccddd1", "XC103", ["ggghhh1"]), ("ggghhh1", "XC201", []), ("eeefff1", "XC105", [])],
                        sample_submission=["ggghhh1", "eeefff1", "cccddd1"])
    with caplog.at_level(logging.INFO, logger="birdclef"):
        table, labels = data.read_training_data([first, second])
    assert labels == ["aaabbb1", "cccddd1", "eeefff1", "ggghhh1"]                        # the union
    assert table["recording_id"].tolist() == ["XC101", "XC102", "XC103", "XC201", "XC105"]
    kept = table[table["recording_id"] == "XC103"].iloc[0]
    assert kept["source"] == str(first)                                                   # the first folder's copy
    assert kept["secondary"] == ["ggghhh1"]                                               # labels of both copies
    assert "merging 1 xeno-canto recording" in caplog.text
    # a single folder is read as it is, sample-submission order included
    assert data.read_training_data([second])[1] == ["ggghhh1", "eeefff1", "cccddd1"]


def test_recordings_without_xeno_canto_id_are_never_merged(tmp_path):
    first = write_year(tmp_path / "a", "2025", [("1139490", "CSA1", []), ("aaabbb1", "XC1", [])])
    second = write_year(tmp_path / "b", "2025", [("1139490", "CSA1", []), ("aaabbb1", "XC1", [])])
    table, _ = data.read_training_data([first, second])
    assert table["recording_id"].tolist() == ["", "XC1", ""]


def write_2021_soundscapes(root):
    """train_soundscapes/<audio_id>_<site>_<date>.ogg and train_soundscape_labels.csv (15 s each)."""
    rows = []
    for audio_id, site, labels in ((7019, "COR", ["nocall", "aaabbb1", "aaabbb1 cccddd1"]),
                                   (2782, "SSW", ["cccddd1", "nocall", "nocall"])):
        audio = np.concatenate([tone_recording(FREQUENCY.get(code.split()[0], 3000.0), 5.0, RATE,
                                               np.random.default_rng(audio_id)) * (code != "nocall")
                                for code in labels])
        (root / "train_soundscapes").mkdir(parents=True, exist_ok=True)
        sf.write(root / "train_soundscapes" / f"{audio_id}_{site}_20190904.ogg", audio, RATE,
                 format="OGG", subtype="VORBIS")
        for row, birds in enumerate(labels):
            seconds = 5 * (row + 1)
            rows.append({"row_id": f"{audio_id}_{site}_{seconds}", "site": site, "audio_id": audio_id,
                         "seconds": seconds, "birds": birds})
    pd.DataFrame(rows).to_csv(root / "train_soundscape_labels.csv", index=False)
    return root / "train_soundscape_labels.csv"


def test_2021_soundscape_labels_become_file_rows(tmp_path):
    table_path = write_2021_soundscapes(tmp_path)
    rows, audio_dir = soundscapes.read_soundscape_labels(table_path)
    assert audio_dir == tmp_path / "train_soundscapes"
    assert rows["file"].tolist()[:3] == ["7019_COR_20190904.ogg"] * 3
    assert rows["start_s"].tolist() == [0.0, 5.0, 10.0] * 2
    assert rows["labels"].tolist() == ["nocall", "aaabbb1", "aaabbb1 cccddd1", "cccddd1", "nocall", "nocall"]
    targets = soundscapes.read_labels(table_path, ["aaabbb1", "cccddd1"])
    assert targets.loc["7019_COR_20190904_15"].tolist() == [1, 1]
    assert targets.loc["2782_SSW_20190904_5"].tolist() == [0, 1]
    assert targets.loc["7019_COR_20190904_5"].tolist() == [0, 0]             # nocall: no species
    nocall = soundscapes.nocall_soundscape_rows(table_path)
    assert [(p.split("/")[-1], s) for p, s in zip(nocall["path"], nocall["start_s"])] == [
        ("7019_COR_20190904.ogg", 0.0), ("2782_SSW_20190904.ogg", 5.0), ("2782_SSW_20190904.ogg", 10.0)]


def test_2021_soundscape_without_its_audio_names_it(tmp_path):
    table_path = write_2021_soundscapes(tmp_path)
    (tmp_path / "train_soundscapes" / "2782_SSW_20190904.ogg").unlink()
    with pytest.raises(FileNotFoundError, match="2782_SSW_"):
        soundscapes.read_soundscape_labels(table_path)


def test_training_on_two_years_with_2021_soundscape_validation(tmp_path):
    recordings = [(code, f"XC{300 + i}", []) for i, code in enumerate(sorted(TINY_SPECIES)[:3] * 3)]
    first = write_year(tmp_path / "2022", "2022", recordings[:5])
    second = write_year(tmp_path / "2025", "2025", recordings[3:] + [("1139490", "iNat5", []),
                                                                     ("1139490", "CSA6", [])])
    table_path = write_2021_soundscapes(tmp_path / "2021")
    args = quick_args(first, tmp_path / "run", "--epochs", "1", "--sample-rate", str(RATE), "--fmax", "8000",
                      "--val-soundscapes", str(table_path))
    args.data_dir = [str(first), str(second)]
    state = train.main(args)
    checkpoint = model_lib.read_checkpoint(state.out_dir / "best.pt")
    assert checkpoint["labels"] == ["1139490", "aaabbb1", "cccddd1", "eeefff1"]
    logged = pd.read_csv(state.out_dir / "metrics.csv")
    assert logged["soundscape_cmap5"].notna().all() and logged["cmap5"].notna().all()
    config = json.loads((state.out_dir / "config.json").read_text())
    assert config["data_dir"] == [str(first), str(second)]
    assert torch.load(state.out_dir / "best.pt", weights_only=True)["args"]["data_dir"] == args.data_dir
