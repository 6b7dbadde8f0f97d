"""Label the demo site by "ear" through review.py's page, then ask: does that small set rank recipes as the
full test set does, next to clip validation and pseudo-soundscapes, and how sure is each run's number?

    python bench/soundscape_recipes.py --seeds 42 7 1 --epochs 8 --bed-train-files 3 \
        --work-dir runs/soundscape_recipes_site --recipes readme bed nocall-bed pcen pcen-bed pcen-nocall-bed
    python bench/site_labels.py [--windows 150] [--runs 'runs/soundscape_recipes_site/*_seed*'] \
        [--site runs/soundscape_recipes_site/bed_pseudo] [--work-dir runs/site_labels_recipes]

1. A scripted listener labels `--windows` windows of --site (the 13 unlabelled demo files no recipe trained
   on: --bed-train-files 3 gives the bed recipes the other 3) through the page's own endpoints
   (GET /api/next, /api/audio, /api/spectrogram; POST /api/answer) of a review.py server on 127.0.0.1,
   with demo_data/unlabeled_soundscapes_labels.csv as its ears. --random-share 1: every window is a
   uniform random draw, so the table is an unbiased site validation set.
2. Each finished run of --runs scores the site once with its best.pt (infer.Predictor, cached in
   --work-dir/scores/). Per run, all of the same checkpoint (best.pt, chosen by clip validation): site
   cmAP5 on the labelled windows with a 95 % bootstrap interval (site_validation), cmAP5 on every window
   of the site, clip validation cmAP5, pseudo-soundscape cmAP5 (--val-soundscapes) and the test
   soundscapes' cmAP5 (metrics.csv's row of best.pt, or test_scores.json).
3. Spearman with the test cmAP5 of each validation: over the runs (with a bootstrap interval for the site
   set), within a seed (how a user compares recipes; mean over seeds) and over the recipes' means.
Written to --work-dir: site_labels.csv (+ .log), listener.json (timings), runs.csv, recipes.csv, summary.md.
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import review  # noqa: E402
import runfolder  # noqa: E402
import site_validation  # noqa: E402
import soundscapes  # noqa: E402

TRUTH = ROOT / "demo_data" / "unlabeled_soundscapes_labels.csv"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=150, help="windows the listener labels (default: %(default)s)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "soundscape_recipes_site" / "*_seed*"),
                        help="glob of run folders (those with best.pt and a test cmAP5 are used; "
                             "default: %(default)s)")
    parser.add_argument("--site", default=str(ROOT / "runs" / "soundscape_recipes_site" / "bed_pseudo"),
                        help="folder of the site's recordings to label (files of demo_data/unlabeled_soundscapes; "
                             "default: %(default)s)")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "site_labels_recipes"),
                        help="the listener's table and timings, scores, results; one --site per folder "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1000, help="bootstrap resamplings (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="the random draw of windows (default: %(default)s)")
    return parser


def call(address, method: str, path: str, body=None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=120)
    connection.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    return response.status, data


def listen(address, truth: dict, windows: int) -> dict:
    """Answer through the page's endpoints until `windows` are labelled -> timings (s) per endpoint."""
    timings = {"next": [], "audio": [], "spectrogram": [], "answer": []}
    state = json.loads(call(address, "GET", "/api/state")[1])
    labelled = state["progress"]["labelled"]
    while labelled < windows:
        started = time.perf_counter()
        window = json.loads(call(address, "GET", "/api/next?client=listener")[1])["window"]
        timings["next"].append(time.perf_counter() - started)
        if window is None:
            break
        query = f"file={window['file']}&start_s={window['start_s']}"
        for endpoint in ("audio", "spectrogram"):                  # the listener hears and sees it
            started = time.perf_counter()
            call(address, "GET", f"/api/{endpoint}?{query}")
            timings[endpoint].append(time.perf_counter() - started)
        labels = truth[(window["file"], float(window["start_s"]))].split()
        started = time.perf_counter()
        reply = call(address, "POST", "/api/answer", {"file": window["file"], "start_s": window["start_s"],
                                                      "answer": labels or "nocall"})
        timings["answer"].append(time.perf_counter() - started)
        labelled = json.loads(reply[1])["progress"]["labelled"]
    return {name: {"calls": len(values), "median_s": float(np.median(values)) if values else None}
            for name, values in timings.items()} | {"labelled": labelled}


def site_truth(site: Path) -> pd.DataFrame:
    """The truth file's rows of the files in `site` (the listener's ears; every window of the site)."""
    rows, _ = soundscapes.read_soundscape_labels(TRUTH, site)
    files = {path.name for path in site.iterdir()}
    rows = rows[rows["file"].isin(files)].reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"bench/site_labels.py: no file of {site} is in {TRUTH}")
    return rows


