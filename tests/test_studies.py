"""The studies' `--quick` modes (label noise, adversary stability) write well-formed results on the embedded data."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_png, assert_provenance, read_csv, run_quick

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def label_noise_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("label_noise"))
    run_quick("studies/label_noise.py", out)
    return out


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
    assert_provenance(md, "studies/label_noise.py")
    assert "Status: complete" in md and "| 40% | VASSO θ=0.4 |" in md
    assert_png(os.path.join(out, "label_noise.png"))


def test_label_noise_report_only_rebuilds_tables(label_noise_out, tmp_path):
    """`--report-only` rewrites the tables from the JSONL file without training (to collect a partial study)."""
    os.remove(os.path.join(label_noise_out, "label_noise.md"))
    run_quick("studies/label_noise.py", label_noise_out, "--report-only")
    assert "| 0% | AdamW |" in open(os.path.join(label_noise_out, "label_noise.md")).read()


def test_stability_quick(label_noise_out, tmp_path):
    out = str(tmp_path)
    run_quick("studies/stability.py", out, "--study", os.path.join(label_noise_out, "label_noise_runs.jsonl"))
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
    assert_provenance(md, "studies/stability.py")
    assert "reduction vs SAM" in md and "each method at its own swept ρ" in md
    assert_png(os.path.join(out, "stability.png"))


def test_stability_quick_without_study_trains_its_own_pair(tmp_path):
    out = str(tmp_path)
    run_quick("studies/stability.py", out, "--study", os.path.join(out, "missing.jsonl"), "--rho", "0.07")
    data = json.load(open(os.path.join(out, "stability.json")))
    assert list(data["paired"]) == ["0.07"] and data["paired_source"] == "runs trained by this script"
    assert not data["study"]
    assert_png(os.path.join(out, "stability.png"))
