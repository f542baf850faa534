"""Worker for the N-D layout test: the shared `VassoUpdate` on the DTensor layouts of torch's N-D parallelism (4
gloo ranks on CPU) against the same code on one process that sees the whole batch.

Cases (one launch runs them all):
- `tp`: `ColwiseParallel` + `RowwiseParallel` on a mesh of 4 (placements Shard(0), Shard(1), Replicate, and a last
  layer left a plain tensor on every rank); every rank sees the whole batch.
- `fsdp2_tp`: the same on the "tp" dimension of a 2 x 2 ("dp", "tp") mesh, then `fully_shard` on "dp"
  (placements such as (_StridedShard(0), Shard(0)), (Shard(0), Replicate), and a 1-D "dp" mesh for the last layer).
- `hsdp`: `fully_shard` on a 2 x 2 (replicate, shard) mesh.
Each with VASSO's plain geometry and with ASAM (`adaptive`), per-group rho (the first layer 0.05, the rest 0.2), and
the plain one also with theta = 1 (the cosine metric through <g, d>). For every case and step, with the sharded
tensors gathered by `full_tensor()`: the pass-1 gradient, d, ||d||, the perturbed weights x + eps, the pass-2
gradient and the weights after the SGD step equal the single process's (atol 1e-6, as the FSDP2 test); the restore
is bit for bit; the logged metrics (gradient norm, ||d||, cosine) match. Then a per-rank checkpoint of the VASSO
state resumes bit for bit (and a run that starts d afresh differs).

- `placements`: parameters distributed by hand on a 2 x 2 ("cp", "tp") mesh in every placement pair (replicated
  over the context-parallel dimension, sharded on one or both, `_StridedShard`, a 1-D submesh, a plain tensor),
  gradients set to the same full gradients: eps equals the single process's.
- refusals: a `Partial` gradient and a `Partial` parameter are refused with a message that names them.

Rank 0 writes `<out>/layouts.json`; any mismatch raises (non-zero exit).

Usage: torchrun --nproc_per_node 4 layouts_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from _dist_launch import exit_without_teardown
from fsdp2_worker import close, full, full_like_param
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from hf_vasso import VassoUpdate

LR, STEPS, RESUME_STEPS = 0.1, 3, 2
CASES = [  # (name, theta, adaptive, group rho of the first layer / the rest)
    ("plain", 0.4, False, (0.05, 0.2)),
    ("adaptive", 0.4, True, (0.05, 0.2)),
    ("plain-sam", 1.0, False, (0.1, 0.1)),
]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def build_layout(name: str, rank: int):
    """(sharded model, this rank's rows of the global batch as a slice)."""
    model = make_model()
    if name == "tp":
        return tensor_parallel(model, init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))), slice(0, 32)
    if name == "fsdp2_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = tensor_parallel(model, mesh["tp"])
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp = mesh.get_local_rank("dp")
        return model, slice(16 * dp, 16 * dp + 16)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, slice(8 * rank, 8 * rank + 8)


def groups(model: nn.Module, rhos: tuple[float, float], adaptive: bool) -> list[dict]:
    first = list(model[0].parameters())
    rest = [p for i in (2, 4) for p in model[i].parameters()]
    return [{"params": first, "rho": rhos[0], "adaptive": adaptive}, {"params": rest, "rho": rhos[1]}]


def local_copy(params) -> list[torch.Tensor]:
    return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in params]


