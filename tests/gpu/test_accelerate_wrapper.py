"""The README's Accelerate loop on a CUDA GPU: the `VASSO` wrapper is built over the model's parameters on the CPU,
before `accelerator.prepare` moves the model to the GPU (the same Parameter objects, their data moved). The engine
follows them there and the run ends where the same loop ends on the CPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import make_data, make_model

from hf_vasso import VASSO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def readme_loop(cpu: bool) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=cpu)
    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.4, model=model)
    model, prepared = accelerator.prepare(model, optimizer)
    x, y = (t.to(accelerator.device) for t in make_data())
    for _ in range(4):
        accelerator.backward(model(x, labels=y)["loss"])
        if optimizer.first_step(zero_grad=True, grad_scaler=accelerator.scaler):
            accelerator.backward(model(x, labels=y)["loss"])
        optimizer.restore()
        prepared.step()
        prepared.zero_grad()
    assert optimizer.vasso.step == 4 and all(d.device.type == accelerator.device.type for d in optimizer.vasso.d)
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


def test_the_wrapper_built_before_prepare_moved_the_model_to_the_gpu_follows_it():
    on_gpu, on_cpu = readme_loop(cpu=False), readme_loop(cpu=True)
    for name, value in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], value, rtol=1e-4, atol=1e-5, msg=name)
