"""Checkpoints hold all VASSO state: a resumed run continues bit for bit."""

import copy
import gc
import os
import shutil

import pytest
import torch
from helpers import RequestJITCheckpoint, make_args, make_data, make_dataset, make_model, weights
from transformers import TrainerCallback

from hf_vasso import VASSO, VassoTrainer
from hf_vasso.state import STATE_FILE as VASSO_STATE_NAME
from hf_vasso.state import state_checksum


def run(output_dir, resume=None, **overrides):
    args = make_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4, adversary_prob=0.5, **overrides)
    trainer = VassoTrainer(model=make_model(), args=args, train_dataset=make_dataset(n=64))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_bit_exact(tmp_path, accumulation):
    batch = {"per_device_train_batch_size": 16 // accumulation, "gradient_accumulation_steps": accumulation}
    full = run(tmp_path / "full", **batch)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / VASSO_STATE_NAME).is_file()

    resumed = run(tmp_path / "resumed", resume=str(checkpoint), **batch)
    for name, value in weights(full.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name
    for d, d_full in zip(resumed.vasso.d, full.vasso.d):
        assert torch.equal(d, d_full)
    assert resumed.vasso.step == full.vasso.step == 8


def test_resume_without_vasso_state_diverges_and_warns(tmp_path, caplog):
    """The control for the test above: the same resume without d does not continue the run."""
    full = run(tmp_path / "full")
    checkpoint = tmp_path / "stripped"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", checkpoint)
    os.remove(checkpoint / VASSO_STATE_NAME)
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    assert "holds no VASSO state file" in caplog.text and "the file was lost" in caplog.text
    assert "d starting afresh" in caplog.text and "coins continue from step 4" in caplog.text
    diff = max((a - b).abs().max().item() for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    assert diff > 1e-6


def test_state_file_contents(tmp_path):
    trainer = run(tmp_path)
    state = torch.load(tmp_path / "checkpoint-8" / VASSO_STATE_NAME, weights_only=True)
    assert state["step"] == 8
    assert state["initialized"] is True
    # d per parameter the optimizer steps, in the optimizer's order, named by the model's names
    stepped = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert state["param_names"] == [names[id(p)] for p in stepped]
    assert [d.shape for d in state["d"]] == [p.shape for p in stepped]
    assert all(d.dtype == torch.float32 for d in state["d"])


def test_state_for_other_parameters_is_refused(tmp_path):
    run(tmp_path / "a")
    trainer = VassoTrainer(model=make_model(), args=make_args(tmp_path / "b"), train_dataset=make_dataset())
    state = torch.load(tmp_path / "a" / "checkpoint-4" / VASSO_STATE_NAME, weights_only=True)
    state["d"] = state["d"][:-1]
    trainer.create_optimizer()
    with pytest.raises(ValueError, match="do not match"):
        trainer._vasso_update().load_state_dict(state)


# ---------------------------------------------------------------- what a resume loads is checked


def test_changed_hyperparameter_is_allowed_and_named(tmp_path, caplog):
    run(tmp_path / "a")
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"), rho=0.2)
    assert "rho" in caplog.text and "0.1 → 0.2" in caplog.text
    assert resumed.vasso.rho == 0.2 and resumed.vasso.step == 8


def damage(checkpoint, how: str) -> None:
    path = checkpoint / VASSO_STATE_NAME
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "optimizer_file":
        shutil.copy(checkpoint / "optimizer.pt", path)
    elif how == "from_a_later_checkpoint":
        shutil.copy(checkpoint.parent / "checkpoint-8" / VASSO_STATE_NAME, path)
    elif how == "nan_in_d":
        state = torch.load(path, weights_only=True)
        first = next(d for d in state["d"] if d is not None) if isinstance(state["d"], list) else None
        if first is None:  # d keyed by parameter
            first = next(iter(state["d"].values()))
        first.view(-1)[0] = float("nan")
        state["checksum"] = state_checksum(state)  # a well-formed file of a run that diverged
        torch.save(state, path)
    elif how == "flipped_byte":  # one byte of d changed on disk: torch loads it without a word
        state = torch.load(path, weights_only=True)
        raw = path.read_bytes()
        d_bytes = state["d"][0].numpy().tobytes()
        at = raw.index(d_bytes) + len(d_bytes) // 2
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :])


