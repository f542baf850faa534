"""The adversary variants on one engine: VASSO's geometry, ASAM (`adversary="asam"`, alias `adaptive=True`),
per-group rho.

θ = 1 is checked against pytorch_optimizer's `SAM` (an independent implementation) in a plain loop; the identities
of docs/algorithm.md run over every geometry registered in `hf_vasso.adversary.GEOMETRIES`, selected by name; d equals
the official EMA formula within fp32 rounding.
"""

import copy

import pytest
import torch
from helpers import make_data, make_model, max_abs_diff, weights
from pytorch_optimizer import SAM

from hf_vasso import VASSO, VassoUpdate
from hf_vasso import ops as ops_module
from hf_vasso.adversary import GEOMETRIES

VARIANTS = sorted(GEOMETRIES)  # every registered geometry: "asam", "vasso", and any added later


@pytest.fixture(params=VARIANTS)
def variant(request):
    """A registered geometry's name, which selects it."""
    return request.param


def built_geometry(optimizer):
    """The geometry class the engine built for its (single) param group: the sentinel that the key was used."""
    (geometry,) = optimizer.vasso.geometries
    return type(geometry)


# The radius identity of each geometry: ‖ε‖ measured in the geometry's own norm equals ρ. A new geometry states its
# identity here (the test fails for it until then).
RADIUS = {
    "vasso": lambda eps, w: torch.sqrt(sum((e**2).sum() for e in eps.values())),
    "asam": lambda eps, w: torch.sqrt(sum(((eps[n] / w[n].abs()) ** 2).sum() for n in eps)),
}


def groups_of(model, rhos):
    """The two Linear layers of the tiny model as two param groups with their own rho (None: no group rho)."""
    first, second = model.net[0], model.net[-1]
    groups = [{"params": list(first.parameters())}, {"params": list(second.parameters())}]
    for g, rho in zip(groups, rhos):
        if rho is not None:
            g["rho"] = rho
    return groups


def sam_loop(model, x, y, steps, make_optimizer, closure_form):
    optimizer = make_optimizer(model)
    for _ in range(steps):

        def closure():
            loss = model(x, labels=y)["loss"]
            loss.backward()
            return loss

        closure()
        if closure_form:
            optimizer.step(closure)
        else:
            optimizer.first_step(zero_grad=True)
            closure()
            optimizer.second_step(zero_grad=True)
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("rhos", [(None, None), (0.05, 0.3)], ids=["one-rho", "group-rho"])
def test_theta_one_equals_pytorch_optimizer_sam(adaptive, rhos):
    """θ=1 (+ davda54/pytorch_optimizer's `adaptive` switch, our alias of "asam") equals pytorch_optimizer's
    SAM(adaptive=...) with the same param groups, 8 SGD steps."""
    x, y = make_data()
    ours = sam_loop(
        make_model(),
        x,
        y,
        8,
        lambda m: VASSO(
            torch.optim.SGD(groups_of(m, rhos), lr=0.2, momentum=0.9), rho=0.1, theta=1.0, adaptive=adaptive
        ),
        closure_form=False,
    )
    peer = sam_loop(
        make_model(),
        x,
        y,
        8,
        lambda m: SAM(groups_of(m, rhos), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.2, momentum=0.9),
        closure_form=True,
    )
    for (name, a), b in zip(ours.named_parameters(), peer.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
    # The groups' rho and the geometry mattered: a one-rho plain SAM run lands elsewhere.
    plain = sam_loop(
        make_model(), x, y, 8, lambda m: VASSO(torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), theta=1.0), False
    )
    if rhos != (None, None) or adaptive:
        assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), plain.parameters())) > 1e-4


def perturbation(model, **kwargs):
    x, y = make_data()
    before = weights(model)
    optimizer = VASSO(torch.optim.SGD(kwargs.pop("groups", None) or model.parameters(), lr=0.1), **kwargs)
    model(x, labels=y)["loss"].backward()
    optimizer.first_step(zero_grad=True)
    eps = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return optimizer, before, eps


