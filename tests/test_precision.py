"""Tests for precision.py and --precision auto: the choice follows fake timers (bf16 faster -> bf16,
slower -> fp32, a failing bf16 path -> fp32 with a warning), the cache is keyed by CPU model, backend and
the batch setting and re-measured on request, a forced bf16 on a CPU without native bf16 warns once with
its slowdown, and training's --amp auto times copies and leaves the model as it was.

References: fake timers and fake CPUs (monkeypatched), counted calls, and the tiny model's own state.
Every test's cache is a file under tmp_path ($BIRDCLEF_PRECISION_CACHE), never ~/.cache.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import QUICK_FLAGS, quick_args, run_infer, write_tone

import engines
import learner as learner_lib
import model as model_lib
import options
import precision
import runfolder
import train

CPU = torch.device("cpu")
EMULATING = precision.CpuInfo("Fake AVX-512 CPU", frozenset({"avx2", "avx512f"}))
NATIVE = precision.CpuInfo("Fake AMX CPU", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache file of the test's own, and no warning remembered from another test."""
    path = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(precision.CACHE_ENV, str(path))
    monkeypatch.setattr(precision, "_warned", set())
    return path


def build_tiny(*flags) -> model_lib.BirdCallModel:
    """timm's test_efficientnet with the quick runs' frontend: milliseconds a batch."""
    args = options.get_args_parser().parse_args([*QUICK_FLAGS, *flags])
    return model_lib.build_model(options.model_settings(args), ["a", "b", "c"], pretrained=False).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny()


class FakeTimers:
    """precision_timers' stand-in: fixed seconds per batch (an exception: that path fails), calls counted."""

    def __init__(self, fp32=1.0, bf16=0.5):
        self.seconds, self.calls, self.built = {"fp32": fp32, "bf16": bf16}, {"fp32": 0, "bf16": 0}, 0

    def timer(self, name):
        def one_round(probe=False):
            self.calls[name] += 1
            if isinstance(self.seconds[name], Exception):
                raise self.seconds[name]
            return self.seconds[name]
        return one_round

    def __call__(self, *args):
        self.built += 1
        return {"fp32": self.timer("fp32"), "bf16": self.timer("bf16")}


# ----------------------------------------------------------------------------- the choice

@pytest.mark.parametrize("fp32, bf16, choice", [(1.0, 0.5, "bf16"), (1.0, 1.5, "fp32"), (1.0, 0.98, "fp32")])
def test_the_faster_precision_is_chosen(fp32, bf16, choice):
    """(1.0, 0.98): within BF16_MARGIN, bf16 would round the scores for one round's noise."""
    fake = FakeTimers(fp32, bf16)
    measurement = precision.measure(fake())
    assert measurement.choice == choice and measurement.seconds == {"fp32": fp32, "bf16": bf16}
    assert fake.calls == {"fp32": 1 + precision.ROUNDS, "bf16": 1 + precision.ROUNDS}   # a probe, then rounds


def test_the_fastest_round_counts_and_rounds_interleave():
    order, times = [], {"fp32": iter([9.0, 1.2, 1.0, 1.1]), "bf16": iter([9.0, 0.9, 5.0, 0.8])}

    def timer(name):
        return lambda probe=False: order.append(name) or next(times[name])
    measurement = precision.measure({"fp32": timer("fp32"), "bf16": timer("bf16")}, rounds=3)
    assert measurement.seconds == {"fp32": 1.0, "bf16": 0.8} and measurement.choice == "bf16"
    assert order == ["fp32", "bf16"] * 4      # a load that comes and goes hits both alike


def test_a_bf16_probe_far_slower_than_fp32_is_not_timed_further():
    """Emulated bf16 takes seconds a batch: its probe alone decides."""
    fake = FakeTimers(fp32=1.0, bf16=precision.GIVE_UP_AFTER * 1.5)
    measurement = precision.measure(fake())
    assert measurement.choice == "fp32" and measurement.probe_only and measurement.complete
    assert fake.calls == {"fp32": 1, "bf16": 1}
    assert measurement.slowdown == pytest.approx(precision.GIVE_UP_AFTER * 1.5)


