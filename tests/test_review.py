"""Tests for review.py: the labelling page's server through a real HTTP client (http.client against a
server on a free port), a killed server process, the window plan, and a headless Chromium driving the
page itself (skipped, saying why, where no browser, driver or selenium can be had).

The site is two synthetic recordings (tone bursts over noise); the checkpoint has random weights
(timm's tiny test_efficientnet), so its suggestions are arbitrary but real.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, write_tone
import metrics
import model as model_lib
import pseudo_labels
import review
import site_validation
import soundscapes

SPECIES = ("aaabbb1", "cccddd1", "eeefff1", "ggghhh1")
SCREENSHOTS = os.environ.get("REVIEW_SCREENSHOTS")   # a folder: the browser test saves its screenshots there too


@pytest.fixture
def site(tmp_path) -> Path:
    """Two recordings: a.wav 20 s (4 windows) and b.wav 12 s (3 windows: the last one 2 s long)."""
    folder = tmp_path / "site"
    folder.mkdir()
    write_tone(folder / "a.wav", 20.0, frequency=2500.0)
    write_tone(folder / "b.wav", 12.0, frequency=5000.0)
    (folder / "notes.txt").write_text("not audio")
    return folder


def random_checkpoint(path: Path) -> Path:
    """A checkpoint of random weights (no training): 4 sigmoid outputs over 2-s windows at 16 kHz."""
    torch.manual_seed(0)
    config = {"backbone": "test_efficientnet", "labels": list(SPECIES), "activation": "sigmoid",
              "sample_rate": 16000, "window_seconds": 2.0, "n_fft": 512, "hop": 256, "n_mels": 32,
              "fmin": 50.0, "fmax": 8000.0, "normalization": "standard", "dropout": 0.0}
    model = model_lib.BirdCallModel(config).eval()
    torch.save({"format": model_lib.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": config}, path)
    return path


def settings(site: Path, out: Path, **changes) -> review.ReviewSettings:
    return review.ReviewSettings(**{"soundscapes": str(site), "out": str(out), "species": SPECIES, "port": 0}
                                 | changes)


@contextlib.contextmanager
def serving(review_settings: review.ReviewSettings):
    """A Review served on a free port in a thread -> (host, port); stopped and closed afterwards."""
    session = review.Review(review_settings)
    server = review.make_server(session, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        session.close()


def request(address, method: str, path: str, body=None, headers=None) -> tuple[int, object]:
    """One request on a new connection -> (status, parsed JSON or raw bytes)."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"} | (headers or {}))
    response = connection.getresponse()
    data = response.read()
    connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(data) if kind == "application/json" else data


def answer(address, file, start_s, value, **extra):
    return request(address, "POST", "/api/answer", {"file": file, "start_s": start_s, "answer": value} | extra)


def next_window(address, client="c"):
    status, body = request(address, "GET", f"/api/next?client={client}")
    assert status == 200
    return body["window"]


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, keep_default_na=False, dtype=str)


# ----------------------------------------------------------------------------- the plan

def test_the_random_share_walks_one_permutation_and_teaching_fills_the_rest():
    windows = [(f"f{i}.ogg", 5.0 * j) for i in range(4) for j in range(10)]                     # 40 windows
    scores = pd.DataFrame(np.random.default_rng(0).random((40, 3)), columns=["x1", "y1", "z1"],
                          index=pd.MultiIndex.from_tuples(windows, names=["file", "start_s"]))
    teaching = review.teaching_order(scores, top_per_species=2)
    assert teaching[0][1].startswith("top:") and teaching[1][1] == "uncertain"
    plan = review.build_plan(windows, teaching, random_share=0.25, seed=1)
    random_part = [window for window, reason in plan if reason == "random"]
    assert random_part == [windows[i] for i in np.random.default_rng(1).permutation(40)]   # every window, in order
    first_twenty = [reason for _, reason in plan[:20]]
    assert first_twenty.count("random") == 5                                               # the share, early on
    taught = [window for window, reason in plan if reason != "random"]
    assert len(taught) == len(set(taught))
    assert {window for window, _ in plan} == set(windows)
    assert review.build_plan(windows, [], 0.5, 1) == [(window, "random") for window in random_part]


