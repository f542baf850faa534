"""What the engine keeps and allocates: d in fp32 and the saved weights in their own dtype (2.0x the trainable bytes
for fp32 weights, 3.0x for bf16), and during a step at most one tensor's worth of fp32 more (issue 17)."""

from __future__ import annotations

import pytest
import torch
from helpers import allocated_per_phase, tiny_llama

from hf_vasso import VassoUpdate

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
    """state_bytes() is d (4 bytes an element) plus the saved weights in their own dtype, and is what is allocated."""
    params = list(_model(DTYPES[dtype]).parameters())
    update = VassoUpdate(params, rho=0.05, theta=0.4)
    trainable = _trainable_bytes(params)
    numel = sum(p.numel() for p in params)
    assert update.state_bytes() == 4 * numel + trainable
    assert update.state_bytes() / trainable <= STATE_TARGET[dtype]
    g = [torch.randn_like(p) for p in params]
    h = [torch.randn_like(p) for p in params]
    _step(update, params, g, h)  # allocates the saved weights
    assert update.state_bytes() == 4 * numel + trainable


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


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "asam"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_peak_extra_within_state_plus_largest_tensor(dtype, adaptive):
    """During a step the engine allocates at most the largest tensor in fp32 beyond its state, measured by the CPU
    allocator, whatever the geometry's own temporaries (ASAM's |w|·d and |w|²d) and the weights' dtype."""
    params = list(_model(DTYPES[dtype]).parameters())
    g = [torch.randn_like(p) for p in params]
    h = [torch.randn_like(p) for p in params]
    built = {}

    def build():
        built["update"] = VassoUpdate(params, rho=0.05, theta=0.4, adaptive=adaptive)

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
def test_pass_two_guard_zeroes_large_gradients_through_word_views(dtype):
    """The pass-2 guard's masked_fill_ runs over 16-byte words for large tensors: a non-finite gradient becomes +0.0
    everywhere (every tensor, odd sizes included), a finite one is left bit for bit."""
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


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("theta", [0.4, 1.0])
def test_tiles_of_any_size_give_the_same_d(monkeypatch, dtype, theta):
    """The absorb step's tiles (at most `flat_layout.TILE_ELEMENTS`, split inside tensors) change no bit of d, and the
    perturbed weights only through the summation order of ‖d‖ (the fp32 sum of per-tile norms): tiles of 7 and 300
    elements against one tile per cohort, over 3 steps with a non-finite gradient in the middle."""
    import hf_vasso.flat_layout as flat_layout

    def run(tile_elements: int):
        monkeypatch.setattr(flat_layout, "TILE_ELEMENTS", tile_elements)
        params = [p.detach().clone().requires_grad_() for p in _model(DTYPES[dtype]).parameters()]
        update = VassoUpdate(params, rho=0.05, theta=theta)
        torch.manual_seed(3)
        d, moved = [], []
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            if step == 1:
                params[2].grad.view(-1)[5] = float("inf")
            update.absorb_gradient()
            before = [p.detach().clone() for p in params]
            update.perturb()
            moved.append([(p.detach().double() - b.double(), b.double().abs()) for p, b in zip(params, before)])
            d.append([t.clone() for t in update.d])
            update.restore()
            assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        return d, moved, update.pop_metrics()

    d, moved, metrics = run(1 << 30)
    assert metrics["vasso/nonfinite_fraction"] > 0 and metrics["vasso/adversary_fraction"] > 0
    tolerance = torch.finfo(DTYPES[dtype]).eps  # the scale rounded otherwise can flip one rounding of w + ε
    for size in (7, 300):
        tiled_d, tiled_moved, tiled_metrics = run(size)
        assert all(torch.equal(a, b) for x, y in zip(d, tiled_d) for a, b in zip(x, y))
        for x, y in zip(moved, tiled_moved):  # ε within the norm's summation error, then one rounding of w + ε
            assert all(
                ((a - b).abs() <= tolerance * (w + a.abs()) + 1e-5 * a.abs()).all() for (a, w), (b, _) in zip(x, y)
            )
        assert tiled_metrics.keys() == metrics.keys()
        assert all(abs(tiled_metrics[k] - metrics[k]) <= 1e-5 * (1 + abs(metrics[k])) for k in metrics)
