"""One test per way of holding the API wrong: each ends in the VASSO result or in a refusal that names the misuse and
the fix. Found by replaying public bug reports of SAM libraries and Trainer subclasses, and by using the library as a
new user would."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle

import pytest
import torch
from accelerate import Accelerator
from helpers import make_args, make_data, make_dataset, make_model, max_abs_diff, vasso_step, weights
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_vasso import VASSO, VassoArguments, VassoConfig, VassoTrainer, VassoTrainerMixin, restored_attributes
from hf_vasso.arguments import vasso_arguments_class


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- arguments


@dataclasses.dataclass
class ArgsWithOwnRho(TrainingArguments):
    rho: float = 0.5
    my_list: list = dataclasses.field(default_factory=lambda: ["a"])


def test_a_users_own_rho_field_keeps_the_users_value(tmp_path):
    given = ArgsWithOwnRho(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[], rho=0.9)
    trainer = VassoTrainer(make_model(), given, train_dataset=make_dataset())
    trainer.train()
    assert trainer.args.rho == 0.9 and trainer.vasso.rho == 0.9  # not overwritten by VASSO's default 0.05
    assert trainer.args.theta == 0.4  # fields the user's class lacks take the VASSO defaults


@dataclasses.dataclass
class ArgsWithOwnAdaptive(TrainingArguments):
    adaptive: str = "cosine"  # the user's own meaning of the name


def test_a_users_field_of_the_same_name_with_another_meaning_is_refused(tmp_path):
    given = ArgsWithOwnAdaptive(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="adaptive='cosine' is invalid.*ArgsWithOwnAdaptive defines its own adaptive"):
        VassoTrainer(make_model(), given, train_dataset=make_dataset())


def test_the_upgraded_copy_does_not_share_list_fields_with_the_users_args(tmp_path):
    given = ArgsWithOwnRho(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = VassoTrainer(make_model(), given, train_dataset=make_dataset())
    trainer.args.my_list.append("b")
    trainer.args.report_to.append("tensorboard")
    assert given.my_list == ["a"] and given.report_to == []  # the docstring: `args` is not changed


def test_config_mixin_after_training_arguments_is_refused_at_class_creation():
    with pytest.raises(TypeError, match=r"puts VassoArguments after TrainingArguments.*class C\(VassoArguments"):

        @dataclasses.dataclass
        class C(TrainingArguments, VassoArguments):
            pass


@dataclasses.dataclass
class MyArgs(TrainingArguments):
    my_extra: int = 3


class SubclassOfGenerated(vasso_arguments_class(MyArgs)):
    pass


def test_a_user_subclass_of_a_generated_config_class_pickles(tmp_path):
    args = SubclassOfGenerated(output_dir=str(tmp_path), my_extra=5, rho=0.2, use_cpu=True, report_to=[])
    restored = pickle.loads(pickle.dumps(args))  # the Trainer saves its args with torch.save
    assert type(restored) is SubclassOfGenerated and (restored.my_extra, restored.rho) == (5, 0.2)


# ---------------------------------------------------------------- the trainer mixin


def test_trainer_mixin_after_trainer_is_refused_at_class_creation():
    with pytest.raises(
        TypeError, match=r"puts VassoTrainerMixin after Trainer.*class T\(VassoTrainerMixin, Trainer\)"
    ):

        class T(Trainer, VassoTrainerMixin):
            pass


def test_a_subclass_of_vasso_trainer_before_a_users_trainer_is_accepted():
    """Only `Trainer` itself before the mixin is dead code; a user's pass-through subclass in front is fine."""

    class MyTrainer(Trainer):
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs)

    class T(MyTrainer, VassoTrainer):
        pass

    assert T.__mro__.index(VassoTrainerMixin) < T.__mro__.index(Trainer)


def test_vasso_wrapper_as_vasso_trainer_optimizer_is_refused(tmp_path):
    model = make_model()
    wrapper = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    with pytest.raises(ValueError, match=r"optimizers=\(VASSO\(...\), ...\).*Pass the base optimizer"):
        VassoTrainer(model, make_args(tmp_path), train_dataset=make_dataset(), optimizers=(wrapper, None))


