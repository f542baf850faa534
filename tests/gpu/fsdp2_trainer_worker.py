"""Worker for `test_fsdp2.py`: `VassoTrainer` under FSDP2 through the Trainer, started by `accelerate launch` with
`recipes/accelerate_configs/fsdp2.yaml` on 1 or 2 GPUs.

It trains a tiny Llama for 4 steps (accumulation 2, a checkpoint at step 2), then trains again from that checkpoint,
starting from different weights, and writes what it saw to `<out>/fsdp2_rank<r>.json` and the final weights (full
tensors) to `<out>/fsdp2_{full,resumed}.pt` on rank 0.

Usage: python fsdp2_trainer_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
from helpers import make_args, tiny_llama, token_dataset
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from hf_vasso import VassoTrainer

ARGS = dict(use_cpu=False, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, rho=0.05)


def full_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name.replace("_fsdp_wrapped_module.", "")] = t.float().cpu()
    return out


class EpsProbe(TrainerCallback):
    """||x + eps - x|| over all shards, from the weights `compute_loss` sees in pass 1 and pass 2."""

    def __init__(self, trainer) -> None:
        self.trainer, self.eps_norms = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        calls, ga = self.trainer.calls, args.gradient_accumulation_steps
        if len(calls) >= 2 * ga:
            sq = sum(((b - a).double() ** 2).sum() for a, b in zip(calls[0], calls[ga]))
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(sq)
            self.eps_norms.append(float(sq.sqrt()))
        calls.clear()


class Probed(VassoTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.probe = EpsProbe(self)
        self.add_callback(self.probe)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        local = [(p.to_local() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]
        self.calls.append([t for t, p in zip(local, model.parameters()) if p.requires_grad])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def main() -> None:
    out = sys.argv[1]
    data = token_dataset(n=64, length=16)
    trainer = Probed(
        model=tiny_llama(),
        args=make_args(os.path.join(out, "run"), save_strategy="steps", save_steps=2, **ARGS),
        train_dataset=data,
    )
    trainer.train()
    rank = trainer.args.process_index
    checkpoint = os.path.join(out, "run", "checkpoint-2")
    report = {
        "world_size": trainer.args.world_size,
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "params_are_dtensors": all(isinstance(p, DTensor) for p in trainer.model.parameters() if p.requires_grad),
        "eps_norms": trainer.probe.eps_norms,
        "vasso_step": trainer.vasso.step,
        "checkpoint_files": sorted(os.listdir(checkpoint)),
    }
    full = full_weights(trainer.model)

    model = tiny_llama(seed=1)  # other weights: the resumed run must take them from the checkpoint
    resumed = Probed(model=model, args=make_args(os.path.join(out, "run"), **ARGS), train_dataset=data)
    resumed.train(resume_from_checkpoint=checkpoint)
    report["resumed_vasso_step"] = resumed.vasso.step
    after = full_weights(resumed.model)
    if rank == 0:
        torch.save(full, os.path.join(out, "fsdp2_full.pt"))
        torch.save(after, os.path.join(out, "fsdp2_resumed.pt"))
    with open(os.path.join(out, f"fsdp2_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        from accelerate import PartialState

        PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
