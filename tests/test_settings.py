"""Tests for the settings' single owner: the Namespace stays in the command-line layer, a flag shared by
several tools has one default, every train.py flag reaches a setting (or is read by train.main itself),
--config values pass their flag's type, choices and count, old spellings still work and say so, and no
function outside the parsers grows past 60 lines.

The references are the source files themselves (read with `ast`) and the parsers' own actions.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
from pathlib import Path

import pytest

import cli
import data
import infer
import model as model_lib
import options
import report
import review
import runfolder
import train
from conftest import quick_args

ROOT = Path(__file__).resolve().parents[1]

# The command-line layer: whole modules, and each tool's entry points
COMMAND_LINE_MODULES = {"train.py", "options.py"}
COMMAND_LINE_FUNCTIONS = {"main", "get_args_parser", "check_arguments", "check_options",
                          "run_command", "command_from_args"}     # a data.py subcommand's main, in its module


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_below_the_command_line_takes_the_namespace():
    offenders = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name in COMMAND_LINE_MODULES:
            continue
        for node in functions(path):
            parameters = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            takes_namespace = any(parameter.arg == "args" or (parameter.annotation is not None
                                                              and "Namespace" in ast.unparse(parameter.annotation))
                                  for parameter in parameters)
            if takes_namespace and node.name not in COMMAND_LINE_FUNCTIONS:
                offenders.append(f"{path.name}:{node.lineno} {node.name}")
    assert offenders == []


def test_no_function_outside_the_parsers_is_over_60_lines():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(ROOT.glob("*.py")) for node in functions(path)
            if node.end_lineno - node.lineno + 1 > 60 and node.name not in ("get_args_parser", "add_command")]
    assert long == []


# ----------------------------------------------------------------------------- one default per flag

def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every tool's parser, subcommands as their own, by name."""
    found = {"train.py": options.get_args_parser(), "infer.py": infer.get_args_parser(),
             "report.py": report.get_args_parser(), "review.py": review.get_args_parser()}
    for tool, parser in (("data.py", data.get_args_parser()), ("model.py", model_lib.get_args_parser())):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({f"{tool} {name}": sub for name, sub in action.choices.items()})
    return found


# flags several tools name alike for jobs of their own, each default on purpose
OWN_JOB = {
    "--out": "each tool's own output",
    "--seed": "train.py and data.py soundscapes draw the split with it (same default); demo's synthetic data "
              "and extras' --choose random have their own",
    "--batch-size": "training batches (train.py) or windows per inference batch (infer.py)",
    "--workers": "loader processes (train.py, report.py) or decoding threads (infer.py)",
    "--ema": "train.py's EMA decay; infer.py and model.py export: use the EMA weights",
    "--hop": "train.py: the STFT hop in samples; infer.py: the hop between 5-s windows in seconds",
    "--device": "training picks the GPU where there is one; inference defaults to the CPU Kaggle scores on",
    "--channels-last": "off for training (a GPU choice); on for CPU inference, where it is faster",
    "--soundscapes": "infer.py scores the demo test set by default; review.py labels a site it must be told",
}


def test_a_flag_shared_by_several_tools_has_one_default():
    defaults = {}
    for name, parser in parsers().items():
        aliases = cli.deprecated_aliases(parser)
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in aliases and option != "--help":
                    defaults.setdefault(option, {})[name] = action.default
    shared = {option: by_tool for option, by_tool in defaults.items() if len(by_tool) > 1}
    assert {"--data-dir", "--val-fraction", "--sample-rate"} <= set(shared)   # the test sees the shared flags
    differing = {option: by_tool for option, by_tool in shared.items()
                 if len({json.dumps(value, default=str) for value in by_tool.values()}) > 1 and option not in OWN_JOB}
    assert differing == {}


def test_every_train_flag_reaches_a_setting_or_train_main():
    """A flag that no setting reads would do nothing: each dest is read by options.training_settings or is one
    of the few train.main reads itself."""
    read_by_main = {"config", "resume", "overwrite", "out_dir", "device", "flush_denormal", "audit_sampling",
                    "lr_find_steps", "lr_find"}
    read = set()

    class Recording(argparse.Namespace):
        def __getattribute__(self, name):
            read.add(name)
            return object.__getattribute__(self, name)

    argv = ["--nocall", "--nocall-audio", "x", "--bg-dir", "y", "--soundscape-labels", "t.csv"]
    args = Recording(**vars(options.get_args_parser().parse_args(argv)))
    settings = options.training_settings(args)
    read -= {"__dict__"}
    dests = {action.dest for action in options.get_args_parser()._actions if action.dest != "help"}
    unread = dests - read - read_by_main
    assert unread == set()
    assert settings.config == options.plain_config(options.get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- --config values

@pytest.mark.parametrize("values, message", [
    ({"monitor": "bogus"}, r"monitor = \"bogus\" is not a valid --monitor \(choose from cmap5"),
    ({"epochs": 1.5}, r"epochs = 1.5 is not a valid --epochs \(expected an integer\)"),
    ({"lr": "fast"}, r"lr = \"fast\" is not a valid --lr \(expected a number\)"),
    ({"noise_snr": [1]}, r"noise_snr = \[1\] is not a valid --noise-snr \(expected a list of 2 values\)"),
    ({"nocall": "yes"}, r"nocall = \"yes\" is not a valid --nocall \(expected true or false\)"),
    ({"epochs": None}, r"epochs = null is not a valid --epochs \(it takes a value\)"),
    ({"img_size": [256]}, r"img_size = \[256\] is not a valid --img-size"),
    ({"no_such_flag": 1}, r"\['no_such_flag'\] are no flags of train.py"),
])
def test_config_values_pass_the_flags_type_choices_and_count(tmp_path, values, message):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        options.parse_args(["--config", str(path)])


def test_config_values_parse_as_the_command_line_would_and_the_command_line_wins(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"lr": 1, "noise_snr": [1, 2], "img_size": [256, 157], "pretrained": False,
                                "focal_alpha": None, "loss": "bce", "epochs": 3}))
    replayed = options.parse_args(["--config", str(path), "--epochs", "5"])
    typed = options.parse_args(["--lr", "1", "--noise-snr", "1", "2", "--img-size", "256x157", "--no-pretrained",
                                "--loss", "bce", "--epochs", "5"])
    assert vars(replayed) == vars(typed) | {"config": str(path)}
    assert isinstance(replayed.lr, float) and replayed.noise_snr == [1.0, 2.0]


