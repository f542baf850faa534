"""The VASSO update, written once and used by both `VassoTrainer` and the `VASSO` optimizer wrapper.

VASSO: "Enhancing Sharpness-Aware Optimization Through Variance Suppression" (Li & Giannakis, NeurIPS 2023,
arXiv 2309.15639; extended version with eVASSO, arXiv 2509.02433). One optimizer step t, for the parameters that
require gradients at that step (the full specification is `docs/algorithm.md`):

    g_t  = gradient of the step's loss at x_t                     (pass 1, already in `p.grad`)
    d_t  = g_t on a parameter's first step, else (1 - theta) d_{t-1} + theta g_t
    eps  = the adversary geometry applied to d_t (`adversary.py`: rho d / ||d||, or ASAM's rho |w|²d / || |w| d ||)
    h_t  = gradient at x_t + eps                                  (pass 2, run by the caller)
    x_t is restored by copy, a non-finite h_t is kept from the weights, then the base optimizer steps with h_t.

`VassoUpdate` owns d, the step count and the saved weights. It never runs a forward or backward pass and never
synchronises host and device on the training path: every decision that depends on a tensor value (a non-finite
gradient, a zero norm, a parameter's first step) is a `torch.where` on the device.

Memory layout: d and one work buffer are flat fp32 buffers over the parameters that currently require gradients
(`d[i]` are views into the first). The work buffer holds the step's gradient in `absorb_gradient` (so a non-finite
gradient can be zeroed without touching `p.grad`) and the saved weights between `perturb` and `restore`: VASSO keeps
8 bytes per trainable parameter, 2x the weights in fp32. Flat buffers make the per-step work a handful of kernels
whatever the number of tensors (LoRA has hundreds of tiny ones).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from .adversary import geometry_for
from .rules import check_adaptive, check_hyperparameters, check_seed

logger = logging.getLogger("hf_vasso")

STATE_FORMAT = "hf_vasso.VassoUpdate/2"

# Running sums kept on the device for the logged metrics (one host sync per logging window).
_WINDOW = (
    "steps",  # absorb_gradient calls
    "moved",  # steps whose weights really moved (finite d, non-zero eps)
    "grad_norm",  # sum of ||g|| over finite steps
    "d_norm",  # sum of ||d|| over steps where d exists
    "d_count",
    "cos",
    "cos_count",
    "perturbed_loss",
    "perturbed_count",
    "sharpness",  # perturbed minus clean loss, on steps that recorded both
    "sharpness_count",
    "nonfinite",  # steps whose pass-1 gradient was not finite
    "guarded",  # guard_perturbed_gradient calls on perturbed steps
    "perturbed_nonfinite",  # ... whose pass-2 gradient was not finite
)
_W = {name: i for i, name in enumerate(_WINDOW)}


def adversary_coin(seed: int, step: int, adversary_prob: float) -> bool:
    """The eVASSO coin of optimizer step `step` (0-based): a pure function of (seed, step, p).

    Identical on every rank (no communication) and after a resume; p >= 1 is always True, p <= 0 always False.
    """
    if adversary_prob >= 1.0:
        return True
    if adversary_prob <= 0.0:
        return False
    return random.Random(f"hf_vasso:{seed}:{step}").random() < adversary_prob


# ---------------------------------------------------------------------------------------------- sharding


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


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


# ---------------------------------------------------------------------------------------------- the engine


@dataclass
class _Group:
    """A parameter group: its own rho and adversary geometry (the norm is global over all groups)."""

    rho: float
    adaptive: bool
    indices: list[int]


@dataclass
class _Segment:
    """A contiguous run of the flat d buffer whose parameters became trainable together (a cohort).

    `initialized` (device bool) is False until the cohort's first finite gradient, which d then copies (the
    official code clones the first gradient). Cohorts exist so that a parameter unfrozen mid-run starts like a
    first step while the others keep their EMA, with no per-tensor work.
    """

    indices: list[int]
    start: int
    end: int
    initialized: torch.Tensor
    d_sq: torch.Tensor  # ||d||² of this cohort after the last step (for the cosine metric)


class VassoUpdate:
    """The VASSO state (d, step count, saved weights) and the operations on it; the engine behind both front ends.

    Paper: arXiv 2309.15639 (VASSO) and 2509.02433 (eVASSO). The caller runs the passes; this class does what
    happens between them:

        update = VassoUpdate(model.parameters(), rho=0.05, theta=0.4)
        adversary = update.is_adversary_step()     # this step's eVASSO coin, from (seed, step): no communication
        ...pass 1 backward...
        update.absorb_gradient(grad_scale)         # d <- EMA with the pass-1 gradient, eps from d; step += 1
        if adversary:
            update.perturb()                       # save x, x <- x + eps, clear grads
            try: ...pass 2 backward...
            finally: update.restore()              # x <- saved copy, bit for bit
            update.guard_perturbed_gradient(grad_scale)   # a non-finite pass-2 gradient never reaches the weights
        ...base optimizer step...

    Each step works on exactly the parameters with `requires_grad=True` at that step (checked on the host; an
    unchanged set costs one pass over the flags). A frozen parameter is neither perturbed nor part of the norm, and
    its d is dropped; a parameter that becomes trainable starts its d from its first gradient.

    Args:
        params: tensors, or param-group dicts `{"params": [...], "rho": ..., "adaptive": ...}` (missing keys take
            the defaults below). Every tensor is kept; those without `requires_grad` at a step are left alone.
        rho (`float`): perturbation radius, >= 0 (the default of groups without their own "rho").
        theta (`float`): weight of the newest gradient in d, in (0, 1]; 1.0 is SAM.
        adversary_prob (`float`): probability of an adversary step, in [0, 1]; below 1 is eVASSO.
        seed (`int`): seed of the eVASSO coins (42 is the Trainer's default seed).
        adaptive (`bool`): ASAM's scale-invariant adversary instead of VASSO's (default of groups without
            "adaptive").
        param_names (`list[str]`, *optional*): one name per tensor, in order; saved and checked at load time.

    Raises:
        ValueError: a hyperparameter is invalid, no tensor requires a gradient, or `param_names` has the wrong
            length.
        NotImplementedError: the trainable parameters live on several devices, or are sharded over several meshes.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        rho: float,
        theta: float,
        adversary_prob: float = 1.0,
        seed: int = 42,
        adaptive: bool = False,
        param_names: list[str] | None = None,
    ) -> None:
        self.rho, self.theta, self.adversary_prob = check_hyperparameters(rho, theta, adversary_prob)
        self.seed = check_seed(seed)
        self.adaptive = check_adaptive(adaptive)
        self.params: list[torch.Tensor] = []
        self._groups: list[_Group] = []
        for group in _as_groups(params):
            group_rho = check_hyperparameters(group.get("rho", self.rho), self.theta, self.adversary_prob)[0]
            group_adaptive = check_adaptive(group.get("adaptive", self.adaptive))
            first = len(self.params)
            self.params.extend(group["params"])
            self._groups.append(_Group(group_rho, group_adaptive, list(range(first, len(self.params)))))
        if not any(p.requires_grad for p in self.params):
            raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")
        if param_names is not None and len(param_names) != len(self.params):
            raise ValueError(f"param_names has {len(param_names)} names for {len(self.params)} tensors.")
        self.param_names = list(param_names) if param_names is not None else None
        self._group_of = [0] * len(self.params)
        for gi, group in enumerate(self._groups):
            for i in group.indices:
                self._group_of[i] = gi
        self._geometries = [geometry_for(g.adaptive) for g in self._groups]
        # The cosine between successive eps follows from norms only when eps ∝ d with one rho.
        one_rho = len({g.rho for g in self._groups}) == 1
        self._cosine = one_rho and all(geo.eps_parallel_to_d for geo in self._geometries)
        self._single_plain = len(self._groups) == 1 and not self._groups[0].adaptive

        self.step = 0
        self.perturbed = False
        self._has_dtensor = any(isinstance(p, DTensor) for p in self.params)
        self._group = _shard_group([p for p in self.params if isinstance(p, DTensor)])
        self._device = _local(self.params[0]).device
        self._zero = torch.zeros((), device=self._device)
        self._window = torch.zeros(len(_WINDOW), device=self._device)

        # The active set and its flat buffers, (re)built on the host when the requires_grad flags change.
        self._flags: tuple[bool, ...] | None = None
        self._active: list[int] = []
        self._segments: list[_Segment] = []
        self._d_flat = torch.zeros(0, device=self._device)
        self._work: torch.Tensor | None = None
        self._work_views: list[torch.Tensor] = []
        self.d: list[torch.Tensor | None] = [None] * len(self.params)
        self._scales: list[torch.Tensor] | None = None  # per active tensor, this step's rho_group / ||.||
        self._moved = torch.zeros((), dtype=torch.bool, device=self._device)
        self._guard_pending = False
        self._sync_trainable_set()

    # ------------------------------------------------------------------ the step

    def is_adversary_step(self, step: int | None = None) -> bool:
        """This step's eVASSO coin (default: the step about to run): a pure function of (seed, step).

        Identical on every rank and after a resume; `module.adversary_coin` is the same function.
        """
        return adversary_coin(self.seed, self.step if step is None else step, self.adversary_prob)

    @torch.no_grad()
    def absorb_gradient(self, grad_scale: torch.Tensor | None = None) -> None:
        """Fold the pass-1 gradient into d and compute this step's adversary; advance the step count.

        A non-finite gradient (any precision) leaves d untouched and this step unperturbed, decided on the device
        and counted in `vasso/nonfinite_fraction`.

        Args:
            grad_scale: the loss scale the gradients carry (fp16 with a GradScaler, a device tensor), or None.

        Raises:
            RuntimeError: the weights are still perturbed (call `restore()` first).
            ValueError: a trainable parameter has a sparse gradient.
        """
        if self.perturbed:
            raise RuntimeError("VASSO: absorb_gradient() called while the weights are perturbed; call restore().")
        self._sync_trainable_set()
        self._guard_pending = False
        work = self._work_buffer()
        self._copy_gradients_into(work)
        inv = None if grad_scale is None else grad_scale.float().reciprocal()
        theta = self.theta

        # Squared norms of g per cohort (and <g, d_{t-1}> for theta = 1, where norms alone do not give the cosine).
        stats = [torch.linalg.vector_norm(work[s.start : s.end]).square() for s in self._segments]
        if self._cosine and theta == 1.0:
            stats += [torch.dot(work[s.start : s.end], self._d_flat[s.start : s.end]) for s in self._segments]
        stats = torch.stack(stats)
        if self._group is not None:
            stats = self._all_reduce(stats)
        n = len(self._segments)
        g_sq_seg = stats[:n]
        g_sq = g_sq_seg.sum()
        finite = torch.isfinite(g_sq)

        # Make the copied gradient finite, so that its product with take = 0 on a non-finite step is 0 (0 * inf
        # would be NaN): d then stays exactly itself. On finite steps this changes nothing.
        work.nan_to_num_(0.0, 0.0, 0.0)
        d_sq_prev = [s.d_sq for s in self._segments]
        was_initialized = [s.initialized for s in self._segments]
        for s in self._segments:
            # d*(1-theta) then d + theta*g: bit-identical to the official d.mul_(1-theta).add_(g, alpha=theta).
            # A first step uses keep=1, take=1 on d=0 (d <- g exactly); a non-finite step keep=1, take=0.
            keep = torch.where(finite & s.initialized, 1.0 - theta, 1.0)
            take = torch.where(finite, torch.where(s.initialized, theta, 1.0), 0.0)
            if inv is not None:
                take = take * inv
            d = self._d_flat[s.start : s.end]
            d.mul_(keep).addcmul_(work[s.start : s.end], take)
            s.initialized = s.initialized | finite
        d_sq_seg = torch.stack([torch.linalg.vector_norm(self._d_flat[s.start : s.end]) for s in self._segments])
        d_sq_seg = d_sq_seg.square()
        if self._group is not None:
            d_sq_seg = self._all_reduce(d_sq_seg)
        for i, s in enumerate(self._segments):
            s.d_sq = d_sq_seg[i]
        d_sq = d_sq_seg.sum()
        d_norm = d_sq.sqrt()
        has_d = torch.stack([s.initialized for s in self._segments]).any()

        # The adversary: one global norm through the geometry, each group's rho.
        if self._single_plain:
            total_sq = d_sq
        else:
            total_sq = self._geometry_sq_norm()
        norm = total_sq.sqrt()
        valid = finite & (norm > 0) & torch.isfinite(norm)
        group_scales = [torch.where(valid, g.rho / norm, 0.0) for g in self._groups]
        self._scales = [group_scales[self._group_of[i]] for i in self._active]
        self._moved = valid if any(g.rho > 0 for g in self._groups) else torch.zeros_like(valid)
        self.step += 1

        grad_norm = g_sq.sqrt() if inv is None else g_sq.sqrt() * inv
        cos, cos_valid = self._cosine_stats(g_sq_seg, d_sq_seg, d_sq_prev, was_initialized, stats[n:], inv, finite)
        zero = torch.zeros_like(g_sq)
        self._window += torch.stack(
            [
                torch.ones_like(g_sq),
                zero,  # "moved" is added by perturb(): only steps that perturb can move the weights
                torch.where(finite, grad_norm, 0.0),
                torch.where(has_d, d_norm, 0.0),
                has_d.float(),
                cos,
                cos_valid.float(),
                zero,
                zero,
                zero,
                zero,
                (~finite).float(),
                zero,
                zero,
            ]
        )

    def _cosine_stats(self, g_sq_seg, d_sq_seg, d_sq_prev, was_initialized, dots, inv, finite):
        """cos(d_t, d_{t-1}) without keeping d_{t-1}: <d_t, d_{t-1}> follows from squared norms for theta < 1,
        (||d_t||² + (1-θ)²||d_{t-1}||² - θ²||g||²) / (2(1-θ)), and from <g, d_{t-1}> for theta = 1. A cohort on its
        first step had no d_{t-1} and contributes 0. Absent (count 0) when eps is not ∝ d (ASAM, per-group rho)."""
        if not self._cosine:
            return torch.zeros_like(finite, dtype=torch.float32), torch.zeros_like(finite)
        theta = self.theta
        inv_sq = 1.0 if inv is None else inv * inv
        inner = torch.zeros((), device=self._device)
        for i, init in enumerate(was_initialized):
            if theta == 1.0:
                term = dots[i] * (1.0 if inv is None else inv)
            else:
                term = d_sq_seg[i] + (1 - theta) ** 2 * d_sq_prev[i] - theta**2 * g_sq_seg[i] * inv_sq
                term = term / (2 * (1 - theta))
            inner = inner + torch.where(init, term, 0.0)
        denom = d_sq_seg.sum().sqrt() * torch.stack(d_sq_prev).sum().sqrt()
        valid = finite & (denom > 0)
        return torch.where(valid, inner / denom, 0.0).clamp(-1.0, 1.0), valid

    def _geometry_sq_norm(self) -> torch.Tensor:
        total = torch.zeros((), device=self._device)
        for group, geometry in zip(self._groups, self._geometries):
            active = [i for i in group.indices if self.d[i] is not None]
            if active:
                total = total + geometry.sq_norm([_local(self.params[i]) for i in active], [self.d[i] for i in active])
        return self._all_reduce(total) if self._group is not None else total

    @torch.no_grad()
    def perturb(self) -> None:
        """Save the weights, move them to x + eps, and clear the gradients for pass 2.

        Raises:
            RuntimeError: called twice without `restore()`, or before `absorb_gradient()` this step.
        """
        if self.perturbed:
            raise RuntimeError("VASSO: perturb() called twice without restore(); the saved weights would be lost.")
        if self._scales is None:
            raise RuntimeError("VASSO: perturb() needs this step's absorb_gradient() first.")
        local = self._active_weights()
        torch._foreach_copy_(self._work_views, local)
        self.perturbed = True
        if self._single_plain:
            self._geometries[0].perturb_(local, self._active_d(), self._scales)
        else:
            for group, geometry in zip(self._groups, self._geometries):
                active = [i for i in group.indices if self.d[i] is not None]
                if active:
                    scales = [self._scales[self._position[i]] for i in active]
                    geometry.perturb_([_local(self.params[i]) for i in active], [self.d[i] for i in active], scales)
        for i in self._active:
            self.params[i].grad = None
        self._window[_W["moved"]] += self._moved.float()
        self._guard_pending = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by `perturb()`, bit for bit (x + eps - eps is not x in floating point).

        A no-op when the weights are not perturbed, so it can sit in a `finally`.
        """
        if not self.perturbed:
            return
        torch._foreach_copy_(self._active_weights(), self._work_views)
        self.perturbed = False

    @torch.no_grad()
    def guard_perturbed_gradient(self, grad_scale: torch.Tensor | None = None) -> None:
        """Keep a non-finite pass-2 gradient from the weights; call after `restore()`, before the base step.

        Without a loss scaler, a non-finite pass-2 gradient is replaced by zeros on the device: the base optimizer
        then steps with a zero gradient (its momentum and weight decay still act). With a GradScaler's scale
        (`grad_scale`), the gradient is left for the scaler, which skips the step and lowers the scale. Counted in
        `vasso/perturbed_nonfinite_fraction` either way. A no-op on steps that were not perturbed.

        Raises:
            RuntimeError: the weights are still perturbed.
        """
        if self.perturbed:
            raise RuntimeError("VASSO: guard_perturbed_gradient() called before restore().")
        if not self._guard_pending:
            return
        self._guard_pending = False
        grads = [self.params[i].grad for i in self._active if self.params[i].grad is not None]
        if self._has_dtensor:
            grads = [_local(g) for g in grads]
        if grads:
            sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        else:
            sq = torch.zeros((), device=self._device)
        if self._group is not None:
            sq = self._all_reduce(sq)
        finite = torch.isfinite(sq)
        if grad_scale is None:
            nonfinite = ~finite
            for g in grads:
                g.masked_fill_(nonfinite, 0.0)
        self._window[_W["guarded"]] += 1
        self._window[_W["perturbed_nonfinite"]] += (~finite).float()

    def record_losses(self, clean_loss: torch.Tensor | None, perturbed_loss: torch.Tensor | None) -> None:
        """Add this step's loss before and after the perturbation (device tensors) to the metric window.

        Counted only on steps whose weights really moved, with finite losses. `clean_loss=None` records the
        perturbed loss alone (no sharpness), as the wrapper's closure form does.
        """
        if perturbed_loss is None:
            return
        perturbed = perturbed_loss.detach().float().reshape(())
        ok = self._moved & torch.isfinite(perturbed)
        self._window[_W["perturbed_loss"]] += torch.where(ok, perturbed, 0.0)
        self._window[_W["perturbed_count"]] += ok.float()
        if clean_loss is not None:
            clean = clean_loss.detach().float().reshape(())
            ok = ok & torch.isfinite(clean)
            self._window[_W["sharpness"]] += torch.where(ok, perturbed - clean, 0.0)
            self._window[_W["sharpness_count"]] += ok.float()

    # ------------------------------------------------------------------ the trainable set and buffers

    def _sync_trainable_set(self) -> None:
        """Follow the requires_grad flags: a host-side check, and a repack of the flat buffers when they changed."""
        flags = tuple(p.requires_grad for p in self.params)
        if flags == self._flags:
            return
        active = [i for i, f in enumerate(flags) if f]
        if not active:
            raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")
        keep = set(active)
        old_d = list(self.d)
        cohorts = [(s.indices, s.initialized, s.d_sq) for s in self._segments]
        cohorts = [([i for i in idx if i in keep], init, d_sq) for idx, init, d_sq in cohorts]
        cohorts = [c for c in cohorts if c[0]]
        known = {i for idx, _, _ in cohorts for i in idx}
        fresh = [i for i in active if i not in known]
        if fresh:
            zero = torch.zeros((), device=self._device)
            cohorts.append((fresh, torch.zeros((), dtype=torch.bool, device=self._device), zero))
        # The dropped parameters' d shrink the cohort norms: recompute them from d once, here.
        self._build(cohorts, {i: old_d[i] for i in known})
        self._flags = flags

    def _build(self, cohorts: list[tuple[list[int], torch.Tensor, torch.Tensor]], d_values: dict) -> None:
        """Lay out the flat d buffer cohort by cohort, copying the given d values (others start at zero)."""
        order = [i for idx, _, _ in cohorts for i in idx]
        devices = {_local(self.params[i]).device for i in order}
        if len(devices) > 1:
            raise NotImplementedError(
                f"hf_vasso needs every trainable parameter on one device, found {sorted(map(str, devices))}: "
                "a model split over devices (device_map) is not supported; use DDP or FSDP2."
            )
        sizes = [_local(self.params[i]).numel() for i in order]
        self._d_flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device)
        views = self._d_flat.split(sizes) if sizes else []
        self.d = [None] * len(self.params)
        for i, v in zip(order, views):
            self.d[i] = v.view(_local(self.params[i]).shape)
        copies = [(self.d[i], d_values[i]) for i in order if d_values.get(i) is not None]
        if copies:
            torch._foreach_copy_([a for a, _ in copies], [b.to(self._device) for _, b in copies])
        self._segments, start = [], 0
        for idx, init, _ in cohorts:
            end = start + sum(_local(self.params[i]).numel() for i in idx)
            d_sq = torch.linalg.vector_norm(self._d_flat[start:end]).square()
            self._segments.append(_Segment(idx, start, end, init, d_sq))
            start = end
        if self._group is not None and self._segments:
            d_sq = self._all_reduce(torch.stack([s.d_sq for s in self._segments]))
            for i, s in enumerate(self._segments):
                s.d_sq = d_sq[i]
        self._active = order
        self._position = {i: k for k, i in enumerate(order)}
        self._local_cache = None
        self._work = None
        self._work_views = []
        self._scales = None

    def _work_buffer(self) -> torch.Tensor:
        if self._work is None:
            self._work = torch.empty_like(self._d_flat)
            sizes = [d.numel() for d in self._active_d()]
            self._work_views = [v.view(d.shape) for v, d in zip(self._work.split(sizes), self._active_d())]
        return self._work

    def _active_weights(self) -> list[torch.Tensor]:
        """The weights of this step's active parameters (local shards; cached unless sharded: FSDP2 may swap them)."""
        if self._local_cache is None or self._has_dtensor:
            self._local_cache = [_local(self.params[i]) for i in self._active]
        return self._local_cache

    def _active_d(self) -> list[torch.Tensor]:
        return [self.d[i] for i in self._active]

    def _copy_gradients_into(self, work: torch.Tensor) -> None:
        """work <- the pass-1 gradient (fp32), zeros for trainable parameters without one this step."""
        sources, targets, missing = [], [], []
        strided = torch.strided
        for i, view in zip(self._active, self._work_views):
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
        if self._has_dtensor:
            sources = [_local(g) for g in sources]
        if sources:
            torch._foreach_copy_(targets, sources)
        if missing:
            torch._foreach_zero_(missing)

    # ------------------------------------------------------------------ metrics and state

    def pop_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Averages over the steps since the last call, as `vasso/*` floats; the one host sync of the window.

        A metric is absent when nothing in the window measured it (see the README's "Logged metrics").

        Args:
            reduce: averages the window over processes first, e.g. `lambda t: accelerator.reduce(t, "mean")`.
        """
        window = self._window.clone() if reduce is None else reduce(self._window.clone())
        self._window.zero_()
        s = dict(zip(_WINDOW, window.tolist()))
        if s["steps"] == 0:
            return {}
        metrics = {
            "vasso/adversary_fraction": s["moved"] / s["steps"],
            "vasso/nonfinite_fraction": s["nonfinite"] / s["steps"],
        }
        ratios = [
            ("vasso/grad_norm", "grad_norm", s["steps"] - s["nonfinite"]),
            ("vasso/d_norm", "d_norm", s["d_count"]),
            ("vasso/adversary_cosine", "cos", s["cos_count"]),
            ("vasso/perturbed_loss", "perturbed_loss", s["perturbed_count"]),
            ("vasso/sharpness", "sharpness", s["sharpness_count"]),
            ("vasso/perturbed_nonfinite_fraction", "perturbed_nonfinite", s["guarded"]),
        ]
        for key, total, count in ratios:
            if count > 0:
                metrics[key] = s[total] / count
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (the coin stream is a function of the step).

        `d` holds one fp32 tensor per parameter (None for parameters without d), `segments` the flat layout and
        which cohorts have seen their first gradient; one host sync (a save is not on the hot path).

        Raises:
            RuntimeError: the weights are perturbed.
        """
        if self.perturbed:
            raise RuntimeError("VASSO state saved while the weights are perturbed; call restore() first.")
        initialized = [bool(s.initialized.item()) for s in self._segments]
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "d": [None if d is None else d.clone() for d in self.d],
            "segments": [{"params": list(s.indices), "initialized": f} for s, f in zip(self._segments, initialized)],
            "initialized": all(initialized),
            "param_names": self.param_names,
            **self._hyperparameters(),
        }

    def _hyperparameters(self) -> dict[str, Any]:
        """What a resume may change (with a warning): saved with the state, compared when it is loaded."""
        return {
            "rho": self.rho,
            "theta": self.theta,
            "adversary_prob": self.adversary_prob,
            "seed": self.seed,
            "adaptive": self.adaptive,
            "group_rho": [g.rho for g in self._groups],
            "group_adaptive": [g.adaptive for g in self._groups],
        }

    def validate_state_dict(self, state: Any, expected_step: int | None = None) -> None:
        """Check a saved state against this run before anything is loaded; one host sync (the finiteness check).

        Raises:
            ValueError: unknown or old format, other parameters (count, names, shapes), a step that is not
                `expected_step`, or non-finite values; the message says what is wrong.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format", "no format tag") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"This is not a VASSO state in the format {STATE_FORMAT!r} (found {found!r}): it was written by "
                "another program or an older hf_vasso. Resume from a checkpoint written by this version, or start "
                "d afresh."
            )
        missing = [k for k in ("step", "d", "segments", "param_names") if k not in state]
        if missing:
            raise ValueError(f"The VASSO state lacks {', '.join(missing)}: the file is incomplete.")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"The VASSO state's step {step!r} is not a step count.")
        if expected_step is not None and step != expected_step:
            raise ValueError(
                f"The VASSO state is at step {step} but the checkpoint is at step {expected_step}: the state file "
                "belongs to another checkpoint (its d and eVASSO coin stream would be shifted)."
            )
        d = state["d"]
        if not isinstance(d, list) or len(d) != len(self.params):
            count = len(d) if isinstance(d, list) else type(d).__name__
            raise ValueError(
                f"The VASSO state holds {count} tensors, which do not match the {len(self.params)} parameters of this "
                "model: resume with the same model, adapters and parameters."
            )
        names = state["param_names"]
        if self.param_names is not None and names is not None and list(names) != self.param_names:
            diff = next((a, b) for a, b in zip(list(names) + [None], self.param_names + [None]) if a != b)
            raise ValueError(
                f"The VASSO state was written for other parameters (saved {diff[0]!r}, here {diff[1]!r})."
            )
        for i, t in enumerate(d):
            if t is None:
                continue
            shape = tuple(_local(self.params[i]).shape)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"The VASSO state's d for {self._name(i)} is {what}, expected a float {shape}.")
        seen: set[int] = set()
        for seg in state["segments"]:
            idx = seg.get("params") if isinstance(seg, dict) else None
            if not isinstance(idx, list) or not isinstance(seg.get("initialized"), bool):
                raise ValueError("The VASSO state's segments are malformed.")
            for i in idx:
                if not isinstance(i, int) or not 0 <= i < len(self.params) or i in seen or d[i] is None:
                    raise ValueError(f"The VASSO state's segments name parameter {i!r} without a d of its own.")
                seen.add(i)
        if seen != {i for i, t in enumerate(d) if t is not None}:
            raise ValueError("The VASSO state's segments do not cover its d tensors.")
        tensors = [t for t in d if t is not None]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            bad = next(self._name(i) for i, t in enumerate(d) if t is not None and not torch.isfinite(t).all())
            raise ValueError(
                f"The VASSO state holds non-finite values in d (first: {bad}): the run it saved diverged."
            )

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], expected_step: int | None = None) -> None:
        """Validate (`validate_state_dict`), then load. Changed hyperparameters are allowed and logged as warnings.

        Raises:
            ValueError: see `validate_state_dict`; nothing is loaded then.
            RuntimeError: the weights are perturbed.
        """
        if self.perturbed:
            raise RuntimeError("VASSO state loaded while the weights are perturbed; call restore() first.")
        self.validate_state_dict(state, expected_step)
        for key, new in self._hyperparameters().items():
            old = state.get(key)
            if old is not None and old != new:
                logger.warning(f"VASSO hyperparameter {key} changed at resume: {old} → {new} (the new value is used).")
        cohorts = [
            (list(seg["params"]), torch.tensor(seg["initialized"], device=self._device), self._zero)
            for seg in state["segments"]
        ]
        self._build(cohorts, {i: t for i, t in enumerate(state["d"]) if t is not None})
        # The layout is the saved one; the next step re-checks the flags against it.
        self._flags = tuple(i in set(self._active) for i in range(len(self.params)))
        self.step = state["step"]

    @property
    def _d_sq(self) -> torch.Tensor:
        """||d||² over all cohorts (all-reduced over the shard group), as of the last step or load."""
        return torch.stack([s.d_sq for s in self._segments]).sum()

    def state_bytes(self) -> int:
        """Bytes VASSO keeps beside the model: d and the work buffer (saved weights), both fp32."""
        return 2 * self._d_flat.numel() * self._d_flat.element_size()

    def _name(self, i: int) -> str:
        return self.param_names[i] if self.param_names else f"parameter #{i}"

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t, group=self._group)
        return t


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Tensors or param-group dicts, as a list of group dicts."""
    params = list(params)
    if params and isinstance(params[0], dict):
        # torch accepts a lone tensor as a group's "params"
        return [
            dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]))
            for g in params
        ]
    return [{"params": params}]
