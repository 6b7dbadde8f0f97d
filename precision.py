"""fp32 or bf16 on a CPU, chosen by timing the real work on this machine, not by a capability flag.

    measurement = decide(key, lambda: {"fp32": time_fp32, "bf16": time_bf16})
    measurement.choice                   # "fp32" or "bf16"; cached under `key` in cache_path()
    report(measurement, "--precision auto")

Why timing: torch reports oneDNN bf16 support on every CPU with AVX-512, but only CPUs with
avx512_bf16 or amx_bf16 compute bf16 natively; elsewhere oneDNN emulates it, several times
slower than fp32 (6.6x on an AVX2-only AMD EPYC, issue 28). A timer is a callable running the
real work and returning its seconds per batch: timer(probe=True) one small batch (the first call,
so it also pays the first call's set-up), timer() one round of whole batches.

The choice is cached per CPU model and everything else that changes the answer (the caller's
key: backend, torch version, model, batch size, threads), in the user's cache folder, so one
machine measures once. A forced bf16 on a CPU without native bf16 warns once (warn_emulated).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("birdclef")

RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")   # what decides bf16 speed on x86
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")            # x86, and aarch64's Features "bf16"
CACHE_ENV = "BIRDCLEF_PRECISION_CACHE"   # a file path: tests and read-only homes put the cache elsewhere
ROUNDS = 3               # timed rounds of each precision after the probes, interleaved; the fastest counts
PROBE_WINDOWS = 2        # a probe's batch: an emulated bf16 batch of 16 b0 windows takes 10-30 s on 2 cores
GIVE_UP_AFTER = 3.0      # a bf16 probe this many times fp32's decides alone: emulated, and costly to time
BF16_MARGIN = 0.05       # bf16 rounds the scores: kept only when at least 5% faster (less is one round's noise)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset = frozenset()
    known: bool = True   # flags read from /proc/cpuinfo (Linux); elsewhere nothing is known of them

    @property
    def native_bf16(self) -> bool | None:
        """True where the CPU computes bf16 itself; False where oneDNN would emulate it; None: unknown."""
        return bool(self.flags & set(NATIVE_BF16_FLAGS)) if self.known else None

    def describe(self) -> str:
        """'AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16)'."""
        if not self.known:
            return f"{self.model} (CPU flags unknown)"
        has = [flag for flag in RELEVANT_FLAGS if flag in self.flags]
        lacks = [flag for flag in RELEVANT_FLAGS if flag not in self.flags]
        return f"{self.model} ({', '.join(has) or 'none of ' + ', '.join(RELEVANT_FLAGS)}" + \
            (f"; no {', '.join(lacks)})" if has and lacks else ")")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU model and flags (of its first processor), from /proc/cpuinfo where there is one."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuInfo(platform.processor() or platform.machine() or "unknown CPU", known=False)
    fields = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break                                    # the first processor's block is enough
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("features") or ""
    return CpuInfo(model or "unknown CPU", frozenset(flags.split()))


# ----------------------------------------------------------------------------- timing

@dataclass
class Measurement:
    """Seconds per batch of each precision (None: not measured, or its path failed) -> the choice."""
    seconds: dict = field(default_factory=dict)
    choice: str = "fp32"
    probe_only: bool = False         # the figures are the probes' (small batches), not whole batches'
    error: str | None = None         # why the bf16 path failed
    complete: bool = True            # False: probes only by request (rounds=0), not enough for auto's choice
    measured: str = ""               # when
    cached: bool = False

    @property
    def slowdown(self) -> float | None:
        """bf16's seconds over fp32's (above 1: bf16 is slower)."""
        fp32, bf16 = self.seconds.get("fp32"), self.seconds.get("bf16")
        return bf16 / fp32 if fp32 and bf16 else None

    def describe(self) -> str:
        """'fp32 0.165 s vs bf16 1.4 s per 2-window probe; bf16 over 3x slower, not timed further'."""
        parts = [f"{name} {self.seconds[name]:.3g} s" if self.seconds.get(name) is not None else f"{name} -"
                 for name in sorted(self.seconds, key=("fp32", "bf16").index)]
        text = " vs ".join(parts)
        if self.probe_only:
            text += f" per {PROBE_WINDOWS}-window probe"
            text += f"; bf16 over {GIVE_UP_AFTER:g}x slower, not timed further" if self.complete else ""
        else:
            text += " per batch"
        if self.error:
            text += f"; the bf16 path failed: {self.error}"
        return text


def choose(seconds: dict) -> str:
    """fp32, unless bf16 was measured at least BF16_MARGIN faster."""
    fp32, bf16 = seconds.get("fp32"), seconds.get("bf16")
    return "bf16" if bf16 is not None and fp32 is not None and bf16 < fp32 * (1 - BF16_MARGIN) else "fp32"


def measure(timers: dict, rounds: int = ROUNDS) -> Measurement:
    """timers {"fp32": f, "bf16": g} (f(probe=True): one small batch; f(): a round of whole batches; each
    -> seconds per batch) -> a probe of each, then the fastest of `rounds` rounds of each, interleaved so
    that a change of load hits both alike (a round slowed by the first call's set-up does not count).

    A bf16 path that raises (or returns a non-finite time) is dropped; fp32's errors propagate: without
    fp32 the job cannot run either. A bf16 probe over GIVE_UP_AFTER times fp32's decides alone;
    rounds=0: the probes only."""
    probed, error = {}, None
    for name, timer in timers.items():
        try:
            probed[name] = checked(timer(probe=True))
        except Exception as problem:            # any failure of the optional path means: not that one
            if name == "fp32":
                raise
            error = f"{type(problem).__name__}: {problem}"
    gave_up = any(seconds > GIVE_UP_AFTER * probed["fp32"] for name, seconds in probed.items() if name != "fp32")
    timed = rounds > 0 and not gave_up and len(probed) > 1
    best = {} if timed else dict(probed)
    for _ in range(rounds if timed else 0):
        for name in list(probed):               # a bf16 failing in a round is dropped from probed
            try:
                best[name] = min(best.get(name, math.inf), checked(timers[name]()))
            except Exception as problem:
                if name == "fp32":
                    raise
                probed.pop(name)
                best.pop(name, None)
                error = f"{type(problem).__name__}: {problem}"
    seconds = {name: best.get(name) for name in timers}
    return Measurement(seconds, choose(seconds), probe_only=not timed and len(probed) > 1, error=error,
                       complete=timed or gave_up or len(probed) <= 1, measured=time.strftime("%Y-%m-%d %H:%M"))


def checked(seconds: float) -> float:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise FloatingPointError(f"timer returned {seconds!r}")
    return float(seconds)


# ----------------------------------------------------------------------------- the cache

def cache_path() -> Path:
    """$BIRDCLEF_PRECISION_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/birdclef_pipeline/precision.json."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return folder / "birdclef_pipeline" / "precision.json"


def cache_key(*parts) -> str:
    """One line naming the CPU (model and relevant flags: a VM may hide some of a model's) and `parts`."""
    cpu = cpu_info()
    flags = ",".join(flag for flag in RELEVANT_FLAGS if flag in cpu.flags) or "-"
    return " | ".join([cpu.model, flags, *map(str, parts)])


def model_part(config: dict) -> str:
    """A model as a key names it: what sets its work per window (the labels' count barely does)."""
    return " ".join(str(config.get(name)) for name in ("backbone", "frontend", "n_mels", "hop", "sample_rate",
                                                       "window_seconds", "img_size", "head"))


def read_cache(path: Path) -> dict:
    """key -> entry; an unreadable or damaged file counts as empty (it only saves time)."""
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("precision cache %s unreadable (%s): measuring again", path, error)
        return {}


def write_cache(path: Path, key: str, measurement: Measurement) -> None:
    """Add one entry, atomically (another job may read the file meanwhile); a failure only costs a re-measure."""
    entry = {name: getattr(measurement, name) for name in ("seconds", "choice", "probe_only", "error",
                                                            "complete", "measured")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_cache(path) | {key: entry}
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not cache the precision choice in %s (%s); set %s to another file", path, error, CACHE_ENV)


def cached(key: str) -> Measurement | None:
    entry = read_cache(cache_path()).get(key)
    if not isinstance(entry, dict) or entry.get("choice") not in ("fp32", "bf16") or \
            not isinstance(entry.get("seconds"), dict):       # edited by hand, or by another version
        return None
    known = {name: entry[name] for name in ("seconds", "choice", "probe_only", "error", "complete", "measured")
             if name in entry}
    return Measurement(**known, cached=True)


def decide(key: str, timers: Callable[[], dict], remeasure: bool = False, rounds: int = ROUNDS) -> Measurement:
    """The cached measurement for `key` (a complete one, unless rounds=0 asks for probes only), else
    timers() -> a new one, cached. timers is called only when measuring (building them may cost)."""
    found = None if remeasure else cached(key)
    if found is not None and (found.complete or rounds == 0):
        return found
    measurement = measure(timers(), rounds)
    write_cache(cache_path(), key, measurement)
    return measurement


def report(measurement: Measurement, what: str) -> None:
    """Log what was measured (or read from the cache) and chosen."""
    cpu = cpu_info()
    source = (f"cached {measurement.measured} in {cache_path()}" if measurement.cached
              else f"measured now, cached in {cache_path()}")
    log.info("%s: %s on %s: %s (%s)", what, measurement.choice, cpu.describe(), measurement.describe(), source)
    if measurement.error and not measurement.cached:
        log.warning("%s: bf16 failed on this machine, using fp32: %s", what, measurement.error)


_warned = set()


def warn_emulated(what: str, measurement: Measurement | None,
                  advice: str = "--precision auto (the default) keeps the faster") -> bool:
    """A forced bf16 on a CPU without native bf16: one warning per process and `what`, naming the
    measured slowdown where there is one. -> whether the CPU lacks native bf16."""
    cpu = cpu_info()
    if cpu.native_bf16 is not False:
        return False
    if what not in _warned:
        _warned.add(what)
        slowdown = measurement.slowdown if measurement is not None else None
        if slowdown is not None:
            speed = (f"measured {slowdown:.1f}x slower than fp32 here" if slowdown > 1
                     else f"measured {1 / slowdown:.2f}x the speed of fp32 here")
            speed += f" ({measurement.describe()})"
        else:
            failed = f" (the timing failed: {measurement.error})" if measurement and measurement.error else ""
            speed = f"not measured{failed}; usually several times slower than fp32"
        log.warning("%s on %s: without avx512_bf16 or amx_bf16 oneDNN emulates bf16, %s; %s",
                    what, cpu.describe(), speed, advice)
    return True