# ----------------------------------------------------------------------------- one flag per job

def test_bg_dir_under_nocall_is_no_call_audio_only_by_its_deprecated_meaning(caplog):
    old = options.get_args_parser().parse_args(["--nocall", "--bg-dir", "bed"])
    with caplog.at_level(logging.WARNING, logger="birdclef"):
        options.resolve_deprecated(old)
    assert "(deprecated): pass --nocall-audio bed" in caplog.text
    new = options.get_args_parser().parse_args(["--nocall", "--bg-dir", "bed", "--nocall-audio", "bed"])
    options.resolve_deprecated(new)
    assert options.training_settings(old).data == options.training_settings(new).data
    assert options.training_settings(old).data.nocall.audio_dir == "bed"
    # with its own no-call audio, --bg-dir is augmentation only
    split = options.get_args_parser().parse_args(["--nocall", "--bg-dir", "bed", "--nocall-audio", "quiet"])
    options.resolve_deprecated(split)
    settings = options.training_settings(split)
    assert settings.data.nocall.audio_dir == "quiet" and settings.learner.background_dir == "bed"
    # and without --nocall it is augmentation only, as always
    plain = options.get_args_parser().parse_args(["--bg-dir", "bed"])
    options.resolve_deprecated(plain)
    assert options.training_settings(plain).data.nocall is None and plain.nocall_audio is None


def test_nocall_without_background_audio_is_refused_before_anything_is_written(tmp_path):
    args = options.get_args_parser().parse_args(["--nocall", "--out-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="--nocall needs background audio: --nocall-audio"):
        options.check_arguments(args)


@pytest.mark.parametrize("flag", [name.replace("_", "-") for name in options.UNIT_INTERVAL_FLAGS + options.BELOW_ONE_FLAGS])
def test_every_probability_flag_is_range_checked_by_name(flag):
    """#26.10: --mix-prob 5 and --reverb-prob nan ran silently as 1.0; --mix-prob -1 did not name the flag."""
    for value in ("5", "nan", "-1", "inf"):
        args = options.get_args_parser().parse_args([f"--{flag}", value])
        with pytest.raises(ValueError, match=f"^--{flag} "):
            options.check_arguments(args)
    options.check_arguments(options.get_args_parser().parse_args([f"--{flag}", "0.5"]))    # in range: fine


def test_a_non_finite_number_in_any_float_flag_is_refused_by_name():
    for argv, flag in ((["--lr", "nan"], "--lr"), (["--noise-snr", "3", "inf"], "--noise-snr")):
        with pytest.raises(ValueError, match=f"^{flag} .*must be a finite number"):
            options.check_arguments(options.get_args_parser().parse_args(argv))


def test_a_run_that_fails_before_training_leaves_nothing_and_the_corrected_rerun_starts(tiny_data, tmp_path, caplog):
    """#26.6: an error found once the data is read (here a --soundscape-labels table naming a file that is not
    there) left config.json and train.log, so the corrected command was refused ("already holds files")."""
    table = tmp_path / "teacher.csv"
    table.write_text("file,start_s,end_s,labels\nmissing.wav,0,5,aaabbb1\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="missing.wav"):
        train.main(quick_args(tiny_data, out, "--soundscape-labels", str(table), "--soundscape-audio",
                              str(tmp_path), "--max-steps", "1"))
    assert not out.exists()
    assert "removed what it had written" in caplog.text and "config.json" in caplog.text
    state = train.main(quick_args(tiny_data, out, "--max-steps", "1", "--epochs", "1"))     # not refused
    assert state.global_step == 1 and (out / "config.json").is_file()
    # a failure once training has started keeps the run's files (its logs say what went wrong)
    with pytest.raises(RuntimeError), runfolder.undone_if_setup_fails(out) as setup:
        setup.started = True
        (out / "steps.csv").write_text("global_step\n1\n")
        raise RuntimeError("in the loop")
    assert (out / "config.json").is_file() and (out / "steps.csv").is_file()
