"""LoRA, BatchNorm, mixed precision, non-finite gradients, and the restore when pass 2 raises."""

import pytest
import torch
from helpers import make_args, make_data, make_dataset, make_model, tiny_llama, token_dataset, weights
from peft import LoraConfig, get_peft_model

from hf_vasso import VASSO, VassoTrainer, VassoUpdate
from hf_vasso.module_state import BufferSnapshot

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_lora_moves_adapters_and_leaves_base_bit_identical(tmp_path):
    model = tiny_llama()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, max_steps=4, per_device_train_batch_size=8, learning_rate=5e-2)
    trainer = VassoTrainer(model=model, args=args, train_dataset=token_dataset(), peft_config=LoraConfig(**LORA))
    trainer.train()

    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    moved = [n for n, p in trainable.items() if "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == len([n for n in trainable if "lora_B" in n])  # lora_B starts at 0 and moved
    for n, p in trainer.model.named_parameters():
        if not p.requires_grad:
            original = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[original]), n
    # VASSO's buffers are sized to the adapters alone.
    assert sum(d.numel() for d in trainer.vasso.d if d is not None) == sum(p.numel() for p in trainable.values())
    total = sum(p.numel() for p in trainer.model.parameters())
    assert trainer.vasso.state_bytes() < 0.1 * 4 * total


def test_peft_config_with_peft_model_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match="already a PeftModel"):
        VassoTrainer(model=model, args=make_args(tmp_path), train_dataset=token_dataset(), peft_config=LoraConfig())


def test_loss_kwargs_model_with_accumulation_matches_big_batch(tmp_path):
    """A causal LM normalises its loss by num_items_in_batch: pass 2 replays with the same normaliser."""

    def train(**overrides):
        args = make_args(tmp_path, max_steps=3, learning_rate=1e-2, **overrides)
        trainer = VassoTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(n=8))
        trainer.train()
        return trainer

    big = train(per_device_train_batch_size=8)
    small = train(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    diff = max((a - b).abs().max().item() for a, b in zip(big.model.parameters(), small.model.parameters()))
    assert diff < 2e-5


def test_batchnorm_statistics_change_once_per_step(tmp_path):
    """Pass 2 normalises with batch statistics but leaves running stats and the batch counter alone."""
    model = make_model(batchnorm=True)
    reference = make_model(batchnorm=True)
    x, y = make_data()
    reference.train()
    reference(x, labels=y)  # exactly one training-mode forward at the initial weights
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=32)
    trainer = VassoTrainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    bn, bn_ref = trainer.model.net[1], reference.net[1]
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, atol=1e-6, rtol=0)
    assert bn.track_running_stats

    args = make_args(tmp_path, max_steps=5)
    trainer = VassoTrainer(model=make_model(batchnorm=True), args=args, train_dataset=make_dataset())
    trainer.train()
    assert trainer.model.net[1].num_batches_tracked.item() == 5


def test_buffers_come_back_after_an_error_and_after_a_rebinding():
    """The pass-2 snapshot puts every buffer back, values and objects, even when pass 2 raises or rebinds one."""
    model = make_model(batchnorm=True)
    x, y = make_data()
    model(x, labels=y)
    bn = model.net[1]
    saved = {n: b.clone() for n, b in model.named_buffers()}
    objects = {n: b for n, b in model.named_buffers()}
    snapshot = BufferSnapshot(model)
    with pytest.raises(RuntimeError), snapshot.restoring():
        model(x * 2, labels=y)
        bn.running_var = torch.zeros_like(bn.running_var)  # rebound to another tensor
        raise RuntimeError("boom")
    for n, b in model.named_buffers():
        assert b is objects[n] and torch.equal(b, saved[n]), n


