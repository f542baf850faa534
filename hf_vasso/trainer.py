"""`VassoTrainerMixin`: the VASSO step for any `transformers.Trainer` subclass, and the ready-made trainers."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainingArguments
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.utils import logging

from .adversary import resolve_adversary
from .arguments import VassoArguments, as_vasso_arguments
from .checkpoint import INCOMPLETE_MARKER, checkpoint_problem, load_converted_weights, newest_complete_checkpoint
from .module_state import BufferSnapshot
from .optimizer import VASSO
from .rules import (
    refuse_generating_trainer,
    refuse_mixin_after_base,
    refuse_sparse_gradients,
    refuse_unsupported_trainer_setup,
)
from .state import STATE_FILE, per_rank_state_file, read_state_file, write_state_file
from .update import VassoUpdate

logger = logging.get_logger(__name__)

# What trainers' `compute_loss` records on every call, restored after pass 2 so that each step counts once: TRL's
# metric buffers and token count (SFT, DPO, Reward, KTO, TPO: `_metrics`, `_total_train_tokens`; CPO, ORPO:
# `_stored_metrics`). Attributes a trainer lacks are skipped.
PER_CALL_RECORDS = ("_metrics", "_total_train_tokens", "_stored_metrics")


class VassoTrainerMixin:
    """The VASSO / eVASSO optimizer step for any [`~transformers.Trainer`] subclass (SAM with `theta=1`).

    Source: Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance Suppression" (NeurIPS 2023,
    arXiv 2309.15639; eVASSO in arXiv 2509.02433); the exact update is `docs/algorithm.md`. Put the mixin first:

    ```python
    class VassoMyTrainer(VassoTrainerMixin, MyTrainer): ...
    class VassoMyConfig(VassoArguments, MyTrainingArguments): ...
    ```

    Each optimizer step runs pass 1 over all its gradient-accumulation micro-batches (the Trainer's own loop), folds
    the step's gradient into `d`, moves the trainable weights to `x + ε` with `ε = ρ·d/‖d‖`, replays the same
    micro-batches there (pass 2, inside `perturbed_pass_context`), restores the weights by copy, and lets the Trainer
    clip and step the base optimizer with the pass-2 gradient. With `adversary_prob < 1`, steps whose coin is 0 stop
    after pass 1. Both passes go through `super().training_step`, so the subclass's `compute_loss` and loss
    normalisation apply unchanged.

    What differs from the base trainer:

    - `training_step`: keeps the step's micro-batches (shallow copies, type kept) and runs the VASSO step on the last
      one. It returns the clean (pass-1) loss, so the logged `loss` is the loss at the real weights.
    - `perturbed_pass_context`: the hook around pass 2. It freezes BatchNorm statistics and puts back the per-call
      metric records of TRL's trainers (`PER_CALL_RECORDS`), so the mixin works on TRL's offline trainers as it is
      (`class VassoRewardTrainer(VassoTrainerMixin, RewardTrainer)`); extend it for other side effects of
      `compute_loss` (token counters, metric buffers) that must count each step once.
    - `log`: adds the `vasso/*` metrics, averaged over the logging window (the only host sync they cost).
    - `floating_point_ops`: counts both passes of an adversary step, so `total_flos` is the work done.
    - `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: also save the VASSO state (`d`, step count,
      hyperparameters, a checksum) in the checkpoint folder, written atomically, and check it when loading.
    - `_save_checkpoint` / `_maybe_log_save_evaluate`: a save requested in the middle of a step (transformers' JIT
      checkpoint on SIGTERM saves from `on_pre_optimizer_step`, after pass 1 folded the step's gradient into `d`)
      is written at the end of that step, so every checkpoint resumes exactly.
    - `_inner_training_loop`: every training loop (each `train()`, each `auto_find_batch_size` retry) starts with no
      half-done step; a new optimizer (`model_init`, `hyperparameter_search`) gets a new VASSO state. The callback
      list is the base trainer's.

    `args` may be a [`VassoConfig`], any `TrainingArguments` subclass combined with [`VassoArguments`], or a plain
    `TrainingArguments` (of any subclass), which is copied and given the default VASSO fields with its own type kept.

    Raises:
        TypeError: at class creation, a subclass that puts the mixin after `Trainer` in its bases.
        ValueError: DeepSpeed, FSDP1, `sync_adversary=False` under FSDP, an optimizer that steps inside backward,
            sparse gradients, the `VASSO` wrapper as the optimizer, or a bad hyperparameter (each message names the
            fix).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_mixin_after_base(cls, VassoTrainerMixin, Trainer, f"class {cls.__name__}(VassoTrainerMixin, Trainer)")

    def __init__(self, *trainer_args: Any, **kwargs: Any) -> None:
        refuse_generating_trainer(type(self))
        refuse_vasso_optimizer_in_trainer(
            (kwargs.get("optimizers") or (None,))[0], (kwargs.get("optimizer_cls_and_kwargs") or (None,))[0]
        )
        # The arguments are not always the second parameter (DPOTrainer takes `ref_model` there, a user's trainer
        # may take `*args`): find them by type among the positional ones, or by name.
        trainer_args = list(trainer_args)
        if kwargs.get("args") is not None:
            kwargs["args"] = self._vasso_arguments(kwargs["args"])
        else:
            for i, value in enumerate(trainer_args):
                if isinstance(value, TrainingArguments):
                    trainer_args[i] = self._vasso_arguments(value)
                    break
        super().__init__(*trainer_args, **kwargs)
        if not isinstance(self.args, VassoArguments):  # the base trainer built its default arguments
            self.args = self._vasso_arguments(self.args)
        self._check_vasso_support()
        self._vasso: VassoUpdate | None = None
        self._vasso_optimizer: torch.optim.Optimizer | None = None
        self._pending_micro_batches: list[tuple[Any, Any, torch.Tensor]] = []
        self._vasso_deferred_save = False
        self._vasso_geometry_seen: tuple[Any, Any] | None = None  # (adversary, adaptive) as the last step read them
        self._vasso_written: tuple[VassoUpdate, dict[str, float]] | None = None  # ρ, θ, p the last step gave it

    def _vasso_arguments(self, args: Any) -> Any:
        """The arguments with the VASSO fields: `args` itself, or an upgraded copy (see `as_vasso_arguments`)."""
        return as_vasso_arguments(args)

    def _check_vasso_support(self) -> None:
        refuse_unsupported_trainer_setup(self)

    @property
    def vasso(self) -> VassoUpdate | None:
        """The VASSO state of the current run, read-only: `d`, `step`, `params`, `state_bytes()`, ...

        `None` until the first training step (or a resume) builds it.
        """
        return self._vasso

    # ------------------------------------------------------------------ the step

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
        # Every loop (each train(), each auto_find_batch_size retry) starts with no half-done step, and logs only
        # its own steps, as the Trainer's loss does.
        self._pending_micro_batches = []
        self._vasso_deferred_save = False
        if self._vasso is not None:
            self._vasso.clear_metrics()
        return super()._inner_training_loop(*args, **kwargs)

    def training_step(
        self, model: nn.Module, inputs: Any, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # A shallow copy of the same type for pass 2: compute_loss may pop keys (labels under label smoothing).
        kept = copy.copy(inputs)
        if not self._pending_micro_batches:  # the step's first micro-batch
            self._clear_gradients_outside_the_model()
        if not self.accelerator.sync_gradients:
            # An earlier micro-batch of the step: pass 1 as usual (the Trainer holds DDP sync), kept for pass 2.
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._pending_micro_batches.append((kept, num_items_in_batch, loss))
            return loss

        micro_batches = self._pending_micro_batches + [(kept, num_items_in_batch, None)]
        self._pending_micro_batches = []
        vasso = self._vasso_update()
        vasso.step = self.state.global_step  # an aborted step (exception, restarted loop) may have counted one
        self._read_vasso_arguments(vasso)
        adversary = vasso.is_adversary_step()

        # Pass 1, last micro-batch. It all-reduces the step's gradient unless each rank keeps its own adversary;
        # a step without adversary always syncs, since the base optimizer steps with this gradient.
        sync = self.args.sync_adversary or not adversary
        with contextlib.nullcontext() if sync else self._no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        grad_scale = self._grad_scale()
        vasso.absorb_gradient(grad_scale, perturbing=adversary)
        if not adversary:
            return loss

        clean_loss = loss + sum(mb_loss for _, _, mb_loss in micro_batches[:-1])
        perturbed_loss = torch.zeros_like(loss)
        vasso.perturb()
        # Trainable parameters the optimizer does not step (a head-only optimizer over a trainable body) start pass
        # 2 from zero too: the Trainer clips and logs the norm of the model's gradients, which is then pass 2's.
        model.zero_grad(set_to_none=True)
        try:
            with self.perturbed_pass_context(model):
                for i, (mb_inputs, mb_num_items, _) in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else self._no_sync(model):
                        perturbed_loss += super().training_step(model, copy.copy(mb_inputs), mb_num_items)
        finally:
            vasso.restore()
        vasso.guard_perturbed_gradient(grad_scale)
        vasso.record_losses(clean_loss, perturbed_loss)
        return loss

    def _read_vasso_arguments(self, vasso: VassoUpdate) -> None:
        """ρ, θ, p and the default geometry as the arguments say now: a callback may change them between steps (a
        ρ schedule), and each is checked as the configuration checks it, before the step changes anything.

        A value set on `trainer.vasso` itself since the last step (as `optimizer.vasso.rho = ...` for the wrapper)
        is taken and written back to the arguments, which checkpoints save. `adaptive` stays the alias it is in the
        configuration: changed alone, it selects "asam" (True) or "vasso" (False); changed with `adversary`, the
        two must agree. Both are then written back consistent.

        Raises:
            ValueError: an invalid value, `adversary` and `adaptive` both changed and disagreeing, or a value set
                on both `trainer.args` and `trainer.vasso` since the last step, differently.
        """
        args = self.args
        new_engine = self._vasso_written is None or self._vasso_written[0] is not vasso  # built from args
        written = {} if new_engine else self._vasso_written[1]
        for name in ("rho", "theta", "adversary_prob"):
            on_engine, in_args = getattr(vasso, name), getattr(args, name)
            if name in written and on_engine != written[name]:
                if in_args != written[name] and in_args != on_engine:
                    raise ValueError(
                        f"{name} was set on both trainer.args ({in_args}) and trainer.vasso ({on_engine}) since the "
                        f"last step: set one of them (trainer.args.{name} is the one checkpoints save)."
                    )
                setattr(args, name, on_engine)
            setattr(vasso, name, getattr(args, name))
        # As the last step read them, also for a new engine (built from `args.adversary` alone): an alias changed
        # since then still selects the geometry.
        seen = self._vasso_geometry_seen or (args.adversary, args.adaptive)
        if args.adversary == seen[0] and args.adaptive != seen[1]:
            in_args = "asam" if args.adaptive else "vasso"
        elif args.adversary != seen[0] and args.adaptive != seen[1]:
            in_args = resolve_adversary(args.adversary, args.adaptive)
        else:
            in_args = args.adversary
        if vasso.adversary != seen[0] and (args.adversary, args.adaptive) != seen and in_args != vasso.adversary:
            raise ValueError(
                f"The geometry was set on both trainer.args ({in_args!r}) and trainer.vasso ({vasso.adversary!r}) "
                "since the last step: set one of them."
            )
        if vasso.adversary == seen[0]:  # else set on trainer.vasso: taken
            vasso.adversary = in_args
        args.adversary, args.adaptive = vasso.adversary, vasso.adversary == "asam"
        self._vasso_geometry_seen = (args.adversary, args.adaptive)
        self._vasso_written = (vasso, {n: getattr(vasso, n) for n in ("rho", "theta", "adversary_prob")})

    def perturbed_pass_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context pass 2 runs in (the forward and backward passes at `x + ε`, all micro-batches of the step).

        The base version puts back every buffer of the model that pass 2 changes (BatchNorm's and InstanceNorm's
        running statistics, a running buffer of your own) and the trainer's `PER_CALL_RECORDS` (TRL's metric buffers
        and token count), so they see each step once. A subclass whose `compute_loss` has other side effects that
        must count each step once (token counters, metric buffers) extends it::

            def perturbed_pass_context(self, model):
                stack = contextlib.ExitStack()
                stack.enter_context(super().perturbed_pass_context(model))
                stack.enter_context(restored_attributes(self, ("my_counter",)))
                return stack
        """
        stack = contextlib.ExitStack()
        if getattr(self, "_vasso_buffers", None) is None or self._vasso_buffers.module is not model:
            self._vasso_buffers = BufferSnapshot(model)  # its copies are reused from step to step
        stack.enter_context(self._vasso_buffers.restoring())
        stack.enter_context(restored_attributes(self, PER_CALL_RECORDS))
        return stack

    def _vasso_update(self) -> VassoUpdate:
        """The VASSO state of the current optimizer: built on first use, and anew whenever the optimizer is new.

        It acts on exactly what the optimizer steps, as every SAM wrapper does: parameters of the model and others
        (a learnable temperature in `compute_loss`, a loss module's classifier in sentence-transformers), groups
        with their own ρ, groups added to the optimizer later."""
        optimizer = _unwrap_optimizer(self.optimizer)
        if self._vasso is None or self._vasso_optimizer is not optimizer:
            refuse_sparse_gradients(self.model)
            names = {id(p): n for n, p in self.model.named_parameters()}
            self._vasso = VassoUpdate(
                optimizer,
                rho=self.args.rho,
                theta=self.args.theta,
                adversary_prob=self.args.adversary_prob,
                seed=self.args.seed,
                adversary=self.args.adversary,
                param_names=lambda p: names.get(id(p)) or _outside_name(optimizer, p),
            )
            self._vasso.step = self.state.global_step
            self._vasso_optimizer = optimizer
        return self._vasso

    def _clear_gradients_outside_the_model(self) -> None:
        """The Trainer clears gradients with `model.zero_grad()` only: a parameter the optimizer steps but the model
        does not own would carry its gradient into the next step, and into that step's d. Cleared here, as
        `optimizer.zero_grad()` would."""
        vasso = self._vasso
        if vasso is None or _unwrap_optimizer(self.optimizer) is not self._vasso_optimizer:
            return  # the step that builds the engine starts from the training loop's cleared gradients
        if getattr(self, "_vasso_outside", (None, 0))[1] != len(vasso.params):  # recounted when groups are added
            owned = {id(p) for p in self.model.parameters()}
            self._vasso_outside = ([p for p in vasso.params if id(p) not in owned], len(vasso.params))
        for p in self._vasso_outside[0]:
            p.grad = None

    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The same no-sync context the Trainer's own loop uses for non-final micro-batches."""
        if self.is_distributed_loading_by_transformers and is_fsdp_managed_module(self.model):
            return self._defer_fsdp_gradient_reduction()
        return self.accelerator.no_sync(model)

    def _grad_scale(self) -> torch.Tensor | None:
        """The loss scale carried by the gradients under fp16 (a device tensor: reading it would sync)."""
        scaler = self.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._scale  # get_scale() would call .item() every step

    def floating_point_ops(self, inputs: Any) -> int:
        """The base count for one forward+backward pass, twice on adversary steps (pass 2 is the same work)."""
        flos = super().floating_point_ops(inputs)
        if flos and self._vasso_update().is_adversary_step(self.state.global_step):
            return 2 * flos
        return flos

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._vasso is not None:
            many = self.accelerator.num_processes > 1
            logs.update(self._vasso.pop_metrics(self._mean_over_processes if many else None))
        super().log(logs, *args, **kwargs)

    def _mean_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="mean")

    # ------------------------------------------------------------------ checkpoints

    def _vasso_state_is_per_rank(self) -> bool:
        # Under per-rank adversaries or sharded parameters every rank holds different d.
        return not self.args.sync_adversary or self.is_fsdp_enabled

    def _vasso_mid_step(self) -> bool:
        """Pass 1 of the current step already folded its gradient into d, but the step has not ended."""
        return self._vasso is not None and self._vasso.step != self.state.global_step

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if not self._vasso_mid_step():
            super()._save_checkpoint(model, trial)
            # Saved whole: a marker that a JIT save killed mid-write left in this folder earlier would make the new
            # checkpoint look incomplete (a JIT save in progress removes its own marker after this, as it would).
            marker = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}",
                                  INCOMPLETE_MARKER)  # fmt: skip
            if self.args.should_save and os.path.exists(marker):
                os.remove(marker)
            return
        # A save from inside a step (transformers' JIT checkpoint saves from on_pre_optimizer_step): d already holds
        # this step's gradient, while the weights, the optimizer and the step count are the last step's, and a
        # checkpoint of that mix cannot resume exactly. The step finishes (its optimizer step is in progress) and
        # is saved right after it, before any evaluation, as a complete checkpoint of the next step number.
        self._vasso_deferred_save = True
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        _remove_placeholder_folder(folder)
        logger.warning(
            f"A checkpoint was requested in the middle of step {self.state.global_step + 1}, after VASSO folded that "
            f"step's gradient into d: it is written when the step ends, as checkpoint-{self.state.global_step + 1}, "
            "so that it resumes exactly."
        )

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, model: nn.Module, trial: Any, *args, **kwargs):
        if self._vasso_deferred_save:
            # First thing after the step: a preemption's grace period may not wait for an evaluation, and a
            # `save_strategy="best"` evaluation must not drop it.
            self._vasso_deferred_save = False
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._vasso is None:
            return
        if self._vasso_state_is_per_rank():
            path = os.path.join(output_dir, per_rank_state_file(self.args.process_index))
        elif self.args.should_save:
            path = os.path.join(output_dir, STATE_FILE)
        else:
            return
        os.makedirs(output_dir, exist_ok=True)
        write_state_file(self._vasso.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self._vasso_state_is_per_rank():
            candidates = [per_rank_state_file(self.args.process_index), STATE_FILE]
        else:
            # Every rank must hold the same d: from a per-rank checkpoint, all take rank 0's.
            candidates = [STATE_FILE, per_rank_state_file(0)]
        path = next((p for p in (os.path.join(checkpoint, n) for n in candidates) if os.path.isfile(p)), None)
        self._vasso = None  # whatever this trainer held before, the checkpoint decides
        vasso = self._vasso_update()
        if path is None:
            logger.warning(
                f"{checkpoint} holds no VASSO state file ({' or '.join(candidates)}): it was written without it "
                "(by a plain Trainer) or the file was lost. The run resumes with d starting afresh from the next "
                f"gradient; the eVASSO coins continue from step {self.state.global_step}."
            )
            return
        state = read_state_file(path)
        try:
            vasso.load_state_dict(state, expected_step=self.state.global_step)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            fix = (
                f"Resume from an earlier checkpoint, or delete {path} to resume from this one with d starting afresh."
            )
            raise ValueError(f"The VASSO state file {path} does not fit this run: {error} {fix}") from error

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.is_fsdp_enabled and load_converted_weights(model or self.model, resume_from_checkpoint):
            logger.info(f"Loaded the weights of {resume_from_checkpoint} through transformers' key conversion.")

    def _load_best_model(self) -> None:
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and not self.is_fsdp_enabled and not self.is_deepspeed_enabled:
            load_converted_weights(self.model, best)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, except that `resume_from_checkpoint=True` takes the newest *complete* checkpoint of
        `output_dir` (see `hf_vasso.checkpoint`), saying which newer ones it skipped and why, and that an explicit
        checkpoint that is not complete is refused with the reason instead of failing halfway through its load."""
        if resume_from_checkpoint is True:
            path, skipped = newest_complete_checkpoint(self.args.output_dir)
            for folder, why in skipped:
                logger.warning(f"Skipping {folder}: {why}.")
            if path is None:
                raise ValueError(
                    f"No complete checkpoint found in output directory ({self.args.output_dir})"
                    + (f": {len(skipped)} incomplete ones were skipped." if skipped else ".")
                )
            if skipped:
                logger.warning(f"Resuming from {path}, the newest complete checkpoint.")
            resume_from_checkpoint = path
        elif isinstance(resume_from_checkpoint, str) and (problem := checkpoint_problem(resume_from_checkpoint)):
            newest, _ = newest_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
            hint = f" The newest complete one beside it is {newest}." if newest else ""
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.{hint}")
        return super().train(resume_from_checkpoint, *args, **kwargs)


@contextlib.contextmanager
def restored_attributes(obj: Any, names: tuple[str, ...]) -> Iterator[None]:
    """Inside the block, changes to `obj.<name>` (deep: lists of metrics) are undone on exit, even on error; an
    attribute the block creates is removed again.

    For `perturbed_pass_context`: side effects of `compute_loss` that must count each step once.
    """
    saved = {name: copy.deepcopy(getattr(obj, name)) for name in names if hasattr(obj, name)}
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(obj, name, saved[name])
            elif hasattr(obj, name):
                delattr(obj, name)


def apply_peft_config(model: nn.Module | None, peft_config: Any | None) -> nn.Module | None:
    """`peft.get_peft_model(model, peft_config)`, as TRL's trainers accept `peft_config=`."""
    if peft_config is None or model is None:  # no model: `model_init` applies it (see _PeftConfigArgument)
        return model
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError(
            "model is already a PeftModel and peft_config was given too: pass the base model with peft_config, or "
            "the PeftModel alone."
        )
    return get_peft_model(model, peft_config)


def _remove_placeholder_folder(folder: str) -> None:
    """Remove `folder` if it holds nothing but transformers' JIT "checkpoint-is-incomplete.txt" marker."""
    if os.path.isdir(folder) and set(os.listdir(folder)) <= {INCOMPLETE_MARKER}:
        shutil.rmtree(folder, ignore_errors=True)


def _outside_name(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str:
    """A name for a parameter the optimizer steps but the model does not own: its place in the param groups."""
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if p is param:
                return f"<not in the model: param_groups[{g}][{k}]>"
    return "<not in the model>"


def refuse_vasso_optimizer_in_trainer(optimizer: Any, optimizer_cls: Any) -> None:
    """VassoTrainer runs the VASSO step itself: a `VASSO` wrapper as its optimizer would run a second one."""
    if isinstance(optimizer, VASSO) or (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, VASSO)):
        raise ValueError(
            "VassoTrainer was given the VASSO wrapper as its optimizer (optimizers=(VASSO(...), ...) or "
            "optimizer_cls_and_kwargs=(VASSO, ...)): VassoTrainer already runs the VASSO step, and the wrapper would "
            "run a second adversary inside it. Pass the base optimizer (e.g. optimizers=(torch.optim.AdamW(...), "
            "None)) and the VASSO hyperparameters in the arguments (VassoConfig(rho=..., theta=...))."
        )


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The base optimizer under Accelerate's wrapper(s): the identity that says whether the optimizer is new."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class _PeftConfigArgument:
    """`peft_config=` for trainers whose base lacks it (TRL's have it): `peft.get_peft_model(model, peft_config)`,
    applied to `model`, or to every model `model_init` builds (`hyperparameter_search` over a LoRA model)."""

    def __init__(self, model: nn.Module | None = None, *trainer_args: Any, peft_config: Any = None, **kwargs: Any):
        if peft_config is not None and kwargs.get("model_init") is not None:
            kwargs["model_init"] = _peft_model_init(kwargs["model_init"], peft_config)
        super().__init__(apply_peft_config(model, peft_config), *trainer_args, **kwargs)


def _peft_model_init(model_init: Any, peft_config: Any) -> Any:
    """`model_init` followed by `get_peft_model`, with the same arity (the Trainer passes the trial to a one-argument
    `model_init` only)."""
    if len(inspect.signature(model_init).parameters) == 0:
        return lambda: apply_peft_config(model_init(), copy.deepcopy(peft_config))
    return lambda trial: apply_peft_config(model_init(trial), copy.deepcopy(peft_config))


class VassoTrainer(_PeftConfigArgument, VassoTrainerMixin, Trainer):
    """A drop-in [`~transformers.Trainer`] whose optimizer steps are VASSO (eVASSO with `adversary_prob < 1`, SAM
    with `theta = 1`); see [`VassoTrainerMixin`] for what differs.

    ```python
    from hf_vasso import VassoConfig, VassoTrainer  # was: Trainer, TrainingArguments

    args = VassoConfig(output_dir="out", rho=0.05, theta=0.4)
    VassoTrainer(model=model, args=args, train_dataset=train_ds).train()
    ```

    Args:
        model, args, *trainer_args, **kwargs: as for `Trainer`. `args` may be `None`, a `VassoConfig`, or any
            `TrainingArguments` (copied with the default VASSO fields added, its type kept).
        peft_config (`peft.PeftConfig`, *optional*): wrap `model` with `peft.get_peft_model` first. Only trainable
            parameters (the adapters) are perturbed, so VASSO's extra memory is sized to them.

    Raises:
        ValueError: as [`VassoTrainerMixin`], or `peft_config` given with a model that is already a `PeftModel`.
    """


class VassoSeq2SeqTrainer(_PeftConfigArgument, VassoTrainerMixin, Seq2SeqTrainer):
    """[`~transformers.Seq2SeqTrainer`] with VASSO steps: training as [`VassoTrainer`], evaluation and prediction
    (`predict_with_generate`) exactly as `Seq2SeqTrainer`. Use it with a [`VassoSeq2SeqConfig`].

    ```python
    args = VassoSeq2SeqConfig(output_dir="out", rho=0.05, predict_with_generate=True)
    VassoSeq2SeqTrainer(model=t5, args=args, train_dataset=train_ds, eval_dataset=eval_ds).train()
    ```

    Args:
        peft_config (`peft.PeftConfig`, *optional*): as for [`VassoTrainer`].
    """
