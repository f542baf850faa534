"""The engine's memory and its shape for foreach calls: d (fp32) and the saved weights (their own dtype) of the
parameters that require gradients now, in buckets.

A bucket is the parameters of one cohort, param group, reduction class, device and dtype: every foreach call of a
step takes one bucket, so its lists have one device and one dtype, as CUDA's multi-tensor kernels need, and the
number of calls a step dispatches depends on the number of buckets (a handful), never on the size of the tensors.
A cohort is the parameters that became trainable together: one unfrozen mid-run starts its d from its first gradient
while the others keep their EMA. Each bucket holds its d in one flat fp32 buffer (4 bytes per element, whatever the
weights' dtype: an EMA held in bf16 stalls once θ·g is below half a bf16 ulp of d) and, from the first perturbation,
the saved weights in one flat buffer of the weights' dtype (all a bit-exact restore needs): 2.0x the trainable bytes
for fp32 weights, 3.0x for bf16.

The layout follows the `requires_grad` flags and the param groups, checked on the host each step (an unchanged set
costs one pass over the flags) and rebuilt when they change: a frozen parameter's d is dropped, a new one starts at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .rules import (
    SUPPORTED_DTYPES,
    refuse_no_trainable_parameter,
    refuse_several_devices,
    refuse_sparse_gradient,
    refuse_unsupported_dtype,
)
from .sharding import ShardReduction, check_gradient_layout, local


@dataclass
class Cohort:
    """Parameters that became trainable together. `initialized` (device bool) is False until their first finite
    gradient, which d then takes (the official code clones the first gradient); `d_sq` is their ‖d‖² after the last
    step, summed over ranks (for the cosine metric)."""

    indices: list[int]
    initialized: torch.Tensor
    d_sq: torch.Tensor


@dataclass
class Bucket:
    """The active parameters of one cohort, param group, reduction class, device and dtype, with their d (views into
    `d_flat`) and saved weights (views into `saved_flat`, allocated on first use)."""

    cohort: int
    group: int
    cls: int
    indices: list[int]
    dtype: torch.dtype
    d_flat: torch.Tensor
    d: list[torch.Tensor]
    saved_flat: torch.Tensor | None = None
    saved: list[torch.Tensor] = field(default_factory=list)


class Layout:
    """The buckets of the active parameters, rebuilt when the trainable set or the grouping changes.

    Args:
        params: every tensor of the engine, in order (the list grows when groups are added).
        reduction: the cross-rank sums (its classes put each parameter in a bucket of one class).
        name: a parameter's name for messages, by index.
    """

    def __init__(self, params: list[torch.Tensor], reduction: ShardReduction, name: Callable[[int], str]) -> None:
        self.params = params
        self.reduction = reduction
        self._name = name
        self.device = local(params[0]).device
        self._key: tuple | None = None
        self.cohorts: list[Cohort] = []
        self.buckets: list[Bucket] = []
        self.d: list[torch.Tensor | None] = [None] * len(params)
        self.active: list[int] = []
        self.version = 0  # counts the builds, so that the engine can cache what depends on the active set

    def sync(self, group_of: list[int]) -> bool:
        """Follow the requires_grad flags and the param groups; returns whether the layout was rebuilt.

        Raises:
            ValueError: no parameter requires a gradient.
        """
        placement = self._placement([p.requires_grad for p in self.params])
        key = (placement, tuple(group_of))
        if key == self._key:
            return False
        self._follow_placement()
        active = [i for i, (f, *_) in enumerate(placement) if f]
        if not active:
            refuse_no_trainable_parameter()
        keep = set(active)
        cohorts = [Cohort([i for i in c.indices if i in keep], c.initialized, c.d_sq) for c in self.cohorts]
        cohorts = [c for c in cohorts if c.indices]
        known = {i for c in cohorts for i in c.indices}
        fresh = [i for i in active if i not in known]
        if fresh:
            zero = torch.zeros((), device=self.device)
            cohorts.append(Cohort(fresh, torch.zeros((), dtype=torch.bool, device=self.device), zero))
        self.build(cohorts, {i: self.d[i] for i in known}, group_of)
        self._key = key
        return True

    def _placement(self, flags: list[bool]) -> tuple:
        """What the layout depends on, per parameter: whether it is active, its dtype, device and shape."""
        return tuple((f, p.dtype, p.device, p.shape) for f, p in zip(flags, self.params))

    def _follow_placement(self) -> None:
        """A model moved or cast after the engine was built (`accelerator.prepare` moving it to the GPU, a
        `model.to(torch.bfloat16)`): the parameters are the same objects, on another device or in another dtype.
        d keeps its values (fp32) and moves with them; the next build lays the buckets out anew.

        Raises:
            RuntimeError: a parameter changed shape (its d cannot follow).
        """
        for i, p in enumerate(self.params):
            d, shape = (self.d[i] if i < len(self.d) else None), local(p).shape
            if d is not None and d.shape != shape:
                raise RuntimeError(
                    f"VASSO: parameter {self._name(i)} changed shape from {tuple(d.shape)} to {tuple(shape)} since "
                    "the optimizer was built (its .data was replaced): its d cannot follow. Build the optimizer "
                    "(and VASSO) again after changing the model's shapes."
                )
        devices = {local(p).device for p in self.params if p.requires_grad}
        if len(devices) == 1 and (device := devices.pop()) != self.device:
            self.device = device
            for c in self.cohorts:
                c.initialized, c.d_sq = c.initialized.to(device), c.d_sq.to(device)

    def build(self, cohorts: list[Cohort], d_values: dict[int, torch.Tensor], group_of: list[int]) -> None:
        """Lay out the buckets cohort by cohort, copying the given d values (the others start at zero).

        Raises:
            NotImplementedError: the parameters live on several devices.
            TypeError: a parameter's dtype is not float32, bfloat16 or float16.
        """
        order = [i for c in cohorts for i in c.indices]
        devices = {local(self.params[i]).device for i in order}
        if len(devices) > 1:
            refuse_several_devices(devices)
        for i in order:
            if self.params[i].dtype not in SUPPORTED_DTYPES:
                refuse_unsupported_dtype(self._name(i), self.params[i].dtype)
        members: dict[tuple, list[int]] = {}
        for k, c in enumerate(cohorts):
            for i in c.indices:
                t = local(self.params[i])
                members.setdefault((k, group_of[i], self.reduction.class_of[i], t.device, t.dtype), []).append(i)
        self.d = [None] * len(self.params)
        self.buckets = []
        for (k, group, cls, device, dtype), indices in members.items():
            sizes = [local(self.params[i]).numel() for i in indices]
            d_flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            views = [v.view(local(self.params[i]).shape) for i, v in zip(indices, d_flat.split(sizes))]
            for i, v in zip(indices, views):
                self.d[i] = v
            self.buckets.append(Bucket(k, group, cls, indices, dtype, d_flat, views))
        copies = [(self.d[i], d_values[i]) for i in order if d_values.get(i) is not None]
        if copies:
            torch._foreach_copy_([a for a, _ in copies], [b.to(self.device) for _, b in copies])
        self.cohorts = cohorts
        self.active = order
        active = set(order)
        self._group_of = list(group_of)
        self._key = (self._placement([i in active for i in range(len(self.params))]), tuple(group_of))
        self.version += 1
        self.refresh_d_sq()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled tensors no longer view one buffer (pickle keeps no views): lay d out again from its values."""
        self.__dict__.update(state)
        self.build(self.cohorts, dict(enumerate(self.d)), self._group_of)

    def refresh_d_sq(self) -> None:
        """Recompute each cohort's ‖d‖² (summed over ranks) from d."""
        if self.buckets:
            norms = [torch.linalg.vector_norm(b.d_flat).square() for b in self.buckets]
            for c, value in zip(self.cohorts, self.cohort_sums(norms)):
                c.d_sq = value

    def cohort_sums(self, per_bucket: list[torch.Tensor]) -> torch.Tensor:
        """Per-cohort global sums (one per cohort, stacked) of per-bucket local sums: each reduction class's sums go
        over its own process groups."""
        zero = torch.zeros((), device=self.device)
        partials: dict[int, list[list[torch.Tensor]]] = {}
        for b, value in zip(self.buckets, per_bucket):
            partials.setdefault(b.cls, [[] for _ in self.cohorts])[b.cohort].append(value)
        rows = {cls: torch.stack([sum(v, zero) for v in lists]) for cls, lists in partials.items()}
        return self.reduction.sum_over_ranks(rows)

    def weights(self, bucket: Bucket) -> list[torch.Tensor]:
        """The bucket's weights (local shards; looked up again at each call: FSDP2 may swap them)."""
        return [local(self.params[i]) for i in bucket.indices]

    def saved(self, bucket: Bucket) -> list[torch.Tensor]:
        """Views of the bucket's saved-weights buffer, in the weights' dtype (allocated on first use)."""
        if bucket.saved_flat is None:
            sizes = [local(self.params[i]).numel() for i in bucket.indices]
            bucket.saved_flat = torch.empty(sum(sizes), dtype=bucket.dtype, device=bucket.d_flat.device)
            bucket.saved = [
                v.view(local(self.params[i]).shape) for i, v in zip(bucket.indices, bucket.saved_flat.split(sizes))
            ]
        return bucket.saved

    def gradients(self, bucket: Bucket) -> list[torch.Tensor | None]:
        """The local pass-1 (or pass-2) gradient of each of the bucket's parameters, None where it has none.

        Raises:
            ValueError: a trainable parameter has a sparse gradient.
            NotImplementedError: a DTensor gradient is laid out unlike its parameter (e.g. `Partial`).
        """
        grads: list[torch.Tensor | None] = []
        for i in bucket.indices:
            grad = self.params[i].grad
            if grad is not None:
                if grad.layout is not torch.strided:  # a host-side attribute: no sync
                    refuse_sparse_gradient(self._name(i))
                if self.reduction.has_dtensor:
                    check_gradient_layout(self.params[i], grad, self._name(i))
                    grad = local(grad)
            grads.append(grad)
        return grads

    def state_bytes(self) -> int:
        """Bytes kept beside the model: d (fp32) and the saved weights (their own dtype), allocated or not yet."""
        return sum(b.d_flat.numel() * (4 + b.dtype.itemsize) for b in self.buckets)
