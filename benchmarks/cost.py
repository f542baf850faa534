"""What VASSO costs: step time and memory of `VassoTrainer` against the plain `Trainer`, and of a peer SAM.

Two models, both tiny so the benchmark runs on a CPU: a small ViT (Fashion-MNIST sized images) trained in full, and a
tiny Llama trained with LoRA. For each, in one process, in rounds of fresh models in which the variants take turns
step by step (each `Trainer` in its own thread, one running at a time; the loops in one loop), so that changes in the
machine's load hit every variant alike; the order rotates every round:

- `Trainer` (AdamW) against `VassoTrainer` with VASSO (theta 0.4), SAM (theta 1) and eVASSO (p 0.3), same AdamW.
  A step is timed from the Trainer's `on_step_begin` to its `on_step_end` callback (forward, backward, VASSO, clip,
  optimizer and scheduler step; no data loading, no logging), after warm-up steps. Mean step times, never medians:
  a median would hide eVASSO's minority of two-pass steps.
- The peer: pytorch_optimizer's `SAM` in a hand-written loop against the same loop with plain AdamW, and our `VASSO`
  wrapper in the same loop.

The ratio to the plain step is compared with its floor: 2 passes for VASSO and SAM, 1 + (fraction of timed steps
that ran the adversary) for eVASSO. Targets: VASSO within 2.5% of its floor, eVASSO within 3%. Memory: VASSO's
persistent state (d in fp32 + the saved weights) against the trainable parameter bytes, and with a GPU, the peak
allocated memory against the plain Trainer's. On a GPU larger models join by default, in bf16: a ViT-B/16
(86M parameters, 224x224, full training) and a 1.1B-parameter Llama (TinyLlama's shapes, random init) with LoRA
(`--models llama-1.1b-full` trains it in full);
every row then also gives the throughput (samples/s, tokens/s for the Llamas).

    python benchmarks/cost.py            # a few minutes on 2 CPU cores; on a GPU also ViT-B/16 and a 1.1B Llama
    python benchmarks/cost.py --models vit-b16 llama-1.1b-lora --rounds 2   # GPU: throughput and peak memory
    python benchmarks/cost.py --quick    # seconds: checks the pipeline (its ratios mean nothing)
    python benchmarks/cost.py --profile  # also cProfile a VassoTrainer run (top functions into cost_profile.txt)

Writes `cost.md`, `cost.csv` and `cost.json` under `--out`.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import _common  # noqa: E402  (provenance of the results)
import helpers  # noqa: E402  (the models, the token data, the plain VASSO step, the eVASSO coin)

TRAINER_VARIANTS = {
    # name -> VASSO settings (None: the plain Trainer)
    "Trainer (AdamW)": None,
    "VassoTrainer VASSO θ=0.4": dict(theta=0.4, adversary_prob=1.0),
    "VassoTrainer SAM θ=1": dict(theta=1.0, adversary_prob=1.0),
    "VassoTrainer eVASSO p=0.3": dict(theta=0.4, adversary_prob=0.3),
}
LOOP_VARIANTS = ["loop AdamW", "loop pytorch_optimizer SAM", "loop hf_vasso VASSO θ=0.4"]
TARGETS = {"VASSO": 0.025, "SAM": 0.025, "eVASSO": 0.03}
RHO, LR, SEED = 0.05, 1e-3, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", default=_common.DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=24, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    gpu_models = ["vit-b16", "llama-1.1b-lora"] if torch.cuda.is_available() else []
    p.add_argument("--models", nargs="+", default=["vit", "llama-lora"] + gpu_models, choices=list(MODELS))
    p.add_argument("--profile", action="store_true", help="cProfile VassoTrainer (VASSO) runs, top functions to file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 3, 1
    return args


# ---------------------------------------------------------------------------------------------------- models


MODELS = {
    # name: (description, batch size, sequence length or None, bf16)
    "vit": ("ViT (patch 4, hidden 96, 4 layers), full training, batch 32", 32, None, False),
    "llama-lora": ("Llama (4 layers, hidden 128) + LoRA r=8 on attention, batch 8 × 64", 8, 64, False),
    "vit-b16": ("ViT-B/16 (86M parameters, 224×224, random init), full training, batch 64, bf16", 64, None, True),
    "llama-1.1b-lora": (
        "Llama 1.1B (TinyLlama shapes, bf16 weights) + LoRA r=16 on attention, batch 8 × 512",
        8,
        512,
        True,
    ),
    "llama-1.1b-full": ("Llama 1.1B (TinyLlama shapes, bf16 weights), full training, batch 4 × 512", 4, 512, True),
}


def build(model_name: str, quick: bool):
    """Return `(make_model, peft_config, examples, batch_size, description, bf16)`; `make_model()` is seeded."""
    from peft import LoraConfig

    desc, batch, seq, bf16 = MODELS[model_name]
    g = torch.Generator().manual_seed(SEED)
    n = batch * 8
    if model_name.startswith("vit"):
        big = model_name == "vit-b16"
        size, channels, labels = (224, 3, 1000) if big else (28, 1, 10)
        pool = torch.rand(16, channels, size, size, generator=g)  # a small pool: the data loader is not measured
        y = torch.randint(0, labels, (n,), generator=g)
        examples = [{"pixel_values": pool[i % 16], "labels": y[i]} for i in range(n)]
        sizes = dict(patch_size=16, hidden=768, layers=12, heads=12, intermediate_size=3072) if big else {}
        if quick and not big:
            sizes = dict(hidden=48, layers=1)

        def make():
            torch.manual_seed(SEED)
            return helpers.small_vit(image_size=size, channels=channels, num_labels=labels, **sizes)

        return make, None, examples, batch, desc, bf16
    big = model_name.startswith("llama-1.1b")
    vocab = 32000 if big else 512
    examples = list(helpers.token_dataset(n, seq, vocab_size=vocab, seed=SEED))
    if big:
        sizes = dict(hidden_size=2048, intermediate_size=5632, layers=22, heads=32, kv_heads=4)
    else:
        sizes = (
            dict(hidden_size=64, intermediate_size=128, layers=1)
            if quick
            else dict(hidden_size=128, intermediate_size=344, layers=4)
        )
        sizes["kv_heads"] = 4

    def make():
        with torch.device("cuda" if big else "cpu"):
            model = helpers.tiny_llama(seed=SEED, vocab_size=vocab, max_positions=seq, **sizes)
        return model.to(torch.bfloat16) if big else model

    r = 16 if big else 8
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    return make, None if model_name.endswith("-full") else lora, examples, batch, desc, bf16


# ---------------------------------------------------------------------------------------------------- Trainer runs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> tuple[float, float]:
    """(wall, CPU time of this thread). On a shared CPU machine, other jobs stretch the wall time of a step but not
    the CPU time it consumes; on a GPU, the CPU time misses the device work and the wall time is the measure.

    With one torch thread, CPU autograd and every kernel run on the calling thread, so its CPU time is the step's
    work (measured equal to the process's). `thread_time` costs 0.5 us here, `process_time` 100 us to several ms.
    """
    return time.perf_counter(), time.thread_time()


def elapsed(t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - t0[0], cpu - t0[1]


PRIMARY = 0 if torch.cuda.is_available() else 1  # index into (wall, cpu) of the clock the targets are judged on


class Baton:
    """Lets one thread at a time run: the Trainers of a round take turns step by step.

    Each Trainer trains in its own thread; only the holder of the baton runs, the others wait on a condition (no CPU).
    A Trainer keeps the baton from its `on_step_begin` through its data loading and logging until its next
    `on_step_begin`, where it hands it to the next Trainer of the ring. Adjacent steps of different variants thus
    run a fraction of a second apart, under the same machine load, which round-level interleaving cannot give.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.ring: list[int] = []
        self.holder: int | None = None
        self.failed = False

    def wait_turn(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.holder == me or self.failed)
            if self.failed:
                raise RuntimeError("another variant of this round failed")

    def pass_on(self, me: int, leave: bool = False) -> None:
        with self.cond:
            i = self.ring.index(me)
            if leave:
                self.ring.remove(me)
                self.holder = self.ring[i % len(self.ring)] if self.ring else None
            else:
                self.holder = self.ring[(i + 1) % len(self.ring)]
            self.cond.notify_all()


def make_trainer(variant, args, built, tmp, callback):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_vasso import VassoConfig, VassoTrainer

    make, lora, examples, batch, _, bf16 = built
    common = dict(
        bf16=bf16,
        output_dir=tmp,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=batch,
        learning_rate=LR,
        optim="adamw_torch",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=SEED,
    )
    spec = TRAINER_VARIANTS[variant]
    model = make()
    if spec is None:
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=examples)
    else:
        cfg = VassoConfig(rho=RHO, **spec, **common)
        trainer = VassoTrainer(model=model, args=cfg, train_dataset=examples, peft_config=lora)
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # its end-of-training print would only clutter the output
    return trainer


