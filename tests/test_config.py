"""Bad values are refused at configuration time with a message that names them and the fix."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import make_dataset, make_model
from transformers import HfArgumentParser, TrainingArguments

from hf_vasso import VASSO, VassoConfig, VassoTrainer


def config(tmp_path, **kwargs):
    return VassoConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rho", -0.1, "rho=-0.1 is invalid"),
        ("rho", float("nan"), "rho=nan is invalid"),
        ("theta", 0.0, r"theta=0.0 is invalid.*\(0, 1\]"),
        ("theta", 1.5, "theta=1.5 is invalid"),
        ("adversary_prob", -0.2, r"adversary_prob=-0.2 is invalid.*\[0, 1\]"),
        ("adversary_prob", 1.01, "adversary_prob=1.01 is invalid"),
    ],
)
def test_bad_values_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **{field: value})
    model = make_model()
    kwargs = {"rho": 0.05, "theta": 0.4, "adversary_prob": 1.0, field: value}
    with pytest.raises(ValueError, match=message):
        VASSO(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_defaults(tmp_path):
    args = config(tmp_path)
    assert (args.rho, args.theta, args.adversary_prob, args.sync_adversary) == (0.05, 0.4, 1.0, True)


def test_adaptive_false_beside_asam_is_refused_by_the_wrapper_and_lets_asam_win_in_the_config(tmp_path):
    """`adaptive=False` says "not ASAM": the wrapper refuses it beside `adversary="asam"`. The config writes
    `adaptive` from `adversary` itself, so there the pair may be its own write: `dataclasses.replace` of a default
    config (and a `to_dict` round trip) switching to ASAM stays valid, and "asam" wins."""
    import dataclasses

    with pytest.raises(ValueError, match="adaptive=False contradicts adversary='asam'"):
        VASSO(torch.optim.SGD(make_model().parameters(), lr=0.1), adversary="asam", adaptive=False)
    default = config(tmp_path)
    for args in (dataclasses.replace(default, adversary="asam"), config(tmp_path, adversary="asam", adaptive=False)):
        assert (args.adversary, args.adaptive) == ("asam", True)
    parser = HfArgumentParser(VassoConfig)
    for kwargs, name in [({"adversary": "asam"}, "asam"), ({"adaptive": False}, "vasso"), ({"adaptive": True}, "asam"),
                         ({"adversary": "asam", "adaptive": True}, "asam"), ({}, "vasso")]:  # fmt: skip
        args = config(tmp_path, **kwargs)
        assert (args.adversary, args.adaptive) == (name, name == "asam")
    for flags in (["--adversary", "asam"], ["--adaptive"], ["--adaptive", "true"]):  # a bare --adaptive is True
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *flags])
        assert (args.adversary, args.adaptive) == ("asam", True)


def test_deepspeed_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cannot run under DeepSpeed.*FSDP2"):
        config(tmp_path, deepspeed={"zero_optimization": {"stage": 2}})


def test_deepspeed_from_accelerate_launch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed"):
        config(tmp_path)


@pytest.mark.parametrize("overrides", [{"sync_adversary": False}, {"gradient_accumulation_steps": 2}])
def test_static_graph_with_unsynced_backward_is_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match="ddp_static_graph=True cannot run"):
        config(tmp_path, ddp_static_graph=True, **overrides)


def test_static_graph_alone_is_accepted(tmp_path):
    assert config(tmp_path, ddp_static_graph=True).ddp_static_graph


def test_command_line_flags_with_help(tmp_path):
    parser = HfArgumentParser(VassoConfig)
    flags = ["--output_dir", str(tmp_path), "--rho", "0.1", "--theta", "0.2", "--adversary_prob", "0.3"]
    (args,) = parser.parse_args_into_dataclasses(flags + ["--sync_adversary", "false", "--use_cpu", "true"])
    assert (args.rho, args.theta, args.adversary_prob, args.sync_adversary) == (0.1, 0.2, 0.3, False)
    help_text = parser.format_help()
    for flag in ("--rho", "--theta", "--adversary_prob", "--sync_adversary"):
        assert flag in help_text
    assert "Radius of the adversarial perturbation" in help_text


def test_plain_training_arguments_are_upgraded(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.123, use_cpu=True, report_to=[], seed=5)
    trainer = VassoTrainer(model=make_model(), args=plain, train_dataset=make_dataset())
    assert isinstance(trainer.args, VassoConfig)
    assert (trainer.args.learning_rate, trainer.args.seed, trainer.args.rho) == (0.123, 5, 0.05)


def test_args_none_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = VassoTrainer(model=make_model(), train_dataset=make_dataset())
    assert isinstance(trainer.args, VassoConfig) and trainer.args.theta == 0.4


def test_wrapper_needs_an_optimizer_instance():
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer instance"):
        VASSO(torch.optim.SGD, rho=0.05)


def test_wrapper_needs_trainable_parameters():
    model = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        VASSO(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("rho", np.float32(0.05)),
        ("theta", np.float64(0.4)),
        ("rho", torch.tensor(0.1)),
        ("adversary_prob", np.int64(1)),
        ("theta", Fraction(1, 2)),
    ],
)
def test_every_real_number_type_is_accepted_and_converted(tmp_path, field, value):
    args = config(tmp_path, **{field: value})
    assert type(getattr(args, field)) is float and getattr(args, field) == pytest.approx(float(value))


@pytest.mark.parametrize("field", ["rho", "theta", "adversary_prob"])
def test_booleans_are_refused(tmp_path, field):
    with pytest.raises(ValueError, match=f"{field}=True is invalid"):
        config(tmp_path, **{field: True})


class SparseEmbeddingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4, sparse=True)

    def forward(self, x, labels=None):
        return {"loss": self.embedding(x).sum()}


def test_sparse_gradients_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="embedding .*sparse=True.*dense"):
        VassoTrainer(SparseEmbeddingModel(), config(tmp_path))
