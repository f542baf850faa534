"""The shared VASSO update on every DTensor layout of torch's N-D parallelism: tensor parallelism, FSDP2 x TP and
HSDP (4 CPU processes, gloo), each with plain and adaptive geometry and per-group rho, against one process on the
whole batch; a per-rank checkpoint resumes bit for bit; every placement pair (context-parallel replication included)
counts each element once; Partial layouts are refused by name. One launch runs every case (see
`layouts_worker.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_layouts_match_one_process_and_resume_bit_exact(tmp_path):
    torchrun("layouts_worker.py", str(tmp_path), nproc=4)
    report = json.loads((tmp_path / "layouts.json").read_text())
    expected = {
        f"{layout}/{case}" for layout in ("tp", "fsdp2_tp", "hsdp") for case in ("plain", "adaptive", "plain-sam")
    }
    assert set(report["cases"]) == expected
    for name, case in report["cases"].items():
        assert len(case["metrics"]) == 3 and case["resume_exact"], name
        assert case["fresh_differs"] == (not name.endswith("-sam")), name  # theta < 1: d carries the past
        # The cosine exists with one rho and eps ∝ d (the theta = 1 case, through <g, d> summed over ranks).
        assert ("vasso/adversary_cosine" in case["metrics"][-1]) == name.endswith("plain-sam"), name
    assert len(report["placements"]["placements"]) == 8
    assert sorted(p.name for p in tmp_path.glob("tp-plain-rank*.pt")) == [f"tp-plain-rank{r}.pt" for r in range(4)]
    refusals = report["refusals"]
    assert "Partial" in refusals["partial_gradient"] and "layer.weight" in refusals["partial_gradient"]
    assert "P(sum)" in refusals["partial_parameter"] and "layer.bias" in refusals["partial_parameter"]