def test_perturbation_radius_and_exact_restore(variant):
    """‖ε‖ = ρ in the geometry's own norm (VASSO: ‖ε‖; ASAM: ‖ε/|w|‖); restore is bit for bit."""
    key = variant
    model = make_model()
    optimizer, before, eps = perturbation(model, rho=0.37, theta=0.5, adversary=key)
    assert built_geometry(optimizer) is GEOMETRIES[key]
    assert key in RADIUS, f"state the radius identity of the geometry {key!r} in RADIUS"
    assert RADIUS[key](eps, before).item() == pytest.approx(0.37, rel=1e-5)
    optimizer.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_per_group_rho_scales_its_part_with_one_global_norm():
    """ε_group = ρ_group · d_group / ‖d‖ with ‖d‖ over all groups (not per group)."""
    model = make_model()
    x, y = make_data()
    model(x, labels=y)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float()
    model.zero_grad()
    optimizer, before, eps = perturbation(model, groups=groups_of(model, (0.05, 0.3)), theta=0.4)
    for n, e in eps.items():
        rho = 0.05 if n.startswith("net.0") else 0.3
        torch.testing.assert_close(e, rho * grads[n] / norm, atol=1e-7, rtol=1e-5)
    assert optimizer.vasso.pop_metrics().get("vasso/adversary_cosine") is None


def test_lr_zero_leaves_weights_bit_identical(variant):
    key = variant
    model = make_model()
    before = weights(model)
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5, adversary=key)
    assert built_geometry(optimizer) is GEOMETRIES[key]
    for _ in range(6):
        model(x, labels=y)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_first_step_is_sam_for_any_theta(variant):
    x, y = make_data()
    runs = []
    for theta in (1.0, 0.3):
        model = make_model()
        sam_loop(
            model,
            x,
            y,
            1,
            lambda m, t=theta: VASSO(torch.optim.SGD(m.parameters(), lr=0.1), theta=t, adversary=variant),
            False,
        )
        runs.append(weights(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert max_abs_diff(runs[0], weights(make_model())) > 0  # the step moved the weights


def test_p0_is_the_base_optimizer_bit_for_bit(variant):
    key = variant
    x, y = make_data()
    plain, wrapped = make_model(), make_model()
    base = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    optimizer = VASSO(torch.optim.AdamW(wrapped.parameters(), lr=1e-2), adversary_prob=0.0, adversary=key)
    assert built_geometry(optimizer) is GEOMETRIES[key]
    for _ in range(5):
        plain(x, labels=y)["loss"].backward()
        base.step()
        base.zero_grad()
        wrapped(x, labels=y)["loss"].backward()
        assert optimizer.first_step() is False
        optimizer.second_step(zero_grad=True)
    for (n, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_d_equals_the_official_ema_within_fp32_rounding(dtype):
    """Each step's d is the official code's `d.mul_(1-θ).add_(g, alpha=θ)` of the previous d, per tensor in fp32,
    within fp32 rounding (the engine's lerp associates differently: 2 ulps of the operands); the first d is the first
    gradient exactly; ε within 1e-6 of ρ·d/‖d‖ computed in float64 (fp32 weights). Over 6 steps."""
    x, y = make_data()
    model = make_model().to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.3)
    previous = None
    for step in range(6):
        model.zero_grad()
        xs = x * (1 + 0.1 * step)  # a different gradient each step
        model(xs, labels=y)["loss"].backward()
        grads = [p.grad.float() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        update.absorb_gradient()
        if previous is None:
            assert all(torch.equal(d, g) for d, g in zip(update.d, grads))
        else:
            official = [d.clone().mul_(1 - 0.3).add_(g, alpha=0.3) for d, g in zip(previous, grads)]
            eps32 = torch.finfo(torch.float32).eps
            for d, o, p, g in zip(update.d, official, previous, grads):
                assert ((d - o).abs() <= 2 * eps32 * (p.abs() + g.abs())).all(), (d - o).abs().max()
        previous = [d.clone() for d in update.d]
        update.perturb()
        if dtype == torch.float32:
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in previous))
            for p, b, d in zip(model.parameters(), before, previous):
                eps = p.detach().double() - b.double()
                torch.testing.assert_close(eps, 0.1 * d.double() / norm, atol=1e-6, rtol=0)
        update.restore()
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_asam_theta_below_one_uses_d_not_g():
    """ASAM with θ<1 perturbs along |w|²·d, d the EMA: check ε against that formula on step 2."""
    x, y = make_data()
    model = make_model()
    update = VassoUpdate(model.parameters(), rho=0.2, theta=0.4, adversary="asam")
    grads = []
    for step in range(2):
        model.zero_grad()
        model(x * (1 + step), labels=y)["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        update.absorb_gradient()
    d = [0.6 * a + 0.4 * b for a, b in zip(*grads)]
    w = [p.detach().clone() for p in model.parameters()]
    norm = torch.sqrt(sum(((wi.abs() * di) ** 2).sum() for wi, di in zip(w, d)))
    update.perturb()
    for p, wi, di in zip(model.parameters(), w, d):
        torch.testing.assert_close(p.detach() - wi, 0.2 * wi**2 * di / norm, atol=1e-7, rtol=1e-4)
    update.restore()
    assert "vasso/adversary_cosine" not in update.pop_metrics()


def test_the_geometry_is_saved_and_a_change_is_logged(caplog):
    model = make_model()
    a = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), adaptive=True)
    state = copy.deepcopy(a.state_dict())
    assert state["param_groups"][0]["vasso"]["adversary"] == "asam"
    b = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), adversary="vasso")
    with caplog.at_level("WARNING", logger="hf_vasso"):
        b.load_state_dict(state)
    assert "adversary changed at resume: asam → vasso" in caplog.text


