"""Tests for demo.py and demo_sounds.py, the built-in demo data set: the BirdCLEF 2024 layout, weak
labels, a test site unlike the training recordings, determinism, and train.py then infer.py on it."""
from __future__ import annotations

import ast
import hashlib

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import quick_args, run_infer

import audio
import data
import demo
import demo_sounds
import train


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.write_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0)


def test_layout_and_columns_are_birdclef_2024(demo_dir):
    metadata = pd.read_csv(demo_dir / "train_metadata.csv")
    assert list(metadata.columns) == ["primary_label", "secondary_labels", "type", "latitude", "longitude",
                                      "scientific_name", "common_name", "author", "license", "rating", "url",
                                      "filename"]
    assert all(isinstance(ast.literal_eval(value), list) for value in metadata["secondary_labels"])
    assert (metadata["filename"].str.split("/").str[0] == metadata["primary_label"]).all()
    assert all((demo_dir / "train_audio" / name).is_file() for name in metadata["filename"])
    species = sorted(metadata["primary_label"].unique())
    assert len(species) >= 8
    submission = pd.read_csv(demo_dir / "sample_submission.csv")
    assert list(submission.columns) == ["row_id", *species]
    # The project's own reader accepts it, as 2024 (2023's layout plus unlabeled_soundscapes/).
    assert data.detect_layout(demo_dir).year == "2024"
    assert len(list((demo_dir / "unlabeled_soundscapes").glob("*.ogg"))) == demo.UNLABELED_SOUNDSCAPES
    table = data.read_metadata(demo_dir)
    assert data.read_vocabulary(demo_dir, table) == species
    assert not audio.check_audio_files(table["path"])[1]


def test_long_tail_weak_labels_and_varied_audio(demo_dir):
    metadata = pd.read_csv(demo_dir / "train_metadata.csv")
    counts = metadata["primary_label"].value_counts()
    assert counts.max() >= 10 * counts.min() and counts.min() >= 2   # long tail, all splittable
    assert (metadata["secondary_labels"] != "[]").sum() >= 5          # another species audible sometimes
    infos = [sf.info(demo_dir / "train_audio" / name) for name in metadata["filename"]]
    assert {info.samplerate for info in infos} >= {32000, 44100, 48000}
    assert {info.channels for info in infos} == {1, 2}
    durations = np.array([info.duration for info in infos])
    assert durations.min() < 5 and durations.max() > 30


def test_soundscapes_have_5_second_labels(demo_dir):
    labels = pd.read_csv(demo_dir / "test_soundscapes_labels.csv", keep_default_na=False)
    assert list(labels.columns) == ["file", "start_s", "end_s", "labels"]
    species = set(pd.read_csv(demo_dir / "train_metadata.csv")["primary_label"])
    assert labels["file"].nunique() == demo.TEST_SOUNDSCAPES == 20
    for name, rows in labels.groupby("file"):
        info = sf.info(demo_dir / "test_soundscapes" / name)
        assert info.duration == pytest.approx(60, abs=0.1)
        assert list(rows["start_s"]) == list(range(0, int(info.duration), 5))
        assert ((rows["end_s"] - rows["start_s"]) == 5).all()
    codes = {code for value in labels["labels"] for code in value.split()}
    assert codes <= species
    share_with_calls = (labels["labels"] != "").mean()
    assert 0.2 < share_with_calls < 0.9  # no-call windows exist, as in real soundscapes


# sha256 of the seed-0 CSVs written before the unlabelled soundscapes got their species (issue #25):
# changing unlabeled_soundscapes/ must leave every other part of the data set as it was.
UNCHANGED_SHA256 = {
    "test_soundscapes_labels.csv": "7fd2f0180b2075b2e6111705980585804e5abb92985d9b216cfb903a31a4c571",
    "train_metadata.csv": "bcac998787a07bb5190a7c2d57d248973bc50e8dee54f0ef32a148ab81af414d",
    "sample_submission.csv": "2685f2d693d274d4d804abdd0a628a13812959d1615a599f24cdc791d2041ae1",
}