def test_vasso_class_in_optimizer_cls_and_kwargs_is_refused(tmp_path):
    kwargs = {"base_optimizer": torch.optim.AdamW, "lr": 1e-2}
    with pytest.raises(ValueError, match="already runs the VASSO step"):
        VassoTrainer(
            make_model(), make_args(tmp_path), train_dataset=make_dataset(), optimizer_cls_and_kwargs=(VASSO, kwargs)
        )


def test_model_init_with_peft_config_applies_lora_to_every_model(tmp_path):
    """What `hyperparameter_search` over a LoRA model needs: `model_init` and `peft_config` together."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def lora():
        targets = ["net.0", "net.2"]
        return LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)

    args = make_args(tmp_path, max_steps=3)
    trainer = VassoTrainer(
        model_init=lambda: make_model(), args=args, train_dataset=make_dataset(), peft_config=lora()
    )
    trainer.train()
    first = trainer.model
    trainer.train()
    assert isinstance(trainer.model, PeftModel) and trainer.model is not first  # a new PeftModel per model_init
    by_hand = VassoTrainer(  # the same runs with get_peft_model inside model_init
        model_init=lambda: get_peft_model(make_model(), lora()), args=args, train_dataset=make_dataset()
    )
    by_hand.train()
    assert max_abs_diff(weights(by_hand.model), weights(get_peft_model(make_model(), lora()))) > 1e-3  # it trained
    assert_bit_identical(weights(by_hand.model), weights(trainer.model))


class EventRecorder(TrainerCallback):
    """Every callback event, in order (as transformers' own callback tests record them)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            self.events.append(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("adversary_prob", [0.0, 1.0])
def test_callback_list_and_event_flow_equal_the_plain_trainers(tmp_path, adversary_prob):
    overrides = dict(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    runs = {}
    for name, cls in (("plain", Trainer), ("vasso", VassoTrainer)):
        args = make_args(
            tmp_path / name, adversary_prob=adversary_prob, eval_strategy="steps", eval_steps=2, **overrides
        )
        recorder = EventRecorder()
        trainer = cls(
            make_model(), args, train_dataset=make_dataset(), eval_dataset=make_dataset(8), callbacks=[recorder]
        )
        listed = [type(c) for c in trainer.callback_handler.callbacks]
        trainer.remove_callback(EventRecorder)
        trainer.add_callback(recorder)
        trainer.train()
        runs[name] = (listed, [type(c) for c in trainer.callback_handler.callbacks], recorder.events)
    assert runs["plain"][2]  # the recorder saw the run
    assert runs["vasso"] == runs["plain"]


def test_train_again_after_a_failed_train_starts_clean(tmp_path):
    """An exception between the micro-batches of a step, then `train()` again: no micro-batch of the aborted step
    reaches the new run (each step's pass 2 replays exactly its two micro-batches), whose step count starts at 0."""

    class FailOnce(TrainerCallback):
        fired = False

        def on_substep_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not self.fired:
                self.fired = True
                raise RuntimeError("a transient failure")

    overrides = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=4)
    trainer = VassoTrainer(make_model(), make_args(tmp_path, **overrides), train_dataset=make_dataset(64))
    trainer.add_callback(FailOnce())
    with pytest.raises(RuntimeError, match="transient"):
        trainer.train()
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        seen.append((trainer.state.global_step, trainer.vasso is not None and trainer.vasso.perturbed))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    adversary = [trainer.vasso.is_adversary_step(t) for t in range(4)]
    assert [sum(p for s, p in seen if s == t) for t in range(4)] == [2 * a for a in adversary]
    assert trainer.vasso.step == 4


class Holder:
    pass


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_restored_attributes_restores_deep_and_removes_what_the_block_created(raises):
    """What a `compute_loss` side effect does in pass 2 is undone: a list mutated in place and the lists inside a
    dict come back as they were, as copies taken on entry (the mutated objects keep the block's changes), an
    attribute the block creates is removed, one it deletes comes back, and an exception from the block passes
    through after the restore."""
    holder = Holder()
    holder.calls, holder.metrics, holder.dropped = [1], {"loss": [0.5], "steps": [1]}, "kept"
    calls, metrics, loss = holder.calls, holder.metrics, holder.metrics["loss"]
    passes_through = pytest.raises(RuntimeError, match="pass 2") if raises else contextlib.nullcontext()
    with passes_through, restored_attributes(holder, ("calls", "metrics", "dropped", "created")):
        holder.calls.append(2)
        holder.metrics["loss"].append(0.7)
        holder.metrics["steps"] = [1, 2]
        holder.created = 3
        del holder.dropped
        if raises:
            raise RuntimeError("pass 2 failed")
    assert holder.calls == [1] and holder.metrics == {"loss": [0.5], "steps": [1]} and holder.dropped == "kept"
    assert not hasattr(holder, "created")
    assert holder.calls is not calls and holder.metrics["loss"] is not loss and loss == [0.5, 0.7]
    assert metrics == {"loss": [0.5, 0.7], "steps": [1, 2]}  # the block's objects, not the restored copies


# ---------------------------------------------------------------- the wrapper


def test_wrapper_in_plain_trainer_is_refused_on_its_first_step(tmp_path):
    """`Trainer(optimizers=(VASSO(...), None))`: the Trainer calls `step()` after one backward, never `first_step`."""
    model = make_model()
    wrapper = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    trainer = Trainer(model, make_args(tmp_path), train_dataset=make_dataset(), optimizers=(wrapper, None))
    with pytest.raises(ValueError, match=r"without first_step\(\).*use hf_vasso.VassoTrainer"):
        trainer.train()
    assert wrapper.vasso.step == 0


def test_ported_one_pass_loop_is_refused():
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    model(x, labels=y)["loss"].backward()
    with pytest.raises(ValueError, match="plain base-optimizer step with no adversary"):
        optimizer.step()


def test_davda54_constructor_equals_the_instance_form():
    x, y = make_data()
    models = [make_model(), make_model()]
    davda = VASSO(models[0].parameters(), torch.optim.SGD, rho=0.05, theta=0.4, lr=0.1, momentum=0.9)
    ours = VASSO(torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9), rho=0.05, theta=0.4)
    assert type(davda.base_optimizer) is torch.optim.SGD and davda.param_groups[0]["momentum"] == 0.9
    for _ in range(4):
        for model, optimizer in zip(models, (davda, ours)):
            vasso_step(optimizer, lambda m=model: m(x, labels=y)["loss"])
    assert_bit_identical(weights(models[0]), weights(models[1]))
    assert max_abs_diff(weights(models[0]), weights(make_model())) > 0  # the weights moved