def trainers_round(variants, args, built, tmp, profiler=None):
    """Train every Trainer variant (fresh models) for warm-up + timed steps, step-interleaved on CPU.

    Returns `{variant: (step times, adversary fraction, trainable bytes, VASSO state bytes, peak)}`. On a GPU the
    variants run one after another instead, so that each has its own peak memory.
    """
    from transformers import TrainerCallback

    interleave = not torch.cuda.is_available()
    warmup = args.warmup
    baton = Baton()

    class StepTimer(TrainerCallback):
        def __init__(self, me, variant):
            self.me, self.variant, self.times = me, variant, []
            self.ready = threading.Event()

        def on_train_begin(self, a, state, control, **kw):
            self.ready.set()
            baton.wait_turn(self.me)

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step > 0:
                baton.pass_on(self.me)
                baton.wait_turn(self.me)
            sync()
            if profiler is not None and self.variant == "VassoTrainer VASSO θ=0.4" and state.global_step == warmup:
                profiler.enable()
            self.t0 = clock()

        def on_step_end(self, a, state, control, **kw):
            sync()
            if state.global_step > warmup:
                self.times.append(elapsed(self.t0))

        def on_train_end(self, a, state, control, **kw):
            if profiler is not None and self.variant == "VassoTrainer VASSO θ=0.4":
                profiler.disable()
            baton.pass_on(self.me, leave=True)

    results, errors = {}, []

    def work(variant, trainer, timer):
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            trainable = [p for p in trainer.model.parameters() if p.requires_grad]
            param_bytes = sum(p.numel() * p.element_size() for p in trainable)
            fraction, state_bytes = None, None
            if TRAINER_VARIANTS[variant] is not None:
                p = TRAINER_VARIANTS[variant]["adversary_prob"]
                fraction = statistics.fmean(
                    helpers.reference_coin(SEED, s, p) for s in range(warmup, warmup + args.steps)
                )
                state_bytes = trainer.vasso.state_bytes()
            results[variant] = (timer.times, fraction, param_bytes, state_bytes, peak)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            with baton.cond:
                baton.failed = True
                baton.cond.notify_all()

    groups = [variants] if interleave else [[v] for v in variants]
    for group in groups:
        threads = []
        for me, variant in enumerate(group):
            timer = StepTimer(me, variant)
            trainer = make_trainer(variant, args, built, tmp, timer)
            baton.ring.append(me)
            thread = threading.Thread(target=work, args=(variant, trainer, timer), daemon=True)
            thread.start()
            while not timer.ready.wait(0.1):  # set-up runs alone, before the next thread starts
                if errors:
                    raise errors[0]
            threads.append(thread)
        with baton.cond:
            baton.holder = baton.ring[0]
            baton.cond.notify_all()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        baton.ring.clear()
    return results