def lockstep(ref, run, x, y, rows, what: str) -> None:
    """One VASSO step of the sharded `run` (model, update, optimizer), as `VassoTrainer.training_step` drives it,
    beside the single-process `ref` (or None) whose every stage it must equal (gathered)."""
    runs = [r for r in (ref, run) if r is not None]
    model, update, _ = run
    params = list(model.parameters())

    def same(get_ref, get, stage, atol=1e-6):
        if ref is not None:
            for a, b in zip(ref[0].parameters(), params):
                close(get(b), get_ref(a), f"{what}: {stage}", atol)

    def passes():
        for m, _, _ in runs:
            batch = slice(None) if m is not model else rows
            nn.functional.mse_loss(m(x[batch]), y[batch]).backward()

    passes()
    same(lambda p: p.grad, lambda p: full(p.grad), "pass-1 gradient")
    for _, u, _ in runs:
        u.absorb_gradient()
    if ref is not None:
        for d_ref, d, p in zip(ref[1].d, update.d, params):
            close(full_like_param(d, p), d_ref, f"{what}: d")
        close(update.d_sq, ref[1].d_sq, f"{what}: ||d||²", atol=1e-5)
    before = local_copy(params)
    for _, u, _ in runs:
        u.perturb()
    same(lambda p: p.detach(), lambda p: full(p.detach()), "x + eps")
    passes()
    same(lambda p: p.grad, lambda p: full(p.grad), "pass-2 gradient")
    for _, u, _ in runs:
        u.restore()
        u.guard_perturbed_gradient()
    for a, b in zip(local_copy(params), before):
        assert torch.equal(a, b), f"rank {dist.get_rank()} {what}: the restore is not bit for bit"
    for _, _, o in runs:
        o.step()
        o.zero_grad()
    same(lambda p: p.detach(), lambda p: full(p.detach()), "weights after the base step")


def run_case(layout: str, case: tuple, out_dir: str) -> dict:
    name, theta, adaptive, rhos = case
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
    reference = make_model()
    sharded, rows = build_layout(layout, dist.get_rank())
    kwargs = dict(rho=0.1, theta=theta, adaptive=adaptive)

    def engine(model):
        update = VassoUpdate(groups(model, rhos, adaptive), **kwargs)
        return update, torch.optim.SGD(model.parameters(), lr=LR, foreach=False)

    pair = [(reference, *engine(reference)), (sharded, *engine(sharded))]
    assert pair[1][1]._reduction.needed, "the layout must need cross-rank sums"
    metrics = []
    for step in range(STEPS):
        lockstep(pair[0], pair[1], x, y, rows, f"{layout}/{name} step {step}")
        ref_m, m = pair[0][1].pop_metrics(), pair[1][1].pop_metrics()
        assert ref_m.keys() == m.keys() and "vasso/grad_norm" in m, (ref_m.keys(), m.keys())
        for key in m:
            tol = 1e-5 * max(1.0, abs(ref_m[key]))
            assert abs(m[key] - ref_m[key]) <= tol, (layout, name, key, m[key], ref_m[key])
        metrics.append(m)
    resumed = resume_bit_exact(pair[1], engine, x, y, rows, out_dir, f"{layout}-{name}", memory=theta < 1)
    return {"metrics": metrics, **resumed}


def resume_bit_exact(run, engine, x, y, rows, out_dir: str, tag: str, memory: bool) -> dict:
    """Save this rank's VASSO state, continue; then put the weights back, load the state into a fresh engine and
    continue again: bit for bit the same local weights. With `memory` (theta < 1: d is more than this step's
    gradient) a fresh engine without the state lands elsewhere."""
    model, update, opt = run
    path = os.path.join(out_dir, f"{tag}-rank{dist.get_rank()}.pt")
    torch.save(update.state_dict(), path)
    start = local_copy(model.parameters())

    def continue_from(update, opt):
        with torch.no_grad():
            for p, w in zip(model.parameters(), start):
                (p.to_local() if isinstance(p, DTensor) else p).copy_(w)
        for _ in range(RESUME_STEPS):
            lockstep(None, (model, update, opt), x, y, rows, tag)
        return local_copy(model.parameters())

    uninterrupted = continue_from(update, opt)
    loaded, loaded_opt = engine(model)
    loaded.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), expected_step=STEPS)
    resumed = continue_from(loaded, loaded_opt)
    fresh = continue_from(*engine(model))
    exact = all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
    differs = dist_any(any(not torch.equal(a, b) for a, b in zip(uninterrupted, fresh)))
    assert exact, f"rank {dist.get_rank()} {tag}: the resumed run is not bit for bit the uninterrupted one"
    assert differs == memory, f"{tag}: a run without the saved d lands on the same weights: {differs}"
    return {"resume_exact": exact, "fresh_differs": differs}


