"""Mixed precision on a CUDA GPU, where CPUs cannot go: fp16 with the Trainer's real GradScaler (including a forced
overflow step) and bf16 (autocast over fp32 weights, and pure bf16 weights). Skipped without CUDA.

Everything is observed through public hooks: `compute_loss` sees the weights at every pass (pass 1 at x, pass 2 at
x + eps), `on_pre_optimizer_step` sees them after the restore, and `trainer.vasso` holds d. The fp32 reference is the
independent loop of `tests/helpers.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_args, make_data, make_dataset, make_model, reference_vasso
from transformers import TrainerCallback

from hf_vasso import VassoTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RHO = 0.1


class ProbedTrainer(VassoTrainer):
    """Records the trainable weights at every `compute_loss` call and before every optimizer step; on
    `poison_step` it turns the gradient of the (finite) loss into inf, as an fp16 overflow does."""

    poison_step: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[list[torch.Tensor]] = []
        self.steps: list[dict] = []
        self.add_callback(_StepProbe(self))

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.calls.append(self.snapshot())
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.state.global_step == self.poison_step:
            loss = result[0] if return_outputs else result
            loss.register_hook(lambda grad: grad * float("inf"))
        return result


class _StepProbe(TrainerCallback):
    def __init__(self, trainer: ProbedTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t.calls.clear()
        self.before = t.snapshot()
        self.d_before = [d.clone() for d in t.vasso.d] if t.vasso is not None and t.vasso.d else None
        scaler = t.accelerator.scaler
        self.scale_before = None if scaler is None else float(scaler.get_scale())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restored = self.trainer.snapshot()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        calls, ga = t.calls, args.gradient_accumulation_steps
        pass1, pass2 = calls[:ga], calls[ga : 2 * ga]
        eps = None
        if pass2:
            eps = math.sqrt(sum(((b.double() - a.double()) ** 2).sum().item() for a, b in zip(pass1[0], pass2[0])))
        d = [x.clone() for x in t.vasso.d]
        scaler = t.accelerator.scaler
        t.steps.append(
            {
                "poisoned": state.global_step - 1 == t.poison_step,
                "eps_norm": eps,
                "restore_exact": all(torch.equal(a, b) for a, b in zip(pass1[0], self.restored)),
                "weights_unchanged": all(torch.equal(a, b) for a, b in zip(self.before, t.snapshot())),
                "d_unchanged": self.d_before is not None and all(torch.equal(a, b) for a, b in zip(self.d_before, d)),
                "d_finite": all(bool(torch.isfinite(x).all()) for x in d),
                "d_norm": float(torch.stack([x.float().norm() for x in d]).norm()),
                "d_dtypes": {x.dtype for x in d},
                "scale": (self.scale_before, None if scaler is None else float(scaler.get_scale())),
            }
        )


def train(tmp_path, model=None, **overrides) -> ProbedTrainer:
    args = make_args(tmp_path, use_cpu=not torch.cuda.is_available(), rho=RHO, max_steps=6, **overrides)
    trainer = ProbedTrainer(model=model or make_model(), args=args, train_dataset=make_dataset())
    trainer.train()
    return trainer


def first_d_norm() -> float:
    """||d|| after step 1 (d = g_1) from the independent fp32 reference loop."""
    x, y = make_data()
    _, records = reference_vasso(make_model(), x, y, steps=1, lr=1e-2, rho=RHO, theta=0.4)
    return float(torch.stack([d.norm() for d in records[0]["d"]]).norm())


def test_fp32_on_gpu_follows_the_reference_loop(tmp_path):
    x, y = make_data()
    ref, _ = reference_vasso(make_model(), x, y, steps=6, lr=1e-2, rho=RHO, theta=0.4)
    trainer = train(tmp_path)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=1e-4, msg=name)
    assert all(s["restore_exact"] for s in trainer.steps)
    assert all(s["eps_norm"] == pytest.approx(RHO, rel=1e-4) for s in trainer.steps)


def test_fp16_overflow_step_is_skipped_and_leaves_d_alone(tmp_path):
    poison = 3
    args = make_args(tmp_path, use_cpu=not torch.cuda.is_available(), rho=RHO, max_steps=7, fp16=True)
    trainer = ProbedTrainer(model=make_model(), args=args, train_dataset=make_dataset())
    trainer.poison_step = poison
    assert trainer.accelerator.scaler is not None and trainer.accelerator.scaler.is_enabled()
    trainer.train()
    steps = trainer.steps
    poisoned = [s for s in steps if s["poisoned"]]
    assert len(poisoned) == 1
    (bad,) = poisoned
    assert bad["weights_unchanged"], "the scaler must skip the overflow step"
    assert bad["d_unchanged"] and bad["d_finite"], "a non-finite pass-1 gradient must not enter d"
    assert bad["eps_norm"] in (None, 0.0), "a non-finite step must not perturb the weights"
    assert bad["scale"][1] < bad["scale"][0], "the loss scale backs off after the overflow"
    clean = [s for s in steps if not s["poisoned"]]
    assert all(s["restore_exact"] for s in steps)
    assert all(not s["weights_unchanged"] for s in clean)
    assert all(s["eps_norm"] == pytest.approx(RHO, rel=1e-3) for s in clean)
    assert all(s["d_finite"] and s["d_dtypes"] == {torch.float32} for s in steps)
    # pass-1 gradients are unscaled before they enter d: ||d_1|| as in fp32
    assert steps[0]["d_norm"] == pytest.approx(first_d_norm(), rel=0.05)
    for log in trainer.state.log_history:
        for key, value in log.items():
            if key == "loss" or key.startswith("vasso/"):
                assert math.isfinite(value), (key, log)
    assert sum(log.get("vasso/nonfinite_fraction", 0.0) for log in trainer.state.log_history) > 0


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_bf16(tmp_path, weights):
    model = make_model()
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    trainer = train(tmp_path, model=model, bf16=True, gradient_accumulation_steps=2, per_device_train_batch_size=16)
    steps = trainer.steps
    assert all(s["d_dtypes"] == {torch.float32} and s["d_finite"] for s in steps)
    assert all(s["restore_exact"] for s in steps)
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    # a wrong scale (d from unnormalised micro-batch gradients) would be off by 2x; bf16 rounding is not
    assert steps[0]["d_norm"] == pytest.approx(first_d_norm(), rel=0.05 if weights == "fp32" else 0.1)
    if weights == "fp32":  # with bf16 weights x + eps is rounded to bf16: ||eps|| is not rho (any SAM), not gated
        assert all(s["eps_norm"] == pytest.approx(RHO, rel=1e-3) for s in steps)
