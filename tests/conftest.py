"""Shared pytest set-up: the ``cuda`` marker and the device its tests run on.

Tests marked ``cuda`` (tests/test_cuda.py) take the ``cuda_device`` fixture:

- ``torch.device("cuda")`` where a CUDA GPU is present;
- skipped otherwise ("no CUDA GPU; tools/gpu_check.sh runs them on one");
- ``DENSEVLM_CUDA_TESTS_ON=cpu``: run on the CPU instead. This is the dry run of tools/gpu_check.sh (CI runs it):
  every line of every CUDA test runs, and their "CUDA vs CPU" comparisons compare the CPU with itself;
- ``DENSEVLM_CUDA_TESTS_ON=cuda``: on the GPU machine, a missing GPU is an error instead of a skip, so that a
  broken driver or a CPU-only torch cannot pass the GPU check by skipping everything.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "DENSEVLM_CUDA_TESTS_ON"
NO_GPU = "no CUDA GPU; tools/gpu_check.sh runs them on one"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"cuda: needs a CUDA GPU; skipped without one ({DEVICE_ENV}=cpu runs them on the CPU: the dry "
        "run of tools/gpu_check.sh)")
    _wanted()  # a misspelt value stops the session at once


def _wanted() -> str:
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r}: expected 'cpu' (the dry run on the "
                                "CPU), 'cuda' (require a GPU) or nothing (the GPU where present, else skip)")
    return wanted


def cuda_test_device() -> torch.device | None:
    """The device tests marked ``cuda`` run on, or None when they are skipped (see the module docstring)."""
    wanted = _wanted()
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if wanted == "cuda":
        raise pytest.UsageError(f"{DEVICE_ENV}=cuda but torch sees no CUDA GPU (torch {torch.__version__}, "
                                f"built for CUDA {torch.version.cuda})")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and cuda_test_device() is None:
        pytest.skip(NO_GPU)


@pytest.fixture
def cuda_device(request: pytest.FixtureRequest) -> torch.device:
    """The device of a test marked ``cuda``: the GPU, or the CPU in the dry run (``DENSEVLM_CUDA_TESTS_ON=cpu``)."""
    if request.node.get_closest_marker("cuda") is None:
        raise pytest.UsageError(f"{request.node.nodeid}: the cuda_device fixture is for tests marked cuda")
    device = cuda_test_device()
    if device is None:  # (pytest_runtest_setup skipped such tests already)
        pytest.skip(NO_GPU)
    return device