# ----------------------------------------------------------------------------- answers over HTTP

def test_answers_are_saved_at_once_in_the_table_the_project_reads(site, tmp_path):
    out = tmp_path / "labels" / "site.csv"
    with serving(settings(site, out)) as address:
        status, state = request(address, "GET", "/api/state")
        assert status == 200 and state["species"] == list(SPECIES) and state["progress"]["windows"] == 7
        first = next_window(address)
        assert first["chosen_by"] == "random" and first["end_s"] == first["start_s"] + 5
        assert next_window(address) == first                        # the same tab gets its window back
        assert answer(address, "a.wav", 5, ["cccddd1", "aaabbb1"])[0] == 200
        assert table(out)["labels"].tolist() == ["aaabbb1 cccddd1"]  # saved before the reply
        for start, value in ((0, "nocall"), (10, "unsure"), (15, "skip")):
            assert answer(address, "b.wav" if start < 10 else "a.wav", start, value)[0] == 200
        status, wav = request(address, "GET", "/api/audio?file=a.wav&start_s=5")
        assert status == 200 and wav[:4] == b"RIFF"
        status, png = request(address, "GET", "/api/spectrogram?file=b.wav&start_s=10")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
        offered = {(next_window(address, f"tab{i}")["file"], next_window(address, f"tab{i}")["start_s"])
                   for i in range(3)}
    assert offered.isdisjoint({("a.wav", 5.0), ("b.wav", 0.0), ("a.wav", 10.0), ("a.wav", 15.0)})
    rows = table(out)
    assert rows.columns.tolist() == review.CSV_COLUMNS
    assert rows[["file", "start_s", "end_s", "labels"]].values.tolist() == [["a.wav", "5", "10", "aaabbb1 cccddd1"],
                                                                           ["b.wav", "0", "5", ""]]
    loaded, audio_dir = soundscapes.read_soundscape_labels(out, site)           # train.py --val-soundscapes
    assert loaded["end_s"].tolist() == [10.0, 5.0] and audio_dir == site
    targets = soundscapes.read_labels(out, list(SPECIES), site)                 # infer.py --labels
    assert targets.loc["a_10"].tolist() == [1, 1, 0, 0] and targets.loc["b_5"].sum() == 0
    assert review.export_rows(out, tmp_path / "random.csv", random_only=True) == 2
    review.main(["--out", str(out), "--export-all", str(tmp_path / "all.csv")])
    assert pseudo_labels.read_table(tmp_path / "all.csv")[0]["labels"].tolist() == ["aaabbb1 cccddd1", ""]
    rows, species = pseudo_labels.read_table(out)            # train.py --soundscape-labels takes the table itself
    assert species == [] and rows["labels"].tolist() == ["aaabbb1 cccddd1", ""]


def test_two_tabs_answering_at_once_get_different_windows_and_lose_nothing(site, tmp_path):
    out = tmp_path / "site.csv"
    shown = {"left": [], "right": []}

    def tab(name):
        while (window := next_window(address, name)) is not None:
            shown[name].append((window["file"], window["start_s"]))
            assert answer(address, window["file"], window["start_s"], [SPECIES[len(shown[name]) % 4]])[0] == 200

    with serving(settings(site, out)) as address:
        tabs = [threading.Thread(target=tab, args=(name,)) for name in shown]
        for thread in tabs:
            thread.start()
        for thread in tabs:
            thread.join(120)
        progress = request(address, "GET", "/api/state")[1]["progress"]
    answered = shown["left"] + shown["right"]
    assert sorted(answered) == sorted(set(answered)) and len(answered) == 7     # each window once
    assert progress["labelled"] == 7 == len(table(out))
    log_lines = (tmp_path / "site.csv.log").read_text().splitlines()
    assert len(log_lines) == 7 and all(json.loads(line)["answer"] == "species" for line in log_lines)


