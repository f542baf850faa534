"""A param group added after construction (`VASSO.add_param_group`, davda54/sam#65: unfreezing a head mid-run) joins
the engine: its own "rho" (and "adaptive"), perturbed from the next step on, d from its first gradient, and the
wrapper's state loads into a `VASSO` built over both groups from the start, and back."""

import io

import pytest
import torch
from helpers import make_data, make_model, weights

from hf_vasso import VASSO, VassoUpdate

HEAD_RHO = 0.3


def body_head(model):
    return list(model.net[0].parameters()), list(model.net[-1].parameters())


def step(model, optimizer, x, y):
    """One explicit VASSO step; returns the perturbation ε per parameter name (zeros on a frozen parameter)."""
    model(x, labels=y)["loss"].backward()
    before = weights(model)
    optimizer.first_step(zero_grad=True)
    eps = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    model(x, labels=y)["loss"].backward()
    optimizer.second_step(zero_grad=True)
    model.zero_grad()
    return eps


def grown(model, at_step, adaptive=False):
    """VASSO over the body; at step `at_step` the head is unfrozen and added as a group with its own rho."""
    body, head = body_head(model)
    for p in head:
        p.requires_grad_(at_step == 0)
    optimizer = VASSO(torch.optim.SGD(body, lr=0.1, momentum=0.9), rho=0.05, theta=0.4)

    def grow():
        for p in head:
            p.requires_grad_(True)
        optimizer.add_param_group({"params": head, "rho": HEAD_RHO, "adaptive": adaptive})

    return optimizer, grow


def built_over_both(model, adaptive=False, head_trainable=True):
    body, head = body_head(model)
    for p in head:
        p.requires_grad_(head_trainable)
    groups = [{"params": body}, {"params": head, "rho": HEAD_RHO, "adaptive": adaptive}]
    return VASSO(torch.optim.SGD(groups, lr=0.1, momentum=0.9), rho=0.05, theta=0.4)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("at_step", [0, 2])
def test_added_group_is_perturbed_with_its_own_rho(at_step, adaptive):
    """Added before step 1, or unfrozen and added after 2 steps: bit for bit the run of a VASSO built over both
    groups from the start (with the head frozen until then); the head moves in pass 2 from the next step on."""
    x, y = make_data()
    model, reference = make_model(), make_model()
    optimizer, grow = grown(model, at_step, adaptive)
    ref_optimizer = built_over_both(reference, adaptive, head_trainable=at_step == 0)
    _, ref_head = body_head(reference)
    for t in range(5):
        if t == at_step:
            grow()
            for p in ref_head:
                p.requires_grad_(True)
        eps = step(model, optimizer, x, y)
        step(reference, ref_optimizer, x, y)
        head_shift = torch.sqrt(sum((e**2).sum() for n, e in eps.items() if n.startswith("net.2")))
        assert (head_shift > 0).item() == (t >= at_step), f"step {t}: head displacement {head_shift.item()}"
        for (n, a), b in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(a, b), f"step {t}: {n}"
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["rho"] == HEAD_RHO


def test_added_group_rho_scales_its_part_of_one_global_norm():
    """ε_head = ρ_head · g_head / ‖g‖ on the head's first step, the norm over both groups (davda54/pytorch_optimizer
    semantics)."""
    x, y = make_data()
    model = make_model()
    optimizer, grow = grown(model, at_step=0)
    grow()
    model(x, labels=y)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float()
    before = weights(model)
    optimizer.first_step(zero_grad=True)
    for n, p in model.named_parameters():
        rho = HEAD_RHO if n.startswith("net.2") else 0.05
        torch.testing.assert_close(p.detach() - before[n], rho * grads[n] / norm, atol=1e-7, rtol=1e-5)
    optimizer.restore()


@pytest.mark.parametrize("direction", ["grown-to-built", "built-to-grown"])
def test_state_of_a_grown_optimizer_loads_into_one_built_over_both_groups(direction):
    """The state of a VASSO whose head was added later loads into a VASSO built over both groups (and the other
    way), and both then continue bit for bit."""
    x, y = make_data()
    source_model = make_model()
    if direction == "grown-to-built":
        source, grow = grown(source_model, at_step=0)
        grow()
    else:
        source = built_over_both(source_model)
    for _ in range(3):
        step(source_model, source, x, y)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)  # a checkpoint: the loaded momentum must not alias the source's
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    target_model = make_model(seed=5)
    target_model.load_state_dict(source_model.state_dict())
    if direction == "grown-to-built":
        target = built_over_both(target_model)
    else:
        target, grow = grown(target_model, at_step=0)
        grow()
    target.load_state_dict(state)
    assert target.vasso.step == 3
    for _ in range(2):
        step(source_model, source, x, y)
        step(target_model, target, x, y)
    for (n, a), b in zip(source_model.named_parameters(), target_model.parameters()):
        assert torch.equal(a, b), n


def test_engine_refuses_a_tensor_it_already_has():
    model = make_model()
    body, head = body_head(model)
    update = VassoUpdate(body, rho=0.1, theta=0.4)
    with pytest.raises(ValueError, match="more than once"):
        update.add_param_group({"params": [body[0]] + head})
    assert len(update.params) == len(body)


@pytest.mark.parametrize(
    "build",
    [
        lambda p, q: VassoUpdate([p, q, p], rho=0.1, theta=0.4),
        lambda p, q: VASSO(torch.optim.SGD([p, q, p], lr=0.1), rho=0.1),  # torch only warns within one group
        lambda p, q: VassoUpdate([{"params": [p]}, {"params": [q, p], "adaptive": True}], rho=0.1, theta=0.4),
        lambda p, q: VASSO(torch.optim.SGD([{"params": [p]}, {"params": [q]}], lr=0.1), rho=0.1).add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))] * 2}
        ),
    ],
    ids=["one-list", "wrapper", "two-groups", "added-group"],
)
def test_a_tensor_given_twice_is_refused(build):
    """A tensor listed twice would count twice in the global norm and be moved twice (sqrt(2)·rho for one tensor):
    refused at construction and in `add_param_group`, as torch.optim refuses it across groups."""
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="more than once"):
        build(p, q)


def test_a_group_refused_for_a_repeated_tensor_reaches_neither_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = VASSO(torch.optim.SGD([p], lr=0.1), rho=0.1)
    r = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than once"):
        optimizer.add_param_group({"params": (t for t in [r, r])})  # a generator: read once
    assert len(optimizer.base_optimizer.param_groups) == 1 and len(optimizer.vasso.params) == 1
    optimizer.add_param_group({"params": (t for t in [r])})
    assert optimizer.base_optimizer.param_groups[-1]["params"] == [r] and optimizer.vasso.params[-1] is r
