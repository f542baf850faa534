"""`VASSO`: the VASSO step as a `torch.optim.Optimizer` wrapper, for plain PyTorch and Accelerate loops.

Paper: arXiv 2309.15639 (VASSO, NeurIPS 2023) and arXiv 2509.02433 (the extended version with eVASSO).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .module_state import BufferSnapshot
from .rules import (
    SUPPORTED_DTYPES,
    refuse_accelerate_accumulation,
    refuse_repeated_tensors,
    refuse_scaler_step_while_perturbed,
    refuse_step_without_first_step,
    refuse_unsupported_dtype,
)
from .sharding import local
from .update import VassoUpdate


def _through_base(name: str) -> property:
    """`VASSO.<name>` as the base optimizer's live attribute, once `torch.optim.Optimizer.__init__` has run."""

    def get(self: Any) -> Any:
        if self.__dict__.get("_shared"):
            return getattr(self.base_optimizer, name)
        return self.__dict__[f"_own_{name}"]

    def set(self: Any, value: Any) -> None:
        if self.__dict__.get("_shared"):
            setattr(self.base_optimizer, name, value)
        else:
            self.__dict__[f"_own_{name}"] = value

    return property(get, set)


class VASSO(torch.optim.Optimizer):
    """Wrap a base optimizer so that it steps with the gradient at the VASSO adversary (arXiv 2309.15639).

    `param_groups` and `state` are the base optimizer's own, so LR schedulers, `zero_grad` and checkpoints keep
    working. VASSO acts on exactly the parameters the base optimizer steps, whichever handle added their group
    (`VASSO.add_param_group` or the base optimizer's own), and reads ρ and the geometry at every step, as torch
    optimizers read `lr`: a group's own `"rho"` / `"adversary"` (`"vasso_rho"` where the base optimizer uses
    `"rho"` itself, as `Adadelta` does; `group_keys` says which), else the defaults `optimizer.vasso.rho` and
    `optimizer.vasso.adversary`, which may be changed between steps (a ρ schedule).

    Plain loop (davda54/sam's API; its constructor `VASSO(model.parameters(), torch.optim.AdamW, rho=0.05,
    lr=1e-3)` builds the same optimizer as the form below)::

        optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05, theta=0.4, model=model)
        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)     # d <- EMA(g), x <- x + eps, gradients cleared
        loss_fn(model(x), y).backward()          # gradient at the perturbed weights
        optimizer.second_step(zero_grad=True)    # x and the model's buffers restored exactly, base step

    or `optimizer.step(closure)` with a closure that runs the forward and backward pass (after the first backward).
    With `adversary_prob < 1` (eVASSO), `first_step` returns False on steps without adversary: it then keeps the
    pass-1 gradient and the caller skips pass 2 and calls `second_step` (or `step`) at once.

    Under Accelerate with fp16, pass the scaler so d sees unscaled gradients, and restore before Accelerate's step
    (which may skip the base step on overflow)::

        optimizer.first_step(zero_grad=True, grad_scaler=accelerator.scaler)
        accelerator.backward(loss_fn(model(x), y))
        optimizer.restore()                       # also keeps a non-finite pass-2 gradient from the weights
        prepared_optimizer.step()                 # unscale, skip on overflow, base step

    Non-finite gradients: a non-finite pass-1 gradient leaves d alone and the weights unperturbed; a non-finite
    gradient the base step would take (pass 2's, or pass 1's on eVASSO's skipped steps) is replaced by zeros first
    (momentum and weight decay still act), or, with a `grad_scaler`, left for the scaler to skip the step. All are
    decided on the device and counted in the metrics.

    ρ, θ, `adversary_prob` and the geometry are read at every step: `optimizer.vasso.theta = 1.0` between steps
    takes effect at the next one, and an invalid value raises where it is set (a group's key: at the next
    `first_step`, before d changes). The model may be moved or cast after the wrapper is built (Accelerate's
    `prepare` moving it to the GPU): d follows it.

    Gradient accumulation: run pass 1 over all K micro-batches of the step (each loss divided by K), call
    `first_step` once, run pass 2 over the same K micro-batches, then `second_step`: one batch of K·b. An
    Accelerator built with `gradient_accumulation_steps` is refused (inside `accelerator.accumulate()` it would
    perturb once per micro-batch, or run pass 2 on the last one alone; outside it, divide every loss by K twice).

    `state_dict()` is the base optimizer's with VASSO's d in each parameter's state (`"vasso_d"`, a DTensor for a
    DTensor parameter) and the rest under `param_groups[0]["vasso"]`, so that torch's distributed-checkpoint helpers
    (`get_optimizer_state_dict` / `set_optimizer_state_dict`, what FSDP2 checkpoints use) carry it; for a base
    optimizer with a state dict of another shape (pytorch_optimizer's `Lookahead`) it goes under the key `"vasso"`.

    Args:
        params (iterable of tensors or param-group dicts, or `torch.optim.Optimizer`): the parameters for
            `base_optimizer` (davda54/sam's form), or the base optimizer itself, already built (AdamW, SGD, ...).
        base_optimizer (`type`, *optional*): the base optimizer's class, with `params` (davda54/sam's form); its
            keyword arguments (`lr`, `momentum`, ...) are the extra keyword arguments of `VASSO`.
        rho (`float`): perturbation radius, >= 0 (groups without their own ρ).
        theta (`float`): weight of the newest gradient in d, in (0, 1]; 1.0 is SAM.
        adversary_prob (`float`): probability of an adversary step, in [0, 1]; below 1 is eVASSO.
        seed (`int`): seed of the eVASSO coins, drawn from (seed, step); 42 like the Trainer's default seed.
        adversary (`str`): the geometry of groups without their own: "vasso" (ρ·d/‖d‖, the default) or "asam"
            (ρ·|w|²d/‖|w|·d‖), or any name registered in `hf_vasso.adversary.GEOMETRIES`.
        adaptive (`bool`): davda54/sam's and pytorch_optimizer's switch, an alias: `adaptive=True` is "asam".
        model (`nn.Module`, *optional*): the model the loop trains. Given, every buffer its pass-2 forward changes
            (BatchNorm's and InstanceNorm's running statistics, a running buffer of your own) ends the step as
            pass 1 left it, and pass 2 starts from cleared gradients for all of its parameters, also those this
            optimizer does not step (which then end the step with the pass-2 gradient, as the stepped ones do).
            Without it the wrapper cannot see them: pass 2 counts the step in the buffers a second time, and a
            parameter it does not step ends with the sum of both passes' gradients, as under davda54/sam.

    Raises:
        TypeError: no base optimizer (neither an instance nor a class with its parameters), or keyword arguments
            for an optimizer that is already built.
        ValueError: a hyperparameter is invalid, nothing requires a gradient, the base optimizer is
            `torch.optim.SparseAdam` (sparse gradients) or already a `VASSO`; and, at step time, `step()` without a
            closure and without `first_step()` since the last step (e.g. inside `transformers.Trainer`), or
            `first_step()` under an Accelerator that accumulates gradients itself or after `scaler.unscale_`.
        RuntimeError: at step time, `first_step()` twice without a base step between.
    """

    def __init__(
        self,
        params: Any = None,
        base_optimizer: Any = None,
        *,
        rho: float = 0.05,
        theta: float = 0.4,
        adversary_prob: float = 1.0,
        seed: int = 42,
        adversary: str | None = None,
        adaptive: bool | None = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        base_optimizer = _base_optimizer(params, base_optimizer, base_kwargs)
        refuse_wrapped_vasso(base_optimizer)
        if isinstance(base_optimizer, torch.optim.SparseAdam):
            raise ValueError(
                "VASSO cannot wrap torch.optim.SparseAdam: it works on sparse gradients, and VASSO's norm and EMA "
                "need dense ones. Use a dense embedding (nn.Embedding(sparse=False)) with AdamW."
            )
        self.base_optimizer = base_optimizer
        self.vasso = VassoUpdate(
            base_optimizer,
            rho=rho,
            theta=theta,
            adversary_prob=adversary_prob,
            seed=seed,
            adversary=adversary,
            adaptive=adaptive,
        )
        self._buffers = BufferSnapshot(model) if model is not None else None
        super().__init__(list(self.vasso.params), dict(base_optimizer.defaults))
        self._shared = True  # from here on, param_groups, state and defaults are the base optimizer's own
        self._grad_scale: torch.Tensor | None = None
        self._scale_at_first_step: torch.Tensor | None = None  # its value then: a lower scale now means a skip
        # Host-side bookkeeping of the call order (no device sync): whether first_step ran since the last base step.
        self._first_step_done = False

    # The base optimizer's `param_groups`, `state` and `defaults`, read through at every access: torch's own
    # `load_state_dict` on the base optimizer rebinds them, and a copy taken once would leave the wrapper (and its LR
    # schedulers) on stale groups. While torch.optim.Optimizer.__init__ runs, the wrapper keeps its own.
    param_groups = _through_base("param_groups")
    state = _through_base("state")
    defaults = _through_base("defaults")

    # torch's Optimizer pickles only defaults, state and param_groups; the wrapper is its base optimizer and engine.
    def __getstate__(self) -> dict[str, Any]:
        # Without the `step` an LR scheduler puts on the instance (it holds a weak reference to this optimizer):
        # torch's own Optimizer.__getstate__ drops it too, and the copy's scheduler installs its own.
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer, which VASSO follows (unfreezing a head mid-run, davda54/sam#65).

        The group's own ρ and geometry apply to its part of ε (the norm stays global over all groups); its
        parameters are perturbed from the next `first_step` on, their d starting from their first gradient. Adding
        it to the base optimizer directly does the same; this method checks the VASSO keys first, so that a refused
        group reaches neither.

        Raises:
            RuntimeError: the weights are perturbed (call `restore()` first).
            ValueError, TypeError: as `torch.optim.Optimizer.add_param_group`, an invalid ρ or geometry, or a
                tensor VASSO already has; nothing is added then.
        """
        if not self.__dict__.get("_shared"):
            # torch.optim.Optimizer.__init__ registering the wrapper's view of the parameters, before it shares the
            # base optimizer's groups: nothing to add to the base or to the engine.
            return super().add_param_group(param_group)
        if self.vasso.perturbed:
            raise RuntimeError("VASSO: add_param_group() called while the weights are perturbed; call restore().")
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses a set itself; a generator is read once, here
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            refuse_repeated_tensors(self.vasso.params + params, "add_param_group")
            param_group = {**param_group, "params": params}
        self.vasso._check_group(param_group, len(self.param_groups))
        for dtype in {p.dtype for p in params if p.requires_grad} - set(SUPPORTED_DTYPES):
            refuse_unsupported_dtype(f"a tensor of the new param group {len(self.param_groups)}", dtype)
        self.base_optimizer.add_param_group(param_group)  # validates and fills the base's defaults
        self.vasso._sync_groups()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Fold the current (pass-1) gradient into d and, on an adversary step, perturb the weights.

        Returns whether the weights were perturbed (False only on eVASSO's skipped steps, which keep the gradient for
        the base step). `grad_scaler`: the GradScaler that scaled the backward pass, if any (fp16). On an adversary
        step the gradients are cleared whatever `zero_grad` says (pass 2 must start from zero); the argument is
        davda54/sam's.

        Raises:
            ValueError: the Accelerator accumulates gradients itself (`gradient_accumulation_steps` > 1), or the
                scaler already unscaled this step's gradients (`scaler.unscale_` before `first_step`).
            RuntimeError: `first_step` already ran since the last base step (`second_step` or `step`; a step the
                GradScaler skipped counts as taken), or, with a scaler, the last step reached `scaler.step` without
                `restore()` (the weights are restored first).
        """
        self._refuse_perturbed_under_scaler()
        if self._first_step_done and self._skipped_by_scaler():
            self._first_step_done = False  # the scaler skipped the base step (an overflow): this step takes it up
        if self._first_step_done:
            why = (
                "the weights are still perturbed, and a second perturbation would lose the saved copy of them"
                if self.vasso.perturbed
                else "the first call's pass-1 gradient is still in .grad (on eVASSO's skipped steps, the base step's "
                "gradient) and d already holds it"
            )
            raise RuntimeError(
                f"VASSO: first_step() called twice without a base step between: {why}. Finish each step with "
                "second_step() (or step()), also when first_step() returned False."
            )
        if (steps := _accelerate_accumulation_steps()) > 1:
            refuse_accelerate_accumulation(steps)
        if grad_scaler is not None and _already_unscaled(grad_scaler, (self, self.base_optimizer)):
            raise ValueError(
                "VASSO: scaler.unscale_() ran before first_step(grad_scaler=scaler): d would divide the gradient by "
                "the scale a second time, and scaler.step() would then not unscale the pass-2 gradient (a step "
                "scale-times too long). Call first_step on the scaled gradient; to clip, unscale after restore(), "
                "before scaler.step()."
            )
        adversary = self.vasso.is_adversary_step()
        # Kept for the pass-2 guard: with a scaler, a non-finite pass-2 gradient is the scaler's to skip.
        self._grad_scale = grad_scaler._scale if grad_scaler is not None and grad_scaler.is_enabled() else None
        self._scale_at_first_step = None if self._grad_scale is None else self._grad_scale.clone()
        self.vasso.absorb_gradient(self._grad_scale, perturbing=adversary)
        self._first_step_done = True
        if not adversary:
            return False
        if self._buffers is not None:
            self._buffers.save()
        # The engine clears the gradients whatever `zero_grad` says: pass 2 must start from zero, since a pass-2
        # gradient added onto the pass-1 one would be neither. `zero_grad` is kept for davda54/sam's signature.
        self.vasso.perturb()
        if self._buffers is not None:  # the model's parameters this optimizer does not step too
            self._buffers.module.zero_grad(set_to_none=True)
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by `first_step` bit for bit, and the model's buffers as pass 1 left them, and
        keep a non-finite pass-2 gradient from the base step (zeros without a scaler; the scaler's skip with one). A
        no-op when the weights are not perturbed."""
        if self.vasso.perturbed and self._buffers is not None:
            self._buffers.restore()
        self.vasso.restore()
        self.vasso.guard_perturbed_gradient(self._grad_scale)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights and step the base optimizer with the current (pass-2) gradient."""
        self.step()  # through step(), so LR schedulers see the optimizer step
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Without a closure: restore the weights if perturbed, then the base step (Accelerate calls this form).

        With a closure (forward + backward at the current weights, returning the loss), after the pass-1 backward:
        the whole VASSO step. Returns the closure's loss, or None when eVASSO skipped pass 2.
        """
        if closure is None:
            self._refuse_perturbed_under_scaler()
            if not self._first_step_done:
                if self._is_state_initialisation():
                    return self.base_optimizer.step()
                refuse_step_without_first_step()
            self.restore()
            self._first_step_done = False
            return self.base_optimizer.step()
        loss = None
        if self.first_step(zero_grad=True):
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self.restore()
            if isinstance(loss, torch.Tensor):
                self.vasso.record_losses(None, loss)  # the pass-2 loss only: no sharpness without the clean one
        self._first_step_done = False
        self.base_optimizer.step()
        return loss

    def _refuse_perturbed_under_scaler(self) -> None:
        """With a GradScaler the weights must be restored before `scaler.step`, which skips an overflowing step
        without calling the optimizer: still perturbed here, they are put back and the loop is refused."""
        if self._first_step_done and self._grad_scale is not None and self.vasso.perturbed:
            self.restore()
            refuse_scaler_step_while_perturbed()

    def _skipped_by_scaler(self) -> bool:
        """Whether the GradScaler given to the last `first_step` skipped the base step since: its scale is lower
        (`update()` lowers it only after an overflow, on which `scaler.step()` does not call the optimizer). One host
        sync, on this path only."""
        scale, then = self._grad_scale, self._scale_at_first_step
        return scale is not None and then is not None and bool(scale < then)

    def _is_state_initialisation(self) -> bool:
        """torch.distributed.checkpoint's `get/set_optimizer_state_dict` build a fresh optimizer's state by calling
        `step()` on zero gradients with every lr set to 0 (`_init_optim_state`): a base step that moves nothing.
        The gradients (each rank its shard) are read, a host sync, only on this path, which otherwise refuses."""
        if self.state or any(float(g.get("lr", 1.0)) != 0.0 for g in self.param_groups):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return not any(bool(local(grad).any()) for grad in grads)

    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        vasso = self.vasso.state_dict()
        d = vasso.pop("d")
        if not _is_plain_optimizer_state(state):
            state["vasso"] = {**vasso, "d": d}
            return state
        state["state"] = {i: dict(s) for i, s in state["state"].items()}  # torch hands out its live per-tensor dicts
        for i, t in enumerate(d):
            if t is not None:
                state["state"].setdefault(i, {})[D_KEY] = _as_dtensor_like(t, self.vasso.params[i])
        state["param_groups"][0] = {**state["param_groups"][0], META_KEY: vasso}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state and the VASSO state, atomically: both are checked before either loads.

        Takes what `state_dict()` writes, also after torch's distributed-checkpoint helpers, and the older form with
        the whole VASSO state under the key `"vasso"`.

        Raises:
            ValueError: no VASSO state, a VASSO state that does not fit (see `VassoUpdate.validate_state_dict`),
                or a base state that does not fit the base optimizer; nothing is loaded then.
        """
        base_state, vasso_state = _split_state(state_dict, len(self.vasso.params))
        if vasso_state is None:
            raise ValueError(
                "This optimizer state has no VASSO state: it was not saved from a VASSO optimizer. Load it into "
                "the base optimizer (optimizer.base_optimizer.load_state_dict) to start d afresh."
            )
        self.vasso.validate_state_dict(vasso_state)
        # torch checks the groups and sizes before it changes anything, and the VASSO state is already valid.
        self.base_optimizer.load_state_dict(base_state)
        self.vasso.load_state_dict(vasso_state)

    def pop_metrics(self) -> dict[str, float]:
        """The `vasso/*` metrics averaged since the last call (see docs/metrics.md)."""
        return self.vasso.pop_metrics()

    def __repr__(self) -> str:
        v = self.vasso
        own = [k for k, g in enumerate(self.param_groups) if v.keys["rho"] in g]
        groups = f", groups with their own rho: {own}" if own else ""
        return (
            f"VASSO(rho={v.rho}, theta={v.theta}, adversary_prob={v.adversary_prob}, adversary={v.adversary!r}"
            f"{groups}, base_optimizer={self.base_optimizer!r})"
        )


D_KEY, META_KEY = "vasso_d", "vasso"


def _is_plain_optimizer_state(state: Any) -> bool:
    """A state dict in torch.optim's own shape, `{"state": {index: {...}}, "param_groups": [...]}`."""
    return isinstance(state, dict) and isinstance(state.get("state"), dict) and bool(state.get("param_groups"))


def _as_dtensor_like(d: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """d (this rank's shard) as a DTensor laid out like its DTensor parameter, so that a distributed checkpoint
    saves every rank's shard and reshards them on load; d itself for a plain parameter."""
    if not isinstance(param, DTensor):
        return d
    return DTensor.from_local(d, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())  # fmt: skip


def _split_state(state_dict: dict[str, Any], count: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`(the base optimizer's state, the engine's state or None)`, from either form `VASSO.state_dict` writes."""
    state_dict = dict(state_dict)
    if "vasso" in state_dict:  # the whole engine state at the top level
        vasso = state_dict.pop("vasso")
        return state_dict, vasso
    if not _is_plain_optimizer_state(state_dict):
        return state_dict, None
    groups = [dict(g) for g in state_dict["param_groups"]]
    meta = groups[0].pop(META_KEY, None)
    if meta is None:
        return state_dict, None
    # A state key is the parameter's index in the groups' order, or what stands in its place there (torch's
    # distributed-checkpoint helpers put the parameter's name): torch's own load matches them the same way.
    position = {key: i for i, key in enumerate(k for g in groups for k in g["params"])}
    d: list[torch.Tensor | None] = [None] * count
    per_param = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        value = entry.pop(D_KEY, None)
        index = position.get(key)
        if value is not None and index is not None and index < count:
            d[index] = value.to_local() if isinstance(value, DTensor) else value
        if entry:
            per_param[key] = entry
    return {**state_dict, "state": per_param, "param_groups": groups}, {**meta, "d": d}


def _base_optimizer(params: Any, base_optimizer: Any, base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer from either constructor: `VASSO(optimizer_instance, ...)` or davda54/sam's
    `VASSO(params, optimizer_class, **optimizer_kwargs)`."""
    if isinstance(params, torch.optim.Optimizer) and base_optimizer is not None:
        raise TypeError(
            f"VASSO got an optimizer that is already built ({type(params).__name__}) and a base optimizer "
            f"({base_optimizer!r}): pass one of the two forms, VASSO(optimizer, rho=0.05) with the built one, or "
            "VASSO(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3) (davda54/sam's form)."
        )
    if isinstance(params, torch.optim.Optimizer):
        instance = params
    elif params is None and isinstance(base_optimizer, torch.optim.Optimizer):
        instance = base_optimizer
    elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer) and params is not None:
        return base_optimizer(params, **base_kwargs)
    else:
        given = f"{type(params).__name__}" + ("" if base_optimizer is None else f", {base_optimizer!r}")
        raise TypeError(
            f"VASSO needs a base optimizer: got ({given}). The base optimizer must be a torch.optim.Optimizer "
            "instance, VASSO(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05), or a class with its "
            "parameters and keyword arguments (davda54/sam's form), VASSO(model.parameters(), torch.optim.AdamW, "
            "rho=0.05, lr=1e-3)."
        )
    if base_kwargs:
        raise TypeError(
            f"VASSO got keyword arguments {sorted(base_kwargs)} for an optimizer that is already built: they are "
            "only taken in davda54/sam's form, VASSO(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)."
        )
    return instance


def _accelerate_accumulation_steps() -> int:
    """The micro-batches per step of the current Accelerator's own gradient accumulation (1: none; a host value)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return 1
    plugin = state.GradientState._shared_state.get("plugin_kwargs") or {}
    return plugin.get("num_steps", 1) or 1


def _already_unscaled(scaler: torch.amp.GradScaler, optimizers: tuple) -> bool:
    """Whether `scaler.unscale_` ran this step for one of `optimizers` (torch's per-optimizer stage, a host value)."""
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", {})
    return any(states[id(o)]["stage"] is OptState.UNSCALED for o in optimizers if id(o) in states)


def refuse_wrapped_vasso(base_optimizer: Any) -> None:
    """VASSO over VASSO would perturb twice and step the innermost base optimizer through two wrappers."""
    if isinstance(base_optimizer, VASSO):
        raise ValueError(
            "VASSO was given a VASSO optimizer as its base: the weights would be perturbed twice per step. Wrap the "
            "base optimizer once: VASSO(torch.optim.AdamW(model.parameters()), rho=..., theta=...)."
        )
