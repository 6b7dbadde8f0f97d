"""recipes/*.json: every file is a valid `train.py --config`, is the command line it stands for, sets
only what differs from the defaults; demo.json is the README's first command; each log recipe holds the
values the experiment log gives (table below, citing the log); bench/recipes.py reads its levers from
the files."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

import options

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "recipes"
RECIPES = sorted(path.stem for path in RECIPE_DIR.glob("*.json"))
LOG_RECIPES = sorted(name for name in RECIPES if name not in ("demo", "demo-site-nocall", "soundscape"))

# paths differ per user: only demo.json (the README's command, on the demo data) holds any
PATH_KEYS = {"data_dir", "cache", "extras", "nocall_audio", "nocall_soundscapes", "nocall_detections", "bg_dir",
             "init_from", "pretrained_file", "val_soundscapes", "val_soundscape_audio", "test_soundscapes",
             "test_soundscape_audio", "out_dir", "resume", "config"}
# the first command's budget for the demo data, which soundscape.json drops
DEMO_BUDGET = {"pretrained", "lr", "batch_size", "epochs", "patience"}

V2S_21K = "tf_efficientnetv2_s.in21k"
V2S_1K = "tf_efficientnetv2_s.in1k"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "bench" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def recipe(name: str) -> dict:
    return json.loads((RECIPE_DIR / f"{name}.json").read_text())


def flag_dests() -> set[str]:
    return {action.dest for action in options.get_args_parser()._actions}


def check_keys_are_flags(name: str) -> None:
    """Every key of a recipe is a flag of train.py."""
    unknown = set(recipe(name)) - flag_dests()
    assert not unknown, f"recipes/{name}.json: {sorted(unknown)} are no flags of train.py"


def parsed(name: str) -> argparse.Namespace:
    return options.parse_args(["--config", str(RECIPE_DIR / f"{name}.json")])


def same_type(json_value, value) -> bool:
    if isinstance(json_value, list):
        return isinstance(value, list) and len(json_value) == len(value) and all(
            same_type(a, b) for a, b in zip(json_value, value))
    return type(json_value) is type(value)


# ----------------------------------------------------------------------------- every file

def test_recipes_folder_is_documented():
    readme = (RECIPE_DIR / "README.md").read_text()
    assert RECIPES, "no recipes/*.json"
    missing = [name for name in RECIPES if f"`{name}.json`" not in readme]
    assert not missing, f"recipes/README.md does not list {missing}"
    for name in RECIPES:
        assert isinstance(recipe(name), dict) and recipe(name), f"recipes/{name}.json: a non-empty JSON object"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_as_config(name):
    check_keys_are_flags(name)
    args = parsed(name)
    for dest, value in recipe(name).items():
        assert getattr(args, dest) == value, dest


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_its_command_line(name):
    """The file's values spelled as flags and parsed by train.py's own parser (its types, choices and
    nargs) give the same arguments as --config FILE; and the JSON values have the parsed types."""
    check_keys_are_flags(name)
    values = recipe(name)
    flags = bench.recipe_flags(values)
    from_flags = vars(options.get_args_parser().parse_args(flags))
    from_config = vars(parsed(name))
    for values_of in (from_flags, from_config):
        values_of.pop("config")
    assert from_flags == from_config
    for dest, value in values.items():
        assert same_type(value, from_flags[dest]), f"{dest} = {json.dumps(value)}: parses as {from_flags[dest]!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_sets_only_what_differs_from_the_defaults(name):
    parser = options.get_args_parser()
    dests = flag_dests()
    same = [dest for dest, value in recipe(name).items() if dest in dests and parser.get_default(dest) == value]
    assert not same, f"recipes/{name}.json repeats defaults: {same}"


@pytest.mark.parametrize("name", [name for name in RECIPES if name not in ("demo", "demo-site-nocall")])
def test_recipe_holds_no_paths(name):
    assert not set(recipe(name)) & PATH_KEYS


def test_bad_recipe_values_are_refused(tmp_path):
    """What the folder's tests rely on: --config refuses a key that is no flag, and recipe_flags refuses a
    value no flag can spell."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"no_such_flag": 1}))
    with pytest.raises(ValueError, match="no_such_flag"):
        options.parse_args(["--config", str(path)])
    with pytest.raises(ValueError):
        bench.recipe_flags({"flush_denormal": False})
    with pytest.raises(ValueError):
        bench.recipe_flags({"lr": None})
    with pytest.raises(SystemExit):      # a choice train.py does not have, through its own parser
        options.get_args_parser().parse_args(bench.recipe_flags({"loss": "hinge"}))


