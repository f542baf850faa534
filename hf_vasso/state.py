"""The VASSO state as data and as a file: its format, its checks, its checksum and its atomic write.

`VassoUpdate.state_dict()` returns the state (format `STATE_FORMAT`): the step count, d per parameter (this rank's
shard; None for parameters without d), the cohorts (which parameters became trainable together and whether they have
seen their first gradient), the parameter names and the hyperparameters. `validate_state` checks a state against a
run before anything loads; `write_state_file` / `read_state_file` are the checkpoint file (`vasso_state.pt`, one per
rank under sharding) with a SHA-256 checksum: torch does not check the CRCs of its zip records on load, so a flipped
byte in d would otherwise load silently.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
from typing import Any

import torch

logger = logging.getLogger("hf_vasso")

STATE_FORMAT = "hf_vasso.VassoUpdate/2"
STATE_FILE = "vasso_state.pt"


def per_rank_state_file(rank: int) -> str:
    """The state file of one rank, when every rank holds different d (sharded parameters, per-rank adversaries)."""
    return f"vasso_state_rank{rank}.pt"


def validate_state(
    state: Any, names: list[str] | None, shapes: list[tuple[int, ...]], expected_step: int | None = None
) -> None:
    """Check a saved state against a run before anything loads: format, step, one d per parameter of the run's
    local shape, parameter names (when both have them), cohorts, finiteness. One host sync (the finiteness check).

    Args:
        names: the run's parameter names, or None. shapes: each parameter's local shape.
        expected_step: the step the state must be at (the checkpoint's global step), or None.

    Raises:
        ValueError: what is wrong, and the fix.
    """
    _check_header(state, expected_step)
    d = state["d"]
    name = (lambda i: names[i]) if names else (lambda i: f"parameter #{i}")
    if not isinstance(d, list) or len(d) != len(shapes):
        count = len(d) if isinstance(d, list) else type(d).__name__
        raise ValueError(
            f"The VASSO state holds {count} tensors, which do not match the {len(shapes)} parameters of this "
            "run: resume with the same model, adapters and parameters."
        )
    saved_names = state["param_names"]
    if names is not None and saved_names is not None and list(saved_names) != list(names):
        a, b = next((a, b) for a, b in zip(list(saved_names) + [None], list(names) + [None]) if a != b)
        raise ValueError(f"The VASSO state was written for other parameters (saved {a!r}, here {b!r}).")
    for i, t in enumerate(d):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shapes[i]) or not t.is_floating_point():
            what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"The VASSO state's d for {name(i)} is {what}, expected a float {tuple(shapes[i])}.")
    _check_segments(d, state["segments"])
    tensors = [t for t in d if t is not None]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        bad = next(name(i) for i, t in enumerate(d) if t is not None and not torch.isfinite(t).all())
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


def _check_segments(d: list, segments: Any) -> None:
    seen: set[int] = set()
    for seg in segments if isinstance(segments, list) else [None]:
        idx = seg.get("params") if isinstance(seg, dict) else None
        if not isinstance(idx, list) or not isinstance(seg.get("initialized"), bool):
            raise ValueError("The VASSO state's segments are malformed.")
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < len(d) or i in seen or d[i] is None:
                raise ValueError(f"The VASSO state's segments name parameter {i!r} without a d of its own.")
            seen.add(i)
    if seen != {i for i, t in enumerate(d) if t is not None}:
        raise ValueError("The VASSO state's segments do not cover its d tensors.")


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a VASSO state: the bytes of every tensor in `d` (in order) and the other entries' text."""
    digest = hashlib.sha256()
    for t in state.get("d") or []:
        if t is None:
            digest.update(b"none")
        else:
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    rest = {k: v for k, v in state.items() if k not in ("d", "checksum")}
    digest.update(repr(sorted(rest.items())).encode())
    return digest.hexdigest()


def write_state_file(state: dict[str, Any], path: str) -> None:
    """Write `state` with its checksum to `path`: `torch.save` to a temporary name in the same folder, then an atomic
    rename, so `path` is either the old file or the complete new one, never half a file.

    Raises:
        OSError: the write failed; the message names `path` and the cause (e.g. no space left on the device).
    """
    state = dict(state, checksum=state_checksum(state))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except Exception as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < (1 << 20))
        space = "the free space could not be read" if free is None else f"{free} bytes free on the device of {folder}"
        fix = "Free space" if full else "Fix the cause above"
        raise OSError(
            f"Could not write the VASSO state file {path} ({type(error).__name__}: {error}; {space}"
            f"{': no space left' if full else ''}). Nothing was written under that name. {fix} (or choose another "
            "output_dir) and save again."
        ) from error


def read_state_file(path: str) -> dict[str, Any]:
    """Read a state file and check its checksum (a file without one, from an older hf_vasso, loads with a warning).

    Raises:
        ValueError: the file cannot be read or its checksum does not match; the message names the file and the fix.
    """
    fix = f"Resume from an earlier checkpoint, or delete {path} to resume from this one with d starting afresh."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, not a torch file: torch raises many types
        raise ValueError(
            f"The VASSO state file {path} cannot be read ({type(error).__name__}: {error}). {fix}"
        ) from error
    if isinstance(state, dict) and "checksum" in state:
        saved = state.pop("checksum")
        if saved != state_checksum(state):
            raise ValueError(
                f"The VASSO state file {path} is damaged: the checksum of its contents does not match the one "
                f"written with it (the file changed on disk after it was saved). {fix}"
            )
    elif isinstance(state, dict):
        logger.warning(f"{path} has no checksum (written by an older hf_vasso): it is loaded unchecked.")
    return state
