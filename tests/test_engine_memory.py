"""What the engine keeps and allocates, measured by the CPU allocator: d in fp32 and the saved weights in their own
dtype (2.0x the trainable bytes for fp32 weights, 3.0x for bf16), and during a step at most one tensor's worth of
fp32 more, for every registered adversary geometry."""

from __future__ import annotations

import pytest
import torch
from helpers import allocated_per_phase, tiny_llama

from hf_vasso import VassoUpdate
from hf_vasso.adversary import GEOMETRIES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATE_TARGET = {"fp32": 2.0, "bf16": 3.0}


def _model(dtype: torch.dtype):
    return tiny_llama(hidden_size=64, layers=2, vocab_size=128).to(dtype)


def _trainable_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _step(update: VassoUpdate, params, g, h) -> None:
    for p, gi in zip(params, g):
        p.grad = gi
    update.absorb_gradient()
    update.perturb()
    for p, hi in zip(params, h):
        p.grad = hi
    update.restore()
    update.guard_perturbed_gradient()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_state_bytes_within_target(dtype):
    """What the engine holds after a step, as the allocator counts it, is d (4 bytes an element) plus the saved
    weights in their own dtype: `state_bytes()`, at most 2.0x the trainable bytes for fp32 weights, 3.0x for bf16."""
    params = list(_model(DTYPES[dtype]).parameters())
    trainable = _trainable_bytes(params)
    numel = sum(p.numel() for p in params)
    g = [torch.randn_like(p) for p in params]
    h = [torch.randn_like(p) for p in params]
    built = {}

    def build_and_step():
        built["update"] = VassoUpdate(params, rho=0.05, theta=0.4)
        _step(built["update"], params, g, h)  # the first perturbation allocates the saved weights

    held = allocated_per_phase({"build and step": build_and_step})["build and step"][0]
    update = built["update"]
    assert update.state_bytes() == 4 * numel + trainable
    slack = 64 * len(params) + 4096  # the 0-d scalars and per-step flags the engine keeps, a few bytes a tensor
    assert update.state_bytes() <= held <= update.state_bytes() + slack, (held, update.state_bytes())
    assert held / trainable <= STATE_TARGET[dtype] + slack / trainable


def test_state_bytes_mixed_dtypes():
    """bf16 weights with fp32 norms: each saved in its own dtype (aligned), d fp32 for all."""
    model = _model(torch.bfloat16)
    for name, module in model.named_modules():
        if "norm" in name:
            module.float()
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32, torch.bfloat16}
    update = VassoUpdate(params, rho=0.05, theta=0.4)
    trainable = _trainable_bytes(params)
    assert update.state_bytes() / trainable <= STATE_TARGET["bf16"]
    before = [p.detach().clone() for p in params]
    _step(update, params, [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params])
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored bit for bit, both dtypes


@pytest.mark.parametrize("adversary", sorted(GEOMETRIES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_peak_extra_within_state_plus_largest_tensor(dtype, adversary):
    """During a step the engine allocates at most the largest tensor in fp32 beyond its state, measured by the CPU
    allocator, whatever the geometry's own temporaries (ASAM's |w|·d and |w|²d) and the weights' dtype: for every
    registered geometry (one that allocates more fails here)."""
    params = list(_model(DTYPES[dtype]).parameters())
    g = [torch.randn_like(p) for p in params]
    h = [torch.randn_like(p) for p in params]
    built = {}

    def build():
        built["update"] = VassoUpdate(params, rho=0.05, theta=0.4, adversary=adversary)

    memory = allocated_per_phase(
        {
            "build": build,
            "step 1": lambda: _step(built["update"], params, g, h),
            "step 2": lambda: _step(built["update"], params, g, h),
        }
    )
    held, peak = memory["step 1"][0], memory["step 2"][1]
    state = built["update"].state_bytes()
    assert held >= state  # the sentinel: the allocator saw the state being allocated
    largest = 4 * max(p.numel() for p in params)
    slack = 8 * len(params) + 256  # 0-d scalars: the per-tensor norms and the metric window's, far below one tensor
    assert peak - state <= largest + slack, (peak - state) / largest


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pass_two_guard_zeroes_a_nonfinite_gradient_everywhere(dtype):
    """The pass-2 guard: a non-finite gradient becomes +0.0 everywhere (every tensor, odd sizes included), a finite
    one is left bit for bit."""
    torch.manual_seed(0)
    shapes = [(256, 129), (4099,), (64, 3)]  # one large enough for the word view, one odd-sized, one small
    params = [torch.nn.Parameter(torch.randn(s, dtype=DTYPES[dtype])) for s in shapes]
    update = VassoUpdate(params, rho=0.05, theta=0.4)
    for poison in (False, True):
        for p in params:
            p.grad = torch.randn_like(p)
        update.absorb_gradient()
        update.perturb()
        h = [torch.randn_like(p) for p in params]
        if poison:
            h[1][7] = float("inf")
        for p, hi in zip(params, h):
            p.grad = hi.clone()
        update.restore()
        update.guard_perturbed_gradient()
        for p, hi in zip(params, h):
            if poison:
                assert torch.equal(p.grad, torch.zeros_like(p)) and not torch.signbit(p.grad).any()
            else:
                assert torch.equal(p.grad, hi)
