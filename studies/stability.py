"""Adversary stability, the paper's mechanism: how much the adversary moves from one step to the next, SAM vs VASSO.

Every step, the `VASSO` wrapper logs `vasso/adversary_cosine`, the cosine between the successive directions d_{t-1}
and d_t. Both adversaries have norm rho, so ||eps_t - eps_{t-1}|| = rho * sqrt(2 - 2 cos). Two comparisons, both read
from the label-noise study's per-step records (`label_noise_runs.jsonl`, written by `label_noise.py`):

1. Same rho: the study's rho-sweep runs train SAM (theta 1) and VASSO (theta 0.4, 0.2) on the same data, noise, seed,
   initialisation and batch order at each rho of the grid, so the distributions compare like with like.
2. Own rho: every main run, SAM against VASSO at the same noise level and seed, each at its own swept rho.

Without a study file, the script trains the same-rho pairs itself with `label_noise.py`'s loop (`--rho`, `--noise`,
`--seed`; the study's flags such as `--epochs` pass through).

    python studies/stability.py             # a few minutes on one core
    python studies/stability.py --quick     # seconds

Writes `stability.md`, `stability.json` and `stability.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import label_noise  # studies/: this script's own folder
import torch
from label_noise import _common

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
PAIRED = ["SAM", "VASSO θ=0.4", "VASSO θ=0.2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", default=label_noise.DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rho", type=float, default=0.1, help="rho of the paired runs")
    p.add_argument("--noise", type=float, default=0.4, help="label noise of the paired runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study", default=None, help="label_noise_runs.jsonl to read (default: under --out)")
    args, rest = p.parse_known_args(argv)
    # The paired runs use the study's training setup (sizes, epochs, optimizer): its flags pass through.
    args.train = label_noise.parse_args(rest + (["--quick"] if args.quick else []))
    return args


def describe(cosines, rho):
    """Distribution of the cosine and of ||eps_t - eps_{t-1}|| = rho sqrt(2 - 2 cos)."""
    if not cosines:
        return None
    t = torch.tensor(cosines, dtype=torch.float64).clamp(-1, 1)
    move = rho * torch.sqrt(2 - 2 * t)
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    return {
        "steps": len(cosines),
        "rho": rho,
        "cos_mean": t.mean().item(),
        "cos_quantiles": dict(zip(map(str, QUANTILES), torch.quantile(t, q).tolist())),
        "move_mean": move.mean().item(),
        "move_quantiles": dict(zip(map(str, QUANTILES), torch.quantile(move, q).tolist())),
        "move_over_rho_mean": (move / rho).mean().item() if rho > 0 else None,
    }


def paired_runs(args):
    """Same-rho runs: `{rho: {method: record}}`, from the study's sweep when it has one, else trained here."""
    records = read_runs(args.study_path)
    sweep = [r for r in records if r["phase"] == "sweep" and r["method"] in PAIRED]
    if sweep:
        args.source = f"the rho sweep of `{os.path.relpath(args.study_path, _common.REPO)}`"
        r0 = sweep[0]
        args.noise, args.seed = r0["noise"], r0["seed"]
        out = {}
        for r in sweep:
            out.setdefault(r["rho"], {})[r["method"]] = r
        return dict(sorted(out.items()))
    args.source = "runs trained by this script"
    data = label_noise.make_data(args.train)
    out = {args.rho: {}}
    for method in PAIRED:
        out[args.rho][method] = label_noise.train_run(args.train, data, method, args.rho, args.seed, args.noise)
        print(f"[{time.strftime('%H:%M:%S')}] paired {method}: {out[args.rho][method]['train_seconds']:.0f}s")
    return out


