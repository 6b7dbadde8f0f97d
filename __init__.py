"""The project under one package-safe name, after `pip install -e .` (see pyproject.toml):

    from birdclef_pipeline import Predictor               # or: import birdclef_pipeline.infer as infer
    table = Predictor(["runs/demo/best.pt"]).predict(["site/x.ogg"])

In the checkout the modules import each other by plain names (`import data`), as `python train.py`
needs; this file is read only when the checkout is imported as the package birdclef_pipeline. It
loads every module under birdclef_pipeline.<name>, with the plain names pointing at them only while
they load: a `data` or `model` module of your own is neither replaced nor used.
"""
import importlib
import sys
from pathlib import Path

MODULES = ("audio", "augment", "distributed", "progress", "cache", "demo_sounds", "demo", "metrics", "soundscapes",
           "extras", "sampling", "loader", "pseudo_soundscapes", "data", "frontend", "model", "engines", "losses",
           "evaluation", "outputs", "infer", "learner", "lr_find", "options", "report", "runfolder", "train")   # dependencies first


def _load_modules() -> None:
    here = str(Path(__file__).resolve().parent)
    others = {name: sys.modules.pop(name, None) for name in MODULES}     # whatever had those plain names
    sys.path.insert(0, here)
    try:
        for name in MODULES:
            module = importlib.import_module(name)
            sys.modules[f"{__name__}.{name}"] = module
            globals()[name] = module
    finally:
        sys.path.remove(here)
        for name, other in others.items():
            sys.modules.pop(name, None)
            if other is not None:
                sys.modules[name] = other


_load_modules()
Predictor = infer.Predictor  # noqa: F821 (loaded above)
