"""Every identity of docs/algorithm.md, checked against the independent reference loop in helpers.py."""

import copy

import pytest
import torch
from helpers import (
    make_args,
    make_data,
    make_dataset,
    make_model,
    max_abs_diff,
    reference_coin,
    reference_vasso,
    weights,
)
from transformers import Trainer

from hf_vasso import VASSO, VassoTrainer
from hf_vasso.adversary import GEOMETRIES

TOL = 2e-5


@pytest.fixture(params=sorted(GEOMETRIES))
def adversary(request):
    """Each registered adversary geometry, by the name users select it by: every identity that takes this fixture
    holds for every geometry of the engine's registry (a new one included)."""
    return request.param


def assert_geometry(trainer, adversary):
    """Sentinel: the Trainer's engine built the geometry the switch selects (the registry was really used)."""
    assert {type(g) for g in trainer.vasso.geometries} == {GEOMETRIES[adversary]}


def train_vasso(tmp_path, model=None, **overrides):
    model = make_model() if model is None else model
    trainer = VassoTrainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=make_dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "theta, adversary_prob",
    [(0.4, 1.0), (0.2, 1.0), (1.0, 1.0), (0.4, 0.5)],
    ids=["vasso", "vasso-theta0.2", "sam", "evasso-p0.5"],
)
def test_trainer_matches_reference(tmp_path, theta, adversary_prob):
    """A dozen full-batch AdamW steps agree with the reference within 2e-5 (theta=1 is SAM, p<1 is eVASSO)."""
    x, y = make_data()
    ref_model, records = reference_vasso(
        make_model(), x, y, steps=12, lr=1e-2, rho=0.1, theta=theta, adversary_prob=adversary_prob
    )
    trainer = train_vasso(tmp_path, theta=theta, adversary_prob=adversary_prob)
    assert max_abs_diff(weights(trainer.model), weights(ref_model)) < TOL
    # The final d is the reference's too.
    reference_d = dict(zip([n for n, _ in make_model().named_parameters()], records[-1]["d"]))
    assert sorted(trainer.vasso.names()) == sorted(reference_d)
    for name, d in zip(trainer.vasso.names(), trainer.vasso.d):
        torch.testing.assert_close(d, reference_d[name], atol=TOL, rtol=0)
    # The step moved the weights: the comparison is not between two untouched models.
    assert max_abs_diff(weights(trainer.model), weights(make_model())) > 1e-2


def test_sam_differs_from_vasso(tmp_path):
    """The identities above could not tell theta apart if d were ignored: check that theta matters after step 1."""
    sam = train_vasso(tmp_path / "sam", theta=1.0)
    vasso = train_vasso(tmp_path / "vasso", theta=0.2)
    assert max_abs_diff(weights(sam.model), weights(vasso.model)) > 1e-4


def test_first_step_is_sam_for_any_theta(tmp_path, adversary):
    """d_1 = g_1 (the official code clones the first gradient), so step 1 is a SAM step whatever theta is."""
    sam = train_vasso(tmp_path / "sam", theta=1.0, max_steps=1, adversary=adversary)
    vasso = train_vasso(tmp_path / "vasso", theta=0.3, max_steps=1, adversary=adversary)
    assert_geometry(vasso, adversary)
    assert max_abs_diff(weights(sam.model), weights(vasso.model)) == 0.0
    assert max_abs_diff(weights(vasso.model), weights(make_model())) > 0  # the step moved the weights


def test_p0_equals_base_optimizer_bit_for_bit(tmp_path, adversary):
    """adversary_prob=0 is the plain Trainer, to the bit: one pass, base step with g, no perturbation."""
    vasso = train_vasso(tmp_path / "v", adversary_prob=0.0, adversary=adversary)
    assert_geometry(vasso, adversary)
    plain = Trainer(model=make_model(), args=make_args(tmp_path / "p"), train_dataset=make_dataset())
    plain.train()
    for k, v in weights(plain.model).items():
        assert torch.equal(v, weights(vasso.model)[k]), k
    history = [h for h in vasso.state.log_history if "vasso/adversary_fraction" in h]
    assert history and all(h["vasso/adversary_fraction"] == 0.0 for h in history)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, adversary):
    """4 micro-batches of 8 give the same d, eps and update as one batch of 32: one adversary per optimizer step."""
    big = train_vasso(tmp_path / "big", max_steps=6, adversary=adversary)
    small = train_vasso(
        tmp_path / "small",
        max_steps=6,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        adversary=adversary,
    )
    assert_geometry(small, adversary)
    assert max_abs_diff(weights(big.model), weights(small.model)) < TOL
    assert max_abs_diff(weights(big.model), weights(make_model())) > 1e-2  # the steps moved the weights
    for d, d_ref in zip(small.vasso.d, big.vasso.d):
        torch.testing.assert_close(d, d_ref, atol=TOL, rtol=0)
    assert small.vasso.step == big.vasso.step == 6
    # Logged loss is the clean loss of the whole step in both.
    big_loss = [h["loss"] for h in big.state.log_history if "loss" in h]
    small_loss = [h["loss"] for h in small.state.log_history if "loss" in h]
    assert big_loss == pytest.approx(small_loss, abs=1e-5)


