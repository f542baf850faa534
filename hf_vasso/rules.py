"""Every rule hf_vasso enforces, in one place: value checks, configuration checks and refusals.

Imported by the config (`arguments.py`), the engine (`update.py`, `flat_layout.py`, `sharding.py`), the wrapper
(`optimizer.py`) and the trainer (`trainer.py`). Each check raises `ValueError` with the value, the rule, the reason
and the fix (`NotImplementedError` for a model layout the engine does not handle). The module imports
only torch, so the engine that uses it knows nothing of the Trainer.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Any

import torch
from torch import nn

# ------------------------------------------------------------------------------------------------ values


def _real(name: str, value: Any, hint: str) -> float:
    """`value` as a float: any real number (float, int, numpy scalar, Fraction, one-element tensor); never a bool."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name}={value!r} is invalid: pass a real number, not a tensor of that kind ({hint}).")
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is invalid: {name} must be a real number, not {type(value).__name__} "
                         f"({hint}).")  # fmt: skip
    return float(value)


def check_hyperparameters(rho: Any, theta: Any, adversary_prob: Any) -> tuple[float, float, float]:
    """Validate and convert (rho, theta, adversary_prob); shared by `VassoConfig`, `VASSO` and `VassoUpdate`.

    Returns:
        The three values as Python floats.

    Raises:
        ValueError: a value is not a real number (booleans included), not finite, or out of its range; the message
            names the value and the fix.
    """
    rho = _real("rho", rho, "the perturbation radius, e.g. 0.05")
    theta = _real("theta", theta, "the weight of the newest gradient, e.g. 0.4")
    adversary_prob = _real("adversary_prob", adversary_prob, "the probability of an adversary step, e.g. 1.0")
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho!r} is invalid: the perturbation radius must be a finite number >= 0 (try 0.05).")
    if not (0 < theta <= 1):
        raise ValueError(
            f"theta={theta!r} is invalid: the weight of the newest gradient must be in (0, 1] "
            "(1.0 is SAM; the paper uses 0.4, and 0.2 under heavy label noise)."
        )
    if not (0 <= adversary_prob <= 1):
        raise ValueError(
            f"adversary_prob={adversary_prob!r} is invalid: the probability of an adversary step must be in [0, 1] "
            "(1.0 is VASSO, below 1 is eVASSO, 0 is the base optimizer alone)."
        )
    return rho, theta, adversary_prob


def check_seed(seed: Any) -> int:
    """The eVASSO seed as an int: any integral type (int, numpy integer, integer 0-d tensor); never a bool.

    Raises:
        ValueError: `seed` is a bool or not integral (1.7 would silently become 1).
    """
    if isinstance(seed, bool) or type(seed).__name__ == "bool_":
        raise ValueError(f"seed={seed!r} is invalid: the eVASSO seed must be an integer, not a bool (try 42).")
    try:
        return operator.index(seed)
    except TypeError:
        raise ValueError(
            f"seed={seed!r} is invalid: the eVASSO seed must be an integer (try 42, the Trainer's default)."
        ) from None


def check_adaptive(adaptive: Any) -> bool:
    """Raises: ValueError if `adaptive` is not a bool (numpy bools accepted)."""
    if not (isinstance(adaptive, bool) or type(adaptive).__name__ == "bool_"):
        raise ValueError(f"adaptive={adaptive!r} is invalid: pass True (ASAM's adversary) or False (VASSO's).")
    return bool(adaptive)


# ---------------------------------------------------------------------------------- the configuration


def validate_vasso_arguments(args: Any) -> None:
    """Every rule on the VASSO fields and their combination with the Trainer's: one place, one `ValueError` each."""
    refuse_deepspeed(getattr(args, "deepspeed", None))
    # Stored as float whatever real-number type was given (numpy scalars, 0-d tensors): it is saved and logged.
    args.rho, args.theta, args.adversary_prob = check_hyperparameters(args.rho, args.theta, args.adversary_prob)
    args.adaptive = check_adaptive(args.adaptive)
    if hasattr(args, "seed"):
        args.seed = check_seed(args.seed)
    refuse_backward_stepping_optimizer(getattr(args, "optim", None))
    if getattr(args, "ddp_static_graph", False) and (
        not args.sync_adversary or getattr(args, "gradient_accumulation_steps", 1) > 1
    ):
        raise ValueError(
            "ddp_static_graph=True cannot run with sync_adversary=False or gradient_accumulation_steps > 1: both "
            "need backward passes without DDP synchronisation, which a static graph forbids. Set "
            "ddp_static_graph=False (the default)."
        )


