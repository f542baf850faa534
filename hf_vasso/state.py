"""The engine's checkpoint: what `VassoUpdate.state_dict()` writes, how a saved state is checked against the run
before anything loads, and how it is loaded (one file per rank under sharding: d holds this rank's shards)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .sharding import local

if TYPE_CHECKING:
    from .update import VassoUpdate

logger = logging.getLogger("hf_vasso")

STATE_FORMAT = "hf_vasso.VassoUpdate/2"


def save_state(update: VassoUpdate) -> dict[str, Any]:
    """See `VassoUpdate.state_dict`."""
    if update.perturbed:
        raise RuntimeError("VASSO state saved while the weights are perturbed; call restore() first.")
    segments = update.layout.segments
    initialized = [bool(s.initialized.item()) for s in segments]
    return {
        "format": STATE_FORMAT,
        "step": update.step,
        "d": [None if d is None else d.clone() for d in update.d],
        "segments": [{"params": list(s.indices), "initialized": f} for s, f in zip(segments, initialized)],
        "initialized": all(initialized),
        "param_names": update.param_names,
        **update.hyperparameters(),
    }


def validate_state(update: VassoUpdate, state: Any, expected_step: int | None = None) -> None:
    """See `VassoUpdate.validate_state_dict`."""
    _check_header(state, expected_step)
    _check_d(update, state["d"], state["param_names"])
    _check_segments(len(update.params), state["d"], state["segments"])
    tensors = [t for t in state["d"] if t is not None]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        bad = next(update.name(i) for i, t in enumerate(state["d"]) if t is not None and not torch.isfinite(t).all())
        raise ValueError(f"The VASSO state holds non-finite values in d (first: {bad}): the run it saved diverged.")


def _check_header(state: Any, expected_step: int | None) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format", "no format tag") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"This is not a VASSO state in the format {STATE_FORMAT!r} (found {found!r}): it was written by "
            "another program or an older hf_vasso. Resume from a checkpoint written by this version, or start "
            "d afresh."
        )
    missing = [k for k in ("step", "d", "segments", "param_names") if k not in state]
    if missing:
        raise ValueError(f"The VASSO state lacks {', '.join(missing)}: the file is incomplete.")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"The VASSO state's step {step!r} is not a step count.")
    if expected_step is not None and step != expected_step:
        raise ValueError(
            f"The VASSO state is at step {step} but the checkpoint is at step {expected_step}: the state file "
            "belongs to another checkpoint (its d and eVASSO coin stream would be shifted)."
        )


def _check_d(update: VassoUpdate, d: Any, names: Any) -> None:
    if not isinstance(d, list) or len(d) != len(update.params):
        count = len(d) if isinstance(d, list) else type(d).__name__
        raise ValueError(
            f"The VASSO state holds {count} tensors, which do not match the {len(update.params)} parameters of this "
            "model: resume with the same model, adapters and parameters."
        )
    if update.param_names is not None and names is not None and list(names) != update.param_names:
        diff = next((a, b) for a, b in zip(list(names) + [None], update.param_names + [None]) if a != b)
        raise ValueError(f"The VASSO state was written for other parameters (saved {diff[0]!r}, here {diff[1]!r}).")
    for i, t in enumerate(d):
        if t is None:
            continue
        shape = tuple(local(update.params[i]).shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"The VASSO state's d for {update.name(i)} is {what}, expected a float {shape}.")


def _check_segments(count: int, d: list, segments: Any) -> None:
    seen: set[int] = set()
    for seg in segments:
        idx = seg.get("params") if isinstance(seg, dict) else None
        if not isinstance(idx, list) or not isinstance(seg.get("initialized"), bool):
            raise ValueError("The VASSO state's segments are malformed.")
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < count or i in seen or d[i] is None:
                raise ValueError(f"The VASSO state's segments name parameter {i!r} without a d of its own.")
            seen.add(i)
    if seen != {i for i, t in enumerate(d) if t is not None}:
        raise ValueError("The VASSO state's segments do not cover its d tensors.")


def load_state(update: VassoUpdate, state: dict[str, Any], expected_step: int | None = None) -> None:
    """See `VassoUpdate.load_state_dict`."""
    if update.perturbed:
        raise RuntimeError("VASSO state loaded while the weights are perturbed; call restore() first.")
    validate_state(update, state, expected_step)
    for key, new in update.hyperparameters().items():
        old = state.get(key)
        if old is not None and old != new:
            logger.warning(f"VASSO hyperparameter {key} changed at resume: {old} → {new} (the new value is used).")
    device = update.layout.device
    zero = torch.zeros((), device=device)
    cohorts = [
        (list(seg["params"]), torch.tensor(seg["initialized"], device=device), zero) for seg in state["segments"]
    ]
    # The layout is the saved one; the next step re-checks the flags against it.
    update.layout.build(cohorts, {i: t for i, t in enumerate(state["d"]) if t is not None})
    update.step = state["step"]
