"""Crash and resume: SIGKILL a `VassoTrainer` run at random points, also while a checkpoint is being written, resume
it, and compare the final weights with an uninterrupted run, bit for bit.

The run: a small `ViTForImageClassification`, the ViT recipe's own model class (which transformers saves under
converted key names, so a resume must load them through the conversion), on random 8x8 images; eVASSO (p = 0.5, so
the coin stream must survive the restart), gradient accumulation 2, a shuffled data order, a checkpoint every 10 of
200 optimizer steps. Each training process is
a fresh Python process (`--worker`) that uses `VassoTrainer` through its public API only: it resumes from the newest
checkpoint that `train(resume_from_checkpoint=...)` accepts, and moves to the next older one when a checkpoint is
refused before training starts (a kill during a checkpoint write leaves one incomplete). The driver kills a process
either at a uniformly random time of its training, or a random fraction of a checkpoint write after the worker says
a write begins; after each kill it looks at the newest checkpoint folder to tell whether the write was cut short.

    python studies/crash_resume.py --minutes 10   # the campaign: writes studies/results/crash_resume.{md,json}
    python studies/crash_resume.py --quick        # two short chains (what tests/test_fault_injection.py runs)

A chain is one training run from scratch to the end, through its kills and resumes; it is bit-exact when every final
weight equals the uninterrupted run's (`torch.equal`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import _common  # noqa: E402  (the provenance helpers the benchmarks use)

MAX_STEPS, SAVE_STEPS = 200, 10
START_TIMEOUT_S = 300  # a worker's imports on a loaded 2-core machine can take a while


# ---------------------------------------------------------------------------------------------------- the worker


def worker(run_dir: str) -> None:
    """Train to the end, resuming from the newest checkpoint that loads. Prints markers the driver reads."""
    import torch
    from datasets import Dataset
    from helpers import make_args, small_vit
    from transformers import TrainerCallback

    from hf_vasso import VassoTrainer

    def say(*words) -> None:
        print(*words, flush=True)

    class Markers(TrainerCallback):
        started = False

        def __init__(self, checkpoint: str | None) -> None:
            self.checkpoint = checkpoint

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = True  # the checkpoint has loaded
            if self.checkpoint is not None:
                say("RESUMED", os.path.basename(self.checkpoint))
            say("BEGIN", state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:  # set by the Trainer's flow callback, which runs first
                say("SAVE", state.global_step)

        def on_save(self, args, state, control, **kwargs):
            say("SAVED", state.global_step)

    def checkpoints() -> list[str]:
        names = [n for n in os.listdir(run_dir) if n.startswith("checkpoint-")] if os.path.isdir(run_dir) else []
        return [os.path.join(run_dir, n) for n in sorted(names, key=lambda n: -int(n.split("-")[1]))]

    g = torch.Generator().manual_seed(1)
    images = {"pixel_values": torch.randn(80, 1, 8, 8, generator=g).tolist(), "labels": list(range(4)) * 20}
    dataset = Dataset.from_dict(images).with_format("torch")
    for candidate in checkpoints() + [None]:
        torch.manual_seed(0)
        args = make_args(
            run_dir,
            max_steps=MAX_STEPS,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            adversary_prob=0.5,
            save_strategy="steps",
            save_steps=SAVE_STEPS,
            logging_steps=5,
        )
        markers = Markers(candidate)
        model = small_vit(image_size=8, patch_size=4, hidden=64, layers=2, heads=4, num_labels=4)
        trainer = VassoTrainer(model=model, args=args, train_dataset=dataset, callbacks=[markers])
        try:
            trainer.train(resume_from_checkpoint=candidate)
        except Exception as e:
            if markers.started:  # a failure during training is a bug, not a refused checkpoint
                raise
            say("REFUSED", os.path.basename(candidate or "none"), type(e).__name__)
            continue
        break
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(state, os.path.join(run_dir, "final.pt.tmp"))
    os.replace(os.path.join(run_dir, "final.pt.tmp"), os.path.join(run_dir, "final.pt"))
    say("DONE", trainer.state.global_step)


# ---------------------------------------------------------------------------------------------------- the driver


class Worker:
    """One worker process and a thread that timestamps its output lines."""

    def __init__(self, run_dir: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", run_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put((time.monotonic(), line.split()))
        self.lines.put((time.monotonic(), ["EOF"]))

    def wait_for(self, marker: str, timeout: float = START_TIMEOUT_S) -> tuple[float, list[str]] | None:
        """The next line starting with `marker`, or None when the process ended first."""
        deadline = time.monotonic() + timeout
        while True:
            t, words = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if words[:1] == [marker]:
                return t, words
            if words[:1] == ["EOF"]:
                self.lines.put((t, words))
                return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def finish(self, timeout: float = START_TIMEOUT_S) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.wait_for("EOF", timeout=30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker failed ({self.proc.returncode}):\n{''.join(self.output)[-4000:]}")

    def markers(self, name: str) -> list[list[str]]:
        return [line.split() for line in self.output if line.startswith(name)]


def incomplete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders without a readable `trainer_state.json`, which the Trainer writes last."""
    bad = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("checkpoint-"):
            try:
                with open(os.path.join(run_dir, name, "trainer_state.json")) as f:
                    json.load(f)
            except (OSError, ValueError):
                bad.append(name)
    return bad


