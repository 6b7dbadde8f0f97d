"""A local page for labelling a site's 5-s soundscape windows by ear.

    python review.py --soundscapes SITE_DIR --out site_labels.csv [--ckpts runs/a] [--random-share 0.5]

Opens http://127.0.0.1:PORT/ (nothing leaves the machine): one window at a time, its spectrogram (the
checkpoint's own frontend, so what you see is what the model hears; else a plain log-mel), the audio with
a little context, the model's top suggestions, and buttons and keys for the vocabulary, "no call",
"unsure" and "skip". Why each window is shown is recorded in `chosen_by`:

- "random": a seeded uniform draw over every 5-s window of the folder (`--random-share` of the answers).
  These rows alone are an unbiased site validation set (`--export-random`, or the filter
  chosen_by == "random"). A window first shown to teach and later reached by the random draw counts as
  random from then on, so the random rows are exactly a prefix of one random permutation.
- "uncertain": with --ckpts, the windows whose species score lies nearest 0.5;
  "top:<species>": each species' highest-scoring windows, to confirm or reject.

Every answer is one JSON line appended to `<out>.log` (flushed and fsynced) and then compacted into
`<out>` atomically, so a killed server loses nothing and a restart continues the same plan. `<out>`
has the rows file,start_s,end_s,labels (space-separated codes, empty for no call: the table
train.py --val-soundscapes and infer.py --labels read), chosen_by, answered_at; "unsure" and "skip"
stay in the log only (they are no label), and are not offered again. `--export-random CSV` and
`--export-all CSV` write the random or all labelled rows as a plain file,start_s,end_s,labels table, which
train.py --soundscape-labels also reads (it would take chosen_by for a species column).
"""
from __future__ import annotations

import argparse
import datetime
import http.server
import io
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

import audio
import cli
import outputs
import soundscapes

try:                           # POSIX: one server per output file; elsewhere the check is skipped
    import fcntl
except ImportError:            # pragma: no cover
    fcntl = None

log = logging.getLogger("birdclef")

PAGE = Path(__file__).resolve().parent / "review_page.html"
CSV_COLUMNS = ["file", "start_s", "end_s", "labels", "chosen_by", "answered_at"]
NOT_LABELS = ("unsure", "skip")       # answers kept in the log only: not offered again, no row in <out>
MAX_BODY = 64 * 1024                  # an answer is a few hundred bytes; a bigger body is refused unread
LEASE_SECONDS = 600.0                 # a window shown in one tab is not shown in another for this long
# the spectrogram without a checkpoint: a plain log-mel in dB (frontend.MelFrontend's settings)
PLAIN_MEL = {"sample_rate": 32000, "n_fft": 1024, "hop": 320, "n_mels": 128, "fmin": 50.0, "fmax": 14000.0,
             "normalization": "none", "frontend": "mel"}