@pytest.mark.parametrize("fails_in", ["its probe", "a timed round"])
def test_a_failing_bf16_path_gives_fp32_with_a_warning(fails_in, tiny_model, monkeypatch, caplog, own_cache):
    fake = FakeTimers(fp32=1.0, bf16=RuntimeError("no bf16 kernel for this op"))
    if fails_in == "a timed round":
        rounds = iter([0.5, RuntimeError("no bf16 kernel for this op")])
        bf16_timer = fake.timer("bf16")
        fake.seconds["bf16"] = 0.5

        def failing_later(probe=False):
            value = next(rounds)
            if isinstance(value, Exception):
                raise value
            return bf16_timer(probe)
        monkeypatch.setattr(engines, "precision_timers", lambda *args: {"fp32": fake.timer("fp32"),
                                                                         "bf16": failing_later})
    else:
        monkeypatch.setattr(engines, "precision_timers", fake)
    with caplog.at_level(logging.INFO, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], engines.EngineSettings(), CPU) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bf16 failed on this machine, using fp32: RuntimeError: no bf16 kernel" in w for w in warnings)
    entry = next(iter(json.loads(own_cache.read_text()).values()))
    assert entry["choice"] == "fp32" and entry["seconds"]["bf16"] is None and "no bf16 kernel" in entry["error"]


def test_a_failing_fp32_path_is_the_jobs_error():
    with pytest.raises(RuntimeError, match="broken"):
        precision.measure(FakeTimers(fp32=RuntimeError("broken"), bf16=0.5)())


def test_real_runners_time_both_precisions_and_a_non_finite_bf16_is_a_failed_path(tiny_model, monkeypatch):
    """The real timers run the real model; a bf16 run that gives nan scores counts as failed."""
    settings = engines.EngineSettings(batch_size=5, streams=2, threads=2)
    real_call, batches = engines.TorchRunner.__call__, []

    def recorded(self, waveforms):
        batches.append((self.bf16, len(waveforms)))
        return real_call(self, waveforms)
    monkeypatch.setattr(engines.TorchRunner, "__call__", recorded)
    monkeypatch.setattr(precision, "GIVE_UP_AFTER", float("inf"))     # time the rounds whatever the probes say
    measurement = engines.timed([tiny_model], settings, CPU, "k1", remeasure=True)
    assert all(seconds > 0 for seconds in measurement.seconds.values()) and not measurement.probe_only
    # a probe of PROBE_WINDOWS each, then interleaved rounds of one whole batch per stream
    assert batches == [(False, 2), (True, 2)] + ([(False, 5)] * 2 + [(True, 5)] * 2) * precision.ROUNDS

    def nan_in_bf16(self, waveforms):
        logits = real_call(self, waveforms)
        return logits * float("nan") if self.bf16 else logits
    monkeypatch.setattr(engines.TorchRunner, "__call__", nan_in_bf16)
    measurement = engines.timed([tiny_model], settings, CPU, "k2", remeasure=True)
    assert measurement.choice == "fp32" and "non-finite" in measurement.error


# ----------------------------------------------------------------------------- the cache

def test_the_cache_is_keyed_by_cpu_model_backend_and_batch_and_remeasured_on_request(tiny_model, monkeypatch):
    fake = FakeTimers(fp32=1.0, bf16=0.5)
    monkeypatch.setattr(engines, "precision_timers", fake)
    monkeypatch.setattr(precision, "cpu_info", lambda: NATIVE)

    def choose(**changes):
        return engines.choose_bf16([tiny_model], engines.EngineSettings(**changes), CPU)
    assert choose() is True and fake.built == 1
    fake.seconds = {"fp32": 0.5, "bf16": 1.0}         # had it been timed again, fp32 would win
    assert choose() is True and fake.built == 1        # the same CPU, backend and batch: read from the cache
    monkeypatch.setattr(precision, "cpu_info", lambda: precision.CpuInfo("Another CPU", NATIVE.flags))
    assert choose() is False and fake.built == 2       # another CPU model: timed
    assert choose(backend="openvino") is False and fake.built == 3      # another backend: timed
    assert choose(batch_size=64) is False and fake.built == 4           # another batch size: timed
    fake.seconds = {"fp32": 1.0, "bf16": 0.5}
    assert choose(precision="measure") is True and fake.built == 5      # measure: timed again, cached
    assert choose() is True and fake.built == 5
    assert choose(backend="onnxruntime") is False and fake.built == 5   # no bf16 path: nothing to time
    assert choose(precision="fp32") is False and fake.built == 5
    with pytest.raises(ValueError, match="one of auto, measure"):
        choose(precision="fast")