@pytest.mark.parametrize(
    "build, error, says",
    [
        (lambda m: VASSO(torch.optim.SGD(m.parameters(), lr=0.1), lr=0.2), TypeError, "already built"),
        (lambda m: VASSO(m.parameters()), TypeError, "needs a base optimizer"),
        (
            lambda m: VASSO(VASSO(torch.optim.SGD(m.parameters(), lr=0.1))),
            ValueError,
            "perturbed twice",
        ),
    ],
    ids=["kwargs_for_a_built_optimizer", "no_base_optimizer", "vasso_over_vasso"],
)
def test_wrapper_constructor_misuse_is_refused(build, error, says):
    with pytest.raises(error, match=says):
        build(make_model())


def test_first_step_twice_without_pass_two_is_refused():
    x, y = make_data()
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    model(x, labels=y)["loss"].backward()
    optimizer.first_step()
    model(x, labels=y)["loss"].backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice.*lose the saved copy"):
        optimizer.first_step()  # second_step forgotten: the saved weights would be lost


def test_zero_grad_between_the_passes_changes_nothing():
    x, y = make_data()
    models = [make_model(), make_model()]
    optimizers = [VASSO(torch.optim.AdamW(m.parameters(), lr=1e-2), rho=0.1) for m in models]
    for _ in range(3):
        for extra_zero, model, optimizer in zip((False, True), models, optimizers):
            model(x, labels=y)["loss"].backward()
            optimizer.first_step(zero_grad=False)
            if extra_zero:
                optimizer.zero_grad()
            model(x, labels=y)["loss"].backward()
            optimizer.second_step(zero_grad=True)
    assert_bit_identical(weights(models[0]), weights(models[1]))


