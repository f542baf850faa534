"""Worker for the DDP tests: trains a tiny MLP with `VassoTrainer` (or the plain `Trainer`) and records, on every rank,
what the tests compare.

Launched by `test_ddp.py` with `torchrun --nproc_per_node 2` (gloo, CPU) or as a single plain process (the reference
run with the global batch). Each rank writes `<out>/<run>_rank<r>.pt` with, for every optimizer step: the flattened
trainable weights, the flattened d, the number of DDP gradient all-reduces (counted by a DDP communication hook), the
number of forward passes (1 or 2 per micro-batch, so the eVASSO coin as the rank actually ran it) and the coin.

Usage: python ddp_worker.py SCENARIO OUT_DIR   (scenarios: synced, single, per_rank, count, evasso, resume_full,
resume_continue).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from _dist_launch import exit_without_teardown
from helpers import reference_coin
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_vasso import VassoConfig, VassoTrainer

IN_DIM, HIDDEN, CLASSES = 8, 16, 4


class TinyMLP(nn.Module):
    """No dropout, no BatchNorm: the only randomness is the data order."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
        self.forward_calls = 0

    def forward(self, x, labels=None):
        self.forward_calls += 1
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def make_dataset(n: int = 96) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, CLASSES, generator=g)
    labels = (x @ w + 0.5 * torch.randn(n, CLASSES, generator=g)).argmax(-1)
    return [{"x": x[i], "labels": labels[i]} for i in range(n)]


def make_model(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


class Recorder(TrainerCallback):
    """Registers a counting DDP communication hook on the prepared model and records every optimizer step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.allreduces = 0
        self.last_allreduces = 0
        self.last_forwards = 0
        self.steps: list[dict] = []
        self.hooked = False

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def counting_hook(process_group, bucket):
                self.allreduces += 1
                return default_hooks.allreduce_hook(process_group, bucket)

            wrapped.register_comm_hook(None, counting_hook)
            self.hooked = True

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.model
        vasso = getattr(self.trainer, "vasso", None)  # the plain Trainer has none
        record = {
            "step": state.global_step,
            "params": flat_params(model),
            "allreduces": self.allreduces - self.last_allreduces,
            "forwards": model.forward_calls - self.last_forwards,
        }
        if vasso is not None:
            record["d"] = torch.cat([d.reshape(-1).clone() for d in vasso.d])
            record["vasso_step"] = vasso.step
            # The coin of the step just taken, from its specification (a function of seed and step); the test checks
            # that each rank ran exactly the passes it says.
            record["coin"] = reference_coin(args.seed, vasso.step - 1, args.adversary_prob)
        self.steps.append(record)
        self.last_allreduces = self.allreduces
        self.last_forwards = model.forward_calls


def train(
    out_dir: str,
    name: str,
    *,
    vasso: bool = True,
    per_device: int = 4,
    accumulation: int = 2,
    max_steps: int = 6,
    sync_adversary: bool = True,
    adversary_prob: float = 1.0,
    seed: int = 0,
    sampling: str = "sequential",
    save_steps: int | None = None,
    resume_from: str | None = None,
    run_dir: str | None = None,
    find_unused: bool | None = None,
) -> dict:
    common = dict(
        output_dir=run_dir or os.path.join(out_dir, f"trainer_{name}"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        train_sampling_strategy=sampling,
        ddp_find_unused_parameters=find_unused,
    )
    if vasso:
        args = VassoConfig(rho=0.05, theta=0.4, adversary_prob=adversary_prob, sync_adversary=sync_adversary, **common)
        trainer_cls = VassoTrainer
    else:
        args = TrainingArguments(**common)
        trainer_cls = Trainer
    model = make_model(seed=0 if resume_from is None else 99)  # a resumed run must get its weights from the checkpoint
    trainer = trainer_cls(model=model, args=args, train_dataset=make_dataset())
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume_from)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        assert recorder.hooked, "the prepared model is not DDP: the all-reduce counts would be meaningless"
    result = {
        "name": name,
        "world_size": world,
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "steps": recorder.steps,
        "final_params": flat_params(trainer.model),
        "log_history": trainer.state.log_history,
    }
    if vasso:
        result["final_d"] = torch.cat([d.reshape(-1).clone() for d in trainer.vasso.d])
    return result


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    if scenario in ("synced", "single"):
        # 2 ranks x 4 samples x 2 micro-batches = one process with 16 samples in a single micro-batch.
        if scenario == "synced":
            results["synced"] = train(out_dir, "synced", per_device=4, accumulation=2, find_unused=False)
        else:
            results["single"] = train(out_dir, "single", per_device=16, accumulation=1)
    elif scenario == "per_rank":
        results["per_rank"] = train(out_dir, "per_rank", sync_adversary=False, sampling="random")
    elif scenario == "count":
        for accumulation in (1, 2):
            kw = dict(accumulation=accumulation, max_steps=3)
            results[f"plain_ga{accumulation}"] = train(out_dir, f"plain_ga{accumulation}", vasso=False, **kw)
            results[f"synced_ga{accumulation}"] = train(out_dir, f"synced_ga{accumulation}", **kw)
            results[f"per_rank_ga{accumulation}"] = train(
                out_dir, f"per_rank_ga{accumulation}", sync_adversary=False, **kw
            )
    elif scenario == "evasso":
        for sync in (True, False):
            name = f"evasso_sync{int(sync)}"
            results[name] = train(
                out_dir, name, adversary_prob=0.5, accumulation=2, max_steps=8, sync_adversary=sync, seed=0
            )
    elif scenario in ("resume_full", "resume_continue"):
        for sync in (True, False):
            name = f"sync{int(sync)}"
            run_dir = os.path.join(out_dir, f"run_{name}")
            kw = dict(sync_adversary=sync, sampling="random", max_steps=6, run_dir=run_dir, seed=7)
            if scenario == "resume_full":
                results[name] = train(out_dir, name, save_steps=3, **kw)
            else:
                results[name] = train(out_dir, name, resume_from=os.path.join(run_dir, "checkpoint-3"), **kw)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")

    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(results, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown()
