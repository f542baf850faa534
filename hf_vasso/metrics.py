"""The engine's metric window: running sums on the device, turned into the logged `vasso/*` averages.

Every value is added by name, so a row cannot drift out of line with the list of names; the window is read (one
host sync) only when the caller logs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The running sums, in storage order (the names are the only way in or out).
WINDOW = (
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
_INDEX = {name: i for i, name in enumerate(WINDOW)}

# (logged key, running sum, the sum that counts its steps): averages that exist only when something was measured.
_AVERAGES = (
    ("vasso/grad_norm", "grad_norm", "finite_steps"),
    ("vasso/d_norm", "d_norm", "d_count"),
    ("vasso/adversary_cosine", "cos", "cos_count"),
    ("vasso/perturbed_loss", "perturbed_loss", "perturbed_count"),
    ("vasso/sharpness", "sharpness", "sharpness_count"),
    ("vasso/perturbed_nonfinite_fraction", "perturbed_nonfinite", "guarded"),
)


class MetricWindow:
    """Sums of the per-step metric values since the last `pop`, as one fp32 device tensor."""

    def __init__(self, device: torch.device) -> None:
        self._sums = torch.zeros(len(WINDOW), device=device)

    def to(self, device: torch.device) -> None:
        """Move the running sums to `device` (the model moved after the engine was built); a no-op when there."""
        if self._sums.device != device:
            self._sums = self._sums.to(device)

    def add(self, **values: torch.Tensor | float) -> None:
        """Add one step's values, each by its name in `WINDOW` (0-d device tensors or numbers); no host sync.

        Raises:
            KeyError: a name that is not in `WINDOW`.
        """
        unknown = sorted(set(values) - _INDEX.keys())
        if unknown:
            raise KeyError(f"unknown metric window entries {unknown}; the window holds {WINDOW}")
        if len(values) == 1:
            ((name, value),) = values.items()
            self._sums[_INDEX[name]] += value
            return
        zero = self._sums.new_zeros(())
        row = [values.get(name, zero) for name in WINDOW]
        self._sums += torch.stack([v if isinstance(v, torch.Tensor) else zero + v for v in row])

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The averages since the last call as `vasso/*` floats, then an empty window; the one host sync.

        A metric is absent when nothing in the window measured it (see the README's "Logged metrics").

        Args:
            reduce: averages the sums over processes first, e.g. `lambda t: accelerator.reduce(t, "mean")`.
        """
        sums = self._sums.clone() if reduce is None else reduce(self._sums.clone())
        self._sums.zero_()
        s = dict(zip(WINDOW, sums.tolist()))
        if s["steps"] == 0:
            return {}
        s["finite_steps"] = s["steps"] - s["nonfinite"]
        metrics = {
            "vasso/adversary_fraction": s["moved"] / s["steps"],
            "vasso/nonfinite_fraction": s["nonfinite"] / s["steps"],
        }
        for key, total, count in _AVERAGES:
            if s[count] > 0:
                metrics[key] = s[total] / s[count]
        return metrics


def consecutive_cosine(theta, g_sq, d_sq, previous, dots, inv, finite) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos(d_t, d_{t-1}), whether it is defined)`, 0-d device tensors, without keeping d_{t-1}: <d_t, d_{t-1}>
    follows from squared norms for θ < 1, (‖d_t‖² + (1-θ)²‖d_{t-1}‖² - θ²‖g‖²) / (2(1-θ)), and from <g, d_{t-1}>
    (`dots`) for θ = 1. Per cohort: `g_sq`, `d_sq` (this step), `previous` ((‖d_{t-1}‖², had d) each); a cohort on
    its first step had no d_{t-1} and contributes 0. `inv`: 1 / the loss scale the gradients carry, or None."""
    inv_sq = 1.0 if inv is None else inv * inv
    inner = torch.zeros((), device=finite.device)
    for i, (d_sq_prev, was_initialized) in enumerate(previous):
        if theta == 1.0:
            term = dots[i] * (1.0 if inv is None else inv)
        else:
            term = (d_sq[i] + (1 - theta) ** 2 * d_sq_prev - theta**2 * g_sq[i] * inv_sq) / (2 * (1 - theta))
        inner = inner + torch.where(was_initialized, term, 0.0)
    denom = d_sq.sum().sqrt() * torch.stack([p for p, _ in previous]).sum().sqrt()
    valid = finite & (denom > 0)
    return torch.where(valid, inner / denom, 0.0).clamp(-1.0, 1.0), valid


def dots_with_d(layout, grads: list[list]) -> torch.Tensor:
    """<g, d_{t-1}> per cohort of `layout` (summed over ranks), for the cosine at θ = 1 (where d_t = g_t); `grads`
    holds each bucket's gradients (None where a tensor has none)."""
    zero = torch.zeros((), device=layout.device)
    per_bucket = [
        sum((torch.vdot(g.reshape(-1).float(), d.reshape(-1)) for g, d in zip(gs, b.d) if g is not None), zero)
        for b, gs in zip(layout.buckets, grads)
    ]
    return layout.cohort_sums(per_bucket)