def refuse_deepspeed(deepspeed_config: Any) -> None:
    """DeepSpeed steps the optimizer inside `backward()` and keeps ZeRO gradients out of `p.grad`."""
    from_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    if deepspeed_config or from_env:
        raise ValueError(
            "hf_vasso cannot run under DeepSpeed: DeepSpeed steps the optimizer inside backward() and keeps ZeRO "
            "gradients out of p.grad, so a two-pass step cannot be built on it. Shard with FSDP2 instead "
            "(`accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml ...` or `fsdp=...` with "
            "`fsdp_config={'version': 2}`)."
        )


def is_backward_stepping_optimizer(optim: Any) -> bool:
    """LOMO, AdaLomo and every `*_layerwise` optimizer update the weights from gradient hooks during backward."""
    name = str(getattr(optim, "value", optim or ""))
    return "lomo" in name or name.endswith("_layerwise")


def refuse_backward_stepping_optimizer(optim: Any) -> None:
    if is_backward_stepping_optimizer(optim):
        name = getattr(optim, "value", optim)
        raise ValueError(
            f"optim='{name}' cannot run with VASSO: it updates the weights inside backward() and leaves p.grad "
            "empty, so pass 1 has no gradient to build the adversary from and pass 2 would step the weights while "
            "they are perturbed. Use an optimizer that steps after backward (adamw_torch, adamw_torch_fused, sgd, "
            "adafactor, galore_adamw without _layerwise, ...); the README lists what works."
        )


# ----------------------------------------------------------------------------------- the trainer

# Trainers that sample from the policy inside `training_step` (in `_prepare_inputs`): TRL's online methods.
GENERATING_TRAINERS = frozenset(
    {
        "GRPOTrainer",
        "AsyncGRPOTrainer",
        "RLOOTrainer",
        "OnlineDPOTrainer",
        "NashMDTrainer",
        "XPOTrainer",
        "PPOTrainer",
        "GKDTrainer",
        "GOLDTrainer",
        "DistillationTrainer",
        "AsyncDistillationTrainer",
        "IWOPDTrainer",
        "SDFTTrainer",
        "SDPOTrainer",
        "A2POTrainer",
    }
)


def refuse_generating_trainer(trainer_class: type) -> None:
    """Pass 2 replays the step's inputs through `training_step`; a trainer that generates there would sample anew."""
    generating = [c.__name__ for c in trainer_class.__mro__ if c.__name__ in GENERATING_TRAINERS]
    if generating:
        raise ValueError(
            f"{generating[0]} generates completions inside training_step (from the current policy, in "
            "_prepare_inputs), so VASSO's pass 2 would sample new completions at the perturbed weights instead of "
            "replaying the step's batch, and the adversary would no longer be computed on one loss. hf_vasso does "
            "not support online trainers. Offline trainers work: hf_vasso.VassoTrainer, VassoSeq2SeqTrainer, "
            "hf_vasso.trl.VassoSFTTrainer and VassoDPOTrainer, or `class VassoX(VassoTrainerMixin, X)` for another "
            "offline trainer X (TRL's RewardTrainer, KTOTrainer, ...)."
        )


def refuse_sparse_gradients(model: nn.Module) -> None:
    """Sparse gradients have no foreach kernels and no meaningful global norm with dense d: refuse them early."""
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) and any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(
                f"{name or type(module).__name__} ({type(module).__name__}) has sparse=True: VASSO needs dense "
                "gradients. Build it with sparse=False (and a dense optimizer such as AdamW instead of SparseAdam)."
            )


