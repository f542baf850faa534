"""`vasso/adversary_fraction` means what docs/metrics.md says: the adversary applied, not a measured displacement."""

import pytest
import torch
from helpers import make_data, make_model, weights

from hf_vasso import VASSO


@pytest.mark.parametrize(
    ("rho", "fraction", "weights_move"),
    [(0.05, 1.0, True), (0.0, 0.0, False), (1e-30, 1.0, False)],  # 1e-30: below fp32's resolution of these weights
)
def test_adversary_fraction_counts_the_adversary_applied(rho, fraction, weights_move):
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=rho, theta=0.4)
    moved = []
    for _ in range(3):
        model(x, labels=y)["loss"].backward()
        before = weights(model)
        optimizer.first_step(zero_grad=True)
        moved.append(any(not torch.equal(before[k], v) for k, v in weights(model).items()))
        model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    assert moved == [weights_move] * 3
    assert optimizer.pop_metrics()["vasso/adversary_fraction"] == fraction