# ----------------------------------------------------------------------------- demo.json, soundscape.json

def readme_first_command() -> list[str]:
    """README.md's first ```bash block: the words after `train.py`, without --out-dir."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1).replace("\\\n", " ")
    words = shlex.split(block[block.index("train.py") + len("train.py"):])
    if "--out-dir" in words:
        at = words.index("--out-dir")
        del words[at:at + 2]
    return words


def resolved(args: argparse.Namespace) -> dict:
    options.resolve_deprecated(args)             # --bg-dir's old no-call meaning, as train.py applies it
    values = vars(args)
    for dest in ("config", "out_dir"):
        values.pop(dest, None)
    return values


# what the README's figures were measured with: bench/self_training.py's `pcen` (recipes/demo.json), and its
# `readme`, the first command until the demo's unlabelled folder held the site's birds
MEASURED_FIRST_COMMAND = "--no-pretrained --lr 1e-3 --batch-size 16 --epochs 10 --patience 0 --frontend pcen"
FORMER_FIRST_COMMAND = ("--no-pretrained --lr 1e-3 --batch-size 16 --epochs 20 --patience 0 --frontend pcen --nocall "
                        "--nocall-soundscapes demo_data/unlabeled_soundscapes --bg-dir demo_data/unlabeled_soundscapes "
                        "--bg-prob 0.5 --bg-snr 0 15")


def test_demo_recipe_is_the_readme_first_command():
    check_keys_are_flags("demo")
    words = readme_first_command()
    assert words[:2] == ["--config", "recipes/demo.json"] and "--data-dir" not in words
    from_readme = resolved(options.parse_args(words))
    measured = resolved(options.parse_args(MEASURED_FIRST_COMMAND.split()))
    assert from_readme == measured, {dest: (from_readme[dest], measured[dest])
                                     for dest in from_readme if from_readme[dest] != measured.get(dest)}
    former = resolved(options.parse_args(["--config", str(RECIPE_DIR / "demo-site-nocall.json")]))
    assert former == resolved(options.parse_args(FORMER_FIRST_COMMAND.split()))


def test_soundscape_recipe_is_demo_without_budget_and_paths():
    demo = recipe("demo")
    assert recipe("soundscape") == {dest: value for dest, value in demo.items()
                                    if dest not in DEMO_BUDGET | PATH_KEYS}
    assert recipe("soundscape")["frontend"] == "pcen" and "nocall" not in recipe("soundscape")


# ----------------------------------------------------------------------------- the experiment log

# What the log says of each experiment, checked on the parsed arguments (so a value equal to the default
# is checked too). "exp N" quotes the experiment log (shared/experiment-log.md); "carried" marks a value the experiment
# does not restate, taken from an earlier one of its line.
ORIGINAL = {
    "backbone": "tf_efficientnet_b0.ns_jft_in1k",    # Baseline: "Efficientnet_b0_ns"
    "monitor": "val_loss",                           # exp 1: "Self-stopped, monitoring val loss"
    "patience": 8,                                   # exp 5: "Patience = 32 (baseline = 8)"
    "min_delta": 0.0,                                # exp 5: "min delta = 0 (baseline)"
    "lr": 5e-4,                                      # exp 4: "LR = 5e-4 (baseline)"
    "evals_per_epoch": 2,                            # exp 5: "Currently checking 2x per epoch"
    "loss": "ce",                                    # trained with CE; exp 6-7 changed the loss the monitor saw
    "frontend": "mel",                               # exp 10 lists the notebook's settings:
    "n_fft": 1024, "hop": 512, "n_mels": 128,        # "HOP_LENGTH = 512, N_FFT = 1024, N_MELS = 128"
    "fmin": 20.0, "fmax": 16000.0,                   # "FMIN = 20", "FMAX = 16000"
    "crop_policy": "ends", "ends_seconds": 8.0,      # "8 second chunkes from beginning and end, randomly crop 5 secs"
    "window_seconds": 5.0,
    "mixup_alpha": 0.2,                              # "MIXUP_ALPHA = 0.2"
    "sampler": "none", "init_from": None, "head": "linear",
}
EXP10 = {**ORIGINAL,
         "backbone": V2S_21K,                        # exp 10: "MODEL: tf_efficientnetv2_s_in21k"
         "patience": 4,                              # exp 10: "PATIENCE = 4"
         "loss": "ce"}                               # exp 7: "CrossEntropyLoss() ... Stick with this!"
V2S_LINE = {"backbone": V2S_21K, "loss": "ce", "head": "linear", "sampler": "none",
            "optimizer": "adam", "momentum": 0.9}    # exp 12: "Torch defaults for adam: ... beta1=0.9"
EXP72 = {**V2S_LINE,
         "lr": 1e-3, "weight_decay": 1e-4,           # carried from exp 55: "Re-trying with LR=10-3, Decay 10-4"
         "init_from": None,                          # exp 73: "... and try again to pre-train" (not yet)
         "bg_snr": [0.0, 2.0],                       # exp 72: "increase background noise snr to 0 to 2db"
         "freeze_backbone_epochs": 4,                # exp 72: "unfreeze backbone after 4"
         "noise_snr": [2.0, 5.0],                    # exp 73: coloured noise "was 2-5db"
         "freq_masks": 2, "time_masks": 2,           # exp 73: "3 lines (from 2)"
         "mask_max_pct": 0.05,                       # exp 73: "max % 10 (from 5)"
         "keep_last": 14,                            # carried from exp 68: "keeping the last 14 checkpoints"
         "aug_strength": 1.0}                        # exp 73 states its values outright (no AUG factor applied)
EXP73 = {**EXP72,
         "noise_snr": [1.0, 2.0],                    # exp 73: "was 2-5db, changed to 1-2"
         "freq_masks": 3, "time_masks": 3,           # exp 73: "Spec Augment: 3 lines (from 2)"
         "mask_max_pct": 0.1}                        # exp 73: "max % 10 (from 5)"
EXP90 = {**EXP73,
         "backbone": V2S_1K,                         # exp 82: "Switch to effnetV2 instead of V2- 21k"
         "head_init": "fresh",                       # carried from exp 45 / 50: "Replace Head"
         "init_from": None,                          # exp 90: "pre-train" (exp 84's checkpoint: the user's path)
         "label_smoothing": 0.0,                     # exp 90: "with no smoothing"
         "extras_chunk": 8.0,                        # exp 76: "birdclef23-extras-8-sec-ogg"
         "freeze_backbone_epochs": 1000}             # exp 90: "no backbone tuning" (see also the check below)

LOG = {
    "original": ORIGINAL,
    "exp07-ce": {**ORIGINAL,
                 "backbone": V2S_21K,                # exp 2-6: "EfficientNetV2s21k"
                 "loss": "ce",                       # exp 7: "CrossEntropyLoss()"
                 "patience": 12,                     # exp 6: "Patience = 12"; after exp 7: "Reduce the patience back to 8"
                 "monitor": "val_loss"},             # exp 7: "match between loss and CMAP" (still stopping on the loss)
    "exp10-new-baseline": EXP10,
    "exp13-pcen": {**EXP10,
                   "frontend": "pcen",               # exp 11: "PCEN"
                   "pcen_gain": 0.98, "pcen_bias": 2.0, "pcen_power": 0.5,    # exp 12: Arai's PCEN parameters
                   "pcen_time_constant": 0.4, "pcen_eps": 1e-6,
                   "optimizer": "adam", "momentum": 0.9,                       # exp 12: "Torch defaults for adam"
                   "fmax": 14000.0, "lr": 1e-5},     # exp 13: "Change fmax to 14,000, and LR to 1e-5"
    "exp18-lb79": {**EXP10,                          # exp 17: "Forked Train version 41 ... (from experiment 10)"
                   "epochs": 7},                     # exp 18: "LB 0.79 after 7 epochs"
    "exp19-flush-denormal": {**EXP10,
                             "flush_denormal": True,  # exp 19: "torch.set_flush_denormal(True)"
                             "img_size": [256, 157],  # exp 19: "chopped up the image to be 256 x 157"
                             "patience": 4},          # exp 19: "with patience = 4"
    "exp45-fresh-head": {**V2S_LINE,
                         "head_init": "fresh",       # exp 45: "Replaced the whole classifier head."
                         "init_from": None,          # exp 45: "Used pre-training from Expt 26" (the user's path)
                         "loss": "ce",               # exp 45: "CrossEntropyLoss"
                         "lr": 5e-4,                 # exp 45: "LR 5e-4"
                         "weight_decay": 1e-5,       # carried from exp 44: "changed to 5e-4 LR, 1e-5 WD"
                         "nocall": True,             # exp 45: "with the no-call column removed from final dataframe"
                         "sampler": "none"},         # exp 40: "it was the weighted sampling that was screwing things up"
    "exp56-small-head": {**V2S_LINE,
                         "head": "linear",           # exp 56: "Same as 55 but with the small head"
                         "init_from": None,          # exp 54: "no pre-training"
                         "lr": 1e-3, "weight_decay": 1e-4,   # exp 55: "Re-trying with LR=10-3, Decay 10-4"
                         "loss": "ce",               # exp 51: "changed back to CE loss"
                         "monitor": "cmap5"},        # exp 56: "Submitted best cmap weights"
    "exp72-bg-noise": EXP72,
    "exp73-specaugment-noise": EXP73,
    "exp90-frozen-pretrained": EXP90,
    "final-plan": {**EXP90,                          # exp 91, "Final Plan": "Pre-train with 21-22, no
                   "label_smoothing": 0.0,           # label-smoothing, no backbone tuning, ensemble best epochs"
                   "keep_best": 3},
}


def test_every_log_recipe_is_in_the_table():
    assert sorted(LOG) == LOG_RECIPES


@pytest.mark.parametrize("name", LOG_RECIPES)
def test_log_recipe_holds_what_the_log_says(name):
    check_keys_are_flags(name)
    args = parsed(name)
    wrong = {dest: (getattr(args, dest), expected) for dest, expected in LOG[name].items()
             if getattr(args, dest) != expected}
    assert not wrong, f"recipes/{name}.json: (parsed, the log) {wrong}"


@pytest.mark.parametrize("name", ["exp90-frozen-pretrained", "final-plan"])
def test_no_backbone_tuning_outlasts_any_run_length(name):
    # exp 90 / final plan: "no backbone tuning": frozen for every epoch, also with a longer --epochs
    args = parsed(name)
    assert args.freeze_backbone_epochs >= max(args.epochs, 100)


@pytest.mark.parametrize("name", ["exp72-bg-noise", "exp73-specaugment-noise", "exp90-frozen-pretrained",
                                  "final-plan"])
def test_coloured_noise_is_on(name):
    # exp 73: coloured noise at 1-2 dB (72: 2-5 dB) is applied, so its probability is not train.py's 0
    assert parsed(name).noise_prob > 0


# ----------------------------------------------------------------------------- bench/recipes.py

def test_bench_levers_come_from_the_recipe_files():
    assert bench.RECIPES["noise"] == bench.recipe_file_flags(
        "exp73-specaugment-noise", ("noise_prob", "noise_snr", "freq_masks", "time_masks"))
    assert bench.RECIPES["noise"] == ["--noise-prob", "0.5", "--noise-snr", "1", "2", "--freq-masks", "3",
                                      "--time-masks", "3"]     # what bench/README.md's table measured
    assert bench.RECIPES["pcen"] == ["--frontend", "pcen"]
    for flags in bench.RECIPES.values():
        options.get_args_parser().parse_args(flags)


def test_bench_command_line_takes_its_recipes_and_the_files(tmp_path):
    parser = bench.get_args_parser()
    assert parser.parse_args([]).recipes == list(bench.RECIPES)
    args = parser.parse_args(["--recipes", "baseline", "noise", *RECIPES, "--epochs", "2"])
    assert args.recipes[:2] == ["baseline", "noise"]
    for name in ["noise", *RECIPES]:
        train_args = options.get_args_parser().parse_args(bench.train_argv(name, args, tmp_path / name))
        # the bench's budget holds whatever the recipe says
        assert (train_args.epochs, train_args.batch_size, train_args.patience, train_args.keep_last,
                train_args.pretrained) == (2, args.batch_size, 0, 1, False)
        if name in RECIPES and "lr" in recipe(name):
            assert train_args.lr == recipe(name)["lr"]
        else:
            assert train_args.lr == args.lr


def test_readme_data_py_extras_commands_parse():
    """The `python data.py extras` flags recipes/README.md gives with the extras recipes are data.py's."""
    import data
    spans = [span[span.index("--min"):] for span in re.findall(r"`([^`]*--min [^`]*)`",
                                                                 (RECIPE_DIR / "README.md").read_text())]
    assert len(spans) >= 7
    parser = data.get_args_parser()
    for span in spans:
        args = parser.parse_args(["extras", "--detections", "det.csv", *shlex.split(span)])
        assert args.max >= args.min >= 0 and args.divisor >= 1, span
    random_ends = parser.parse_args(["extras", "--detections", "det.csv", *shlex.split(spans[-1])])
    # final plan: "2-3//1 (21,000) completely random, also changed the sampling to [3,-2] to avoid first 9 secs"
    assert (random_ends.min, random_ends.max, random_ends.divisor, random_ends.choose,
            random_ends.skip_start, random_ends.skip_end) == (2, 3, 1.0, "random", 9.0, 6.0)