# Large and small tensors of one dtype beside an fp32 one (the engine moves each bucket of one dtype with one op).
SHAPE_SETS = {
    "one-large": [(300, 250), (64, 32), (32,), (300,), (7, 5)],
    "all-small": [(100, 50), (64, 32), (32,), (300,), (7, 5)],
}


def one_rounding(exact: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of `dtype` at the larger of |exact| and |got| (elementwise, float64)."""
    finfo = torch.finfo(dtype)
    scale = torch.maximum(exact.abs(), got.abs()).clamp_min(finfo.tiny)
    return 0.5 * finfo.eps * torch.exp2(torch.floor(torch.log2(scale)))


@pytest.mark.parametrize("branch", ["cpu", "accelerator"])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("adversary", sorted(GEOMETRIES))
def test_low_precision_weights_move_by_eps_within_one_rounding(dtype, adversary, shapes, branch, monkeypatch):
    """Weights in bf16 or fp16 beside an fp32 one land within one rounding of their dtype of w + ε (half an ulp,
    plus the fp32 arithmetic's own error: 1e-6 of |w| + |ε|, and 1e-5 of |ε| for the fp32 norm over 77k elements),
    ε computed in float64 from the engine's fp32 d, over 3 steps; the restore is exact. For every registered
    geometry, and for both ways of moving them: through fp32 copies (a CPU) and by mixed-dtype ops that cast in the
    kernel (accelerators; forced here on a CPU, where it is slower but computes the same)."""
    if branch == "accelerator":
        monkeypatch.setattr(ops_module, "CPU_PLAN_DEVICES", set())
    g = torch.Generator().manual_seed(0)
    shapes = SHAPE_SETS[shapes]
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    params.append(torch.randn(16, generator=g).requires_grad_())  # an fp32 tensor in the same group
    rho = 1.0  # ε large enough to move some element of every tensor in bf16
    update = VassoUpdate(params, rho=rho, theta=0.3, adversary=adversary)
    assert type(update.geometries[0]) is GEOMETRIES[adversary]
    for _ in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)
        before = [p.detach().clone() for p in params]
        update.absorb_gradient()
        d = [t.double() for t in update.d]
        w = [b.double() for b in before]
        direction = EXACT_DIRECTION[adversary]
        norm = torch.sqrt(sum(NORM_TERM[adversary](wi, di) for wi, di in zip(w, d)))
        eps = [rho * direction(wi, di) / norm for wi, di in zip(w, d)]
        update.perturb()
        for p, wi, ei in zip(params, w, eps):
            exact, got = wi + ei, p.detach().double()
            tolerance = one_rounding(exact, got, p.dtype) + 1e-6 * (wi.abs() + ei.abs()) + 1e-5 * ei.abs()
            assert ((got - exact).abs() <= tolerance).all(), ((got - exact).abs() / tolerance).max()
            assert not torch.equal(got, wi)  # it moved
        update.restore()
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


# Each geometry's ε direction and squared-norm term in float64, for the test above (a new geometry states its own).
EXACT_DIRECTION = {"vasso": lambda w, d: d, "asam": lambda w, d: w * w * d}
NORM_TERM = {"vasso": lambda w, d: (d**2).sum(), "asam": lambda w, d: ((w.abs() * d) ** 2).sum()}
