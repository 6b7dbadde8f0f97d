"""Label the demo site by "ear" through review.py's page, then ask: does that small set rank runs as the
full test set does, and how sure is each run's number?

    python bench/site_labels.py [--windows 150] [--runs 'runs/self_training/*_seed*'] [--work-dir runs/site_labels]

1. A scripted listener labels `--windows` windows of demo_data/unlabeled_soundscapes through the page's own
   endpoints (GET /api/next, /api/audio, /api/spectrogram; POST /api/answer) of a review.py server on
   127.0.0.1, with demo_data/unlabeled_soundscapes_labels.csv as its ears. --random-share 1: every window is
   a uniform random draw, so the table is an unbiased site validation set.
2. Each finished run of --runs (best.pt and test_scores.json) scores the folder once (infer.Predictor,
   cached in --work-dir/scores/). Per run: site cmAP5 on the labelled windows with a 95 % bootstrap
   interval (site_validation), cmAP5 on all 192 windows of the folder, best clip validation cmAP5
   (metrics.csv) and the test soundscapes' cmAP5 (test_scores.json).
3. Spearman, over the runs, of each with the test cmAP5; for the site set also its bootstrap interval.

Caveats printed with the result: the runs are bench/self_training.py's (pcen, round1, round2 seeds), a
stand-in for bench/soundscape_recipes.py's recipes, which were not retrained here (CPU); and the self-training
students learnt from pseudo-labels of these same unlabelled files, so the site set is not unseen audio for them.
Written to --work-dir: site_labels.csv (+ .log), listener.json (timings), runs.csv, summary.md.
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import review  # noqa: E402
import site_validation  # noqa: E402
import soundscapes  # noqa: E402

SITE = ROOT / "demo_data" / "unlabeled_soundscapes"
TRUTH = ROOT / "demo_data" / "unlabeled_soundscapes_labels.csv"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=150, help="windows the listener labels")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "self_training" / "*_seed*"),
                        help="glob of run folders (those with best.pt and test_scores.json are used)")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "site_labels"))
    parser.add_argument("--rounds", type=int, default=1000, help="bootstrap resamplings")
    parser.add_argument("--seed", type=int, default=42, help="the random draw of windows")
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


def label_site(work: Path, windows: int, seed: int) -> Path:
    """The listener's table (work/site_labels.csv): served, answered, and the server stopped. A finished
    listener is not run again (its table and timings are kept); an interrupted one continues."""
    done = work / "listener.json"
    if done.is_file() and json.loads(done.read_text())["labelled"] >= windows:
        return work / "site_labels.csv"
    truth_rows, _ = soundscapes.read_soundscape_labels(TRUTH, SITE)
    truth = {(name, float(start)): labels
             for name, start, labels in zip(truth_rows["file"], truth_rows["start_s"], truth_rows["labels"])}
    settings = review.ReviewSettings(soundscapes=str(SITE), out=str(work / "site_labels.csv"), random_share=1.0,
                                     seed=seed, port=0)
    session = review.Review(settings)
    server = review.make_server(session, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        timings = listen(server.server_address[:2], truth, windows)
        timings["minutes"] = (time.perf_counter() - started) / 60
    finally:
        server.shutdown()
        server.server_close()
        session.close()
    (work / "listener.json").write_text(json.dumps(timings, indent=1))
    print(f"listener: {timings['labelled']} windows labelled in {timings['minutes']:.1f} min through the page")
    return work / "site_labels.csv"


def finished_runs(pattern: str) -> list[Path]:
    runs = [Path(folder) for folder in sorted(glob.glob(pattern))
            if (Path(folder) / "best.pt").is_file() and (Path(folder) / "test_scores.json").is_file()]
    if len(runs) < 3:
        raise SystemExit(f"bench/site_labels.py: {len(runs)} finished run(s) match {pattern}; a ranking needs 3+")
    return runs


def run_facts(folder: Path) -> dict:
    """test_cmap5 (test_scores.json) and the best clip validation cmAP5 (metrics.csv, train.py's default monitor)."""
    test = json.loads((folder / "test_scores.json").read_text())
    if test.get("best_mtime_ns") not in (None, (folder / "best.pt").stat().st_mtime_ns):
        logging.warning("%s: best.pt is newer than test_scores.json", folder)
    return {"run": folder.name, "test_cmap5": test["test_cmap5"],
            "clip_cmap5": float(pd.read_csv(folder / "metrics.csv")["cmap5"].max())}


def compare(work: Path, labels: Path, runs: list[Path], rounds: int) -> tuple[pd.DataFrame, dict]:
    random_rows = site_validation.read_site_rows(labels, random_only=True)
    every_row, _ = soundscapes.read_soundscape_labels(TRUTH, SITE)
    scores = site_validation.run_scores(runs, every_row, SITE, cache_dir=work / "scores")
    site = site_validation.site_table(random_rows, scores, rounds=rounds)
    full = site_validation.site_table(every_row, scores, rounds=rounds)
    table = pd.DataFrame([run_facts(folder) for folder in runs])
    table["site_cmap5"], table["site_low"], table["site_high"] = site["site_cmap5"], site["low"], site["high"]
    table["site_rows"] = site["rows"]
    table["all_windows_cmap5"] = full["site_cmap5"]
    agreement = {"site": site_validation.ranking_agreement(site, table["test_cmap5"]),
                 "all_windows": site_validation.ranking_agreement(full, table["test_cmap5"]),
                 "clip": {"spearman": site_validation.spearman(table["clip_cmap5"], table["test_cmap5"])}}
    return table, agreement


def summary(table: pd.DataFrame, agreement: dict, timings: dict | None) -> str:
    site, rows = agreement["site"], int(table["site_rows"].iloc[0])
    lines = ["| run | test cmAP5 | clip val cmAP5 | site cmAP5 (95 % bootstrap) | all 192 windows |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.run} | {r.test_cmap5:.3f} | {r.clip_cmap5:.3f} | {r.site_cmap5:.3f} ({r.site_low:.3f}-"
              f"{r.site_high:.3f}) | {r.all_windows_cmap5:.3f} |" for r in table.itertuples()]
    lines += ["", f"Spearman with the test cmAP5 over {len(table)} runs: site set ({rows} random windows) "
              f"{site['spearman']:.2f} (bootstrap {site['low']:.2f} to {site['high']:.2f}); all 192 windows "
              f"{agreement['all_windows']['spearman']:.2f}; clip validation {agreement['clip']['spearman']:.2f}. "
              "Pseudo-soundscapes: not measured (these runs were trained without --val-soundscapes)."]
    if timings:
        lines += [f"Listener: {timings['labelled']} windows through the page in {timings['minutes']:.1f} min "
                  f"(median spectrogram {timings['spectrogram']['median_s']:.2f} s, answer "
                  f"{timings['answer']['median_s'] * 1000:.0f} ms)."]
    lines += ["", "Caveats: these runs (bench/self_training.py: pcen, round1, round2) stand in for "
              "bench/soundscape_recipes.py's recipes, not retrained here (CPU); the self-training students "
              "trained on pseudo-labels of these same unlabelled files."]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_args_parser().parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = finished_runs(args.runs)
    labels = label_site(work, args.windows, args.seed)
    timings = json.loads((work / "listener.json").read_text())
    table, agreement = compare(work, labels, runs, args.rounds)
    table.to_csv(work / "runs.csv", index=False)
    text = summary(table, agreement, timings)
    (work / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
