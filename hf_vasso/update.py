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

The pieces: `flat_layout.py` (d, flat fp32 over the trainable set cohort by cohort, and the saved weights in their
own dtype), `sharding.py` (local shards and the cross-rank sum of the norms), `adversary.py` (the geometries),
`metrics.py` (the `vasso/*` window) and `state.py` (the checkpoint). VASSO keeps d and the saved weights: 2.0x the
trainable bytes for fp32 weights, 3.0x for bf16; during a step it allocates at most one tensor's worth of fp32 more.
Flat buffers make the per-step work a handful of kernels whatever the number of tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .adversary import AdversaryGeometry, make_geometry
from .flat_layout import FlatLayout
from .metrics import MetricWindow
from .rules import (
    check_adaptive,
    check_hyperparameters,
    check_new_param_group,
    check_param_names,
    check_seed,
    refuse_no_trainable_parameter,
    refuse_repeated_tensors,
)
from .sharding import ShardReduction, local
from .state import STATE_FORMAT, load_state, save_state, validate_state

__all__ = ["STATE_FORMAT", "VassoUpdate", "adversary_coin"]


def adversary_coin(seed: int, step: int, adversary_prob: float) -> bool:
    """The eVASSO coin of optimizer step `step` (0-based): a pure function of (seed, step, p).

    Identical on every rank (no communication) and after a resume; p >= 1 is always True, p <= 0 always False.
    """
    if adversary_prob >= 1.0:
        return True
    if adversary_prob <= 0.0:
        return False
    return random.Random(f"hf_vasso:{seed}:{step}").random() < adversary_prob


