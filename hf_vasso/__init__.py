"""hf_vasso: VASSO and eVASSO sharpness-aware training for the HuggingFace Trainer and plain PyTorch loops.

TRL's trainers are in `hf_vasso.trl` (the optional extra `hf_vasso[trl]`); importing `hf_vasso` never imports trl.
"""

from .arguments import VassoArguments, VassoConfig, VassoSeq2SeqConfig
from .checkpoint import newest_complete_checkpoint
from .optimizer import VASSO
from .trainer import VassoSeq2SeqTrainer, VassoTrainer, VassoTrainerMixin, restored_attributes
from .update import VassoUpdate

__all__ = [
    "VASSO",
    "VassoArguments",
    "VassoConfig",
    "VassoSeq2SeqConfig",
    "VassoSeq2SeqTrainer",
    "VassoTrainer",
    "VassoTrainerMixin",
    "VassoUpdate",
    "newest_complete_checkpoint",
    "restored_attributes",
]
__version__ = "0.1.0"
