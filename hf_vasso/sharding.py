"""Where the trainable elements live across ranks, and the cross-rank sums the engine's norms go through.

The engine works on each rank's local tensors (a DTensor's local shard, or the tensor itself). A norm over the
parameters is a sum of local squares, summed over ranks so that every element counts once whatever the layout
(`torch.distributed.tensor` layouts from `fully_shard`, `parallelize_module` and `init_device_mesh`: FSDP2, HSDP,
tensor parallelism, FSDP2 x TP, replication over a context-parallel dimension):

- a parameter sharded on a mesh dimension (`Shard`, `_StridedShard`) holds different elements on the ranks of that
  dimension: its local sums are summed over that dimension's process group;
- a parameter replicated on a mesh dimension (`Replicate`), or a plain tensor (every rank holds it whole, as under
  DDP or for a module left out of tensor parallelism), holds the same elements there: no sum over it.

Parameters are put in classes by the process groups their sums need; each class's sums go through its groups only
(one all-reduce per distinct group and reduction point, no host sync), then the classes are added. This is the
arithmetic of DTensor's own reductions (`get_total_norm(...).full_tensor()`, Accelerate's
`_clip_grad_norm_dtensor_aware`) on the engine's flat local buffers.

The engine assumes every rank holds every parameter (some as shards); pipeline parallelism, where ranks hold
different stages, is outside that assumption.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .rules import refuse_gradient_layout, refuse_unsupported_placement

_SHARDED = (Shard, _StridedShard)  # _StridedShard (FSDP2 over tensor parallelism) is not a Shard subclass


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class ShardReduction:
    """How the local sums over the given parameters become global sums, each element counted once.

    Args:
        params: every tensor the engine may work on (DTensors or plain tensors).
        name: a parameter's name for messages, by index.

    Raises:
        NotImplementedError: a parameter placement that is neither sharded nor replicated (e.g. `Partial`).
    """

    def __init__(self, params: list[torch.Tensor], name: Callable[[int], str] = lambda i: f"parameter #{i}") -> None:
        self.params = params
        self._name = name
        self.has_dtensor = any(isinstance(p, DTensor) for p in params)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}  # by ranks, in discovery order
        classes: dict[tuple[tuple[int, ...], ...], int] = {}
        self.class_of = [classes.setdefault(self._reduced_groups(i, p), len(classes)) for i, p in enumerate(params)]
        self._classes = list(classes)  # class id -> the rank sets its sums go over

    def _reduced_groups(self, i: int, p: torch.Tensor) -> tuple[tuple[int, ...], ...]:
        """The rank sets (one per sharded mesh dimension of more than one rank) that parameter `i`'s sums go over."""
        if not isinstance(p, DTensor):
            return ()
        keys = []
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Replicate):
                continue
            if not isinstance(placement, _SHARDED):
                refuse_unsupported_placement(self._name(i), placement, dim, p.device_mesh)
            group = p.device_mesh.get_group(dim)
            ranks = tuple(dist.get_process_group_ranks(group))
            if len(ranks) > 1:
                self._groups.setdefault(ranks, group)
                keys.append(ranks)
        return tuple(keys)

    @property
    def needed(self) -> bool:
        """Whether some parameter's local sums differ between ranks (some parameter is sharded)."""
        return bool(self._groups)

    def split(self, indices: list[int]) -> dict[int, list[int]]:
        """`indices` by reduction class (ordered as given within each class)."""
        by_class: dict[int, list[int]] = {}
        for i in indices:
            by_class.setdefault(self.class_of[i], []).append(i)
        return by_class

    def sum_over_ranks(self, partials: dict[int, torch.Tensor]) -> torch.Tensor:
        """The global sum of per-class local sums `{class id: tensor}` (same shapes, same keys on every rank)."""
        if not any(self._classes[c] for c in partials):  # nothing sharded: the local sums are the global ones
            values = list(partials.values())
            return values[0] if len(values) == 1 else torch.stack(values).sum(0)
        rows = {c: t.clone() for c, t in partials.items()}
        for ranks, group in self._groups.items():
            members = [c for c in rows if ranks in self._classes[c]]
            if members:
                stacked = torch.stack([rows[c] for c in members])
                dist.all_reduce(stacked, group=group)
                rows.update(zip(members, stacked.unbind(0)))
        values = list(rows.values())
        return values[0] if len(values) == 1 else torch.stack(values).sum(0)

    def sum_everywhere(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over every rank that holds a part of the parameters (for an any-rank test such as finiteness,
        where a replicated element counted more than once does not matter)."""
        for group in self._groups.values():
            dist.all_reduce(t, group=group)
        return t


def check_gradient_layout(param: torch.Tensor, grad: torch.Tensor, name: str) -> None:
    """Refuse a DTensor gradient laid out unlike its parameter (host-side attributes only).

    Raises:
        NotImplementedError: e.g. a `Partial` gradient (not yet reduced over ranks), whose local shard is not the
            parameter's shard of the gradient.
    """
    if isinstance(grad, DTensor) and (grad.placements != param.placements or grad.device_mesh != param.device_mesh):
        refuse_gradient_layout(name, param, grad)
