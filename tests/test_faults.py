"""Non-finite values through the Trainer: they never reach d or the weights, and the metrics say what happened."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_args, make_dataset, make_model

from hf_vasso import VassoTrainer


class NaNLossTrainer(VassoTrainer):
    """Multiplies the loss by NaN in pass 1 of the steps in `clean_nan_steps`, or in every pass 2."""

    clean_nan_steps: tuple[int, ...] = ()
    perturbed_nan = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        perturbed = self.vasso is not None and self.vasso.perturbed
        if (perturbed and self.perturbed_nan) or (not perturbed and self.state.global_step in self.clean_nan_steps):
            loss = loss * float("nan")
        return loss


def metric_rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", [{}, {"bf16": True}])
def test_nonfinite_pass1_gradient_never_enters_d(tmp_path, precision):
    trainer = NaNLossTrainer(make_model(), make_args(tmp_path, max_steps=8, **precision), train_dataset=make_dataset())
    trainer.clean_nan_steps = (3,)
    trainer.train()
    assert all(d is None or torch.isfinite(d).all() for d in trainer.vasso.d)
    assert all_finite(trainer.model)
    nonfinite = metric_rows(trainer, "vasso/nonfinite_fraction")
    assert nonfinite == [0.0] * 3 + [1.0] + [0.0] * 4
    adversary = metric_rows(trainer, "vasso/adversary_fraction")
    assert adversary == [1.0] * 3 + [0.0] + [1.0] * 4  # the weights did not move on step 3


@pytest.mark.parametrize("precision", [{}, {"bf16": True}])
def test_nonfinite_pass2_gradient_never_reaches_the_weights(tmp_path, precision):
    trainer = NaNLossTrainer(make_model(), make_args(tmp_path, max_steps=4, **precision), train_dataset=make_dataset())
    trainer.perturbed_nan = True
    trainer.train()
    assert all_finite(trainer.model)
    assert metric_rows(trainer, "vasso/perturbed_nonfinite_fraction") == [1.0] * 4
    losses = metric_rows(trainer, "loss")
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)  # the clean loss, never a masked 0.0