class RequestError(ValueError):
    """A request refused with this HTTP status and a one-line reason; nothing was written."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReviewSettings:
    soundscapes: str
    out: str
    ckpts: tuple[str, ...] = ()
    species: tuple[str, ...] = ()               # the vocabulary; empty: the checkpoints' or --data-dir's
    data_dirs: tuple[str, ...] = (str(cli.DEMO_DIR),)
    random_share: float = 0.5
    seed: int = 42
    top_per_species: int = 3
    suggestions: int = 5
    context_seconds: float = 1.0
    port: int = 8765

    def check(self) -> None:
        if not Path(self.soundscapes).is_dir():
            raise ValueError(f"--soundscapes {self.soundscapes}: not a folder")
        if not 0.0 <= self.random_share <= 1.0:
            raise ValueError(f"--random-share {self.random_share}: expected a share in [0, 1]")
        if self.top_per_species < 0 or self.suggestions < 0 or self.context_seconds < 0:
            raise ValueError("--top-per-species, --suggestions and --context-seconds must be >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: expected 0 (any free port) to 65535")


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def seconds_text(value: float) -> str:
    """5.0 -> "5": the label tables' own spelling of a row's seconds."""
    return f"{float(value):g}"


# ----------------------------------------------------------------------------- the folder's windows

def folder_windows(folder) -> tuple[dict[str, Path], list[tuple[str, float]]]:
    """The audio files directly in `folder` -> ({name: path}, every (name, start_s) of infer.py's 5-s grid).
    Only these names are ever served: a request naming anything else is refused."""
    paths = audio.audio_files(folder, recursive=False)
    headers, bad = audio.check_audio_files(paths)
    for name, reason in bad:
        log.warning("review: skipping %s: %s", name, reason)
    files, windows = {}, []
    for path, header in zip(paths, headers):
        if header:
            files[path.name] = path
            windows += [(path.name, soundscapes.ROW_SECONDS * row) for row in range(soundscapes.row_count(*header))]
    if not windows:
        raise ValueError(f"--soundscapes {folder}: no readable audio file (ogg, mp3, flac, wav) in it")
    return files, windows


def scores_cache_paths(out) -> tuple[Path, Path]:
    out = Path(out)
    return out.with_name(out.name + ".scores.csv"), out.with_name(out.name + ".scores.json")


def folder_scores(ckpts, files: dict[str, Path], out) -> pd.DataFrame:
    """Each window's species scores (index (file, start_s), one column per species), scored once with
    infer.Predictor and cached beside `out` (reused while the checkpoints and files are the same)."""
    table_path, meta_path = scores_cache_paths(out)
    key = {"ckpts": [str(Path(c).resolve()) for c in ckpts], "files": sorted(files),
           "mtimes": [os.stat(infer_checkpoint(c)).st_mtime_ns for c in ckpts]}
    if table_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == key:
        table = pd.read_csv(table_path, keep_default_na=False)
    else:
        import infer                  # torch and timm load only when a model is asked for
        log.info("review: scoring %d file(s) with %d checkpoint(s) (cached in %s)", len(files), len(ckpts),
                 table_path)
        table = infer.Predictor(list(ckpts)).predict(list(files.values())).reset_index()
        outputs.write_atomic(table_path, lambda path: table.to_csv(path, index=False))
        outputs.write_atomic(meta_path, lambda path: path.write_text(json.dumps(key)))
    table["start_s"] = table["start_s"].astype(float)
    return table.drop(columns="end_s").set_index(["file", "start_s"])


def infer_checkpoint(path) -> Path:
    import infer
    return infer.checkpoint_path(path)


# ----------------------------------------------------------------------------- which windows, in which order

def teaching_order(scores: pd.DataFrame, top_per_species: int) -> list[tuple[tuple[str, float], str]]:
    """Windows worth teaching with, best first: alternately the least sure (some species' score nearest
    0.5) and, rank by rank over the species, each species' top-scoring windows."""
    values = scores.to_numpy(dtype=np.float64)                        # (windows, species)
    keys = list(scores.index)
    closeness = np.minimum(values, 1.0 - values).max(axis=1)           # (windows,): 0.5 = a coin toss
    uncertain = [(keys[i], "uncertain") for i in np.argsort(-closeness, kind="stable")]
    k = min(top_per_species, len(keys))
    ranked = np.argsort(-values, axis=0, kind="stable")[:k]            # (k, species): best windows first
    tops = [(keys[ranked[rank, column]], f"top:{species}")
            for rank in range(k) for column, species in enumerate(scores.columns)]
    merged = []
    for index in range(max(len(uncertain), len(tops))):
        merged += [item[index] for item in (tops, uncertain) if index < len(item)]
    return merged


def build_plan(windows, teaching, random_share: float, seed: int) -> list[tuple[tuple[str, float], str]]:
    """(window, chosen_by) in the order they are offered: `random_share` of the entries walk one seeded
    permutation of all windows, the others the teaching list (windows already planned are not planned
    twice). A random entry whose window an earlier teaching entry holds is kept: when it is reached, that
    answer becomes a random one (Review.next_window), so the random rows are exactly the permutation's prefix."""
    permutation = [windows[i] for i in np.random.default_rng(seed).permutation(len(windows))]
    plan, planned, n_random, next_random, next_teaching = [], set(), 0, 0, 0
    while next_random < len(permutation) or next_teaching < len(teaching):
        # Bresenham: a random entry whenever the random entries fall below their share
        random_turn = n_random < random_share * (len(plan) + 1) or next_teaching >= len(teaching)
        if random_turn and next_random < len(permutation):
            window, reason = permutation[next_random], "random"
            next_random, n_random = next_random + 1, n_random + 1
        else:
            (window, reason), next_teaching = teaching[next_teaching], next_teaching + 1
            if window in planned:
                continue
        plan.append((window, reason))
        planned.add(window)
    return plan


# ----------------------------------------------------------------------------- answers: log and table

class AnswerStore:
    """The answers so far, keyed (file, start_s). Each is appended to the log (one JSON line, flushed and
    fsynced) before the call returns, then the table is rewritten atomically; one lock orders the writers
    of this process, and an exclusive file lock refuses a second server on the same output."""

    def __init__(self, out):
        self.out = Path(out)
        self.log_path = self.out.with_name(self.out.name + ".log")
        self.lock = threading.RLock()
        self.answers: dict[tuple[str, float], dict] = {}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.log_path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.handle.close()
                raise ValueError(f"{self.log_path} is held by another review.py; stop it first") from None
        self.replay()
        self.compact()

    def replay(self) -> None:
        """Read the log back; a line cut short by a kill mid-write (only ever the last) is dropped."""
        self.handle.seek(0)
        text = self.handle.read()
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                self.apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d: unreadable (a write cut short?); ignored", self.log_path, number)
        if text and not text.endswith("\n"):
            self.handle.write("\n")         # the next record starts on a line of its own

    def apply(self, record: dict) -> None:
        key = (str(record["file"]), float(record["start_s"]))
        if record.get("relabel"):
            self.answers[key]["chosen_by"] = record["relabel"]
        else:
            self.answers[key] = {name: record[name] for name in (*CSV_COLUMNS, "answer")}

    def append(self, record: dict) -> None:
        """Durable first (log), then visible (table): a kill between the two is repaired on restart."""
        with self.lock:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.apply(record)
            self.compact()

    def labelled_rows(self) -> pd.DataFrame:
        rows = [answer | {"start_s": seconds_text(answer["start_s"]), "end_s": seconds_text(answer["end_s"])}
                for answer in self.answers.values() if answer["answer"] not in NOT_LABELS]
        return pd.DataFrame(rows, columns=CSV_COLUMNS)

    def compact(self) -> None:
        table = self.labelled_rows()
        outputs.write_atomic(self.out, lambda path: table.to_csv(path, index=False))

    def counts(self) -> dict:
        answers = list(self.answers.values())
        return {"answered": len(answers),
                "labelled": sum(a["answer"] not in NOT_LABELS for a in answers),
                "random_labelled": sum(a["answer"] not in NOT_LABELS and a["chosen_by"] == "random"
                                       for a in answers),
                "unsure": sum(a["answer"] == "unsure" for a in answers),
                "skipped": sum(a["answer"] == "skip" for a in answers)}

    def close(self) -> None:
        self.handle.close()          # also releases the file lock


def export_rows(out, destination, random_only: bool) -> int:
    """The labelled rows of `out` (random_only: the random draws, the unbiased validation set) as a plain
    file,start_s,end_s,labels table -> `destination`; their count. Every reader of labelled windows takes
    it, train.py --soundscape-labels included (which would read chosen_by as a species column)."""
    table = pd.read_csv(out, keep_default_na=False, dtype=str)
    missing = set(CSV_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{out}: not a review.py table (missing columns {sorted(missing)})")
    chosen = table[table["chosen_by"] == "random"] if random_only else table
    outputs.write_atomic(Path(destination), lambda path: chosen[CSV_COLUMNS[:4]].to_csv(path, index=False))
    return len(chosen)


# ----------------------------------------------------------------------------- the review session

class Review:
    """The folder, its plan, the vocabulary and the answers: everything the page's requests need."""

    def __init__(self, settings: ReviewSettings):
        settings.check()
        self.settings = settings
        self.files, windows = folder_windows(settings.soundscapes)
        self.windows = set(windows)
        self.scores = folder_scores(settings.ckpts, self.files, settings.out) if settings.ckpts else None
        self.species = list(settings.species) or vocabulary(settings.ckpts, self.scores, settings.data_dirs)
        self.species_set = set(self.species)
        if settings.random_share < 1.0 and self.scores is None:
            log.warning("review: without --ckpts every window is drawn at random")
        teaching = teaching_order(self.scores, settings.top_per_species) if self.scores is not None else []
        self.plan = build_plan(windows, teaching, settings.random_share, settings.seed)
        self.first_reason = {}
        for window, reason in self.plan:
            self.first_reason.setdefault(window, reason)
        self.frontend, self.frontend_rate = spectrogram_frontend(settings.ckpts)
        self.leases: dict[str, tuple[tuple[str, float], float]] = {}   # client -> (window, when shown)
        self.cursor = 0                                                # plan entries before it are done
        self.store = AnswerStore(settings.out)

    def resolved(self, window, reason) -> bool:
        answer = self.store.answers.get(window)
        return answer is not None and (reason != "random" or answer["chosen_by"] == "random")

    def next_window(self, client: str) -> dict | None:
        """The window this tab should show: its own unanswered one, else the plan's first window that is
        neither answered nor shown in another tab. None when every window is answered."""
        with self.store.lock:
            held = self.leases.get(client)
            if held and held[0] not in self.store.answers:
                return self.describe(held[0], self.first_reason[held[0]])
            now = time.monotonic()
            busy = {window for other, (window, since) in self.leases.items()
                    if other != client and now - since < LEASE_SECONDS}
            for index in range(self.cursor, len(self.plan)):
                window, reason = self.plan[index]
                answer = self.store.answers.get(window)
                if reason == "random" and answer is not None and answer["chosen_by"] != "random":
                    # the random draw reached a window already answered to teach: it is a random row too
                    self.store.append({"file": window[0], "start_s": window[1], "relabel": "random",
                                       "at": now_text()})
                if index == self.cursor and self.resolved(window, reason):
                    self.cursor += 1
                if answer is None and window not in busy:
                    self.leases[client] = (window, now)
                    return self.describe(window, reason)
            return None

    def describe(self, window, reason) -> dict:
        name, start = window
        suggestions = []
        if self.scores is not None and self.settings.suggestions and window in self.scores.index:
            row = self.scores.loc[window]
            best = row.nlargest(self.settings.suggestions)
            suggestions = [[species, round(float(score), 4)] for species, score in best.items()]
        return {"file": name, "start_s": start, "end_s": start + soundscapes.ROW_SECONDS, "chosen_by": reason,
                "suggestions": suggestions}

    def check_window(self, name, start) -> tuple[str, float]:
        """A (file, start_s) of the request -> the folder's window, or a 4xx: names outside the folder's own
        audio files (a path, '..', an absolute name) are never opened."""
        try:
            window = (str(name), float(start))
        except (TypeError, ValueError):
            raise RequestError(400, f"start_s {start!r} is not a number") from None
        if window[0] not in self.files:
            raise RequestError(404, f"{window[0]!r} is not an audio file of --soundscapes")
        if window not in self.windows:
            raise RequestError(400, f"{window[0]} has no 5-s window starting at {start!r} s")
        return window

    def answer(self, payload) -> dict:
        """An answer {"file", "start_s", "answer": [codes] | "nocall" | "unsure" | "skip"} -> saved; the counts."""
        if not isinstance(payload, dict):
            raise RequestError(400, "expected a JSON object")
        window = self.check_window(payload.get("file"), payload.get("start_s"))
        kind, labels = parse_answer(payload.get("answer"), self.species_set)
        with self.store.lock:
            # a window the random draw already reached stays a random row when it is answered again
            earlier = self.store.answers.get(window, {}).get("chosen_by")
            self.store.append({"file": window[0], "start_s": window[1],
                               "end_s": window[1] + soundscapes.ROW_SECONDS, "labels": labels,
                               "chosen_by": "random" if earlier == "random" else self.first_reason[window],
                               "answered_at": now_text(), "answer": kind})
        return self.progress()

    def progress(self) -> dict:
        with self.store.lock:
            return self.store.counts() | {"windows": len(self.windows)}

    def close(self) -> None:
        self.store.close()


def parse_answer(answer, species: set[str]) -> tuple[str, str]:
    """The answer of a request -> (kind: "species", "nocall", "unsure" or "skip"; labels: space-separated
    codes, empty for no call and the rest); anything else is a 400."""
    if answer in ("nocall", "unsure", "skip"):
        return answer, ""
    if not isinstance(answer, list) or not answer or not all(isinstance(code, str) for code in answer):
        raise RequestError(400, "answer: expected a non-empty list of species codes, or nocall, unsure, skip")
    unknown = sorted(set(answer) - species)
    if unknown:
        raise RequestError(400, f"answer: {unknown[:5]} are not species of the vocabulary")
    return "species", " ".join(sorted(set(answer)))


def vocabulary(ckpts, scores: pd.DataFrame | None, data_dirs) -> list[str]:
    """The species to offer: the checkpoints' output columns, else the training data's vocabulary."""
    if scores is not None:
        return list(scores.columns)
    import data                       # reads the training metadata only
    return [code for code in data.read_training_data(list(data_dirs))[1] if code != soundscapes.NOCALL]


def spectrogram_frontend(ckpts):
    """The first checkpoint's own frontend layer (model.py), else a plain log-mel -> (module, its rate)."""
    import frontend as frontend_lib
    if ckpts:
        import model as model_lib
        config = model_lib.read_checkpoint(infer_checkpoint(ckpts[0]))["model_config"]
    else:
        config = PLAIN_MEL
    return frontend_lib.build_frontend(config).eval(), int(config["sample_rate"])


# ----------------------------------------------------------------------------- what the page plays and shows

def window_wav(path, start: float, context: float) -> tuple[bytes, float]:
    """The 5-s window with up to `context` seconds each side, at the file's own rate and channels ->
    (16-bit WAV bytes, seconds of context before the window)."""
    with sf.SoundFile(path) as source:
        rate = source.samplerate
        first = max(int(round((start - context) * rate)), 0)
        last = min(int(round((start + soundscapes.ROW_SECONDS + context) * rate)), source.frames)
        source.seek(min(first, source.frames))
        samples = source.read(max(last - first, 0), dtype="float32", always_2d=True)   # (frames, channels)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue(), start - first / rate


def spectrogram_png(path, start: float, frontend, sample_rate: int) -> bytes:
    """The 5-s window through `frontend` (the model's image, (1, 1, n_mels, frames)) -> a PNG."""
    import torch
    from matplotlib.figure import Figure           # no pyplot: each request draws on its own figure
    waveform = audio.read_window(path, start, soundscapes.ROW_SECONDS, sample_rate)          # (samples,)
    with torch.no_grad():
        image = frontend(torch.from_numpy(waveform)[None])[0, 0].float().numpy()              # (n_mels, frames)
    figure = Figure(figsize=(8, 2.5), dpi=80)
    axes = figure.add_axes((0, 0, 1, 1))
    # colours from the 20th to the 99.5th percentile: the steady background dark, calls bright, one click not all
    axes.imshow(image, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                vmin=float(np.percentile(image, 20)), vmax=float(np.percentile(image, 99.5)))
    axes.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the HTTP server

class Handler(http.server.BaseHTTPRequestHandler):
    """GET /, /api/state, /api/next?client=, /api/audio?file=&start_s=, /api/spectrogram?file=&start_s=;
    POST /api/answer (JSON). A refused request is a 4xx with {"error": one line}, and writes nothing."""

    server_version = "review.py"

    def log_message(self, format, *values):          # noqa: A002 (the base class's name)
        log.debug("review: " + format, *values)

    def send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, value) -> None:
        self.send(status, json.dumps(value).encode(), "application/json")

    def check_host(self) -> None:
        """Only this machine's names: a web page elsewhere cannot reach the server by DNS rebinding."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RequestError(403, f"Host {host!r} refused: open the printed 127.0.0.1 address")

    def do_GET(self):                                # noqa: N802 (http.server's name)
        self.respond(self.get)

    def do_POST(self):                               # noqa: N802
        self.respond(self.post)

    def respond(self, method) -> None:
        try:
            self.check_host()
            method(urllib.parse.urlsplit(self.path))
        except RequestError as error:
            self.close_connection = True             # an unread body must not be taken for a request
            self.send_json(error.status, {"error": str(error)})
        except Exception as error:                   # a bug or an unreadable file: said, not a dead tab
            log.exception("review: %s failed", self.path)
            self.send_json(500, {"error": f"{type(error).__name__}: {error}"})

    def get(self, url) -> None:
        review: Review = self.server.review
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path in ("/", "/index.html"):
            self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/state":
            self.send_json(200, {"species": review.species, "progress": review.progress(),
                                 "model": bool(review.settings.ckpts), "out": str(review.settings.out),
                                 "context_seconds": review.settings.context_seconds})
        elif url.path == "/api/next":
            window = review.next_window(query.get("client", ""))
            self.send_json(200, {"window": window, "progress": review.progress()})
        elif url.path in ("/api/audio", "/api/spectrogram"):
            name, start = review.check_window(query.get("file"), query.get("start_s"))
            if url.path == "/api/audio":
                body, before = window_wav(review.files[name], start, review.settings.context_seconds)
                self.send(200, body, "audio/wav", {"X-Context-Before": f"{before:.3f}"})
            else:
                body = spectrogram_png(review.files[name], start, review.frontend, review.frontend_rate)
                self.send(200, body, "image/png")
        else:
            raise RequestError(404, f"no page {url.path}")

    def post(self, url) -> None:
        if url.path != "/api/answer":
            raise RequestError(404, f"no page {url.path}")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            # a form on another site cannot send this type without the browser asking first (CORS)
            raise RequestError(415, "Content-Type must be application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "Content-Length required") from None
        if not 0 < length <= MAX_BODY:
            raise RequestError(413, f"body of {length} bytes refused (at most {MAX_BODY})")
        try:
            payload = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "body is not JSON") from None
        self.send_json(200, {"progress": self.server.review.answer(payload)})


def make_server(review: Review, port: int) -> http.server.ThreadingHTTPServer:
    """A threaded server on 127.0.0.1:`port` (0: any free port) serving `review`; not yet started."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.review = review
    return server


# ----------------------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Label a site's 5-s soundscape windows on a local page.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--soundscapes", help="folder of the site's recordings (its own files, not subfolders)")
    parser.add_argument("--out", default="site_labels.csv",
                        help="the labelled rows (file,start_s,end_s,labels,chosen_by,answered_at); "
                             "<out>.log keeps every answer")
    parser.add_argument("--ckpts", nargs="+", default=None,
                        help="checkpoints (a run folder: its best.pt) that suggest species and choose windows "
                             "to teach; the first one's frontend draws the spectrogram")
    parser.add_argument("--species", nargs="+", default=[],
                        help="the species codes to offer (default: the checkpoints' or --data-dir's vocabulary)")
    cli.add_data_dir(parser)
    parser.add_argument("--random-share", type=float, default=0.5,
                        help="share of the windows drawn uniformly at random (the unbiased validation rows); "
                             "the rest teach (with --ckpts)")
    cli.add_seed(parser, "seed of the random draw")
    parser.add_argument("--top-per-species", type=int, default=3, help="each species' top-scoring windows offered")
    parser.add_argument("--suggestions", type=int, default=5, help="the model's top species shown per window")
    parser.add_argument("--context-seconds", type=float, default=1.0, help="audio played around the window")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--export-random", metavar="CSV",
                        help="write the random rows of --out (the validation table) to CSV, and exit")
    parser.add_argument("--export-all", metavar="CSV",
                        help="write every labelled row of --out (a training table for train.py "
                             "--soundscape-labels) to CSV, and exit")
    return parser