def refuse_unsupported_trainer_setup(trainer: Any) -> None:
    """The Trainer set-ups a two-pass step cannot run on, checked once the Trainer has built its accelerator.

    Raises:
        ValueError: DeepSpeed, FSDP1, `sync_adversary=False` under FSDP, or a module with sparse gradients.
    """
    if trainer.is_deepspeed_enabled:
        refuse_deepspeed(True)
    if trainer.is_fsdp_enabled:
        if trainer.accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ValueError(
                "hf_vasso supports FSDP2 only: FSDP1 exposes flat parameter shards that the adversary cannot be "
                "computed on. Set fsdp_config={'version': 2} (the default in transformers 5) or "
                "`fsdp_version: 2` in the accelerate config."
            )
        if not trainer.args.sync_adversary:
            raise ValueError(
                "sync_adversary=False cannot run under FSDP: each rank holds only a shard of the weights, so a "
                "per-rank adversary does not exist. Use sync_adversary=True."
            )
    if trainer.model is not None:
        refuse_sparse_gradients(trainer.model)


def refuse_mixin_after_base(cls: type, mixin: type, base: type, example: str) -> None:
    """At class creation: `mixin` must come before `base` in `cls`'s bases, since `base` never calls `super()` for
    the methods the mixin overrides (`Trainer.training_step`, `TrainingArguments.__post_init__`).

    Raises:
        TypeError: `base` precedes `mixin` in `cls.__mro__` (as Python raises for a bad class definition).
    """
    mro = cls.__mro__
    if base in mro and mixin in mro and mro.index(base) < mro.index(mixin):
        raise TypeError(
            f"class {cls.__name__} puts {mixin.__name__} after {base.__name__} in its bases: {base.__name__}'s "
            f"methods do not call super(), so {mixin.__name__} would never run and the class would silently behave "
            f"as a plain {base.__name__}. Put the mixin first: {example}."
        )


def refuse_vasso_optimizer_in_trainer(optimizer: Any, optimizer_cls: Any) -> None:
    """VassoTrainer runs the VASSO step itself: a `VASSO` wrapper as its optimizer would run a second one."""
    from .optimizer import VASSO

    if isinstance(optimizer, VASSO) or (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, VASSO)):
        raise ValueError(
            "VassoTrainer was given the VASSO wrapper as its optimizer (optimizers=(VASSO(...), ...) or "
            "optimizer_cls_and_kwargs=(VASSO, ...)): VassoTrainer already runs the VASSO step, and the wrapper would "
            "run a second adversary inside it. Pass the base optimizer (e.g. optimizers=(torch.optim.AdamW(...), "
            "None)) and the VASSO hyperparameters in the arguments (VassoConfig(rho=..., theta=...))."
        )


def refuse_step_without_first_step() -> None:
    """`VASSO.step()` without a closure after no `first_step()`: a plain base step would pass for VASSO."""
    raise ValueError(
        "VASSO.step() was called without a closure and without first_step() since the last step, so it would take a "
        "plain base-optimizer step with no adversary. If you handed VASSO to transformers.Trainer "
        "(Trainer(optimizers=(VASSO(...), None))) or to code written for a one-pass optimizer, use "
        "hf_vasso.VassoTrainer with the base optimizer instead. In your own loop, call first_step() after the "
        "pass-1 backward and second_step() after the pass-2 backward, or pass a closure: step(closure)."
    )


def refuse_accelerate_accumulation() -> None:
    """`first_step()` inside `accelerator.accumulate()` on a micro-batch that does not end the optimizer step."""
    raise ValueError(
        "VASSO.first_step() was called inside accelerator.accumulate() on a micro-batch that does not end the "
        "optimizer step: the adversary would be built from one micro-batch's gradient, once per micro-batch, and "
        "pass 2's gradient would be added into the next micro-batch's pass 1. Accumulate by hand instead: run pass "
        "1 over all K micro-batches (loss / K, accelerator.no_sync(model) on all but the last), call first_step() "
        "once, run pass 2 over the same K micro-batches, then restore() and the optimizer step (the README's "
        "accumulation recipe)."
    )


