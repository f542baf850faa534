"""FSDP2 through the Trainer, on 1 GPU and (where there are two) 2 GPUs: parameters are DTensors, ||eps|| = rho over
all shards, one VASSO state file per rank, the same weights as the run without FSDP (fp32), and a resume from an FSDP2
checkpoint that continues the run. Skipped without CUDA; the 2-GPU case without a second GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fsdp2_trainer_worker import ARGS, full_weights
from helpers import REPO, free_port, make_args, tiny_llama, token_dataset

from hf_vasso import VassoTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def no_fsdp_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same run in this process, without FSDP, on 1 GPU with the batch of 1 process."""
    out = tmp_path_factory.mktemp("no_fsdp")
    trainer = VassoTrainer(
        model=tiny_llama(), args=make_args(out, **ARGS), train_dataset=token_dataset(n=64, length=16)
    )
    trainer.train()
    return full_weights(trainer.model)


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp2_trainer_and_resume(tmp_path, nproc, no_fsdp_weights):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [os.path.join(REPO, "recipes/accelerate_configs/fsdp2.yaml"), "--num_processes", str(nproc)]
    cmd += ["--mixed_precision", "no", "--main_process_port", str(free_port())]
    cmd += [os.path.join(REPO, "tests/gpu/fsdp2_trainer_worker.py"), str(tmp_path)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rank in range(nproc):
        report = json.loads((tmp_path / f"fsdp2_rank{rank}.json").read_text())
        assert report["world_size"] == nproc and report["fsdp_enabled"] and report["params_are_dtensors"]
        assert report["vasso_step"] == 4 and report["resumed_vasso_step"] == 4
        assert len(report["eps_norms"]) == 4
        assert all(e == pytest.approx(ARGS["rho"], rel=1e-4) for e in report["eps_norms"])
        assert f"vasso_state_rank{rank}.pt" in report["checkpoint_files"]
    full = torch.load(tmp_path / "fsdp2_full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "fsdp2_resumed.pt", weights_only=True)
    assert sorted(full) == sorted(resumed)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-5, msg=name)
    if nproc == 1:  # with 2 processes the global batch differs from the run without FSDP
        assert sorted(full) == sorted(no_fsdp_weights)
        for name in full:
            torch.testing.assert_close(full[name], no_fsdp_weights[name], rtol=0, atol=1e-4, msg=name)
