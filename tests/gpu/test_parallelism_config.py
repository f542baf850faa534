"""`VassoConfig(parallelism_config=ParallelismConfig(...))` through the Trainer on 2 or 4 GPUs: tensor parallelism,
FSDP2, FSDP2 x TP and HSDP laid out by Accelerate. Parameters are DTensors, ||eps|| = rho over the full tensors (each
element once), one VASSO state file per rank, and a resume from the step-2 checkpoint ends on the weights of the
uninterrupted run. Accelerate refuses `ParallelismConfig` on CPU, so the CPU tests of these layouts drive the engine on
raw `parallelize_module`/`fully_shard` parameters (tests/distributed/test_distributed_layouts.py). Skipped without
enough GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, free_port
from parallelism_trainer_worker import ARGS, CASES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parallelism_config_through_the_trainer(tmp_path, case):
    nproc = CASES[case][0]
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [os.path.join(REPO, "tests/gpu/parallelism_trainer_worker.py"), str(tmp_path), case]
    path = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tests/gpu"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rank in range(nproc):
        report = json.loads((tmp_path / f"{case}_rank{rank}.json").read_text())
        assert report["world_size"] == nproc and report["params_are_dtensors"]
        assert report["vasso_step"] == 4 and report["resumed_vasso_step"] == 4
        assert len(report["eps_norms"]) == 4
        assert all(e == pytest.approx(ARGS["rho"], rel=1e-4) for e in report["eps_norms"])
        assert f"vasso_state_rank{rank}.pt" in report["checkpoint_files"]
    full = torch.load(tmp_path / f"{case}_full.pt", weights_only=True)
    resumed = torch.load(tmp_path / f"{case}_resumed.pt", weights_only=True)
    assert full and sorted(full) == sorted(resumed)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-5, msg=name)
