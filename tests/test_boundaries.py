"""The boundaries between VASSO and the objects around it that the matrix (`test_matrix.py`) does not generate:
transformers' save policies and JIT checkpoints, torch's distributed-checkpoint helpers, checkpoints transformers
saves under converted names, incomplete checkpoint folders, and the small refusals around them. Each test failed on
the release before the fix it holds."""

from __future__ import annotations

import copy
import logging
import os
import shutil

import pytest
import torch
from helpers import (
    RequestJITCheckpoint,
    make_args,
    make_data,
    make_dataset,
    make_model,
    small_vit,
    vasso_step,
    weights,
)
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from hf_vasso import VASSO, VassoTrainer, newest_complete_checkpoint
from hf_vasso.checkpoint import checkpoint_problem

# ---------------------------------------------------------------- transformers' save policies (case 6)


class EvaluationOrder(TrainerCallback):
    """Records, at every evaluation, which checkpoint folders already exist."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir, self.seen = output_dir, []

    def on_evaluate(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, sorted(os.listdir(self.output_dir))))


def test_a_jit_checkpoint_under_save_strategy_best_is_kept_and_written_before_the_evaluation(tmp_path):
    """A SIGTERM in step 2 under `save_strategy="best"`: the plain Trainer leaves checkpoint-1 (its best) and its JIT
    checkpoint; VASSO defers its JIT checkpoint to the step's end (checkpoint-2), and must neither drop it when that
    step's evaluation is not a new best nor make it wait for that evaluation (a preemption's grace period)."""
    args = make_args(
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="best",
        metric_for_best_model="loss",
        greater_is_better=True,  # a larger loss is "better": only step 1 is a new best, later steps are not
        enable_jit_checkpoint=True,
    )
    trainer = VassoTrainer(make_model(), args, train_dataset=make_dataset(n=64), eval_dataset=make_dataset(n=16))
    request = RequestJITCheckpoint(trainer, "on_substep_end", at_step=1)
    order = EvaluationOrder(str(tmp_path))
    trainer.add_callback(request)
    trainer.add_callback(order)
    trainer.train()
    assert request.fired and trainer.state.global_step == 2
    assert "checkpoint-2" in os.listdir(tmp_path), os.listdir(tmp_path)
    assert checkpoint_problem(str(tmp_path / "checkpoint-2")) is None
    step_2 = [folders for step, folders in order.seen if step == 2]
    assert step_2 and "checkpoint-2" in step_2[0], "the deferred checkpoint waited for the step's evaluation"


# ---------------------------------------------------------------- torch's distributed-checkpoint helpers (case 7)


def test_the_wrapper_state_travels_through_torch_distributed_checkpoint_helpers():
    """`get_optimizer_state_dict` (what FSDP2 checkpoints use) keeps d and the step; `set_optimizer_state_dict` into
    a fresh wrapper (which calls `step()` on zero gradients to build the state) loads them; the run continues bit for
    bit."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x, y = make_data()

    def step(model, optimizer):
        vasso_step(optimizer, lambda: model(x, labels=y)["loss"])

    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.4, model=model)
    for _ in range(3):
        step(model, optimizer)
    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))  # as a save and a load would: no shared tensors
    d = {k: v["vasso_d"] for k, v in saved["state"].items()}
    assert len(d) == len(list(model.parameters())) and saved["param_groups"][0]["vasso"]["step"] == 3

    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = VASSO(torch.optim.AdamW(twin.parameters(), lr=1e-2), rho=0.1, theta=0.4, model=twin)
    set_optimizer_state_dict(twin, twin_optimizer, saved)
    assert twin_optimizer.vasso.step == 3
    assert all(p.grad is None for p in twin.parameters())
    for _ in range(2):
        step(model, optimizer)
        step(twin, twin_optimizer)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_step_without_first_step_is_still_refused_outside_state_initialisation(lr):
    """The allowance for torch's state initialisation (every lr 0, no state yet, every gradient zero) does not let a
    one-pass loop pass, not even on the first step of a warm-up that starts at lr 0."""
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=lr))  # SGD without momentum keeps no state
    x, y = make_data()
    model(x, labels=y)["loss"].backward()
    with pytest.raises(ValueError, match="without a closure and without first_step"):
        optimizer.step()


# ---------------------------------------------------------------- 0-d parameters (case 8)


