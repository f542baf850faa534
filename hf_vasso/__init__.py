"""hf_vasso: VASSO and eVASSO sharpness-aware training for the HuggingFace Trainer and plain PyTorch loops."""

from .optimizer import VASSO
from .update import VassoUpdate
from .vasso_config import VassoConfig
from .vasso_trainer import VassoTrainer

__all__ = ["VASSO", "VassoConfig", "VassoTrainer", "VassoUpdate"]
__version__ = "0.1.0"
