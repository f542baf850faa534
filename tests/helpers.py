"""Tiny models, data and an independent reference VASSO loop for the core tests.

The reference is written from `docs/algorithm.md` with plain tensor code (autograd.grad, Python lists, a clone for
the restore) and shares nothing with `hf_vasso` beyond the coin function, which is the specification of the coin.
"""

from __future__ import annotations

import copy
import random

import torch
from datasets import Dataset
from torch import nn

from hf_vasso import VassoConfig

N_FEATURES = 6


class TinyRegressor(nn.Module):
    """An MLP with the Trainer's calling convention: `forward(x, labels)` returns a dict with `loss`."""

    def __init__(self, batchnorm: bool = False, hidden: int = 16) -> None:
        super().__init__()
        layers = [nn.Linear(N_FEATURES, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def make_model(seed: int = 0, batchnorm: bool = False, hidden: int = 16) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(batchnorm=batchnorm, hidden=hidden)


def make_data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, N_FEATURES)) + 0.1 * torch.randn(n, generator=g)
    return x, y


def make_dataset(n: int = 32, seed: int = 1) -> Dataset:
    x, y = make_data(n, seed)
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


def make_args(tmp_path, **overrides) -> VassoConfig:
    """Full batch, constant LR, no clipping, no weight decay: the Trainer's AdamW is then plain AdamW."""
    values = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
        rho=0.1,
        theta=0.4,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return VassoConfig(**values)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference_coin(seed: int, step: int, p: float) -> bool:
    if p >= 1:
        return True
    if p <= 0:
        return False
    return random.Random(f"hf_vasso:{seed}:{step}").random() < p


def reference_vasso(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    rho: float,
    theta: float,
    adversary_prob: float = 1.0,
    seed: int = 42,
) -> tuple[nn.Module, list[dict]]:
    """VASSO / eVASSO exactly as `docs/algorithm.md` states it, full batch, AdamW. Returns the model and per-step
    records (d, eps, losses)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_and_grads():
        loss = model(x, labels=y)["loss"]
        return loss, torch.autograd.grad(loss, params)

    d = None
    records = []
    for t in range(steps):
        loss, g = loss_and_grads()
        d = [gi.clone() for gi in g] if d is None else [(1 - theta) * di + theta * gi for di, gi in zip(d, g)]
        record = {"loss": loss.item(), "d": [di.clone() for di in d]}
        if reference_coin(seed, t, adversary_prob):
            norm = torch.sqrt(sum((di.double() ** 2).sum() for di in d)).float()
            eps = [rho * di / norm for di in d] if norm > 0 else [torch.zeros_like(di) for di in d]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            perturbed_loss, h = loss_and_grads()
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            record.update(eps=eps, perturbed_loss=perturbed_loss.item())
            g = h
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
        opt.zero_grad()
        records.append(record)
    return model, records
