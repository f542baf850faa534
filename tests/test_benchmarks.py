"""The benchmarks' `--quick` modes write well-formed results (never a timing assertion: CPU timings are noise)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def run_script(name: str, out: str, *extra: str) -> None:
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", name), "--quick", "--out", out, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"


def assert_provenance(md: str, script: str) -> None:
    assert f"Command: `python benchmarks/{script} --quick" in md
    assert "Machine:" in md and "torch " in md


@pytest.fixture(scope="module")
def label_noise_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("label_noise"))
    run_script("label_noise.py", out)
    return out


def test_cost_quick(tmp_path):
    out = str(tmp_path)
    run_script("cost.py", out)
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
    assert_provenance(md, "cost.py")
    assert "| VassoTrainer VASSO θ=0.4 |" in md and "| loop pytorch_optimizer SAM |" in md


def test_label_noise_quick(label_noise_out):
    out = label_noise_out
    runs = [json.loads(line) for line in open(os.path.join(out, "label_noise_runs.jsonl"))]
    main = [r for r in runs if r["phase"] == "main"]
    sweep = [r for r in runs if r["phase"] == "sweep"]
    methods = {"AdamW", "SAM", "VASSO θ=0.4", "VASSO θ=0.2", "eVASSO p=0.3"}
    assert {r["method"] for r in main} == methods
    assert {r["method"] for r in sweep} == methods - {"AdamW"}  # AdamW has no rho
    assert all("final_test_acc" not in r and 0 <= r["val_acc_noisy_labels"] <= 1 for r in sweep)
    for r in main:
        assert 0 <= r["final_test_acc"] <= 1 and r["curve"]
        expected = {"AdamW": 1.0, "eVASSO p=0.3": None}.get(r["method"], 2.0)
        if expected is not None:
            assert r["passes_per_step"] == expected
        else:
            assert 1.0 <= r["passes_per_step"] <= 2.0
        if r["noise"] > 0:
            assert 0 <= r["final_noisy_fit"] <= 1
        if r["method"] != "AdamW":  # rho comes from the sweep's grid
            assert r["rho"] in {s["rho"] for s in sweep}
    rows = read_csv(os.path.join(out, "label_noise_summary.csv"))
    assert len(rows) == len({(r["noise"], r["method"]) for r in main})
    assert all(int(r["seeds"]) == 2 for r in rows)
    md = open(os.path.join(out, "label_noise.md")).read()
    assert_provenance(md, "label_noise.py")
    assert "Status: complete" in md and "| 40% | VASSO θ=0.4 |" in md
    assert_png(os.path.join(out, "label_noise.png"))


def test_label_noise_report_only_rebuilds_tables(label_noise_out, tmp_path):
    """`--report-only` rewrites the tables from the JSONL file without training (to collect a partial study)."""
    os.remove(os.path.join(label_noise_out, "label_noise.md"))
    run_script("label_noise.py", label_noise_out, "--report-only")
    assert "| 0% | AdamW |" in open(os.path.join(label_noise_out, "label_noise.md")).read()


def test_stability_quick(label_noise_out, tmp_path):
    out = str(tmp_path)
    run_script("stability.py", out, "--study", os.path.join(label_noise_out, "label_noise_runs.jsonl"))
    data = json.load(open(os.path.join(out, "stability.json")))
    # Same-rho pairs come from the study's sweep: one per rho of the quick grid, each with SAM and both VASSOs.
    assert set(data["paired"]) == {"0.05", "0.1"}
    for by_method in data["paired"].values():
        assert set(by_method) == {"SAM", "VASSO θ=0.4", "VASSO θ=0.2"}
        for stats in by_method.values():
            assert stats["steps"] > 0 and -1 <= stats["cos_mean"] <= 1
            assert 0 <= stats["move_mean"] <= 2 * stats["rho"] + 1e-9
            q = list(stats["move_quantiles"].values())
            assert q == sorted(q)
    assert data["study"] and all("SAM" in row for row in data["study"])
    md = open(os.path.join(out, "stability.md")).read()
    assert_provenance(md, "stability.py")
    assert "reduction vs SAM" in md and "each method at its own swept ρ" in md
    assert_png(os.path.join(out, "stability.png"))


def test_stability_quick_without_study_trains_its_own_pair(tmp_path):
    out = str(tmp_path)
    run_script("stability.py", out, "--study", os.path.join(out, "missing.jsonl"), "--rho", "0.07")
    data = json.load(open(os.path.join(out, "stability.json")))
    assert list(data["paired"]) == ["0.07"] and data["paired_source"] == "runs trained by this script"
    assert not data["study"]
    assert_png(os.path.join(out, "stability.png"))
