# Copyright 2026 The hf_vasso authors. MIT licence.
"""Run one recipe under AdamW, SAM, VASSO and eVASSO on the same seeds; write a table and a plot.

The four settings differ only in the VASSO flags passed to the recipe (the base optimizer is the Trainer's AdamW in
all four, with the same learning rate, schedule, data order and seeds):

    AdamW    --rho 0 --adversary_prob 0   one pass per step: the plain base optimizer
    SAM      --theta 1                    VASSO with theta = 1 is SAM exactly
    VASSO    --theta 0.4                  the paper's theta
    eVASSO   --theta 0.4 --adversary_prob 0.3

Outputs in `--output_dir`: `results.md` and `results.csv` (mean +- std over seeds of the recipe's metric, wall time,
passes per step), `curves.png` (the spread over seeds of each method: bands of +- one standard deviation around the
training loss per step and, for the ViT recipe, the test accuracy per epoch; error bars and each seed's value for the
final metric), and each run's folder with its `results.json`. Before each run it prints `run k of n: <method> seed s`.

    python recipes/compare.py                                   # the ViT recipe's defaults, seeds 0 1 2
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

import embedded_data  # next to this file: the recipes' shared plumbing

DEFAULT_SEEDS = [0, 1, 2]
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


def plot(runs: dict[str, list[dict]], path: str, key: str, metric_name: str, recipe: str):
    """Draw the spread over seeds: a band of +- one std around each method's mean curve (training loss per step, test
    accuracy per epoch where the recipe evaluates), and the final metric as mean +- std error bars over the dots of
    the single seeds. Returns the figure (closed) so a test can read what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    has_eval = any("eval_accuracy" in log for rs in runs.values() for r in rs for log in r["log_history"])
    curves = [("loss", "training loss (clean weights)", "Training loss")]
    curves += [("eval_accuracy", "test accuracy", "Test accuracy per epoch")] if has_eval else []
    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(5 * (len(curves) + 1), 4.5), layout="constrained")
    for i, (method, results) in enumerate(runs.items()):
        color = f"C{i}"
        for ax, (log_key, _, _) in zip(axes, curves):
            series = [[(log["step"], log[log_key]) for log in r["log_history"] if log_key in log] for r in results]
            series = [c for c in series if c]
            if not series:
                continue
            length = min(len(c) for c in series)
            steps = np.array([s for s, _ in series[0][:length]])
            values = np.array([[v for _, v in c[:length]] for c in series])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(length)
            ax.plot(steps, mean, color=color, marker="o" if length < 20 else None, label=method)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        finals = [r[key] for r in results]
        mean, std = mean_std(finals)
        axes[-1].errorbar([i], [mean], yerr=[std], fmt="o", color=color, capsize=6, markersize=8, label=method)
        axes[-1].scatter([i] * len(finals), finals, color=color, marker="x", alpha=0.6, zorder=3)
    for ax, (_, ylabel, title) in zip(axes, curves):
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
        ax.legend(fontsize="small")
    axes[-1].set(ylabel=metric_name, title=f"Final {metric_name}")
    axes[-1].set_xticks(range(len(runs)), [m.split()[0] for m in runs])
    for ax in axes:
        ax.grid(alpha=0.3)
    n_seeds = len(next(iter(runs.values())))
    fig.suptitle(
        f"{recipe} recipe, AdamW vs SAM vs VASSO vs eVASSO\nmean ± std over {n_seeds} seeds "
        "(bands, error bars; x: single seeds)"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    recipe_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, recipe_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="vit", help="Which recipe to compare on.")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=DEFAULT_SEEDS,
        help="Seeds, the same for every method (default: %(default)s).",
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Settings to run.")
    parser.add_argument("--output_dir", default=None, help="Where to write (default: compare-<recipe>).")
    parser.add_argument("--quick", action="store_true", help="Tiny model, 2 steps, 2 seeds: checks the pipeline.")
    args = parser.parse_args(argv)
    embedded_data.require("matplotlib", "compare.py's plot")  # now, not after the last run
    if args.quick and args.seeds == parser.get_default("seeds"):
        args.seeds = [0, 1]
    output_dir = args.output_dir or f"compare-{args.recipe}"
    file, key, metric_name, higher_better, default_args, quick_args = RECIPES[args.recipe]
    recipe = importlib.import_module(file[:-3])  # the recipes sit next to this file, on sys.path
    base_args = (quick_args if args.quick else default_args) + recipe_args

    runs: dict[str, list[dict]] = {}
    todo = [(method, seed) for method in args.methods for seed in args.seeds]
    for k, (method, seed) in enumerate(todo, 1):
        run_dir = os.path.join(output_dir, method.split()[0], f"seed{seed}")
        print(f"\n===== run {k} of {len(todo)}: {method} seed {seed} -> {run_dir}", flush=True)
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
    plot(runs, os.path.join(output_dir, "curves.png"), key, metric_name, args.recipe)
    print("\n".join(lines))
    print(f"Wrote {output_dir}/results.md, results.csv and curves.png")
    return rows


if __name__ == "__main__":
    main()
