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
