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


@pytest.mark.parametrize("plan", ["cpu", "accelerator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_grad_norm_and_d_norm_have_the_precision_docs_metrics_states(dtype, plan, monkeypatch):
    """`vasso/grad_norm` is ||g|| within one rounding of the norm's result dtype (fp32; bf16 for bf16 gradients on a
    CPU), and `vasso/d_norm` (d is fp32) within fp32's, both against float64 on the same gradients (1e-5: an fp32 sum
    of 71,003 squares). On both plans: a CPU's, and an accelerator's, forced here on a CPU (its norms of bf16
    gradients are fp32 results)."""
    from hf_vasso import ops

    if plan == "accelerator":
        monkeypatch.setattr(ops, "CPU_PLAN_DEVICES", set())
    rel = 2.0**-8 if dtype == torch.bfloat16 and plan == "cpu" else 1e-5
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (70_000, 3, 1_000)]
    update = VASSO(torch.optim.SGD(params, lr=0.0), rho=0.05, theta=0.4)
    grads = [torch.randn(p.shape).mul_(3.0).to(dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    update.first_step(zero_grad=True)
    metrics = update.pop_metrics()
    exact = torch.cat([g.double().reshape(-1) for g in grads]).norm().item()
    assert metrics["vasso/grad_norm"] == pytest.approx(exact, rel=rel)
    assert metrics["vasso/d_norm"] == pytest.approx(exact, rel=1e-5)  # d = g on the first step, held in fp32
