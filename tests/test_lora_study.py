"""The LoRA studies (instruction tuning; overfitting): their `--quick` modes write well-formed results (never a result
is asserted), and the overfitting study's own pieces (the corruption, the best-epoch weights) do what they say."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, assert_png, assert_provenance, needs_smollm2, read_csv, reference_coin, run_quick


def expected_passes(seed: int, steps: int, adversary_prob: float) -> float:
    """Forward+backward passes per step of `steps` optimizer steps seeded `seed`: 1 + the fraction of steps whose
    eVASSO coin (`reference_coin`, the specification) says "move" (2.0 for SAM/VASSO, 1.0 for AdamW)."""
    return 1.0 + sum(reference_coin(seed, t, adversary_prob) for t in range(steps)) / steps


@pytest.mark.slow
@needs_smollm2()
def test_lora_instruction_tuning_quick(tmp_path):
    """The LoRA study's `--quick` mode (tiny Llama, SmolLM2's tokenizer, the eg pairs): well-formed files only."""
    out = str(tmp_path)
    run_quick("studies/lora_instruction_tuning.py", out)
    result = json.load(open(os.path.join(out, "lora_instruction_tuning.json")))
    methods = {"AdamW", "AdamW, 2x steps", "SAM", "VASSO θ=0.4", "eVASSO θ=0.4 p=0.3"}
    assert set(result["chosen_rho"]) == methods and {r["method"] for r in result["runs"]} == methods
    probs = {"AdamW": 0.0, "AdamW, 2x steps": 0.0, "SAM": 1.0, "VASSO θ=0.4": 1.0, "eVASSO θ=0.4 p=0.3": 0.3}
    assert result["runs"]
    for r in result["runs"]:
        assert r["test_loss"] > 0 and 0 <= r["exact_match"] <= 1 and r["curve"]
        # measured passes = what the coins of (seed, step) dictate: 1 for AdamW, 2 for SAM/VASSO, between for eVASSO
        assert r["passes_per_step"] == expected_passes(r["seed"], r["steps"], probs[r["method"]])
        assert 1.0 <= r["passes_per_step"] <= 2.0
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


def overfitting_study():
    """The study script as a module (it puts `studies/` on the path for its own imports)."""
    spec = importlib.util.spec_from_file_location(
        "lora_overfitting", os.path.join(REPO, "studies/lora_overfitting.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corruption_moves_responses_along_a_cycle_of_the_chosen_pairs():
    """30% of the pairs get another chosen pair's response (none keeps its own), the rest are untouched; the draw is a
    function of the seed."""
    from datasets import Dataset

    study = overfitting_study()
    train = Dataset.from_dict(
        {"instruction": [f"task {i}" for i in range(20)], "response": [f"cmd {i}" for i in range(20)]}
    )
    wrong, chosen = study.corrupt(train, 0.3, seed=0)
    assert len(chosen) == 6
    for i, (before, after) in enumerate(zip(train["response"], wrong["response"])):
        assert (before != after) == (i in chosen)
    assert sorted(wrong["response"][i] for i in chosen) == sorted(train["response"][i] for i in chosen)
    assert wrong["instruction"] == train["instruction"]
    assert study.corrupt(train, 0.3, seed=0)[0]["response"] == wrong["response"]
    assert study.corrupt(train, 0.3, seed=1)[0]["response"] != wrong["response"]
    assert study.corrupt(train, 0.0, seed=0) == (train, [])


def test_a_claim_belongs_to_one_live_process(tmp_path):
    """A run is claimed once: by this process (again), not while another live process holds it (or is writing its
    claim), and taken over from a process that is gone."""
    study = overfitting_study()
    claims = str(tmp_path)
    assert study.claim(claims, "a") and study.claim(claims, "a")
    (tmp_path / "b.claim").write_text(str(os.getppid()))  # a live process
    assert not study.claim(claims, "b")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "c.claim").write_text(str(gone.pid))
    assert study.claim(claims, "c") and (tmp_path / "c.claim").read_text() == str(os.getpid())
    (tmp_path / "d.claim").write_text("")  # being written by its claimant
    assert not study.claim(claims, "d") and study.claimed_elsewhere(claims, "d")
    assert not study.claimed_elsewhere(claims, "a") and not study.claimed_elsewhere(claims, "never")


def test_keep_best_restores_the_weights_of_the_lowest_validation_loss():
    """The callback keeps the trainable weights of the best epoch (bit for bit), ignores frozen ones and the final test
    evaluations, and `restore` puts them back."""
    from types import SimpleNamespace

    study = overfitting_study()
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[1].requires_grad_(False)
    keep, snapshots = study.KeepBest(), []
    for epoch, loss in enumerate([3.0, 2.0, 2.5], start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append([p.detach().clone() for p in model.parameters()])
        keep.on_evaluate(None, SimpleNamespace(epoch=float(epoch)), None, metrics={"eval_loss": loss}, model=model)
    keep.on_evaluate(None, SimpleNamespace(epoch=3.0), None, metrics={"test_loss": 0.1}, model=model)
    assert (keep.epoch, keep.best) == (2, 2.0)
    keep.restore(model)
    restored = list(model.parameters())
    assert torch.equal(restored[0], snapshots[1][0]) and torch.equal(restored[1], snapshots[1][1])
    assert torch.equal(restored[2], snapshots[2][2])  # frozen: left as it is
    assert not torch.equal(snapshots[1][0], snapshots[2][0])  # the restore had something to undo


def test_the_rho_grid_climbs_its_ladder_while_its_top_wins():
    """seed 0's grid grows by one rung only once every rho so far is finished and the largest won; the selection and
    the table's note follow the grid, eVASSO takes VASSO θ=0.4's, and at the ladder's end the table says so."""
    study = overfitting_study()
    profile = dict(study.PROFILES["cpu"], rho_grid=(0.05, 0.2), rho_ladder=(0.5, 1.0))

    def finished(method, best):  # {rho: best validation loss} -> runs as the study writes them
        return {
            study.run_key("clean", method, rho, 0): {"rho": rho, "validation_at_selected": v}
            for rho, v in best.items()
        }

    grid = lambda runs: study.rho_grid(runs, profile, "clean", "sam")  # noqa: E731
    assert grid({}) == [0.05, 0.2]
    assert grid(finished("sam", {0.2: 1.0})) == [0.05, 0.2]  # 0.05 still running
    assert grid(finished("sam", {0.05: 1.0, 0.2: 2.0})) == [0.05, 0.2]  # the top lost: no rung
    climbing = finished("sam", {0.05: 3.0, 0.2: 2.0})
    assert grid(climbing) == [0.05, 0.2, 0.5]
    assert study.chosen_rho(climbing, profile, "clean", "sam") == 0.2
    assert study.grid_note(climbing, profile, "clean", "sam") == "{0.05, 0.2, 0.5}"
    runs = finished("sam", {0.05: 3.0, 0.2: 2.0, 0.5: 1.0, 1.0: 0.5})
    assert grid(runs) == [0.05, 0.2, 0.5, 1.0] and study.chosen_rho(runs, profile, "clean", "sam") == 1.0
    assert study.grid_note(runs, profile, "clean", "sam") == "{0.05, 0.2, 0.5, 1}: at the top, where the grid ends"
    runs = finished("vasso0.4", {0.05: 3.0, 0.2: 2.0, 0.5: 2.5})
    assert study.chosen_rho(runs, profile, "clean", "evasso") == 0.2
    assert study.grid_note(runs, profile, "clean", "evasso") == "{0.05, 0.2, 0.5} (VASSO θ=0.4)"
    grid_runs, _ = study.the_plan(profile, runs)
    assert [r for c, m, r, _ in grid_runs if (c, m) == ("clean", "vasso0.4")] == [0.05, 0.2, 0.5]


