"""What the command lines share: the flags several tools take (each defined here once, with one
default), the action that keeps an old spelling working, and the checked types of numbers.

    group = parser.add_argument_group("data")
    cli.add_data_dir(group); cli.add_split_flags(group)       # train.py, data.py cache / soundscapes
    parser.add_argument("--old-name", dest="new_name", action=cli.Deprecated, new="--new-name")

Command-line code uses it: train.py's options and each data.py subcommand's `add_command`; data.py
also reads DEMO_DIR from it (the one place the demo folder is named).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import audio

log = logging.getLogger("birdclef")

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"


# ----------------------------------------------------------------------------- flags several tools share

def add_data_dir(group) -> None:
    group.add_argument("--data-dir", nargs="+", default=[str(DEMO_DIR)],
                       help="one or more BirdCLEF folders (the 2021-2025 layouts are recognised); several "
                            "are merged: the vocabulary is their union and a xeno-canto recording in more "
                            "than one is used once. The default demo folder is generated on first use")


def add_split_flags(group) -> None:
    """The split of the recordings: train.py and `data.py soundscapes` must draw the same one."""
    group.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each species' recordings held out (ignored with --folds)")
    group.add_argument("--folds", type=int, default=0, help="K-fold split when > 1")
    group.add_argument("--fold", type=int, default=0, help="which fold is validation, with --folds")


def add_seed(group, help_text: str = "seed of every random stream") -> None:
    group.add_argument("--seed", type=int, default=42, help=help_text)


def add_crop_flags(group) -> None:
    """How a training crop is cut: train.py, and `data.py cache`, which must decode what those crops need."""
    group.add_argument("--crop-policy", choices=audio.CROP_POLICIES, default="ends",
                       help="ends: random window inside the first or last --ends-seconds (the "
                            "original recipe); random: anywhere in the recording")
    group.add_argument("--ends-seconds", type=float, default=8.0, help="length of the 'ends' segments")


def add_sample_rate(group, help_text: str = "audio is resampled to this rate") -> None:
    group.add_argument("--sample-rate", type=int, default=32000, help=help_text)


def add_window_seconds(group) -> None:
    group.add_argument("--window-seconds", type=float, default=5.0, help="length of one input window")


def add_workers(group, help_text: str = "data loader processes") -> None:
    group.add_argument("--workers", type=int, default=2, help=help_text)


# ----------------------------------------------------------------------------- old spellings

class Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest and says once which flag to use.

        parser.add_argument("--bg-dir", dest="bed_dir", action=Deprecated, new="--bed-dir")
    """

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs.setdefault("help", f"deprecated spelling of {new}")
        kwargs.setdefault("default", argparse.SUPPRESS)   # the new flag owns the default
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("%s is deprecated: use %s", option_string, self.new)
        setattr(namespace, self.dest, values)


def deprecated_aliases(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of a parser that are old spellings (for the shared-defaults check)."""
    return {option for action in parser._actions if isinstance(action, Deprecated) for option in action.option_strings}