def label_site(work: Path, site: Path, windows: int, seed: int) -> Path:
    """The listener's table (work/site_labels.csv): served, answered, and the server stopped. A finished
    listener is not run again (its table and timings are kept); an interrupted one continues."""
    done = work / "listener.json"
    if done.is_file():
        earlier = json.loads(done.read_text())
        if earlier.get("site") != str(site.resolve()):
            raise SystemExit(f"bench/site_labels.py: {work} holds labels of {earlier.get('site')}, not {site}; "
                             "choose another --work-dir")
        if earlier["labelled"] >= windows:
            return work / "site_labels.csv"
    truth_rows = site_truth(site)
    truth = {(name, float(start)): labels
             for name, start, labels in zip(truth_rows["file"], truth_rows["start_s"], truth_rows["labels"])}
    settings = review.ReviewSettings(soundscapes=str(site), out=str(work / "site_labels.csv"), random_share=1.0,
                                     seed=seed, port=0)
    session = review.Review(settings)
    server = review.make_server(session, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        timings = listen(server.server_address[:2], truth, windows)
        timings["minutes"] = (time.perf_counter() - started) / 60
        timings["site"] = str(site.resolve())
    finally:
        server.shutdown()
        server.server_close()
        session.close()
    (work / "listener.json").write_text(json.dumps(timings, indent=1))
    print(f"listener: {timings['labelled']} windows labelled in {timings['minutes']:.1f} min through the page")
    return work / "site_labels.csv"


def run_facts(folder: Path) -> dict | None:
    """What best.pt (train.py's default monitor: clip cmap5) scored at its evaluation: clip validation,
    pseudo-soundscapes (soundscape_cmap5) and the test soundscapes (test_cmap5, else test_scores.json).
    None for a run without best.pt or a test score."""
    if not (folder / "best.pt").is_file() or not (folder / "metrics.csv").is_file():
        return None
    best = runfolder.best_row(pd.read_csv(folder / "metrics.csv"), "cmap5")
    named = re.fullmatch(r"(.+)_seed(\d+)", folder.name)           # bench folders: <recipe>_seed<N>
    facts = {"run": folder.name, "recipe": named[1] if named else folder.name,
             "seed": int(named[2]) if named else 0, "clip_cmap5": float(best["cmap5"]),
             "pseudo_cmap5": float(best.get("soundscape_cmap5", np.nan)),
             "test_cmap5": float(best.get("test_cmap5", np.nan))}
    if (folder / "test_scores.json").is_file():
        test = json.loads((folder / "test_scores.json").read_text())
        if test.get("best_mtime_ns") not in (None, (folder / "best.pt").stat().st_mtime_ns):
            logging.warning("%s: best.pt is newer than test_scores.json", folder)
        facts["test_cmap5"] = test["test_cmap5"]
    return facts if np.isfinite(facts["test_cmap5"]) else None


def finished_runs(pattern: str) -> dict[Path, dict]:
    """The run folders of `pattern` that have finished -> their run_facts, in folder order."""
    facts = {Path(folder): run_facts(Path(folder)) for folder in sorted(glob.glob(pattern))}
    runs = {folder: values for folder, values in facts.items() if values is not None}
    if len(runs) < 3:
        raise SystemExit(f"bench/site_labels.py: {len(runs)} finished run(s) match {pattern}; a ranking needs 3+")
    return runs


def agreement_of(table: pd.DataFrame, column: str) -> dict:
    """Spearman of `column` with test_cmap5: over the runs, within each seed (mean), over recipe means."""
    within = [site_validation.spearman(runs[column], runs["test_cmap5"])
              for _, runs in table.groupby("seed") if len(runs) > 2]
    means = table.groupby("recipe")[[column, "test_cmap5"]].mean()
    return {"runs": site_validation.spearman(table[column], table["test_cmap5"]),
            "within_seed": float(np.mean(within)) if within else float("nan"),
            "recipe_means": site_validation.spearman(means[column], means["test_cmap5"])}


def compare(work: Path, labels: Path, site: Path, runs: dict[Path, dict], rounds: int) -> tuple[pd.DataFrame, dict,
                                                                                               pd.DataFrame]:
    random_rows = site_validation.read_site_rows(labels, random_only=True)
    every_row = site_truth(site)
    scores = site_validation.run_scores(list(runs), every_row, site, cache_dir=work / "scores")
    labelled = site_validation.site_table(random_rows, scores, rounds=rounds)
    full = site_validation.site_table(every_row, scores, rounds=rounds)
    table = pd.DataFrame(list(runs.values()))             # in the order of scores, labelled and full
    table["site_cmap5"], table["site_low"], table["site_high"] = (labelled["site_cmap5"], labelled["low"],
                                                                  labelled["high"])
    table["site_rows"], table["all_windows_cmap5"], table["all_windows"] = labelled["rows"], full["site_cmap5"], \
        len(every_row)
    agreement = {name: agreement_of(table, column) for name, column in
                 (("site set", "site_cmap5"), ("all site windows", "all_windows_cmap5"),
                  ("clip validation", "clip_cmap5"), ("pseudo-soundscapes", "pseudo_cmap5"))
                 if table[column].notna().all()}
    agreement["site set"]["runs_interval"] = site_validation.ranking_agreement(labelled, table["test_cmap5"])
    return table, agreement, recipe_table(table, np.stack(labelled["resampled"].to_numpy()))


def recipe_table(table: pd.DataFrame, resampled: np.ndarray) -> pd.DataFrame:
    """Per recipe, the means over its seeds, and the 95 % bootstrap interval of its mean site cmAP5 (the same
    window draws for every run: resampled is (runs, rounds))."""
    rows = []
    for recipe, runs in table.groupby("recipe", sort=False):
        draws = resampled[runs.index.to_numpy()].mean(axis=0)
        rows.append({"recipe": recipe, "seeds": len(runs)} | runs[["test_cmap5", "clip_cmap5", "pseudo_cmap5",
                                                                   "site_cmap5"]].mean().to_dict()
                    | {"site_low": np.percentile(draws, 2.5), "site_high": np.percentile(draws, 97.5)})
    return pd.DataFrame(rows).sort_values("test_cmap5", ascending=False)


def summary(table: pd.DataFrame, agreement: dict, recipes: pd.DataFrame, timings: dict | None) -> str:
    rows, every = int(table["site_rows"].iloc[0]), int(table["all_windows"].iloc[0])
    lines = [f"| recipe (mean of its seeds; best test first) | test cmAP5 | clip val cmAP5 | pseudo-soundscape "
             f"cmAP5 | site cmAP5, {rows} windows (95 % bootstrap) |", "|---|---|---|---|---|"]
    lines += [f"| {r.recipe} ({r.seeds}) | {r.test_cmap5:.3f} | {r.clip_cmap5:.3f} | {r.pseudo_cmap5:.3f} | "
              f"{r.site_cmap5:.3f} ({r.site_low:.3f}-{r.site_high:.3f}) |" for r in recipes.itertuples()]
    lines += [""]
    lines += [f"| run | test cmAP5 | clip val cmAP5 | pseudo-soundscape cmAP5 | site cmAP5, {rows} windows "
              f"(95 % bootstrap) | all {every} site windows |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.run} | {r.test_cmap5:.3f} | {r.clip_cmap5:.3f} | {r.pseudo_cmap5:.3f} | {r.site_cmap5:.3f} "
              f"({r.site_low:.3f}-{r.site_high:.3f}) | {r.all_windows_cmap5:.3f} |" for r in table.itertuples()]
    seeds = table["seed"].nunique()
    lines += ["", f"Spearman with the test cmAP5 (of the same checkpoint, best.pt) over {len(table)} runs, within a "
              f"seed (mean of {seeds}) and over {table['recipe'].nunique()} recipes' means:", "",
              "| validation | over runs | within a seed | recipe means |", "|---|---|---|---|"]
    for name, values in agreement.items():
        interval = values.get("runs_interval")
        spread = f" (bootstrap {interval['low']:.2f} to {interval['high']:.2f})" if interval else ""
        lines.append(f"| {name} | {values['runs']:.2f}{spread} | {values['within_seed']:.2f} | "
                     f"{values['recipe_means']:.2f} |")
    if timings:
        lines += ["", f"Listener: {timings['labelled']} windows through the page in {timings['minutes']:.1f} min "
                  f"(median spectrogram {timings['spectrogram']['median_s']:.2f} s, answer "
                  f"{timings['answer']['median_s'] * 1000:.0f} ms)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_args_parser().parse_args(argv)
    work, site = Path(args.work_dir), Path(args.site)
    work.mkdir(parents=True, exist_ok=True)
    runs = finished_runs(args.runs)
    labels = label_site(work, site, args.windows, args.seed)
    timings = json.loads((work / "listener.json").read_text())
    table, agreement, recipes = compare(work, labels, site, runs, args.rounds)
    table.to_csv(work / "runs.csv", index=False)
    recipes.to_csv(work / "recipes.csv", index=False)
    text = summary(table, agreement, recipes, timings)
    (work / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