HOSTILE = [
    ("unknown species", {"file": "a.wav", "start_s": 0, "answer": ["notabird"]}, {}, 400),
    ("species and nocall", {"file": "a.wav", "start_s": 0, "answer": ["aaabbb1", "nocall"]}, {}, 400),
    ("no species", {"file": "a.wav", "start_s": 0, "answer": []}, {}, 400),
    ("climbing path", {"file": "../site/a.wav", "start_s": 0, "answer": "nocall"}, {}, 404),
    ("absolute path", {"file": "/etc/passwd", "start_s": 0, "answer": "nocall"}, {}, 404),
    ("not audio of the folder", {"file": "notes.txt", "start_s": 0, "answer": "nocall"}, {}, 404),
    ("no such window", {"file": "b.wav", "start_s": 15, "answer": "nocall"}, {}, 400),
    ("start not a number", {"file": "a.wav", "start_s": "zero", "answer": "nocall"}, {}, 400),
    ("not an object", ["a.wav", 0, "nocall"], {}, 400),
    ("malformed JSON", b'{"file": "a.wav", "start_s": 0, "answer": "nocall"', {}, 400),
    ("huge body", b"{}", {"Content-Length": str(10 ** 9)}, 413),
    ("form post from another site", b"file=a.wav", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("foreign Host header", {"file": "a.wav", "start_s": 0, "answer": "nocall"}, {"Host": "evil.example:80"}, 403),
]


@pytest.mark.parametrize("body, headers, status", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_answers_are_refused_and_nothing_is_written(site, tmp_path, body, headers, status):
    out = tmp_path / "site.csv"
    with serving(settings(site, out)) as address:
        assert answer(address, "a.wav", 5, "nocall")[0] == 200
        before = out.read_bytes(), (tmp_path / "site.csv.log").read_bytes()
        got, reply = request(address, "POST", "/api/answer", body, headers)
        assert got == status and "error" in reply
        assert (out.read_bytes(), (tmp_path / "site.csv.log").read_bytes()) == before
        assert request(address, "GET", "/api/state")[0] == 200                 # still serving


@pytest.mark.parametrize("query", ["file=../site/a.wav&start_s=0", "file=%2Fetc%2Fpasswd&start_s=0",
                                   "file=notes.txt&start_s=0", "file=a.wav&start_s=2.5", "file=a.wav"])
def test_audio_and_spectrograms_only_of_the_folders_windows(site, tmp_path, query):
    with serving(settings(site, tmp_path / "site.csv")) as address:
        for endpoint in ("audio", "spectrogram"):
            status, reply = request(address, "GET", f"/api/{endpoint}?{query}")
            assert status in (400, 404) and "error" in reply


# ----------------------------------------------------------------------------- a killed server

def start_server(site: Path, out: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
    """review.py as its own process on a free port -> (process, address), once it printed its URL."""
    process = subprocess.Popen([sys.executable, str(ROOT / "review.py"), "--soundscapes", str(site), "--out", str(out),
                                "--species", *SPECIES, "--port", "0"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        found = re.match(r"review: http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return process, ("127.0.0.1", int(found.group(1)))
    raise AssertionError(f"review.py ended without a URL (exit {process.wait()})")


def test_a_killed_server_loses_no_saved_answer_and_a_restart_continues(site, tmp_path):
    out = tmp_path / "site.csv"
    process, address = start_server(site, out)
    try:
        saved = []
        for value in (["aaabbb1"], "nocall", ["eeefff1", "ggghhh1"]):
            window = next_window(address)
            assert answer(address, window["file"], window["start_s"], value)[0] == 200
            saved.append((window["file"], window["start_s"]))
        shown = next_window(address)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        process.stdout.close()
    assert [(row.file, float(row.start_s)) for row in table(out).itertuples()] == saved
    with open(tmp_path / "site.csv.log", "a") as handle:     # a kill in the middle of a write
        handle.write('{"file": "a.wav", "start_s"')
    process, address = start_server(site, out)
    try:
        assert next_window(address, "new-tab") == shown                   # the plan goes on where it stopped
        assert answer(address, shown["file"], shown["start_s"], "nocall")[0] == 200
        progress = request(address, "GET", "/api/state")[1]["progress"]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        process.stdout.close()
    assert progress["labelled"] == 4 and len(table(out)) == 4
    assert [json.loads(line)["start_s"] for line in (tmp_path / "site.csv.log").read_text().splitlines()
            if line.endswith("}")][-1] == shown["start_s"]


def test_a_second_server_on_the_same_output_is_refused(site, tmp_path):
    with serving(settings(site, tmp_path / "site.csv")):
        with pytest.raises(ValueError, match="held by another review.py"):
            review.Review(settings(site, tmp_path / "site.csv"))


# ----------------------------------------------------------------------------- with a checkpoint

def test_a_checkpoint_suggests_species_chooses_windows_to_teach_and_is_scored_once(site, tmp_path, caplog):
    checkpoint = random_checkpoint(tmp_path / "random.pt")
    out = tmp_path / "site.csv"
    chosen = settings(site, out, ckpts=(str(checkpoint),), species=(), random_share=0.5, top_per_species=1)
    with serving(chosen) as address:
        state = request(address, "GET", "/api/state")[1]
        assert state["species"] == list(SPECIES) and state["model"]
        reasons = []
        while (window := next_window(address)) is not None:
            assert len(window["suggestions"]) == 4 and window["suggestions"][0][1] >= window["suggestions"][1][1]
            reasons.append(window["chosen_by"])
            assert answer(address, window["file"], window["start_s"], "nocall")[0] == 200
        status, png = request(address, "GET", "/api/spectrogram?file=a.wav&start_s=0")
        assert status == 200 and png[:4] == b"\x89PNG"
    assert reasons[0] == "random" and reasons[1].startswith("top:")
    assert {"uncertain", "random"} <= set(reasons) and len(reasons) <= 7
    rows = table(out)
    assert (rows["chosen_by"] == "random").sum() >= 3        # teaching windows the draw reached count as random
    assert review.scores_cache_paths(out)[0].is_file()
    with caplog.at_level("INFO", logger="birdclef"):
        review.Review(chosen).close()
    assert "scoring" not in caplog.text                     # the cached scores were used


def test_the_random_rows_are_exactly_the_random_draws_reached_so_far(site, tmp_path):
    """Teaching windows that the random draw reaches later become random rows, and only those: stopped at any
    point, the random rows are the permutation's prefix (an unbiased sample), never a teaching choice."""
    checkpoint = random_checkpoint(tmp_path / "random.pt")
    session = review.Review(settings(site, tmp_path / "site.csv", ckpts=(str(checkpoint),), species=(),
                                     random_share=0.3, top_per_species=2))
    try:
        for count in range(1, 7):
            window = session.next_window("tab")
            key = (window["file"], window["start_s"])
            session.answer({"file": key[0], "start_s": key[1], "answer": "nocall"})
            reached = max(index for index, entry in enumerate(session.plan) if entry == (key, window["chosen_by"]))
            drawn = {entry[0] for entry in session.plan[:reached + 1] if entry[1] == "random"}
            rows = table(tmp_path / "site.csv")
            assert set(zip(rows["file"][rows["chosen_by"] == "random"],
                           rows["start_s"][rows["chosen_by"] == "random"].astype(float))) == drawn
            assert len(rows) == count
        assert {"random", "uncertain"} <= set(rows["chosen_by"]) and rows["chosen_by"].str.startswith("top:").any()
    finally:
        session.close()


def test_bad_input_ends_in_one_line(site, tmp_path, capsys):
    for argv, message in ((["--soundscapes", str(tmp_path / "nope")], "not a folder"),
                          (["--soundscapes", str(site), "--random-share", "2"], "expected a share"),
                          (["--soundscapes", str(site), "--ckpts", str(tmp_path / "none.pt")], "none.pt"),
                          (["--export-random", str(tmp_path / "r.csv")], "x.csv"),
                          ([], "--soundscapes is required")):
        with pytest.raises(SystemExit) as exited:
            review.main(["--out", str(tmp_path / "x.csv"), *argv])
        assert message in str(exited.value.code) and "\n" not in str(exited.value.code)
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- the site set as a validation

def test_a_site_cmap5_has_a_bootstrap_interval_that_narrows_with_more_windows():
    rng = np.random.default_rng(0)

    def measured(n):
        targets = (rng.random((n, 5)) < 0.2).astype(int)                               # (n, species)
        return site_validation.bootstrap_cmap5(targets, np.clip(0.3 * targets + 0.7 * rng.random((n, 5)), 0, 1),
                                               rounds=200)

    for _ in range(20):                    # the bootstrap's fast cmAP5 is metrics.padded_cmap, ties included
        targets, scores = (rng.random((30, 4)) < 0.3).astype(int), np.round(rng.random((30, 4)), 1)
        draw = rng.integers(0, 30, 30)
        assert site_validation.padded_cmap5(targets[draw], scores[draw]) == pytest.approx(
            metrics.padded_cmap(targets[draw], scores[draw], 5), abs=1e-12)
    small, large = measured(40), measured(640)
    assert small["low"] <= small["site_cmap5"] <= small["high"] and small["rows"] == 40
    # narrower, though not by sqrt(16): padding (5 all-positive rows) squeezes a small set's cmAP5 towards 1
    assert large["high"] - large["low"] < small["high"] - small["low"]


def test_the_site_report_scores_runs_on_the_random_rows_only(site, tmp_path):
    rows = [("a.wav", start, labels, "random") for start, labels in ((0, "aaabbb1"), (5, ""), (10, "eeefff1"))]
    rows += [("b.wav", 0, "ggghhh1", "top:ggghhh1")]
    labels = tmp_path / "site.csv"
    pd.DataFrame([{"file": name, "start_s": start, "end_s": start + 5, "labels": codes, "chosen_by": reason,
                   "answered_at": ""} for name, start, codes, reason in rows]).to_csv(labels, index=False)
    folders = []
    for number, clip in enumerate((0.7, 0.9, 0.8)):
        folder = tmp_path / f"run{number}"
        folder.mkdir()
        random_checkpoint(folder / "best.pt")
        pd.DataFrame({"cmap5": [clip - 0.1, clip]}).to_csv(folder / "metrics.csv", index=False)
        folders.append(str(folder))
    report = tmp_path / "report"
    report.mkdir()
    table = site_validation.site_report(folders, labels, site, report, rounds=50)
    assert table["rows"].tolist() == [3, 3, 3] and table["clip_cmap5"].tolist() == [0.7, 0.9, 0.8]
    assert (table["low"] <= table["site_cmap5"]).all() and (table["site_cmap5"] <= table["high"]).all()
    assert (report / "site_validation.csv").is_file() and len(list((report / "site_scores").glob("*.csv"))) == 3
    ranked = site_validation.site_table(site_validation.read_site_rows(labels), {
        name: pd.DataFrame(quality, index=pd.MultiIndex.from_tuples([("a.wav", 0.0), ("a.wav", 5.0), ("a.wav", 10.0)]),
                           columns=list(SPECIES))
        for name, quality in (("worst", np.eye(3, 4)[::-1]), ("best", np.eye(3, 4)))}, rounds=20)
    assert ranked.set_index("run")["site_cmap5"].idxmax() == "best"
    assert site_validation.ranking_agreement(ranked, [0.1, 0.9])["spearman"] == 1.0


# ----------------------------------------------------------------------------- the page in a real browser

def chromium_driver():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=980,680",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(flag)
    try:       # the driver on PATH: selenium must not try to download one
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except Exception as error:          # selenium's WebDriverException: no display, a driver of another version...
        pytest.skip(f"Chromium did not start: {str(error).splitlines()[0]}")


def save_screenshot(driver, tmp_path: Path, name: str) -> None:
    """The page as a small PNG (palette of 64 colours) in tmp_path, and in $REVIEW_SCREENSHOTS if set."""
    from PIL import Image                   # matplotlib's own dependency
    driver.execute_script("window.scrollTo(0, 0)")
    image = Image.open(__import__("io").BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    small = image.quantize(colors=64)
    for folder in filter(None, (tmp_path, SCREENSHOTS)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        small.save(Path(folder) / name, optimize=True)


class Page:
    """The review page in a driven browser: what it shows, and answers that wait for the next window."""

    def __init__(self, driver, tmp_path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver, self.tmp_path, self.by = driver, tmp_path, By
        self.wait = WebDriverWait(driver, 60).until
        self.expected = {}                      # (file, start_s as shown) -> labels the CSV must hold

    def find(self, selector: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, selector)

    def script(self, code: str):
        return self.driver.execute_script(code)

    def shown(self) -> tuple[str, str]:
        return self.find("#file").text, self.find("#seconds").text

    def loaded(self) -> None:
        self.wait(lambda _: self.shown()[0] and self.script("return document.getElementById('spectrogram').complete"))

    def answer_with(self, action, labels) -> None:
        before = self.shown()
        self.expected[(before[0], before[1].split("–")[0])] = labels
        action()
        self.wait(lambda _: self.shown() != before or self.find("#done").is_displayed())
        assert self.find("#message").text == ""

    def click_species(self, *codes) -> None:
        for code in codes:
            self.find(f"#species button[data-code='{code}']").click()
        save_screenshot(self.driver, self.tmp_path, "review.png")
        self.find("#save").click()

    def search_and_save(self, text: str) -> None:
        body = self.find("body")
        body.send_keys("/")
        self.driver.switch_to.active_element.send_keys(text)
        save_screenshot(self.driver, self.tmp_path, "review-search.png")
        self.driver.switch_to.active_element.send_keys("\n")       # picks the first match
        body.send_keys("\n")                                        # saves


def test_the_page_in_chromium_plays_answers_by_click_and_key_and_survives_a_reload(site, tmp_path):
    driver = chromium_driver()
    out = tmp_path / "site.csv"
    chosen = settings(site, out, ckpts=(str(random_checkpoint(tmp_path / "random.pt")),), species=())
    try:
        with serving(chosen) as (host, port):
            page = Page(driver, tmp_path)
            driver.get(f"http://{host}:{port}/")
            page.loaded()
            # the audio loads and plays (the window plus its context), without a media error
            page.wait(lambda _: page.script("return document.getElementById('player').readyState >= 2"))
            page.find("#play").click()
            page.wait(lambda _: page.script("return document.getElementById('player').currentTime > 0"))
            no_error, duration = page.script("const p = document.getElementById('player');"
                                             "return [p.error === null, p.duration];")
            assert no_error and 5.0 <= duration <= 7.1
            body = page.find("body")
            page.answer_with(lambda: page.click_species("eeefff1", "aaabbb1"), "aaabbb1 eeefff1")
            first_suggestion = page.script("return current.suggestions[0][0]")
            page.answer_with(lambda: (body.send_keys("1"), body.send_keys("\n")), first_suggestion)
            page.answer_with(lambda: body.send_keys("n"), "")
            page.answer_with(lambda: page.search_and_save("gggh"), "ggghhh1")
            unsure = page.shown()
            body.send_keys("u")                                       # kept in the log only: no row
            page.wait(lambda _: page.shown() != unsure)
            after_reload = page.shown()
            driver.refresh()
            page.loaded()
            assert page.shown() == after_reload                      # the tab gets its unanswered window back
            assert page.find("#progress").text.startswith("4 labelled")
    finally:
        driver.quit()
    rows = table(out)
    assert {(row.file, row.start_s): row.labels for row in rows.itertuples()} == page.expected
    assert len(rows) == 4
