"""Launch a worker on several CPU processes (gloo) with a hard timeout, so that a hang fails instead of stalling."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIMEOUT_S = 180


def exit_without_teardown() -> None:
    """End a worker whose results are written and whose ranks have met at a barrier.

    gloo's C++ teardown sometimes aborts a finished process ("terminate called without an active exception"), which
    would fail a passing run: flush and leave without it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tests are about CPU processes and gloo, even on a GPU machine
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        del env[key]  # a stray accelerate setting from the caller must not change what is tested
    return env


def run(cmd: list[str], timeout: int = TIMEOUT_S) -> str:
    """Run `cmd` in its own process group; on timeout kill the whole group. Fails with the output on error."""
    return run_together([cmd], timeout)[0]


def run_together(cmds: list[list[str]], timeout: int = TIMEOUT_S) -> list[str]:
    """Start every command at once (e.g. one launcher per "machine"), each in its own process group, and wait for all.

    On timeout every group is killed; a non-zero exit fails with the outputs of all commands.
    """
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    outputs, timed_out = [], False
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        outputs.append(out)
    failed = timed_out or any(p.returncode != 0 for p in procs)
    if failed:
        why = f"timed out after {timeout}s (a hang?)" if timed_out else f"exit codes {[p.returncode for p in procs]}"
        report = "\n".join(f"--- {' '.join(c)} ---\n{o[-6000:]}" for c, o in zip(cmds, outputs))
        raise AssertionError(f"{why}\n{report}")
    return outputs


def torchrun(script: str, *args: str, nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / script), *args]
    return run(cmd)


def accelerate_launch(config: str, script: str, *args: str, nproc: int = 2) -> str:
    """`accelerate launch --config_file recipes/accelerate_configs/<config>` on CPU processes.

    `--cpu` would make accelerate start a single plain process, so the multi-GPU config is launched as is: with no GPU
    it starts `nproc` torchrun workers and the Trainer falls back to CPU and gloo. Mixed precision is switched off
    (bf16 autocast on CPU would change the numbers the test compares).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config)]
    cmd += ["--num_processes", str(nproc), "--mixed_precision", "no", "--main_process_port", str(free_port())]
    cmd += [str(HERE / script), *args]
    return run(cmd)


def accelerate_launch_multi_node(config: str, script: str, *args: str, machines: int = 2) -> list[str]:
    """The multi-node config, with every "machine" a launcher on localhost (one process each), started together."""
    port = str(free_port())
    cmds = []
    for rank in range(machines):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config)]
        cmd += ["--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank", str(rank)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no"]
        cmds.append(cmd + [str(HERE / script), *args])
    return run_together(cmds)


def python(script: str, *args: str) -> str:
    return run([sys.executable, str(HERE / script), *args])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
