"""The adversary geometry: how the direction d becomes the perturbation ε. One small class per variant.

`VassoUpdate` keeps d (the EMA of pass-1 gradients) and asks a geometry two things each step: the squared norm that
ε is normalised by, and the in-place move x <- x + ε. A parameter group's own ρ scales its part of ε; the norm is
one global norm over every group (the semantics of davda54/sam and pytorch_optimizer's `SAM`).

- `PlainAdversary` (VASSO, arXiv 2309.15639 / 2509.02433; SAM when θ = 1):  ε = ρ · d / ‖d‖
- `AdaptiveAdversary` (ASAM, Kwon et al. 2021), with T = |w| elementwise:  ε = ρ · T²d / ‖T·d‖

A new variant is a subclass with `sq_norm` and `perturb_`; the identity tests run over every class in `GEOMETRIES`.
All tensors are the local shards (FSDP2); the caller all-reduces the squared norm over the shard group.
"""

from __future__ import annotations

import torch


class PlainAdversary:
    """ε = ρ·d/‖d‖: the VASSO adversary (SAM's when θ = 1). Paper: arXiv 2309.15639, 2509.02433.

    Example::

        geometry = PlainAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖d‖², fp32 0-d tensor
        geometry.perturb_(weights, d, [rho / sq.sqrt()] * len(d))
    """

    name = "plain"
    # ε ∝ d, so the cosine between successive ε is the cosine between successive d (computable from norms alone).
    eps_parallel_to_d = True

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        """Σ‖d_i‖² over these tensors (fp32 0-d tensor, not yet all-reduced)."""
        if not d:
            return torch.zeros((), device=weights[0].device if weights else "cpu")
        return torch.stack(torch._foreach_norm(d, 2)).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        """w_i += scale_i · d_i in place, with no full temporary (`scales`: 0-d device tensors, ρ_group/‖·‖)."""
        torch._foreach_addcmul_(weights, d, scales)


class AdaptiveAdversary:
    """ε = ρ·T²d/‖T·d‖ with T = |w|: ASAM's scale-invariant adversary (arXiv 2102.11600), d in place of the gradient.

    Equals pytorch_optimizer's `SAM(adaptive=True)` (`e_w = w²·g·ρ/‖|w|·g‖`) when θ = 1. It needs one temporary
    the size of the perturbed weights (fp32) while it computes.

    Example::

        geometry = AdaptiveAdversary()
        sq = geometry.sq_norm(weights, d)              # local ‖|w|·d‖²
        geometry.perturb_(weights, d, [rho / sq.sqrt()] * len(d))
    """

    name = "adaptive"
    eps_parallel_to_d = False

    def sq_norm(self, weights: list[torch.Tensor], d: list[torch.Tensor]) -> torch.Tensor:
        if not d:
            return torch.zeros((), device=weights[0].device if weights else "cpu")
        weighted = torch._foreach_mul(d, weights)  # fp32 (d is fp32)
        return torch.stack(torch._foreach_norm(weighted, 2)).square().sum()

    def perturb_(self, weights: list[torch.Tensor], d: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        offset = torch._foreach_mul(d, weights)
        torch._foreach_mul_(offset, weights)  # w²·d, computed before any weight moves
        torch._foreach_addcmul_(weights, offset, scales)


GEOMETRIES = {"plain": PlainAdversary, "adaptive": AdaptiveAdversary}


def geometry_for(adaptive: bool) -> PlainAdversary | AdaptiveAdversary:
    return AdaptiveAdversary() if adaptive else PlainAdversary()