def test_lr_zero_leaves_weights_bit_identical(tmp_path, adversary):
    """With lr=0 only the perturbation could move the weights: the restore is by copy, so nothing moves, ever."""
    model = make_model()
    before = weights(model)
    trainer = train_vasso(tmp_path, model=model, learning_rate=0.0, max_steps=25, rho=0.5, adversary=adversary)
    assert_geometry(trainer, adversary)
    for k, v in weights(trainer.model).items():
        assert torch.equal(v, before[k]), k
    assert trainer.vasso.step == 25


def test_logged_loss_is_the_clean_loss(tmp_path):
    x, y = make_data()
    _, records = reference_vasso(make_model(), x, y, steps=4, lr=1e-2, rho=0.1, theta=0.4)
    trainer = train_vasso(tmp_path, max_steps=4)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx([r["loss"] for r in records], abs=1e-5)
    assert [h["vasso/perturbed_loss"] for h in logged] == pytest.approx(
        [r["perturbed_loss"] for r in records], abs=1e-5
    )
    for h, r in zip(logged, records):
        assert h["vasso/sharpness"] == pytest.approx(r["perturbed_loss"] - r["loss"], abs=1e-5)


def test_evasso_coins_follow_seed_and_step(tmp_path):
    trainer = train_vasso(tmp_path, adversary_prob=0.5, max_steps=40, logging_steps=40)
    expected = sum(reference_coin(42, t, 0.5) for t in range(40)) / 40
    fraction = next(h["vasso/adversary_fraction"] for h in trainer.state.log_history if "loss" in h)
    assert fraction == pytest.approx(expected)
    assert 0.2 < fraction < 0.8


def test_wrapper_and_trainer_same_trajectory(tmp_path, adversary):
    """The VASSO optimizer in a plain loop and VassoTrainer share the update code and give the same weights."""
    trainer = train_vasso(tmp_path, theta=0.4, adversary_prob=0.5, seed=7, adversary=adversary)
    assert_geometry(trainer, adversary)
    x, y = make_data()
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    optimizer = VASSO(base, rho=0.1, theta=0.4, adversary_prob=0.5, seed=7, adversary=adversary)
    assert {type(g) for g in optimizer.vasso.geometries} == {type(g) for g in trainer.vasso.geometries}
    for _ in range(12):
        model(x, labels=y)["loss"].backward()
        if optimizer.first_step(zero_grad=True):
            model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    assert max_abs_diff(weights(model), weights(trainer.model)) < TOL


def test_wrapper_closure_form_matches_explicit_steps():
    x, y = make_data()
    models = [make_model(), make_model()]
    optimizers = [VASSO(torch.optim.SGD(m.parameters(), lr=0.1), rho=0.05, theta=0.5) for m in models]
    for _ in range(5):
        a, b = models
        a(x, labels=y)["loss"].backward()
        optimizers[0].first_step(zero_grad=True)
        a(x, labels=y)["loss"].backward()
        optimizers[0].second_step(zero_grad=True)

        def closure(b=b):
            loss = b(x, labels=y)["loss"]
            loss.backward()
            return loss

        closure()
        assert optimizers[1].step(closure) is not None
        optimizers[1].zero_grad()
    for k, v in weights(models[0]).items():
        assert torch.equal(v, weights(models[1])[k])


def test_perturbation_has_norm_rho():
    model = make_model()
    x, y = make_data()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.37, theta=0.5)
    before = copy.deepcopy(weights(model))
    model(x, labels=y)["loss"].backward()
    optimizer.first_step(zero_grad=True)
    shift = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert shift.item() == pytest.approx(0.37, rel=1e-5)
    optimizer.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_zero_gradient_gives_zero_perturbation_not_nan():
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    before = weights(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.first_step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    optimizer.second_step()


def test_adversary_cosine_metric(tmp_path):
    """vasso/adversary_cosine is the cosine between successive adversaries (ε ∝ d here: one rho, plain geometry),
    computed without storing d_{t-1}."""
    x, y = make_data()
    _, records = reference_vasso(make_model(), x, y, steps=3, lr=1e-2, rho=0.1, theta=0.4)
    trainer = train_vasso(tmp_path, max_steps=3)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "vasso/adversary_cosine" not in logged[0]  # no previous adversary on step 1
    for t in (1, 2):
        a = torch.cat([d.flatten() for d in records[t]["d"]])
        b = torch.cat([d.flatten() for d in records[t - 1]["d"]])
        cos = (a @ b / (a.norm() * b.norm())).item()
        assert logged[t]["vasso/adversary_cosine"] == pytest.approx(cos, abs=1e-5)
        assert logged[t]["vasso/d_norm"] == pytest.approx(a.norm().item(), rel=1e-5)


def test_metric_keys_reach_log_history(tmp_path):
    trainer = train_vasso(tmp_path, max_steps=4, logging_steps=2)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    expected = {
        "vasso/adversary_fraction",
        "vasso/perturbed_loss",
        "vasso/sharpness",
        "vasso/d_norm",
        "vasso/grad_norm",
        "vasso/adversary_cosine",
        "vasso/nonfinite_fraction",
    }
    assert len(logged) == 2  # steps 2 and 4: the loop below cannot pass on an empty history
    for h in logged:
        assert expected <= set(h)
        assert h["vasso/adversary_fraction"] == 1.0
        assert h["vasso/nonfinite_fraction"] == 0.0
