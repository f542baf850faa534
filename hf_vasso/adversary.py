"""The adversary geometry: how the direction d becomes the perturbation ε. One small class per variant, chosen by name.

`VassoUpdate` keeps d (the EMA of pass-1 gradients) and asks each param group's geometry two things every step: the
squared norm that ε is normalised by, and the in-place move w <- w + ε. A group's own ρ scales its part of ε; the norm
is one global norm over every group (the semantics of davda54/sam and pytorch_optimizer's `SAM`).

- `"vasso"`, `VassoAdversary` (VASSO, arXiv 2309.15639 / 2509.02433; SAM when θ = 1):  ε = ρ · d / ‖d‖
- `"asam"`, `AsamAdversary` (ASAM, Kwon et al. 2021), with T = |w| elementwise:  ε = ρ · T²d / ‖T·d‖

A geometry is selected by its name everywhere a user can select one: the `adversary` field of `VassoConfig`, the
`adversary` keyword of `VASSO` and `VassoUpdate`, and an `"adversary"` key in a param group (`resolve_adversary`
reads them all; `adaptive=True`, the switch of davda54/sam and pytorch_optimizer, is an alias of `"asam"`). A new
geometry is a subclass of `AdversaryGeometry` decorated with `@register_geometry`: it is selectable by its name at
once, and the tests that iterate `GEOMETRIES` (identities, memory, low precision, extreme norms) hold it to the same
contracts as the built-in ones.

The seam admits elementwise functions of (w, d) with one global norm: SAM, VASSO, ASAM, Fisher-SAM's diagonal metric,
a sign adversary. It does not admit variants that need state or a direction other than d: FriendlySAM (its own
momentum of g − EMA), GSAM (a descent step orthogonal to the ascent), those need another seam (docs/design.md).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from .ops import casts_in_kernel, pieces


class AdversaryGeometry(abc.ABC):
    """The contract of an adversary geometry (stateless; the engine builds one instance per name).

    Both methods get one bucket of this rank's local tensors: weights of one device and dtype, and their d (fp32, the
    same shapes). The engine sums `sq_norm` over the buckets, the groups and the ranks (each element counted once),
    then calls `perturb_` with `scale = ρ_group / sqrt(that sum)`, a 0-d fp32 device tensor (0 where the sum is not
    finite or below fp32's smallest normal number).

    Both methods must be elementwise in (w, d), must read no tensor value on the host (no `.item()`, no Python `if` on
    a tensor), may dispatch a fixed number of ops per tensor (or one foreach op per bucket), and may allocate
    temporaries of at most one fp32 tensor of the bucket at a time. Low-precision weights are moved in their own
    dtype with w + ε computed in fp32 and rounded once. Where a mixed-dtype op casts inside its kernel
    (`casts_in_kernel`: every accelerator) one mixed op does it; on a CPU, where a mixed op first copies each
    low-precision operand to fp32, work on fp32 copies of one tensor (or, for two temporaries, of half a tensor:
    `pieces`) at a time.

    Class attributes the engine reads:
        name: the key in `GEOMETRIES`, the value users select it by.
        eps_parallel_to_d: ε ∝ d within a group, so the cosine between successive ε follows from norms of d alone
            (the `vasso/adversary_cosine` metric is logged only then, and only with one ρ for every group).
        sq_norm_is_d_sq: `sq_norm` is exactly Σ‖d_i‖², so the engine reuses the ‖d‖² it already has.
    """

    name: ClassVar[str]
    eps_parallel_to_d: ClassVar[bool] = False
    sq_norm_is_d_sq: ClassVar[bool] = False

    @abc.abstractmethod
    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """This bucket's part of the squared norm ε is normalised by (fp32 0-d tensor, not yet summed over ranks)."""

    @abc.abstractmethod
    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scale: torch.Tensor) -> None:
        """w_i += ε_i in place, ε_i the geometry's direction times `scale`, each computed before its w_i moves."""


GEOMETRIES: dict[str, type[AdversaryGeometry]] = {}


