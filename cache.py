"""The decoded-audio cache: `python data.py cache`, read by `train.py --cache`.

Decoding compressed audio is most of an epoch's time. `python data.py cache
--data-dir D --out C` decodes, once, exactly the parts of each recording that the
crop policy draws from ("ends": the first and last --ends-seconds; "random": all
of it; --max-seconds caps either) at the model's sample rate, into one int16
file. `train.py --cache C` then reads crops from it; a crop it does not cover (an
--extras window in the middle of a recording, a segment cut short by
--max-seconds) is decoded as before, so the cache changes the speed, never the crops.

Layout of C: manifest.json (settings, data fingerprint, "complete"), segments.npz
(per recording: duration; per segment: recording, start sample, length, offset),
audio.int16 (all segments back to back) and done.npy (one byte per recording,
set after its samples are flushed). A crash leaves "complete": false and the
unfinished recordings unmarked: training refuses such a cache, and running the
command again finishes it.

The `cache` subcommand's flags are defined here (`add_command`, `command_from_args`); data.py's main
reads the recordings and calls build_cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import audio
import cli
import progress

log = logging.getLogger("birdclef")

CACHE_FORMAT = 1


class CacheError(ValueError):
    """A cache that does not fit this run: another data set, crop policy or sample rate, or unfinished."""


def cache_settings(sample_rate: int, policy: str, ends_seconds: float, window_seconds: float,
                   max_seconds: float = 0.0) -> dict:
    return {"format": CACHE_FORMAT, "sample_rate": int(sample_rate), "crop_policy": policy,
            "ends_seconds": float(ends_seconds), "window_seconds": float(window_seconds),
            "max_seconds": float(max_seconds)}


def cached_segments(duration: float, settings: dict) -> list[tuple[float, float]]:
    """The parts of a recording its crops are drawn from -> [(start s, seconds)] (see choose_crop_start)."""
    limit = settings["max_seconds"] or math.inf
    if settings["crop_policy"] == "ends":
        segment = min(max(settings["ends_seconds"], settings["window_seconds"]), duration, limit / 2)
        if 2 * segment < duration:
            return [(0.0, segment), (duration - segment, segment)]
    return [(0.0, min(duration, limit))]


FINGERPRINT_BLOCK = 4096    # bytes hashed at each end of a file


def data_fingerprint(names: list[str], paths: list[str]) -> str:
    """Which recordings (their names, data.audio_names), in which order, with which content: size,
    modification time and a hash of the first and last FINGERPRINT_BLOCK bytes of each file. A cache
    is only used for the data it was made from; a file replaced by other audio of the same size is
    caught by its ends and its time (copying the data without keeping times asks for a new cache)."""
    digest = hashlib.sha1()
    for name, path in zip(names, paths):
        digest.update(f"{name}\t".encode())
        try:
            with open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                digest.update(f"{status.st_size}\t{status.st_mtime_ns}\t".encode())
                digest.update(handle.read(FINGERPRINT_BLOCK))
                handle.seek(max(status.st_size - FINGERPRINT_BLOCK, 0))
                digest.update(handle.read(FINGERPRINT_BLOCK))
        except OSError:
            digest.update(b"unreadable")
        digest.update(b"\n")
    return digest.hexdigest()


def _write_json_atomic(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def plan_cache(paths: list[str], settings: dict) -> dict:
    """Headers -> the segments of every recording and where they go in audio.int16."""
    headers, bad = audio.check_audio_files(paths)
    rate = settings["sample_rate"]
    durations, owner, starts, lengths = [], [], [], []
    for row, header in enumerate(headers):
        duration = header[0] / header[1] if header else 0.0
        durations.append(duration)
        for start, seconds in (cached_segments(duration, settings) if header else []):
            owner.append(row)
            starts.append(int(round(start * rate)))
            lengths.append(int(round(seconds * rate)))
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    return {"duration": np.asarray(durations), "owner": np.asarray(owner, dtype=np.int64),
            "start": np.asarray(starts, dtype=np.int64), "length": lengths, "offset": offsets, "bad": bad}


def _cache_recording(job) -> tuple[int, str | None]:
    """Worker: decode one recording's segments into audio.int16 and flush them -> (its row, None),
    or (its row, the error) for a file whose header reads but whose audio does not decode."""
    folder, path, row, segments, rate = job
    try:
        samples = np.memmap(Path(folder) / "audio.int16", dtype=np.int16, mode="r+")
        for start, length, offset in segments:
            window = audio.read_window(path, start / rate, length / rate, rate)[:length]
            samples[offset:offset + length] = audio.to_int16(window)
        samples.flush()
    except Exception as error:  # left out of the cache; training decodes it and skips it as usual
        return row, f"{type(error).__name__}: {error}".replace("\n", " ")
    return row, None


def build_cache(names: list[str], paths: list[str], out_dir, settings: dict, workers: int = 2) -> Path:
    """Write (or finish) the cache of these recordings (names: data.audio_names) in `out_dir`;
    refuses a folder made with other settings or from other recordings."""
    out_dir = Path(out_dir)
    fingerprint = data_fingerprint(names, paths)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        _check_manifest(manifest, settings, fingerprint, out_dir, require_complete=False)
        if manifest["complete"]:
            print(f"{out_dir}: already complete ({manifest['bytes'] / 1e9:.2f} GB); nothing to do")
            return out_dir
        plan = dict(np.load(out_dir / "segments.npz"))
        print(f"{out_dir}: resuming an unfinished cache")
    else:
        plan, manifest = _start_cache(out_dir, paths, settings, fingerprint)
    done = np.load(out_dir / "done.npy", mmap_mode="r+")
    by_row: dict[int, list] = {}
    for owner, start, length, offset in zip(plan["owner"], plan["start"], plan["length"], plan["offset"]):
        by_row.setdefault(int(owner), []).append((int(start), int(length), int(offset)))
    todo = [(str(out_dir), paths[row], row, by_row.get(row, []), settings["sample_rate"])
            for row in range(len(paths)) if not done[row]]
    if workers > 0:
        # concurrent.futures, not multiprocessing.Pool: a worker that dies (killed, out of memory)
        # raises BrokenProcessPool here instead of leaving the command waiting for ever
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_cache_recording, job) for job in todo]
                _mark_done(progress.bar((future.result() for future in as_completed(futures)), total=len(todo),
                                        desc="cache", unit="recording"), done)
        except BrokenProcessPool:
            done.flush()
            raise CacheError(f"a cache worker died (killed, or out of memory) while writing {out_dir}: the "
                             f"recordings cached so far are kept; run the same command again to finish "
                             f"(--workers 0 decodes in this process)") from None
    else:
        _mark_done(progress.bar(map(_cache_recording, todo), total=len(todo), desc="cache", unit="recording"), done)
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    print(f"cache complete: {manifest['recordings']} recordings, {manifest['bytes'] / 1e9:.2f} GB -> {out_dir}")
    return out_dir


def _start_cache(out_dir: Path, paths: list[str], settings: dict, fingerprint: str) -> tuple[dict, dict]:
    """A new cache folder: the plan, a sparse audio.int16, done.npy, then manifest.json -> (plan, manifest)."""
    plan = plan_cache(paths, settings)
    for path, reason in plan.pop("bad"):
        log.warning("not cached (unreadable): %s (%s)", path, reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = int(plan["length"].sum())
    manifest = {**settings, "data_fingerprint": fingerprint, "recordings": len(paths),
                "segments": len(plan["length"]), "samples": total, "bytes": 2 * total, "complete": False}
    print(f"caching {len(paths)} recordings, {total / settings['sample_rate'] / 3600:.1f} h of audio at "
          f"{settings['sample_rate']} Hz: {2 * total / 1e9:.2f} GB in {out_dir} (--max-seconds lowers it)")
    reserve_space(out_dir / "audio.int16", 2 * total)
    np.save(out_dir / "done.npy", np.zeros(len(paths), dtype=np.uint8))
    np.savez(out_dir / ".segments.tmp.npz", **plan)
    os.replace(out_dir / ".segments.tmp.npz", out_dir / "segments.npz")
    _write_json_atomic(out_dir / "manifest.json", manifest)   # written last: the folder is now a cache in progress
    return plan, manifest


def reserve_space(path: Path, size: int) -> None:
    """Create `path` with `size` bytes reserved on disk. A sparse file would let the disk fill up
    while the workers write into it -- through a memory map, that is a Bus error, or a hang --
    so the space is checked and taken now, with a clear error if it is not there."""
    free = shutil.disk_usage(path.parent).free
    if size > free:
        raise CacheError(f"the cache needs {size / 1e9:.2f} GB in {path.parent} and {free / 1e9:.2f} GB are free: "
                         f"free some space, choose another --out, or lower --max-seconds")
    with open(path, "wb") as handle:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)     # Linux: the blocks are allocated now
            else:
                handle.truncate(size)                            # macOS and Windows: checked above only
        except OSError as error:
            handle.close()
            path.unlink()
            raise CacheError(f"could not reserve {size / 1e9:.2f} GB for {path} ({error.strerror or error}): free "
                             f"some space, choose another --out, or lower --max-seconds") from None


def _mark_done(results, done: np.memmap) -> None:
    """1: cached; 2: failed to decode (not cached, not retried)."""
    for count, (row, error) in enumerate(results, start=1):
        done[row] = 1 if error is None else 2
        if error is not None:
            log.warning("not cached (cannot be decoded): recording %d: %s", row, error)
        if count % 64 == 0:
            done.flush()
    done.flush()


def _check_manifest(manifest: dict, settings: dict, fingerprint: str, folder: Path, require_complete: bool) -> None:
    for key, wanted in settings.items():
        if manifest.get(key) != wanted:
            raise CacheError(f"cache {folder} was made with {key}={manifest.get(key)!r}, not {wanted!r}: make "
                             f"a cache for these settings in another folder (python data.py cache --out ...), "
                             f"or train without --cache")
    if manifest.get("data_fingerprint") != fingerprint:
        raise CacheError(f"cache {folder} was made from other data (other recordings, or files of --data-dir "
                         f"changed since: size, time or content): make a new one in another folder, or train "
                         f"without --cache")
    if require_complete and not manifest.get("complete"):
        raise CacheError(f"cache {folder} is unfinished (interrupted while caching): run the same "
                         f"`python data.py cache` command again to finish it")


class AudioCache:
    """Read crops from a finished cache; `window` returns None for a crop it does not cover."""

    def __init__(self, folder, names: list[str], paths: list[str], settings: dict):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(f"{self.folder} is not a cache (no manifest.json); make one with python data.py cache")
        manifest = json.loads(manifest_path.read_text())
        _check_manifest(manifest, settings, data_fingerprint(names, paths), self.folder, require_complete=True)
        size = (self.folder / "audio.int16").stat().st_size if (self.folder / "audio.int16").is_file() else 0
        if size != manifest["bytes"]:
            raise CacheError(f"{self.folder / 'audio.int16'} holds {size} bytes, its manifest says {manifest['bytes']} "
                             f"(truncated or replaced): make the cache again in a new folder")
        plan = np.load(self.folder / "segments.npz")
        self.rate = settings["sample_rate"]
        self.duration = plan["duration"]
        self.owner, self.start, self.length, self.offset = plan["owner"], plan["start"], plan["length"], plan["offset"]
        self.first = np.searchsorted(self.owner, np.arange(len(self.duration)))    # owner is sorted
        self.cached = np.load(self.folder / "done.npy") == 1    # failed recordings are decoded (and skipped)
        self.manifest = manifest
        self._file = None                                                         # opened in each process

    def __getstate__(self):  # DataLoader workers open the file themselves
        return {**self.__dict__, "_file": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            os.close(self._file)

    def _read(self, offset: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """count int16 samples from sample `offset` (into `out` if given), with one pread."""
        if self._file is None:
            self._file = os.open(self.folder / "audio.int16", os.O_RDONLY)
        samples = np.empty(count, dtype=np.int16) if out is None else out
        if os.preadv(self._file, [memoryview(samples).cast("B")], 2 * offset) != 2 * count:
            raise OSError(f"{self.folder / 'audio.int16'} is shorter than its manifest says")
        return samples

    def locate(self, row: int, start_seconds: float, seconds: float) -> tuple[int, int] | None:
        """Where the crop is -> (offset in audio.int16, samples there: fewer than asked when the
        recording ends inside the crop), or None if no segment of recording `row` covers it."""
        if not self.cached[row]:
            return None
        first = int(round(start_seconds * self.rate))
        n = int(round(seconds * self.rate))
        end_of_recording = int(round(self.duration[row] * self.rate))
        segment = self.first[row]
        while segment < len(self.owner) and self.owner[segment] == row:
            begin, length = self.start[segment], self.length[segment]
            reaches_end = begin + length >= end_of_recording - 1    # past the end is padding, as when decoding
            if begin <= first and (first + n <= begin + length or reaches_end):
                return int(self.offset[segment] + first - begin), max(min(n, int(begin + length) - first), 0)
            segment += 1
        return None

    def window(self, row: int, start_seconds: float, seconds: float, pad: str = "zero") -> np.ndarray | None:
        """(round(seconds*rate),) int16 of recording `row` from start_seconds, or None if not cached."""
        out = np.empty(int(round(seconds * self.rate)), dtype=np.int16)
        return out if self.read_into(row, start_seconds, seconds, pad, out) else None

    def read_into(self, row: int, start_seconds: float, seconds: float, pad: str, out: np.ndarray) -> bool:
        """The crop of recording `row` written into `out` ((samples,) int16, padded as decoding would)
        without a temporary; False if no cached segment covers it."""
        place = self.locate(row, start_seconds, seconds)
        if place is None:
            return False
        offset, count = place
        if count == len(out):
            self._read(offset, count, out)
        else:  # the recording ends inside the crop: pad as decoding would
            out[:] = audio.fit_length(self._read(offset, count), len(out), pad)
        return True


def open_for_training(folder, names: list[str], paths: list[str], crop: audio.CropSettings) -> AudioCache:
    """train.py --cache: the cache, refused (CacheError) unless made from these recordings with
    these crop settings. --max-seconds is the cache's own choice: any value is accepted."""
    settings = cache_settings(crop.sample_rate, crop.policy, crop.ends_seconds, crop.window_seconds)
    manifest_path = Path(folder) / "manifest.json"
    if manifest_path.is_file():
        settings["max_seconds"] = json.loads(manifest_path.read_text()).get("max_seconds", 0.0)
    cache = AudioCache(folder, names, paths, settings)
    log.info("reading crops from the cache %s (%.2f GB, %s crops at %d Hz%s); crops it does not cover are "
             "decoded", folder, cache.manifest["bytes"] / 1e9, crop.policy, crop.sample_rate,
             f", at most {settings['max_seconds']:g} s per recording" if settings["max_seconds"] else "")
    return cache