def dist_any(flag: bool) -> bool:
    t = torch.tensor(float(flag))
    dist.all_reduce(t)
    return bool(t.item() > 0)


PLACEMENTS = [  # (placements on the ("cp", "tp") mesh, or "tp" for the 1-D submesh, or None for a plain tensor)
    ((Replicate(), Shard(0)), (8, 6)),  # replicated over the context-parallel dimension, sharded by TP
    ((Replicate(), Shard(0)), (5, 3)),  # ... unevenly
    ((Shard(0), Replicate()), (8, 6)),
    ((Replicate(), Replicate()), (4, 3)),
    ((Shard(0), Shard(1)), (8, 6)),
    ((_StridedShard(0, split_factor=2), Shard(0)), (8, 6)),
    ("tp", (4, 8)),  # a 1-D "tp" submesh: replicated over "cp" without saying so
    (None, (3, 3)),
]


def distribute(t: torch.Tensor, mesh, spec) -> torch.Tensor:
    if spec is None:
        return t.clone()
    if spec == "tp":
        return distribute_tensor(t, mesh["tp"], (Shard(1),))
    return distribute_tensor(t, mesh, spec)


def placements_case() -> dict:
    """Every placement pair in one engine (two groups: plain rho 0.05, adaptive rho 0.2): eps equals one process's."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    torch.manual_seed(3)
    fulls = [torch.randn(shape) for _, shape in PLACEMENTS]
    ref = [nn.Parameter(t.clone()) for t in fulls]
    dist_params = [nn.Parameter(distribute(t, mesh, spec)) for t, (spec, _) in zip(fulls, PLACEMENTS)]

    def engine(params):
        half = len(params) // 2
        groups = [{"params": params[:half], "rho": 0.05}, {"params": params[half:], "rho": 0.2, "adaptive": True}]
        return VassoUpdate(groups, rho=0.1, theta=0.4)

    ref_update, update = engine(ref), engine(dist_params)
    for step in range(2):
        grads = [torch.randn(t.shape) for t in fulls]
        for p, q, g, (spec, _) in zip(ref, dist_params, grads, PLACEMENTS):
            p.grad, q.grad = g.clone(), distribute(g, mesh, spec)
        ref_update.absorb_gradient()
        update.absorb_gradient()
        ref_update.perturb()
        update.perturb()
        for p, q, (spec, _) in zip(ref, dist_params, PLACEMENTS):
            close(full(q.detach()), p.detach(), f"placements {spec} step {step}: x + eps")
        ref_update.restore()
        update.restore()
    ref_m, m = ref_update.pop_metrics(), update.pop_metrics()
    for key in ("vasso/grad_norm", "vasso/d_norm"):
        assert abs(m[key] - ref_m[key]) <= 1e-5 * ref_m[key], (key, m[key], ref_m[key])
    return {"placements": [str(spec) for spec, _ in PLACEMENTS], "d_norm": m["vasso/d_norm"]}


def refusals() -> dict:
    """A Partial gradient and a Partial parameter are refused, naming the placement."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    messages = {}
    p = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, (Replicate(), Shard(0))))
    update = VassoUpdate([p], rho=0.1, theta=0.4, param_names=["layer.weight"])
    p.grad = DTensor.from_local(torch.ones(2, 2), mesh, (Partial(), Shard(0)), run_check=False)
    try:
        update.absorb_gradient()
    except NotImplementedError as error:
        messages["partial_gradient"] = str(error)
    q = nn.Parameter(DTensor.from_local(torch.ones(2, 2), mesh, (Partial(), Replicate()), run_check=False))
    try:
        VassoUpdate([q], rho=0.1, theta=0.4, param_names=["layer.bias"])
    except NotImplementedError as error:
        messages["partial_parameter"] = str(error)
    return messages


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 4, "the layouts need 4 ranks"
    report = {"cases": {}}
    for layout in ("tp", "fsdp2_tp", "hsdp"):
        for case in CASES:
            report["cases"][f"{layout}/{case[0]}"] = run_case(layout, case, out_dir)
    report["placements"] = placements_case()
    report["refusals"] = refusals()
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "layouts.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown()
