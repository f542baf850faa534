"""`VassoTrainer`: `transformers.Trainer` with VASSO / eVASSO optimizer steps."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.utils import logging

from .batchnorm import frozen_batchnorm_stats
from .update import VassoUpdate
from .vasso_config import VassoConfig, refuse_deepspeed

logger = logging.get_logger(__name__)

VASSO_STATE_NAME = "vasso_state.pt"


class VassoTrainer(Trainer):
    """A drop-in [`~transformers.Trainer`] whose optimizer steps are VASSO (or eVASSO, or SAM with `theta=1`).

    Each optimizer step runs pass 1 over all its gradient-accumulation micro-batches (the Trainer's usual loop), folds
    the step's gradient into `d`, moves the trainable weights to `x + rho * d / ||d||`, replays the same micro-batches
    there (pass 2), restores the weights by copy, and lets the Trainer clip and step the base optimizer with the pass-2
    gradient. With `adversary_prob < 1`, steps whose coin is 0 stop after pass 1.

    What differs from `Trainer`:

    - `training_step`: records the micro-batches of the step; on the last one, runs the VASSO step above. It returns
      the clean (pass-1) loss, so the logged `loss` is the loss at the real weights.
    - `log`: adds the `vasso/*` metrics, averaged over the logging window (the only host sync they cost).
    - `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler`: also save and restore the VASSO state (`d`,
      step count) in the checkpoint folder, one file per rank when the state differs between ranks.

    Args:
        model, args, *trainer_args, **kwargs: as for `Trainer`. `args` may be `None`, a `VassoConfig`, or a plain
            `TrainingArguments` (upgraded to a `VassoConfig` with the default VASSO parameters).
        peft_config (`peft.PeftConfig`, *optional*): wrap `model` with `peft.get_peft_model` first. Only trainable
            parameters (the adapters) are perturbed, so VASSO's extra memory is sized to them.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        peft_config: Any | None = None,
        **kwargs: Any,
    ) -> None:
        args = _as_vasso_config(args)
        if peft_config is not None:
            from peft import PeftModel, get_peft_model

            if isinstance(model, PeftModel):
                raise ValueError(
                    "model is already a PeftModel and peft_config was given too: pass the base model with "
                    "peft_config, or the PeftModel alone."
                )
            model = get_peft_model(model, peft_config)
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.is_deepspeed_enabled:
            refuse_deepspeed(True)
        if self.is_fsdp_enabled:
            if self.accelerator.state.fsdp_plugin.fsdp_version != 2:
                raise ValueError(
                    "hf_vasso supports FSDP2 only: FSDP1 exposes flat parameter shards that the adversary cannot be "
                    "computed on. Set fsdp_config={'version': 2} (the default in transformers 5) or "
                    "`fsdp_version: 2` in the accelerate config."
                )
            if not self.args.sync_adversary:
                raise ValueError(
                    "sync_adversary=False cannot run under FSDP: each rank holds only a shard of the weights, so a "
                    "per-rank adversary does not exist. Use sync_adversary=True."
                )
        self._vasso: VassoUpdate | None = None
        self._step_micro_batches: list[tuple[dict[str, Any], Any, torch.Tensor]] = []

    # ------------------------------------------------------------------ the step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self.accelerator.sync_gradients:
            # An earlier micro-batch of the step: pass 1 as usual (the Trainer holds DDP sync), kept for pass 2.
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
            self._step_micro_batches.append((inputs, num_items_in_batch, loss))
            return loss

        micro_batches = self._step_micro_batches + [(inputs, num_items_in_batch, None)]
        self._step_micro_batches = []
        vasso = self._vasso_update()
        adversary = vasso.adversary_step()

        # Pass 1, last micro-batch. It all-reduces the step's gradient unless each rank keeps its own adversary;
        # a step without adversary always syncs, since the base optimizer steps with this gradient.
        sync = self.args.sync_adversary or not adversary
        with contextlib.nullcontext() if sync else self._no_sync(model):
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        vasso.absorb_gradient(self._grad_scale())
        if not adversary:
            return loss

        clean_loss = loss + sum(mb_loss for _, _, mb_loss in micro_batches[:-1])
        perturbed_loss = torch.zeros_like(loss)
        vasso.perturb()
        try:
            with frozen_batchnorm_stats(model):
                for i, (mb_inputs, mb_num_items, _) in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else self._no_sync(model):
                        perturbed_loss += super().training_step(model, dict(mb_inputs), mb_num_items)
        finally:
            vasso.restore()
        vasso.record_losses(clean_loss, perturbed_loss)
        return loss

    def _vasso_update(self) -> VassoUpdate:
        """The VASSO state, built on first use from the trainable parameters of the prepared model."""
        if self._vasso is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self._vasso = VassoUpdate(
                [p for _, p in named],
                rho=self.args.rho,
                theta=self.args.theta,
                adversary_prob=self.args.adversary_prob,
                seed=self.args.seed,
                param_names=[n for n, _ in named],
            )
        return self._vasso

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

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._vasso is not None:
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, reduction="mean")  # noqa: E731
            logs.update(self._vasso.pop_metrics(reduce))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _vasso_state_is_per_rank(self) -> bool:
        # Under per-rank adversaries or sharded parameters every rank holds different d.
        return not self.args.sync_adversary or self.is_fsdp_enabled

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._vasso is None:
            return
        if self._vasso_state_is_per_rank():
            path = os.path.join(output_dir, _per_rank_name(self.args.process_index))
        elif self.args.should_save:
            path = os.path.join(output_dir, VASSO_STATE_NAME)
        else:
            return
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self._vasso.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self._vasso_state_is_per_rank():
            candidates = [_per_rank_name(self.args.process_index), VASSO_STATE_NAME]
        else:
            # Every rank must hold the same d: from a per-rank checkpoint, all take rank 0's.
            candidates = [VASSO_STATE_NAME, _per_rank_name(0)]
        paths = [os.path.join(checkpoint, name) for name in candidates]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            logger.warning(
                f"{checkpoint} holds no VASSO state ({' or '.join(candidates)}): it was not written by VassoTrainer. "
                "Training resumes with d starting afresh from the next gradient."
            )
            return
        self._vasso_update().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _per_rank_name(rank: int) -> str:
    return f"vasso_state_rank{rank}.pt"


def _as_vasso_config(args: TrainingArguments | None) -> VassoConfig:
    if args is None:
        return VassoConfig(output_dir="tmp_trainer")
    if isinstance(args, VassoConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    logger.info("VassoTrainer got plain TrainingArguments: using VassoConfig with the default VASSO parameters.")
    return VassoConfig(**values)