# ----------------------------------------------------------------------------- `python data.py cache`

@dataclass(frozen=True)
class CacheCommand:
    """`python data.py cache`, parsed: data.py reads the recordings of `data_dirs` (reading BirdCLEF
    folders is its job, and this module may not import it), then build_cache writes them."""
    data_dirs: tuple[str, ...]
    out: str
    settings: dict                # cache_settings(...)
    workers: int


def add_command(subparsers) -> None:
    """The `cache` subcommand of data.py: --data-dir, --sample-rate, the crop flags and --window-seconds
    are train.py's own (cli.py), since the cache must hold what train.py's crops read."""
    parser = subparsers.add_parser("cache", help="decode the audio the crop policy needs, once, into a "
                                   "memory-mapped int16 cache for train.py --cache",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_data_dir(parser)
    parser.add_argument("--out", required=True, help="cache folder (pass it to train.py --cache)")
    cli.add_sample_rate(parser, "as train.py --sample-rate: the rate the crops are decoded at")
    cli.add_crop_flags(parser)
    cli.add_window_seconds(parser)
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="cache at most this many seconds per recording (0 = what the policy needs); "
                             "crops outside are decoded during training")
    cli.add_workers(parser, "decoding processes")


def command_from_args(args: argparse.Namespace) -> CacheCommand:
    return CacheCommand(data_dirs=tuple(args.data_dir), out=args.out, workers=args.workers,
                        settings=cache_settings(args.sample_rate, args.crop_policy, args.ends_seconds,
                                                args.window_seconds, args.max_seconds))
