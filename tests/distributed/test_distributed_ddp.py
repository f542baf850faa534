"""VassoTrainer under DDP: 2 CPU processes (gloo) launched with `accelerate launch` or `torchrun`.

Every test starts the worker (`ddp_worker.py`) in fresh processes with a timeout, then compares what the ranks wrote.
Run with `pytest -m distributed tests/distributed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_launch import accelerate_launch, accelerate_launch_multi_node, load, python, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

WORKER = "ddp_worker.py"


def _ranks(out: Path, scenario: str, world: int = 2) -> list[dict]:
    return [load(out / f"{scenario}_rank{r}.pt") for r in range(world)]


def _assert_ranks_identical(run0: dict, run1: dict) -> None:
    assert len(run0["steps"]) == len(run1["steps"]) > 0
    for s0, s1 in zip(run0["steps"], run1["steps"]):
        assert s0["step"] == s1["step"]
        assert torch.equal(s0["params"], s1["params"]), f"{run0['name']}: ranks differ after step {s0['step']}"
    assert torch.equal(run0["final_params"], run1["final_params"])


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> dict:
    """One plain process, one micro-batch of the 16 samples that 2 ranks x 4 samples x 2 micro-batches see."""
    out = tmp_path_factory.mktemp("single")
    python(WORKER, "single", str(out))
    (single,) = (r["single"] for r in _ranks(out, "single", world=1))
    assert single["world_size"] == 1 and len(single["steps"]) == 6
    # The comparisons below can fail: the weights move by far more than their tolerance.
    assert (single["final_params"] - single["steps"][0]["params"]).abs().max() > 1e-2
    return single


def _assert_synced_run_equals_single_process(out: Path, single: dict) -> None:
    r0, r1 = (r["synced"] for r in _ranks(out, "synced"))
    assert r0["world_size"] == r1["world_size"] == 2
    _assert_ranks_identical(r0, r1)
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert torch.equal(s0["d"], s1["d"]), f"d differs between ranks at step {s0['step']}"
        assert s0["allreduces"] == 2, "a synced VASSO step all-reduces twice (pass 1 and pass 2)"
    assert len(r0["steps"]) == len(single["steps"])
    for dist_step, ref in zip(r0["steps"], single["steps"]):
        torch.testing.assert_close(dist_step["params"], ref["params"], rtol=0, atol=2e-5)
        torch.testing.assert_close(dist_step["d"], ref["d"], rtol=0, atol=2e-5)


def test_synced_adversary_equals_single_process_with_global_batch(tmp_path, single_process_reference):
    # 2 ranks x 4 samples x 2 accumulation micro-batches, through `accelerate launch` with the shipped DDP config.
    accelerate_launch("recipes/accelerate_configs/multi_gpu.yaml", WORKER, "synced", str(tmp_path))
    _assert_synced_run_equals_single_process(tmp_path, single_process_reference)


def test_multi_node_config_two_machines_on_localhost(tmp_path, single_process_reference):
    # The shipped multi-node config, two "machines" (one launcher and one process each) rendezvousing on localhost.
    accelerate_launch_multi_node("recipes/accelerate_configs/multi_node.yaml", WORKER, "synced", str(tmp_path))
    _assert_synced_run_equals_single_process(tmp_path, single_process_reference)


def test_per_rank_adversary_keeps_replicas_identical(tmp_path):
    torchrun(WORKER, "per_rank", str(tmp_path))
    r0, r1 = (r["per_rank"] for r in _ranks(tmp_path, "per_rank"))
    _assert_ranks_identical(r0, r1)
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        # Each rank folds only its own pass-1 gradient into d: the adversaries differ.
        assert not torch.allclose(s0["d"], s1["d"], atol=1e-4), f"d is shared at step {s0['step']}"
    assert not torch.allclose(r0["final_d"], r1["final_d"], atol=1e-4)


def test_allreduces_per_optimizer_step(tmp_path):
    torchrun(WORKER, "count", str(tmp_path))
    for rank, results in enumerate(_ranks(tmp_path, "count")):
        for ga in (1, 2):
            counts = {
                kind: [s["allreduces"] for s in results[f"{kind}_ga{ga}"]["steps"]]
                for kind in ("plain", "synced", "per_rank")
            }
            plain = counts["plain"]
            assert plain == [1] * 3, f"rank {rank}, accumulation {ga}: plain Trainer all-reduces {plain}"
            assert counts["synced"] == [p + 1 for p in plain], f"rank {rank}, accumulation {ga}: {counts}"
            assert counts["per_rank"] == plain, f"rank {rank}, accumulation {ga}: {counts}"
            # Both passes run over every micro-batch: 2 forwards per micro-batch and step.
            for kind in ("synced", "per_rank"):
                assert [s["forwards"] for s in results[f"{kind}_ga{ga}"]["steps"]] == [2 * ga] * 3
    for ga in (1, 2):
        for kind in ("plain", "synced", "per_rank"):
            r0, r1 = (r[f"{kind}_ga{ga}"] for r in _ranks(tmp_path, "count"))
            _assert_ranks_identical(r0, r1)


def test_evasso_with_accumulation_same_coins_on_all_ranks(tmp_path):
    torchrun(WORKER, "evasso", str(tmp_path))  # a rank-local coin would deadlock here: the timeout catches it
    for name in ("evasso_sync1", "evasso_sync0"):
        r0, r1 = (r[name] for r in _ranks(tmp_path, "evasso"))
        assert len(r0["steps"]) == 8
        coins0 = [s["coin"] for s in r0["steps"]]
        assert coins0 == [s["coin"] for s in r1["steps"]]
        assert 0 < sum(coins0) < len(coins0), f"seed 0 should give both kinds of step, got {coins0}"
        # What each rank actually ran: 2 micro-batches x (1 pass, or 2 on adversary steps).
        for run in (r0, r1):
            assert [s["forwards"] for s in run["steps"]] == [2 * (1 + c) for c in coins0]
        synced = name == "evasso_sync1"
        # Synced: pass 1 always all-reduces, pass 2 once more. Per rank: exactly one all-reduce per step.
        expected = [1 + c for c in coins0] if synced else [1] * len(coins0)
        assert [s["allreduces"] for s in r0["steps"]] == expected
        _assert_ranks_identical(r0, r1)


def test_resume_from_two_rank_checkpoint_is_bit_exact(tmp_path):
    torchrun(WORKER, "resume_full", str(tmp_path))
    for sync, state_files in ((1, ["vasso_state.pt"]), (0, ["vasso_state_rank0.pt", "vasso_state_rank1.pt"])):
        checkpoint = tmp_path / f"run_sync{sync}" / "checkpoint-3"
        assert sorted(p.name for p in checkpoint.glob("vasso_state*.pt")) == state_files
    torchrun(WORKER, "resume_continue", str(tmp_path))
    full, resumed = _ranks(tmp_path, "resume_full"), _ranks(tmp_path, "resume_continue")
    for sync in (1, 0):
        name = f"sync{sync}"
        for rank in range(2):
            a, b = full[rank][name], resumed[rank][name]
            assert [s["step"] for s in b["steps"]] == [4, 5, 6]
            for s_full, s_resumed in zip(a["steps"][3:], b["steps"]):
                assert torch.equal(s_full["params"], s_resumed["params"]), f"{name} rank {rank} step {s_full['step']}"
                assert torch.equal(s_full["d"], s_resumed["d"]), f"{name} rank {rank} step {s_full['step']}"
                assert s_full["vasso_step"] == s_resumed["vasso_step"]
            assert torch.equal(a["final_params"], b["final_params"])
            assert torch.equal(a["final_d"], b["final_d"])
        if not sync:  # per-rank adversaries: each rank must have got its own d back
            assert not torch.equal(resumed[0][name]["final_d"], resumed[1][name]["final_d"])
