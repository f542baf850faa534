"""The Trainer's checkpoint folders, read as a resume needs them: which one is complete, and the model's weights
loaded exactly whatever names transformers saved them under.

- `checkpoint_problem` / `newest_complete_checkpoint`: a folder is complete when transformers' JIT "incomplete"
  marker is gone, its `trainer_state.json` (written last) parses, its model weights are whole (a safetensors file's
  size matches its header), its VASSO state files pass their checksum, the optimizer state they go with is there,
  and the Trainer's optimizer, scheduler, scaler and RNG files are whole torch archives. A save cut short by a full
  disk or a kill fails one of these; the plain Trainer's `resume_from_checkpoint=True` takes the newest folder
  whatever it holds.
- `load_converted_weights`: transformers 5 saves ViT, the MoE models and many VLMs under converted key names
  (`save_pretrained` reverts the model's conversion mapping), and `Trainer._load_from_checkpoint` loads them by raw
  name with `strict=False` (transformers#43701, #40187): most weights silently stay where they were. This loads them
  again through `from_pretrained`, which applies the conversion, and copies them in place.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import zipfile
from typing import Any

from torch import nn

from .state import STATE_FILE, read_state_file

INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # transformers' JIT checkpoint, while it writes
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The Trainer's own state files, each a torch (zip) archive: its central directory is at the end, so one cut short
# is found by reading the end of the file, whatever its size.
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def checkpoint_problem(folder: str) -> str | None:
    """Why the Trainer checkpoint `folder` cannot be resumed from exactly, or None when it is complete."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    names = set(os.listdir(folder))
    if INCOMPLETE_MARKER in names:
        return f"its {INCOMPLETE_MARKER} marker says the save was interrupted"
    if TRAINER_STATE not in names:
        return f"it has no {TRAINER_STATE} (the save was interrupted before its end)"
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            json.load(f)
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE} cannot be read ({type(error).__name__}: {error}; cut short by a full disk?)"
    weights = [n for n in names if n in WEIGHT_FILES or n in INDEX_FILES or n.startswith("pytorch_model_fsdp")]
    if not weights and not any(os.path.isdir(os.path.join(folder, n)) for n in names):
        return "it holds no model weights"
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        problem = _safetensors_problem(os.path.join(folder, name))
        if problem:
            return f"its {name} {problem}"
    vasso_files = sorted(n for n in names if n == STATE_FILE or re.fullmatch(r"vasso_state_rank\d+\.pt", n))
    for name in vasso_files:
        try:
            read_state_file(os.path.join(folder, name))
        except ValueError as error:
            return f"its {name} is damaged ({error})"
    if vasso_files and not any(n.startswith("optimizer") for n in names):
        # VassoTrainer writes its state right after the optimizer's: without it, the Trainer's resume would
        # silently start a fresh optimizer and LR schedule.
        return f"it has {vasso_files[0]} but no optimizer.pt (the optimizer state was lost)"
    for name in sorted(n for n in names if n in TORCH_FILES or re.fullmatch(r"rng_state_\d+\.pth", n)):
        if not zipfile.is_zipfile(os.path.join(folder, name)):
            return f"its {name} is cut short or damaged (not a whole torch archive)"
    return None


def _safetensors_problem(path: str) -> str | None:
    """Whether a safetensors file is whole: its header parses and its tensors end where the file ends."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return "is cut short (its header runs past the end of the file)"
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"is cut short ({size} bytes, its header describes {8 + length + end})"
    return None


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`(the newest complete checkpoint-N folder of output_dir or None, [(newer folder skipped, why), ...])`."""
    if not os.path.isdir(output_dir):
        return None, []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    skipped = []
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def load_converted_weights(model: nn.Module, folder: str) -> bool:
    """Load the weights saved in `folder` into `model` in place through transformers' key conversion, when they were
    saved under other names than the model's (see the module docstring). Returns whether it did.

    Raises:
        ValueError: the converted checkpoint still does not cover the model's weights (another model's checkpoint).
    """
    from transformers import PreTrainedModel

    saved = _saved_keys(folder)
    if not isinstance(model, PreTrainedModel) or saved is None:
        return False
    if saved <= set(model.state_dict()):  # the Trainer's own load found every saved name (tied copies are not saved)
        return False
    loaded = type(model).from_pretrained(folder, config=copy.deepcopy(model.config), dtype="auto")
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"The weights in {folder} were saved under converted names and do not fit this model after the "
            f"conversion either ({error}). Resume with the model the checkpoint was written from."
        ) from error
    return True


def _saved_keys(folder: str) -> set[str] | None:
    """The tensor names of a checkpoint's safetensors weights (one file or an index), or None without them."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    return {k for k in header if k != "__metadata__"}
