"""The trainable set may change mid-run (issue 8 item 6): each step perturbs exactly the parameters that require a
gradient at that step; a frozen parameter neither moves nor dilutes rho; an unfrozen one starts d afresh."""

import copy

import pytest
import torch
from helpers import make_data, make_model, weights

from hf_vasso import VASSO, VassoUpdate

RHO = 0.1


def first_layer(model):
    return list(model.net[0].parameters())


def set_trainable(params, flag):
    for p in params:
        p.requires_grad_(flag)


def pass_one(model, x, y):
    model(x, labels=y)["loss"].backward()


def test_wrapper_freeze_then_unfreeze():
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=RHO, theta=0.4)
    frozen = first_layer(model)
    frozen_ids = {id(p) for p in frozen}

    def step(check):
        pass_one(model, x, y)
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        before = weights(model)
        optimizer.first_step(zero_grad=True)
        check(before, grads)
        pass_one(model, x, y)
        optimizer.second_step(zero_grad=True)

    step(lambda before, grads: None)
    set_trainable(frozen, False)

    def frozen_check(before, grads):
        eps = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            if id(p) in frozen_ids:
                assert not eps[n].any(), f"{n} is frozen but was perturbed"
        trainable = torch.sqrt(sum((e**2).sum() for n, e in eps.items() if not n.startswith("net.0")))
        assert trainable.item() == pytest.approx(RHO, rel=1e-6)  # the frozen layer takes no share of rho
        assert all(optimizer.vasso.d[i] is None for i, p in enumerate(optimizer.vasso.params) if id(p) in frozen_ids)

    step(frozen_check)
    step(frozen_check)
    set_trainable(frozen, True)

    def unfrozen_check(before, grads):
        vasso = optimizer.vasso
        for i, p in enumerate(vasso.params):
            name = next(n for n, q in model.named_parameters() if q is p)
            if id(p) in frozen_ids:
                assert torch.equal(vasso.d[i], grads[name])  # d starts from its first gradient
                assert (p.detach() - before[name]).abs().max() > 0  # and it is perturbed again
        eps = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
        assert eps.item() == pytest.approx(RHO, rel=1e-6)

    step(unfrozen_check)


def test_update_keeps_all_tensors_and_allocates_d_for_trainable_ones_only():
    model = make_model()
    set_trainable(first_layer(model), False)
    update = VassoUpdate(model.parameters(), rho=RHO, theta=0.4)
    assert len(update.params) == 4
    assert [d is None for d in update.d] == [True, True, False, False]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert update.state_bytes() == 2 * 4 * trainable
    set_trainable(model.parameters(), False)
    x, y = make_data()
    with pytest.raises(ValueError, match="requires_grad"):
        VassoUpdate(model.parameters(), rho=RHO, theta=0.4)
    set_trainable(model.net[-1].parameters(), True)
    pass_one(model, x, y)
    update.absorb_gradient()
    assert [d is None for d in update.d] == [True, True, False, False]


def test_lora_memory_stays_sized_to_the_adapters():
    """The Trainer passes every parameter; d exists only for the trainable adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    named = list(model.named_parameters())
    update = VassoUpdate([p for _, p in named], rho=RHO, theta=0.4, param_names=[n for n, _ in named])
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    assert sum(d.numel() for d in update.d if d is not None) == trainable
    assert update.state_bytes() == 8 * trainable


def run(model, optimizer, x, y, steps, schedule, start=0):
    for t in range(start, start + steps):
        if t in schedule:
            set_trainable(first_layer(model), schedule[t])
        pass_one(model, x, y)
        if optimizer.first_step(zero_grad=True):
            pass_one(model, x, y)
        optimizer.second_step(zero_grad=True)


def test_resume_after_a_change_of_the_set_is_bit_exact():
    """Freeze at step 2, unfreeze at 4, save at 5, resume into a fresh model and optimizer: bit for bit."""
    x, y = make_data()
    schedule = {2: False, 4: True}
    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=RHO, theta=0.4, adversary_prob=0.7)
    run(model, optimizer, x, y, 5, schedule)
    saved_weights, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert [s["initialized"] for s in saved_state["param_groups"][0]["vasso"]["segments"]] == [True, True]
    run(model, optimizer, x, y, 4, schedule, start=5)

    resumed = make_model()
    resumed.load_state_dict(saved_weights)
    optimizer2 = VASSO(torch.optim.AdamW(resumed.parameters(), lr=1e-2), rho=RHO, theta=0.4, adversary_prob=0.7)
    optimizer2.load_state_dict(saved_state)
    run(resumed, optimizer2, x, y, 4, schedule, start=5)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(optimizer.vasso.d, optimizer2.vasso.d):
        assert torch.equal(a, b)
    assert optimizer2.vasso.step == optimizer.vasso.step == 9
