"""Tests for report.py: its table equals what metrics.csv says, Spearman equals scipy's, the leaderboard
correlation picks each submission's own evaluation, and per-species AP equals a plain re-derivation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import report


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
