"""Paths into the `VASSO` wrapper that a reviewer new to the code found silent or confusing: a base optimizer loaded
behind the wrapper's back, a parameter moved between groups, Accelerate's own accumulation, a second `first_step`, a
scaler that already unscaled, values changed between steps, a model moved after the wrapper was built, and the
messages around them. Each test failed before the fix it holds; each either runs VASSO or is refused, before
anything changes."""

from __future__ import annotations

import pytest
import torch
from helpers import make_data, make_model, vasso_step, weights
from torch import nn

from hf_vasso import VASSO


def loss_of(model, x, y):
    return lambda: model(x, labels=y)["loss"]


def first_pass(model, optimizer, x, y, **kwargs) -> bool:
    model(x, labels=y)["loss"].backward()
    return optimizer.first_step(zero_grad=True, **kwargs)


def engine_state(optimizer) -> tuple[int, list]:
    return optimizer.vasso.step, [None if d is None else d.clone() for d in optimizer.vasso.d]


def assert_unchanged(optimizer, before) -> None:
    step, d = engine_state(optimizer)
    assert step == before[0]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(d, before[1]))


# ---------------------------------------------------------------- the base optimizer's own handles


def test_the_base_optimizers_own_load_state_dict_keeps_the_wrapper_on_its_groups():
    """`optimizer.base_optimizer.load_state_dict(...)` (what the wrapper's own message suggests to start d afresh)
    rebinds torch's `param_groups` and `state`: the wrapper, its LR schedulers and `add_param_group` still act on
    the base optimizer's live groups afterwards."""
    model, head = make_model(), nn.Linear(1, 1)
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    vasso_step(optimizer, loss_of(model, x, y))
    optimizer.base_optimizer.load_state_dict(optimizer.base_optimizer.state_dict())
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.state is optimizer.base_optimizer.state

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # lr 0 from now on
    before = weights(model)
    vasso_step(optimizer, loss_of(model, x, y))
    scheduler.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # lr = 0: bit-identical

    optimizer.param_groups[0]["rho"] = 0.0
    first_pass(model, optimizer, x, y)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # ρ = 0: no perturbation
    optimizer.second_step(zero_grad=True)

    optimizer.add_param_group({"params": head.parameters(), "lr": 0.1})
    assert len(optimizer.base_optimizer.param_groups) == 2
    head_before = head.weight.detach().clone()
    vasso_step(optimizer, lambda: model(x, labels=head(y[:, None]).squeeze(-1))["loss"])
    assert not torch.equal(head_before, head.weight)  # the added group is stepped by the base optimizer


def test_a_parameter_moved_to_another_group_takes_that_groups_rho():
    """Moving a tensor between groups without changing the flat order (the last of group 0 becomes the first of
    group 1) gives it its new group's ρ from the next step: ε = ρ_new · d/‖d‖ on it."""
    model = make_model()
    x, y = make_data()
    w1, b1, w2, b2 = model.parameters()
    groups = [{"params": [w1, b1, w2], "rho": 0.01}, {"params": [b2], "rho": 1.0}]
    optimizer = VASSO(torch.optim.SGD(groups, lr=0.05), theta=0.4)
    for _ in range(2):
        vasso_step(optimizer, loss_of(model, x, y))
    groups = optimizer.param_groups
    groups[1]["params"].insert(0, groups[0]["params"].pop())  # w2 now in group 1, same flat order
    saved = w2.detach().clone()
    first_pass(model, optimizer, x, y)
    d_w2, norm = optimizer.vasso.d[2], optimizer.vasso.d_sq.sqrt()
    torch.testing.assert_close(w2.detach() - saved, 1.0 * d_w2 / norm, rtol=1e-5, atol=1e-7)
    optimizer.second_step(zero_grad=True)


# ---------------------------------------------------------------- the call order


def accelerated(**accelerator_kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, **accelerator_kwargs)
    model = make_model()
    vasso = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    model, prepared = accelerator.prepare(model, vasso)
    return accelerator, model, vasso, prepared


def test_first_step_under_an_accelerator_that_accumulates_is_refused_on_every_micro_batch():
    """With `Accelerator(gradient_accumulation_steps=K)`, `first_step` is refused on the micro-batch that ends the
    step too (pass 2 would run on that micro-batch alone, scaled by 1/K), and outside `accumulate()` (where
    `accelerator.backward` divides every loss by K once more): the message names the fix, before d changes."""
    x, y = make_data()
    accelerator, model, vasso, _ = accelerated(gradient_accumulation_steps=4)
    ends = []
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        with accelerator.accumulate(model):
            accelerator.backward(model(xb, labels=yb)["loss"])
            if accelerator.sync_gradients:  # the SAM-with-accumulate pattern: first_step on the last micro-batch
                ends.append(True)
                with pytest.raises(ValueError, match="without gradient_accumulation_steps"):
                    vasso.first_step(zero_grad=True)
    assert ends == [True] and vasso.vasso.step == 0
    with pytest.raises(ValueError, match="without gradient_accumulation_steps"):
        vasso.first_step(zero_grad=True)  # the README's by-hand loop on such an Accelerator
    assert vasso.vasso.step == 0


