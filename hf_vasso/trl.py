"""VASSO (arXiv 2309.15639; eVASSO, arXiv 2509.02433) for TRL's trainers: `VassoSFTTrainer` / `VassoSFTConfig` and
`VassoDPOTrainer` / `VassoDPOConfig`.

Needs the optional extra `pip install hf_vasso[trl]`; `import hf_vasso` alone never imports trl.

TRL's `compute_loss` records metrics on every call (`num_tokens`, `mean_token_accuracy`, `entropy`, the DPO rewards):
pass 2 runs it again at the perturbed weights, so the pass-2 hook of `VassoTrainerMixin` puts those records back as
pass 1 left them. Every metric TRL logs is then the clean pass's, exactly what plain TRL logs. The same holds for
TRL's other offline trainers through the generic mixin, `class VassoRewardTrainer(VassoTrainerMixin, RewardTrainer)`
(`RewardTrainer`, `KTOTrainer`, and the experimental `CPOTrainer`, `ORPOTrainer`, `TPOTrainer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import TrainingArguments

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("hf_vasso.trl needs TRL: pip install 'hf_vasso[trl]' (or pip install trl).") from error

from .arguments import VassoArguments, register_vasso_arguments_class
from .trainer import VassoTrainerMixin


class VassoTRLTrainerMixin(VassoTrainerMixin):
    """`VassoTrainerMixin` that turns any other `TrainingArguments` into the trainer's own VASSO config class, as
    TRL's trainers turn them into their config class."""

    trl_config_class: type
    vasso_config_class: type

    def _vasso_arguments(self, args: Any) -> Any:
        if isinstance(args, TrainingArguments) and not isinstance(args, self.trl_config_class):
            names = {f.name for f in dataclasses.fields(self.vasso_config_class) if f.init}
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in names}
            args = self.vasso_config_class(**values)
        return super()._vasso_arguments(args)


@dataclass
class VassoSFTConfig(VassoArguments, SFTConfig):
    r"""
    [`trl.SFTConfig`] with the VASSO fields of [`hf_vasso.VassoArguments`] (`rho`, `theta`, `adversary_prob`,
    `sync_adversary`, `adaptive`; arXiv 2309.15639). SFT's own defaults (learning rate, gradient checkpointing, ...)
    are kept: `VassoSFTConfig(output_dir="out", rho=0.05, max_length=512)`.

    Raises:
        ValueError: as `VassoArguments`.
    """


@dataclass
class VassoDPOConfig(VassoArguments, DPOConfig):
    r"""
    [`trl.DPOConfig`] with the VASSO fields of [`hf_vasso.VassoArguments`] (arXiv 2309.15639). DPO's own defaults are
    kept: `VassoDPOConfig(output_dir="out", rho=0.05, beta=0.1)`.

    Raises:
        ValueError: as `VassoArguments`.
    """


class VassoSFTTrainer(VassoTRLTrainerMixin, SFTTrainer):
    """[`trl.SFTTrainer`] with VASSO optimizer steps (see `hf_vasso.VassoTrainerMixin`). Every metric SFT logs is the
    clean pass's; `peft_config=` is SFT's own.

    ```python
    from hf_vasso.trl import VassoSFTConfig, VassoSFTTrainer

    args = VassoSFTConfig(output_dir="out", rho=0.05, theta=0.4)
    VassoSFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=LoraConfig(...)).train()
    ```
    """

    trl_config_class = SFTConfig
    vasso_config_class = VassoSFTConfig


class VassoDPOTrainer(VassoTRLTrainerMixin, DPOTrainer):
    """[`trl.DPOTrainer`] with VASSO optimizer steps (see `hf_vasso.VassoTrainerMixin`). Every metric DPO logs (the
    rewards, margins, log-probabilities) is the clean pass's.

    ```python
    from hf_vasso.trl import VassoDPOConfig, VassoDPOTrainer

    args = VassoDPOConfig(output_dir="out", rho=0.05, beta=0.1)
    VassoDPOTrainer(model=model, args=args, train_dataset=preferences, processing_class=tokenizer).train()
    ```
    """

    trl_config_class = DPOConfig
    vasso_config_class = VassoDPOConfig


# An `SFTConfig` handed to `VassoSFTTrainer` becomes a `VassoSFTConfig` (not a second class of that name).
register_vasso_arguments_class(SFTConfig, VassoSFTConfig)
register_vasso_arguments_class(DPOConfig, VassoDPOConfig)
