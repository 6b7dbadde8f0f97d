"""Train several recipes of the experiment log on the demo data for a fixed budget, on CPU.

    python bench/recipes.py [--epochs 8] [--recipes baseline bce pcen ...]
    python bench/recipes.py --recipes original exp07-ce       # any recipes/*.json by its name

Each recipe is train.py with a few flags, from random weights, for the same
number of epochs; then its best checkpoint is applied to the demo soundscapes
(infer.py) and scored against their 5-second labels. The table shows both
numbers side by side: the clip-level validation cmAP the original experiments
optimised, and the soundscape cmAP that the leaderboard actually measured.

The single-lever recipes below (RECIPES) are the default set; those that are
levers of a logged experiment are read from that experiment's recipes/ file, so
the two cannot drift. A recipes/ file named with --recipes runs as
`train.py --config FILE` would, under this budget: --epochs, --batch-size,
--patience 0, --keep-last 1, --seed and random weights are the bench's; its
--lr applies unless the file sets one. Files that need paths (recipes/README.md)
stop with train.py's message naming the missing flag.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import infer  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402

RECIPE_DIR = ROOT / "recipes"


def recipe_names() -> list[str]:
    """The recipes/ files, by name (file name without .json)."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.json"))


def read_recipe(name: str) -> dict:
    """recipes/<name>.json -> {dest: value}."""
    values = json.loads((RECIPE_DIR / f"{name}.json").read_text())
    if not isinstance(values, dict):
        raise ValueError(f"recipes/{name}.json: expected a JSON object of flag values")
    return values


def command_value(value) -> str:
    """A JSON value as a command-line word: 1.0 -> '1', 0.0005 -> '0.0005'."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def recipe_flags(values: dict, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """{dest: value} (a recipes/ file, a config.json) -> the train.py flags that give those values.

    A true/false flag becomes the option that stores that value (pretrained false -> --no-pretrained);
    a value that no flag can spell (false for a store_true flag, null for a flag with a value) is refused."""
    parser = parser or options.get_args_parser()
    actions = {}
    for action in parser._actions:
        if action.option_strings:
            actions.setdefault(action.dest, []).append(action)
    flags = []
    for dest, value in values.items():
        if dest not in actions:
            raise ValueError(f"{dest} is no flag of train.py")
        if isinstance(value, bool):
            storing = [action for action in actions[dest] if action.nargs == 0 and action.const is value]
            if not storing:
                raise ValueError(f"{dest} = {json.dumps(value)}: no flag of train.py stores that value")
            flags.append(max(storing[0].option_strings, key=len))
            continue
        action = actions[dest][0]
        flag = max(action.option_strings, key=len)
        if value is None:
            raise ValueError(f"{dest} = null: leave the key out to keep {flag}'s default")
        if action.type is options.image_size and isinstance(value, list):
            flags += [flag, "x".join(str(side) for side in value)]
        elif isinstance(value, list):
            flags += [flag, *(command_value(item) for item in value)]
        else:
            flags += [flag, command_value(value)]
    return flags


def recipe_file_flags(name: str, keys: tuple[str, ...] | None = None) -> list[str]:
    """The flags of recipes/<name>.json, or of its `keys` only (each must be in the file)."""
    values = read_recipe(name)
    if keys is not None:
        missing = [key for key in keys if key not in values]
        if missing:
            raise KeyError(f"recipes/{name}.json has no {missing}")
        values = {key: values[key] for key in keys}
    return recipe_flags(values)


RECIPES = {
    "baseline": [],                                          # this project's defaults: CE, mixup 0.2, ends crops
    "bce": ["--loss", "bce"],
    # PCEN as experiment 13 ran it (the log's PCEN parameters are the --pcen-* defaults)
    "pcen": recipe_file_flags("exp13-pcen", ("frontend",)),
    "mlp-head": ["--head", "mlp", "--dropout", "0.5"],
    "inverse-sampling": ["--sampler", "inverse"],
    "label-smoothing": ["--label-smoothing", "0.1"],
    # experiment 73's coloured noise and SpecAugment
    "noise": recipe_file_flags("exp73-specaugment-noise", ("noise_prob", "noise_snr", "freq_masks", "time_masks")),
    "random-crops": ["--crop-policy", "random"],
}


def train_argv(name: str, args, out: Path) -> list[str]:
    """train.py's arguments for recipe `name` (a RECIPES entry or a recipes/ file) under the bench's budget."""
    budget = ["--data-dir", str(args.data_dir), "--no-pretrained", "--out-dir", str(out), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--patience", "0", "--keep-last", "1", "--seed", str(args.seed)]
    if name in RECIPES:
        return [*budget, "--lr", str(args.lr), *RECIPES[name]]
    # the file's flags, then the budget again so that it wins (but the file's --lr)
    return ["--lr", str(args.lr), *recipe_file_flags(name), *budget]


def train_recipe(name: str, args, work: Path) -> dict:
    out = work / name
    train_args = options.get_args_parser().parse_args(train_argv(name, args, out))
    started = time.time()
    train.main(train_args)
    seconds = time.time() - started
    # from metrics.csv: the best cmAP5 whatever the recipe's --monitor (original.json stops on val_loss)
    metrics = pd.read_csv(out / "metrics.csv")
    scores = infer.main(infer.get_args_parser().parse_args([
        "--ckpts", str(out / "best.pt"), "--soundscapes", str(Path(args.data_dir) / "test_soundscapes"),
        "--labels", str(Path(args.data_dir) / "test_soundscapes_labels.csv"), "--out", str(out / "submission.csv"),
        "--precision", "fp32"]))["scores"]
    flags = RECIPES[name] if name in RECIPES else recipe_file_flags(name)
    return {"recipe": name, "flags": " ".join(flags) or "(defaults)", "val_cmap5": float(metrics["cmap5"].max()),
            "chance_cmap5": float(metrics["chance_cmap5"].iloc[0]), "soundscape_cmap5": scores["cmap5"],
            "soundscape_macro_ap": scores["macro_ap"], "minutes": seconds / 60}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(data.DEMO_DIR))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES) + recipe_names(),
                        metavar="RECIPE", help=f"of {', '.join(RECIPES)}, or a recipes/ file: "
                                               f"{', '.join(recipe_names())}")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "recipes"))
    return parser


def main() -> None:
    args = get_args_parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    data.ensure_demo_data(args.data_dir)
    rows = []
    for name in args.recipes:
        rows.append(train_recipe(name, args, Path(args.work_dir)))
        print(f"{name}: {rows[-1]}", flush=True)
    print(f"\n{args.epochs} epochs each, batch {args.batch_size}, lr {args.lr}, random init, seed {args.seed}; "
          f"chance cmAP5 on the validation clips {rows[0]['chance_cmap5']:.3f}\n")
    print("| recipe | flags | best validation cmAP5 (clips) | soundscape cmAP5 | soundscape macro AP | minutes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | `{row['flags']}` | {row['val_cmap5']:.3f} | {row['soundscape_cmap5']:.3f} "
              f"| {row['soundscape_macro_ap']:.3f} | {row['minutes']:.1f} |")


if __name__ == "__main__":
    main()
