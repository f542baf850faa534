"""Worker for the FSDP2 test: the shared `VassoUpdate` code on raw `fully_shard` parameters (gloo, CPU) against the
same code on an unsharded copy of the model that sees the whole global batch.

The Trainer cannot drive FSDP on CPU (it falls back to DDP), so this drives the passes by hand, exactly as
`VassoTrainer.training_step` does: pass 1, `absorb_gradient`, `perturb`, pass 2, `restore`, base step. Shapes are
chosen so that shards are uneven and one rank holds empty shards (a [1, 3] weight and a [1] bias over 2 ranks).

Every rank checks, with the sharded tensors gathered by `full_tensor()`:
- d (and ||d||, from the all-reduced sum of local squares) equal the unsharded d and its norm;
- the perturbed weights x + eps equal the unsharded ones, and ||x + eps - x|| = rho (a per-shard norm would give
  sqrt(world) * rho or so: checked to differ);
- the pass-2 gradients match, the restored weights are bit-identical to the weights before the perturbation, and the
  SGD steps keep both models equal;
- the per-rank VASSO state (`state_dict`, one file per rank) reloads into a fresh `VassoUpdate` with the same d, norm
  and step;
- the `VASSO` wrapper's state saved and loaded by torch's distributed-checkpoint helpers continues bit for bit.
Rank 0 writes `<out>/fsdp2_ok.json` with what it measured; any mismatch raises (non-zero exit).

Usage: torchrun --nproc_per_node 2 fsdp2_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from _dist_launch import exit_without_teardown
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_vasso import VassoUpdate

RHO, THETA, LR, STEPS = 0.05, 0.4, 0.1, 3


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Gather a local shard laid out like `param` (e.g. d) into the whole tensor (a plain `param`: `local` itself)."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
    ).full_tensor()


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-6) -> float:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs by {err:.3g} (atol {atol})")
    return err


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrapper_through_dcp(reference: nn.Module, mesh, x: torch.Tensor, y: torch.Tensor) -> int:
    """The `VASSO` wrapper over an FSDP2 model saved and loaded by torch's distributed-checkpoint helpers (what FSDP2
    checkpoints use; `set_optimizer_state_dict` first calls `step()` on zero gradients at lr 0 to build the state):
    the loaded twin continues bit for bit. Returns the steps run after the load."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from hf_vasso import VASSO

    def step(model, optimizer):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

    model = shard(copy.deepcopy(reference), mesh)
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=RHO, theta=THETA)
    for _ in range(2):
        step(model, optimizer)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    twin = shard(copy.deepcopy(reference), mesh)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = VASSO(torch.optim.AdamW(twin.parameters(), lr=1e-2), rho=RHO, theta=THETA)
    set_optimizer_state_dict(twin, twin_optimizer, saved)
    assert twin_optimizer.vasso.step == 2, "the DCP load lost the VASSO step"
    for a, b in zip(optimizer.vasso.d, twin_optimizer.vasso.d):
        assert torch.equal(a, b), "the DCP load lost d"
    for _ in range(2):
        step(model, optimizer)
        step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), "the twin loaded through DCP diverged"
    return 2


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))
    sharded = shard(copy.deepcopy(reference), mesh)
    params_ref, params_sh = list(reference.parameters()), list(sharded.parameters())
    assert all(isinstance(p, DTensor) for p in params_sh)
    assert any(p.to_local().numel() == 0 for p in params_sh) == (rank == world - 1), "expected empty shards"

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8 * world, 5, generator=g), torch.randn(8 * world, 1, generator=g)
    x_local, y_local = x.chunk(world)[rank], y.chunk(world)[rank]

    vasso_ref = VassoUpdate(params_ref, rho=RHO, theta=THETA)
    vasso_sh = VassoUpdate(params_sh, rho=RHO, theta=THETA)
    assert not vasso_ref._reduction.needed and vasso_sh._reduction.needed
    opt_ref = torch.optim.SGD(params_ref, lr=LR)
    opt_sh = torch.optim.SGD(params_sh, lr=LR)
    loss_fn = nn.functional.mse_loss
    report: dict = {"world_size": world, "steps": []}

    for step in range(STEPS):
        # Pass 1. Each rank sees half of the batch; the reduce-scatter averages into the whole batch's gradient.
        loss_fn(reference(x), y).backward()
        loss_fn(sharded(x_local), y_local).backward()
        for p_ref, p_sh in zip(params_ref, params_sh):
            close(full(p_sh.grad), p_ref.grad, f"step {step}: pass-1 gradient")
        vasso_ref.absorb_gradient()
        vasso_sh.absorb_gradient()
        for d_ref, d_sh, p_sh in zip(vasso_ref.d, vasso_sh.d, params_sh):
            assert d_sh.shape == p_sh.to_local().shape, "d must live on the local shard"
            close(full_like_param(d_sh, p_sh), d_ref, f"step {step}: d")
        d_norm_ref, d_norm_sh = vasso_ref.d_sq.sqrt(), vasso_sh.d_sq.sqrt()
        close(d_norm_sh, d_norm_ref, f"step {step}: ||d||")
        local_norm = torch.stack([d.norm() for d in vasso_sh.d]).norm()
        if rank == 0:  # what a per-shard norm would give: must be far from the global one
            assert (local_norm - d_norm_ref).abs() > 1e-3 * d_norm_ref, "test model too small to tell the norms apart"

        # Perturb: x + eps, with eps = rho d / ||d|| and the global norm.
        before_ref = [p.detach().clone() for p in params_ref]
        before_sh = [p.to_local().detach().clone() for p in params_sh]
        vasso_ref.perturb()
        vasso_sh.perturb()
        eps_sq = 0.0
        for p_ref, p_sh, b_ref in zip(params_ref, params_sh, before_ref):
            perturbed = full(p_sh.detach())
            close(perturbed, p_ref.detach(), f"step {step}: perturbed weights x + eps")
            eps_sq += (perturbed.double() - b_ref.double()).square().sum().item()
        close(torch.tensor(eps_sq).sqrt(), torch.tensor(RHO), f"step {step}: ||eps|| vs rho", atol=1e-6)
        assert all(p.grad is None for p in params_sh), "perturb() must clear the gradients for pass 2"

        # Pass 2 at the perturbed weights, then restore by copy.
        loss_fn(reference(x), y).backward()
        loss_fn(sharded(x_local), y_local).backward()
        for p_ref, p_sh in zip(params_ref, params_sh):
            close(full(p_sh.grad), p_ref.grad, f"step {step}: pass-2 gradient")
        vasso_ref.restore()
        vasso_sh.restore()
        for p, b in zip(params_sh, before_sh):
            assert torch.equal(p.to_local(), b), f"rank {rank} step {step}: restored shard is not bit-identical"
        for p, b in zip(params_ref, before_ref):
            assert torch.equal(p.detach(), b), f"step {step}: restored reference weights are not bit-identical"

        opt_ref.step()
        opt_sh.step()
        opt_ref.zero_grad()
        opt_sh.zero_grad()
        for p_ref, p_sh in zip(params_ref, params_sh):
            close(full(p_sh.detach()), p_ref.detach(), f"step {step}: weights after the base step")
        report["steps"].append(
            {"d_norm": d_norm_ref.item(), "d_norm_sharded": d_norm_sh.item(), "eps_norm": eps_sq**0.5}
        )

    # Per-rank VASSO state: save this rank's shard of d, reload it into a fresh VassoUpdate.
    path = os.path.join(out_dir, f"vasso_state_rank{rank}.pt")
    torch.save(vasso_sh.state_dict(), path)
    reloaded = VassoUpdate(params_sh, rho=RHO, theta=THETA)
    reloaded.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert reloaded.step == vasso_sh.step == STEPS
    for a, b in zip(reloaded.d, vasso_sh.d):
        assert torch.equal(a, b), "reloaded d differs"
    close(reloaded.d_sq, vasso_sh.d_sq, "reloaded ||d||^2 (all-reduced)", atol=0.0)

    report["dcp_round_trip_steps"] = wrapper_through_dcp(reference, mesh, x_local, y_local)

    if rank == 0:
        with open(os.path.join(out_dir, "fsdp2_ok.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown()
