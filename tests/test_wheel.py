"""The package as a user installs it: a wheel built from the repository, installed into a folder of its
own, imported from there and run from another directory. The configs ship inside it, so
`ldm-txt2img --config sd_tiny` works without the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT
from ldm.png_settings import read_png_settings

SOURCES = ("pyproject.toml", "setup.py", "README.md", "ldm", "configs")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding the installed wheel (the package and its `bin/` entry points)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"building the wheel needs setuptools >= 68 (have {setuptools.__version__})")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "-w", tmp / "dist", source)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("ldm-*.whl")
    target = tmp / "site"
    done = run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel)
    assert done.returncode == 0, done.stderr
    return target


def test_the_wheel_ships_the_configs_and_the_entry_points(installed):
    assert sorted(p.name for p in (installed / "ldm" / "configs").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "configs").glob("*.yaml"))
    for tool in ("ldm-txt2img", "ldm-img2img", "ldm-inpaint", "ldm-upscale", "ldm-convert", "ldm-eval", "ldm-bench",
                 "ldm-count-params", "ldm-measure-load-memory"):
        assert (installed / "bin" / tool).is_file(), tool


def test_txt2img_runs_from_the_wheel_outside_the_checkout(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    where = run(sys.executable, "-c", "import ldm; print(ldm.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    out = tmp_path / "out"
    r = run(installed / "bin" / "ldm-txt2img", "--config", "sd_tiny", "--prompt", "a red circle", "--steps", "2",
            "--seed", "3", "--device", "cpu", "--out", out, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-3.png", "00000-grid.png"]
    image = Image.open(out / "00000-3.png")
    settings = read_png_settings(out / "00000-3.png")
    assert image.size == (32, 32) and settings.options.seed == 3 and settings.model["config"] == "sd_tiny"
    count = run(installed / "bin" / "ldm-count-params", "sd15", cwd=tmp_path, env=env)
    assert count.returncode == 0 and "859,520,964" in count.stdout, count.stderr
