"""`benchmarks/bookkeeping.py --quick` writes complete, consistent results (never a timing assertion: CPU timings are
noise). What it counts by construction (streamed passes, allocated bytes) is checked against the official operations,
whose counts are known: 14 passes a step, the EMA and e_w kept (2x the weights)."""

import json

import pytest
import torch
from helpers import assert_provenance, run_quick

WORKLOADS = {"LoRA r=8, 24-layer tiny Llama", "full tiny Llama", "ViT-Base size"}
EXPECTED = {
    # (dtype, geometry) -> implementations: the official code has no ASAM; SAM's foreach path is fp32 only
    ("fp32", "plain"): {"VASSO", "official ops", "SAM", "SAM foreach"},
    ("bf16", "plain"): {"VASSO", "official ops", "SAM"},
    ("fp32", "ASAM"): {"VASSO", "SAM", "SAM foreach"},
    ("bf16", "ASAM"): {"VASSO", "SAM"},
}


@pytest.mark.parametrize("accelerator, passes", [(False, 0), (True, 2)])
def test_pass_counter_streams_masked_fill_as_the_device_does(accelerator, passes):
    """A `masked_fill_` whose 0-d mask is not set writes nothing on a CPU; a GPU's kernel reads and writes the whole
    tensor (`out = mask ? value : self`), so the accelerators' count has it as two passes, in the weights' elements
    also through the engine's 16-byte view of a large tensor (`ops.words`)."""
    from bookkeeping import PassCounter

    from hf_vasso.ops import words

    for t in (torch.ones(1000), torch.ones(1 << 16), torch.ones(1 << 16, dtype=torch.bfloat16)):
        with PassCounter(accelerator=accelerator, weight_bytes=t.element_size()) as counter:
            words(t).masked_fill_(torch.zeros((), dtype=torch.bool), 0)
        assert counter.elements == passes * t.numel() and counter.bytes == passes * t.numel() * t.element_size()


@pytest.mark.slow
def test_bookkeeping_quick(tmp_path):
    out = str(tmp_path)
    run_quick("benchmarks/bookkeeping.py", out)
    result = json.loads((tmp_path / "bookkeeping.json").read_text())
    assert result["command"].startswith("python benchmarks/bookkeeping.py --quick")
    rows = result["rows"]
    assert rows
    configs = {(r["workload"], r["dtype"], r["geometry"]) for r in rows}
    assert configs == {(w, d, g) for w in WORKLOADS for d, g in EXPECTED}
    for workload, dtype, geometry in configs:
        mine = [r for r in rows if (r["workload"], r["dtype"], r["geometry"]) == (workload, dtype, geometry)]
        assert {r["implementation"] for r in mine} == EXPECTED[dtype, geometry]
        assert len(mine) == len(EXPECTED[dtype, geometry])
        peers = [r for r in mine if r["implementation"] != "VASSO"]
        (named,) = {r["fastest_peer"] for r in mine}
        (fastest,) = [r for r in peers if r["implementation"] == named]
        # the least median (compared before rounding to 3 decimals: rounded medians may tie)
        assert fastest["median_ms"] == min(r["median_ms"] for r in peers)
        assert fastest["ratio_to_fastest_peer"] == 1.0  # paired with itself
        assert len({(r["tensors"], r["params_M"], r["trainable_bytes"]) for r in mine}) == 1
    checked_official = 0
    for r in rows:
        assert r["median_ms"] > 0 and r["ratio_to_fastest_peer"] > 0
        assert r["passes"] > 0 and r["bytes_streamed_x"] > 0
        if r["implementation"] == "VASSO":
            assert r["passes_accelerator"] > 0 and r["bytes_streamed_accelerator_x"] > 0
            if r["dtype"] == "fp32":  # the same ops on both branches, but the clean streams g and h: 2 passes each
                assert r["passes_accelerator"] == pytest.approx(r["passes"] + 4, abs=0.05)
        else:  # no device branch
            assert (r["passes_accelerator"], r["bytes_streamed_accelerator_x"]) == (r["passes"], r["bytes_streamed_x"])
        assert r["state_x"] >= 0 and r["peak_extra_x"] >= r["state_x"]
        assert r["state_x"] == pytest.approx(r["state_bytes"] / r["trainable_bytes"], abs=1e-3)
        assert r["peak_extra_x"] == pytest.approx(r["peak_extra_bytes"] / r["trainable_bytes"], abs=1e-3)
        assert r["peak_bound_x"] > r["state_x"]
        largest_fp32 = (r["peak_bound_x"] - r["state_x"]) * r["trainable_bytes"]  # to the rounding of the two ratios
        over = r["peak_extra_bytes"] - r["state_bytes"] - largest_fp32
        assert r["peak_over_bound_bytes"] == pytest.approx(over, abs=1e-3 * r["trainable_bytes"])
        if r["implementation"] == "VASSO" and r["geometry"] == "plain":  # each part of the step timed against its peer
            phases = r["phases_ms"]
            assert len(phases) == 4 and list(phases)[-1].startswith("pass-2 check")
            assert all(ours > 0 for ours, _ in phases.values())
            assert [official is not None for _, official in phases.values()] == [True, True, True, False]
        else:
            assert r["phases_ms"] is None
        if r["implementation"] == "VASSO":
            # The allocator's account of the state agrees with the engine's own (metric scalars aside).
            assert r["state_bytes"] == pytest.approx(r["state_bytes_reported"], rel=0.01)
        else:
            assert r["state_bytes_reported"] is None
        if r["implementation"] == "official ops":
            # mul_ 2 + add_ 3 + norm 1 + e_w = ema*scale 2 + add_ 3 + sub_ 3, all in the weights' dtype
            assert r["passes"] == pytest.approx(14, abs=0.05)
            assert r["bytes_streamed_x"] == pytest.approx(14, abs=0.05)
            assert r["state_x"] == pytest.approx(2.0, abs=0.02)  # the EMA and e_w, kept between steps
            checked_official += 1
        if r["implementation"].startswith("SAM"):
            assert r["state_x"] == pytest.approx(0.0, abs=0.02)  # the saved weights are popped in second_step
    assert checked_official == len(WORKLOADS) * 2
    md = (tmp_path / "bookkeeping.md").read_text()
    assert_provenance(md, "benchmarks/bookkeeping.py")
    assert "## Time and streamed passes" in md and "## Peak memory" in md and "## Where the time goes" in md
    # two tables of a header, a rule and one line per row; the parts table, 4 lines per plain VASSO row
    parts = 4 * sum(r["phases_ms"] is not None for r in rows)
    assert parts == 4 * len(WORKLOADS) * 2
    ops = result["ops_per_step"]
    assert [r["implementation"] for r in ops] == ["VASSO", "official ops", "SAM foreach"]
    for r in ops:  # the same count at both sizes: no op per tile or piece
        assert r["tensors"] == 40 and r["ops"][0] == r["ops"][1] > 0
    assert "## Ops a step dispatches" in md
    assert md.count("\n| ") == 2 * (2 + len(rows)) + 2 + parts + 2 + len(ops)
