"""The step's shape on an accelerator, checked on a CPU: how many ops one VASSO step dispatches (each a kernel launch
on a GPU), whether that number depends on the size of the tensors, and which foreach calls are in the form CUDA's
multi-tensor fast path takes.

The accelerator branches run on the `meta` device, where tensors have shapes and no data: a step over 160M elements
costs nothing there, and the engine takes the branches of a device whose mixed-dtype kernels cast in the kernel. The
CPU branches run on real CPU tensors of two sizes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import OpCounter

from hf_vasso import VassoUpdate
from hf_vasso.adversary import GEOMETRIES


def layout(count: int, elements: int, dtype, device) -> list[torch.nn.Parameter]:
    """`count` tensors of `elements` elements each, in three shapes (matrices, vectors, a square)."""
    side = int(elements**0.5)
    shapes = [(elements // 64, 64), (elements,), (side, side)]
    return [torch.nn.Parameter(torch.zeros(shapes[i % 3], dtype=dtype, device=device)) for i in range(count)]


def counted_step(params, adversary: str) -> OpCounter:
    """One adversary step (absorb, perturb, restore, guard) of a fresh engine, counted after a first step."""
    update = VassoUpdate(params, rho=0.05, theta=0.4, adversary=adversary)
    counter = OpCounter()
    for _ in range(2):
        counter.ops, counter.foreach = {}, []  # the second step: the first also builds the saved-weights buffers
        for p in params:
            p.grad = torch.ones_like(p)
        with counter:
            update.absorb_gradient(perturbing=True)
            update.perturb()
        for p in params:  # pass 2 (not the engine's)
            p.grad = torch.ones_like(p)
        with counter:
            update.restore()
            update.guard_perturbed_gradient()
    return counter


# (device, elements per tensor at the two sizes): 40 tensors of 2M and 4M elements (80M and 160M) on meta; smaller
# real tensors on the CPU, above the size where the CPU path changes its form (`update._words`).
SIZES = {"meta": (2_000_000, 4_000_000), "cpu": (100_000, 200_000)}
COUNT = 40
# Ops per tensor each geometry may dispatch, besides a constant (about 100 ops on 0-d tensors: the norms' sums, the
# step's decisions, the metrics), on the accelerators' branch and on a CPU's for low-precision weights (fp32 copies,
# ASAM's in halves). On an accelerator the VASSO geometry's only per-tensor ops are the two non-finite guards.
PER_TENSOR = {("vasso", "accelerator"): 3, ("asam", "accelerator"): 8, ("vasso", "cpu"): 8, ("asam", "cpu"): 22}
CONSTANT = 120


@pytest.mark.parametrize("adversary", sorted(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", list(SIZES))
def test_a_step_dispatches_the_same_ops_whatever_the_tensor_size(device, dtype, adversary):
    """40 tensors of two sizes (80M and 160M elements on the accelerators' branches): the same ops, at most a few per
    tensor plus a constant (the last release dispatched 1,278 and 2,190: per-tile and per-piece loops)."""
    small = counted_step(layout(COUNT, SIZES[device][0], dtype, device), adversary)
    large = counted_step(layout(COUNT, SIZES[device][1], dtype, device), adversary)
    assert small.ops == large.ops, (small.ops, large.ops)
    branch = "cpu" if device == "cpu" and dtype != torch.float32 else "accelerator"
    assert (adversary, branch) in PER_TENSOR, f"state how many ops per tensor the geometry {adversary!r} dispatches"
    assert small.total <= PER_TENSOR[adversary, branch] * COUNT + CONSTANT, small.ops


def test_foreach_calls_take_cudas_fast_path_except_the_two_scaled_by_a_device_value():
    """Every foreach call of a step (norms, copies, scaling by a device scalar) meets the fast path's conditions on
    the accelerators' branch, except the EMA's `lerp_` and the move's `addcmul_`, whose factor is a 0-d device tensor
    (the step's θ-or-1-or-0 and ρ/‖d‖): no foreach form takes a device scalar for them, and their fast-path
    equivalents would stream two more passes of the model each (docs/design.md)."""
    counter = counted_step(layout(COUNT, 1000, torch.float32, "meta"), "vasso")
    slow = {name for name, fast in counter.foreach if not fast}
    assert slow == {"_foreach_lerp_", "_foreach_addcmul_"}, counter.foreach
    assert {name for name, fast in counter.foreach if fast} >= {"_foreach_norm", "_foreach_copy_"}