def test_a_damaged_cache_is_measured_again(tiny_model, monkeypatch, own_cache, caplog):
    fake = FakeTimers(fp32=1.0, bf16=0.5)
    monkeypatch.setattr(engines, "precision_timers", fake)
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], engines.EngineSettings(), CPU) is True
    assert fake.built == 1 and "unreadable" in caplog.text
    assert list(json.loads(own_cache.read_text()).values())[0]["choice"] == "bf16"


def test_the_cache_lives_where_the_environment_says():
    assert precision.cache_path() == precision.Path(precision.os.environ[precision.CACHE_ENV])


def test_the_cache_folder_defaults_to_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_path() == tmp_path / "birdclef_pipeline" / "precision.json"


def test_infer_logs_the_choice_and_reads_it_back(checkpoint, tmp_path, own_cache, caplog):
    folder = tmp_path / "s"
    folder.mkdir()
    write_tone(folder / "a.wav", 9.0)
    common = ["--ckpts", checkpoint, "--soundscapes", folder, "--batch-size", "2"]
    with caplog.at_level(logging.INFO, logger="birdclef"):
        run_infer(*common, "--out", tmp_path / "one.csv")
        first = [r.getMessage() for r in caplog.records if "--precision auto" in r.getMessage()]
        caplog.clear()
        run_infer(*common, "--out", tmp_path / "two.csv")
        second = [r.getMessage() for r in caplog.records if "--precision auto" in r.getMessage()]
    entry = next(iter(json.loads(own_cache.read_text()).values()))
    assert len(first) == 1 and "measured now" in first[0] and f": {entry['choice']} on " in first[0]
    assert len(second) == 1 and "cached" in second[0] and f": {entry['choice']} on " in second[0]
    assert all(entry["seconds"][name] > 0 for name in ("fp32", "bf16"))


# ----------------------------------------------------------------------------- what the hardware does

def test_a_forced_bf16_on_a_cpu_without_native_bf16_warns_once_with_its_slowdown(tiny_model, monkeypatch,
                                                                                   caplog):
    fake = FakeTimers(fp32=1.0, bf16=2.5)
    monkeypatch.setattr(engines, "precision_timers", fake)
    monkeypatch.setattr(precision, "cpu_info", lambda: EMULATING)
    settings = engines.EngineSettings(precision="bf16")
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], settings, CPU) is True
        assert engines.choose_bf16([tiny_model], settings, CPU) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Fake AVX-512 CPU" in warnings[0] and "emulates" in warnings[0]
    assert "measured 2.5x slower than fp32" in warnings[0]
    assert fake.calls == {"fp32": 1, "bf16": 1}         # quickly: a probe each, then the cache


def test_a_forced_bf16_warning_names_a_cached_auto_measurement(tiny_model, monkeypatch, caplog):
    fake = FakeTimers(fp32=1.0, bf16=1.4)
    monkeypatch.setattr(engines, "precision_timers", fake)
    monkeypatch.setattr(precision, "cpu_info", lambda: EMULATING)
    assert engines.choose_bf16([tiny_model], engines.EngineSettings(), CPU) is False
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], engines.EngineSettings(precision="bf16"), CPU) is True
    assert fake.built == 1 and "measured 1.4x slower than fp32" in caplog.text


def test_a_forced_bf16_on_a_native_cpu_or_with_a_failing_timing(tiny_model, monkeypatch, caplog):
    fake = FakeTimers(fp32=RuntimeError("no memory"), bf16=1.0)
    monkeypatch.setattr(engines, "precision_timers", fake)
    monkeypatch.setattr(precision, "cpu_info", lambda: NATIVE)
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], engines.EngineSettings(precision="bf16"), CPU) is True
    assert caplog.text == "" and fake.built == 0     # native bf16: nothing timed, nothing said
    monkeypatch.setattr(precision, "cpu_info", lambda: EMULATING)
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert engines.choose_bf16([tiny_model], engines.EngineSettings(precision="bf16"), CPU) is True
    assert "emulates bf16, not measured (the timing failed: RuntimeError: no memory)" in caplog.text