def read_runs(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def study_pairs(path):
    """Per (noise, seed): SAM against each VASSO variant from the study's main runs."""
    runs = [r for r in read_runs(path) if r["phase"] == "main" and r["method"] in PAIRED]
    pairs = []
    for noise in sorted({r["noise"] for r in runs}):
        for seed in sorted({r["seed"] for r in runs}):
            by = {r["method"]: r for r in runs if r["noise"] == noise and r["seed"] == seed}
            if "SAM" not in by:
                continue
            row = {"noise": noise, "seed": seed}
            for method, r in by.items():
                row[method] = describe(r["adversary_cosine"], r["rho"])
            pairs.append(row)
    return pairs


def reduction(vasso, sam):
    return 1 - vasso["move_mean"] / sam["move_mean"] if sam and vasso and sam["move_mean"] > 0 else None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    info, cmd = _common.machine(), _common.command()
    args.study_path = args.study or os.path.join(args.out, "label_noise_runs.jsonl")
    paired = paired_runs(args)
    pairs = study_pairs(args.study_path)
    result = {
        "command": cmd,
        "machine": info,
        "paired": {
            str(rho): {m: describe(r["adversary_cosine"], rho) for m, r in runs.items()}
            for rho, runs in paired.items()
        },
        "paired_source": args.source,
        "paired_setup": {"noise": args.noise, "seed": args.seed},
        "study": pairs,
        "study_path": os.path.relpath(args.study_path, _common.REPO) if pairs else None,
    }
    _common.write_json(os.path.join(args.out, "stability.json"), result)
    write_markdown(args, result, info, cmd)
    plot(args, paired)
    print(f"wrote {args.out}/stability.md", flush=True)


def fmt_q(q):
    return " / ".join(f"{v:.3f}" for v in q.values())


def write_markdown(args, result, info, cmd):
    lines = [
        "# Adversary stability: SAM vs VASSO",
        "",
        _common.provenance_md(info, cmd),
        "‖ε_t − ε_{t−1}‖ = ρ·sqrt(2 − 2·cos), with cos the cosine between successive adversary directions "
        "(`vasso/adversary_cosine`, every step). Quantiles are 10 / 25 / 50 / 75 / 90%. Reduction: 1 − mean "
        "‖Δε‖(VASSO) / mean ‖Δε‖(SAM).",
        "",
        f"## Same ρ: SAM and VASSO on the same data, noise {args.noise:.0%}, seed {args.seed}, initialisation and "
        f"batches ({args.source})",
        "",
        "| ρ | method | steps | mean cos | cos quantiles | mean ‖Δε‖ | ‖Δε‖ quantiles | mean ‖Δε‖/ρ "
        "| reduction vs SAM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rho, stats in result["paired"].items():
        sam = stats.get("SAM")
        for method, s in stats.items():
            if s is None:
                continue
            red = reduction(s, sam) if method != "SAM" else None
            lines.append(
                f"| {rho} | {method} | {s['steps']} | {s['cos_mean']:.3f} | {fmt_q(s['cos_quantiles'])} | "
                f"{s['move_mean']:.4f} | {fmt_q(s['move_quantiles'])} | {s['move_over_rho_mean']:.3f} | "
                f"{'–' if red is None else f'{red:.1%}'} |"
            )
    lines += ["", "Plot: `stability.png` (distribution of ‖Δε‖/ρ and the cosine along training).", ""]
    if result["study"]:
        lines += [
            f"## The label-noise study's runs (`{result['study_path']}`): each method at its own swept ρ",
            "",
            "| noise | seed | SAM ρ | SAM mean ‖Δε‖ (cos) | VASSO θ=0.4 ρ | mean ‖Δε‖ (cos) | reduction | "
            "VASSO θ=0.2 ρ | mean ‖Δε‖ (cos) | reduction |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        reds = {m: [] for m in PAIRED[1:]}
        for row in result["study"]:
            cells = [f"{row['noise']:.0%}", str(row["seed"])]
            sam_s = row.get("SAM")
            for method in PAIRED:
                s = row.get(method)
                if s is None:
                    cells += ["", ""] if method == "SAM" else ["", "", ""]
                    continue
                cells += [str(s["rho"]), f"{s['move_mean']:.4f} ({s['cos_mean']:.3f})"]
                if method != "SAM":
                    red = reduction(s, sam_s)
                    reds[method].append(red)
                    cells.append(f"{red:.1%}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for method, values in reds.items():
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                lines.append(
                    f"{method}: mean reduction of ‖Δε‖ against SAM over {len(values)} (noise, seed) pairs "
                    f"{statistics.fmean(values):.1%} ± {sd:.1%}."
                )
        lines.append("")
    _common.write_text(os.path.join(args.out, "stability.md"), "\n".join(lines))


def plot(args, paired):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rho = sorted(paired)[len(paired) // 2]  # the middle of the grid
    for method, record in paired[rho].items():
        cos = record["adversary_cosine"]
        if not cos:
            continue
        move = [math.sqrt(max(0.0, 2 - 2 * c)) for c in cos]
        ax1.hist(move, bins=40, range=(0, 2), histtype="step", label=method, density=True)
        window = max(1, len(cos) // 50)
        smooth = [statistics.fmean(cos[i : i + window]) for i in range(0, len(cos), window)]
        ax2.plot([i * window for i in range(len(smooth))], smooth, label=method)
    ax1.set_xlabel("‖ε_t − ε_{t−1}‖ / ρ")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("cosine between successive adversaries")
    fig.suptitle(f"Same data, seed and ρ = {rho}; noise {args.noise:.0%}, seed {args.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "stability.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
