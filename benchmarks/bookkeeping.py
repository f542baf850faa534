"""What the update work between the passes costs: hf_vasso's engine against pytorch_optimizer's `SAM`.

"Bookkeeping" is everything a SAM-family step does besides the two forward+backward passes and the base optimizer
step: the norm, the EMA, the perturbation, the restore, and (ours) the non-finite guards. Timed here alone, on
gradients set by hand, for

- `VassoUpdate` (the engine the Trainer calls): absorb_gradient + perturb + restore + guard_perturbed_gradient,
- `VASSO` (the wrapper): first_step + second_step,
- pytorch_optimizer `SAM`, default (per-tensor loop on CPU) and `foreach=True`: first_step + second_step,

all with a base optimizer whose step does nothing, on three workloads: LoRA r=8 on a 24-layer tiny Llama (336
tensors, 0.89M parameters), the full tiny Llama (219 tensors, 21.6M) and a ViT-Base sized model (200 tensors, 85.8M).
The implementations take turns step by step in one process, in shuffled order each round, on one torch thread; the
figure is the median step. Peak extra memory: the state held between steps plus the peak of the allocations made
during a step (torch profiler's CPU allocation events; `torch.cuda.max_memory_allocated` on a GPU), over the
trainable-parameter bytes.

    python benchmarks/bookkeeping.py            # about 10 minutes on one CPU core
    python benchmarks/bookkeeping.py --quick    # seconds: checks the pipeline (its figures mean nothing)

Writes `bookkeeping.md` and `bookkeeping.json` under `--out`. Targets (issue 11): ratio to the fastest peer <= 1.0,
peak extra memory <= 2.0x the trainable-parameter bytes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

sys.path.insert(0, _common.REPO)  # the hf_vasso of this checkout, not an installed copy

RHO, THETA = 0.05, 0.4
IMPLEMENTATIONS = ["VassoUpdate", "VASSO", "SAM", "SAM foreach"]
PEERS = ["SAM", "SAM foreach"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny workloads, a few rounds: checks the pipeline")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per workload")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=_common.DEFAULT_OUT)
    return p.parse_args(argv)


# ------------------------------------------------------------------ workloads


def tiny_llama(layers: int, hidden: int, intermediate: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def workloads(quick: bool):
    """name -> a builder of (model, trainable parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    size = dict(layers=2, hidden=64, intermediate=128, vocab=256) if quick else {}
    llama = dict(layers=24, hidden=256, intermediate=688, vocab=8192) | size
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def lora():
        model = get_peft_model(tiny_llama(**llama), LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets))
        return model

    def vit():
        config = ViTConfig() if not quick else ViTConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
        return ViTForImageClassification(config)

    return {
        "LoRA r=8, 24-layer tiny Llama": lora,
        "full tiny Llama": lambda: tiny_llama(**llama),
        "ViT-Base size": vit,
    }


# ------------------------------------------------------------------ implementations