def register_geometry(cls: type[AdversaryGeometry]) -> type[AdversaryGeometry]:
    """Class decorator: add a geometry to `GEOMETRIES` under its `name`, selectable by that name from then on.

    Raises:
        TypeError: not an `AdversaryGeometry` subclass with a string `name`, or its name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdversaryGeometry)) or not isinstance(
        getattr(cls, "name", None), str
    ):
        raise TypeError(f"{cls!r} is not an AdversaryGeometry subclass with a `name`.")
    if cls.name in GEOMETRIES or cls.name in ALIASES:
        raise TypeError(f"The adversary geometry name {cls.name!r} is taken.")
    GEOMETRIES[cls.name] = cls
    return cls


# Other names users know a geometry by: the switch of davda54/sam and pytorch_optimizer, and "sam" (θ = 1 is SAM).
ALIASES = {"sam": "vasso", "plain": "vasso", "adaptive": "asam"}


def resolve_adversary(adversary: Any = None, adaptive: Any = None, default: str = "vasso") -> str:
    """The registered geometry name that `adversary` (a name) and `adaptive` (the davda54/pytorch_optimizer switch,
    an alias of "asam") select; `default` when neither is given. The one place a selection is read and checked.

    Raises:
        ValueError: an unknown name, a non-bool `adaptive`, `adaptive=True` with another geometry's name, or
            `adaptive=False` with ASAM's.
    """
    if adaptive is not None and not (isinstance(adaptive, bool) or type(adaptive).__name__ == "bool_"):
        raise ValueError(f"adaptive={adaptive!r} is invalid: pass True (ASAM's adversary) or False (VASSO's).")
    if adversary is None:
        return "asam" if adaptive else default
    name = ALIASES.get(adversary, adversary) if isinstance(adversary, str) else adversary
    if name not in GEOMETRIES:
        raise ValueError(
            f"adversary={adversary!r} is not a registered adversary geometry: choose one of "
            f"{sorted(GEOMETRIES)} (aliases {sorted(ALIASES)}), or register yours with @register_geometry."
        )
    if adaptive and name != "asam":
        raise ValueError(
            f"adaptive=True selects ASAM's adversary but adversary={adversary!r} was given too: pass one of them "
            "(adversary='asam' is the same as adaptive=True)."
        )
    if adaptive is not None and not adaptive and name == "asam":
        raise ValueError(
            f"adaptive=False contradicts adversary={adversary!r} (adaptive=True is ASAM's switch): drop adaptive, or "
            "pick another adversary."
        )
    return name


_INSTANCES: dict[str, AdversaryGeometry] = {}


def geometry(name: str) -> AdversaryGeometry:
    """The geometry registered under `name` (an instance, built once: geometries are stateless)."""
    cls = GEOMETRIES[name]
    if type(_INSTANCES.get(name)) is not cls:  # re-registered under the same name since
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


@register_geometry
class VassoAdversary(AdversaryGeometry):
    """ε = ρ·d/‖d‖: the VASSO adversary (SAM's when θ = 1). Paper: arXiv 2309.15639, 2509.02433.

    Example::

        geometry = VassoAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖d‖², fp32 0-d tensor
        geometry.perturb_(weights, d, rho / sq.sqrt())
    """

    name = "vasso"
    eps_parallel_to_d = True
    sq_norm_is_d_sq = True

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """Σ‖d_i‖² over the bucket (fp32 0-d tensor, not yet summed over ranks)."""
        return torch.stack(torch._foreach_norm(d, 2)).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scale: torch.Tensor) -> None:
        """w_i += scale · d_i in place: one foreach op, no temporary (low-precision w rounded once, in the kernel);
        on a CPU, low-precision w through an fp32 copy of one tensor at a time (three ops a tensor)."""
        if weights[0].dtype == torch.float32 or casts_in_kernel(weights[0]):
            torch._foreach_addcmul_(weights, d, [scale] * len(weights))
            return
        for w, di in zip(weights, d):
            w32 = w.float()
            w32.addcmul_(di, scale)
            w.copy_(w32)  # rounded once
            del w32


@register_geometry
class AsamAdversary(AdversaryGeometry):
    """ε = ρ·T²d/‖T·d‖ with T = |w|: ASAM's scale-invariant adversary (arXiv 2102.11600), d in place of the gradient.

    Equals pytorch_optimizer's `SAM(adaptive=True)` (`e_w = w²·g·ρ/‖|w|·g‖`) when θ = 1. Piece by piece (`pieces`:
    tensors, or halves of low-precision ones on a CPU), with one fp32 tensor's worth of temporaries at a time.

    Example::

        geometry = AsamAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖|w|·d‖²
        geometry.perturb_(weights, d, rho / sq.sqrt())
    """

    name = "asam"

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """Σ‖|w_i|·d_i‖² over the bucket (fp32 0-d tensor, not yet summed over ranks)."""
        return torch.stack([torch.linalg.vector_norm(di * wi) for wi, di in pieces(weights, d)]).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scale: torch.Tensor) -> None:
        """w_i += scale · w_i²·d_i, with w_i²·d_i (fp32) computed before w_i moves; w_i rounded once."""
        for wi, di in pieces(weights, d):
            if wi.dtype == torch.float32 or casts_in_kernel(wi):
                offset = di * wi
                offset.mul_(wi)
                wi.addcmul_(offset, scale)
            else:  # a CPU's mixed ops copy wi to fp32: work on the copy (the piece is half a tensor)
                offset = wi.float()
                offset.mul_(offset).mul_(di).mul_(scale)
                offset.add_(wi)  # w + ε in fp32 (wi's fp32 copy here is the second half-tensor temporary)
                wi.copy_(offset)  # rounded once
            del offset  # freed before the next piece's is allocated
