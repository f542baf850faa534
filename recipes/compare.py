# Copyright 2026 The hf_vasso authors. MIT licence.
"""Run one recipe under AdamW, SAM, VASSO and eVASSO on the same seeds; write a table and a plot.

The four settings differ only in the VASSO flags passed to the recipe (the base optimizer is the Trainer's AdamW in
all four, with the same learning rate, schedule, data order and seeds):

    AdamW    --rho 0 --adversary_prob 0   one pass per step: the plain base optimizer
    SAM      --theta 1                    VASSO with theta = 1 is SAM exactly
    VASSO    --theta 0.4                  the paper's theta
    eVASSO   --theta 0.4 --adversary_prob 0.3

Outputs in `--output_dir`: `results.md` and `results.csv` (mean +- std over seeds of the recipe's metric, wall time,
passes per step), `curves.png` (training loss per step and, for the ViT recipe, test accuracy per epoch), and each
run's folder with its `results.json`.

    python recipes/compare.py                                   # the ViT recipe's defaults, 3 seeds
    python recipes/compare.py -- --label_noise 0.4              # anything after -- goes to the recipe
    python recipes/compare.py --recipe lm --seeds 0 1           # LoRA on the eg pairs (held-out loss)
    python recipes/compare.py --quick                           # a smoke test of the pipeline (ViT: seconds)

Runs are sequential in this process; under `accelerate launch` each recipe run would use all processes, but the
comparison itself is meant for one machine.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
import time

METHODS = {
    "AdamW": ["--rho", "0", "--adversary_prob", "0"],
    "SAM": ["--theta", "1"],
    "VASSO": ["--theta", "0.4"],
    "eVASSO (p=0.3)": ["--theta", "0.4", "--adversary_prob", "0.3"],
}

RECIPES = {
    # recipe: (file, metric key in results.json, metric name, higher is better, default args, --quick args)
    "vit": (
        "vit_image_classification.py",
        "test_accuracy",
        "test accuracy",
        True,
        [],
        ["--max_train_samples", "128", "--max_test_samples", "64", "--max_steps", "2", "--hidden_size", "32"]
        + ["--num_hidden_layers", "1", "--logging_steps", "1", "--eval_strategy", "no"],
    ),
    "lm": (
        "lm_instruction_tuning.py",
        "heldout_loss_after",
        "held-out loss",
        False,
        [],
        ["--max_steps", "2", "--max_eval_samples", "8", "--num_generations", "1", "--max_new_tokens", "4"]
        + ["--per_device_train_batch_size", "2", "--logging_steps", "1"],
    ),
}


def passes_per_step(log_history: list[dict]) -> float:
    """1 + the fraction of steps that ran the adversary, weighted by the steps of each logging window."""
    logs = [log for log in log_history if "vasso/adversary_fraction" in log]
    if not logs:
        return 1.0
    steps, prev, weighted = 0, 0, 0.0
    for log in logs:
        n = log["step"] - prev
        prev = log["step"]
        steps += n
        weighted += n * log["vasso/adversary_fraction"]
    return 1.0 + weighted / max(steps, 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def plot(runs: dict[str, list[dict]], path: str, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    has_eval = any("eval_accuracy" in log for rs in runs.values() for r in rs for log in r["log_history"])
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(11 if has_eval else 6, 4), squeeze=False)
    for method, results in runs.items():
        for ax, key in zip(axes[0], ["loss", "eval_accuracy"]):
            curves = [[(log["step"], log[key]) for log in r["log_history"] if key in log] for r in results]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = np.array([s for s, _ in curves[0][:length]])
            values = np.array([[v for _, v in c[:length]] for c in curves])
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(steps, mean, marker="o" if length < 20 else None, label=method)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0][0].set(xlabel="optimizer step", ylabel="training loss (clean weights)", title="Training loss")
    if has_eval:
        axes[0][1].set(xlabel="optimizer step", ylabel="test accuracy", title="Test accuracy (per epoch)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    n_seeds = len(next(iter(runs.values())))
    fig.suptitle(f"AdamW vs SAM vs VASSO vs eVASSO: mean ± std over {n_seeds} seed(s); final {metric_name} in table")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    recipe_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, recipe_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="vit", help="Which recipe to compare on.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds, the same for every method.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Settings to run.")
    parser.add_argument("--output_dir", default=None, help="Where to write (default: compare-<recipe>).")
    parser.add_argument("--quick", action="store_true", help="Tiny model, 2 steps, 2 seeds: checks the pipeline.")
    args = parser.parse_args(argv)
    if args.quick and args.seeds == parser.get_default("seeds"):
        args.seeds = [0, 1]
    output_dir = args.output_dir or f"compare-{args.recipe}"
    file, key, metric_name, higher_better, default_args, quick_args = RECIPES[args.recipe]
    recipe = importlib.import_module(file[:-3])  # the recipes sit next to this file, on sys.path
    base_args = (quick_args if args.quick else default_args) + recipe_args

    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = os.path.join(output_dir, method.split()[0], f"seed{seed}")
            print(f"\n===== {method}, seed {seed} -> {run_dir}", flush=True)
            start = time.time()
            results = recipe.main(base_args + METHODS[method] + ["--seed", str(seed), "--output_dir", run_dir])
            results["wall_seconds"] = time.time() - start
            runs.setdefault(method, []).append(results)

    rows = []
    for method, results in runs.items():
        metric = mean_std([r[key] for r in results])
        seconds = mean_std([r["wall_seconds"] for r in results])
        passes = mean_std([passes_per_step(r["log_history"]) for r in results])
        rows.append({"method": method, "metric": metric, "seconds": seconds, "passes": passes, "n": len(results)})

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", f"{key}_mean", f"{key}_std", "wall_s_mean", "wall_s_std", "passes_per_step", "seeds"]
        )
        for r in rows:
            writer.writerow(
                [r["method"], f"{r['metric'][0]:.6g}", f"{r['metric'][1]:.6g}", f"{r['seconds'][0]:.4g}"]
                + [f"{r['seconds'][1]:.4g}", f"{r['passes'][0]:.3g}", r["n"]]
            )
    first = next(iter(runs.values()))[0]
    flags = f"`{' '.join(base_args)}`" if base_args else "none (the recipe's defaults)"
    arrow = "higher is better" if higher_better else "lower is better"
    lines = [
        f"# {args.recipe} recipe: AdamW vs SAM vs VASSO vs eVASSO",
        "",
        f"Data: {first['data']}; model: {first['model']}; seeds {args.seeds}; recipe flags: {flags}.",
        "",
        f"| method | {metric_name} ({arrow}) | wall time per run (s) | passes per step |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['metric'][0]:.4f} ± {r['metric'][1]:.4f} | {r['seconds'][0]:.1f} ± "
            f"{r['seconds'][1]:.1f} | {r['passes'][0]:.2f} |"
        )
    lines += ["", "Mean ± sample std over seeds. Wall time includes data loading and evaluation.", ""]
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    plot(runs, os.path.join(output_dir, "curves.png"), metric_name)
    print("\n".join(lines))
    print(f"Wrote {output_dir}/results.md, results.csv and curves.png")
    return rows


if __name__ == "__main__":
    main()