# ---------------------------------------------------------------------------------------------------- plain loops


def loops_round(variants, args, built):
    """The same steps in a hand-written loop: plain AdamW, pytorch_optimizer SAM, and the hf_vasso VASSO wrapper,
    each with its own fresh model, interleaved step by step. Returns `{variant: step times}`."""
    from pytorch_optimizer import SAM

    from hf_vasso import VASSO

    make, lora, examples, batch = built[:4]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        batches.append({k: torch.stack([e[k] for e in chunk]).to(device) for k in chunk[0]})
    runs = {}
    for variant in variants:
        model = make()
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if variant == "loop AdamW":
            opt = torch.optim.AdamW(params, lr=LR)
        elif variant == "loop pytorch_optimizer SAM":
            opt = SAM(params, torch.optim.AdamW, rho=RHO, lr=LR)
        else:
            opt = VASSO(torch.optim.AdamW(params, lr=LR), rho=RHO, theta=0.4)
        runs[variant] = (model, opt)
    times = {v: [] for v in variants}
    for step in range(args.warmup + args.steps):
        inputs = batches[step % len(batches)]
        for variant, (model, opt) in runs.items():
            sync()
            t0 = clock()
            if variant == "loop AdamW":
                model(**inputs).loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                helpers.vasso_step(opt, lambda: model(**inputs).loss)  # noqa: B023 (called at once)
            sync()
            if step >= args.warmup:
                times[variant].append(elapsed(t0))
    return times


