"""VassoTrainer behaves like Trainer on every path a real run takes, not only the happy one.

Each test is one kind of departure found on the first release (re-training, batch types, half-done steps, argument
subclasses, optimizers that step in backward, a trainable set that changes, compute accounting).
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from helpers import make_args, make_dataset, make_model, tiny_llama, token_dataset, weights
from transformers import Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments
from transformers.tokenization_utils_base import BatchEncoding

from hf_vasso import VassoArguments, VassoConfig, VassoTrainer


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- re-training: the state follows the model/optimizer


def test_model_init_retraining_starts_vasso_afresh(tmp_path):
    """`model_init` (and so `hyperparameter_search`) rebuilds model and optimizer on every `train()`: so must VASSO."""
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8)
    trainer = VassoTrainer(model_init=lambda: make_model(seed=0), args=args, train_dataset=make_dataset(32))
    trainer.train()
    first = weights(trainer.model)
    trainer.train()
    assert_bit_identical(first, weights(trainer.model))
    assert trainer.vasso.step == 8  # 2 epochs x 4 steps, not 16: the second run did not continue the first
    assert {id(p) for p in trainer.model.parameters()} <= {id(p) for p in trainer.vasso.params}


# ---------------------------------------------------------------- batches reach compute_loss as the Trainer gives them


class TupleBatchLoss:
    """A user's `compute_loss` for a collator that yields `(x, y)` tuples; records each batch's type."""

    seen_types: list[type]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_types.append(type(inputs))
        x, y = inputs
        outputs = model(x, labels=y)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


class TupleTrainer(TupleBatchLoss, Trainer):
    pass


class TupleVassoTrainer(TupleBatchLoss, VassoTrainer):
    pass


def tuple_collator(rows):
    return torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])


@pytest.mark.parametrize("adversary_prob", [0.0, 1.0])
def test_tuple_batches(tmp_path, adversary_prob):
    """Tuple batches train like dict batches: p = 0 equals the plain Trainer, p = 1 equals the same run on dicts."""
    kwargs = dict(train_dataset=make_dataset(32), data_collator=tuple_collator)
    overrides = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6)
    vasso = TupleVassoTrainer(
        make_model(), make_args(tmp_path / "v", adversary_prob=adversary_prob, **overrides), **kwargs
    )
    vasso.seen_types = []
    vasso.train()
    assert set(vasso.seen_types) == {tuple}
    if adversary_prob == 0:
        plain = TupleTrainer(make_model(), make_args(tmp_path / "p", **overrides), **kwargs)
        plain.seen_types = []
        plain.train()
        assert_bit_identical(weights(plain.model), weights(vasso.model))
    else:
        dicts = VassoTrainer(make_model(), make_args(tmp_path / "d", **overrides), train_dataset=make_dataset(32))
        dicts.train()
        assert_bit_identical(weights(dicts.model), weights(vasso.model))


class TypeRecordingVassoTrainer(VassoTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_types.append(type(inputs))
        inputs.pop("labels_copy")  # mutating the batch it is given must not reach the other pass
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_mapping_batches_keep_their_type_and_are_not_shared_between_passes(tmp_path):
    def collate(rows):
        x, y = torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])
        return BatchEncoding({"x": x, "labels": y, "labels_copy": y.clone()})

    overrides = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=3)
    trainer = TypeRecordingVassoTrainer(
        make_model(), make_args(tmp_path, **overrides), train_dataset=make_dataset(32), data_collator=collate
    )
    trainer.seen_types = []
    trainer.train()
    assert trainer.seen_types == [BatchEncoding] * 12  # 3 steps x 2 micro-batches x 2 passes


# ---------------------------------------------------------------- nothing of an aborted step survives


def spy_on_passes(trainer: VassoTrainer) -> list[tuple[int, bool, float]]:
    """Wrap `compute_loss` to record (global step, perturbed?, a fingerprint of the micro-batch)."""
    records: list[tuple[int, bool, float]] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        perturbed = trainer.vasso is not None and trainer.vasso.perturbed
        records.append((trainer.state.global_step, perturbed, float(inputs["x"][0, 0])))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return records


def assert_pass2_replays_pass1(records) -> None:
    """Within each step, pass 2 sees exactly the micro-batches pass 1 saw, in order."""
    by_step: dict[int, tuple[list[float], list[float]]] = {}
    for step, perturbed, fingerprint in records:
        by_step.setdefault(step, ([], []))[perturbed].append(fingerprint)
    assert by_step
    for step, (clean, perturbed) in by_step.items():
        assert perturbed in ([], clean), (step, clean, perturbed)


class Interrupt(TrainerCallback):
    """Raise KeyboardInterrupt between the two micro-batches of one step (as Ctrl-C in a notebook does)."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.fired = at_step, False

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def test_interrupted_step_does_not_leak_into_the_resumed_run(tmp_path):
    overrides = dict(
        per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=8, save_strategy="steps", save_steps=2
    )
    full = VassoTrainer(make_model(), make_args(tmp_path / "full", **overrides), train_dataset=make_dataset(64))
    full.train()

    trainer = VassoTrainer(make_model(), make_args(tmp_path / "cut", **overrides), train_dataset=make_dataset(64))
    trainer.add_callback(Interrupt(at_step=5))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    records = spy_on_passes(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    assert_pass2_replays_pass1(records)
    assert_bit_identical(weights(full.model), weights(trainer.model))


def test_a_second_train_call_logs_only_its_own_steps(tmp_path):
    """Steps of the first `train()` after its last log (5 and 6 of 6, logging every 4) do not reach the second
    run's first row, whose loss the Trainer too starts afresh: run at p = 0, it has no adversary step to report."""
    args = make_args(tmp_path, max_steps=6, logging_steps=4)
    trainer = VassoTrainer(make_model(), args, train_dataset=make_dataset())
    trainer.train()
    trainer.args.adversary_prob = 0.0
    trainer.train()
    (row,) = [r for r in trainer.state.log_history if "loss" in r]  # the second run's state and log
    assert row["step"] == 4 and row["vasso/adversary_fraction"] == 0.0 and "vasso/perturbed_loss" not in row


def test_out_of_memory_retry_starts_with_a_clean_step(tmp_path):
    """`auto_find_batch_size` restarts the loop after an out-of-memory error in the middle of a step."""
    args = make_args(
        tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=3, max_steps=4, auto_find_batch_size=True
    )
    trainer = VassoTrainer(make_model(), args, train_dataset=make_dataset(96))
    records = spy_on_passes(trainer)
    spied = trainer.compute_loss
    failed_at = []

    def compute_loss(model, inputs, *args, **kwargs):
        # Fail the second of three micro-batches of step 2, once: the first one is already kept for pass 2.
        in_step_2 = [r for r in records if r[0] == 2]
        if not failed_at and len(in_step_2) == 1 and not trainer.accelerator.sync_gradients:
            failed_at.append(len(records))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return spied(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    assert failed_at and trainer._train_batch_size < 8  # the retry happened, with a smaller batch
    assert_pass2_replays_pass1(records[: failed_at[0]])
    assert_pass2_replays_pass1(records[failed_at[0] :])


# ---------------------------------------------------------------- TrainingArguments subclasses


@dataclasses.dataclass
class MyArgs(TrainingArguments):
    my_extra: int = 3


@pytest.mark.parametrize(
    "args_class, extra",
    [(MyArgs, {"my_extra": 7}), (Seq2SeqTrainingArguments, {"sortish_sampler": True}), (TrainingArguments, {})],
)
def test_argument_subclasses_are_upgraded_keeping_type_and_fields(tmp_path, args_class, extra):
    given = args_class(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[], **extra)
    trainer = VassoTrainer(make_model(), given, train_dataset=make_dataset(32))
    args = trainer.args
    assert isinstance(args, args_class) and isinstance(args, VassoArguments)
    assert (args.rho, args.theta, args.adversary_prob) == (0.05, 0.4, 1.0)
    for name, value in extra.items():
        assert getattr(args, name) == value
    assert args.to_dict()["rho"] == 0.05 and args.max_steps == 2
    assert not isinstance(given, VassoArguments)  # the caller's object is not changed
    restored = pickle.loads(pickle.dumps(args))  # the Trainer saves its args with torch.save
    assert type(restored) is type(args) and restored.rho == 0.05
    trainer.train()
    assert trainer.vasso.step == 2


# ---------------------------------------------------------------- optimizers that step inside backward


BACKWARD_STEPPING_OPTIMIZERS = [
    "lomo",
    "adalomo",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "apollo_adamw_layerwise",
]


@pytest.mark.parametrize("optim", BACKWARD_STEPPING_OPTIMIZERS)
def test_optimizers_that_step_in_backward_are_refused(tmp_path, optim):
    with pytest.raises(ValueError, match=f"optim='{optim}'.*backward"):
        VassoConfig(output_dir=str(tmp_path), optim=optim)
    with pytest.raises(ValueError, match=f"optim='{optim}'.*backward"):
        VassoTrainer(make_model(), TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True))


# Every `OptimizerNames` value, classified by hand (read from transformers' `_get_optimizer_cls_and_kwargs` and the
# optimizers' sources): True = updates the weights inside backward() (refused), False = steps after backward.
OPTIM_STEPS_IN_BACKWARD = {
    **dict.fromkeys(
        ["adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor"], False
    ),
    **dict.fromkeys(["adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd"], False),
    **dict.fromkeys(["adagrad", "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit"], False),
    **dict.fromkeys(["paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"], False),
    **dict.fromkeys(["paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit"], False),
    **dict.fromkeys(["rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor"], False),
    **dict.fromkeys(["grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"], False),
    **dict.fromkeys(["apollo_adamw", "stable_adamw"], False),
    **dict.fromkeys(BACKWARD_STEPPING_OPTIMIZERS, True),
}


def test_every_installed_backward_stepping_optim_is_refused(tmp_path):
    """Pinned against transformers' list: a new optimizer name fails here until it is classified above."""
    from transformers.training_args import OptimizerNames

    installed = {o.value for o in OptimizerNames}
    assert installed == set(OPTIM_STEPS_IN_BACKWARD), f"classify: {sorted(installed ^ set(OPTIM_STEPS_IN_BACKWARD))}"
    for optim, steps_in_backward in OPTIM_STEPS_IN_BACKWARD.items():
        if steps_in_backward:
            with pytest.raises(ValueError, match="backward"):
                VassoConfig(output_dir=str(tmp_path), optim=optim)
        else:
            try:
                VassoConfig(output_dir=str(tmp_path), optim=optim, use_cpu=True)
            except ValueError as error:  # an optional package's check is fine, VASSO's refusal is not
                assert "cannot run with VASSO" not in str(error), optim


# ---------------------------------------------------------------- the trainable set may change mid-run


class UnfreezeAt(TrainerCallback):
    def __init__(self, module: torch.nn.Module, step: int) -> None:
        self.module, self.step = module, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.module.requires_grad_(True)


def test_unfrozen_backbone_is_perturbed_from_the_step_it_trains(tmp_path):
    model = make_model()
    backbone = model.net[0]
    backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # covers the backbone too
    trainer = VassoTrainer(
        model, make_args(tmp_path, max_steps=6), train_dataset=make_dataset(32), optimizers=(optimizer, None)
    )
    trainer.add_callback(UnfreezeAt(backbone, step=3))
    seen: list[tuple[int, bool, torch.Tensor]] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        seen.append(
            (
                trainer.state.global_step,
                trainer.vasso is not None and trainer.vasso.perturbed,
                backbone.weight.detach().clone(),
            )
        )
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    for (step, perturbed, w), (_, _, w_prev) in zip(seen[1::2], seen[0::2]):
        assert perturbed
        assert torch.equal(w, w_prev) == (step < 3), step  # pass 2 moved the backbone only once it trains
    index = next(i for i, p in enumerate(trainer.vasso.params) if p is backbone.weight)
    assert trainer.vasso.d[index] is not None


# ---------------------------------------------------------------- compute accounting


@pytest.mark.parametrize("adversary_prob", [0.0, 0.5, 1.0])
def test_total_flos_counts_the_passes_run(tmp_path, adversary_prob):
    overrides = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6, theta=0.4)
    plain = Trainer(tiny_llama(), make_args(tmp_path / "p", **overrides), train_dataset=token_dataset(48))
    plain.train()
    vasso = VassoTrainer(
        tiny_llama(),
        make_args(tmp_path / "v", adversary_prob=adversary_prob, **overrides),
        train_dataset=token_dataset(48),
    )
    vasso.train()
    adversary_steps = sum(vasso.vasso.is_adversary_step(t) for t in range(6))
    assert 0 < plain.state.total_flos
    assert vasso.state.total_flos == plain.state.total_flos * (6 + adversary_steps) / 6
