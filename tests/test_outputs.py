"""Tests for outputs.py and infer.py as a tool: a killed job continues with --skip-existing to the same
output as an uninterrupted one, folder trees and file lists, the Python API equal to the command line,
an empty test folder, Raven tables a Raven or BirdNET user expects, top-k, and progress in logs."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT, run_infer, write_tone

import infer
import outputs
import progress


@pytest.fixture(scope="module")
def soundscape_tree(tmp_path_factory):
    """Eight short soundscapes in two site folders."""
    root = tmp_path_factory.mktemp("tree")
    for index in range(8):
        site = root / f"site{index % 2}"
        site.mkdir(exist_ok=True)
        write_tone(site / f"scape{index}.wav", 6.0 + index, frequency=900.0 + 400 * index)
    return root


def test_a_killed_job_continues_with_skip_existing_to_the_same_output(checkpoint, soundscape_tree, tmp_path):
    # the reference runs with the killed job's batch size: CPU kernels may round a window's fp32 scores
    # differently in a batch of 16 than alone (the 8th decimal), so only like compares with like
    same = ["--workers", "0", "--batch-size", "1", "--streams", "1"]
    reference = tmp_path / "reference.csv"
    run_infer("--ckpts", checkpoint, "--soundscapes", soundscape_tree, "--out", reference, *same)
    out = tmp_path / "killed.csv"
    command = [sys.executable, str(ROOT / "infer.py"), "--ckpts", str(checkpoint), "--soundscapes",
               str(soundscape_tree), "--out", str(out), *same]
    # the tiny model scores all 8 files within one poll on a fast machine, so the job to kill pauses
    # 0.3 s after each saved part (infer.py run unchanged otherwise): the kill lands part-way every time
    slowed = ("import runpy, sys, time, outputs\n"
              "save = outputs.PartStore.save\n"
              "outputs.PartStore.save = lambda self, *a: (save(self, *a), time.sleep(0.3))[0]\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    job = subprocess.Popen([sys.executable, "-c", slowed, *command[1:]], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.csv.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.npz"))) < 3 and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = len(list(parts.glob("*.npz")))
    assert 3 <= done < 8 and not out.exists()                # killed part-way: parts kept, no half output
    summary = run_infer(*command[2:], "--skip-existing")
    total = sum(sf.info(path).duration for path in soundscape_tree.rglob("*.wav"))
    assert summary["audio_seconds"] < total                  # the finished files were not scored again
    assert out.read_bytes() == reference.read_bytes()
    assert not parts.exists()                                # cleaned up once the output is whole
    # parts of a job with other settings are never mixed in
    outputs.PartStore(parts, infer.job_settings(infer.Predictor([checkpoint])), resume=False)
    with pytest.raises(ValueError, match=r"other settings \(hop: 5\.0, not 2\.5\)"):
        run_infer(*command[2:], "--skip-existing", "--hop", "2.5")


def test_folder_trees_file_lists_and_the_python_api_give_the_command_lines_numbers(checkpoint, soundscape_tree,
                                                                                  tmp_path):
    run_infer("--ckpts", checkpoint, "--soundscapes", soundscape_tree, "--out", tmp_path / "all.csv",
              "--format", "csv")
    cli = pd.read_csv(tmp_path / "all.csv")
    assert sorted(cli["file"].unique()) == sorted(f"scape{i}.wav" for i in range(8))      # both site folders
    listed = sorted(soundscape_tree.rglob("*.wav"))[:3]
    (tmp_path / "list.txt").write_text("\n".join(map(str, listed)) + "\n")
    run_infer("--ckpts", checkpoint, "--file-list", tmp_path / "list.txt", "--out", tmp_path / "some.csv",
              "--format", "csv")
    some = pd.read_csv(tmp_path / "some.csv")
    assert list(some["file"].unique()) == [path.name for path in listed]
    pd.testing.assert_frame_equal(some, cli[cli["file"].isin(some["file"])].reset_index(drop=True))
    # the Python API: the same rows, to the same numbers, from files and from arrays
    predictor = infer.Predictor([checkpoint])
    table = predictor.predict(listed)
    expected = some.set_index(["file", "start_s", "end_s"])
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-7)
    assert list(table.columns) == list(expected.columns)
    samples, rate = sf.read(listed[0], dtype="float32")
    from_array = predictor.predict([samples], sample_rate=rate)
    np.testing.assert_allclose(from_array.to_numpy(), table.loc[listed[0].name].to_numpy(), rtol=1e-6, atol=1e-7)
    assert from_array.index.get_level_values("file")[0] == "array_0"
    with pytest.raises(TypeError, match="unknown option"):
        infer.Predictor([checkpoint], hopp=2.5)


def test_an_empty_or_missing_test_folder_writes_a_header_only_submission(checkpoint, tmp_path, caplog):
    sample = tmp_path / "sample_submission.csv"
    pd.DataFrame(columns=["row_id", "zzz", "aaabbb1"]).to_csv(sample, index=False)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        out = tmp_path / f"{folder.name}.csv"
        with caplog.at_level(logging.WARNING, logger="birdclef"):
            summary = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", out,
                                "--sample-submission", sample)
        assert summary["rows"] == 0 and "header only" in caplog.text
        assert out.read_text().strip() == "row_id,zzz,aaabbb1"
    run_infer("--ckpts", checkpoint, "--soundscapes", tmp_path / "empty", "--out", tmp_path / "rows.csv",
              "--sample-submission", sample, "--format", "csv")
    assert (tmp_path / "rows.csv").read_text().strip() == "file,start_s,end_s,zzz,aaabbb1"
    run_infer("--ckpts", checkpoint, "--soundscapes", tmp_path / "empty", "--out", tmp_path / "tables",
              "--format", "raven")
    assert (tmp_path / "tables").is_dir() and not any((tmp_path / "tables").iterdir())   # a folder, as raven writes


def test_run_folders_stand_for_best_pt_and_average_weights_names_the_difference(checkpoint, trained_run, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 7.0)
    by_folder = run_infer("--ckpts", trained_run, "--soundscapes", folder, "--out", tmp_path / "a.csv")
    by_file = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "b.csv")
    pd.testing.assert_frame_equal(by_folder["submission"], by_file["submission"])
    other = torch.load(checkpoint, weights_only=True)
    other["model_config"]["dropout"] = 0.3
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt has dropout 0.3"):
        run_infer("--ckpts", checkpoint, tmp_path / "other.pt", "--average-weights", "--soundscapes", folder,
                  "--out", tmp_path / "c.csv")


def test_raven_tables_as_raven_and_birdnet_users_expect(checkpoint, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "site1.wav", 12.0)
    write_tone(folder / "site2.wav", 8.0, frequency=5000.0)
    metadata = tiny_data / "train_metadata.csv"
    summary = run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--format", "raven", "--combined",
                        "--metadata", metadata, "--top-k", "2")
    tables = tmp_path / "raven_selections"                       # a folder named for what it holds
    assert sorted(path.name for path in tables.iterdir()) == ["combined.selections.txt", "site1.selections.txt",
                                                               "site2.selections.txt"]
    site1 = pd.read_csv(tables / "site1.selections.txt", sep="\t")
    assert list(site1.columns) == outputs.RAVEN_COLUMNS
    common = dict(zip(pd.read_csv(metadata)["primary_label"], pd.read_csv(metadata)["common_name"]))
    assert (site1["Common Name"] == site1["Species Code"].map(common)).all()
    assert (site1["Begin Path"] == str((folder / "site1.wav").resolve())).all()
    assert (site1["File Offset (s)"] == site1["Begin Time (s)"]).all()
    # softmax checkpoint: the default threshold is 0.1; top-k 2: at most two species per row
    scores = summary["submission"].set_index("row_id")
    rows_site1 = scores.loc[[row for row in scores.index if row.startswith("site1_")]]
    assert len(site1) == int(((rows_site1.to_numpy() >= 0.1) & (rows_site1.to_numpy() > 0)).sum())
    assert (site1.groupby("Begin Time (s)").size() <= 2).all()
    combined = pd.read_csv(tables / "combined.selections.txt", sep="\t")
    assert list(combined["Selection"]) == list(range(1, len(combined) + 1))
    assert set(combined["Begin Path"]) == {str((folder / name).resolve()) for name in ("site1.wav", "site2.wav")}
    (tmp_path / "taken.txt").write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file"):   # refused before any work, never over a file
        run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--format", "raven", "--out", tmp_path / "taken.txt")
    assert (tmp_path / "taken.txt").read_text() == "not a folder"


def test_raven_refuses_a_folder_with_another_jobs_tables_and_a_file_in_the_out_path(checkpoint, tmp_path):
    """#26.5: tables of another job (and a combined table this job will not replace) would stay beside its
    own; `--out FILE/sub` was a NotADirectoryError traceback. Both are refused before any work."""
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "site1.wav", 6.0)
    tables = tmp_path / "tables"
    job = ["--ckpts", checkpoint, "--soundscapes", folder, "--format", "raven", "--out", tables]
    run_infer(*job, "--combined")
    run_infer(*job, "--combined")                              # the same job again replaces its own tables
    with pytest.raises(FileExistsError, match=r"holds 1 selection table\(s\).*combined\.selections\.txt"):
        run_infer(*job)                                        # its combined table would be stale
    (tables / "combined.selections.txt").unlink()
    (tables / "other.selections.txt").write_text("another job's\n")
    with pytest.raises(FileExistsError, match=r"other\.selections\.txt"):
        run_infer(*job, "--combined")
    assert (tables / "other.selections.txt").read_text() == "another job's\n"
    (tmp_path / "file.txt").write_text("a file")
    for kind in ("raven", "csv"):
        with pytest.raises(NotADirectoryError, match="file.txt is a file, not a folder"):
            run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--format", kind, "--out",
                      tmp_path / "file.txt" / "sub")


def test_a_second_job_on_the_same_out_is_refused_and_a_missing_part_writes_nothing(checkpoint, soundscape_tree,
                                                                                   tmp_path, monkeypatch):
    """#26.1: a second infer.py on one --out wiped the first's parts, and the first then wrote an output
    of 6 of 20 files with rc 0. The parts folder is locked while a job runs, and an output with a file
    missing is never written."""
    out = tmp_path / "out.csv"
    parts = tmp_path / "out.csv.parts"
    parts.mkdir()
    (parts / "settings.json").write_text("{}")
    (parts / ".lock").write_text(str(os.getppid()))                     # a live process: the first job
    with pytest.raises(FileExistsError, match=r"in use by another infer.py job.*choose another --out"):
        run_infer("--ckpts", checkpoint, "--soundscapes", soundscape_tree, "--out", out)
    assert (parts / "settings.json").read_text() == "{}" and not out.exists()
    (parts / ".lock").unlink()
    save = outputs.PartStore.save
    skipped = sorted(soundscape_tree.rglob("*.wav"))[3]
    monkeypatch.setattr(outputs.PartStore, "save",                      # one part removed under the job
                        lambda self, path, *rest: None if path == skipped else save(self, path, *rest))
    with pytest.raises(FileNotFoundError, match=r"1 of 8 file\(s\) have no rows.*--skip-existing"):
        run_infer("--ckpts", checkpoint, "--soundscapes", soundscape_tree, "--out", out)
    assert not out.exists() and not (parts / ".lock").exists()          # nothing written; the lock let go
    monkeypatch.setattr(outputs.PartStore, "save", save)
    summary = run_infer("--ckpts", checkpoint, "--soundscapes", soundscape_tree, "--out", out, "--skip-existing")
    assert summary["audio_seconds"] == pytest.approx(sf.info(skipped).duration)      # only the missing one
    assert len(pd.read_csv(out)) == sum(infer.expected_rows(path) for path in soundscape_tree.rglob("*.wav"))


def test_skip_existing_scores_again_parts_of_replaced_files_and_damaged_or_edited_parts(checkpoint,
                                                                                        soundscape_tree, tmp_path,
                                                                                        monkeypatch, caplog):
    """#26.7 and #26.8: a part was reused after its audio file was replaced (60 s -> 20 s: stale rows, rc 0);
    a hand-edited part (NaN, 7.5, 5 of 12 rows) went into the submission; a truncated one was a BadZipFile
    on every retry. Each is scored again, and the output equals a fresh job's."""
    tree = tmp_path / "tree"
    for path in soundscape_tree.rglob("*.wav"):
        (tree / path.parent.name).mkdir(parents=True, exist_ok=True)
        (tree / path.parent.name / path.name).write_bytes(path.read_bytes())
    same = ["--ckpts", checkpoint, "--soundscapes", tree, "--workers", "0", "--batch-size", "1", "--streams", "1"]
    out = tmp_path / "out.csv"
    monkeypatch.setattr(outputs.PartStore, "remove", lambda self: None)        # keep the first job's parts
    run_infer(*same, "--out", out)
    parts = tmp_path / "out.csv.parts"
    store = outputs.PartStore(parts, json.loads((parts / "settings.json").read_text()), resume=True, prepare=False)
    files = sorted(tree.rglob("*.wav"))
    write_tone(files[0], 20.0, frequency=3000.0)                        # replaced: 6 s -> 20 s
    for path, edit in zip(files[1:4], (np.nan, 7.5, None)):
        rows, problem = store.load(path)
        rows = rows[:1] if edit is None else np.full_like(rows, edit)   # NaN, 7.5, or 1 of its rows
        np.savez(store.path_of(path), rows=rows, problem=np.array(""), source=np.asarray(outputs.source_stamp(path)))
    store.path_of(files[4]).write_bytes(store.path_of(files[4]).read_bytes()[:100])           # truncated
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        summary = run_infer(*same, "--out", out, "--skip-existing")
    assert "5 part(s) are scored again" in caplog.text
    assert summary["audio_seconds"] == pytest.approx(sum(sf.info(path).duration for path in files[:5]))
    run_infer(*same, "--out", tmp_path / "fresh.csv")
    assert out.read_bytes() == (tmp_path / "fresh.csv").read_bytes()