def update_ops(built, reps: int = 20) -> dict:
    """Where a VASSO step's extra time goes, measured alone: one forward+backward pass, the base AdamW step, and
    VASSO's own work (`absorb_gradient`: EMA, norms, cosine; `perturb` + `restore`), in ms of thread CPU time."""
    from hf_vasso import VassoUpdate

    make, lora, examples, batch = built[:4]
    model = make()
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    inputs = {k: torch.stack([e[k] for e in examples[:batch]]) for k in examples[0]}
    params = [p for p in model.parameters() if p.requires_grad]
    update = VassoUpdate(params, rho=RHO, theta=0.4)
    opt = torch.optim.AdamW(params, lr=LR)

    def timed(fn, n=reps):
        fn()
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        return 1000 * (time.thread_time() - t0) / n

    def fwd_bwd():
        model.zero_grad()
        model(**inputs).loss.backward()

    out = {"pass_ms": timed(fwd_bwd, max(3, reps // 4))}
    grads = [p.grad.clone() for p in params]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    def perturb_restore():
        set_grads()
        update.perturb()
        update.restore()

    def adamw_step():
        set_grads()
        opt.step()

    out["absorb_ms"] = timed(update.absorb_gradient)
    out["perturb_restore_ms"] = timed(perturb_restore)
    out["adamw_step_ms"] = timed(adamw_step)
    out["tensors"] = len(params)
    return out


# ---------------------------------------------------------------------------------------------------- report


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def family(variant: str) -> str | None:
    for key in ("eVASSO", "SAM", "VASSO"):
        if key in variant:
            return key
    return None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    info, cmd = _common.machine(), _common.command()
    import transformers

    transformers.logging.set_verbosity_error()
    profiler = cProfile.Profile() if args.profile else None

    rows, raw = [], {}
    for model_name in args.models:
        built = build(model_name, args.quick)
        variants = list(TRAINER_VARIANTS) + LOOP_VARIANTS
        times = {v: [] for v in variants}
        per_round = {v: [] for v in variants}
        extra = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                shift = r % len(TRAINER_VARIANTS)  # the ring's order rotates every round
                trainer_variants = list(TRAINER_VARIANTS)[shift:] + list(TRAINER_VARIANTS)[:shift]
                round_times = {}
                for v, (t, fraction, pbytes, sbytes, peak) in trainers_round(
                    trainer_variants, args, built, tmp, profiler
                ).items():
                    round_times[v] = t
                    extra[v] = dict(adversary_fraction=fraction, param_bytes=pbytes, state_bytes=sbytes, peak=peak)
                shift = r % len(LOOP_VARIANTS)
                round_times.update(loops_round(LOOP_VARIANTS[shift:] + LOOP_VARIANTS[:shift], args, built))
                for v, t in round_times.items():
                    times[v] += t
                    per_round[v].append([statistics.fmean(x[k] for x in t) for k in (0, 1)])
                print(f"[{time.strftime('%H:%M:%S')}] {model_name} round {r + 1}/{args.rounds} done", flush=True)
        raw[model_name] = {
            "description": built[4],
            "step_seconds": times,
            "extra": extra,
            "update_ops": update_ops(built, 4 if args.quick else 20),
        }
        for v in variants:
            baseline = "Trainer (AdamW)" if v in TRAINER_VARIANTS else "loop AdamW"
            mean = [statistics.fmean(t[k] for t in times[v]) for k in (0, 1)]
            base_mean = [statistics.fmean(t[k] for t in times[baseline]) for k in (0, 1)]
            ratio, wall_ratio = mean[PRIMARY] / base_mean[PRIMARY], mean[0] / base_mean[0]
            round_ratios = [a[PRIMARY] / b[PRIMARY] for a, b in zip(per_round[v], per_round[baseline])]
            rr_mean, rr_half = mean_ci(round_ratios)
            fam = family(v)
            e = extra.get(v, {})
            floor = None
            if fam == "eVASSO":
                floor = 1 + e["adversary_fraction"]
            elif fam is not None:
                floor = 2.0
            over = ratio / floor - 1 if floor else None
            target = TARGETS.get(fam) if fam and v in TRAINER_VARIANTS else None
            verdict = None
            if target is not None:
                low, high = (rr_mean - rr_half) / floor - 1, (rr_mean + rr_half) / floor - 1
                verdict = "yes" if high <= target else "no" if low > target else "within noise"
            rows.append(
                {
                    "model": model_name,
                    "variant": v,
                    "clock": "wall" if PRIMARY == 0 else "cpu",
                    "mean_step_ms": 1000 * mean[PRIMARY],
                    "mean_step_wall_ms": 1000 * mean[0],
                    "steps_timed": len(times[v]),
                    "ratio_to_plain": ratio,
                    "wall_ratio_to_plain": wall_ratio,
                    "round_ratio_mean": rr_mean,
                    "round_ratio_ci95": rr_half,
                    "round_ratio_min": min(round_ratios),
                    "round_ratio_max": max(round_ratios),
                    "adversary_fraction": e["adversary_fraction"] if fam == "eVASSO" else (1.0 if fam else 0.0),
                    "floor": floor,
                    "over_floor": over,
                    "target": target,
                    "meets_target": (over <= target) if target is not None else None,
                    "verdict_ci95": verdict,
                    "trainable_param_bytes": e.get("param_bytes"),
                    "vasso_state_bytes": e.get("state_bytes"),
                    "peak_bytes": e.get("peak"),
                    "samples_per_s": built[3] / mean[0],
                    "tokens_per_s": built[3] * MODELS[model_name][2] / mean[0] if MODELS[model_name][2] else None,
                }
            )

    with open(os.path.join(args.out, "cost.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _common.write_json(
        os.path.join(args.out, "cost.json"),
        {"command": cmd, "machine": info, "args": vars(args), "rows": rows, "raw": raw},
    )
    if profiler is not None:
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(45)
        _common.write_text(os.path.join(args.out, "cost_profile.txt"), s.getvalue())
    write_markdown(args, rows, raw, info, cmd)
    print(f"wrote {args.out}/cost.md", flush=True)


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_markdown(args, rows, raw, info, cmd):
    lines = [
        "# Cost: step time and memory",
        "",
        _common.provenance_md(info, cmd),
        f"{args.rounds} rounds per model, each variant a fresh model per round, {args.warmup} warm-up + "
        f"{args.steps} timed steps per round, the variants taking turns step by step (on CPU); mean step time over "
        "all timed steps, measured in "
        + (
            "wall time (GPU). "
            if PRIMARY == 0
            else "CPU time of the training thread (the machine is shared: other jobs "
            "stretched wall times by up to 4× at random, but much less the CPU time a "
            "step consumes; with one torch thread CPU time is the work done). Wall-time ratios are given for "
            "reference. "
        )
        + "Ratio: mean step time over the "
        "plain step of the same harness (the `Trainer` for `VassoTrainer`, the AdamW loop for the loops). Floor: 2 "
        "passes, or 1 + adversary fraction of the timed steps for eVASSO. 'Over floor' = ratio / floor − 1 "
        "(negative: cheaper than two full plain steps, because the optimizer step, clipping and the Trainer's own "
        "per-step work run once). Per-round ratio: the ratio of the two variants' means within each round, averaged "
        "over rounds, with its 95% t-interval; 'met (95% CI)' says yes when the whole interval is within the "
        "target, no when all of it is beyond, 'within noise' otherwise.",
        "",
    ]
    for model_name, info_m in raw.items():
        lines += [
            f"## {model_name}: {info_m['description']}",
            "",
            "| variant | mean step (ms) | ratio to plain | per-round ratio, mean ± 95% CI (min–max) | wall ms (ratio) "
            "| adversary fraction | floor | over floor | target | met (point) | met (95% CI) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["model"] != model_name:
                continue
            met = {None: "–", True: "yes", False: "**no**"}[r["meets_target"]]
            lines.append(
                f"| {r['variant']} | {r['mean_step_ms']:.1f} | {r['ratio_to_plain']:.3f} | "
                f"{r['round_ratio_mean']:.3f} ± {r['round_ratio_ci95']:.3f} "
                f"({r['round_ratio_min']:.2f}–{r['round_ratio_max']:.2f}) | "
                f"{r['mean_step_wall_ms']:.1f} ({r['wall_ratio_to_plain']:.3f}) | {r['adversary_fraction']:.2f} | "
                f"{fmt(r['floor'], '.2f')} | {fmt(r['over_floor'], '+.1%')} | "
                f"{'≤ +' + format(r['target'], '.1%') if r['target'] else '–'} | {met} | {r['verdict_ci95'] or '–'} |"
            )
        lines.append("")
        ops = info_m["update_ops"]
        vasso_ms = ops["absorb_ms"] + ops["perturb_restore_ms"]
        lines += [
            f"Where the time goes, each piece timed alone ({ops['tensors']} trainable tensors): one forward+backward "
            f"pass {ops['pass_ms']:.1f} ms, AdamW step {ops['adamw_step_ms']:.2f} ms, VASSO's own work "
            f"{vasso_ms:.2f} ms per adversary step (`absorb_gradient` {ops['absorb_ms']:.2f} ms, on every step also "
            f"under eVASSO; `perturb` + `restore` {ops['perturb_restore_ms']:.2f} ms) = "
            f"{vasso_ms / ops['pass_ms']:.1%} of a pass.",
            "",
        ]
        mem = [r for r in rows if r["model"] == model_name and r["vasso_state_bytes"]]
        if mem:
            r = mem[0]
            lines.append(
                f"Memory: VASSO's persistent state {r['vasso_state_bytes']:,} bytes (d in fp32 + saved weights) for "
                f"{r['trainable_param_bytes']:,} trainable parameter bytes = "
                f"{r['vasso_state_bytes'] / r['trainable_param_bytes']:.2f}× the trainable parameters."
            )
            plain = [x for x in rows if x["model"] == model_name and x["variant"] == "Trainer (AdamW)"][0]
            if plain["peak_bytes"]:
                for x in rows:
                    if x["model"] == model_name and x["peak_bytes"]:
                        tokens = f", {x['tokens_per_s']:,.0f} tokens/s" if x["tokens_per_s"] else ""
                        lines.append(
                            f"- {x['variant']}: {x['samples_per_s']:,.1f} samples/s{tokens}; peak GPU memory "
                            f"{x['peak_bytes'] / 2**30:.2f} GiB = {x['peak_bytes'] / plain['peak_bytes']:.3f}× the "
                            "plain Trainer's."
                        )
            else:
                lines.append("Peak memory: not measured (no GPU on this machine).")
            lines.append("")
    _common.write_text(os.path.join(args.out, "cost.md"), "\n".join(lines))


if __name__ == "__main__":
    main()