def refuse_wrapped_vasso(base_optimizer: Any) -> None:
    """VASSO over VASSO would perturb twice and step the innermost base optimizer through two wrappers."""
    from .optimizer import VASSO

    if isinstance(base_optimizer, VASSO):
        raise ValueError(
            "VASSO was given a VASSO optimizer as its base: the weights would be perturbed twice per step. Wrap the "
            "base optimizer once: VASSO(torch.optim.AdamW(model.parameters()), rho=..., theta=...)."
        )


# ------------------------------------------------------------------------------------------------ the engine's tensors


def refuse_no_trainable_parameter() -> None:
    """Called when no tensor given to VASSO has `requires_grad=True` (at build time or at a step)."""
    raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")


def refuse_several_devices(devices: Any) -> None:
    """Called when the trainable parameters live on several devices (a model split with `device_map`)."""
    raise NotImplementedError(
        f"hf_vasso needs every trainable parameter on one device, found {sorted(map(str, devices))}: "
        "a model split over devices (device_map) is not supported; use DDP or FSDP2."
    )


def refuse_sparse_gradient(name: str) -> None:
    """Called on a trainable parameter whose gradient is sparse: d, its norm and EMA are dense."""
    raise ValueError(
        f"Parameter {name} has a sparse gradient: VASSO needs dense gradients (its norm and EMA "
        "are dense). Use a dense embedding (nn.Embedding(sparse=False)) and a dense optimizer."
    )


def refuse_unsupported_placement(name: str, placement: Any, dim: int, mesh: Any) -> None:
    """Called on a DTensor parameter placed neither sharded nor replicated on a mesh dimension (e.g. `Partial`):
    its elements cannot be counted once in the norm."""
    raise NotImplementedError(
        f"hf_vasso cannot count the elements of {name} once: it is a DTensor placed as {placement} on mesh "
        f"dimension {dim} of {mesh}, and VASSO's norm handles sharded (Shard, _StridedShard) and replicated "
        "(Replicate) dimensions only."
    )


def refuse_gradient_layout(name: str, param: Any, grad: Any) -> None:
    """Called on a DTensor gradient laid out unlike its parameter (e.g. `Partial`, not yet reduced over ranks)."""
    raise NotImplementedError(
        f"The gradient of {name} is a DTensor placed as {grad.placements} on {grad.device_mesh}, but the "
        f"parameter as {param.placements} on {param.device_mesh}: VASSO folds each rank's shard of the gradient "
        "into the same shard of d, so the gradient must be laid out like its parameter (a Partial gradient has "
        "not been reduced over ranks yet). Let FSDP2/DDP reduce it before the optimizer step, or redistribute "
        "it to the parameter's placements."
    )


def check_param_names(param_names: Any, count: int) -> None:
    """`param_names` (None or one name per tensor) against the engine's `count` tensors."""
    if param_names is not None and len(param_names) != count:
        raise ValueError(f"param_names has {len(param_names)} names for {count} tensors.")


def refuse_repeated_tensors(params: list[Any], where: str) -> None:
    """Each tensor once: a repeated one would count twice in the global norm and be moved twice (its part of ε
    doubled), which torch.optim also refuses across groups.

    Raises:
        ValueError: a tensor appears more than once in `params`.
    """
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"VASSO: {where}: tensor #{i} is given more than once (in one param group or in two); it would "
                "count twice in the global norm and be moved twice. List each parameter once."
            )
        seen.add(id(p))


def check_new_param_group(new: list[Any], known: list[Any], names: Any, engine_has_names: bool) -> None:
    """A group given to `add_param_group`: tensors the engine does not have yet, each once, and one name per new
    tensor exactly when the engine has names."""
    refuse_repeated_tensors(new, "add_param_group")
    ids = {id(p) for p in known}
    if any(id(p) in ids for p in new):
        raise ValueError(
            "add_param_group: a tensor of the new group is already optimised by VASSO; a parameter may belong "
            "to one group only (change its group's rho instead)."
        )
    if engine_has_names != (names is not None) or (names is not None and len(names) != len(new)):
        raise ValueError(
            f"add_param_group: pass one name per new tensor ({len(new)}) exactly when the engine "
            f"has names (it {'has' if engine_has_names else 'has none'})."
        )
