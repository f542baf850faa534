"""One command for a CUDA GPU: every check and measurement that a CPU cannot make, in about 8 minutes, each step
within its own time budget, writing its results files.

1. `pytest -m gpu` (fp16 with the Trainer's real GradScaler, bf16, FSDP2 and `parallelism_config` through the
   Trainer), with the engine's hot path under `torch.cuda.set_sync_debug_mode("error")` (`tests/conftest.py`): an op
   that synchronises host and device during a step fails the test.
2. The cost benchmark on ViT-B/16 (bf16, full training) and a 1.1B-parameter Llama with LoRA and in full (bf16):
   VASSO's throughput against the plain Trainer's (target: at least 0.49x, two passes a step) and peak memory.
3. The bookkeeping benchmark on the GPU: the engine against the official VaSSO operations and pytorch_optimizer's
   foreach SAM, wall time after a synchronize, ops per step.
4. The LoRA overfitting study's GPU profile (`--profile gpu`); its runs are kept as they finish, so a step cut by
   its budget leaves a partial table (`--report-only` writes it).

    python benchmarks/gpu_checks.py              # on a machine with CUDA: about 8 minutes
    python benchmarks/gpu_checks.py --dry-run    # anywhere: the plan, and every step's command checked to parse

Writes `gpu_checks.md` (each step's status, time and output files) and each step's log under `--out`
(`benchmarks/results/gpu/`); the study writes under `studies/results/` as always.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402  (provenance of the results)

DEFAULT_OUT = os.path.join(HERE, "results", "gpu")


def steps(out: str) -> list[tuple[str, list[str], dict[str, str], int]]:
    """(name, command, extra environment, budget in seconds), in the order they run: 460 s in all."""
    py = sys.executable
    return [
        (
            "pytest -m gpu, hot path under set_sync_debug_mode('error')",
            [py, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
            {"HF_VASSO_CUDA_SYNC_DEBUG": "error"},
            100,
        ),
        (
            "cost: ViT-B/16 and a 1.1B Llama (LoRA, full), bf16, against the plain Trainer",
            [py, "benchmarks/cost.py", "--models", "vit-b16", "llama-1.1b-lora", "llama-1.1b-full"]
            + ["--rounds", "2", "--steps", "8", "--warmup", "2", "--out", out],
            {},
            140,
        ),
        (
            "bookkeeping on the GPU: against the official operations and pytorch_optimizer's foreach SAM",
            [py, "benchmarks/bookkeeping.py", "--device", "cuda", "--rounds", "10", "--out", out],
            {},
            60,
        ),
        (
            "the LoRA overfitting study's GPU profile",
            [py, "studies/lora_overfitting.py", "--profile", "gpu"],
            {},
            160,
        ),
    ]


def dry_run(out: str) -> int:
    """Print the plan and check each step's command: its script parses its arguments (`--help` of a script with the
    step's flags is not enough, so the parser itself is run on them), pytest collects the GPU tests."""
    failures = 0
    total = 0
    for name, command, _env, budget in steps(out):
        total += budget
        print(f"{budget:4d} s  {name}\n        {' '.join(command[1:])}")
        if command[1:3] == ["-m", "pytest"]:
            check = command[:3] + ["--collect-only", "-q", "tests/gpu", "-p", "no:cacheprovider"]
        else:
            check = [sys.executable, os.path.join(HERE, "gpu_checks.py"), "--parse-only", *command[1:]]
        proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=300)
        ok = proc.returncode == 0
        failures += not ok
        print(f"        {'ok' if ok else 'FAILED: ' + (proc.stdout + proc.stderr)[-500:]}")
    print(f"{total} s in all (budgets); nothing was run on a GPU.")
    return 1 if failures else 0


def parse_only(script_and_args: list[str]) -> int:
    """Import a script and run its argument parser on the given flags (no work done)."""
    import importlib.util

    script, args = script_and_args[0], script_and_args[1:]
    spec = importlib.util.spec_from_file_location("checked", os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = getattr(module, "parse_args", None)
    if parse is None:  # a script that builds its parser inside main(): ask it for --help with the flags
        return subprocess.run([sys.executable, script, *args, "--help"], cwd=REPO, capture_output=True).returncode
    parse(args)
    return 0


def run(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    rows = []
    for k, (name, command, env, budget) in enumerate(steps(out), start=1):
        log = os.path.join(out, f"step{k}.log")
        print(f"[{k}] {name} (budget {budget} s)", flush=True)
        start = time.time()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(
                    command, cwd=REPO, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, timeout=budget
                )
                status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"stopped at its {budget} s budget"
        seconds = time.time() - start
        print(f"    {status}, {seconds:.0f} s; log {log}", flush=True)
        rows.append(
            f"| {k} | {name} | {status} | {seconds:.0f} | `{' '.join(command[1:])}` | `{os.path.relpath(log, REPO)}` |"
        )
    if any("lora_overfitting" in r for r in rows):  # the study's table from whatever runs finished
        subprocess.run([sys.executable, "studies/lora_overfitting.py", "--profile", "gpu", "--report-only"], cwd=REPO)
    text = "\n".join(
        [
            "# GPU checks",
            "",
            _common.provenance_md(_common.machine(), "python benchmarks/gpu_checks.py").rstrip("\n"),
            "",
            "| step | what | status | seconds | command | log |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    _common.write_text(os.path.join(out, "gpu_checks.md"), text)
    return 0 if all("passed" in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--parse-only"]:
        return parse_only(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check each command; run nothing")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder of gpu_checks.md, the logs and the benchmarks")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args.out)
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: nothing to run. `--dry-run` prints the plan and checks each step's command.")
        return 0
    return run(args.out)


if __name__ == "__main__":
    sys.exit(main())
