"""The project under one package-safe name, after `pip install -e .` (see pyproject.toml):

    from birdclef_pipeline import Predictor               # or: import birdclef_pipeline.infer as infer
    table = Predictor(["runs/demo/best.pt"]).predict(["site/x.ogg"])

In the checkout the modules import each other by plain names (`import data`), as `python train.py`
needs; this file is read only when the checkout is imported as the package birdclef_pipeline. It
loads every module as birdclef_pipeline.<name> -- its functions and classes then say so, and pickle
(a process pool's worker, a DataLoader started with spawn) finds them again by that name -- with
`import data` inside them answered by birdclef_pipeline.data only while they load: a `data` or
`model` module of your own is neither replaced nor used, and the checkout never goes on sys.path.
"""
import importlib
import importlib.abc
import importlib.util
import sys

# every top-level module of the checkout (tests/test_packaging.py checks the list is complete)
MODULES = ("audio", "augment", "cache", "cli", "data", "demo", "demo_sounds", "distributed", "engines",
           "evaluation", "extras", "frontend", "infer", "learner", "loader", "losses", "lr_find", "metrics",
           "model", "options", "outputs", "precision", "progress", "pseudo_labels", "pseudo_soundscapes", "report",
           "review", "runfolder", "sampling", "site_validation", "soundscapes", "train")


class _PlainNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import data` in a module of the package, while the package loads -> birdclef_pipeline.data.

    Loading them as plain names (the checkout put on sys.path) made every function's __module__ the
    plain name, so pickling one in a spawned worker failed with "import of module 'cache' failed"
    once the checkout left sys.path. Resolving a plain name when it is first imported, rather than
    in a fixed order, keeps any import order working."""

    def __init__(self):
        self.real_specs = {}

    def find_spec(self, name, path=None, target=None):
        if path is None and name in MODULES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{spec.name}")
        self.real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set __spec__ to the alias's: give the module back its own
        module.__spec__ = self.real_specs.pop(module.__spec__.name)


def _load_modules() -> None:
    others = {name: sys.modules.pop(name, None) for name in MODULES}     # whatever had those plain names
    finder = _PlainNames()
    sys.meta_path.insert(0, finder)
    try:
        for name in MODULES:
            globals()[name] = importlib.import_module(f"{__name__}.{name}")
    finally:
        sys.meta_path.remove(finder)
        for name, other in others.items():
            sys.modules.pop(name, None)
            if other is not None:
                sys.modules[name] = other


_load_modules()
Predictor = infer.Predictor  # noqa: F821 (loaded above)
