"""The adversary geometry: how the direction d becomes the perturbation ε. One small class per variant.

`VassoUpdate` keeps d (the EMA of pass-1 gradients) and asks each param group's geometry two things every step: the
squared norm that ε is normalised by, and the in-place move x <- x + ε. A parameter group's own ρ scales its part of
ε; the norm is one global norm over every group (the semantics of davda54/sam and pytorch_optimizer's `SAM`).

- `PlainAdversary` (VASSO, arXiv 2309.15639 / 2509.02433; SAM when θ = 1):  ε = ρ · d / ‖d‖
- `AdaptiveAdversary` (ASAM, Kwon et al. 2021), with T = |w| elementwise:  ε = ρ · T²d / ‖T·d‖

The engine builds each group's geometry from `GEOMETRIES`, by the key that the user-facing switch selects
(`ADAPTIVE_SWITCH`: `adaptive=True` is "adaptive", False is "plain"; the switch of davda54/sam and
pytorch_optimizer). A third geometry is a subclass of `AdversaryGeometry` decorated with `@register_geometry`; the
identity tests (`tests/test_engine_variants.py`, `tests/test_identities.py`) run over every key of `GEOMETRIES`, so
it is tested as soon as it is registered. Users reach it once a switch maps to its key.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch


class AdversaryGeometry(abc.ABC):
    """The contract of an adversary geometry (stateless; the engine builds one instance per param group).

    All tensors are this rank's local shards, in one list order: `weights[i]` the weight, `d[i]` its fp32 d (for
    large bf16 weights under a geometry with `eps_parallel_to_d`, `perturb_` gets d rounded to bf16: see
    `update._perturb`). The engine sums `sq_norm` over the groups and over the ranks (each element counted once),
    then calls `perturb_` with `scales[i] = ρ_group / sqrt(that sum)`, all 0-d device tensors (0 where the sum is not
    finite or below fp32's smallest normal number).
    Both methods must be elementwise in (w, d) (ε_i a function of w_i and d_i element by element, the squared norm a
    sum of elementwise terms): low-precision weights reach them as fp32 copies of flat pieces of a tensor (see
    `update._fp32_pieces`), the pieces' squared norms summed and each piece copied back after `perturb_`. Each method
    may allocate temporaries of one tensor (or piece) at a time, never more.
    Neither method may read a tensor value on the host (no `.item()`, no Python `if` on a tensor).

    Class attributes the engine reads:
        name: the key in `GEOMETRIES`.
        eps_parallel_to_d: ε ∝ d with one ρ, so the cosine between successive ε follows from norms of d alone
            (the `vasso/adversary_cosine` metric is logged only then).
        sq_norm_is_d_sq: `sq_norm` is exactly Σ‖d_i‖², so a one-group engine can reuse the ‖d‖² it already has.
    """

    name: ClassVar[str]
    eps_parallel_to_d: ClassVar[bool] = False
    sq_norm_is_d_sq: ClassVar[bool] = False

    @abc.abstractmethod
    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """This rank's part of the squared norm ε is normalised by (fp32 0-d tensor, not yet summed over ranks)."""

    @abc.abstractmethod
    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        """w_i += ε_i in place, ε_i the geometry's direction times `scales[i]`, all computed before any w_i moves."""


GEOMETRIES: dict[str, type[AdversaryGeometry]] = {}


def register_geometry(cls: type[AdversaryGeometry]) -> type[AdversaryGeometry]:
    """Class decorator: add a geometry to `GEOMETRIES` under its `name`.

    Raises:
        TypeError: not an `AdversaryGeometry` subclass, or its name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdversaryGeometry)) or not isinstance(
        getattr(cls, "name", None), str
    ):
        raise TypeError(f"{cls!r} is not an AdversaryGeometry subclass with a `name`.")
    if cls.name in GEOMETRIES:
        raise TypeError(f"The adversary geometry name {cls.name!r} is taken by {GEOMETRIES[cls.name].__name__}.")
    GEOMETRIES[cls.name] = cls
    return cls


# The user-facing switch (`adaptive`, a config field and a param-group key) -> the `GEOMETRIES` key it selects.
ADAPTIVE_SWITCH = {False: "plain", True: "adaptive"}


def make_geometry(adaptive: bool) -> AdversaryGeometry:
    """The geometry the switch selects, built from the registry (read at call time)."""
    return GEOMETRIES[ADAPTIVE_SWITCH[adaptive]]()


def _zero_norm(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros((), device=weights[0].device if weights else "cpu")


@register_geometry
class PlainAdversary(AdversaryGeometry):
    """ε = ρ·d/‖d‖: the VASSO adversary (SAM's when θ = 1). Paper: arXiv 2309.15639, 2509.02433.

    Example::

        geometry = PlainAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖d‖², fp32 0-d tensor
        geometry.perturb_(weights, d, [rho / sq.sqrt()] * len(d))
    """

    name = "plain"
    eps_parallel_to_d = True
    sq_norm_is_d_sq = True

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """Σ‖d_i‖² over these tensors (fp32 0-d tensor, not yet summed over ranks)."""
        if not d:
            return _zero_norm(weights)
        return torch.stack(torch._foreach_norm(d, 2)).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        """w_i += scale_i · d_i in place, with no full temporary."""
        torch._foreach_addcmul_(weights, d, scales)


@register_geometry
class AdaptiveAdversary(AdversaryGeometry):
    """ε = ρ·T²d/‖T·d‖ with T = |w|: ASAM's scale-invariant adversary (arXiv 2102.11600), d in place of the gradient.

    Equals pytorch_optimizer's `SAM(adaptive=True)` (`e_w = w²·g·ρ/‖|w|·g‖`) when θ = 1. It works tensor by
    tensor, with one fp32 temporary the size of the tensor at hand.

    Example::

        geometry = AdaptiveAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖|w|·d‖²
        geometry.perturb_(weights, d, [rho / sq.sqrt()] * len(d))
    """

    name = "adaptive"

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """Σ‖|w_i|·d_i‖² over these tensors (fp32 0-d tensor, not yet summed over ranks)."""
        if not d:
            return _zero_norm(weights)
        # |w|·d tensor by tensor (fp32, d is fp32): one tensor's temporary at a time, never the model's.
        return torch.stack([torch.linalg.vector_norm(di * wi) for wi, di in zip(weights, d)]).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        """w_i += scale_i · w_i²·d_i, with w²·d computed before any weight moves."""
        for wi, di, si in zip(weights, d, scales):
            offset = di * wi
            offset.mul_(wi)
            if wi.dtype == offset.dtype:
                wi.addcmul_(offset, si)
            else:  # low precision: w + s·offset in fp32 into the offset, rounded once by the copy (no third temporary)
                torch.addcmul(wi, offset, si, out=offset)
                wi.copy_(offset)
            del offset  # freed before the next tensor's is allocated: one temporary at a time