def test_gradients_zeroed_in_place_between_steps_are_not_refused():
    """`model.zero_grad(set_to_none=False)` (zeroing in place, not through the wrapper) is a correct loop: it must
    train exactly as the wrapper's own `zero_grad()`, never be mistaken for accumulation onto pass 2's gradient."""
    x, y = make_data()
    models = [make_model(), make_model()]
    optimizers = [VASSO(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.1) for m in models]
    for _ in range(3):
        for in_place, model, optimizer in zip((False, True), models, optimizers):
            model(x, labels=y)["loss"].backward()
            optimizer.first_step()
            model(x, labels=y)["loss"].backward()
            optimizer.second_step()
            if in_place:
                model.zero_grad(set_to_none=False)
            else:
                optimizer.zero_grad()
    assert optimizers[1].vasso.step == 3
    assert_bit_identical(weights(models[0]), weights(models[1]))


def test_wrapper_inside_accelerate_accumulate_is_refused():
    """The natural Accelerate loop: `first_step` once per micro-batch inside `accelerator.accumulate`."""
    x, y = make_data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    vasso = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1)
    model, optimizer, loader = accelerator.prepare(model, vasso, DataLoader(TensorDataset(x, y), batch_size=8))
    with pytest.raises(ValueError, match=r"inside accelerator.accumulate\(\).*Accumulate by hand"):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(xb, labels=yb)["loss"])
                if vasso.first_step(zero_grad=True):
                    accelerator.backward(model(xb, labels=yb)["loss"])
                vasso.restore()
                optimizer.step()
                optimizer.zero_grad()
    assert vasso.vasso.step == 0


def accumulation_recipe(model, optimizer, accelerator, micro_batches):
    """The README's accumulation recipe: K micro-batches, one VASSO step (pass 1 over all, then pass 2 over all)."""
    vasso = optimizer.optimizer  # the VASSO wrapper under Accelerate's
    k = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        with accelerator.no_sync(model) if i < k - 1 else contextlib.nullcontext():
            accelerator.backward(model(x, labels=y)["loss"] / k)  # pass 1
    if vasso.first_step(zero_grad=True, grad_scaler=accelerator.scaler):
        for i, (x, y) in enumerate(micro_batches):
            with accelerator.no_sync(model) if i < k - 1 else contextlib.nullcontext():
                accelerator.backward(model(x, labels=y)["loss"] / k)  # pass 2, at the perturbed weights
    vasso.restore()
    optimizer.step()
    optimizer.zero_grad()


def test_accumulation_recipe_equals_one_batch_of_k_times_b():
    x, y = make_data(32)
    results = []
    for k in (1, 4):
        accelerator = Accelerator(cpu=True)
        model = make_model()
        optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.4)
        model, prepared = accelerator.prepare(model, optimizer)
        for _ in range(5):
            accumulation_recipe(model, prepared, accelerator, list(zip(x.chunk(k), y.chunk(k))))
        results.append((weights(accelerator.unwrap_model(model)), optimizer))
    (one_batch, reference), (accumulated, optimizer) = results
    assert optimizer.vasso.step == reference.vasso.step == 5  # one adversary per optimizer step, not per micro-batch
    assert max_abs_diff(one_batch, weights(make_model())) > 1e-3  # the weights moved
    assert max_abs_diff(one_batch, accumulated) < 1e-6  # equal up to the order of the float sums
    assert max(((a - b).abs().max().item() for a, b in zip(reference.vasso.d, optimizer.vasso.d))) < 1e-6


def test_vasso_config_field_defaults_come_from_vasso_arguments():
    """Sentinel for the tests above: the default they rely on is VASSO's own."""
    assert VassoConfig.__dataclass_fields__["rho"].default == 0.05


# ---------------------------------------------------------------- weights VASSO does not keep d for


def test_float64_weights_are_refused_by_name_in_both_front_ends(tmp_path):
    """d is kept in fp32, and the CPU plans move low-precision weights through fp32 copies: float64 weights would be
    rounded in x + ε. Refused by name (the plain step would run), before anything changes."""
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    model.double()  # cast after the wrapper was built: followed at the next step, so refused there
    x, y = make_data()
    before = weights(model)
    with pytest.raises(TypeError, match=r"parameter #0 is torch.float64.*model.float\(\)"):
        vasso_step(optimizer, lambda: model(x.double(), labels=y)["loss"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(TypeError, match=r"parameter #0 is torch.float64"):
        VASSO(torch.optim.SGD(make_model().double().parameters(), lr=0.1))
    trainer = VassoTrainer(make_model().double(), make_args(tmp_path, max_steps=1), train_dataset=make_dataset())
    with pytest.raises(TypeError, match=r"net.0.weight is torch.float64"):
        trainer.train()