def test_the_accumulation_refusal_says_how_to_clear_a_setting_a_gone_accelerator_left():
    """Accelerate's gradient state is process-wide and outlives the Accelerator that set it (a notebook that made
    one earlier): the message says so, and that an `Accelerator()` made without accumulation clears it."""
    from accelerate import Accelerator

    accelerated(gradient_accumulation_steps=4)  # made and dropped
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(ValueError, match=r"outlives it.*Accelerator\(\) made without gradient_accumulation_steps"):
        first_pass(model, optimizer, x, y)
    Accelerator(cpu=True)
    assert first_pass(model, optimizer, x, y)


def test_a_second_first_step_without_a_base_step_is_refused():
    """eVASSO's skipped steps (`first_step` returned False) keep the pass-1 gradient for the base step: a loop that
    calls `second_step` only inside `if first_step(...)` would never step on them and add the next gradient onto
    the kept one. The second `first_step` is refused and changes nothing."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adversary_prob=0.0)
    assert first_pass(model, optimizer, x, y) is False
    before = engine_state(optimizer)
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice.*second_step\(\)"):
        first_pass(model, optimizer, x, y)
    assert_unchanged(optimizer, before)
    optimizer.second_step(zero_grad=True)
    first_pass(model, optimizer, x, y)  # the next step runs


def test_first_step_after_the_scaler_unscaled_the_gradients_is_refused():
    """`scaler.unscale_(optimizer)` before `first_step(grad_scaler=scaler)` (to clip the pass-1 gradient, as SAM
    loops do) would divide d by the scale twice and leave the pass-2 gradient scaled for the base step (a step 1024x
    too long): refused, d unchanged."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(x, labels=y)["loss"]).backward()
    scaler.unscale_(optimizer)
    before = engine_state(optimizer)
    with pytest.raises(ValueError, match=r"unscale_.*before first_step"):
        optimizer.first_step(zero_grad=True, grad_scaler=scaler)
    assert_unchanged(optimizer, before)


# ---------------------------------------------------------------- a GradScaler's skipped steps


def scaled_step(model, optimizer, scaler, x, y, poison=0, restore=True) -> None:
    """One step of a plain fp16 loop: scaled pass 1, `first_step`, scaled pass 2, `restore()`, `scaler.step`,
    `scaler.update()`; `poison` puts an inf into that pass's gradient (what an fp16 overflow gives)."""
    scaler.scale(model(x, labels=y)["loss"]).backward()
    if poison == 1:
        model.net[0].weight.grad[0, 0] = float("inf")
    if optimizer.first_step(zero_grad=True, grad_scaler=scaler):
        scaler.scale(model(x, labels=y)["loss"]).backward()
        if poison == 2:
            model.net[0].weight.grad[0, 0] = float("inf")
    if restore:
        optimizer.restore()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


@pytest.mark.parametrize("poison, adversary_prob", [(2, 1.0), (1, 0.0)])
def test_a_step_the_scaler_skips_leaves_the_weights_as_they_were_and_the_next_step_runs(poison, adversary_prob):
    """`scaler.step` skips the base step on an overflow without calling the wrapper: the weights stay x (restored
    before it), and the next `first_step` takes up the skipped step instead of refusing it as a missing base step."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adversary_prob=adversary_prob)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled_step(model, optimizer, scaler, x, y)
    before = weights(model)
    scaled_step(model, optimizer, scaler, x, y, poison=poison)
    assert scaler.get_scale() == 512.0  # the scaler skipped the step
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    scaled_step(model, optimizer, scaler, x, y)
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert scaler.get_scale() == 512.0 and optimizer.vasso.step == 3


@pytest.mark.parametrize("skipped", [False, True])
def test_with_a_scaler_a_step_without_restore_first_is_refused_and_the_weights_restored(skipped):
    """Without `restore()` before `scaler.step`, a step the scaler skips would leave x + ε in the weights (the
    wrapper is not called): refused where the wrapper sees it, at its `step()` or at the next `first_step`, with
    the weights put back first."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"restore\(\) before scaler.step"):
        scaled_step(model, optimizer, scaler, x, y, poison=2 if skipped else 0, restore=False)
        assert skipped and scaler.get_scale() == 512.0
        scaled_step(model, optimizer, scaler, x, y)
    assert not optimizer.vasso.perturbed
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ---------------------------------------------------------------- values changed between steps