class FailsOnSecondPass(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model(batchnorm=True)
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("pass 2 failed")
        return self.inner(x, labels=labels)


def test_weights_restored_when_pass_two_raises(tmp_path):
    model = FailsOnSecondPass()
    before = weights(model)
    trainer = VassoTrainer(model=model, args=make_args(tmp_path, max_steps=1, rho=1.0), train_dataset=make_dataset())
    with pytest.raises(RuntimeError, match="pass 2 failed"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert not trainer.vasso.perturbed
    assert model.inner.net[1].track_running_stats


def test_wrapper_closure_restores_when_it_raises():
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=1.0)
    before = weights(model)
    model(x, labels=y)["loss"].backward()

    def closure():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        optimizer.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def scaled_backward(model, scaler, x, y):
    scaler.scale(model(x, labels=y)["loss"]).backward()


def test_fp16_scaled_gradient_enters_d_unscaled():
    """With a GradScaler, d sees g / scale, the same d as unscaled training, without calling unscale_."""
    x, y = make_data()
    plain, scaled = make_model(), make_model()
    plain(x, labels=y)["loss"].backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled_backward(scaled, scaler, x, y)
    a = VassoUpdate(plain.parameters(), rho=0.1, theta=0.4)
    b = VassoUpdate(scaled.parameters(), rho=0.1, theta=0.4)
    a.absorb_gradient()
    b.absorb_gradient(scaler._scale)
    for da, db in zip(a.d, b.d):
        torch.testing.assert_close(da, db, atol=1e-7, rtol=1e-6)
    a.perturb()
    b.perturb()
    for pa, pb in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6)


class LossScaledTrainer(VassoTrainer):
    """The Trainer's fp16 path on a CPU (where `fp16=True` trains in fp32 with no scaler): a GradScaler in the
    accelerator before it prepares the optimizer, so that `accelerator.backward` scales every loss, Accelerate's
    optimizer step unscales and checks, and `VassoTrainer` reads the scale for d (`_grad_scale`)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)


def test_the_trainers_fp16_loss_scale_is_divided_out_of_d(tmp_path):
    """A loss scale that doubles every step (powers of two scale exactly) leaves the run as the unscaled one: the
    same weights, d and logged `vasso/grad_norm`. If VassoTrainer did not divide the scale out, d would mix gradients
    of different scales and ‖g‖ would be logged scaled."""
    plain = VassoTrainer(make_model(), make_args(tmp_path / "p", max_steps=6), train_dataset=make_dataset())
    plain.train()
    scaled = LossScaledTrainer(make_model(), make_args(tmp_path / "s", max_steps=6), train_dataset=make_dataset())
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0 ** (10 + 6)  # the scale really grew every step
    for (name, a), b in zip(plain.model.named_parameters(), scaled.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(plain.vasso.d, scaled.vasso.d):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    norms = [[row["vasso/grad_norm"] for row in t.state.log_history if "loss" in row] for t in (plain, scaled)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_fp16_overflow_keeps_d_finite_and_weights_unperturbed():
    x, y = make_data()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.4)
    before = weights(model)

    # Step 1 overflows: d stays unset (zero) and the weights are not perturbed.
    scaled_backward(model, scaler, x, y)
    next(model.parameters()).grad[0, 0] = float("inf")
    update.absorb_gradient(scaler._scale)
    assert all(torch.isfinite(d).all() and not d.any() for d in update.d)
    update.perturb()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    update.restore()

    # Step 2 is finite: d is the (unscaled) gradient itself, as on a first step, not theta * g.
    model.zero_grad()
    scaled_backward(model, scaler, x, y)
    expected = [p.grad / scaler._scale for p in model.parameters()]
    update.absorb_gradient(scaler._scale)
    for d, e in zip(update.d, expected):
        torch.testing.assert_close(d, e, atol=1e-7, rtol=1e-6)

    # Step 3 is NaN: d keeps its value exactly.
    d_before = [d.clone() for d in update.d]
    model.zero_grad()
    scaled_backward(model, scaler, x, y)
    next(model.parameters()).grad.fill_(float("nan"))
    update.absorb_gradient(scaler._scale)
    for d, e in zip(update.d, d_before):
        assert torch.equal(d, e)
    metrics = update.pop_metrics()
    assert metrics["vasso/nonfinite_fraction"] == pytest.approx(2 / 3)


def test_bf16_weights_keep_fp32_d_and_restore_exactly():
    model = make_model().to(torch.bfloat16)
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.3, theta=0.4)
    before = weights(model)
    for _ in range(10):
        model(x.bfloat16(), labels=y.bfloat16())["loss"].backward()
        optimizer.first_step(zero_grad=True)
        model(x.bfloat16(), labels=y.bfloat16())["loss"].backward()
        optimizer.second_step(zero_grad=True)
    assert all(d.dtype == torch.float32 for d in optimizer.vasso.d)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_trainer_runs_under_bf16_autocast(tmp_path):
    trainer = VassoTrainer(
        model=make_model(), args=make_args(tmp_path, max_steps=3, bf16=True), train_dataset=make_dataset()
    )
    trainer.train()
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in trainer.vasso.d)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["vasso/adversary_fraction"] == 1.0 for h in logged)