@dataclass
class _Group:
    """A parameter group: its own rho and adversary geometry (the norm is global over all groups)."""

    rho: float
    adaptive: bool
    indices: list[int]
    geometry: AdversaryGeometry


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
            "adaptive"); selects the geometry in `adversary.GEOMETRIES`.
        param_names (`list[str]`, *optional*): one name per tensor, in order; saved and checked at load time.

    Raises:
        ValueError: a hyperparameter is invalid, no tensor requires a gradient, a tensor is given more than once,
            or `param_names` has the wrong length.
        NotImplementedError: the trainable parameters live on several devices, or a DTensor parameter is placed
            neither sharded nor replicated on a mesh dimension (e.g. `Partial`).
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
            self._add_group(group)
        if not any(p.requires_grad for p in self.params):
            refuse_no_trainable_parameter()
        check_param_names(param_names, len(self.params))
        refuse_repeated_tensors(self.params, "the parameters")
        self.param_names = list(param_names) if param_names is not None else None

        self.step = 0
        self.perturbed = False
        self._reduction = ShardReduction(self.params, self.name)
        self.layout = FlatLayout(self.params, self._reduction, self.name)
        self._window = MetricWindow(self.layout.device)
        self._scales: list[torch.Tensor] | None = None  # per active tensor, this step's rho_group / ||.||
        self._moved = torch.zeros((), dtype=torch.bool, device=self.layout.device)
        self._guard_pending = False
        self._reuse_d_sq = (-1, False)  # (layout version, _norm_is_d_norm()) cached on the host
        self.layout.sync()

    def _add_group(self, group: dict[str, Any]) -> None:
        """Append a param group (its own "rho" and "adaptive", else the engine's) to the parameters."""
        rho = check_hyperparameters(group.get("rho", self.rho), self.theta, self.adversary_prob)[0]
        adaptive = check_adaptive(group.get("adaptive", self.adaptive))
        first = len(self.params)
        self.params.extend(group["params"])
        indices = list(range(first, len(self.params)))
        self._groups.append(_Group(rho, adaptive, indices, make_geometry(adaptive)))
        self._group_of = [gi for gi, g in enumerate(self._groups) for _ in g.indices]
        # The cosine between successive eps follows from norms only when eps ∝ d with one rho.
        one_rho = len({g.rho for g in self._groups}) == 1
        self._cosine = one_rho and all(g.geometry.eps_parallel_to_d for g in self._groups)

    def add_param_group(self, group: dict[str, Any], param_names: list[str] | None = None) -> None:
        """Add a param group after construction (`torch.optim.Optimizer.add_param_group`'s counterpart).

        Its tensors join the engine with the group's own "rho" and "adaptive" (else the engine's defaults), take
        part in the norm and are perturbed from the next `absorb_gradient` on, their d starting from their first
        gradient (like a parameter unfrozen mid-run). A state saved afterwards has the layout of an engine built over
        all the groups from the start.

        Args:
            group: `{"params": [...], "rho": ..., "adaptive": ...}` (a lone tensor is accepted as "params").
            param_names: one name per new tensor; required when the engine has names.

        Raises:
            RuntimeError: the weights are perturbed (call `restore()` first).
            ValueError: an invalid "rho"/"adaptive", a tensor the engine already has or one given twice, or names
                that do not fit.
        """
        if self.perturbed:
            raise RuntimeError("VASSO: add_param_group() called while the weights are perturbed; call restore().")
        (group,) = _as_groups([group])
        check_new_param_group(group["params"], self.params, param_names, self.param_names is not None)
        self._add_group(group)
        if param_names is not None:
            self.param_names.extend(param_names)
        self._reduction = ShardReduction(self.params, self.name)
        self.layout.reduction = self._reduction
        self.layout.sync()
        self._scales = None  # this step's adversary (if any) was computed without the new tensors

    @property
    def d(self) -> list[torch.Tensor | None]:
        """d per parameter (fp32, this rank's local shard), None for parameters outside the trainable set."""
        return self.layout.d

    @property
    def geometries(self) -> list[AdversaryGeometry]:
        """The adversary geometry of each param group, in group order."""
        return [g.geometry for g in self._groups]

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
        self.layout.sync()
        self._guard_pending = False
        grads = self.layout.gradients()
        inv = None if grad_scale is None else grad_scale.float().reciprocal()
        g_sq_seg = self._cohort_grad_sq(grads)
        finite = torch.isfinite(g_sq_seg.sum())
        previous = [(s.d_sq, s.initialized) for s in self.layout.segments]
        d_sq_seg, dots = self._fold_ema(grads, finite, inv)
        self.layout.set_d_sq(d_sq_seg)
        self._set_scales(finite, d_sq_seg.sum())
        self.step += 1
        self._record_step(g_sq_seg, d_sq_seg, previous, dots, inv, finite)

    @property
    def _cosine_needs_dots(self) -> bool:
        return self._cosine and self.theta == 1.0

    def _cohort_grad_sq(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """||g||² per cohort (fp32, summed over ranks), from one norm per tensor: the finiteness test reads g once."""
        position = self.layout.position
        present = [(k, g) for k, g in enumerate(grads) if g is not None]
        norms = _fp32_norms([g for _, g in present]) if present else []
        by_position = dict(zip((k for k, _ in present), norms))
        zero = torch.zeros((), device=self.layout.device)
        if self._reduction.several_classes(self.layout):  # each reduction class's sums through its own groups
            per_tensor = torch.stack([by_position.get(k, zero) for k in range(len(grads))]).square()
            return self._reduction.sum_tensors(per_tensor, self.layout)
        per_cohort = []
        for s in self.layout.segments:
            mine = [by_position[position[i]] for i in s.indices if position[i] in by_position]
            per_cohort.append(torch.stack(mine).square().sum() if mine else zero)
        return self._reduction.sum_cohorts(torch.stack(per_cohort), self.layout)

    def _fold_ema(
        self, grads: list[torch.Tensor | None], finite: torch.Tensor, inv: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """d <- (1 - theta) d + theta g per cohort; d <- g on a cohort's first finite step; d unchanged if g is not
        finite (decided on the device). Returns ||d||² per cohort and, for theta = 1, <g, d_{t-1}> per cohort (both
        summed over ranks).

        The gradient goes through the scratch space tile by tile (`FlatLayout.absorb_tiles`): copied in fp32 (p.grad
        is left as it is) and zeroed on a non-finite step, so that its product with take = 0 is 0 (0 * inf would be
        NaN) and d stays exactly itself; on finite steps the cleaning changes nothing.

        When the layout has several reduction classes (`ShardReduction.several_classes`), a tile may hold tensors of
        different classes: the sums are then formed per tensor (<g, d> per tile piece, ||d||² from one norm per
        tensor after the fold) and reduced class by class.
        """
        theta = self.theta
        per_class = self._reduction.several_classes(self.layout)
        segments = self.layout.segments
        factors = []
        for s in segments:
            # d*(1-theta) then d + theta*g: bit-identical to the official d.mul_(1-theta).add_(g, alpha=theta).
            # A first step uses keep=1, take=1 on d=0 (d <- g exactly); a non-finite step keep=1, take=0.
            keep = torch.where(finite & s.initialized, 1.0 - theta, 1.0)
            take = torch.where(finite, torch.where(s.initialized, theta, 1.0), 0.0)
            factors.append((keep, take if inv is None else take * inv))
        by_param = {i: g for i, g in zip(self.layout.active, grads)}
        d_norms: list[list[torch.Tensor]] = [[] for _ in segments]
        dots: list[list[torch.Tensor]] = [[] for _ in (self.layout.active if per_class else segments)]
        position = self.layout.position
        scratch = self.layout.scratch()
        nonfinite = ~finite
        for tile in self.layout.absorb_tiles():
            work = scratch[: tile.end - tile.start]
            d = self.layout.d_flat[tile.start : tile.end]
            self.layout.copy_gradient_into(tile, by_param)
            if self._cosine_needs_dots and per_class:
                offset = 0
                for i, a, b in tile.pieces:
                    piece = slice(offset, offset + b - a)
                    dots[position[i]].append(torch.dot(work[piece], d[piece]))
                    offset += b - a
            elif self._cosine_needs_dots:
                dots[tile.segment].append(torch.dot(work, d))
            # Zeros on a non-finite step (take = 0 then, and 0 * inf would be NaN); on a finite step it writes
            # nothing (the tile is still in the cache from the copy, so its loop costs about a copy in cache).
            _as_words(work).masked_fill_(nonfinite, 0)
            keep, take = factors[tile.segment]
            d.mul_(keep).addcmul_(work, take)
            if not per_class:
                d_norms[tile.segment].append(torch.linalg.vector_norm(d))
        for s in segments:
            s.initialized = s.initialized | finite
        zero = torch.zeros((), device=self.layout.device)
        if per_class:
            d_sq_seg = self._reduction.cohort_sq_norms(self.layout.d_flat, self.layout.active_d(), self.layout)
        else:
            d_sq = [torch.stack(n).square().sum() if len(n) > 1 else (n[0].square() if n else zero) for n in d_norms]
            d_sq_seg = self._reduction.sum_cohorts(torch.stack(d_sq), self.layout)
        if not self._cosine_needs_dots:
            return d_sq_seg, None
        dot_sums = torch.stack([sum(x, zero) for x in dots])
        if per_class:
            return d_sq_seg, self._reduction.sum_tensors(dot_sums, self.layout)
        return d_sq_seg, self._reduction.sum_cohorts(dot_sums, self.layout)

    def _set_scales(self, finite: torch.Tensor, d_sq: torch.Tensor) -> None:
        """This step's rho_group / ||.|| per active tensor: one global norm through the geometries, each group's rho;
        0 when the norm is not finite or its square is below fp32's smallest normal number (a norm under about
        1.1e-19: its square, rounded as a subnormal, would give ||eps|| far from rho)."""
        total_sq = d_sq if self._norm_is_d_norm() else self._geometry_sq_norm()
        norm = total_sq.sqrt()
        valid = finite & (total_sq >= torch.finfo(total_sq.dtype).tiny) & torch.isfinite(norm)
        group_scales = [torch.where(valid, g.rho / norm, 0.0) for g in self._groups]
        self._scales = [group_scales[self._group_of[i]] for i in self.layout.active]
        self._moved = valid if any(g.rho > 0 for g in self._groups) else torch.zeros_like(valid)

    def _norm_is_d_norm(self) -> bool:
        """Whether every group with active tensors normalises by ||d|| (the ||d||² at hand then serves), whatever the
        grouping: a run reaches the same norm by the same arithmetic when groups are added or unfrozen later."""
        if self._reuse_d_sq[0] != self.layout.version:
            active_groups = {self._group_of[i] for i in self.layout.active}
            reuse = all(self._groups[g].geometry.sq_norm_is_d_sq for g in active_groups)
            self._reuse_d_sq = (self.layout.version, reuse)
        return self._reuse_d_sq[1]

    def _geometry_sq_norm(self) -> torch.Tensor:
        """Σ over groups of the geometry's squared norm of the group's active tensors, summed over ranks (each
        reduction class of the layout through its own process groups)."""
        partials: dict[int, torch.Tensor] = {}
        for group in self._groups:
            active = [i for i in group.indices if self.d[i] is not None]
            for cls, indices in self._reduction.split(active).items():
                weights, d = [local(self.params[i]) for i in indices], [self.d[i] for i in indices]
                partials[cls] = partials.get(cls, 0.0) + _geometry_sq_norm_of(group.geometry, weights, d)
        return self._reduction.sum_over_ranks(partials)

    def _active_by_group(self) -> Iterable[tuple[list[torch.Tensor], list[torch.Tensor], _Group]]:
        """(local weights, d, group) of each group with active parameters."""
        for group in self._groups:
            active = [i for i in group.indices if self.d[i] is not None]
            if active:
                yield [local(self.params[i]) for i in active], [self.d[i] for i in active], group

    def _record_step(self, g_sq_seg, d_sq_seg, previous, dots, inv, finite) -> None:
        """Add this step's gradient norm, ||d||, cosine and finiteness to the metric window, by name."""
        g_norm = g_sq_seg.sum().sqrt()
        grad_norm = g_norm if inv is None else g_norm * inv
        has_d = torch.stack([s.initialized for s in self.layout.segments]).any()
        cos, cos_valid = self._cosine_stats(g_sq_seg, d_sq_seg, previous, dots, inv, finite)
        self._window.add(
            steps=1.0,
            grad_norm=torch.where(finite, grad_norm, 0.0),
            d_norm=torch.where(has_d, d_sq_seg.sum().sqrt(), 0.0),
            d_count=has_d.float(),
            cos=cos,
            cos_count=cos_valid.float(),
            nonfinite=(~finite).float(),
        )  # "moved" is added by perturb(): only steps that perturb can move the weights

    def _cosine_stats(self, g_sq_seg, d_sq_seg, previous, dots, inv, finite):
        """cos(d_t, d_{t-1}) without keeping d_{t-1}: <d_t, d_{t-1}> follows from squared norms for theta < 1,
        (||d_t||² + (1-θ)²||d_{t-1}||² - θ²||g||²) / (2(1-θ)), and from <g, d_{t-1}> for theta = 1. A cohort on its
        first step had no d_{t-1} and contributes 0. Absent (count 0) when eps is not ∝ d (ASAM, per-group rho)."""
        if not self._cosine:
            return torch.zeros_like(finite, dtype=torch.float32), torch.zeros_like(finite)
        theta = self.theta
        inv_sq = 1.0 if inv is None else inv * inv
        inner = torch.zeros((), device=self.layout.device)
        for i, (d_sq_prev, was_initialized) in enumerate(previous):
            if theta == 1.0:
                term = dots[i] * (1.0 if inv is None else inv)
            else:
                term = d_sq_seg[i] + (1 - theta) ** 2 * d_sq_prev - theta**2 * g_sq_seg[i] * inv_sq
                term = term / (2 * (1 - theta))
            inner = inner + torch.where(was_initialized, term, 0.0)
        denom = d_sq_seg.sum().sqrt() * torch.stack([p for p, _ in previous]).sum().sqrt()
        valid = finite & (denom > 0)
        return torch.where(valid, inner / denom, 0.0).clamp(-1.0, 1.0), valid

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
        torch._foreach_copy_(self.layout.saved_views(), self.layout.active_weights())
        self.perturbed = True
        if len(self._groups) == 1:
            weights = self.layout.active_weights()
            _perturb(self._groups[0].geometry, weights, self.layout.active_d(), self._scales)
        else:
            position = self.layout.position
            for weights, d, group in self._active_by_group():
                scales = [self._scales[position[i]] for i in group.indices if self.d[i] is not None]
                _perturb(group.geometry, weights, d, scales)
        for i in self.layout.active:
            self.params[i].grad = None
        self._window.add(moved=self._moved.float())
        self._guard_pending = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by `perturb()`, bit for bit (x + eps - eps is not x in floating point).

        A no-op when the weights are not perturbed, so it can sit in a `finally`.
        """
        if not self.perturbed:
            return
        torch._foreach_copy_(self.layout.active_weights(), self.layout.saved_views())
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
        grads = [local(self.params[i].grad) for i in self.layout.active if self.params[i].grad is not None]
        if grads:
            sq = torch.stack(_fp32_norms(grads)).square().sum()
        else:
            sq = torch.zeros((), device=self.layout.device)
        finite = torch.isfinite(self._reduction.sum_everywhere(sq))
        if grad_scale is None:
            nonfinite = ~finite
            for g in grads:
                _as_words(g).masked_fill_(nonfinite, 0)
        self._window.add(guarded=1.0, perturbed_nonfinite=(~finite).float())

    def record_losses(self, clean_loss: torch.Tensor | None, perturbed_loss: torch.Tensor | None) -> None:
        """Add this step's loss before and after the perturbation (device tensors) to the metric window.

        Counted only on steps whose weights really moved, with finite losses. `clean_loss=None` records the
        perturbed loss alone (no sharpness), as the wrapper's closure form does.
        """
        if perturbed_loss is None:
            return
        perturbed = perturbed_loss.detach().float().reshape(())
        ok = self._moved & torch.isfinite(perturbed)
        self._window.add(perturbed_loss=torch.where(ok, perturbed, 0.0), perturbed_count=ok.float())
        if clean_loss is not None:
            clean = clean_loss.detach().float().reshape(())
            ok = ok & torch.isfinite(clean)
            self._window.add(sharpness=torch.where(ok, perturbed - clean, 0.0), sharpness_count=ok.float())

    # ------------------------------------------------------------------ metrics and state

    def pop_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Averages over the steps since the last call, as `vasso/*` floats; the one host sync of the window.

        A metric is absent when nothing in the window measured it (see the README's "Logged metrics").

        Args:
            reduce: averages the window over processes first, e.g. `lambda t: accelerator.reduce(t, "mean")`.
        """
        return self._window.pop(reduce)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (the coin stream is a function of the step).

        `format` is `STATE_FORMAT`; `d` holds one fp32 tensor per parameter (this rank's shard; None for parameters
        without d), `segments` the flat layout and which cohorts have seen their first gradient; one host sync (a
        save is not on the hot path).

        Raises:
            RuntimeError: the weights are perturbed.
        """
        return save_state(self)

    def validate_state_dict(self, state: Any, expected_step: int | None = None) -> None:
        """Check a saved state against this run before anything is loaded; one host sync (the finiteness check).

        Raises:
            ValueError: unknown or old format, other parameters (count, names, shapes), a step that is not
                `expected_step`, or non-finite values; the message says what is wrong.
        """
        validate_state(self, state, expected_step)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], expected_step: int | None = None) -> None:
        """Validate (`validate_state_dict`), then load. Changed hyperparameters are allowed and logged as warnings.

        Raises:
            ValueError: see `validate_state_dict`; nothing is loaded then.
            RuntimeError: the weights are perturbed.
        """
        load_state(self, state, expected_step)

    def hyperparameters(self) -> dict[str, Any]:
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

    @property
    def _d_sq(self) -> torch.Tensor:
        """||d||² over all cohorts (summed over ranks), as of the last step or load."""
        return torch.stack([s.d_sq for s in self.layout.segments]).sum()

    def state_bytes(self) -> int:
        """Bytes VASSO keeps beside the model: d (fp32) and the saved weights (in their own dtype): 2.0x the trainable
        bytes for fp32 weights, 3.0x for bf16."""
        return self.layout.state_bytes()

    def name(self, i: int) -> str:
        """Parameter `i`'s name for messages."""
        return self.param_names[i] if self.param_names else f"parameter #{i}"


# Tensors below this many elements are moved by a mixed-dtype op directly: there the per-op overhead outweighs the
# mixed op's slower loop, and staging would add ops (LoRA adapters are all this small).
_STAGE_FROM = 1 << 16


def _perturb(
    geometry: AdversaryGeometry, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]
) -> None:
    """`geometry.perturb_` on weights of any dtype, with at most the largest tensor's fp32 bytes of temporaries and,
    on large tensors, no mixed-dtype arithmetic (on a CPU a mixed bf16/fp32 op runs element by element, several times
    slower, and allocates an fp32 copy of its low-precision operand besides its result):
    - fp32 weights: the geometry works on them directly (its own temporaries are one tensor at a time).
    - small low-precision tensors (fewer than `_STAGE_FROM` elements): directly, where per-op overhead outweighs the
      mixed op's slower loop; a mixed-dtype op computes w + ε in fp32 and rounds once. Its two fp32 temporaries of
      the tensor must fit in the largest: under ε ∝ d (`eps_parallel_to_d`) only tensors of at most half the largest
      go this way; otherwise (ASAM) every small tensor does, in flat pieces of at most half the largest (`_split`).
    - large bf16 weights under ε ∝ d: moved by d rounded to bf16 in a scratch of the largest tensor's fp32 bytes,
      w + scale·d computed in fp32 inside the op and rounded once. Rounding d first changes ε by at most 2^-9 of
      itself, far below the rounding of w + ε to bf16; bf16 has fp32's range, so no component is lost.
    - other large low-precision weights (fp16 ones, whose range would lose small d; all of them under ASAM): in fp32
      copies of pieces of at most half the largest tensor (`_fp32_pieces`), moved and copied back, so that the
      pieces and the geometry's temporary of one piece fit within one fp32 tensor of the largest.
    """
    largest, direct, small, d_staged, in_pieces = _route(geometry, weights)
    if len(direct) == len(weights):
        geometry.perturb_(weights, d, scales)
        return
    if direct:
        geometry.perturb_([weights[k] for k in direct], [d[k] for k in direct], [scales[k] for k in direct])
    if small:
        owners, w_parts, d_parts = _split([weights[k] for k in small], [d[k] for k in small], largest // 2)
        geometry.perturb_(w_parts, d_parts, [scales[small[j]] for j in owners])
    for batch, views in _staging_batches([d[k] for k in d_staged], torch.bfloat16, 2 * largest):
        torch._foreach_copy_(views, [d[d_staged[j]] for j in batch])
        ks = [d_staged[j] for j in batch]
        geometry.perturb_([weights[k] for k in ks], views, [scales[k] for k in ks])
    pieces = _fp32_pieces([weights[k] for k in in_pieces], [d[k] for k in in_pieces], largest // 2)
    for owners, w32, w_parts, d_parts in pieces:
        geometry.perturb_(w32, d_parts, [scales[in_pieces[j]] for j in owners])
        torch._foreach_copy_(w_parts, w32)


def _route(geometry: AdversaryGeometry, weights: list[torch.Tensor]) -> tuple[int, list, list, list, list]:
    """`(largest, direct, small, d_staged, in_pieces)`: the largest tensor's element count and the indices of the
    tensors each way of `_perturb` takes (its docstring says why), decided once for the move and the norm."""
    largest = max((w.numel() for w in weights), default=0)
    direct, small, d_staged, in_pieces = [], [], [], []
    for k, w in enumerate(weights):
        if w.dtype == torch.float32:
            direct.append(k)
        elif w.numel() < _STAGE_FROM and not geometry.eps_parallel_to_d:
            small.append(k)
        elif w.numel() < _STAGE_FROM and 2 * w.numel() <= largest:
            direct.append(k)
        elif w.dtype == torch.bfloat16 and geometry.eps_parallel_to_d:
            d_staged.append(k)
        else:
            in_pieces.append(k)
    return largest, direct, small, d_staged, in_pieces


def _geometry_sq_norm_of(
    geometry: AdversaryGeometry, weights: list[torch.Tensor], d: list[torch.Tensor]
) -> torch.Tensor:
    """`geometry.sq_norm(weights, d)` with temporaries of at most the largest tensor in fp32, the tensors routed as
    in `_perturb` (`_route`), except that d is never rounded for a norm: the tensors it would stage go through fp32
    copies of pieces, as the large ones under ASAM do."""
    if geometry.sq_norm_is_d_sq or all(w.dtype == torch.float32 for w in weights):  # ‖d‖² reads no weight
        return geometry.sq_norm(weights, d)
    largest, direct, small, d_staged, in_pieces = _route(geometry, weights)
    parts = []
    if direct:
        parts.append(geometry.sq_norm([weights[k] for k in direct], [d[k] for k in direct]))
    if small:
        _, w_parts, d_parts = _split([weights[k] for k in small], [d[k] for k in small], largest // 2)
        parts.append(geometry.sq_norm(w_parts, d_parts))
    large = d_staged + in_pieces
    for _, w32, _, d_parts in _fp32_pieces([weights[k] for k in large], [d[k] for k in large], largest // 2):
        parts.append(geometry.sq_norm(w32, d_parts))
    return torch.stack(parts).sum()


def _split(
    weights: list[torch.Tensor], d: list[torch.Tensor], capacity: int
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """`(owners, w_parts, d_parts)`: each tensor whole, or (when it has more than `capacity` elements and is
    contiguous) cut into flat views of at most `capacity`; `w_parts[j]` and `d_parts[j]` are the same piece of
    `weights[owners[j]]` and its d. The geometries are elementwise (`AdversaryGeometry`), so their work on the
    pieces is their work on the tensors."""
    owners, w_parts, d_parts = [], [], []
    capacity = max(capacity, 1)
    for k, (w, dk) in enumerate(zip(weights, d)):
        n = w.numel()
        if n <= capacity or not w.is_contiguous():
            owners.append(k)
            w_parts.append(w)
            d_parts.append(dk)
            continue
        flat_w, flat_d = w.view(-1), dk.view(-1)
        for a in range(0, n, capacity):
            owners.append(k)
            w_parts.append(flat_w[a : a + capacity])
            d_parts.append(flat_d[a : a + capacity])
    return owners, w_parts, d_parts


def _fp32_pieces(
    weights: list[torch.Tensor], d: list[torch.Tensor], capacity: int
) -> Iterable[tuple[list[int], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """The weights' pieces (`_split`) as fp32 copies, a scratch of `capacity` elements at a time: batches of
    `(owners, w32, w_parts, d_parts)`, `w32[j]` an fp32 copy of `w_parts[j]`."""
    owners, w_parts, d_parts = _split(weights, d, capacity)
    for batch, views in _staging_batches(w_parts, torch.float32, capacity):
        batch_parts = [w_parts[j] for j in batch]
        torch._foreach_copy_(views, batch_parts)
        yield [owners[j] for j in batch], views, batch_parts, [d_parts[j] for j in batch]


def _staging_batches(
    tensors: list[torch.Tensor], dtype: torch.dtype, capacity: int
) -> Iterable[tuple[list[int], list[torch.Tensor]]]:
    """`(indices, views)` batches of `tensors` that fit one scratch tensor of `dtype` and `capacity` elements (at
    least the largest of them): `views[j]` is shaped like `tensors[indices[j]]`, laid end to end in the scratch."""
    if not tensors:
        return
    capacity = max(capacity, max(t.numel() for t in tensors))
    scratch = torch.empty(capacity, dtype=dtype, device=tensors[0].device)
    batch: list[int] = []
    used = 0
    for k in list(range(len(tensors))) + [None]:
        if k is None or used + tensors[k].numel() > scratch.numel():
            views, offset = [], 0
            for j in batch:
                views.append(scratch[offset : offset + tensors[j].numel()].view(tensors[j].shape))
                offset += tensors[j].numel()
            if batch:
                yield batch, views
            batch, used = [], 0
        if k is not None:
            batch.append(k)
            used += tensors[k].numel()


def _fp32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor as an fp32 0-d tensor, accumulated in fp32 whatever the dtype.

    Reductions over bf16 accumulate in fp32 on every device; asking for an fp32 result of a bf16 tensor on a CPU
    takes a cast path about 20x slower than the norm itself, so there the norm of a bf16 tensor is returned in bf16
    (3 significant digits; bf16 overflows where fp32 does, so finiteness is unchanged) and widened. fp16 (whose
    range a loss-scaled norm exceeds) and every GPU tensor take the fp32 result directly.
    """
    dtypes = {t.dtype for t in tensors}
    if tensors[0].device.type == "cpu" and torch.bfloat16 in dtypes and dtypes <= {torch.bfloat16, torch.float32}:
        return list(torch.stack(torch._foreach_norm(tensors, 2)).float().unbind())  # one cast, not one per tensor
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))


_WORDS_FROM_BYTES = 1 << 16


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as 16-byte (or 8-byte) elements where its layout allows it, else `t`.

    `masked_fill_` with a one-element mask writes only where the mask is set, so on a finite step its whole cost is
    its loop over the elements: over 16-byte words that loop is 4x (fp32) to 8x (bf16) shorter. Zero bits are +0.0.
    Small tensors stay as they are: there the two view ops would cost more than the loop they shorten.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < _WORDS_FROM_BYTES or not t.is_contiguous():
        return t
    flat = t.view(-1)
    for dtype, size in ((torch.complex128, 16), (torch.int64, 8)):
        if nbytes % size == 0 and (t.storage_offset() * t.element_size()) % size == 0:
            return flat.view(dtype)
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