def uninterrupted(work: str) -> dict:
    """The reference run, timed: how long training takes and how long a checkpoint write takes."""
    run_dir = os.path.join(work, "reference")
    w = Worker(run_dir)
    begin = w.wait_for("BEGIN")[0]
    saves, windows = {}, []
    while True:
        t, words = w.lines.get(timeout=START_TIMEOUT_S)
        if words[:1] == ["SAVE"]:
            saves[words[1]] = t
        elif words[:1] == ["SAVED"]:
            windows.append(t - saves[words[1]])
        elif words[:1] in (["DONE"], ["EOF"]):
            break
    end = t
    w.finish()
    return {"dir": run_dir, "train_s": end - begin, "save_window_s": sorted(windows)[len(windows) // 2]}


def same_weights(a: str, b: str) -> bool:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def chain(work: str, name: str, kinds: list[str], reference: dict, rng: random.Random, until_mid_write=False) -> dict:
    """One run from scratch to the end, killed once for each entry of `kinds` ('random' or 'save').

    `until_mid_write`: repeat 'save' kills until one leaves an incomplete checkpoint (at most 8 tries)."""
    run_dir = os.path.join(work, name)
    record = {"name": name, "kills": [], "refused": 0, "resumes": 0}
    kinds = list(kinds)
    while kinds:
        kind = kinds.pop(0)
        before = set(incomplete_checkpoints(run_dir)) if os.path.isdir(run_dir) else set()
        w = Worker(run_dir)
        begun = w.wait_for("BEGIN")
        if begun is None:
            w.finish()
            break
        if kind == "random":  # a uniform time within what is left of the training
            time.sleep(rng.uniform(0, reference["train_s"] * (1 - int(begun[1][1]) / MAX_STEPS)))
        else:
            remaining = (MAX_STEPS - int(begun[1][1])) // SAVE_STEPS
            for _ in range(rng.randint(1, max(remaining, 1))):
                if w.wait_for("SAVE") is None:
                    break
            time.sleep(rng.uniform(0, reference["save_window_s"]))
        alive = w.proc.poll() is None
        w.kill()
        record["refused"] += len(w.markers("REFUSED"))
        record["resumes"] += len(w.markers("RESUMED"))
        if not alive or w.markers("DONE"):
            record["kills"].append({"kind": kind, "landed": False})
            continue
        mid_write = bool(set(incomplete_checkpoints(run_dir)) - before)
        record["kills"].append({"kind": kind, "landed": True, "mid_write": mid_write})
        if (
            until_mid_write
            and kind == "save"
            and not mid_write
            and sum(k["kind"] == "save" for k in record["kills"]) < 8
        ):
            kinds.insert(0, "save")
    w = Worker(run_dir)
    w.finish()
    record["refused"] += len(w.markers("REFUSED"))
    record["resumes"] += len(w.markers("RESUMED"))
    record["bit_exact"] = same_weights(os.path.join(run_dir, "final.pt"), os.path.join(reference["dir"], "final.pt"))
    return record


def summarize(chains: list[dict], reference: dict) -> dict:
    kills = [k for c in chains for k in c["kills"] if k["landed"]]
    return {
        "chains": len(chains),
        "bit_exact_chains": sum(c["bit_exact"] for c in chains),
        "kills": len(kills),
        "kills_mid_write": sum(k["mid_write"] for k in kills),
        "kills_random": sum(k["kind"] == "random" for k in kills),
        "kills_missed": sum(not k["landed"] for c in chains for k in c["kills"]),
        "resumes_from_checkpoint": sum(c["resumes"] for c in chains),
        "incomplete_checkpoints_refused": sum(c["refused"] for c in chains),
        "reference_train_s": round(reference["train_s"], 2),
        "reference_save_window_ms": round(1000 * reference["save_window_s"], 1),
    }


def campaign(work: str, *, minutes: float | None = None, quick: bool = False, seed: int = 0) -> dict:
    """Chains until the time is up (or the two quick chains); returns the summary and every chain's record."""
    rng = random.Random(seed)
    reference = uninterrupted(work)
    control = chain(work, "control", [], reference, rng)  # an uninterrupted rerun: the run is deterministic
    if not control["bit_exact"]:
        raise RuntimeError("two uninterrupted runs differ: the comparison would mean nothing")
    chains = []
    if quick:
        chains.append(chain(work, "chain0", ["save"], reference, rng, until_mid_write=True))
        chains.append(chain(work, "chain1", ["random", "random"], reference, rng))
    else:
        deadline = time.monotonic() + 60 * minutes
        while time.monotonic() < deadline:
            kinds = [rng.choice(["random", "save"]) for _ in range(rng.randint(1, 3))]
            chains.append(chain(work, f"chain{len(chains)}", kinds, reference, rng))
            print(f"[{time.strftime('%H:%M:%S')}] {json.dumps(chains[-1])}", flush=True)
    return {"summary": summarize(chains, reference), "chains": chains}


def write_results(out: str, result: dict, info: dict, cmd: str) -> None:
    os.makedirs(out, exist_ok=True)
    _common.write_json(os.path.join(out, "crash_resume.json"), {"command": cmd, "machine": info, **result})
    s = result["summary"]
    lines = [
        "# Crash and resume: SIGKILL at random points, then resume",
        "",
        _common.provenance_md(info, cmd),
        f"Run: a small ViTForImageClassification (the ViT recipe's model class, saved by transformers under converted "
        f"names) on random 8x8 images, eVASSO p = 0.5, gradient accumulation 2, shuffled data, "
        f"{MAX_STEPS} optimizer steps, a checkpoint every {SAVE_STEPS}; each process is killed with SIGKILL at a "
        f"random time of its training or a random fraction of a checkpoint write (median write "
        f"{s['reference_save_window_ms']} ms; training {s['reference_train_s']} s uninterrupted), then restarted; a "
        "restarted process resumes from the newest checkpoint that `train(resume_from_checkpoint=...)` accepts.",
        "",
        "| chains | bit-exact chains | kills | of them mid-write (a checkpoint left incomplete) "
        "| processes that resumed from a checkpoint | incomplete checkpoints refused at resume |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {s['chains']} | **{s['bit_exact_chains']}** | {s['kills']} | {s['kills_mid_write']} "
        f"| {s['resumes_from_checkpoint']} | {s['incomplete_checkpoints_refused']} |",
        "",
        f"Bit-exact: every final weight `torch.equal` to the uninterrupted run's. Kills that came after the process "
        f"had already finished are not counted ({s['kills_missed']}); the next process of the chain then resumes "
        "from the final checkpoint and has nothing left to train, and one after a kill before the first checkpoint "
        "starts afresh. Per-chain records: `crash_resume.json`.",
        "",
    ]
    _common.write_text(os.path.join(out, "crash_resume.md"), "\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to keep starting chains")
    p.add_argument("--quick", action="store_true", help="two short chains (seconds to a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--worker", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    info, cmd = _common.machine(), _common.command()
    with tempfile.TemporaryDirectory() as work:
        result = campaign(work, minutes=args.minutes, quick=args.quick, seed=args.seed)
    write_results(args.out, result, info, cmd)
    print(json.dumps(result["summary"]), flush=True)


if __name__ == "__main__":
    main()