def test_top_k_keeps_each_rows_k_best_scores():
    rows = np.array([[0.1, 0.5, 0.3, 0.05], [0.4, 0.1, 0.2, 0.3]], dtype=np.float32)
    expected = np.array([[0, 0.5, 0.3, 0], [0.4, 0, 0, 0.3]], dtype=np.float32)
    np.testing.assert_array_equal(outputs.keep_top_k(rows, 2), expected)
    assert outputs.keep_top_k(rows, None) is rows


def test_progress_in_a_log_is_a_line_every_few_seconds(caplog, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="birdclef"):
        items = list(progress.bar(range(5), total=5, desc="scoring", unit="file", every=0.0))
    assert items == list(range(5))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("scoring")]
    # every item (every=0); the end is not written twice
    assert [line.split(" (")[0] for line in lines] == [f"scoring: {done}/5 file" for done in range(1, 6)]


def test_progress_in_a_log_ends_with_a_line_for_the_last_items(caplog, monkeypatch):
    """A clock that ticks 1 s per call, a line every 2.5 s: a line after item 3, then one for the end."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    ticks = iter(range(100))
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(ticks)))
    with caplog.at_level(logging.INFO, logger="birdclef"):
        list(progress.bar(range(5), total=5, desc="scoring", unit="file", every=2.5))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("scoring")]
    assert [line.split(" (")[0] for line in lines] == ["scoring: 3/5 file", "scoring: 5/5 file"]


def test_the_checkout_imports_as_one_package_without_touching_a_users_own_modules(tmp_path):
    """As after `pip install -e .`: birdclef_pipeline.* are this project's modules, and a module of the
    user's own named `data` stays the one `import data` gives them."""
    (tmp_path / "data.py").write_text("OWN = True\n")
    code = f"""
import importlib.util, sys
sys.path.insert(0, {str(tmp_path)!r})
import data as own
spec = importlib.util.spec_from_file_location("birdclef_pipeline", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
package = importlib.util.module_from_spec(spec)
sys.modules["birdclef_pipeline"] = package
spec.loader.exec_module(package)
import birdclef_pipeline.infer as infer
import data
assert data is own and data.OWN, "the user's data module was replaced"
assert infer.data.__file__ == {str(ROOT / 'data.py')!r} and package.Predictor is infer.Predictor
assert "infer" not in sys.modules and "model" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