@pytest.mark.parametrize(
    "how, says",
    [
        ("truncated", "cannot be read"),
        ("empty", "cannot be read"),
        ("optimizer_file", "does not fit this run"),
        ("from_a_later_checkpoint", "step"),
        ("nan_in_d", "finite"),
        ("flipped_byte", "damaged: the checksum of its contents does not match"),
    ],
)
def test_damaged_or_foreign_state_is_refused_with_the_file_and_the_fix(tmp_path, how, says):
    run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-4"
    damage(checkpoint, how)
    with pytest.raises(ValueError, match=says) as error:
        run(tmp_path / "b", resume=str(checkpoint))
    message = str(error.value)
    assert str(checkpoint / VASSO_STATE_NAME) in message
    assert "Resume from an earlier checkpoint, or delete" in message


def test_state_without_checksum_from_an_older_version_loads_with_a_warning(tmp_path, caplog):
    """Before the checksum, the file was `torch.save(vasso.state_dict(), path)`: it resumes bit for bit, with a
    warning that it is loaded unchecked; the other checks still apply to it."""
    full = run(tmp_path / "full")
    checkpoint = tmp_path / "old"
    shutil.copytree(tmp_path / "full" / "checkpoint-4", checkpoint)
    state = torch.load(checkpoint / VASSO_STATE_NAME, weights_only=True)
    del state["checksum"]
    torch.save(state, checkpoint / VASSO_STATE_NAME)
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    assert f"{checkpoint / VASSO_STATE_NAME} has no checksum (written by an older hf_vasso)" in caplog.text
    for name, value in weights(full.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name
    assert all(torch.equal(a, b) for a, b in zip(resumed.vasso.d, full.vasso.d)) and resumed.vasso.step == 8

    state["d"][0].view(-1)[0] = float("nan")  # unchecked is not unvalidated
    torch.save(state, checkpoint / VASSO_STATE_NAME)
    with pytest.raises(ValueError, match="finite"):
        run(tmp_path / "nan", resume=str(checkpoint))


def test_wrapper_state_dict_round_trip():
    """VASSO.state_dict() is the base optimizer's plus d: a reload continues bit for bit, LR schedulers work."""
    x, y = make_data()

    def step(model, optimizer):
        model(x, labels=y)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)

    model = make_model()
    optimizer = VASSO(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, theta=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        step(model, optimizer)
        scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    state = copy.deepcopy(optimizer.state_dict())  # as torch.save + torch.load would: no shared tensors
    assert state["param_groups"][0]["vasso"]["step"] == 3 and "exp_avg" in state["state"][0]
    assert torch.equal(state["state"][0]["vasso_d"], optimizer.vasso.d[0])  # d beside the base's own state
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}

    twin = make_model()
    twin.load_state_dict(saved_model)
    twin_optimizer = VASSO(torch.optim.AdamW(twin.parameters(), lr=1e-2), rho=0.1, theta=0.3)
    twin_optimizer.load_state_dict(state)
    assert twin_optimizer.param_groups is twin_optimizer.base_optimizer.param_groups
    for _ in range(3):
        step(model, optimizer)
        step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_wrapper_refuses_state_without_vasso():
    model = make_model()
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="has no VASSO state"):
        optimizer.load_state_dict(optimizer.base_optimizer.state_dict())


# ---------------------------------------------------------------- a checkpoint written at any point of a step


