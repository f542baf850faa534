"""The VASSO update, written once and used by both `VassoTrainer` and the `VASSO` optimizer wrapper.

VASSO: "Enhancing Sharpness-Aware Optimization Through Variance Suppression" (Li & Giannakis, NeurIPS 2023,
arXiv 2309.15639; extended version with eVASSO, arXiv 2509.02433). One optimizer step t, for the parameters that
the optimizer steps and that require gradients at that step (the full specification is `docs/algorithm.md`):

    g_t  = gradient of the step's loss at x_t                     (pass 1, already in `p.grad`)
    d_t  = g_t on a parameter's first step, else (1 - theta) d_{t-1} + theta g_t
    eps  = the adversary geometry applied to d_t (`adversary.py`: rho d / ||d||, or ASAM's rho |w|²d / || |w| d ||)
    h_t  = gradient at x_t + eps                                  (pass 2, run by the caller)
    x_t is restored by copy, a non-finite h_t is kept from the weights, then the base optimizer steps with h_t.

`VassoUpdate` owns d, the step count and the saved weights (`layout.py`). It never runs a forward or backward pass and
never synchronises host and device on the training path: every decision that depends on a tensor value (a
non-finite gradient, a zero norm, a parameter's first step) is a `torch.where` on the device. Its work is shaped for
accelerators: per bucket of one device and dtype (`layout.Bucket`) it dispatches a fixed number of foreach calls,
plus at most three ops per tensor, whatever the tensors' sizes.

ρ and the adversary geometry are read from the param groups at every step, as torch optimizers read `lr`: a group's
own value (`group[rho_key]`, `group["adversary"]`) or else the engine's default (`rho`, `adversary`, which the
caller may change between steps). Given an optimizer, the engine follows its live `param_groups`: a group added to
it later (through any handle) joins at the next step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import state as state_file
from .adversary import AdversaryGeometry, geometry, resolve_adversary
from .layout import Cohort, Layout
from .metrics import MetricWindow, consecutive_cosine, dots_with_d
from .ops import casts_in_kernel, ema_, sq_norm, words
from .rules import (
    check_adversary_prob,
    check_hyperparameters,
    check_param_names,
    check_rho,
    check_seed,
    check_theta,
    checked_attribute,
    refuse_repeated_tensors,
)
from .sharding import ShardReduction, local

__all__ = ["VassoUpdate", "adversary_coin", "group_keys"]


def adversary_coin(seed: int, step: int, adversary_prob: float) -> bool:
    """The eVASSO coin of optimizer step `step` (0-based): a pure function of (seed, step, p).

    Identical on every rank (no communication) and after a resume; p >= 1 is always True, p <= 0 always False.
    """
    if adversary_prob >= 1.0:
        return True
    if adversary_prob <= 0.0:
        return False
    return random.Random(f"hf_vasso:{seed}:{step}").random() < adversary_prob


def group_keys(optimizer: Any) -> dict[str, str]:
    """The param-group keys VASSO reads for ρ and the geometry: "rho", "adversary" and "adaptive", each prefixed with
    "vasso_" where the optimizer uses that key itself (`torch.optim.Adadelta` and pytorch_optimizer's `AdaDelta`
    keep their decay under "rho")."""
    defaults = getattr(optimizer, "defaults", None) or {}
    return {key: f"vasso_{key}" if key in defaults else key for key in ("rho", "adversary", "adaptive")}


class VassoUpdate:
    """The VASSO state (d, step count, saved weights) and the operations on it; the engine behind both front ends.

    Paper: arXiv 2309.15639 (VASSO) and 2509.02433 (eVASSO). The caller runs the passes; this class does what
    happens between them:

        update = VassoUpdate(optimizer, rho=0.05, theta=0.4)
        adversary = update.is_adversary_step()     # this step's eVASSO coin, from (seed, step): no communication
        ...pass 1 backward...
        update.absorb_gradient(grad_scale, adversary)  # d <- EMA with the pass-1 gradient, eps from d; step += 1
        if adversary:
            update.perturb()                       # save x, x <- x + eps, clear grads
            try: ...pass 2 backward...
            finally: update.restore()              # x <- saved copy, bit for bit
            update.guard_perturbed_gradient(grad_scale)   # a non-finite pass-2 gradient never reaches the weights
        ...base optimizer step...

    Each step works on exactly the parameters of the groups that have `requires_grad=True` at that step (checked on
    the host; an unchanged set costs one pass over the flags). A frozen parameter is neither perturbed nor part of
    the norm, and its d is dropped; a parameter that becomes trainable starts its d from its first gradient.

    Args:
        params: a `torch.optim.Optimizer` (the engine follows its live param groups), tensors, or param-group dicts
            `{"params": [...], "rho": ..., "adversary": ...}` (keys as `group_keys` names them).
        rho (`float`): perturbation radius, >= 0, for groups without their own ρ; may be changed between steps.
        theta (`float`): weight of the newest gradient in d, in (0, 1]; 1.0 is SAM.
        adversary_prob (`float`): probability of an adversary step, in [0, 1]; below 1 is eVASSO.
        seed (`int`): seed of the eVASSO coins (42 is the Trainer's default seed).
        adversary (`str`): the geometry of groups without their own, a name in `adversary.GEOMETRIES` ("vasso",
            "asam"); `adaptive=True` is an alias of "asam".
        param_names: one name per tensor (a list, for the tensors given now), or a function of a tensor (also names
            tensors of groups added later); saved with the state and checked when it is loaded.

    Raises:
        ValueError: a hyperparameter is invalid, no tensor requires a gradient, a tensor is given more than once or
            shares memory with another, or `param_names` has the wrong length.
        NotImplementedError: the trainable parameters live on several devices, or a DTensor parameter is placed
            neither sharded nor replicated on a mesh dimension (e.g. `Partial`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | torch.optim.Optimizer,
        *,
        rho: float,
        theta: float,
        adversary_prob: float = 1.0,
        seed: int = 42,
        adversary: str | None = None,
        adaptive: bool | None = None,
        param_names: list[str] | Callable[[torch.Tensor], str] | None = None,
    ) -> None:
        self.rho, self.theta, self.adversary_prob = check_hyperparameters(rho, theta, adversary_prob)
        self.seed = check_seed(seed)
        self.adversary = resolve_adversary(adversary, adaptive)
        if isinstance(params, torch.optim.Optimizer):
            self._optimizer, self._own_groups, self.keys = params, None, group_keys(params)
        else:
            self._optimizer, self._own_groups, self.keys = None, _as_groups(params), group_keys(None)
        self._names_of = param_names if callable(param_names) else None
        self.params: list[torch.Tensor] = []
        self.param_names: list[str] | None = None if param_names is None or callable(param_names) else []
        self._group_of: list[int] = []
        self._signature: list[int] = []  # id of every tensor, in group order
        self._group_sizes: list[int] = []
        self._sync_groups(list(param_names) if isinstance(param_names, (list, tuple)) else None)
        self.step = 0
        self.perturbed = False
        self._window = MetricWindow(self.layout.device)
        self._scales: dict[int, torch.Tensor] | None = None  # this step's ρ_group / ‖.‖ by group index
        self._moved = torch.zeros((), dtype=torch.bool, device=self.layout.device)
        self._guard_pending = False

    # The defaults of groups without their own, changeable between steps and checked where they are set.
    rho = checked_attribute("rho", check_rho, "ρ, >= 0 (a ρ schedule may change it between steps).")
    theta = checked_attribute("theta", check_theta, "θ, the weight of the newest gradient in d, in (0, 1].")
    adversary_prob = checked_attribute("adversary_prob", check_adversary_prob, "p, the adversary-step probability.")
    adversary = checked_attribute("adversary", resolve_adversary, 'The geometry: a name or alias ("sam", ...).')

    # ------------------------------------------------------------------ the parameters and their groups

    def groups(self) -> list[dict[str, Any]]:
        """The param groups as of now: the optimizer's live `param_groups`, or the engine's own."""
        return self._optimizer.param_groups if self._optimizer is not None else self._own_groups

    def add_param_group(self, group: dict[str, Any], param_names: list[str] | None = None) -> None:
        """Add a param group to an engine built over tensors or groups (`torch.optim.Optimizer.add_param_group`'s
        counterpart; an engine built over an optimizer follows that optimizer's groups instead). Its tensors are
        perturbed from the next `absorb_gradient` on, their d starting from their first gradient.

        Raises:
            RuntimeError: the weights are perturbed, or the engine follows an optimizer.
            ValueError: an invalid ρ or geometry, a tensor the engine already has or one given twice, names that do
                not fit.
        """
        if self._optimizer is not None:
            raise RuntimeError("This engine follows an optimizer's param groups: add the group to the optimizer.")
        if self.perturbed:
            raise RuntimeError("VASSO: add_param_group() called while the weights are perturbed; call restore().")
        (new,) = _as_groups([group])
        self._check_group(new, len(self._own_groups))
        self._own_groups.append(new)
        try:
            self._sync_groups(param_names)
        except Exception:
            self._own_groups.pop()
            raise

    def _sync_groups(self, new_names: list[str] | None = None) -> None:
        """Follow the groups: tensors appended by new groups join (their names from `new_names` or the naming
        function), everything else must be as before. Host-side only; rebuilds the layout when something changed."""
        groups = self.groups()
        ids = [id(p) for g in groups for p in g["params"]]
        sizes = [len(g["params"]) for g in groups]
        if ids == self._signature and sizes == self._group_sizes:  # the dicts may be new (a loaded optimizer)
            return
        known = len(self._signature)
        if ids[:known] != self._signature:
            raise RuntimeError(
                "VASSO: the optimizer's param groups lost or reordered parameters VASSO was built over; torch "
                "optimizers only add groups (add_param_group). Build a new VASSO (and optimizer) instead."
            )
        new = [p for g in groups for p in g["params"]][known:]
        refuse_repeated_tensors(self.params + new, "the parameters")
        for k, g in enumerate(groups):
            self._check_group(g, k)
        if self.param_names is not None and new:
            check_param_names(new_names, len(new), required=True)
            self.param_names.extend(new_names)
        self.params.extend(new)
        self._group_of = [k for k, g in enumerate(groups) for _ in g["params"]]  # a tensor moved between groups too
        self._signature, self._group_sizes = ids, sizes
        self._reduction = ShardReduction(self.params, self.name)
        if known == 0:
            self.layout = Layout(self.params, self._reduction, self.name)
        else:
            self.layout.reduction = self._reduction
        self.layout.sync(self._group_of)
        self._scales = None  # this step's adversary (if any) was computed without the new tensors

    def _check_group(self, group: dict[str, Any], k: int) -> None:
        for key, ours in self.keys.items():
            if ours == key and f"vasso_{key}" in group:
                raise ValueError(
                    f"param group {k} has {f'vasso_{key}'!r}, which VASSO reads only where the base optimizer uses "
                    f"{key!r} itself (torch.optim.Adadelta's decay): this optimizer does not, so give the group "
                    f"{key!r} instead."
                )
        if self.keys["rho"] in group:
            check_rho(group[self.keys["rho"]], f"param group {k}'s {self.keys['rho']!r}")
        self._adversary_of(group)

    def _rho_of(self, group: dict[str, Any]) -> float:
        return group[self.keys["rho"]] if self.keys["rho"] in group else self.rho

    def _adversary_of(self, group: dict[str, Any]) -> str:
        adversary, adaptive = group.get(self.keys["adversary"]), group.get(self.keys["adaptive"])
        if adversary is None and adaptive is None:
            return self.adversary
        return resolve_adversary(adversary, adaptive)

    @property
    def d(self) -> list[torch.Tensor | None]:
        """d per parameter (fp32, this rank's local shard), None for parameters outside the trainable set."""
        return self.layout.d

    @property
    def d_sq(self) -> torch.Tensor:
        """‖d‖² over every parameter with d (summed over ranks, each element once), as of the last step or load: a
        0-d fp32 device tensor (reading it syncs)."""
        return torch.stack([c.d_sq for c in self.layout.cohorts]).sum()

    @property
    def geometries(self) -> list[AdversaryGeometry]:
        """The adversary geometry of each param group, in group order, as of now."""
        return [geometry(self._adversary_of(g)) for g in self.groups()]

    # ------------------------------------------------------------------ the step

    def is_adversary_step(self, step: int | None = None) -> bool:
        """This step's eVASSO coin (default: the step about to run): a pure function of (seed, step).

        Identical on every rank and after a resume; `module.adversary_coin` is the same function.
        """
        return adversary_coin(self.seed, self.step if step is None else step, self.adversary_prob)

    @torch.no_grad()
    def absorb_gradient(self, grad_scale: torch.Tensor | None = None, perturbing: bool | None = None) -> None:
        """Fold the pass-1 gradient into d and compute this step's adversary; advance the step count.

        A non-finite gradient (any precision) leaves d untouched and this step unperturbed, decided on the device
        and counted in `vasso/nonfinite_fraction`; without a loss scaler it is replaced by zeros in `.grad`.

        Args:
            grad_scale: the loss scale the gradients carry (fp16 with a GradScaler, a device tensor), or None.
            perturbing: whether `perturb()` follows (the default: this step's coin). A non-finite pass-1 gradient
                is zeroed in place (the base step of a step without adversary then sees zeros), except on a step
                without adversary under a loss scaler, which gets the gradient as it was and skips the step.

        Raises:
            RuntimeError: the weights are still perturbed (call `restore()` first).
            ValueError: ρ or a param group is invalid now, or a trainable parameter has a sparse gradient.
        """
        if self.perturbed:
            raise RuntimeError("VASSO: absorb_gradient() called while the weights are perturbed; call restore().")
        self._sync_groups()
        self.layout.sync(self._group_of)
        self._window.to(self.layout.device)  # the model may have moved since the last step
        rhos, names = self._read_groups()  # before d changes: an invalid value is refused with nothing done
        perturbing = self.is_adversary_step() if perturbing is None else perturbing
        self._guard_pending = False
        inv = None if grad_scale is None else grad_scale.float().reciprocal()
        grads = [self.layout.gradients(b) for b in self.layout.buckets]
        g_sq = self.layout.cohort_sums([sq_norm(g, self.layout.device) for g in grads])
        finite = torch.isfinite(g_sq.sum())
        previous = [(c.d_sq, c.initialized) for c in self.layout.cohorts]
        dots = dots_with_d(self.layout, grads) if self._cosine() and self.theta == 1.0 else None
        # A non-finite g never reaches a base step: zeroed in place, or kept for the scaler to skip that step.
        self._fold_ema(grads, finite, inv, in_place=perturbing or grad_scale is None)
        d_sq = self.layout.cohort_sums([torch.linalg.vector_norm(b.d_flat).square() for b in self.layout.buckets])
        for c, value in zip(self.layout.cohorts, d_sq):
            c.d_sq = value
        self._set_scales(finite, d_sq, rhos, names)
        self.step += 1
        self._record_step(g_sq, d_sq, previous, dots, inv, finite)

    def _fold_ema(self, grads: list[list], finite: torch.Tensor, inv: torch.Tensor | None, in_place: bool) -> None:
        """d <- (1 - θ) d + θ g per cohort; d <- g on a cohort's first finite step; d unchanged if g is not finite
        (decided on the device). A non-finite gradient is zeroed first (take = 0 then, and 0 * inf would be NaN): in
        place (`in_place`), else through the saved-weights buffer, so that a loss scaler still sees the gradient of
        a step without adversary as it was."""
        nonfinite = ~finite
        for bucket, bucket_grads in zip(self.layout.buckets, grads):
            c = self.layout.cohorts[bucket.cohort]
            keep = torch.where(finite & c.initialized, 1.0 - self.theta, 1.0)
            take = torch.where(finite, torch.where(c.initialized, self.theta, 1.0), 0.0)
            take = take if inv is None else take * inv
            d = [di for di, g in zip(bucket.d, bucket_grads) if g is not None]
            g = [g for g in bucket_grads if g is not None]
            if g and not in_place:
                staged = [s for s, gi in zip(self.layout.saved(bucket), bucket_grads) if gi is not None]
                torch._foreach_copy_(staged, g)
                g = staged
            for gi in g:  # writes nothing on a finite step
                words(gi).masked_fill_(nonfinite, 0)
            if bucket.dtype == torch.float32 or casts_in_kernel(bucket.d_flat):
                ema_(d, g, keep, take, inv is None and bucket.dtype == torch.float32)
            else:  # low precision on a CPU, where a mixed-dtype op is several times slower: fp32 copies, one at a time
                for di, gi in zip(d, g):
                    ema_([di], [gi.float()], keep, take, inv is None)
            missing = [di for di, gi in zip(bucket.d, bucket_grads) if gi is None]
            if missing:  # no gradient this step: g = 0, so d <- keep·d (also what lerp gives)
                torch._foreach_mul_(missing, keep)
        for c in self.layout.cohorts:
            c.initialized = c.initialized | finite

    def _read_groups(self) -> tuple[dict[int, float], dict[int, str]]:
        """This step's ρ and geometry name of each active group, as the groups say now, checked.

        Raises:
            ValueError: a group's ρ or geometry is invalid; the message names the group.
        """
        groups = self.groups()
        active = sorted({b.group for b in self.layout.buckets})
        rhos = {k: check_rho(self._rho_of(groups[k]), f"param group {k}'s {self.keys['rho']!r}") for k in active}
        names = {}
        for k in active:
            try:
                names[k] = self._adversary_of(groups[k])
            except ValueError as error:
                raise ValueError(f"param group {k}: {error}") from error
        return rhos, names

    def _set_scales(self, finite: torch.Tensor, d_sq: torch.Tensor, rhos: dict, names: dict) -> None:
        """This step's ρ_group / ‖.‖ per group (`rhos`, `names`: `_read_groups`): one global norm through the
        geometries; 0 when the norm is not finite or its square is below fp32's smallest normal number (a norm under
        about 1.1e-19: its square, rounded as a subnormal, would give ‖ε‖ far from ρ)."""
        active = sorted(rhos)
        if all(geometry(n).sq_norm_is_d_sq for n in names.values()):
            total_sq = d_sq.sum()
        else:
            parts = [
                torch.linalg.vector_norm(b.d_flat).square()
                if geometry(names[b.group]).sq_norm_is_d_sq
                else geometry(names[b.group]).sq_norm(self.layout.weights(b), b.d)
                for b in self.layout.buckets
            ]
            total_sq = self.layout.cohort_sums(parts).sum()
        norm = total_sq.sqrt()
        valid = finite & (total_sq >= torch.finfo(total_sq.dtype).tiny) & torch.isfinite(norm)
        self._scales = {k: torch.where(valid, rhos[k] / norm, 0.0) for k in active}
        self._geometry_names = names
        self._moved = valid if any(r > 0 for r in rhos.values()) else torch.zeros_like(valid)

    def _cosine(self) -> bool:
        """Whether cos(ε_t, ε_{t-1}) follows from norms of d: ε ∝ d with one ρ for every active group."""
        groups = self.groups()
        active = {b.group for b in self.layout.buckets}
        one_rho = len({self._rho_of(groups[k]) for k in active}) == 1
        return one_rho and all(geometry(self._adversary_of(groups[k])).eps_parallel_to_d for k in active)

    def _record_step(self, g_sq, d_sq, previous, dots, inv, finite) -> None:
        """Add this step's gradient norm, ‖d‖, cosine and finiteness to the metric window, by name."""
        grad_norm = g_sq.sum().sqrt() if inv is None else g_sq.sum().sqrt() * inv
        has_d = torch.stack([c.initialized for c in self.layout.cohorts]).any()
        if self._cosine():
            cos, cos_valid = consecutive_cosine(self.theta, g_sq, d_sq, previous, dots, inv, finite)
        else:  # absent (count 0) when ε is not ∝ d (ASAM, per-group ρ)
            cos, cos_valid = torch.zeros_like(finite, dtype=torch.float32), torch.zeros_like(finite)
        self._window.add(
            steps=1.0,
            grad_norm=torch.where(finite, grad_norm, 0.0),
            d_norm=torch.where(has_d, d_sq.sum().sqrt(), 0.0),
            d_count=has_d.float(),
            cos=cos,
            cos_count=cos_valid.float(),
            nonfinite=(~finite).float(),
        )  # "moved" is added by perturb(): only steps that perturb can move the weights

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
        for b in self.layout.buckets:
            torch._foreach_copy_(self.layout.saved(b), self.layout.weights(b))
        self.perturbed = True
        for b in self.layout.buckets:
            geometry(self._geometry_names[b.group]).perturb_(self.layout.weights(b), b.d, self._scales[b.group])
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
        for b in self.layout.buckets:
            torch._foreach_copy_(self.layout.weights(b), b.saved)
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
        grads = [[g for g in self.layout.gradients(b) if g is not None] for b in self.layout.buckets]
        sq = torch.stack([sq_norm(g, self.layout.device) for g in grads]).sum()
        finite = torch.isfinite(self._reduction.sum_everywhere(sq))
        if grad_scale is None:
            nonfinite = ~finite
            for g in (g for bucket in grads for g in bucket):
                words(g).masked_fill_(nonfinite, 0)
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

    def __getstate__(self) -> dict[str, Any]:
        if self.perturbed:
            raise RuntimeError("VASSO copied or pickled while the weights are perturbed; call restore() first.")
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (deepcopy, pickle) has new tensors in the same order: the signature of ids follows them."""
        self.__dict__.update(state)
        self._signature = [id(p) for p in self.params]

    def clear_metrics(self) -> None:
        """Drop the steps not yet popped (a new training loop reports only its own); no host sync."""
        self._window = MetricWindow(self.layout.device)

    def pop_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Averages over the steps since the last call, as `vasso/*` floats; the one host sync of the window.

        A metric is absent when nothing in the window measured it (see docs/metrics.md).

        Args:
            reduce: averages the window over processes first, e.g. `lambda t: accelerator.reduce(t, "mean")`.
        """
        return self._window.pop(reduce)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (the coin stream is a function of the step), in the
        format of `state.STATE_FORMAT`: `d` holds one fp32 tensor per parameter (this rank's shard; None for
        parameters without d), `segments` the cohorts and whether each has seen its first gradient. One host sync
        (a save is not on the hot path).

        Raises:
            RuntimeError: the weights are perturbed.
        """
        if self.perturbed:
            raise RuntimeError("VASSO state saved while the weights are perturbed; call restore() first.")
        cohorts = self.layout.cohorts
        initialized = [bool(c.initialized.item()) for c in cohorts]
        return {
            "format": state_file.STATE_FORMAT,
            "step": self.step,
            "d": [None if d is None else d.clone() for d in self.d],
            "segments": [
                {"params": list(c.indices), "initialized": f} for c, f in zip(self.layout.cohorts, initialized)
            ],
            "initialized": all(initialized),
            "param_names": self.names(),
            **self.hyperparameters(),
        }

    def validate_state_dict(self, state: Any, expected_step: int | None = None) -> None:
        """Check a saved state against this run before anything is loaded; one host sync (the finiteness check).

        Raises:
            ValueError: unknown or old format, other parameters (count, names, shapes), a step that is not
                `expected_step`, or non-finite values; the message says what is wrong.
        """
        self._sync_groups()
        shapes = [tuple(local(p).shape) for p in self.params]
        state_file.validate_state(state, self.names(), shapes, expected_step)

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
        for key, new in self.hyperparameters().items():
            old = state.get(key)
            if old is not None and old != new:
                state_file.logger.warning(
                    f"VASSO hyperparameter {key} changed at resume: {old} → {new} (the new value is used)."
                )
        device, zero = self.layout.device, torch.zeros((), device=self.layout.device)
        cohorts = [
            Cohort(list(seg["params"]), torch.tensor(seg["initialized"], device=device), zero)
            for seg in state["segments"]
        ]
        # The layout is the saved one; the next step re-checks the flags against it.
        self.layout.build(cohorts, {i: t for i, t in enumerate(state["d"]) if t is not None}, self._group_of)
        self.step = state["step"]

    def hyperparameters(self) -> dict[str, Any]:
        """What a resume may change (with a warning): saved with the state, compared when it is loaded."""
        groups = self.groups()
        return {
            "rho": self.rho,
            "theta": self.theta,
            "adversary_prob": self.adversary_prob,
            "seed": self.seed,
            "adversary": self.adversary,
            "group_rho": [g.get(self.keys["rho"]) for g in groups],
            "group_adversary": [self._adversary_of(g) for g in groups],
        }

    def state_bytes(self) -> int:
        """Bytes VASSO keeps beside the model: d (fp32) and the saved weights (in their own dtype): 2.0x the trainable
        bytes for fp32 weights, 3.0x for bf16."""
        return self.layout.state_bytes()

    def name(self, i: int) -> str:
        """Parameter `i`'s name for messages."""
        if self._names_of is not None:
            return self._names_of(self.params[i])
        return self.param_names[i] if self.param_names else f"parameter #{i}"

    def names(self) -> list[str] | None:
        """Every parameter's name, in order, or None for an engine built without names."""
        if self._names_of is None and self.param_names is None:
            return None
        return [self.name(i) for i in range(len(self.params))]


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Tensors or param-group dicts, as a list of group dicts (a generator is read once)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        # torch accepts a lone tensor as a group's "params"
        return [
            dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]))
            for g in params
        ]
    return [{"params": params}]