@pytest.mark.parametrize(
    "name, value, resolved",
    [("adversary", "sam", "vasso"), ("adversary", "adaptive", "asam"), ("adversary", None, "vasso"),
     ("theta", 1.0, 1.0), ("adversary_prob", 0.5, 0.5), ("rho", 0.2, 0.2)],
)  # fmt: skip
def test_the_engines_defaults_take_what_the_constructor_takes_between_steps(name, value, resolved):
    optimizer = VASSO(torch.optim.SGD(make_model().parameters(), lr=0.1))
    setattr(optimizer.vasso, name, value)
    assert getattr(optimizer.vasso, name) == resolved


@pytest.mark.parametrize(
    "name, value, message",
    [("adversary", "ASAM", "not a registered adversary geometry"), ("theta", 1.5, "theta=1.5 is invalid"),
     ("theta", 0.0, "theta=0.0 is invalid"), ("adversary_prob", 7, "adversary_prob=7.0 is invalid"),
     ("rho", -1.0, "rho=-1.0 is invalid")],
)  # fmt: skip
def test_an_invalid_default_set_between_steps_is_refused_where_it_is_set(name, value, message):
    optimizer = VASSO(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match=message):
        setattr(optimizer.vasso, name, value)


@pytest.mark.parametrize("key, value", [("rho", float("nan")), ("rho", -0.1), ("adversary", "nope")])
def test_an_invalid_group_value_set_between_steps_is_refused_before_d_changes(key, value):
    """A group's ρ or geometry is read at the step: an invalid one is refused before the gradient is folded into
    d, so that fixing it and calling `first_step` again folds that gradient once."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    vasso_step(optimizer, loss_of(model, x, y))
    optimizer.param_groups[0][key] = value
    before = engine_state(optimizer)
    with pytest.raises(ValueError, match="param group 0"):
        first_pass(model, optimizer, x, y)
    assert_unchanged(optimizer, before)
    del optimizer.param_groups[0][key]
    optimizer.first_step(zero_grad=True)
    assert optimizer.vasso.step == before[0] + 1


def test_vasso_keys_on_an_optimizer_that_does_not_use_them_are_refused():
    """`"vasso_rho"` is read only where the base optimizer keeps its own `"rho"` (Adadelta); on AdamW it would be
    ignored silently."""
    model = make_model()
    with pytest.raises(ValueError, match=r"'vasso_rho'.*'rho'"):
        VASSO(torch.optim.AdamW([{"params": model.parameters(), "vasso_rho": 0.0}], lr=1e-3))
    VASSO(torch.optim.Adadelta([{"params": model.parameters(), "vasso_rho": 0.0}]))


# ---------------------------------------------------------------- the model moved after the wrapper was built


def test_a_model_cast_after_the_wrapper_was_built_keeps_d_and_steps_in_its_new_dtype():
    """`model.to(torch.bfloat16)` after the wrapper was built (the parameters stay the same objects): d, kept in
    fp32, continues its EMA, ‖ε‖ = ρ and the restore is exact in the new dtype."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, theta=0.4)
    vasso_step(optimizer, loss_of(model, x, y))
    d_before = [d.clone() for d in optimizer.vasso.d]
    model.to(torch.bfloat16)
    saved = weights(model)
    model(x.bfloat16(), labels=y.bfloat16())["loss"].backward()
    g = [p.grad.float().clone() for p in model.parameters()]
    assert optimizer.first_step(zero_grad=True)
    for d, old, gi in zip(optimizer.vasso.d, d_before, g):
        assert d.dtype == torch.float32
        torch.testing.assert_close(d, 0.6 * old + 0.4 * gi)
    eps = torch.cat([(p.detach() - saved[n]).float().reshape(-1) for n, p in model.named_parameters()])
    assert abs(eps.norm().item() - 0.05) < 0.05 * 0.02  # bf16 rounding of the moved weights
    optimizer.restore()
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters())


def test_a_parameter_resized_in_place_after_the_wrapper_was_built_is_refused_by_name():
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    vasso_step(optimizer, loss_of(model, x, y))
    bias = model.net[2].bias
    bias.data = torch.zeros(2)
    bias.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"changed shape.*\(1,\).*\(2,\)"):
        optimizer.first_step(zero_grad=True)


# ---------------------------------------------------------------- what pass 2 starts from, and messages