class NoStep(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: the base step is not bookkeeping."""

    def __init__(self, params, **unused):  # SAM passes its own kwargs (foreach) on to the base optimizer
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class Runner:
    """One implementation on its own copy of the trainable parameters: `step(g, h)` runs one bookkeeping step."""

    def __init__(self, name: str, params: list[torch.Tensor]):
        from pytorch_optimizer import SAM

        from hf_vasso import VASSO, VassoUpdate

        self.name = name
        self.params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        if name == "VassoUpdate":
            self.update = VassoUpdate(self.params, rho=RHO, theta=THETA)
        elif name == "VASSO":
            self.opt = VASSO(NoStep(self.params), rho=RHO, theta=THETA)
        else:
            foreach = True if name == "SAM foreach" else None
            self.opt = SAM(self.params, NoStep, rho=RHO, foreach=foreach)

    def set_grads(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g

    def first(self):
        if self.name == "VassoUpdate":
            self.update.absorb_gradient()
            self.update.perturb()
        else:
            self.opt.first_step(zero_grad=False)

    def second(self):
        if self.name == "VassoUpdate":
            self.update.restore()
            self.update.guard_perturbed_gradient()
        else:
            self.opt.second_step(zero_grad=False)

    def held_bytes(self) -> int:
        """State kept between steps beside the model (SAM pops its saved copy in second_step)."""
        if self.name == "VassoUpdate":
            return self.update.state_bytes()
        if self.name == "VASSO":
            return self.opt.vasso.state_bytes()
        return sum(
            t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)
        )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(runner, g, h, device) -> float:
    """One step; only first/second are timed (setting the gradients stands in for the passes)."""
    runner.set_grads(g)
    sync(device)
    t0 = time.perf_counter()
    runner.first()
    sync(device)
    t1 = time.perf_counter()
    runner.set_grads(h)
    sync(device)
    t2 = time.perf_counter()
    runner.second()
    sync(device)
    return (t1 - t0) + (time.perf_counter() - t2)


def peak_step_bytes(runner, g, h, device) -> int:
    """Peak of the bytes allocated during one step above its start (the held state is counted separately)."""
    runner.set_grads(g)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        runner.first()
        runner.set_grads(h)
        runner.second()
        sync(device)
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    events = []
    for call, grads in ((runner.first, h), (runner.second, None)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        # Net bytes each op allocated itself, and frees outside any op ("[memory]"), in time order.
        events += sorted(
            (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
            for e in prof.events()
        )
        if grads is not None:
            runner.set_grads(grads)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def run_workload(name, build, rounds, device, rng):
    torch.manual_seed(0)
    model = build().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    g = [torch.randn_like(p) for p in params]
    h = [torch.randn_like(p) for p in params]
    del model
    runners = {n: Runner(n, params) for n in IMPLEMENTATIONS}
    for runner in runners.values():  # warm-up: allocations, lazy buffers
        for _ in range(2):
            timed_step(runner, g, h, device)
    times = {n: [] for n in IMPLEMENTATIONS}
    for _ in range(rounds):
        order = list(IMPLEMENTATIONS)
        rng.shuffle(order)
        for n in order:
            times[n].append(timed_step(runners[n], g, h, device))
    rows = []
    medians = {n: statistics.median(t) for n, t in times.items()}
    fastest_peer = min(PEERS, key=medians.get)
    for n in IMPLEMENTATIONS:
        runner = runners[n]
        extra = runner.held_bytes() + peak_step_bytes(runner, g, h, device)
        rows.append(
            {
                "workload": name,
                "implementation": n,
                "tensors": len(params),
                "params_M": round(numel / 1e6, 3),
                "median_ms": round(medians[n] * 1e3, 3),
                "ratio_to_fastest_peer": round(medians[n] / medians[fastest_peer], 3),
                "fastest_peer": fastest_peer,
                "peak_extra_memory_x": round(extra / param_bytes, 3),
                "rounds": rounds,
            }
        )
    return rows


def markdown(rows, info, cmd) -> str:
    lines = [
        "# Bookkeeping between the passes: hf_vasso against pytorch_optimizer's SAM",
        "",
        _common.provenance_md(info, cmd),
        "Median time of one step's bookkeeping (everything except the passes and the base step), implementations "
        "interleaved in shuffled rounds in one process; ratio to the fastest peer (target <= 1.0); peak extra memory "
        "over the trainable-parameter bytes (target <= 2.0). `VassoUpdate` and `VASSO` include the non-finite "
        "guards of both passes, which the peers do not have.",
        "",
        "| workload | tensors | params (M) | implementation | median ms | ratio to fastest peer | peak extra memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['tensors']} | {r['params_M']} | {r['implementation']} | {r['median_ms']} | "
            f"{r['ratio_to_fastest_peer']} ({r['fastest_peer']}) | {r['peak_extra_memory_x']}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 30)
    rng = random.Random(0)
    rows = []
    for name, build in workloads(args.quick).items():
        rows += run_workload(name, build, rounds, device, rng)
        print(f"{name}: done", flush=True)
    info, cmd = _common.machine(), _common.command()
    os.makedirs(args.out, exist_ok=True)
    _common.write_json(os.path.join(args.out, "bookkeeping.json"), {"command": cmd, "machine": info, "rows": rows})
    _common.write_text(os.path.join(args.out, "bookkeeping.md"), markdown(rows, info, cmd))
    print(markdown(rows, info, cmd))


if __name__ == "__main__":
    main()