def serve(settings: ReviewSettings) -> None:
    review = Review(settings)
    server = make_server(review, settings.port)
    progress = review.progress()
    print(f"review: http://127.0.0.1:{server.server_address[1]}/  ({progress['labelled']} labelled of "
          f"{progress['windows']} windows; answers in {settings.out}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        review.close()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        exports = [(path, random_only) for path, random_only in ((args.export_random, True),
                                                                  (args.export_all, False)) if path]
        for path, random_only in exports:
            count = export_rows(args.out, path, random_only)
            print(f"review: {count} {'random' if random_only else 'labelled'} row(s) of {args.out} -> {path}")
        if exports:
            return
        if not args.soundscapes:
            raise ValueError("--soundscapes is required (the site's recordings)")
        serve(ReviewSettings(soundscapes=args.soundscapes, out=args.out, ckpts=tuple(args.ckpts or ()),
                             species=tuple(args.species), data_dirs=tuple(args.data_dir),
                             random_share=args.random_share, seed=args.seed, top_per_species=args.top_per_species,
                             suggestions=args.suggestions, context_seconds=args.context_seconds, port=args.port))
    except (ValueError, OSError, RuntimeError) as error:     # bad input, a busy port, a bad checkpoint
        sys.exit(f"review.py: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


if __name__ == "__main__":
    main()
