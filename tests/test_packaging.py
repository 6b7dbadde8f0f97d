"""Tests for `pip install -e .` (pyproject.toml) and the checkout imported as birdclef_pipeline (__init__.py).

Two make a throwaway virtual environment and run pip in it, offline (--no-deps, --no-build-isolation:
nothing is downloaded); the one that then caches audio through a spawned worker takes about 10-30 s
(two imports of the whole package, torch included: the test's and its worker's).
"""
from __future__ import annotations

import ast
import os
import site
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> tuple[str, ...]:
    """__init__.MODULES, read without importing the package (that loads torch and every module)."""
    for node in ast.parse((ROOT / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["MODULES"]:
            return ast.literal_eval(node.value)
    raise AssertionError("__init__.py has no MODULES")


def test_the_package_loads_every_module_of_the_checkout():
    """A module left out of MODULES is not loaded as birdclef_pipeline.<name>: `import cli` in cache.py
    then fails inside the package (or, before, loaded and kept a second, plain-named copy)."""
    modules = {path.stem for path in ROOT.glob("*.py")} - {"__init__"}
    assert sorted(package_modules()) == sorted(modules)


def throwaway_env(folder: Path, over_this_python: bool) -> Path:
    """A virtual environment -> its python. over_this_python: it sees this interpreter's packages (torch,
    setuptools, pip...) through a .pth file; otherwise the base interpreter's own (as `python3 -m venv
    --system-site-packages` makes it: for Python 3.11, the setuptools it bundles)."""
    venv.EnvBuilder(system_site_packages=not over_this_python, with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    if over_this_python:
        packages = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        Path(packages, "this_python.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no pip in the throwaway environment")
    return python


def pip_install_editable(python: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-input", "--disable-pip-version-check", *flags, "-e", str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=python.parents[2])


def test_an_editable_install_without_build_isolation_builds_or_names_the_setuptools_it_needs(tmp_path):
    """pyproject's build requirements are honest: with them met, `pip install -e . --no-build-isolation`
    builds; with them unmet, pip says which (here: Python 3.11's bundled setuptools 65.5, which without
    the `wheel` package stops at "invalid command 'bdist_wheel'" though it met the old setuptools>=64)."""
    python = throwaway_env(tmp_path / "env", over_this_python=False)
    result = pip_install_editable(python, "--check-build-dependencies")
    output = result.stdout + result.stderr
    if result.returncode == 0:
        assert list((tmp_path / "env").glob("lib/python*/site-packages/__editable__*birdclef_pipeline*")), output
    else:
        assert "build dependencies" in output and "bdist_wheel" not in output, output[-3000:]


CACHE_THROUGH_THE_PACKAGE = """
import json, sys
import numpy as np, soundfile as sf
import birdclef_pipeline.cache as cache

paths = []
for i in range(2):
    paths.append(f"r{i}.wav")
    sf.write(paths[-1], 0.3 * np.sin(np.arange(3 * 16000) * 0.05 * (i + 1)), 16000)
settings = cache.cache_settings(16000, "ends", 1.0, 1.0)
cache.build_cache(["a", "b"], paths, "c", settings, workers=1)
assert json.load(open("c/manifest.json"))["complete"]
assert np.load("c/done.npy").tolist() == [1, 1], "a worker failed to decode"
assert cache._cache_recording.__module__ == "birdclef_pipeline.cache"
assert not {"cache", "audio", "cli", "data", "pseudo_labels"} & set(sys.modules), "plain names left behind"
print("ok")
"""


def test_build_cache_with_a_worker_process_works_when_installed_as_birdclef_pipeline(tmp_path):
    """The spawned worker unpickles build_cache's worker function by its module's name: that was the plain
    `cache`, which only the checkout on sys.path can import (PicklingError: import of module 'cache'
    failed). Installed for real, and run from outside the checkout."""
    python = throwaway_env(tmp_path / "env", over_this_python=True)
    installed = pip_install_editable(python)
    if installed.returncode != 0 and "bdist_wheel" in installed.stdout + installed.stderr:
        pytest.skip("this interpreter's setuptools cannot build an editable install without build isolation")
    assert installed.returncode == 0, (installed.stdout + installed.stderr)[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", CACHE_THROUGH_THE_PACKAGE], capture_output=True, text=True,
                            cwd=work, timeout=300, env={**environment, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]
