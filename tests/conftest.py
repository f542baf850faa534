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
