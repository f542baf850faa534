"""The offline data that the recipes, studies and benchmarks share, on both paths (Debian Fashion-MNIST, digits)."""

from __future__ import annotations

import embedded_data
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.data


def test_environment_variable_forces_the_digits_fallback(force_digits):
    dataset, name, labels = embedded_data.load_embedded_images()
    assert name == "sklearn_digits" and labels == [str(i) for i in range(10)]
    assert len(dataset["train"]) + len(dataset["test"]) == 1797


@pytest.mark.parametrize("path", ["default", "digits"])
def test_image_tensors(path, monkeypatch):
    if path == "digits":
        monkeypatch.setenv(embedded_data.FORCE_DIGITS_ENV, "1")
    x_train, y_train, x_test, y_test, name = embedded_data.image_tensors()
    assert name == ("fashion_mnist" if embedded_data.fashion_mnist_available() else "sklearn_digits")
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == 1
        assert isinstance(y, torch.Tensor) and y.dtype == torch.int64 and len(y) == len(x)
        assert 0 <= x.min() and x.max() <= 1 and set(y.unique().tolist()) == set(range(10))


def test_label_noise_takes_a_datasets_column(force_digits):
    dataset, _, _ = embedded_data.load_embedded_images()
    column = dataset["train"]["label"]  # a lazy `Column` in datasets 5, not a list
    noisy, flipped = embedded_data.apply_label_noise(column, 0.25, 10, seed=0)
    labels = np.asarray(column)
    assert flipped.sum() == round(0.25 * len(labels))
    assert (noisy[flipped] != labels[flipped]).all() and (noisy[~flipped] == labels[~flipped]).all()