def test_the_other_parts_are_unchanged(demo_dir):
    for name, digest in UNCHANGED_SHA256.items():
        assert hashlib.sha256((demo_dir / name).read_bytes()).hexdigest() == digest, name


def _per_file_density(labels):
    """Per file: the share of 5-s rows with >= 1 vocabulary species, and species labels per row."""
    count = labels["labels"].str.split().str.len()
    by_file = count.groupby(labels["file"])
    return by_file.apply(lambda n: (n > 0).mean()).to_numpy(), by_file.mean().to_numpy()


def test_unlabeled_soundscapes_are_the_test_site_with_its_species(demo_dir):
    """As BirdCLEF 2024/2025's: more recordings from the test site, the vocabulary calling at the test
    soundscapes' density; the truth sits beside the folder (evaluation only), never in it."""
    folder = demo_dir / "unlabeled_soundscapes"
    assert not list(folder.glob("*.csv")) and (demo_dir / demo.UNLABELED_LABELS).is_file()
    files = sorted(path.name for path in folder.glob("*.ogg"))
    assert len(files) == demo.UNLABELED_SOUNDSCAPES == 16
    truth = pd.read_csv(demo_dir / demo.UNLABELED_LABELS, keep_default_na=False)
    test = pd.read_csv(demo_dir / "test_soundscapes_labels.csv", keep_default_na=False)
    assert list(truth.columns) == list(test.columns) == ["file", "start_s", "end_s", "labels"]
    assert sorted(truth["file"].unique()) == files
    for name, rows in truth.groupby("file"):  # every 5-s row of every file, in order
        info = sf.info(folder / name)
        assert info.samplerate == demo.SOUNDSCAPE_SR and info.duration == pytest.approx(60, abs=0.1)
        assert list(rows["start_s"]) == list(range(0, 60, 5)) and ((rows["end_s"] - rows["start_s"]) == 5).all()
    species = set(pd.read_csv(demo_dir / "train_metadata.csv")["primary_label"])
    codes = {code for value in truth["labels"] for code in value.split()}
    assert codes == species  # every vocabulary species calls there, nothing else is labelled
    # The same density as the test soundscapes. Both sets are draws of one process (synth_soundscape), so
    # they differ by chance only: per file, the share of rows with calls has a standard deviation of about
    # 0.1 and the labels per row about 0.2, so means over 20 and 16 files differ by about 0.034 and 0.065
    # (one standard error). Seed 0: share 0.621 (test) vs 0.542, labels per row 1.000 vs 0.807 (40 more
    # files of the process: 0.556 and 0.856, so the test set is the denser draw).
    test_share, test_calls = _per_file_density(test)
    unl_share, unl_calls = _per_file_density(truth)
    assert 0.3 < unl_share.mean() < 0.8 and abs(unl_share.mean() - test_share.mean()) <= 0.10
    assert abs(unl_calls.mean() - test_calls.mean()) <= 0.25
    assert (unl_calls > 1).any()  # several species at once in some rows, as in the test soundscapes


def test_unlabeled_soundscapes_are_deterministic_and_their_own_stream(demo_dir, tmp_path):
    plan = demo.plan_demo(0)
    species, first = plan["species"], plan["unlabeled"][0]
    audio, rows = demo.synth_unlabeled(first, species)
    again, rows_again = demo.synth_unlabeled(first, species)
    np.testing.assert_array_equal(audio, again)
    assert rows == rows_again
    truth = pd.read_csv(demo_dir / demo.UNLABELED_LABELS, keep_default_na=False)
    assert [row["labels"] for row in rows] == list(truth[truth["file"] == first["name"] + ".ogg"]["labels"])
    # The written file is that audio, byte for byte (the seed-derived Ogg serial of write_demo_dataset).
    demo_sounds.write_ogg(tmp_path / "site.ogg", audio, demo.SOUNDSCAPE_SR, 950001)
    written = demo_dir / "unlabeled_soundscapes" / (first["name"] + ".ogg")
    assert (tmp_path / "site.ogg").read_bytes() == written.read_bytes()
    # Each file and each part draws from its own stream: no two unlabelled files and no test soundscape share one.
    seeds = [tuple(sc["seed"]) for sc in plan["unlabeled"] + plan["soundscapes"]]
    assert len(set(seeds)) == len(seeds)
    other, _ = demo.synth_unlabeled(plan["unlabeled"][1], species)
    assert not np.array_equal(audio, other)