@pytest.mark.parametrize(
    "hook, saved",
    [
        ("on_substep_end", "checkpoint-6"),  # between micro-batches: the save comes at on_pre_optimizer_step
        ("on_optimizer_step", "checkpoint-6"),  # after the base step: the save comes at on_step_end
    ],
)
def test_jit_checkpoint_requested_during_a_step_resumes_bit_exact(tmp_path, hook, saved):
    """A SIGTERM during step 6 with `enable_jit_checkpoint=True`: the checkpoint it leaves resumes exactly."""
    batch = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, adversary_prob=0.5, max_steps=8)
    full = VassoTrainer(make_model(), make_args(tmp_path / "full", **batch), train_dataset=make_dataset(n=64))
    full.train()

    jit = make_args(tmp_path / "cut", enable_jit_checkpoint=True, **batch)
    cut = VassoTrainer(make_model(), jit, train_dataset=make_dataset(n=64))
    request = RequestJITCheckpoint(cut, hook, at_step=5)
    cut.add_callback(request)
    cut.train()
    assert request.fired and cut.state.global_step == 6  # stopped after the step the signal came in
    assert sorted(os.listdir(tmp_path / "cut")) == [saved]  # no half checkpoint beside it

    resumed = VassoTrainer(make_model(), make_args(tmp_path / "resumed", **batch), train_dataset=make_dataset(n=64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / saved))
    for name, value in weights(full.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name
    assert all(torch.equal(a, b) for a, b in zip(resumed.vasso.d, full.vasso.d))


def live_tensor_bytes() -> int:
    """The bytes of every tensor storage the Python heap holds (views counted once)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class MeasureStep(TrainerCallback):
    """The tensor bytes alive at the start and the end of step `step` (before its end-of-step save)."""

    def __init__(self, trainer, step: int) -> None:
        self.trainer, self.step, self.bytes, self.deferred = trainer, step, {}, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            self.bytes["begin"] = live_tensor_bytes()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.bytes["end"] = live_tensor_bytes()
            self.deferred = self.trainer._vasso_deferred_save


def test_jit_checkpoint_deferred_to_the_step_end_keeps_no_copy(tmp_path):
    """While the save requested mid-step waits for the step's end, the trainer holds no tensor more than a step
    without a request does (no copy of the weights, `d` or the optimizer state is taken to save later)."""
    batch = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, adversary_prob=0.5, max_steps=8)
    measured = {}
    for jit in (False, True):
        args = make_args(tmp_path / str(jit), enable_jit_checkpoint=jit, **batch)
        trainer = VassoTrainer(make_model(), args, train_dataset=make_dataset(n=64))
        measure = MeasureStep(trainer, step=6)
        trainer.add_callback(measure)
        if jit:
            request = RequestJITCheckpoint(trainer, "on_substep_end", at_step=5)
            trainer.add_callback(request)
        trainer.train()
        measured[jit] = measure
    assert request.fired and measured[True].deferred is True and measured[False].deferred is False
    model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    assert measured[True].bytes["begin"] > model_bytes > 0  # the count sees the weights (a copy would add as much)
    grew = {jit: m.bytes["end"] - m.bytes["begin"] for jit, m in measured.items()}
    assert grew[True] == grew[False], grew


# ---------------------------------------------------------------- the state file is never half written


def test_failed_state_write_leaves_no_file_and_names_the_cause(tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if "vasso_state" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(OSError) as error:
        run(tmp_path)
    message = str(error.value)
    checkpoint = tmp_path / "checkpoint-4"
    assert str(checkpoint / VASSO_STATE_NAME) in message and "unexpected pos" in message
    assert "no space left" in message and "Free space" in message
    assert not [n for n in os.listdir(checkpoint) if n.startswith(VASSO_STATE_NAME)]  # neither the file nor a temp


def test_a_failed_state_write_with_space_left_does_not_blame_the_disk(tmp_path):
    """A write that fails for another reason (a folder in the way, permissions) says so, without the full-disk fix."""
    from hf_vasso.state import write_state_file

    (tmp_path / "vasso_state.pt").mkdir()
    with pytest.raises(OSError) as error:
        write_state_file({"step": 0}, str(tmp_path / "vasso_state.pt"))
    message = str(error.value)
    assert "IsADirectoryError" in message and "Free space" not in message and "no space left" not in message
    assert "Fix the cause above" in message