def test_cpu_model_and_flags_are_read_from_proc_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma\n\n"
                   "processor\t: 1\nmodel name\t: other\nflags\t\t: amx_bf16\n")
    info = precision.cpu_info(str(x86))
    assert info.model == "AMD EPYC 7B13" and info.native_bf16 is False
    assert info.describe() == "AMD EPYC 7B13 (avx2; no avx512f, avx512_bf16, amx_bf16)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd40\n")
    assert precision.cpu_info(str(arm)).native_bf16 is True
    assert precision.cpu_info(str(tmp_path / "absent")).native_bf16 is None
    assert NATIVE.describe() == "Fake AMX CPU (avx2, avx512f, avx512_bf16, amx_bf16)"


# ----------------------------------------------------------------------------- training

def test_training_auto_times_a_copy_and_leaves_the_model_as_it_was(monkeypatch, own_cache):
    model = build_tiny("--dropout", "0.5").train()      # dropout draws random numbers in training
    before = {name: value.clone() for name, value in model.state_dict().items()}
    random_state = torch.random.get_rng_state()
    amp = learner_lib.measured_amp("auto", model, CPU, batch_size=2)
    assert amp in ("bf16", "off")
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())   # BN statistics too
    assert all(parameter.grad is None for parameter in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), random_state)
    entry = next(iter(json.loads(own_cache.read_text()).values()))
    assert {"fp32": "off", "bf16": "bf16"}[entry["choice"]] == amp
    monkeypatch.setattr(learner_lib, "training_timers", FakeTimers(fp32=1.0, bf16=0.1))
    assert learner_lib.measured_amp("auto", model, CPU, batch_size=2) == amp          # read from the cache
    assert learner_lib.measured_amp("auto", model, CPU, batch_size=2, remeasure=True) == "bf16"
    assert learner_lib.measured_amp("off", model, CPU, batch_size=2) == "off"


def test_training_forced_bf16_on_an_emulating_cpu_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_info", lambda: EMULATING)
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        assert learner_lib.precision_settings("bf16", CPU) == (True, torch.bfloat16, False)
        assert learner_lib.precision_settings("bf16", CPU) == (True, torch.bfloat16, False)
    assert caplog.text.count("--amp bf16 (training) on Fake AVX-512 CPU") == 1
    assert "emulates bf16, not measured" in caplog.text
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "cpu_info", lambda: NATIVE)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        learner_lib.precision_settings("bf16", CPU)
        assert learner_lib.precision_settings("auto", CPU) == (False, torch.float32, False)
    assert caplog.text == ""


def test_train_py_runs_what_auto_measured_and_a_resume_keeps_it(tiny_data, tmp_path, monkeypatch, own_cache):
    """--amp auto on the CPU: train.py steps in the precision measured faster (here bf16, by fake timers), the
    checkpoint says so, and a resume keeps it even where a new measurement would say fp32."""
    monkeypatch.setattr(learner_lib, "training_timers", FakeTimers(fp32=1.0, bf16=0.1))
    used = []
    original = learner_lib.precision_settings
    monkeypatch.setattr(learner_lib, "precision_settings",
                        lambda amp, device: (used.append(amp), original(amp, device))[1])
    out = tmp_path / "run"
    train.main(quick_args(tiny_data, out, "--amp", "auto", "--epochs", "1", "--max-steps", "2"))
    assert set(used) == {"auto", "bf16"} and used[-1] == "bf16"         # auto: the argument check; bf16: the steps
    saved = torch.load(runfolder.newest_complete_checkpoint(out), weights_only=True)
    assert saved["amp_resolved"] == "bf16" and saved["args"]["amp"] == "auto"
    monkeypatch.setattr(learner_lib, "training_timers", FakeTimers(fp32=0.1, bf16=1.0))
    own_cache.unlink()                                                    # a new measurement would say fp32
    used.clear()
    train.main(quick_args(tiny_data, out, "--amp", "auto", "--epochs", "1", "--resume", "auto"))
    assert set(used) == {"auto", "bf16"} and used[-1] == "bf16"

