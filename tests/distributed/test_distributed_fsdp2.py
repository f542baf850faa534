"""The shared VASSO update on FSDP2 (`fully_shard`) shards, 2 CPU processes with gloo.

The Trainer cannot drive FSDP on CPU (`use_cpu=True` falls back to DDP), so the worker drives the passes by hand on
raw `fully_shard` parameters and checks every quantity against an unsharded copy of the model (see `fsdp2_worker.py`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_fsdp2_global_norm_perturbation_and_exact_restore(tmp_path):
    torchrun("fsdp2_worker.py", str(tmp_path))
    report = json.loads((tmp_path / "fsdp2_ok.json").read_text())
    assert report["world_size"] == 2 and len(report["steps"]) == 3
    assert report["dcp_round_trip_steps"] == 2
    for step in report["steps"]:
        assert step["d_norm_sharded"] == pytest.approx(step["d_norm"], rel=1e-5)
        assert step["eps_norm"] == pytest.approx(0.05, rel=1e-5)
    assert sorted(p.name for p in tmp_path.glob("vasso_state_rank*.pt")) == [
        "vasso_state_rank0.pt",
        "vasso_state_rank1.pt",
    ]