def test_with_the_model_given_its_parameters_outside_the_optimizer_end_the_step_with_the_pass_2_gradient():
    """With `model=`, pass 2 starts from cleared gradients for the whole model: a trainable parameter the optimizer
    does not step (a second optimizer's, a frozen-by-omission body) ends the step with the pass-2 gradient, as the
    optimizer's own do, not with the sum of both passes."""
    model = make_model()
    x, y = make_data()
    body, head = model.net[0], model.net[2]
    optimizer = VASSO(torch.optim.SGD(head.parameters(), lr=0.1), rho=0.05, model=model)
    model(x, labels=y)["loss"].backward()
    optimizer.first_step(zero_grad=True)
    model(x, labels=y)["loss"].backward()
    perturbed = [p.detach().clone() for p in head.parameters()]
    optimizer.restore()
    probe = make_model()
    probe.load_state_dict(model.state_dict())
    for p, value in zip(probe.net[2].parameters(), perturbed):
        p.data.copy_(value)
    probe(x, labels=y)["loss"].backward()
    torch.testing.assert_close(body.weight.grad, probe.net[0].weight.grad)


def test_an_optimizer_instance_with_a_second_optimizer_class_says_which_form_to_use():
    model = make_model()
    with pytest.raises(TypeError, match=r"already built.*VASSO\(optimizer"):
        VASSO(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD)


def test_a_nonfinite_pass_1_gradient_on_a_skipped_step_never_reaches_the_weights():
    """On eVASSO's skipped steps the base optimizer steps with the pass-1 gradient: a non-finite one is replaced by
    zeros first, as the pass-2 gradient of an adversary step is (without a scaler), and counted."""
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adversary_prob=0.0)
    before = weights(model)
    model(x, labels=y)["loss"].backward()
    model.net[0].weight.grad[0, 0] = float("nan")
    assert optimizer.first_step(zero_grad=True) is False
    optimizer.second_step(zero_grad=True)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # SGD on a zero gradient
    assert optimizer.pop_metrics()["vasso/nonfinite_fraction"] == 1.0


def test_with_a_scaler_a_nonfinite_pass_1_gradient_on_a_skipped_step_is_left_for_the_scaler():
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, adversary_prob=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = weights(model)
    scaler.scale(model(x, labels=y)["loss"]).backward()
    model.net[0].weight.grad[0, 0] = float("inf")
    assert optimizer.first_step(zero_grad=True, grad_scaler=scaler) is False
    assert torch.isinf(model.net[0].weight.grad[0, 0])
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert scaler.get_scale() < 1024.0


# ---------------------------------------------------------------- copies


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_wrapper_continues_as_the_original(how):
    """`copy.deepcopy` and pickle of a model with its wrapper (as torch optimizers allow): the copy holds the same
    d, step and base state, and continues bit for bit."""
    import copy
    import pickle

    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.05, theta=0.4, model=model)
    for _ in range(2):
        vasso_step(optimizer, loss_of(model, x, y))
    pair = (model, optimizer)
    twin, twin_optimizer = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert twin_optimizer.vasso.step == 2 and twin_optimizer.vasso.params[0] is next(twin.parameters())
    for _ in range(2):
        vasso_step(optimizer, loss_of(model, x, y))
        vasso_step(twin_optimizer, loss_of(twin, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    model(x, labels=y)["loss"].backward()
    optimizer.first_step(zero_grad=True)  # perturbed: the saved weights would not travel
    with pytest.raises(RuntimeError, match=r"while the weights are perturbed; call restore\(\) first"):
        copy.deepcopy(pair) if how == "deepcopy" else pickle.dumps(pair)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_with_its_lr_scheduler_steps_its_own_optimizer(how):
    """torch's LR schedulers put a `step` wrapper on the optimizer instance, holding a weak reference to it: a copy
    must not carry it over (it would step the original), as torch's own `Optimizer.__getstate__` drops it."""
    import copy
    import pickle

    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    vasso_step(optimizer, loss_of(model, x, y))
    scheduler.step()
    triple = (model, optimizer, scheduler)
    twin, twin_optimizer, twin_scheduler = (
        copy.deepcopy(triple) if how == "deepcopy" else pickle.loads(pickle.dumps(triple))
    )
    for m, o, s in (triple, (twin, twin_optimizer, twin_scheduler)):
        vasso_step(o, loss_of(m, x, y))
        s.step()
    assert optimizer.vasso.step == twin_optimizer.vasso.step == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_state_dict_leaves_the_base_optimizers_live_state_alone():
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=0.1), rho=0.05)
    vasso_step(optimizer, loss_of(model, x, y))
    keys = [sorted(s) for s in optimizer.base_optimizer.state.values()]
    optimizer.state_dict()
    assert [sorted(s) for s in optimizer.base_optimizer.state.values()] == keys


def test_a_float64_group_added_through_the_wrapper_is_refused_before_it_reaches_either():
    model, extra = make_model(), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    with pytest.raises(TypeError, match="is torch.float64"):
        optimizer.add_param_group({"params": [extra]})
    assert len(optimizer.param_groups) == 1 and len(optimizer.vasso.params) == len(list(model.parameters()))