class Scalars(nn.Module):
    """transformers' own test models (`RegressionModel`): y = a·x + b with scalar parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, labels=None):
        out = self.a * x.sum(-1) + self.b
        return {"loss": None if labels is None else nn.functional.mse_loss(out, labels), "logits": out}


def test_a_model_with_0d_parameters_checkpoints_and_resumes_bit_exact(tmp_path):
    full = VassoTrainer(Scalars(), make_args(tmp_path / "full", max_steps=6), train_dataset=make_dataset())
    full.train()
    args = make_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    VassoTrainer(Scalars(), args, train_dataset=make_dataset()).train()
    resumed = VassoTrainer(Scalars(), args, train_dataset=make_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    for name, value in weights(full.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


# ---------------------------------------------------------------- checkpoints saved under converted names (case 9)


def vit_dataset(n: int = 16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()}).with_format("torch")


def tiny_vit(seed: int):
    torch.manual_seed(seed)
    return small_vit(image_size=8, patch_size=4, hidden=16, layers=1, heads=2, num_labels=3)


@pytest.mark.parametrize("resume_at", [2])
def test_a_vit_resumes_bit_exact_though_transformers_saves_it_under_converted_names(tmp_path, resume_at):
    """transformers 5 saves ViT's weights under converted names and the Trainer's resume loads them by raw name
    (strict=False): most weights stay at the new model's initialisation (transformers#43701). VassoTrainer loads
    them through the conversion: the resumed run ends on the uninterrupted run's weights, bit for bit."""
    common = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2)
    full = VassoTrainer(tiny_vit(0), make_args(tmp_path / "full", **common), train_dataset=vit_dataset())
    full.train()
    args = make_args(tmp_path / "cut", save_strategy="steps", save_steps=resume_at, **common)
    VassoTrainer(tiny_vit(0), args, train_dataset=vit_dataset()).train()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cut" / f"checkpoint-{resume_at}" / "model.safetensors"), "pt") as f:
        saved_names = set(f.keys())
    assert not saved_names <= set(tiny_vit(0).state_dict())  # the sentinel: the names really were converted
    resumed = VassoTrainer(tiny_vit(9), args, train_dataset=vit_dataset())  # other initial weights
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{resume_at}"))
    for name, value in weights(full.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


# ---------------------------------------------------------------- incomplete checkpoints (case 10)


def checkpoints(tmp_path, steps=(2, 4, 6)):
    args = make_args(tmp_path, max_steps=max(steps), save_strategy="steps", save_steps=2)
    VassoTrainer(make_model(), args, train_dataset=make_dataset()).train()
    return args


DAMAGE = {
    "trainer_state.json cut short": lambda c: _truncate(c / "trainer_state.json", 40),
    "vasso_state.pt flipped": lambda c: _flip_last_byte(c / "vasso_state.pt"),
    "model.safetensors cut short": lambda c: _truncate(c / "model.safetensors", -100),
    "JIT marker left": lambda c: (c / "checkpoint-is-incomplete.txt").write_text("in progress"),
    "trainer_state.json missing": lambda c: os.remove(c / "trainer_state.json"),
}


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # inside the tensor data, before the zip's central directory
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_true_takes_the_newest_complete_checkpoint_and_says_why(tmp_path, damage, caplog):
    """`train(resume_from_checkpoint=True)` skips a newest checkpoint that a full disk or a kill left incomplete,
    says which and why, and resumes from the previous one; the library function the recipes use agrees."""
    args = checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / "checkpoint-6")
    path, skipped = newest_complete_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "checkpoint-4") and [p for p, _ in skipped] == [str(tmp_path / "checkpoint-6")]
    resumed = VassoTrainer(make_model(), args, train_dataset=make_dataset())
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping {tmp_path / 'checkpoint-6'}" in caplog.text
    assert f"Resuming from {tmp_path / 'checkpoint-4'}" in caplog.text
    assert resumed.state.global_step == 6


def test_an_explicit_incomplete_checkpoint_is_refused_with_the_reason_and_the_newest_complete_one(tmp_path):
    args = checkpoints(tmp_path)
    _truncate(tmp_path / "checkpoint-6" / "trainer_state.json", 40)
    with pytest.raises(ValueError, match=r"trainer_state.json cannot be read.*newest complete one beside it is .*4"):
        VassoTrainer(make_model(), args, train_dataset=make_dataset()).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-6")
        )


def test_complete_checkpoints_have_no_problem(tmp_path):
    checkpoints(tmp_path)
    for step in (2, 4, 6):
        assert checkpoint_problem(str(tmp_path / f"checkpoint-{step}")) is None
    shutil.rmtree(tmp_path / "checkpoint-2")
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-6")


