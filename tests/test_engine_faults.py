"""Faults the engine must survive (issue 9): non-finite gradients in any precision and either pass, loaded state
that does not fit, unusual input types, and metrics that say what they mean."""

import fractions
import logging

import numpy as np
import pytest
import torch
from helpers import make_data, make_model, weights
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_vasso import VASSO, VassoUpdate
from hf_vasso.adversary import GEOMETRIES
from hf_vasso.state import STATE_FORMAT
from hf_vasso.update import adversary_coin


class SkippingSGD(torch.optim.SGD):
    """SGD that skips a step whose gradient is not finite (as a GradScaler would), counting the skips."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            self.skipped += 1
            return None
        return super().step(closure)


def nan_run(dtype, steps=10, nan_step=3, nan_passes=(1, 2), base=SkippingSGD, after_step=None):
    """The issue's input: a 6-16-1 tanh MLP, `base` (SkippingSGD) wrapped in VASSO(rho=0.05, theta=0.4), the loss
    multiplied by NaN on step `nan_step` (1-based) in the given passes; `after_step(model)` runs after each step."""
    x, y = make_data()
    x, y = x.to(dtype), y.to(dtype)
    model = make_model().to(dtype)
    optimizer = VASSO(base(model.parameters(), lr=0.1), rho=0.05, theta=0.4)
    d_finite = []
    for step in range(1, steps + 1):
        for pass_ in (1, 2):
            loss = model(x, labels=y)["loss"]
            if step == nan_step and pass_ in nan_passes:
                loss = loss * float("nan")
            loss.backward()
            if pass_ == 1:
                optimizer.first_step(zero_grad=True)
                d_finite.append(all(torch.isfinite(d).all() for d in optimizer.vasso.d))
        optimizer.second_step(zero_grad=True)
        if after_step is not None:
            after_step(model)
    return model, optimizer, d_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_pass_one_never_enters_d_nor_perturbs(dtype):
    """NaN on step 3 (both passes): d stays finite, the step is a no-op, the run then continues as if step 3 had
    not happened (compared bit for bit with a run that skips it), and it is counted once."""
    model, optimizer, d_finite = nan_run(dtype)
    assert all(d_finite)
    metrics = optimizer.pop_metrics()
    assert metrics["vasso/nonfinite_fraction"] == pytest.approx(0.1)
    assert metrics["vasso/perturbed_nonfinite_fraction"] == pytest.approx(0.1)
    assert metrics["vasso/adversary_fraction"] == pytest.approx(0.9)  # the NaN step did not move the weights
    assert optimizer.base_optimizer.skipped == 0  # the pass-2 NaN became a zero gradient before the base step

    x, y = make_data()
    reference = make_model().to(dtype)
    ref_opt = VASSO(SkippingSGD(reference.parameters(), lr=0.1), rho=0.05, theta=0.4)
    for _ in range(9):
        reference(x.to(dtype), labels=y.to(dtype))["loss"].backward()
        ref_opt.first_step(zero_grad=True)
        reference(x.to(dtype), labels=y.to(dtype))["loss"].backward()
        ref_opt.second_step(zero_grad=True)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), n


def test_nonfinite_pass_two_only_never_reaches_the_weights():
    """Finite at x, NaN at x + ε: without a scaler the step's gradient becomes zeros, so plain SGD (which, unlike
    `SkippingSGD`, would step with the NaN) leaves the weights exactly as they were on that step, and only then."""
    snapshots = []
    model, optimizer, d_finite = nan_run(
        torch.float32,
        steps=4,
        nan_step=2,
        nan_passes=(2,),
        base=torch.optim.SGD,
        after_step=lambda m: snapshots.append(weights(m)),
    )
    assert all(d_finite)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(snapshots, snapshots[1:])]
    assert moved == [False, True, True]  # step 2 (the NaN) left the weights alone; steps 3 and 4 moved them
    metrics = optimizer.pop_metrics()
    assert metrics["vasso/perturbed_nonfinite_fraction"] == pytest.approx(0.25)
    assert metrics["vasso/nonfinite_fraction"] == 0.0
    assert metrics["vasso/adversary_fraction"] == 1.0


def test_pass_two_guard_leaves_a_scaled_gradient_for_the_scaler():
    model = make_model()
    x, y = make_data()
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.4)
    scale = torch.tensor(1024.0)
    for fill, expected_nan in ((None, False), (float("inf"), True)):
        model(x, labels=y)["loss"].backward()
        update.absorb_gradient(scale)
        update.perturb()
        model(x, labels=y)["loss"].backward()
        if fill is not None:
            next(model.parameters()).grad[0, 0] = fill
        update.restore()
        update.guard_perturbed_gradient(scale)
        grad = next(model.parameters()).grad
        assert (not torch.isfinite(grad).all()) == expected_nan  # left for GradScaler.step to skip
        model.zero_grad()
    assert update.pop_metrics()["vasso/perturbed_nonfinite_fraction"] == 0.5


def test_guard_is_a_noop_without_perturbation():
    model = make_model()
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.4, adversary_prob=0.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    scale = torch.tensor(1.0)  # under a scaler the pass-1 gradient of a step without adversary is kept as it was
    update.absorb_gradient(scale)
    update.guard_perturbed_gradient(scale)  # no perturb() this step: nothing for the pass-2 guard to do
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    assert "vasso/perturbed_nonfinite_fraction" not in update.pop_metrics()


# ------------------------------------------------------------------ loaded state


def trained_update(steps=3, **kwargs):
    model = make_model()
    x, y = make_data()
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.4, **kwargs)
    for _ in range(steps):
        model.zero_grad()
        model(x, labels=y)["loss"].backward()
        update.absorb_gradient()
    return model, update


def test_state_validation_names_what_is_wrong():
    model, update = trained_update()
    state = update.state_dict()
    fresh = VassoUpdate(make_model().parameters(), rho=0.1, theta=0.4)
    fresh.validate_state_dict(state, expected_step=3)
    cases = [
        ({k: v for k, v in state.items() if k != "format"}, "format"),
        (dict(state, format="hf_vasso.VassoUpdate/1"), "older hf_vasso"),
        (dict(state, step=12), "at step 12 but the checkpoint is at step 3"),
        (dict(state, d=state["d"][:-1]), "holds 3 tensors, which do not match the 4 parameters"),
        (dict(state, d=[torch.full_like(state["d"][0], float("nan"))] + state["d"][1:]), "non-finite"),
        (dict(state, d=[torch.zeros(2, 2)] + state["d"][1:]), "expected a float"),
        ({"state": {}, "param_groups": []}, "format"),  # an optimizer.pt in its place
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fresh.validate_state_dict(bad, expected_step=3)
        with pytest.raises(ValueError):
            fresh.load_state_dict(bad, expected_step=3)
        assert fresh.step == 0 and all(not d.any() for d in fresh.d)  # nothing loaded
    fresh.load_state_dict(state, expected_step=3)
    assert fresh.step == 3 and all(torch.equal(a, b) for a, b in zip(fresh.d, update.d))


def test_changed_hyperparameters_are_allowed_and_logged(caplog):
    _, update = trained_update()
    other = VassoUpdate(make_model().parameters(), rho=0.2, theta=0.4, adversary_prob=0.5, seed=7)
    with caplog.at_level(logging.WARNING, logger="hf_vasso"):
        other.load_state_dict(update.state_dict())
    assert "rho changed at resume: 0.1 → 0.2" in caplog.text
    assert "adversary_prob changed at resume: 1.0 → 0.5" in caplog.text
    assert "seed changed at resume: 42 → 7" in caplog.text
    assert "theta" not in caplog.text
    assert other.rho == 0.2


def test_wrapper_load_is_atomic():
    """A VASSO state that does not fit leaves the base optimizer as it was."""
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for _ in range(2):
        model(x, labels=y)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    state = optimizer.state_dict()
    state["state"][0]["vasso_d"] = torch.full_like(state["state"][0]["vasso_d"], float("inf"))
    target = VASSO(torch.optim.AdamW(make_model().parameters(), lr=1e-2))
    with pytest.raises(ValueError, match="non-finite"):
        target.load_state_dict(state)
    assert target.base_optimizer.state_dict()["state"] == {}
    assert target.vasso.step == 0


# ------------------------------------------------------------------ input types


@pytest.mark.parametrize(
    "value", [np.float32(0.05), np.float64(0.05), np.int64(1), torch.tensor(0.05), fractions.Fraction(1, 20)]
)
def test_every_real_number_type_is_accepted(value):
    optimizer = VASSO(torch.optim.SGD(make_model().parameters(), lr=0.1), rho=value, theta=value, adversary_prob=value)
    assert type(optimizer.vasso.rho) is float and optimizer.vasso.rho == pytest.approx(float(value))
    assert type(optimizer.vasso.theta) is float and type(optimizer.vasso.adversary_prob) is float


@pytest.mark.parametrize("name", ["rho", "theta", "adversary_prob"])
@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), "0.1", None])
def test_booleans_and_non_numbers_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        VASSO(torch.optim.SGD(make_model().parameters(), lr=0.1), **{name: value})


def test_seed_must_be_integral():
    params = make_model().parameters
    assert VASSO(torch.optim.SGD(params(), lr=0.1), seed=np.int64(7)).vasso.seed == 7
    assert VASSO(torch.optim.SGD(params(), lr=0.1)).vasso.seed == 42  # the Trainer's default seed
    for bad in (1.7, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            VASSO(torch.optim.SGD(params(), lr=0.1), seed=bad)


def test_sparse_gradients_are_refused_with_a_clear_message():
    embedding = nn.Embedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="SparseAdam"):
        VASSO(torch.optim.SparseAdam(embedding.parameters()))
    update = VassoUpdate(embedding.parameters(), rho=0.1, theta=0.4, param_names=["embed.weight"])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="The gradient of embed.weight is sparse"):
        update.absorb_gradient()
    unnamed = VassoUpdate(embedding.parameters(), rho=0.1, theta=0.4)
    with pytest.raises(ValueError, match=r"The gradient of parameter #0 is sparse"):
        unnamed.absorb_gradient()


def test_is_adversary_step_is_the_module_coin():
    update = VassoUpdate(make_model().parameters(), rho=0.1, theta=0.4, adversary_prob=0.5, seed=3)
    assert [update.is_adversary_step(t) for t in range(20)] == [adversary_coin(3, t, 0.5) for t in range(20)]


# ------------------------------------------------------------------ metrics


def explicit_steps(optimizer, model, x, y, steps, closure_form=False):
    for _ in range(steps):
        model(x, labels=y)["loss"].backward()
        if closure_form:

            def closure():
                loss = model(x, labels=y)["loss"]
                loss.backward()
                return loss

            optimizer.step(closure)
            optimizer.zero_grad()
            continue
        if optimizer.first_step(zero_grad=True):
            model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)


def test_wrapper_metrics_report_losses_only_when_recorded():
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1))
    explicit_steps(optimizer, model, x, y, 3)
    metrics = optimizer.pop_metrics()
    assert "vasso/perturbed_loss" not in metrics and "vasso/sharpness" not in metrics

    explicit_steps(optimizer, model, x, y, 3, closure_form=True)
    metrics = optimizer.pop_metrics()
    assert metrics["vasso/perturbed_loss"] > 0 and "vasso/sharpness" not in metrics


def test_fp16_overflow_is_not_an_adversary_step_and_d_norm_skips_steps_without_d():
    x, y = make_data()
    model = make_model()
    update = VassoUpdate(model.parameters(), rho=0.1, theta=0.4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norms = []
    for step in range(4):
        model.zero_grad()
        scaler.scale(model(x, labels=y)["loss"]).backward()
        if step < 2:
            next(model.parameters()).grad[0, 0] = float("inf")
        update.absorb_gradient(scaler._scale)
        update.perturb()
        update.restore()
        norms.append(torch.sqrt(sum((d**2).sum() for d in update.d)).item())
    metrics = update.pop_metrics()
    assert metrics["vasso/adversary_fraction"] == 0.5
    assert metrics["vasso/nonfinite_fraction"] == 0.5
    assert metrics["vasso/d_norm"] == pytest.approx((norms[2] + norms[3]) / 2, rel=1e-5)


@pytest.mark.parametrize("theta", [0.4, 1.0], ids=["vasso", "sam"])
def test_adversary_cosine_is_between_successive_eps(theta):
    """With one rho and the plain geometry, the logged cosine is the cosine between successive ε (θ < 1: from
    squared norms; θ = 1: from <g, d_{t-1}>)."""
    x, y = make_data()
    model = make_model()
    update = VassoUpdate(model.parameters(), rho=0.1, theta=theta)
    eps, cosines = [], []
    for step in range(4):
        model.zero_grad()
        model(x * (1 + 0.3 * step), labels=y)["loss"].backward()
        update.absorb_gradient()
        before = [p.detach().clone() for p in model.parameters()]
        update.perturb()
        eps.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
        update.restore()
        if step:
            cosines.append(update.pop_metrics()["vasso/adversary_cosine"])
        else:
            assert "vasso/adversary_cosine" not in update.pop_metrics()
    for t, cos in enumerate(cosines, start=1):
        expected = (eps[t] @ eps[t - 1] / (eps[t].norm() * eps[t - 1].norm())).item()
        assert cos == pytest.approx(expected, abs=1e-5)


def test_state_format_tag(tmp_path):
    """A saved state carries the format tag through a file and loads; another tag (a future or older format) or
    none is refused before anything loads."""
    _, update = trained_update()
    torch.save(update.state_dict(), tmp_path / "vasso_state.pt")
    state = torch.load(tmp_path / "vasso_state.pt", weights_only=True)
    assert state["format"] == STATE_FORMAT and STATE_FORMAT.startswith("hf_vasso.VassoUpdate/")
    fresh = VassoUpdate(make_model().parameters(), rho=0.1, theta=0.4)
    fresh.load_state_dict(state, expected_step=3)
    assert fresh.step == 3
    for tag in ("hf_vasso.VassoUpdate/3", "hf_vasso.VassoUpdate/1", STATE_FORMAT + " "):
        other = VassoUpdate(make_model().parameters(), rho=0.1, theta=0.4)
        with pytest.raises(ValueError, match=f"format {STATE_FORMAT!r} \\(found {tag!r}\\)"):
            other.load_state_dict(dict(state, format=tag))
        assert other.step == 0 and all(not d.any() for d in other.d)


# aten ops that make the host wait for the device (on CUDA, `torch.cuda.set_sync_debug_mode("error")` flags them).
SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2"}


class SyncDetector(TorchDispatchMode):
    """Fails on every aten op that synchronises host and device, and on boolean-mask indexing (a `nonzero`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in SYNCING_OPS or any(t is not None and t.dtype == torch.bool for t in indices or ()):
            raise AssertionError(f"{func} synchronises host and device on the hot path")
        return func(*args, **(kwargs or {}))


def hot_path_steps(model, update, x, y, scale):
    """absorb / perturb / restore / guard / record_losses over 4 steps: a GradScaler scale, a NaN step, a change of
    the trainable set."""
    for step in range(4):
        if step == 2:
            model.net[0].weight.requires_grad_(False)
        model.zero_grad()
        loss = model(x, labels=y)["loss"]
        (loss * (float("nan") if step == 1 else 1.0) * scale).backward()
        update.absorb_gradient(scale if step % 2 else None, perturbing=step != 3)
        if step != 3:
            update.perturb()
            perturbed = model(x, labels=y)["loss"]
            perturbed.backward()
            update.restore()
            update.guard_perturbed_gradient()
            update.record_losses(loss, perturbed)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_hot_path_never_synchronises_host_and_device(monkeypatch, geometry):
    """The step decides on the device, for every registered geometry and both ways of moving weights: no aten op that
    syncs (`SyncDetector`: `.item()`, `nonzero`, a boolean mask, `equal`, ...), no Python read of a tensor value, and
    the whole step runs on the `meta` device, whose tensors have no values at all (a `.cpu()` round trip, or any read
    that the dispatcher does not see on a CPU, fails there), taking the accelerators' branches."""
    x, y = make_data()
    model = make_model()
    groups = [{"params": list(model.net[0].parameters()), "rho": 0.2}, {"params": list(model.net[-1].parameters())}]
    update = VassoUpdate(groups, rho=0.1, theta=0.4, adversary=geometry)
    assert {type(g) for g in update.geometries} == {GEOMETRIES[geometry]}

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value on the hot path")

    scale = torch.tensor(256.0)
    with monkeypatch.context() as patched, SyncDetector():
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            patched.setattr(torch.Tensor, name, host_read)
        hot_path_steps(model, update, x, y, scale)
    assert update.pop_metrics()["vasso/nonfinite_fraction"] == 0.25

    meta = make_model().to("meta")
    groups = [{"params": list(meta.net[0].parameters()), "rho": 0.2}, {"params": list(meta.net[-1].parameters())}]
    update = VassoUpdate(groups, rho=0.1, theta=0.4, adversary=geometry)
    hot_path_steps(meta, update, x.to("meta"), y.to("meta"), scale.to("meta"))


def test_the_sync_detector_catches_a_boolean_mask_and_a_host_copy():
    """The detectors above can fail: a boolean-mask assignment and `.item()` raise under `SyncDetector`, and a
    `.cpu()` round trip raises on the meta device."""
    t = torch.randn(8)
    with pytest.raises(AssertionError, match="synchronises"), SyncDetector():
        t[t > 0] = 0.0
    with pytest.raises(AssertionError, match="synchronises"), SyncDetector():
        t.sum().item()
    with pytest.raises(NotImplementedError):
        torch.randn(8, device="meta").cpu()


@pytest.mark.parametrize("adversary", sorted(GEOMETRIES))
@pytest.mark.parametrize(
    ("scale", "moves"),
    [(1e-20, True), (1e-21, False), (1e-23, False), (1e-24, False), (1e18, False)],
)
def test_extreme_gradient_norms_give_rho_or_no_perturbation(adversary, scale, moves):
    """The global norm is a sum of squares in fp32 (summable across ranks). Where ‖d‖² is a normal fp32 number the
    perturbation has norm ρ; where it would be subnormal (‖d‖ below about 1.1e-19, where its rounding made ‖ε‖ up to
    2.6ρ) the step is not perturbed, as with ‖d‖ = 0; where it overflows (‖g‖ above about 1.8e19) the gradient is
    handled as non-finite: d unchanged, no perturbation, counted in `vasso/nonfinite_fraction`."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(1000))
    update = VassoUpdate([p], rho=1.0, theta=1.0, adversary=adversary)
    p.grad = torch.randn(1000) * scale
    before = p.detach().clone()
    update.absorb_gradient()
    update.perturb()
    moved = (p.detach() - before).norm().item()
    if moves:
        assert moved == pytest.approx(1.0, rel=1e-4)
    else:
        assert moved == 0.0
    update.restore()
    metrics = update.pop_metrics()
    assert metrics["vasso/adversary_fraction"] == (1.0 if moves else 0.0)
    assert metrics["vasso/nonfinite_fraction"] == (1.0 if scale > 1 else 0.0)
    assert torch.isfinite(update.d[0]).all()


def test_a_pass_two_gradient_whose_norm_overflows_is_handled_as_non_finite():
    """Finite elements, but a norm above about 1.8e19 (its fp32 square overflows): zeroed before the base step and
    counted in `vasso/perturbed_nonfinite_fraction`, like a NaN (docs/failure-behaviour.md)."""
    p = torch.nn.Parameter(torch.ones(1000))
    update = VassoUpdate([p], rho=0.1, theta=0.4)
    p.grad = torch.randn(1000)
    update.absorb_gradient()
    update.perturb()
    p.grad = torch.full((1000,), 1e18)
    assert torch.isfinite(p.grad).all()
    update.restore()
    update.guard_perturbed_gradient()
    assert not p.grad.any()
    assert update.pop_metrics()["vasso/perturbed_nonfinite_fraction"] == 1.0
