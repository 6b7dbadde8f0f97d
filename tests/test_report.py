"""Tests for report.py: its table equals what metrics.csv says, Spearman equals scipy's, the leaderboard
correlation picks each submission's own evaluation, and per-species AP equals a plain re-derivation."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import report
from conftest import ROOT, run_infer, write_tone


def write_run(folder, config: dict, metrics: pd.DataFrame):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    metrics.to_csv(folder / "metrics.csv", index=False)
    return folder


def metrics_of(rng, evaluations=6, soundscapes=True) -> pd.DataFrame:
    table = pd.DataFrame({"evaluation": range(1, evaluations + 1), "epoch": np.arange(1, evaluations + 1) / 2,
                          "global_step": np.arange(1, evaluations + 1) * 10, "train_loss": rng.random(evaluations),
                          "val_loss": rng.random(evaluations), "cmap5": rng.random(evaluations),
                          "lr": 1e-3, "chance_cmap5": 0.8})
    if soundscapes:
        table["soundscape_cmap5"] = rng.random(evaluations)
        table["test_cmap5"] = rng.random(evaluations)
        table["soundscape_chance_cmap5"] = 0.6
    return table


def test_the_table_is_what_metrics_csv_says(tmp_path, trained_run):
    rng = np.random.default_rng(0)
    a = write_run(tmp_path / "a", {"lr": 0.001, "seed": 1, "head": "linear", "out_dir": "x"}, metrics_of(rng))
    b = write_run(tmp_path / "b", {"lr": 0.001, "seed": 2, "head": "sed", "out_dir": "y"}, metrics_of(rng))
    result = report.main([str(a), str(b), str(trained_run), "--out", str(tmp_path / "report")])
    table = result["runs"].set_index("run")
    for folder in (a, b, trained_run):
        metrics, row = pd.read_csv(folder / "metrics.csv"), table.loc[folder.name]
        best = metrics.loc[metrics["cmap5"].idxmax()]               # the first of equal bests
        assert row["best_clip_cmap5"] == metrics["cmap5"].max() and row["at_step"] == best["global_step"]
        assert row["steps"] == metrics["global_step"].max()
        if "soundscape_cmap5" in metrics:
            assert row["soundscape_cmap5_there"] == best["soundscape_cmap5"]
            assert row["best_soundscape_cmap5"] == metrics["soundscape_cmap5"].max()
            assert row["test_cmap5_at_best_soundscape"] == metrics.loc[metrics["soundscape_cmap5"].idxmax(), "test_cmap5"]
            assert row["chance_soundscape_cmap5"] == 0.6
        assert row["chance_clip_cmap5"] == metrics["chance_cmap5"].iloc[-1]
    configs = [json.loads((folder / "config.json").read_text()) for folder in (a, b)]
    # only what differs, and out_dir is no flag of a recipe
    assert report.differing_flags(configs) == ["--head linear --seed 1", "--head sed --seed 2"]
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert pd.read_csv(tmp_path / "report" / "runs.csv").shape[0] == 3
    assert table["has_best_pt"].to_dict() == {"a": False, "b": False, trained_run.name: True}


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipys_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, size=15).astype(float), rng.random(15)
    assert report.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert report.spearman(y, y) == pytest.approx(1.0) and report.spearman(y, -y) == pytest.approx(-1.0)
    assert np.isnan(report.spearman(np.ones(5), y[:5]))


def test_leaderboard_correlation_uses_each_submissions_own_evaluation(tmp_path):
    rng = np.random.default_rng(3)
    folders = [write_run(tmp_path / f"run{i}", {"seed": i}, metrics_of(rng)) for i in range(4)]
    leaderboard = pd.DataFrame({"run": ["run0", "run1", "run2", "run3", "run0"],
                                "checkpoint": ["checkpoint_step00000020.pt", "checkpoint_step00000060.pt",
                                               "checkpoint_step00000010.pt", "checkpoint_step00000040.pt",
                                               "checkpoint_step00000050.pt"],
                                "score": [0.71, 0.78, 0.74, 0.77, 0.70]})
    leaderboard.to_csv(tmp_path / "leaderboard.csv", index=False)
    result = report.main([*map(str, folders), "--leaderboard", str(tmp_path / "leaderboard.csv"),
                          "--out", str(tmp_path / "report")])
    correlations = result["leaderboard"].set_index("metric")
    steps = [int(name[15:23]) for name in leaderboard["checkpoint"]]
    for metric in ("cmap5", "soundscape_cmap5", "val_loss"):
        values = [pd.read_csv(tmp_path / run / "metrics.csv").set_index("global_step").loc[step, metric]
                  for run, step in zip(leaderboard["run"], steps)]
        expected = scipy.stats.spearmanr(values, leaderboard["score"]).statistic
        assert correlations.loc[metric, "spearman"] == pytest.approx(expected)
        assert correlations.loc[metric, "submissions"] == 5


def test_average_precision_per_species_equals_a_plain_rederivation():
    rng = np.random.default_rng(1)
    targets = (rng.random((40, 5)) < 0.25).astype(int)
    targets[:, 4] = 0                                            # a species without a positive: no AP
    scores = rng.random((40, 5))
    result = report.average_precision_per_species(targets, scores)
    for column in range(4):
        order = np.argsort(-scores[:, column], kind="stable")
        hits = targets[order, column]
        precision_at_hits = np.cumsum(hits)[hits == 1] / (np.flatnonzero(hits) + 1)
        assert result[column] == pytest.approx(precision_at_hits.mean())
    assert np.isnan(result[4])


def test_per_species_report_of_a_trained_checkpoint(trained_run, tiny_data, tmp_path):
    table = report.per_species_report(trained_run / "best.pt", tmp_path)
    assert (tmp_path / "per_species.csv").is_file() and (tmp_path / "per_species.png").stat().st_size > 10_000
    # tiny_data: 6, 5, 4, 3 recordings per species, one of each held out for validation
    assert dict(zip(table["species"], table["training_recordings"])) == {
        "aaabbb1": 5, "cccddd1": 4, "eeefff1": 3, "ggghhh1": 2}
    assert (table["validation_clips"] == 1).all()
    assert table["ap"].between(0, 1).all() and table["chance_ap"].between(0, 1).all()


# ----------------------------------------------------------------------------- pseudo-label quality

SPECIES = ["sp_a", "sp_b", "sp_c"]


def pseudo_tables(tmp_path):
    """An infer.py --format csv table (with row_id and nocall, rows shuffled) and its truth, which also has
    a row the table lacks, a nocall row and a species no column names."""
    probabilities = np.array([[0.95, 0.10, 0.00], [0.62, 0.40, 0.05], [0.20, 0.81, 0.30],
                              [0.05, 0.15, 1.00], [0.33, 0.70, 0.10], [0.10, 0.05, 0.45]])
    files = ["x.ogg"] * 3 + ["y.ogg"] * 3
    starts = [0.0, 5.0, 10.0] * 2
    labels = ["sp_a", "sp_a sp_b", "sp_b", "sp_c", "nocall", "sp_c sp_zzz"]
    table = pd.DataFrame({"row_id": [f"{f[0]}_{int(s + 5)}" for f, s in zip(files, starts)], "file": files,
                          "start_s": starts, "end_s": [s + 5 for s in starts]})
    table = table.join(pd.DataFrame(probabilities, columns=SPECIES)).assign(nocall=0.5)
    order = [4, 0, 5, 2, 1, 3]
    table.iloc[order].to_csv(tmp_path / "pseudo.csv", index=False)
    truth = pd.DataFrame({"file": files + ["y.ogg"], "start_s": starts + [15.0], "end_s": starts[:] + [20.0],
                          "labels": labels + ["sp_a"]})
    truth["end_s"] = truth["start_s"] + 5
    truth.to_csv(tmp_path / "truth.csv", index=False)
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]])
    return tmp_path / "pseudo.csv", tmp_path / "truth.csv", probabilities, targets


def test_pseudo_label_quality_equals_a_plain_rederivation(tmp_path):
    from sklearn.metrics import average_precision_score
    table, truth, probabilities, targets = pseudo_tables(tmp_path)
    result = report.main(["--pseudo-labels", str(table), "--truth", str(truth), "--bins", "4",
                          "--out", str(tmp_path / "out")])["pseudo_labels"]
    scores, calibration = result["scores"], result["calibration"]
    # cmAP5: per species AP after 5 rows of ones, averaged
    padded_y, padded_p = np.vstack([targets, np.ones((5, 3))]), np.vstack([probabilities, np.ones((5, 3))])
    assert scores["cmap5"] == pytest.approx(np.mean([average_precision_score(padded_y[:, c], padded_p[:, c])
                                                     for c in range(3)]))
    assert (scores["rows"], scores["species"], scores["pairs"], scores["positives"]) == (6, 3, 18, 6)
    # bins [0,.25) [.25,.5) [.5,.75) [.75,1]: (probability, present) pairs sorted into them by hand
    pairs = {0: [(.10, 0), (.00, 0), (.05, 0), (.20, 0), (.05, 0), (.15, 0), (.10, 0), (.10, 0), (.05, 0)],
             1: [(.40, 1), (.30, 0), (.33, 0), (.45, 1)],
             2: [(.62, 1), (.70, 0)],
             3: [(.95, 1), (.81, 1), (1.0, 1)]}
    for k, members in pairs.items():
        row = calibration.iloc[k]
        assert row["pairs"] == len(members)
        assert row["mean_predicted"] == pytest.approx(np.mean([p for p, _ in members]))
        assert row["observed"] == pytest.approx(np.mean([t for _, t in members]))
    ece = sum(len(m) * abs(np.mean([p for p, _ in m]) - np.mean([t for _, t in m])) for m in pairs.values()) / 18
    assert scores["ece"] == pytest.approx(ece)
    written = pd.read_csv(tmp_path / "out" / "pseudo_label_scores.csv")
    assert written.loc[0, "cmap5"] == pytest.approx(scores["cmap5"]) and written.loc[0, "ece"] == pytest.approx(ece)
    assert pd.read_csv(tmp_path / "out" / "pseudo_label_calibration.csv")["pairs"].tolist() == [9, 4, 2, 3]


def rewrite(path, change):
    table = pd.read_csv(path)
    change(table)
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("change,message", [
    (lambda t: t.__setitem__("start_s", t["start_s"] + 100), "6 row\\(s\\) have no row in .*truth.csv"),
    (lambda t: t.__setitem__("sp_b", t["sp_b"].where(t.index != 2, np.nan)), "NaN or outside"),
    (lambda t: t.__setitem__("sp_c", t["sp_c"].where(t.index != 1, 1.5)), "NaN or outside"),
    (lambda t: t.__setitem__("sp_a", t["sp_a"].where(t.index != 3, -0.1)), "NaN or outside"),
    (lambda t: t.__setitem__("sp_a", t["sp_a"].astype(object).where(t.index != 3, "high")), "not numbers"),
    (lambda t: t.pop("start_s"), r"missing column\(s\) \['start_s'\]"),
    (lambda t: [t.pop(c) for c in SPECIES + ["nocall"]], "missing column"),
    (lambda t: t.__setitem__("end_s", t["end_s"] + 1), "end elsewhere"),
    (lambda t: t.__setitem__("file", "x.ogg"), "repeated row"),
])
def test_bad_probability_tables_are_refused_in_one_line(tmp_path, change, message):
    table, truth, _, _ = pseudo_tables(tmp_path)
    rewrite(table, change)
    with pytest.raises(ValueError, match=message) as error:
        report.pseudo_label_quality(table, truth)
    assert "\n" not in str(error.value)


def test_a_truth_table_without_labels_is_refused(tmp_path):
    table, truth, _, _ = pseudo_tables(tmp_path)
    rewrite(truth, lambda t: t.pop("labels"))
    with pytest.raises(ValueError, match="expected columns file,start_s,end_s,labels"):
        report.pseudo_label_quality(table, truth)


def test_the_command_line_needs_runs_or_pseudo_labels(tmp_path, capsys):
    for argv in ([], ["--pseudo-labels", "p.csv"], ["--truth", "t.csv", "runs/a"], ["--leaderboard", "l.csv",
                                                                                   "--pseudo-labels", "p.csv",
                                                                                   "--truth", "t.csv"]):
        with pytest.raises(SystemExit) as exit_:
            report.main(argv)
        assert exit_.value.code == 2
    assert "give run folders to compare, or --pseudo-labels" in capsys.readouterr().err


def test_report_py_prints_a_bad_table_as_one_error_line(tmp_path):
    table, truth, _, _ = pseudo_tables(tmp_path)
    rewrite(table, lambda t: t.__setitem__("sp_c", t["sp_c"].where(t.index != 1, 1.5)))
    done = subprocess.run([sys.executable, str(ROOT / "report.py"), "--pseudo-labels", str(table), "--truth",
                           str(truth), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "1 probability value(s) are NaN or outside [0, 1]" in lines[0], done.stderr


def test_infer_csv_output_scores_against_its_truth(checkpoint, tmp_path):
    """What infer.py --format csv writes is what --pseudo-labels reads."""
    folder = tmp_path / "site"
    folder.mkdir()
    write_tone(folder / "s1.ogg", 12.0)
    write_tone(folder / "s2.ogg", 7.0, frequency=900.0)
    run_infer("--ckpts", checkpoint, "--soundscapes", folder, "--out", tmp_path / "pseudo.csv", "--format", "csv")
    written = pd.read_csv(tmp_path / "pseudo.csv")
    labels = ["cccddd1", "", "nocall", "aaabbb1 cccddd1"]
    truth = written[["file", "start_s", "end_s"]].assign(labels=[labels[i % 4] for i in range(len(written))])
    truth.to_csv(tmp_path / "truth.csv", index=False)
    scores = report.pseudo_label_quality(tmp_path / "pseudo.csv", tmp_path / "truth.csv")["scores"]
    assert scores["rows"] == len(written) and scores["species"] == 4
    assert 0 <= scores["ece"] <= 1 and 0 < scores["cmap5"] <= 1


# ----------------------------------------------------------------------------- bad input: one line, never a traceback

def leaderboard_of(tmp_path, rows: dict, name="leaderboard.csv"):
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def four_runs(tmp_path):
    rng = np.random.default_rng(7)
    return [write_run(tmp_path / f"run{i}", {"seed": i}, metrics_of(rng)) for i in range(4)]


STEPS = ["checkpoint_step00000020.pt", "checkpoint_step00000060.pt", "checkpoint_step00000010.pt",
         "checkpoint_step00000040.pt"]


@pytest.mark.parametrize("score", ["", "nan", "inf", "high"])
def test_a_leaderboard_score_that_is_not_a_finite_number_is_refused_naming_its_line(tmp_path, score):
    folders = four_runs(tmp_path)
    # written by hand: the bad score on line 4 (header = line 1), run2's submission
    lines = ["run,checkpoint,score"] + [f"run{i},{STEPS[i]},{value}"
                                        for i, value in enumerate(["0.71", "0.78", score, "0.77"])]
    (tmp_path / "leaderboard.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"leaderboard.csv line 4 \(run run2, checkpoint checkpoint_step00000010.pt\)"
                                         r": score .* is not a finite number") as error:
        report.main([*map(str, folders), "--leaderboard", str(tmp_path / "leaderboard.csv"),
                     "--out", str(tmp_path / "report")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "report" / "leaderboard_correlation.csv").exists()


def test_a_run_name_two_folders_share_is_refused_and_their_paths_are_accepted(tmp_path):
    rng = np.random.default_rng(11)
    folders = [write_run(tmp_path / parent / name, {"seed": i}, metrics_of(rng))
               for i, (parent, name) in enumerate([("A", "x"), ("B", "x"), ("A", "y")])]
    ambiguous = leaderboard_of(tmp_path, {"run": ["x", "y", "x"], "checkpoint": STEPS[:3], "score": [.7, .8, .75]})
    argv = [*map(str, folders), "--out", str(tmp_path / "report")]
    with pytest.raises(ValueError, match="two or more") as error:
        report.main([*argv, "--leaderboard", str(ambiguous)])
    message = str(error.value)
    assert str(folders[0]) in message and str(folders[1]) in message and "path" in message and "\n" not in message
    # with the folder paths each submission is its own run's evaluation
    paths = [str(folders[0]), "y", str(folders[1])]
    clear = leaderboard_of(tmp_path, {"run": paths, "checkpoint": STEPS[:3], "score": [.7, .8, .75]}, "clear.csv")
    correlations = report.main([*argv, "--leaderboard", str(clear)])["leaderboard"].set_index("metric")
    values = [pd.read_csv(folder / "metrics.csv").set_index("global_step").loc[int(step[15:23]), "cmap5"]
              for folder, step in zip([folders[0], folders[2], folders[1]], STEPS[:3])]
    assert correlations.loc["cmap5", "spearman"] == pytest.approx(scipy.stats.spearmanr(values, [.7, .8, .75])[0])


@pytest.mark.parametrize("columns,message", [
    ({"run": ["run0"], "checkpoint": [STEPS[0]]}, r"missing column\(s\) \['score'\]"),
    ({"name": ["run0"], "score": [0.7]}, r"missing column\(s\) \['run', 'checkpoint'\]"),
    ({}, "cannot be read"),
])
def test_a_leaderboard_without_its_columns_is_refused_in_one_line(tmp_path, columns, message):
    folders = four_runs(tmp_path)
    path = tmp_path / "leaderboard.csv"
    if columns:
        leaderboard_of(tmp_path, columns)
    else:
        path.write_text("")                                     # an empty file: not even a header
    with pytest.raises(ValueError, match=message) as error:
        report.main([*map(str, folders), "--leaderboard", str(path), "--out", str(tmp_path / "report")])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_run_without_evaluations_is_an_empty_row_beside_the_others(tmp_path, caplog):
    rng = np.random.default_rng(5)
    done = write_run(tmp_path / "done", {"seed": 1}, metrics_of(rng))
    empty = write_run(tmp_path / "empty", {"seed": 2}, metrics_of(rng).iloc[:0])          # header only
    blank = write_run(tmp_path / "blank", {"seed": 3}, metrics_of(rng).map(lambda _: np.nan))    # all NaN
    with caplog.at_level("WARNING", logger="birdclef"):
        table = report.main([str(done), str(empty), str(blank), "--out", str(tmp_path / "report")])["runs"]
    table = table.set_index("run")
    metrics = pd.read_csv(done / "metrics.csv")
    assert table.loc["done", "best_clip_cmap5"] == metrics["cmap5"].max()
    assert table.loc["done", "at_step"] == metrics.loc[metrics["cmap5"].idxmax(), "global_step"]
    columns = ["best_clip_cmap5", "at_step", "best_soundscape_cmap5", "steps"]
    assert table.loc[["empty", "blank"], columns].isna().all().all()
    assert "empty" in caplog.text and "blank" in caplog.text and "no evaluation" in caplog.text
    assert (tmp_path / "report" / "curves.png").is_file()


@pytest.mark.parametrize("kind", ["header only", "all NaN"])
def test_runs_without_any_evaluation_are_refused_in_one_line(tmp_path, kind):
    metrics = metrics_of(np.random.default_rng(0))
    metrics = metrics.iloc[:0] if kind == "header only" else metrics.map(lambda _: np.nan)
    folder = write_run(tmp_path / "fresh", {"seed": 1}, metrics)
    with pytest.raises(ValueError, match="no evaluation") as error:
        report.main([str(folder), "--out", str(tmp_path / "report")])
    assert str(folder / "metrics.csv") in str(error.value) and "\n" not in str(error.value)


def test_a_run_without_best_pt_still_gets_its_table_and_the_sections_needing_it_are_skipped(tmp_path, caplog):
    folders = four_runs(tmp_path)
    leaderboard = leaderboard_of(tmp_path, {"run": ["run0", "run1", "run2"], "checkpoint": ["best.pt", *STEPS[1:3]],
                                            "score": [0.7, 0.8, 0.75]})
    with caplog.at_level("WARNING", logger="birdclef"):
        result = report.main([*map(str, folders), "--leaderboard", str(leaderboard), "--per-species",
                              str(folders[1] / "best.pt"), "--out", str(tmp_path / "report")])
    assert pd.read_csv(tmp_path / "report" / "runs.csv").shape[0] == 4
    assert not result["runs"]["has_best_pt"].any()
    assert set(result["skipped"]) == {"leaderboard", "per_species"} and "leaderboard" not in result
    assert str(folders[0] / "best.pt") in result["skipped"]["leaderboard"]
    assert str(folders[1] / "best.pt") in result["skipped"]["per_species"]
    assert caplog.text.count("absent") >= 2
    assert not (tmp_path / "report" / "leaderboard_correlation.csv").exists()


def test_per_species_on_an_exported_checkpoint_names_the_one_to_pass(trained_run, tmp_path):
    import model as model_lib
    model_lib.export_weights(trained_run / "best.pt", tmp_path / "small.pt")
    with pytest.raises(ValueError, match="exported") as error:
        report.per_species_report(tmp_path / "small.pt", tmp_path)
    assert str(trained_run / "best.pt") in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_ends_a_bad_checkpoint_in_one_logged_line(tmp_path, caplog):
    """A best.pt that is there but not a checkpoint: model.py's CheckpointError, exit status 1."""
    folders = four_runs(tmp_path)
    (folders[0] / "best.pt").write_bytes(b"not a checkpoint")
    leaderboard = leaderboard_of(tmp_path, {"run": ["run0", "run1", "run2"], "checkpoint": ["best.pt", *STEPS[1:3]],
                                            "score": [0.7, 0.8, 0.75]})
    with caplog.at_level("ERROR", logger="birdclef"):
        status = report.cli([*map(str, folders), "--leaderboard", str(leaderboard), "--out", str(tmp_path / "out")])
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert status == 1 and len(errors) == 1 and "\n" not in errors[0] and "best.pt" in errors[0]


