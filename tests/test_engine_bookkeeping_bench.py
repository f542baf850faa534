"""`benchmarks/bookkeeping.py --quick` writes well-formed results (shape only: CPU timings are noise)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bookkeeping_quick(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bookkeeping.py"), "--quick", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bookkeeping.json").read_text())
    assert result["command"].startswith("python benchmarks/bookkeeping.py --quick")
    rows = result["rows"]
    workloads = {r["workload"] for r in rows}
    assert workloads == {"LoRA r=8, 24-layer tiny Llama", "full tiny Llama", "ViT-Base size"}
    for workload in workloads:
        names = {r["implementation"] for r in rows if r["workload"] == workload}
        assert names == {"VassoUpdate", "VASSO", "SAM", "SAM foreach"}
    for r in rows:
        assert r["median_ms"] > 0 and r["ratio_to_fastest_peer"] > 0 and r["peak_extra_memory_x"] >= 0
        assert r["fastest_peer"] in ("SAM", "SAM foreach")
    md = (tmp_path / "bookkeeping.md").read_text()
    assert "Command: `python benchmarks/bookkeeping.py --quick" in md
    assert md.count("\n| ") == 2 + len(rows)  # header, rule, one row per (workload, implementation)
