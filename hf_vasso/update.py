"""The VASSO update, written once and used by both `VassoTrainer` and the `VASSO` optimizer wrapper.

One optimizer step t, for the parameters that require gradients (the full specification is `docs/algorithm.md`):

    g_t  = gradient of the step's loss at x_t                     (pass 1, already in `p.grad`)
    d_t  = g_t on the first step, else (1 - theta) d_{t-1} + theta g_t
    eps  = rho d_t / ||d_t||  (one global norm; 0 when ||d_t|| = 0)
    h_t  = gradient at x_t + eps                                  (pass 2, run by the caller)
    x_t is restored by copy, then the base optimizer steps with h_t.

`VassoUpdate` owns d, the step count and the saved weights. It never runs a forward or backward pass and never
synchronises host and device on the training path: every decision that depends on a tensor value (first step under
fp16, non-finite gradients, zero norm) is a `torch.where` on the device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor, Shard

# Order of the running sums kept for the logged metrics.
_STEPS, _ADVERSARY, _GRAD_NORM, _D_NORM, _COS, _COS_COUNT, _CLEAN_LOSS, _PERTURBED_LOSS, _NONFINITE = range(9)


def check_hyperparameters(rho: float, theta: float, adversary_prob: float) -> None:
    """Raise a `ValueError` naming the bad value and the fix. Shared by `VassoConfig` and `VASSO`."""
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho!r} is invalid: the perturbation radius must be a finite number >= 0 (try 0.05).")
    if not (isinstance(theta, (int, float)) and 0 < theta <= 1):
        raise ValueError(
            f"theta={theta!r} is invalid: the weight of the newest gradient must be in (0, 1] "
            "(1.0 is SAM; the paper uses 0.4, and 0.2 under heavy label noise)."
        )
    if not (isinstance(adversary_prob, (int, float)) and 0 <= adversary_prob <= 1):
        raise ValueError(
            f"adversary_prob={adversary_prob!r} is invalid: the probability of an adversary step must be in [0, 1] "
            "(1.0 is VASSO, below 1 is eVASSO, 0 is the base optimizer alone)."
        )


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


class VassoUpdate:
    """The VASSO state (d, step count, saved weights) and the operations on it.

    The caller runs the passes; this class does what happens between them:

        adversary = update.adversary_step()        # this step's eVASSO coin, from (seed, step): no communication
        ...pass 1 backward...
        update.absorb_gradient(grad_scale)         # d <- EMA with the pass-1 gradient, eps from d; step += 1
        if adversary:
            update.perturb()                       # save x, x <- x + eps, clear grads
            try: ...pass 2 backward...
            finally: update.restore()              # x <- saved copy, bit for bit
        ...base optimizer step...
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        rho: float,
        theta: float,
        adversary_prob: float = 1.0,
        seed: int = 0,
        adaptive: bool = False,
        param_names: list[str] | None = None,
    ) -> None:
        check_hyperparameters(rho, theta, adversary_prob)
        if adaptive:
            raise NotImplementedError("adaptive")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")
        self.param_names = param_names
        self.rho = float(rho)
        self.theta = float(theta)
        self.adversary_prob = float(adversary_prob)
        self.seed = int(seed)
        self.step = 0
        self.perturbed = False
        self._group = _shard_group(self.params)
        local = [_local(p) for p in self.params]
        device = local[0].device
        # d lives in fp32 whatever the weights are: bf16 would round the EMA away within a few steps.
        self.d = [torch.zeros_like(p, dtype=torch.float32) for p in local]
        self._backup: list[torch.Tensor] | None = None
        self._scale = torch.zeros((), device=device)  # rho / ||d|| of this step (0: no perturbation)
        self._d_sq = torch.zeros((), device=device)  # ||d_{t-1}||^2, for the cosine between adversaries
        self._initialized = torch.zeros((), dtype=torch.bool, device=device)
        self._host_initialized: bool | None = False  # mirror of _initialized; None when only the device knows
        self._window = torch.zeros(9, device=device)

    # ------------------------------------------------------------------ the step

    def is_adversary_step(self, step: int | None = None) -> bool:
        """This step's eVASSO coin: a pure function of (seed, step), identical on every rank and after a resume."""
        if self.adversary_prob >= 1.0:
            return True
        if self.adversary_prob <= 0.0:
            return False
        step = self.step if step is None else step
        return random.Random(f"hf_vasso:{self.seed}:{step}").random() < self.adversary_prob

    adversary_step = is_adversary_step

    def guard_perturbed_gradient(self, grad_scale=None) -> None:
        pass

    @torch.no_grad()
    def absorb_gradient(self, grad_scale: torch.Tensor | None = None) -> None:
        """Fold the pass-1 gradient into d and compute this step's adversary scale; advance the step count.

        `grad_scale` is the loss scale the gradients carry (fp16 with a GradScaler). With it, a non-finite gradient
        leaves d untouched and the step unperturbed, decided on the device.
        """
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(d) for p, d in zip(self.params, self.d)]
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        g_sq = torch.stack(norms).square().sum()
        dot = torch.stack([torch.dot(g.reshape(-1).float(), d.reshape(-1)) for g, d in zip(grads, self.d)]).sum()
        if self._group is not None:
            g_sq, dot = self._all_reduce(torch.stack([g_sq, dot]))
        inv_scale = 1.0 if grad_scale is None else grad_scale.float().reciprocal()
        finite = torch.isfinite(g_sq)
        d_sq_prev = self._d_sq

        if grad_scale is None:
            if self._host_initialized is None:
                self._host_initialized = bool(self._initialized.item())  # once, after a guarded step or a load
            weight = self.theta if self._host_initialized else 1.0
            self._ema_fast(grads)
        else:
            weight = self._ema_guarded(grads, finite, inv_scale)
        d_sq = torch.stack(torch._foreach_norm(self.d, 2)).square().sum()
        if self._group is not None:
            d_sq = self._all_reduce(d_sq)
        d_norm = d_sq.sqrt()
        self._scale = torch.where(finite & (d_norm > 0), self.rho / d_norm, 0.0)
        self._d_sq = d_sq
        self.step += 1

        # <d_t, d_{t-1}> = (1 - w) ||d_{t-1}||^2 + w <g, d_{t-1}>: the cosine between successive adversaries
        # without keeping the previous one.
        grad_norm = g_sq.sqrt() * inv_scale
        inner = (1 - weight) * d_sq_prev + weight * dot * inv_scale
        denom = d_norm * d_sq_prev.sqrt()
        cos_valid = finite & (denom > 0)
        cos = torch.where(cos_valid, inner / denom, 0.0)
        stats = torch.stack(
            [
                torch.ones_like(g_sq),
                torch.zeros_like(g_sq),
                torch.where(finite, grad_norm, 0.0),
                d_norm,
                cos,
                cos_valid.float(),
                torch.zeros_like(g_sq),
                torch.zeros_like(g_sq),
                (~finite).float(),
            ]
        )
        self._window += stats

    def _ema_fast(self, grads: list[torch.Tensor]) -> None:
        """d <- g on the first step, else (1 - theta) d + theta g. Host-known weights: foreach kernels only."""
        if self._host_initialized:
            torch._foreach_mul_(self.d, 1.0 - self.theta)
            torch._foreach_add_(self.d, grads, alpha=self.theta)
        else:
            torch._foreach_copy_(self.d, grads)
        self._initialized.fill_(True)
        self._host_initialized = True

    def _ema_guarded(self, grads: list[torch.Tensor], finite: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
        """The EMA for scaled (fp16) gradients that may be non-finite; returns the weight w used (a device scalar)."""
        weight = torch.where(self._initialized, self.theta, 1.0)
        keep, take = 1.0 - weight, weight * inv_scale
        for d, g in zip(self.d, grads):
            # Written through torch.where, not a product with 0: 0 * inf is NaN, and d must stay finite.
            torch.where(finite, d * keep + g.float() * take, d, out=d)
        self._initialized |= finite
        self._host_initialized = None
        return torch.where(finite, weight, 0.0)

    @torch.no_grad()
    def perturb(self) -> None:
        """Save the weights, move them to x + eps, and clear the gradients for pass 2."""
        if self.perturbed:
            raise RuntimeError("VASSO: perturb() called twice without restore(); the saved weights would be lost.")
        local = [_local(p) for p in self.params]
        if self._backup is None:
            self._backup = [torch.empty_like(p) for p in local]
        torch._foreach_copy_(self._backup, local)
        self.perturbed = True
        torch._foreach_add_(local, torch._foreach_mul(self.d, self._scale))
        for p in self.params:
            p.grad = None
        self._window[_ADVERSARY] += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by `perturb()`, bit for bit (x + eps - eps is not x in floating point)."""
        if not self.perturbed:
            return
        torch._foreach_copy_([_local(p) for p in self.params], self._backup)
        self.perturbed = False

    def record_losses(self, clean_loss: torch.Tensor, perturbed_loss: torch.Tensor) -> None:
        """Add an adversary step's loss before and after the perturbation (device tensors) to the metric window."""
        self._window[_CLEAN_LOSS] += clean_loss.detach().float().reshape(())
        self._window[_PERTURBED_LOSS] += perturbed_loss.detach().float().reshape(())

    # ------------------------------------------------------------------ metrics and state

    def pop_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Averages over the steps since the last call, as `vasso/*` floats; the one host sync of the window.

        `reduce` (for example `accelerator.reduce(t, "mean")`) averages the window over processes first.
        """
        window = self._window.clone() if reduce is None else reduce(self._window.clone())
        self._window.zero_()
        s = window.tolist()
        if s[_STEPS] == 0:
            return {}
        metrics = {
            "vasso/adversary_fraction": s[_ADVERSARY] / s[_STEPS],
            "vasso/grad_norm": s[_GRAD_NORM] / max(s[_STEPS] - s[_NONFINITE], 1),
            "vasso/d_norm": s[_D_NORM] / s[_STEPS],
            "vasso/nonfinite_fraction": s[_NONFINITE] / s[_STEPS],
        }
        if s[_COS_COUNT] > 0:
            metrics["vasso/adversary_cosine"] = s[_COS] / s[_COS_COUNT]
        if s[_ADVERSARY] > 0:
            metrics["vasso/perturbed_loss"] = s[_PERTURBED_LOSS] / s[_ADVERSARY]
            metrics["vasso/sharpness"] = (s[_PERTURBED_LOSS] - s[_CLEAN_LOSS]) / s[_ADVERSARY]
        return metrics

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (the coin stream is a function of the step)."""
        if self.perturbed:
            raise RuntimeError("VASSO state saved while the weights are perturbed; call restore() first.")
        return {
            "d": [d.clone() for d in self.d],
            "step": self.step,
            "initialized": bool(self._initialized.item()),
            "param_names": self.param_names,
            "rho": self.rho,
            "theta": self.theta,
            "adversary_prob": self.adversary_prob,
            "seed": self.seed,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict, expected_step=None) -> None:
        d = state["d"]
        if len(d) != len(self.d) or any(a.shape != b.shape for a, b in zip(d, self.d)):
            raise ValueError(
                f"The saved VASSO state holds {len(d)} tensors that do not match the {len(self.d)} trainable "
                "parameters of this model: resume with the same model, adapters and trainable parameters."
            )
        if self.param_names is not None and state.get("param_names") not in (None, self.param_names):
            raise ValueError("The saved VASSO state was written for other trainable parameters (names differ).")
        torch._foreach_copy_(self.d, [t.to(device=o.device, dtype=o.dtype) for t, o in zip(d, self.d)])
        self.step = int(state["step"])
        self._initialized.fill_(bool(state["initialized"]))
        self._host_initialized = bool(state["initialized"])
        d_sq = torch.stack(torch._foreach_norm(self.d, 2)).square().sum()
        self._d_sq = self._all_reduce(d_sq) if self._group is not None else d_sq

    def state_bytes(self) -> int:
        """Bytes VASSO keeps beside the model: d (fp32) and, once allocated, the saved weights."""
        backup = self._backup if self._backup is not None else [_local(p) for p in self.params]
        return sum(t.numel() * t.element_size() for t in self.d + backup)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t, group=self._group)
        return t
