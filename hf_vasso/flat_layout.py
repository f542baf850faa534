"""The engine's memory: d (flat fp32) and the saved weights (flat, in the weights' own dtypes) over the parameters
that require gradients now.

The buffers are laid out cohort by cohort: a cohort is the parameters that became trainable together, so that a
parameter unfrozen mid-run starts like a first step while the others keep their EMA, with no per-tensor work. The
layout follows the `requires_grad` flags, checked on the host each step (an unchanged set costs one pass over the
flags) and repacked when they change: a frozen parameter's d is dropped, a new one starts at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .rules import refuse_no_trainable_parameter, refuse_several_devices, refuse_sparse_gradient
from .sharding import ShardReduction, check_gradient_layout, local

# The absorb step's tiles hold at most this many elements (4 MiB of fp32 scratch): its five ops on a tile (copy in,
# clean, the EMA's two, the norm) then run on data still in the cache, about twice as fast on a CPU as over the
# whole model at once.
TILE_ELEMENTS = 1 << 20

# (parameter indices, initialized flag, ||d||² of the cohort): what a cohort carries across a repack.
Cohort = tuple[list[int], torch.Tensor, torch.Tensor]


@dataclass
class Segment:
    """A contiguous run of the flat d buffer whose parameters became trainable together (a cohort).

    `initialized` (device bool) is False until the cohort's first finite gradient, which d then copies (the
    official code clones the first gradient).
    """

    indices: list[int]
    start: int
    end: int
    initialized: torch.Tensor
    d_sq: torch.Tensor  # ||d||² of this cohort after the last step, summed over ranks (for the cosine metric)


@dataclass
class Tile:
    """A run of the flat d buffer, inside one cohort, that the absorb step works on through the scratch space.

    `pieces[k] = (i, a, b)`: elements a..b of parameter i's flattened local tensor, at `scratch[k]` (fp32 views laid
    end to end from the start of the scratch space, shaped like the tensor when the piece is all of it) and at
    `d[start:end]` in the same order.
    """

    segment: int
    start: int
    end: int
    pieces: list[tuple[int, int, int]]
    scratch: list[torch.Tensor] = field(default_factory=list)


class FlatLayout:
    """d (`self.d[i]`: views into one flat fp32 buffer, None for parameters without d) and the saved weights.

    Memory: d is fp32, 4 bytes per trainable element, whatever the weights' dtype: an EMA held in bf16 would stall,
    since (1 - theta) * d rounds back to d once theta * g is below half a bf16 ulp of d (2^-9 relative), and the
    official code's bf16 EMA does exactly that. The saved weights (`saved_views()`, one byte buffer, each parameter
    in its own dtype) are all a bit-exact restore needs. Together: 2.0x the trainable bytes for fp32 weights, 3.0x
    for bf16. Between `restore` and the next `perturb` the saved buffer is free: the absorb step uses its bytes as
    fp32 scratch space (`scratch()`), through which the gradient is copied and cleaned before it enters d, without
    touching `p.grad` and without a model-sized temporary (`absorb_tiles()` cuts d into runs that fit it).

    Args:
        params: every tensor of the engine, in order.
        reduction: the cross-rank sum of the cohorts' squared norms.
        name: a parameter's name for messages, by index.
    """

    def __init__(self, params: list[torch.Tensor], reduction: ShardReduction, name: Callable[[int], str]) -> None:
        self.params = params
        self.reduction = reduction
        self._name = name
        self.device = local(params[0]).device
        self._flags: tuple[bool, ...] | None = None
        self.active: list[int] = []
        self.position: dict[int, int] = {}
        self.segments: list[Segment] = []
        self.d_flat = torch.zeros(0, device=self.device)
        self.d: list[torch.Tensor | None] = [None] * len(params)
        self._saved: torch.Tensor | None = None  # uint8; see saved_views()
        self._saved_views: list[torch.Tensor] = []
        self._tiles: list[Tile] | None = None
        self._local_cache: list[torch.Tensor] | None = None
        self.version = 0  # counts the builds, so that the engine can cache what depends on the active set

    def sync(self) -> bool:
        """Follow the requires_grad flags; returns whether the layout was rebuilt.

        Raises:
            ValueError: no parameter requires a gradient.
        """
        flags = tuple(p.requires_grad for p in self.params)
        if flags == self._flags:
            return False
        active = [i for i, f in enumerate(flags) if f]
        if not active:
            refuse_no_trainable_parameter()
        keep = set(active)
        old_d = list(self.d)
        cohorts = [([i for i in s.indices if i in keep], s.initialized, s.d_sq) for s in self.segments]
        cohorts = [c for c in cohorts if c[0]]
        known = {i for idx, _, _ in cohorts for i in idx}
        fresh = [i for i in active if i not in known]
        if fresh:
            zero = torch.zeros((), device=self.device)
            cohorts.append((fresh, torch.zeros((), dtype=torch.bool, device=self.device), zero))
        # The dropped parameters' d shrink the cohort norms: recompute them from d once, here.
        self.build(cohorts, {i: old_d[i] for i in known})
        self._flags = flags
        return True

    def build(self, cohorts: list[Cohort], d_values: dict[int, torch.Tensor]) -> None:
        """Lay out the flat d buffer cohort by cohort, copying the given d values (others start at zero).

        Raises:
            NotImplementedError: the parameters live on several devices.
        """
        order = [i for idx, _, _ in cohorts for i in idx]
        devices = {local(self.params[i]).device for i in order}
        if len(devices) > 1:
            refuse_several_devices(devices)
        sizes = [local(self.params[i]).numel() for i in order]
        self.d_flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        views = self.d_flat.split(sizes) if sizes else []
        self.d = [None] * len(self.params)
        for i, v in zip(order, views):
            self.d[i] = v.view(local(self.params[i]).shape)
        copies = [(self.d[i], d_values[i]) for i in order if d_values.get(i) is not None]
        if copies:
            torch._foreach_copy_([a for a, _ in copies], [b.to(self.device) for _, b in copies])
        self.segments, start = [], 0
        for idx, init, _ in cohorts:
            end = start + sum(local(self.params[i]).numel() for i in idx)
            self.segments.append(Segment(idx, start, end, init, self.d_flat.new_zeros(())))
            start = end
        self.version += 1
        self.active = order
        self.position = {i: k for k, i in enumerate(order)}
        self._flags = tuple(i in self.position for i in range(len(self.params)))
        self._local_cache = None
        self._saved = None
        self._saved_views = []
        self._tiles = None
        self.refresh_d_sq()

    def refresh_d_sq(self) -> torch.Tensor:
        """Recompute each cohort's ||d||² (summed over ranks); returns them stacked (one per segment)."""
        if not self.segments:
            return self.d_flat.new_zeros(0)
        d_sq = self.reduction.cohort_sq_norms(self.d_flat, self.active_d(), self)
        for i, s in enumerate(self.segments):
            s.d_sq = d_sq[i]
        return d_sq

    def _saved_layout(self) -> tuple[list[int], int]:
        """Byte offsets of the active parameters in the saved buffer (each aligned to its element size) and the
        buffer's size in bytes (at least one fp32 element of scratch space)."""
        offsets, end = [], 0
        for i in self.active:
            t = local(self.params[i])
            end = -(-end // t.element_size()) * t.element_size()
            offsets.append(end)
            end += t.numel() * t.element_size()
        return offsets, max(4, end)

    def saved_views(self) -> list[torch.Tensor]:
        """One view per active parameter, its local shape and dtype, into the saved buffer (allocated on first use)."""
        if self._saved is None:
            offsets, size = self._saved_layout()
            self._saved = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._saved_views = []
            for i, offset in zip(self.active, offsets):
                t = local(self.params[i])
                view = self._saved[offset : offset + t.numel() * t.element_size()].view(t.dtype)
                self._saved_views.append(view.view(t.shape))
        return self._saved_views

    def scratch(self) -> torch.Tensor:
        """The saved buffer's bytes as fp32: the absorb step's work space (never while the weights are saved)."""
        self.saved_views()
        return self._saved[: self._saved.numel() // 4 * 4].view(torch.float32)

    def absorb_tiles(self) -> list[Tile]:
        """The flat d buffer cut into runs of at most `TILE_ELEMENTS` that fit the scratch space, each inside one
        cohort (cached per layout)."""
        if self._tiles is not None:
            return self._tiles
        scratch = self.scratch()
        capacity = min(scratch.numel(), TILE_ELEMENTS)
        tiles: list[Tile] = []
        for k, s in enumerate(self.segments):
            position = s.start
            tile = Tile(k, position, position, [])
            for i in s.indices:
                n = local(self.params[i]).numel()
                a = 0
                while a < n:
                    if tile.end - tile.start == capacity:
                        tiles.append(tile)
                        tile = Tile(k, tile.end, tile.end, [])
                    b = min(n, a + capacity - (tile.end - tile.start))
                    view = scratch[tile.end - tile.start : tile.end - tile.start + b - a]
                    # A whole tensor's scratch takes its shape, so that its gradient copies in without a view op.
                    tile.scratch.append(view.view(local(self.params[i]).shape) if b - a == n else view)
                    tile.pieces.append((i, a, b))
                    tile.end += b - a
                    a = b
            if tile.pieces:
                tiles.append(tile)
        self._tiles = tiles
        return tiles

    def gradients(self) -> list[torch.Tensor | None]:
        """The local pass-1 gradient of each active parameter (None where it has none), in active order.

        Raises:
            ValueError: a trainable parameter has a sparse gradient.
            NotImplementedError: a DTensor gradient is laid out unlike its parameter (e.g. `Partial`).
        """
        grads: list[torch.Tensor | None] = []
        strided = torch.strided
        has_dtensor = self.reduction.has_dtensor
        for i in self.active:
            grad = self.params[i].grad
            if grad is not None and grad.layout is not strided:  # a host-side attribute: no sync
                refuse_sparse_gradient(self._name(i))
            if grad is not None and has_dtensor:
                check_gradient_layout(self.params[i], grad, self._name(i))
                grad = local(grad)
            grads.append(grad)
        return grads

    def copy_gradient_into(self, tile: Tile, grads: dict[int, torch.Tensor | None]) -> None:
        """The tile's scratch <- its part of the pass-1 gradient (fp32), zeros where a parameter has none."""
        sources, targets, missing = [], [], []
        for (i, a, b), view in zip(tile.pieces, tile.scratch):
            grad = grads[i]
            if grad is None:
                missing.append(view)
            else:
                # A part of a tensor: a view of the gradient unless it is not contiguous.
                sources.append(grad if view.shape == grad.shape else grad.reshape(-1)[a:b])
                targets.append(view)
        if sources:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)

    def active_weights(self) -> list[torch.Tensor]:
        """The weights of this step's active parameters (local shards; cached unless sharded: FSDP2 may swap them)."""
        if self._local_cache is None or self.reduction.has_dtensor:
            self._local_cache = [local(self.params[i]) for i in self.active]
        return self._local_cache

    def active_d(self) -> list[torch.Tensor]:
        return [self.d[i] for i in self.active]

    def set_d_sq(self, d_sq: torch.Tensor) -> None:
        """Record each cohort's ||d||² (summed over ranks), one per segment."""
        for i, s in enumerate(self.segments):
            s.d_sq = d_sq[i]

    def state_bytes(self) -> int:
        """Bytes kept beside the model: d (fp32) and the saved weights (their own dtypes, aligned)."""
        return self.d_flat.numel() * self.d_flat.element_size() + self._saved_layout()[1]
