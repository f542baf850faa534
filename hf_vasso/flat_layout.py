"""The engine's memory: d and one work buffer as flat fp32 buffers over the parameters that require gradients now.

The buffers are laid out cohort by cohort: a cohort is the parameters that became trainable together, so that a
parameter unfrozen mid-run starts like a first step while the others keep their EMA, with no per-tensor work. The
layout follows the `requires_grad` flags, checked on the host each step (an unchanged set costs one pass over the
flags) and repacked when they change: a frozen parameter's d is dropped, a new one starts at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sharding import ShardReduction, local

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


class FlatLayout:
    """d (`self.d[i]`: views into one flat fp32 buffer, None for parameters without d) and the work buffer.

    The work buffer holds the step's gradient in `absorb_gradient` (so a non-finite gradient can be zeroed without
    touching `p.grad`) and the saved weights between `perturb` and `restore`.

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
        self._work: torch.Tensor | None = None
        self.work_views: list[torch.Tensor] = []
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
            raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")
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
            raise NotImplementedError(
                f"hf_vasso needs every trainable parameter on one device, found {sorted(map(str, devices))}: "
                "a model split over devices (device_map) is not supported; use DDP or FSDP2."
            )
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
        self.refresh_d_sq()
        self.version += 1
        self.active = order
        self.position = {i: k for k, i in enumerate(order)}
        self._flags = tuple(i in self.position for i in range(len(self.params)))
        self._local_cache = None
        self._work = None
        self.work_views = []

    def refresh_d_sq(self) -> torch.Tensor:
        """Recompute each cohort's ||d||² (summed over ranks); returns them stacked (one per segment)."""
        if not self.segments:
            return self.d_flat.new_zeros(0)
        d_sq = self.reduction.cohort_sq_norms(self.d_flat, self.ranges())
        for i, s in enumerate(self.segments):
            s.d_sq = d_sq[i]
        return d_sq

    def ranges(self) -> list[tuple[int, int]]:
        """Each cohort's (start, end) in the flat buffers."""
        return [(s.start, s.end) for s in self.segments]

    def work_buffer(self) -> torch.Tensor:
        if self._work is None:
            self._work = torch.empty_like(self.d_flat)
            sizes = [d.numel() for d in self.active_d()]
            self.work_views = [v.view(d.shape) for v, d in zip(self._work.split(sizes), self.active_d())]
        return self._work

    def active_weights(self) -> list[torch.Tensor]:
        """The weights of this step's active parameters (local shards; cached unless sharded: FSDP2 may swap them)."""
        if self._local_cache is None or self.reduction.has_dtensor:
            self._local_cache = [local(self.params[i]) for i in self.active]
        return self._local_cache

    def active_d(self) -> list[torch.Tensor]:
        return [self.d[i] for i in self.active]

    def copy_gradients_into_work(self) -> torch.Tensor:
        """work <- the pass-1 gradient (fp32), zeros for trainable parameters without one this step; returns work.

        Raises:
            ValueError: a trainable parameter has a sparse gradient.
        """
        work = self.work_buffer()
        sources, targets, missing = [], [], []
        strided = torch.strided
        for i, view in zip(self.active, self.work_views):
            grad = self.params[i].grad
            if grad is None:
                missing.append(view)
                continue
            if grad.layout is not strided:  # a host-side attribute: no sync
                raise ValueError(
                    f"Parameter {self._name(i)} has a sparse gradient: VASSO needs dense gradients (its norm and EMA "
                    "are dense). Use a dense embedding (nn.Embedding(sparse=False)) and a dense optimizer."
                )
            sources.append(grad)
            targets.append(view)
        if self.reduction.has_dtensor:
            sources = [local(g) for g in sources]
        if sources:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)
        return work

    def state_bytes(self) -> int:
        """Bytes kept beside the model: d and the work buffer, both fp32."""
        return 2 * self.d_flat.numel() * self.d_flat.element_size()
