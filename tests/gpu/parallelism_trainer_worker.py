"""Worker for `test_parallelism_config.py`: `VassoTrainer` with
`VassoConfig(parallelism_config=ParallelismConfig(...))` on 2 or 4 GPUs, started by torchrun.

Cases (argv[2]): "tp" (`tp_size=2`: the tiny Llama loaded with `tp_plan="auto"`), "dp_shard" (`dp_shard_size=2`,
FSDP2), "dp_shard_tp" (2 x 2), "hsdp" (`dp_replicate_size=2, dp_shard_size=2`). It trains 4 steps (a checkpoint at
step 2), measures ||x + eps - x|| over the full tensors (each element once) from the weights `compute_loss` sees in
the two passes, resumes from the checkpoint with other weights, and writes `<out>/<case>_rank<r>.json` and, on rank
0, the final full weights to `<out>/<case>_{full,resumed}.pt`.

Usage: torchrun --nproc_per_node N parallelism_trainer_worker.py OUT_DIR CASE
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import ParallelismConfig
from fsdp2_trainer_worker import full_weights
from helpers import make_args, tiny_llama, token_dataset
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from hf_vasso import VassoTrainer

ARGS = dict(use_cpu=False, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, rho=0.05)
CASES = {  # name: (processes, ParallelismConfig kwargs)
    "tp": (2, dict(tp_size=2)),
    "dp_shard": (2, dict(dp_shard_size=2)),
    "dp_shard_tp": (4, dict(dp_shard_size=2, tp_size=2)),
    "hsdp": (4, dict(dp_replicate_size=2, dp_shard_size=2)),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double()


class Probed(VassoTrainer):
    """Measures ||x + eps - x|| of each step over the full tensors (each element once, whatever the layout) from the
    weights its two `compute_loss` calls see (one micro-batch per step: pass 1, then pass 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.eps_norms = [], []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.calls = []
        loss = super().training_step(model, inputs, num_items_in_batch)
        if len(self.calls) == 2:
            self.eps_norms.append(float(sum(((b - a) ** 2).sum() for a, b in zip(*self.calls)).sqrt()))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.calls.append([full(p) for p in model.parameters() if p.requires_grad])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def load_model(out: str, case: str, seed: int) -> torch.nn.Module:
    """The tiny Llama, sharded at load time by its TP plan when the case has tensor parallelism."""
    kwargs = CASES[case][1]
    if kwargs.get("tp_size", 1) == 1:
        return tiny_llama(seed=seed)
    path = os.path.join(out, f"tiny_llama_{seed}")
    if torch.distributed.get_rank() == 0:
        tiny_llama(seed=seed).save_pretrained(path)
    torch.distributed.barrier()
    return LlamaForCausalLM.from_pretrained(path, tp_plan="auto", tp_size=kwargs["tp_size"])


def args_for(out: str, case: str, **extra):
    config = ParallelismConfig(**CASES[case][1])
    fsdp = {}
    if CASES[case][1].get("dp_shard_size", 1) > 1:
        fsdp = dict(fsdp="full_shard", fsdp_config={"version": 2, "reshard_after_forward": True})
    return make_args(os.path.join(out, case), parallelism_config=config, **fsdp, **ARGS, **extra)


def main() -> None:
    out, case = sys.argv[1], sys.argv[2]
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl")  # Accelerate and from_pretrained(tp_plan=...) use this group
    data = token_dataset(n=64, length=16)
    trainer = Probed(
        model=load_model(out, case, 0),
        args=args_for(out, case, save_strategy="steps", save_steps=2),
        train_dataset=data,
    )
    trainer.train()
    rank = trainer.args.process_index
    checkpoint = os.path.join(out, case, "checkpoint-2")
    report = {
        "world_size": trainer.args.world_size,
        "params_are_dtensors": all(isinstance(p, DTensor) for p in trainer.model.parameters() if p.requires_grad),
        "eps_norms": trainer.eps_norms,
        "vasso_step": trainer.vasso.step,
        "checkpoint_files": sorted(os.listdir(checkpoint)),
    }
    weights = full_weights(trainer.model)
    resumed = Probed(model=load_model(out, case, 1), args=args_for(out, case), train_dataset=data)
    resumed.train(resume_from_checkpoint=checkpoint)
    report["resumed_vasso_step"] = resumed.vasso.step
    after = full_weights(resumed.model)
    written = {f"{case}_rank{rank}.json": report}
    if rank == 0:
        written.update({f"{case}_full.pt": weights, f"{case}_resumed.pt": after})
    for name, value in written.items():
        if name.endswith(".json"):
            with open(os.path.join(out, name), "w") as f:
                json.dump(value, f)
        else:
            torch.save(value, os.path.join(out, name))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # this worker created the group


if __name__ == "__main__":
    main()
