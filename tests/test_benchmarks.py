"""The benchmarks' `--quick` modes write well-formed results (never a timing assertion: CPU timings are noise)."""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers import assert_provenance, read_csv, run_quick

pytestmark = pytest.mark.slow


def test_cost_quick(tmp_path):
    out = str(tmp_path)
    run_quick("benchmarks/cost.py", out)
    rows = read_csv(os.path.join(out, "cost.csv"))
    variants = {r["variant"] for r in rows}
    assert {
        "Trainer (AdamW)",
        "VassoTrainer VASSO θ=0.4",
        "VassoTrainer SAM θ=1",
        "VassoTrainer eVASSO p=0.3",
    } <= variants
    assert {"loop AdamW", "loop pytorch_optimizer SAM", "loop hf_vasso VASSO θ=0.4"} <= variants
    assert {r["model"] for r in rows} == {"vit", "llama-lora"}
    for r in rows:
        assert float(r["mean_step_ms"]) > 0 and math.isfinite(float(r["ratio_to_plain"]))
        if r["variant"] in ("Trainer (AdamW)", "loop AdamW"):
            assert float(r["ratio_to_plain"]) == 1.0
        if "VASSO" in r["variant"] and "Trainer" in r["variant"] and "eVASSO" not in r["variant"]:
            assert float(r["floor"]) == 2.0 and r["meets_target"] in ("True", "False")
            assert r["verdict_ci95"] in ("yes", "no", "within noise")
        if "eVASSO" in r["variant"]:
            assert 1.0 <= float(r["floor"]) <= 2.0
            assert float(r["floor"]) == pytest.approx(1 + float(r["adversary_fraction"]))
    # VASSO keeps d (fp32) and a copy of the trainable weights: exactly twice the fp32 trainable bytes.
    for r in rows:
        if r["variant"] == "VassoTrainer VASSO θ=0.4":
            assert int(r["vasso_state_bytes"]) == 2 * int(r["trainable_param_bytes"])
    data = json.load(open(os.path.join(out, "cost.json")))
    assert data["machine"]["torch"] and data["command"].startswith("python benchmarks/cost.py")
    md = open(os.path.join(out, "cost.md")).read()
    assert_provenance(md, "benchmarks/cost.py")
    assert "| VassoTrainer VASSO θ=0.4 |" in md and "| loop pytorch_optimizer SAM |" in md


def test_the_gpu_command_plans_steps_that_parse_and_says_why_it_runs_nothing_here():
    """`benchmarks/gpu_checks.py --dry-run` checks every step's command (pytest collects the GPU tests, each script's
    parser takes its flags) within the 8-minute budget; without a GPU the command says in one line that it ran
    nothing."""
    import subprocess
    import sys

    from helpers import REPO

    script = os.path.join(REPO, "benchmarks", "gpu_checks.py")
    dry = subprocess.run([sys.executable, script, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.count("        ok") == 4 and "nothing was run on a GPU" in dry.stdout
    total = int(dry.stdout.rsplit(" s in all", 1)[0].split()[-1])
    assert total <= 8 * 60
    for what in ("pytest -q -m gpu", "benchmarks/cost.py", "benchmarks/bookkeeping.py", "studies/lora_overfitting.py"):
        assert what in dry.stdout
    import torch

    if not torch.cuda.is_available():  # with a GPU this would run the whole 8 minutes
        here = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert here.returncode == 0 and here.stdout.startswith("No CUDA GPU here: nothing to run.")
