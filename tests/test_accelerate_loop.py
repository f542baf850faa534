"""The README's Accelerate loop: VASSO after `accelerator.prepare` gives the plain loop's trajectory."""

import torch
from accelerate import Accelerator
from helpers import make_data, make_model, max_abs_diff, vasso_step, weights
from torch.utils.data import DataLoader, TensorDataset

from hf_vasso import VASSO


def plain_loop(steps=6):
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.4)
    for _ in range(steps):
        vasso_step(optimizer, lambda: model(x, labels=y)["loss"])
    return model, optimizer


def test_accelerate_loop_matches_plain_loop():
    x, y = make_data()
    accelerator = Accelerator(cpu=True)
    model = make_model()
    vasso = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(vasso, lambda step: 1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model, optimizer, loader, scheduler = accelerator.prepare(model, vasso, loader, scheduler)
    for _ in range(6):
        for xb, yb in loader:
            accelerator.backward(model(xb, labels=yb)["loss"])  # pass 1
            if vasso.first_step(zero_grad=True, grad_scaler=accelerator.scaler):
                accelerator.backward(model(xb, labels=yb)["loss"])  # pass 2, at the perturbed weights
            vasso.restore()
            optimizer.step()  # Accelerate's step: the base step
            scheduler.step()
            optimizer.zero_grad()
    reference, reference_optimizer = plain_loop()
    assert max_abs_diff(weights(accelerator.unwrap_model(model)), weights(reference)) < 1e-6
    assert vasso.vasso.step == reference_optimizer.vasso.step == 6
    # Accelerate saves the optimizer's state_dict: d travels with it.
    state = optimizer.state_dict()
    assert state["param_groups"][0]["vasso"]["step"] == 6 and "vasso_d" in state["state"][0]
