"""`VASSO`: the VASSO step as a `torch.optim.Optimizer` wrapper, for plain PyTorch and Accelerate loops.

Paper: arXiv 2309.15639 (VASSO, NeurIPS 2023) and arXiv 2509.02433 (the extended version with eVASSO).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from .rules import (
    check_adaptive,
    check_hyperparameters,
    refuse_accelerate_accumulation,
    refuse_repeated_tensors,
    refuse_step_without_first_step,
    refuse_wrapped_vasso,
)
from .update import VassoUpdate


class VASSO(torch.optim.Optimizer):
    """Wrap a base optimizer so that it steps with the gradient at the VASSO adversary (arXiv 2309.15639).

    `param_groups` and `state` are the base optimizer's own, so LR schedulers, `zero_grad` and checkpoints keep
    working; `state_dict()` is the base optimizer's with the VASSO state (d, step count) under the key `"vasso"`.

    Plain loop (davda54/sam's API; its constructor `VASSO(model.parameters(), torch.optim.AdamW, rho=0.05,
    lr=1e-3)` builds the same optimizer as the form below)::

        optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05, theta=0.4)
        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)     # d <- EMA(g), x <- x + eps, gradients cleared
        loss_fn(model(x), y).backward()          # gradient at the perturbed weights
        optimizer.second_step(zero_grad=True)    # x restored exactly, base step

    or `optimizer.step(closure)` with a closure that runs the forward and backward pass (after the first backward).
    With `adversary_prob < 1` (eVASSO), `first_step` returns False on steps without adversary: it then keeps the
    pass-1 gradient and the caller skips pass 2 and calls `second_step` (or `step`) at once.

    Under Accelerate with fp16, pass the scaler so d sees unscaled gradients, and restore before Accelerate's step
    (which may skip the base step on overflow)::

        optimizer.first_step(zero_grad=True, grad_scaler=accelerator.scaler)
        accelerator.backward(loss_fn(model(x), y))
        optimizer.restore()                       # also keeps a non-finite pass-2 gradient from the weights
        prepared_optimizer.step()                 # unscale, skip on overflow, base step

    A base-optimizer param group may carry its own `"rho"` and `"adaptive"` (pytorch_optimizer's `SAM`
    semantics: the norm stays global over all groups)::

        base = torch.optim.SGD([{"params": body, "rho": 0.05}, {"params": head, "rho": 0.2}], lr=0.1)
        optimizer = VASSO(base, theta=0.4)

    Non-finite gradients: a non-finite pass-1 gradient leaves d alone and the weights unperturbed; a non-finite
    pass-2 gradient is replaced by zeros before the base step (momentum and weight decay still act), or, with a
    `grad_scaler`, left for the scaler to skip the step. Both are decided on the device and counted in the metrics.

    Gradient accumulation: run pass 1 over all K micro-batches of the step (each loss divided by K), call
    `first_step` once, run pass 2 over the same K micro-batches, then `second_step`: one batch of K·b. Do not call
    `first_step` inside `accelerator.accumulate()` (refused: it would perturb once per micro-batch).

    Args:
        params (iterable of tensors or param-group dicts, or `torch.optim.Optimizer`): the parameters for
            `base_optimizer` (davda54/sam's form), or the base optimizer itself, already built (AdamW, SGD, ...).
        base_optimizer (`type`, *optional*): the base optimizer's class, with `params` (davda54/sam's form); its
            keyword arguments (`lr`, `momentum`, ...) are the extra keyword arguments of `VASSO`.
        rho (`float`): perturbation radius, >= 0 (groups without their own "rho").
        theta (`float`): weight of the newest gradient in d, in (0, 1]; 1.0 is SAM.
        adversary_prob (`float`): probability of an adversary step, in [0, 1]; below 1 is eVASSO.
        seed (`int`): seed of the eVASSO coins, drawn from (seed, step); 42 like the Trainer's default seed.
        adaptive (`bool`): ASAM's adversary `rho·|w|²d/‖|w|·d‖` (groups without their own "adaptive").

    Raises:
        TypeError: no base optimizer (neither an instance nor a class with its parameters), or keyword arguments
            for an optimizer that is already built.
        ValueError: a hyperparameter is invalid, nothing requires a gradient, the base optimizer is
            `torch.optim.SparseAdam` (sparse gradients) or already a `VASSO`; and, at step time, `step()` without a
            closure and without `first_step()` since the last step (e.g. inside `transformers.Trainer`), or
            `first_step()` inside `accelerator.accumulate()` before the step's last micro-batch.
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
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        base_optimizer = _base_optimizer(params, base_optimizer, base_kwargs)
        refuse_wrapped_vasso(base_optimizer)
        if isinstance(base_optimizer, torch.optim.SparseAdam):
            raise ValueError(
                "VASSO cannot wrap torch.optim.SparseAdam: it works on sparse gradients, and VASSO's norm and EMA "
                "need dense ones. Use a dense embedding (nn.Embedding(sparse=False)) with AdamW."
            )
        rho = check_hyperparameters(rho, theta, adversary_prob)[0]
        self.base_optimizer = base_optimizer
        # A group's own "rho"/"adaptive" (pytorch_optimizer's SAM semantics); the other keys stay the base's.
        groups = [
            {"params": g["params"], **{k: g[k] for k in ("rho", "adaptive") if k in g}}
            for g in base_optimizer.param_groups
        ]
        self.vasso = VassoUpdate(
            groups, rho=rho, theta=theta, adversary_prob=adversary_prob, seed=seed, adaptive=adaptive
        )
        super().__init__([p for g in groups for p in g["params"]], dict(base_optimizer.defaults))
        self._share_base_state()
        self._grad_scale: torch.Tensor | None = None
        # Host-side bookkeeping of the call order (no device sync): whether first_step ran since the last base step.
        self._first_step_done = False

    def _share_base_state(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer and to VASSO (unfreezing a head mid-run, davda54/sam#65).

        The group's own `"rho"` and `"adaptive"` apply to its part of ε (the norm stays global over all groups);
        its parameters are perturbed from the next `first_step` on, their d starting from their first gradient. The
        state saved afterwards loads into a `VASSO` built over all the groups from the start, and the other way.

        Raises:
            RuntimeError: the weights are perturbed (call `restore()` first).
            ValueError, TypeError: as `torch.optim.Optimizer.add_param_group`, or an invalid "rho"/"adaptive";
                nothing is added then.
        """
        if self.__dict__.get("param_groups") is not self.base_optimizer.param_groups:
            # torch.optim.Optimizer.__init__ registering the wrapper's view of the parameters, before it shares the
            # base optimizer's groups: nothing to add to the base or to the engine.
            return super().add_param_group(param_group)
        if self.vasso.perturbed:
            raise RuntimeError("VASSO: add_param_group() called while the weights are perturbed; call restore().")
        check_hyperparameters(param_group.get("rho", self.vasso.rho), self.vasso.theta, self.vasso.adversary_prob)
        check_adaptive(param_group.get("adaptive", self.vasso.adaptive))
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses a set itself; a generator is read once, here
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            refuse_repeated_tensors(params, "add_param_group")  # before the base optimizer has the group
            param_group = {**param_group, "params": params}
        self.base_optimizer.add_param_group(param_group)  # validates and fills the base's defaults
        added = self.base_optimizer.param_groups[-1]
        self.vasso.add_param_group(
            {"params": added["params"], **{k: added[k] for k in ("rho", "adaptive") if k in added}}
        )

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Fold the current (pass-1) gradient into d and, on an adversary step, perturb the weights.

        Returns whether the weights were perturbed (False only on eVASSO's skipped steps, which keep the gradient for
        the base step). `grad_scaler`: the GradScaler that scaled the backward pass, if any (fp16). On an adversary
        step the gradients are cleared whatever `zero_grad` says (pass 2 must start from zero); the argument is
        davda54/sam's.

        Raises:
            ValueError: called inside `accelerator.accumulate()` on a micro-batch that does not end the step.
        """
        if _accelerate_is_accumulating():
            refuse_accelerate_accumulation()
        adversary = self.vasso.is_adversary_step()
        # Kept for the pass-2 guard: with a scaler, a non-finite pass-2 gradient is the scaler's to skip.
        self._grad_scale = grad_scaler._scale if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.vasso.absorb_gradient(self._grad_scale)
        self._first_step_done = True
        if not adversary:
            return False
        # The engine clears the gradients whatever `zero_grad` says: pass 2 must start from zero, since a pass-2
        # gradient added onto the pass-1 one would be neither. `zero_grad` is kept for davda54/sam's signature.
        self.vasso.perturb()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by `first_step`, bit for bit, and keep a non-finite pass-2 gradient from the
        base step (zeros without a scaler; the scaler's skip with one). A no-op when the weights are not perturbed."""
        self._restore_and_guard()

    def _restore_and_guard(self) -> None:
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
            if not self._first_step_done:
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
                self._restore_and_guard()
            if isinstance(loss, torch.Tensor):
                self.vasso.record_losses(None, loss)  # the pass-2 loss only: no sharpness without the clean one
        self._first_step_done = False
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state["vasso"] = self.vasso.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state and the VASSO state, atomically: both are checked before either loads.

        Raises:
            ValueError: no "vasso" entry, a VASSO state that does not fit (see `VassoUpdate.validate_state_dict`),
                or a base state that does not fit the base optimizer; nothing is loaded then.
        """
        state_dict = dict(state_dict)
        if "vasso" not in state_dict:
            raise ValueError(
                "This optimizer state has no 'vasso' entry: it was not saved from a VASSO optimizer. Load it into "
                "the base optimizer (optimizer.base_optimizer.load_state_dict) to start d afresh."
            )
        vasso_state = state_dict.pop("vasso")
        self.vasso.validate_state_dict(vasso_state)
        # torch checks the groups and sizes before it changes anything, and the VASSO state is already valid.
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_state()  # load_state_dict rebinds the base optimizer's param_groups and state
        self.vasso.load_state_dict(vasso_state)

    def pop_metrics(self) -> dict[str, float]:
        """The `vasso/*` metrics averaged since the last call (see the README's "Logged metrics")."""
        return self.vasso.pop_metrics()

    def __repr__(self) -> str:
        v = self.vasso
        return (
            f"VASSO(rho={v.rho}, theta={v.theta}, adversary_prob={v.adversary_prob}, adaptive={v.adaptive}, "
            f"base_optimizer={self.base_optimizer!r})"
        )


def _base_optimizer(params: Any, base_optimizer: Any, base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer from either constructor: `VASSO(optimizer_instance, ...)` or davda54/sam's
    `VASSO(params, optimizer_class, **optimizer_kwargs)`."""
    if isinstance(params, torch.optim.Optimizer) and base_optimizer is None:
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


def _accelerate_is_accumulating() -> bool:
    """Inside `accelerator.accumulate()` on a micro-batch that does not end the optimizer step (a host flag)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    shared = state.GradientState._shared_state
    plugin = shared.get("plugin_kwargs") or {}
    return not shared.get("sync_gradients", True) and plugin.get("num_steps", 1) > 1
