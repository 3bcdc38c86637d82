"""Fixtures shared by the tests; the constants and helpers they use are in helpers.py.

Tests marked `@pytest.mark.slow` (minutes each) are left out by default (pyproject.toml's addopts);
run them with `python -m pytest -m slow`.
"""

import os
import shutil

import pytest
import torch

from helpers import FAST, INPAINTING, TINY, randomize
from ldm import LDMPipeline

# With several workers (pytest-xdist, `-n auto` in pyproject.toml's addopts) the cores are shared out:
# each worker and the tools it starts get cores / workers threads instead of all cores each,
# which would make the workers' OpenMP threads wait on each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


@pytest.fixture(scope="module", autouse=True)
def _free_module_folders(tmp_path_factory):
    """When a test module ends, remove the folders its fixtures made with tmp_path_factory.mktemp
    (models, runs: hundreds of MB per module). A test's own tmp_path is removed as it passes
    (pyproject.toml's tmp_path_retention_policy) and kept when it fails; those names start with
    the test's name, so with "test_"."""
    yield
    base = tmp_path_factory.getbasetemp()
    for entry in base.iterdir():
        if entry.is_dir() and not entry.name.startswith("test_"):
            shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. The models in these tests are small, so one thread is as
    fast as two, and on a busy 2-core machine two OpenMP threads can wait on each other for
    seconds per call. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe() -> LDMPipeline:
    """The FAST tiny text-to-image pipeline, every weight non-zero (one per test module)."""
    return randomize(LDMPipeline.from_config(TINY, FAST, seed=0))


@pytest.fixture(scope="module")
def tiny_inpainting_pipe() -> LDMPipeline:
    """The same with an inpainting U-Net (9 input channels)."""
    return randomize(LDMPipeline.from_config(TINY, INPAINTING, seed=0))
