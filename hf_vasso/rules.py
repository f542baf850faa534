"""The rules on values and set-ups that hf_vasso refuses, shared by the config, the engine and both front ends.

Each check raises `ValueError` with the value, the rule, the reason and the fix (`NotImplementedError` for a model
layout the engine does not handle). What lives elsewhere, next to the state it guards: the selection of an adversary
geometry (`adversary.resolve_adversary`), the state file's checks (`state.py`), the front ends' call-order errors
(`RuntimeError`s in `update.py` and `optimizer.py`), and the refusals that name a front-end class
(`optimizer.refuse_wrapped_vasso`, `trainer.refuse_vasso_optimizer_in_trainer`). The module imports only torch
and `adversary.py`, so the engine that uses it knows nothing of the Trainer.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adversary import resolve_adversary

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


def checked_attribute(name: str, check: Callable[[Any], Any], doc: str) -> property:
    """An attribute stored as `_<name>`, passed through `check` (which raises `ValueError`) when it is set."""

    def set_checked(self: Any, value: Any) -> None:
        setattr(self, f"_{name}", check(value))

    return property(lambda self: getattr(self, f"_{name}"), set_checked, doc=doc)


def check_hyperparameters(rho: Any, theta: Any, adversary_prob: Any) -> tuple[float, float, float]:
    """Validate and convert (rho, theta, adversary_prob); shared by `VassoConfig`, `VASSO` and `VassoUpdate`.

    Returns:
        The three values as Python floats.

    Raises:
        ValueError: a value is not a real number (booleans included), not finite, or out of its range; the message
            names the value and the fix.
    """
    return check_rho(rho), check_theta(theta), check_adversary_prob(adversary_prob)


def check_theta(theta: Any) -> float:
    """θ as a float in (0, 1].

    Raises:
        ValueError: anything else; the message names the value and the fix.
    """
    value = _real("theta", theta, "the weight of the newest gradient, e.g. 0.4")
    if not (0 < value <= 1):
        raise ValueError(
            f"theta={value!r} is invalid: the weight of the newest gradient must be in (0, 1] "
            "(1.0 is SAM; the paper uses 0.4, and 0.2 under heavy label noise)."
        )
    return value


def check_adversary_prob(adversary_prob: Any) -> float:
    """The eVASSO probability p as a float in [0, 1].

    Raises:
        ValueError: anything else; the message names the value and the fix.
    """
    value = _real("adversary_prob", adversary_prob, "the probability of an adversary step, e.g. 1.0")
    if not (0 <= value <= 1):
        raise ValueError(
            f"adversary_prob={value!r} is invalid: the probability of an adversary step must be in [0, 1] "
            "(1.0 is VASSO, below 1 is eVASSO, 0 is the base optimizer alone)."
        )
    return value


def check_rho(rho: Any, what: str = "rho") -> float:
    """ρ as a float: a finite real number >= 0. `what` names where it was read (a param group's key, a field).

    Raises:
        ValueError: anything else; the message names the value, where it was read and the fix.
    """
    value = _real(what, rho, "the perturbation radius, e.g. 0.05")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what}={rho!r} is invalid: the perturbation radius must be finite and >= 0 (try 0.05).")
    return value


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


# ---------------------------------------------------------------------------------- the configuration


def validate_vasso_arguments(args: Any) -> None:
    """Every rule on the VASSO fields and their combination with the Trainer's: one place, one `ValueError` each."""
    refuse_deepspeed(getattr(args, "deepspeed", None))
    # Stored as float whatever real-number type was given (numpy scalars, 0-d tensors): it is saved and logged.
    args.rho, args.theta, args.adversary_prob = check_hyperparameters(args.rho, args.theta, args.adversary_prob)
    # The geometry by name; `adaptive` is its alias (True: "asam"). Both kept consistent for later readers. The
    # config writes `adaptive` itself, so `adaptive=False` beside "asam" may be its own write (`dataclasses.replace`
    # of a default config): "asam" wins.
    args.adversary = resolve_adversary(args.adversary, args.adaptive or None)
    args.adaptive = args.adversary == "asam"
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


def refuse_step_without_first_step() -> None:
    """`VASSO.step()` without a closure after no `first_step()`: a plain base step would pass for VASSO."""
    raise ValueError(
        "VASSO.step() was called without a closure and without first_step() since the last step, so it would take a "
        "plain base-optimizer step with no adversary. If you handed VASSO to transformers.Trainer "
        "(Trainer(optimizers=(VASSO(...), None))) or to code written for a one-pass optimizer, use "
        "hf_vasso.VassoTrainer with the base optimizer instead. In your own loop, call first_step() after the "
        "pass-1 backward and second_step() after the pass-2 backward, or pass a closure: step(closure)."
    )


def refuse_accelerate_accumulation(steps: int) -> None:
    """`first_step()` while an Accelerator accumulates gradients itself (`gradient_accumulation_steps` > 1)."""
    raise ValueError(
        f"VASSO.first_step() was called while the Accelerator accumulates gradients over {steps} micro-batches "
        "itself: inside accelerator.accumulate() the adversary would be built from one micro-batch's gradient "
        "(on the micro-batch that ends the step, pass 2 would run on it alone, scaled by 1/K), and outside it "
        "accelerator.backward divides every loss by K a second time. Accumulate by hand instead, with an "
        "Accelerator created without gradient_accumulation_steps: run pass 1 over all K micro-batches (loss / K, "
        "accelerator.no_sync(model) on all but the last), call first_step() once, run pass 2 over the same K "
        "micro-batches, then restore() and the optimizer step (the README's accumulation recipe). Accelerate keeps "
        "this setting process-wide, and it outlives its Accelerator: if that Accelerator is gone (a notebook cell "
        "run earlier), an Accelerator() made without gradient_accumulation_steps clears it."
    )


def refuse_scaler_step_while_perturbed() -> None:
    """A GradScaler loop that reached the base step (or the next `first_step`) with the weights still perturbed."""
    raise RuntimeError(
        "VASSO: with a GradScaler, call restore() before scaler.step(optimizer). The scaler skips the step on an "
        "overflow without calling the optimizer, which would leave the perturbed weights x + eps in the model. The "
        "weights have been restored now. Each step: scaler.scale(loss).backward(); "
        "first_step(grad_scaler=scaler); the pass-2 backward; restore(); scaler.step(optimizer); scaler.update()."
    )


def refuse_no_trainable_parameter() -> None:
    """Called when no tensor given to VASSO has `requires_grad=True` (at build time or at a step)."""
    raise ValueError("VASSO found no parameter with requires_grad=True: there is nothing to perturb.")


def refuse_several_devices(devices: Any) -> None:
    """Called when the trainable parameters live on several devices (a model split with `device_map`)."""
    raise NotImplementedError(
        f"hf_vasso needs every trainable parameter on one device, found {sorted(map(str, devices))}: "
        "a model split over devices (device_map) is not supported; use DDP or FSDP2."
    )


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def refuse_unsupported_dtype(name: str, dtype: Any) -> None:
    """Called on a trainable parameter of a dtype VASSO does not keep d for (float64: d is fp32)."""
    raise TypeError(
        f"VASSO works on float32, bfloat16 and float16 weights; {name} is {dtype} (d is kept in float32, so x + eps "
        "would be rounded). Cast the model with model.float(), or train it in bf16 or fp16."
    )


def refuse_sparse_gradient(name: str) -> None:
    """Called on a trainable parameter whose gradient is sparse: d, its norm and EMA are dense."""
    raise ValueError(
        f"The gradient of {name} is sparse: VASSO needs dense gradients (its norm and EMA are dense). Use a "
        "dense embedding (nn.Embedding(sparse=False)) and a dense optimizer."
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


def check_param_names(param_names: Any, count: int, required: bool = False) -> None:
    """`param_names` (one name per tensor; None allowed unless `required`) against `count` tensors."""
    if (param_names is None and required) or (param_names is not None and len(param_names) != count):
        given = "no names" if param_names is None else f"{len(param_names)} names"
        raise ValueError(f"param_names: {given} for {count} tensors; pass one name per tensor.")


def refuse_repeated_tensors(params: list[Any], where: str) -> None:
    """Each parameter once, and no two over the same memory: a repeated one, or two `Parameter`s viewing one storage,
    would count twice in the global norm and be moved twice (that part of ε doubled, ‖ε‖ up to √2·ρ); torch.optim
    refuses the first across groups. Tied weights are one `Parameter` and pass.

    Raises:
        ValueError: a tensor appears twice, or two tensors share memory; the message names their positions.
    """
    seen: dict[int, int] = {}
    spans: dict[tuple, list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"VASSO: {where}: tensor #{i} is given more than once (in one param group or in two); it would "
                "count twice in the global norm and be moved twice. List each parameter once."
            )
        seen[id(p)] = i
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.numel() == 0 or t.device.type == "meta":
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        owners = spans.setdefault((t.device, t.untyped_storage().data_ptr()), [])
        for j, a, b in owners:
            if start < b and a < end:
                raise ValueError(
                    f"VASSO: {where}: tensors #{j} and #{i} share memory (two Parameters viewing one storage): "
                    "VASSO would move that memory twice, by up to √2·ρ. Make them one Parameter (tie it) or give "
                    "each its own storage (.clone())."
                )
        owners.append((i, start, end))