def test_small_and_deterministic(demo_dir, tmp_path):
    size = sum(path.stat().st_size for path in demo_dir.rglob("*") if path.is_file())
    assert size < 50e6
    plan_a, plan_b = demo.plan_demo(0), demo.plan_demo(0)
    assert plan_a == plan_b and demo.plan_demo(1) != plan_a
    recording = plan_a["recordings"][0]
    np.testing.assert_array_equal(demo.synth_recording(recording)[0], demo.synth_recording(recording)[0])
    # OGG pages carry a random stream serial in libsndfile; the writer fixes it, so files are byte-identical.
    samples = demo.synth_recording(recording)[0]
    demo_sounds.write_ogg(tmp_path / "a.ogg", samples, recording["sr"], serial=1234)
    demo_sounds.write_ogg(tmp_path / "b.ogg", samples, recording["sr"], serial=1234)
    assert (tmp_path / "a.ogg").read_bytes() == (tmp_path / "b.ogg").read_bytes()


def test_train_then_infer_on_the_demo_soundscapes(demo_dir, tmp_path):
    """End to end: a checkpoint trained in the test, applied to the demo soundscapes, scored with --labels."""
    train.main(quick_args(demo_dir, tmp_path / "run", "--epochs", "1", "--batch-size", "16"))
    labels_path = demo_dir / "test_soundscapes_labels.csv"
    result = run_infer("--ckpts", tmp_path / "run" / "best.pt", "--soundscapes", demo_dir / "test_soundscapes",
                       "--labels", labels_path, "--out", tmp_path / "submission.csv",
                       "--sample-submission", demo_dir / "sample_submission.csv")
    labels = pd.read_csv(labels_path, keep_default_na=False)
    submission = pd.read_csv(tmp_path / "submission.csv")
    expected_ids = [f"{name[:-4]}_{end}" for name, end in zip(labels["file"], labels["end_s"])]
    assert sorted(submission["row_id"]) == sorted(expected_ids)
    assert list(submission.columns) == list(pd.read_csv(demo_dir / "sample_submission.csv").columns)
    scores = result["scores"]
    assert scores["rows"] == len(labels)
    assert 0.0 < scores["macro_ap"] <= 1.0 and scores["cmap5"] >= scores["cmap3"]


def test_the_test_site_sounds_unlike_the_training_recordings():
    """The test soundscapes' bed is another kind of sound: most of its energy sits where the training
    recordings' pink/brown noise has little (above 2 kHz: rain, insects), and it is not a 1/f slope."""
    rng_site, rng_train = np.random.default_rng(0), np.random.default_rng(0)
    sr, n = 32000, 32000 * 10
    site = demo_sounds.make_site_background(rng_site, n, sr)
    training = demo_sounds.make_background(rng_train, n, sr)

    def high_share(x):  # share of the power above 2 kHz
        power = np.abs(np.fft.rfft(x)) ** 2
        return power[np.fft.rfftfreq(n, 1 / sr) > 2000].sum() / power.sum()
    assert high_share(site) > 3 * high_share(training)


def test_distance_and_room_change_a_call_as_described():
    rng, sr = np.random.default_rng(0), 32000
    call, _ = demo_sounds.make_call("buzz", rng, sr)           # a 6-9 kHz noise band
    far = demo_sounds.far_away(call, sr, cutoff_hz=2000, gain_db=-6)
    assert np.sqrt(np.mean(far ** 2)) < 0.5 * 10 ** (-6 / 20) * np.sqrt(np.mean(call ** 2))  # gain and low-pass
    wet = demo_sounds.reverberate(call, rng, sr, rt60=0.5)
    assert len(wet) == len(call) + int(0.5 * sr) - 1          # the tail is kept
    tail = wet[len(call):]
    assert np.abs(tail).max() > 0 and np.abs(tail[-sr // 20:]).max() < np.abs(tail[:sr // 20]).max()  # it decays
