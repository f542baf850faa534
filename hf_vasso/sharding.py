"""Where the trainable elements live across ranks, and the one cross-rank sum the engine's norms go through.

The engine works on each rank's local tensors (a DTensor's local shard, or the tensor itself). A norm over the
parameters is a sum of local squares followed by `ShardReduction.sum_over_ranks`, which must count every element of
every parameter once, whatever the layout.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class ShardReduction:
    """How the local sums of the given parameters become global ones.

    Args:
        params: every tensor the engine may work on (DTensors or plain tensors).

    Raises:
        NotImplementedError: a layout the sum cannot count once per element.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.has_dtensor = any(isinstance(p, DTensor) for p in params)
        self.group = _shard_group([p for p in params if isinstance(p, DTensor)])

    @property
    def needed(self) -> bool:
        """Whether the local sums differ between ranks (some parameter is sharded)."""
        return self.group is not None

    def cohort_sq_norms(self, flat: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """||flat[start:end]||² for each range (a cohort of a buffer laid out like d), summed over ranks."""
        return self.sum_over_ranks(torch.stack([torch.linalg.vector_norm(flat[a:b]) for a, b in ranges]).square())

    def cohort_dots(self, a: torch.Tensor, b: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """<a[start:end], b[start:end]> for each range, summed over ranks."""
        return self.sum_over_ranks(torch.stack([torch.dot(a[s:e], b[s:e]) for s, e in ranges]))

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """Sums of local values over the ranks that hold different elements (in place; a no-op when unsharded)."""
        if self.group is not None:
            torch.distributed.all_reduce(partial, group=self.group)
        return partial


def _shard_group(params: list[torch.Tensor]) -> torch.distributed.ProcessGroup | None:
    """The process group over which the parameters are sharded (FSDP2), or None when every rank holds them whole."""
    meshes = {(p.device_mesh, tuple(p.placements)) for p in params if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise NotImplementedError("hf_vasso needs every trainable parameter sharded on the same device mesh.")
    mesh, placements = meshes.pop()
    shard_dims = [i for i, placement in enumerate(placements) if isinstance(placement, Shard)]
    if not shard_dims:
        return None
    if len(shard_dims) > 1:
        raise NotImplementedError("hf_vasso supports parameters sharded along one mesh dimension (FSDP2 or HSDP).")
    return mesh.get_group(shard_dims[0])
