"""The VASSO step exactly as `docs/algorithm.md` states it, in plain tensor code: the one reference that the
differential matrix (`test_matrix.py`) compares both front ends with.

It shares nothing with `hf_vasso` beyond the coin, whose specification is a function of (seed, step). Written for
clarity, not speed: Python lists, `torch.autograd.grad`, float64 norms, clones for the restore.
"""

from __future__ import annotations

import math
import random

import torch

TINY = torch.finfo(torch.float32).tiny  # a squared norm below fp32's smallest normal number gives no perturbation


def coin(seed: int, step: int, p: float) -> bool:
    """eVASSO's coin of optimizer step `step` (0-based): the same on every rank and after a resume."""
    return p >= 1 or (p > 0 and random.Random(f"hf_vasso:{seed}:{step}").random() < p)


class ReferenceVASSO:
    """VASSO over the trainable parameters of `optimizer`'s groups (SAM with θ = 1, eVASSO with p < 1).

    A group's ρ is `group[rho_key]` when the group has it, else `self.rho`, read at every step (a schedule changes
    either); its geometry is `group[adversary_key]` ("vasso": ε = ρ·d/‖·‖, "asam": ε = ρ·w²·d/‖·‖), else
    `self.adversary`; the norm is one global norm over every group.
    """

    def __init__(self, optimizer, *, rho, theta, adversary_prob=1.0, seed=42, adversary="vasso", rho_key="rho"):
        self.optimizer, self.rho, self.theta, self.p, self.seed = optimizer, rho, theta, adversary_prob, seed
        self.adversary, self.rho_key = adversary, rho_key
        self.d: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> d (fp32); absent before its first gradient
        self.t = 0

    def step(self, loss_fn, buffers=()) -> dict:
        """One optimizer step. `loss_fn()` is the step's loss over all its micro-batches; `buffers` are the tensors
        that pass 2 must leave as pass 1 left them. Returns the step's metrics."""
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.optimizer.param_groups]
        params = [p for _, ps in groups for p in ps]
        self.d = {p: self.d[p] for p in params if p in self.d}  # a frozen parameter's d is dropped
        loss = loss_fn()
        g = _grads(loss, params)
        finite = all(torch.isfinite(x).all() for x in g if x is not None)
        if finite:  # a non-finite gradient never enters d
            for p, gi in zip(params, g):
                gi = torch.zeros_like(p) if gi is None else gi.float()
                self.d[p] = gi.clone() if p not in self.d else (1 - self.theta) * self.d[p] + self.theta * gi
        metrics = {"loss": loss.item(), "moved": False}
        if finite:
            metrics["grad_norm"] = math.sqrt(sum((x.double() ** 2).sum().item() for x in g if x is not None))
        if self.d:
            metrics["d_norm"] = math.sqrt(sum((d.double() ** 2).sum().item() for d in self.d.values()))
        step_grads = g
        if coin(self.seed, self.t, self.p):
            sq = sum(self._sq_norm_term(group, p) for group, ps in groups for p in ps)
            valid = finite and sq >= TINY and math.isfinite(math.sqrt(sq))
            metrics["moved"] = valid and any(group.get(self.rho_key, self.rho) > 0 for group, ps in groups if ps)
            saved = [p.detach().clone() for p in params]
            saved_buffers = [b.clone() for b in buffers]
            with torch.no_grad():
                for group, ps in groups:
                    for p in ps:
                        if valid:  # ε = ρ_group · direction / ‖·‖, one global norm over every group
                            p.add_(
                                (group.get(self.rho_key, self.rho) * self._direction(group, p) / sq**0.5).to(p.dtype)
                            )
            perturbed = loss_fn()
            h = _grads(perturbed, params)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
                for b, s in zip(buffers, saved_buffers):
                    b.copy_(s)
            if not all(torch.isfinite(x).all() for x in h if x is not None):  # never reaches the weights
                h = [None if x is None else torch.zeros_like(x) for x in h]
            step_grads = h
            if metrics["moved"]:
                metrics.update(perturbed_loss=perturbed.item(), sharpness=perturbed.item() - loss.item())
        for p, gi in zip(params, step_grads):
            p.grad = gi
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.t += 1
        return metrics

    def _asam(self, group) -> bool:
        return group.get("adversary", self.adversary) == "asam"

    def _direction(self, group, p) -> torch.Tensor:
        """ε's direction for p before scaling: d (VASSO), w²·d (ASAM); in float64."""
        d = self.d[p].double()
        return p.detach().double() ** 2 * d if self._asam(group) else d

    def _sq_norm_term(self, group, p) -> float:
        """p's part of the squared norm ε is normalised by: ‖d‖² (VASSO), ‖|w|·d‖² (ASAM); 0 without a d yet."""
        if p not in self.d:
            return 0.0
        t = p.detach().double().abs() * self.d[p].double() if self._asam(group) else self.d[p].double()
        return (t**2).sum().item()


def _grads(loss, params):
    """d loss / d p for each parameter; None where the loss does not depend on it (an unused parameter)."""
    return list(torch.autograd.grad(loss, params, allow_unused=True))