@pytest.mark.slow
@needs_smollm2()
def test_lora_overfitting_quick(tmp_path):
    """The overfitting study's `--quick` mode: every run of the plan written, passes as the coins dictate, the selected
    epoch is the validation minimum, finished runs are skipped, `--report-only` reports a partial study as partial."""
    study = overfitting_study()
    out = str(tmp_path)
    # Two processes share the plan through their claims: each run is trained by one of them, and both work.
    cmd = [sys.executable, os.path.join(REPO, "studies/lora_overfitting.py"), "--quick", "--out", out]
    cmd += ["--work_dir", str(tmp_path / "work")]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one core each, as the study's docstring advises
    workers = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    for w in workers:
        log = w.communicate(timeout=900)[0]
        assert w.returncode == 0, log[-3000:]
    (claims,) = glob.glob(str(tmp_path / "work" / "claims-*"))
    claimants = [open(p).read() for p in glob.glob(os.path.join(claims, "*.claim"))]
    assert len(claimants) == 23 and set(claimants) == {str(w.pid) for w in workers}
    paths = sorted(glob.glob(os.path.join(out, "lora_overfitting_quick", "*.json")))
    runs = [json.load(open(p)) for p in paths]
    grid, seeds = study.the_plan(study.PROFILES["quick"], {})
    assert len(runs) == len(grid) + len(seeds) == 23  # eVASSO runs no grid: it takes VASSO θ=0.4's rho
    assert {(r["condition"], r["method"]) for r in runs} == {
        (c, m) for m, (_, _, conditions) in study.METHODS.items() for c in conditions
    }
    probs = {"adamw": 0.0, "sam": 1.0, "vasso0.4": 1.0, "vasso0.2": 1.0, "evasso": 0.3}
    chosen = {}
    for r in runs:
        assert r["passes_per_step"] == expected_passes(r["seed"], r["steps"], probs[r["method"]])
        assert r["steps"] == 4 and r["wrong_pairs"] == {"clean": 0, "wrong30": 2}[r["condition"]]
        curve = r["validation_curve"]
        assert len(curve) == len(r["train_curve"]) == r["epochs"] == 2
        assert r["validation_at_selected"] == min(curve) and r["selected_epoch"] == curve.index(min(curve)) + 1
        assert r["test_at_selected"] > 0 and r["test_at_last"] > 0
        if r["selected_epoch"] == r["epochs"]:  # the restored weights are the last ones: the same test loss exactly
            assert r["test_at_selected"] == r["test_at_last"]
        if r["seed"] == 0 and r["rho"] is not None and r["method"] != "evasso":
            best = chosen.get((r["condition"], r["method"]))
            if best is None or r["validation_at_selected"] < best[0]:
                chosen[(r["condition"], r["method"])] = (r["validation_at_selected"], r["rho"])
    later = [r for r in runs if r["seed"] == 1 or r["method"] == "evasso"]
    assert len(later) == 9 + 2 and {r["method"] for r in later if r["rho"] is None} == {"adamw"}
    for r in later:
        if r["rho"] is not None:
            assert r["rho"] == chosen[(r["condition"], study.RHO_FROM.get(r["method"], r["method"]))][1]
    md = open(os.path.join(out, "lora_overfitting_quick.md")).read()
    assert_provenance(md, "studies/lora_overfitting.py")
    assert "Status: complete; 23 of the plan's 23 runs done." in md and "| 30% wrong responses | VASSO θ=0.2 |" in md
    assert_png(os.path.join(out, "lora_overfitting_quick.png"))

    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    run_quick("studies/lora_overfitting.py", out)  # every run is there: nothing is trained again
    assert {p: os.stat(p).st_mtime_ns for p in paths} == stamps
    os.remove(paths[-1])
    run_quick("studies/lora_overfitting.py", out, "--report-only")
    md = open(os.path.join(out, "lora_overfitting_quick.md")).read()
    assert "Status: PARTIAL" in md and "22 of the plan's 23 runs done." in md
