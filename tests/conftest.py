"""Fixtures shared by the test files (`pyproject.toml` puts `tests/`, `recipes/`, `benchmarks/` and `studies/` on
`sys.path`, so the helpers and the scripts import by name)."""

from __future__ import annotations

import embedded_data
import pytest


@pytest.fixture
def force_digits(monkeypatch):
    """The fallback image data, as on a machine without the Debian package `dataset-fashion-mnist`."""
    monkeypatch.setenv(embedded_data.FORCE_DIGITS_ENV, "1")
    assert not embedded_data.fashion_mnist_available()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state (mixed precision, device) in process-wide singletons: a bf16 Trainer in one test
    would otherwise make a later `Accelerator(cpu=True)` autocast to bf16."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


SYNC_DEBUG_ENV = "HF_VASSO_CUDA_SYNC_DEBUG"  # "error" or "warn": benchmarks/gpu_checks.py sets it for `pytest -m gpu`


@pytest.fixture(autouse=True)
def cuda_sync_debug_on_the_hot_path(monkeypatch):
    """With `HF_VASSO_CUDA_SYNC_DEBUG` set and a GPU, each engine method of the training hot path runs under
    `torch.cuda.set_sync_debug_mode(<value>)`: an op that synchronises host and device there raises (or warns). The
    tests' own assertions, which read values, run outside it."""
    import os

    import torch

    mode = os.environ.get(SYNC_DEBUG_ENV)
    if not mode or not torch.cuda.is_available():
        yield
        return
    import functools

    from hf_vasso.update import VassoUpdate

    def guarded(method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return run

    for name in ("absorb_gradient", "perturb", "restore", "guard_perturbed_gradient", "record_losses"):
        monkeypatch.setattr(VassoUpdate, name, guarded(getattr(VassoUpdate, name)))
    yield
