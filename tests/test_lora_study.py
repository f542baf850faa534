"""The LoRA instruction-tuning study's `--quick` mode writes well-formed results (never a result is asserted)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_png, assert_provenance, needs_smollm2, read_csv, run_quick

pytestmark = [pytest.mark.slow, needs_smollm2()]


def test_lora_instruction_tuning_quick(tmp_path):
    """The LoRA study's `--quick` mode (tiny Llama, SmolLM2's tokenizer, the eg pairs): well-formed files only."""
    out = str(tmp_path)
    run_quick("studies/lora_instruction_tuning.py", out)
    result = json.load(open(os.path.join(out, "lora_instruction_tuning.json")))
    methods = {"AdamW", "AdamW, 2x steps", "SAM", "VASSO θ=0.4", "eVASSO θ=0.4 p=0.3"}
    assert set(result["chosen_rho"]) == methods and {r["method"] for r in result["runs"]} == methods
    for r in result["runs"]:
        assert r["test_loss"] > 0 and 0 <= r["exact_match"] <= 1 and r["curve"]
        assert r["passes_per_step"] == {"SAM": 2.0, "VASSO θ=0.4": 2.0}.get(r["method"], r["passes_per_step"])
        assert (r["rho"] is None) == r["method"].startswith("AdamW")
    assert {r["steps"] for r in result["runs"] if r["method"] == "AdamW, 2x steps"} == {4}
    rows = read_csv(os.path.join(out, "lora_instruction_tuning.csv"))
    assert [r["method"] for r in rows] == list(result["chosen_rho"])
    md = open(os.path.join(out, "lora_instruction_tuning.md")).read()
    assert_provenance(md, "studies/lora_instruction_tuning.py")
    assert "| VASSO θ=0.4 | 0.1 | 2.00 |" in md
    assert_png(os.path.join(out, "lora_instruction_tuning.png"))
    os.remove(os.path.join(out, "lora_instruction_tuning.md"))
    run_quick("studies/lora_instruction_tuning.py", out, "--report-only")
    assert "| AdamW |" in open(os.path.join(out, "lora_instruction_tuning.md")).read()
