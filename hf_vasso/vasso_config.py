"""`VassoConfig`: `TrainingArguments` plus the VASSO hyper-parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .update import check_hyperparameters


@dataclass
class VassoConfig(TrainingArguments):
    r"""
    Configuration for [`VassoTrainer`]: every [`~transformers.TrainingArguments`] field, plus the parameters below.

    Parameters:
        rho (`float`, *optional*, defaults to `0.05`):
            Radius of the adversarial perturbation, `eps = rho * d / ||d||`. Must be >= 0; `0` trains with the base
            optimizer at twice the cost.
        theta (`float`, *optional*, defaults to `0.4`):
            Weight of the newest gradient in the moving average `d = (1 - theta) * d + theta * g`, in (0, 1].
            `1.0` is SAM. The paper reports 0.4 best on ResNets and 0.2 under heavy label noise; the official code
            defaults to 0.9.
        adversary_prob (`float`, *optional*, defaults to `1.0`):
            Probability that an optimizer step runs the adversary (two passes). Below 1 this is eVASSO: the other
            steps are one pass with the base optimizer, so a step costs `1 + adversary_prob` passes on average. The
            coin is a function of (`seed`, step): the same on every rank and after a resume.
        sync_adversary (`bool`, *optional*, defaults to `True`):
            Under DDP, all-reduce the pass-1 gradient so every rank shares `d` and the adversary (one extra
            all-reduce per optimizer step; the run equals one process with the global batch). `False` gives each rank
            its own adversary from its own batch, with no extra communication (the SAM paper's m-sharpness).
    """

    rho: float = field(
        default=0.05,
        metadata={"help": "Radius of the adversarial perturbation eps = rho * d / ||d|| (>= 0)."},
    )
    theta: float = field(
        default=0.4,
        metadata={
            "help": "Weight of the newest gradient in the moving average d, in (0, 1]. 1.0 is SAM; 0.4 is the "
            "paper's choice, 0.2 under heavy label noise."
        },
    )
    adversary_prob: float = field(
        default=1.0,
        metadata={
            "help": "Probability that a step runs the adversary (two passes), in [0, 1]. Below 1 is eVASSO, at an "
            "average cost of 1 + adversary_prob passes per step."
        },
    )
    sync_adversary: bool = field(
        default=True,
        metadata={
            "help": "Under DDP, all-reduce the pass-1 gradient so all ranks share one adversary (one extra "
            "all-reduce per step). False: each rank perturbs with its own gradient, no extra communication."
        },
    )

    def __post_init__(self):
        # Checked before TrainingArguments.__post_init__, which would otherwise fail on a missing deepspeed install
        # with a message about the install rather than about the real problem.
        refuse_deepspeed(self.deepspeed)
        super().__post_init__()
        check_hyperparameters(self.rho, self.theta, self.adversary_prob)
        if self.ddp_static_graph and (not self.sync_adversary or self.gradient_accumulation_steps > 1):
            raise ValueError(
                "ddp_static_graph=True cannot run with sync_adversary=False or gradient_accumulation_steps > 1: both "
                "need backward passes without DDP synchronisation, which a static graph forbids. Set "
                "ddp_static_graph=False (the default)."
            )


def refuse_deepspeed(deepspeed_config) -> None:
    """DeepSpeed steps the optimizer inside `backward()` and keeps ZeRO gradients out of `p.grad`."""
    from_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    if deepspeed_config or from_env:
        raise ValueError(
            "hf_vasso cannot run under DeepSpeed: DeepSpeed steps the optimizer inside backward() and keeps ZeRO "
            "gradients out of p.grad, so a two-pass step cannot be built on it. Shard with FSDP2 instead "
            "(`accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml ...` or `fsdp=...` with "
            "`fsdp_config={'version': 2}`)."
        )
