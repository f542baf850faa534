"""Bad values are refused at configuration time with a message that names them and the fix."""

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