def test_report_py_prints_a_blank_leaderboard_score_as_one_error_line(tmp_path):
    folders = four_runs(tmp_path)
    leaderboard = leaderboard_of(tmp_path, {"run": ["run0", "run1", "run2", "run3"], "checkpoint": STEPS,
                                            "score": [0.71, 0.78, None, 0.77]})
    done = subprocess.run([sys.executable, str(ROOT / "report.py"), *map(str, folders), "--leaderboard",
                           str(leaderboard), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "line 4 (run run2" in lines[0] and "score" in lines[0], done.stderr


def test_site_labels_score_the_runs_on_the_random_rows_of_a_reviewed_table(trained_run, tmp_path):
    """report.py --site-labels (review.py's table): each run's best.pt on the random rows only, written beside
    the run table; the rows chosen to teach are left out of the score."""
    site = tmp_path / "site"
    site.mkdir()
    write_tone(site / "a.wav", 15.0)
    rows = [{"file": "a.wav", "start_s": start, "end_s": start + 5, "labels": labels, "chosen_by": reason,
             "answered_at": ""} for start, labels, reason in ((0, "aaabbb1", "random"), (5, "", "random"),
                                                              (10, "cccddd1", "top:cccddd1"))]
    pd.DataFrame(rows).to_csv(tmp_path / "site.csv", index=False)
    result = report.main([str(trained_run), "--site-labels", str(tmp_path / "site.csv"), "--site-audio", str(site),
                          "--out", str(tmp_path / "report")])
    assert result["site"]["rows"].tolist() == [2]
    assert (tmp_path / "report" / "site_validation.csv").is_file() and (tmp_path / "report" / "runs.csv").is_file()
    with pytest.raises(SystemExit):
        report.main([str(trained_run), "--site-labels", str(tmp_path / "site.csv")])       # no --site-audio