# ---------------------------------------------------------------- the minors (case 11)


def test_after_a_caught_accumulate_refusal_the_hand_recipe_with_a_new_accelerator_runs():
    """The refusal inside `accelerator.accumulate()` says to drop `gradient_accumulation_steps`; an Accelerator
    without it then runs the README's accumulation recipe."""
    from accelerate import Accelerator
    from test_misuse import accumulation_recipe
    from torch.utils.data import DataLoader, TensorDataset

    x, y = make_data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    vasso = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    model, optimizer, loader = accelerator.prepare(model, vasso, DataLoader(TensorDataset(x, y), batch_size=8))
    with pytest.raises(ValueError, match="without gradient_accumulation_steps"):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(xb, labels=yb)["loss"])
                vasso.first_step(zero_grad=True)
    accelerator = Accelerator(cpu=True)
    model = make_model()
    vasso = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    model, prepared = accelerator.prepare(model, vasso)
    accumulation_recipe(model, prepared, accelerator, list(zip(x.chunk(2), y.chunk(2))))
    assert vasso.vasso.step == 1


def test_a_users_own_theta_or_adaptive_field_is_read_as_vassos_and_said_so(tmp_path, caplog):
    """A user's arguments class with its own `theta`/`adaptive` (another meaning, VASSO-valid values) is read as
    VASSO's hyperparameters: VassoTrainer says so in a warning naming the fields and their values."""
    from dataclasses import dataclass, field

    @dataclass
    class MyArgs(TrainingArguments):
        theta: float = field(default=1.0)
        adaptive: bool = field(default=True)

    args = MyArgs(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer = VassoTrainer(make_model(), args, train_dataset=make_dataset())
    assert "MyArgs defines its own adaptive, theta" in caplog.text and "theta=1.0" in caplog.text
    assert trainer.args.adversary == "asam" and trainer.args.theta == 1.0


def test_two_parameters_over_one_storage_are_refused():
    """Two `Parameter`s viewing one storage would be moved twice (‖ε‖ = √2·ρ); tied weights (one Parameter) pass."""
    storage = torch.zeros(6)
    a, b = nn.Parameter(storage[:4]), nn.Parameter(storage[2:])
    with pytest.raises(ValueError, match="share memory"):
        VASSO(torch.optim.SGD([a, b], lr=0.1))
    disjoint = nn.Parameter(storage[4:])
    VASSO(torch.optim.SGD([nn.Parameter(storage[:4]), disjoint], lr=0.1))  # views of one storage that do not overlap
    tied = nn.Linear(2, 2)
    VASSO(torch.optim.SGD(list(tied.parameters()), lr=0.1))


def test_p0_log_rows_are_the_plain_trainers_plus_the_vasso_metrics(tmp_path):
    """README: at `adversary_prob=0` every row the plain Trainer logs is in VASSO's log with the same values; the rows
    add the `vasso/*` keys (d is still updated)."""
    from transformers import Trainer

    plain = Trainer(model=make_model(), args=make_args(tmp_path / "p", max_steps=4), train_dataset=make_dataset())
    plain.train()
    args = make_args(tmp_path / "v", max_steps=4, adversary_prob=0.0)
    ours = VassoTrainer(make_model(), args, train_dataset=make_dataset())
    ours.train()
    volatile = ("runtime", "per_second")
    for a, b in zip(plain.state.log_history, ours.state.log_history, strict=True):
        kept = {k: v for k, v in b.items() if not k.startswith("vasso/") and not any(s in k for s in volatile)}
        assert kept == {k: v for k, v in a.items() if not any(s in k for s in volatile)}
    assert any(k.startswith("vasso/") for k in ours.state.log_history[0])


def test_the_trainer_perturbs_exactly_what_its_optimizer_steps(tmp_path):
    """A user's optimizer over part of the trainable parameters: the others are neither perturbed nor in d."""
    model = make_model()
    head = list(model.net[-1].parameters())
    optimizer = torch.optim.SGD(head, lr=0.1)
    trainer = VassoTrainer(model, make_args(tmp_path, max_steps=2), train_dataset=make_dataset(),
                           optimizers=(optimizer, None))  # fmt: skip
    trainer.train()
    assert {id(p) for p in trainer.vasso.params} == {id(p) for p in head}
    assert trainer.vasso.names() == ["net.2.weight", "net.2.bias"]
    for name, value in weights(trainer.model).items():  # the body, trainable but not stepped, did not move
        if name.startswith("net.0"):
            assert torch.equal(value, weights(make_model())[name]), name


class GradientProbe(TrainerCallback):
    """The body's gradient as the optimizer step sees it (after both passes)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append(self.trainer.model.net[0].weight.grad.clone())


def test_trainable_parameters_the_optimizer_does_not_step_end_the_step_with_the_pass_2_gradient(tmp_path):
    """A head-only optimizer over a trainable body: the Trainer clips (and logs the norm of) every trainable
    gradient of the model, so the body's must be pass 2's, as the head's is, and not the sum of both passes."""
    x, y = make_data()
    model = make_model()
    head = list(model.net[-1].parameters())
    trainer = VassoTrainer(model, make_args(tmp_path, max_steps=1, rho=0.1), train_dataset=make_dataset(),
                           optimizers=(torch.optim.SGD(head, lr=0.1), None))  # fmt: skip
    probe = GradientProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    reference = make_model()  # pass 1 at x, then pass 2 with the head moved by ρ·g/‖g‖ (d = g on the first step)
    reference(x, labels=y)["loss"].backward()
    g = [p.grad.clone() for p in reference.net[-1].parameters()]
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    reference.zero_grad()
    with torch.no_grad():
        for p, gi in zip(reference.net[-1].parameters(), g):
            p.add_(0.1 * gi / norm)
    reference(x, labels=y)["loss"].backward()
    torch.testing.assert_close(probe.seen[0], reference.net[0].weight.grad)


class SetArguments(TrainerCallback):
    """Sets `args.<name> = value` at the start of step `at` (0-based)."""

    def __init__(self, at: int, **values) -> None:
        self.at, self.values = at, values

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            for name, value in self.values.items():
                setattr(args, name, value)


@pytest.mark.parametrize(
    "values, engine",
    [({"theta": 1.0}, {"theta": 1.0}), ({"adversary_prob": 0.0}, {"adversary_prob": 0.0}),
     ({"adversary": "sam"}, {"adversary": "vasso"}), ({"adversary": "asam"}, {"adversary": "asam"}),
     ({"adaptive": True}, {"adversary": "asam"}), ({"adversary": "asam", "adaptive": True}, {"adversary": "asam"})],
)  # fmt: skip
def test_theta_p_and_the_geometry_set_by_a_callback_are_read_at_the_next_step(tmp_path, values, engine):
    trainer = VassoTrainer(make_model(), make_args(tmp_path, max_steps=3), train_dataset=make_dataset(),
                           callbacks=[SetArguments(1, **values)])  # fmt: skip
    trainer.train()
    for name, value in engine.items():
        assert getattr(trainer.vasso, name) == value
    assert trainer.args.adaptive == (trainer.vasso.adversary == "asam")  # the alias written back consistent


class SetOnTheEngine(TrainerCallback):
    """Sets `trainer.vasso.<name> = value` at the start of step `at` (0-based), as `optimizer.vasso.rho = ...` does
    for the wrapper; `both` also sets `args.<name>` to another value."""

    def __init__(self, trainer, at: int, both: bool = False, **values) -> None:
        self.trainer, self.at, self.both, self.values = trainer, at, both, values

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            for name, value in self.values.items():
                setattr(self.trainer.vasso, name, value)
                if self.both:
                    setattr(args, name, value / 2)


@pytest.mark.parametrize("name, value", [("rho", 0.3), ("theta", 1.0), ("adversary_prob", 0.5), ("adversary", "asam")])
def test_a_value_set_on_trainer_vasso_is_taken_and_written_back_to_the_arguments(tmp_path, name, value):
    """`trainer.vasso.rho = 0.3` between steps is not undone by the arguments the Trainer reads each step: it is used
    from that step on and written back to `args` (which checkpoints save)."""
    trainer = VassoTrainer(make_model(), make_args(tmp_path, max_steps=3), train_dataset=make_dataset())
    trainer.add_callback(SetOnTheEngine(trainer, 1, **{name: value}))
    records = []
    trainer.add_callback(Record(trainer, records, name))
    trainer.train()
    assert records == [getattr(make_args(tmp_path), name), value, value]
    assert getattr(trainer.args, name) == value
    assert trainer.args.adaptive == (trainer.args.adversary == "asam")


def test_a_value_set_on_both_trainer_vasso_and_the_arguments_is_refused(tmp_path):
    trainer = VassoTrainer(make_model(), make_args(tmp_path, max_steps=3), train_dataset=make_dataset())
    trainer.add_callback(SetOnTheEngine(trainer, 1, both=True, rho=0.3))
    with pytest.raises(ValueError, match=r"rho was set on both trainer.args \(0.15\) and trainer.vasso \(0.3\)"):
        trainer.train()
    assert trainer.vasso.step == 1


class Record(TrainerCallback):
    """The engine's value of `name` at each step, after the step's passes (which read it)."""

    def __init__(self, trainer, records: list, name: str) -> None:
        self.trainer, self.records, self.name = trainer, records, name

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.records.append(getattr(self.trainer.vasso, self.name))


@pytest.mark.parametrize(
    "values, message",
    [({"theta": 1.5}, "theta=1.5 is invalid"), ({"adversary": "nope"}, "not a registered adversary geometry"),
     ({"adversary": "plain", "adaptive": True}, "adaptive=True selects ASAM's adversary but adversary='plain'")],
)  # fmt: skip
def test_an_invalid_value_set_by_a_callback_is_refused_before_the_step_changes_d(tmp_path, values, message):
    trainer = VassoTrainer(make_model(), make_args(tmp_path, max_steps=3), train_dataset=make_dataset(),
                           callbacks=[SetArguments(1, **values)])  # fmt: skip
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.vasso.step == 1  # the refused step folded nothing into d


def test_a_save_over_a_folder_with_a_stale_incomplete_marker_leaves_a_complete_checkpoint(tmp_path):
    """A JIT save killed mid-write leaves checkpoint-6 with its marker; resume skips it, and when the resumed run
    saves step 6 into that same folder, the checkpoint it writes is complete (the stale marker goes)."""
    args = checkpoints(tmp_path)
    (tmp_path / "checkpoint-6" / "checkpoint-is-incomplete.txt").write_text("in progress")
    VassoTrainer(make_model(), args, train_dataset=make_dataset()).train(resume_from_checkpoint=True)
    assert checkpoint_problem(str(tmp_path / "checkpoint-6")) is None
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-6")


@pytest.mark.parametrize(
    "damage",
    ["optimizer.pt cut short", "scheduler.pt cut short", "rng_state.pth cut short", "optimizer.pt missing"],
)
def test_a_checkpoint_with_a_damaged_or_missing_optimizer_scheduler_or_rng_file_is_incomplete(tmp_path, damage):
    """The plain Trainer's resume crashes on a cut optimizer, scheduler or RNG file ("PytorchStreamReader failed")
    and silently restarts the optimizer when optimizer.pt is gone: VASSO's checkpoint check names each."""
    checkpoints(tmp_path)
    name, what = damage.split(" ", 1)
    path = tmp_path / "checkpoint-6" / name
    if what == "missing":
        os.remove(path)
    else:
        _truncate(path, path.stat().st_size // 2)
    problem = checkpoint_problem(str(tmp_path / "checkpoint-6"))
    assert problem is not None and name in problem
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-4")


def test_the_geometry_changed_in_args_before_a_run_with_a_new_engine_is_taken(tmp_path):
    """`model_init` re-training builds a new engine from `args`: the geometry the old run last read is no reference
    for it (it was refused as "set on both" with two equal values)."""
    trainer = VassoTrainer(model_init=lambda: make_model(), args=make_args(tmp_path, max_steps=2, adversary="asam"),
                           train_dataset=make_dataset())  # fmt: skip
    trainer.train()
    trainer.args.adversary, trainer.args.adaptive = "vasso", False
    trainer.train()
    assert trainer.vasso.adversary == "vasso"


def test_the_same_geometry_set_on_both_trainer_vasso_and_the_arguments_is_accepted(tmp_path):
    trainer = VassoTrainer(make_model(), make_args(tmp_path, max_steps=3), train_dataset=make_dataset())
    trainer.add_callback(SetOnTheEngine(trainer, 1, adversary="asam"))
    trainer.add_callback(SetArguments(1, adversary="asam"))
    trainer.train()
    assert trainer.vasso.adversary == "asam" and trainer.args.adaptive


def test_adaptive_changed_alone_before_a_run_with_a_new_engine_selects_the_geometry(tmp_path):
    """`args.adaptive = False` alone after an ASAM run (the alias changed, `args.adversary` still "asam"): the new
    engine of a `model_init` run takes VASSO's geometry, as it would at the next step of the same run."""
    trainer = VassoTrainer(model_init=lambda: make_model(), args=make_args(tmp_path, max_steps=2, adversary="asam"),
                           train_dataset=make_dataset())  # fmt: skip
    trainer.train()
    trainer.args.adaptive = False
    trainer.train()
    assert trainer.vasso.adversary == "vasso" and trainer.args.adversary == "vasso"
