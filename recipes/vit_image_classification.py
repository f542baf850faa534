# Copyright 2026 The hf_vasso authors. MIT licence.
"""Image classification with a Vision Transformer, trained by `VassoTrainer`.

Offline default (no network, no flags): Fashion-MNIST from the Debian package `dataset-fashion-mnist` (scikit-learn's
8x8 digits when that package is absent; the run says which), 12,000 training and 2,000 test images, and a small ViT
(patch 7, width 96, 4 layers) trained FROM SCRATCH for 4 epochs: no package ships pretrained ViT weights. A few
minutes on 2 CPU cores.

    python recipes/vit_image_classification.py

The paper's robustness setting, 40% of the training labels flipped uniformly (theta=0.2 is the paper's choice there):

    python recipes/vit_image_classification.py --label_noise 0.4 --theta 0.2

Real fine-tuning of a pretrained ViT on a hub dataset (needs the network, or the hub cache):

    python recipes/vit_image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name uoft-cs/cifar10 --image_column img --label_column label \
        --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 3 \
        --rho 0.05 --theta 0.4 --output_dir vit-cifar10-vasso

On several GPUs or machines, the same file under `accelerate launch`:

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/vit_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name uoft-cs/cifar10 --image_column img --output_dir vit-cifar10-vasso

`--dataset_name` also takes a local folder written by `DatasetDict.save_to_disk`. Every `VassoConfig` /
`TrainingArguments` flag works (`--adversary_prob 0.3` is eVASSO, `--theta 1` is SAM); `--help` lists them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

from hf_vasso import VassoConfig

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DEFAULT = (
    "the embedded default (run without --dataset_name: Fashion-MNIST from the Debian package dataset-fashion-mnist, "
    "or scikit-learn digits)"
)


@dataclass
class ScriptArguments:
    """Which data to train on, and how much of it."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name, or a folder written by DatasetDict.save_to_disk. Default: the embedded "
            "Fashion-MNIST (Debian dataset-fashion-mnist), or scikit-learn digits when that package is absent."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer (or string) labels."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to report test accuracy on."})
    max_train_samples: int | None = field(
        default=12000,
        metadata={"help": "Train on a seeded random subset of this size (all of it: pass 0)."},
    )
    max_test_samples: int | None = field(
        default=2000,
        metadata={"help": "Evaluate on a seeded random subset of this size (all of it: pass 0)."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training labels replaced by a different class drawn uniformly, in [0, 1) "
            "(the paper's robustness setting). The test labels stay clean."
        },
    )


@dataclass
class ModelArguments:
    """The model: a pretrained checkpoint to fine-tune, or a small ViT built from `ViTConfig` and trained from
    scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained image classifier to fine-tune (hub name or local folder), e.g. "
            "google/vit-base-patch16-224-in21k. Default: a small ViT trained from scratch."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "From-scratch ViT only: input size (default: the embedded images' size, else 32)."},
    )
    patch_size: int | None = field(
        default=None,
        metadata={
            "help": "From-scratch ViT only: patch size, dividing the image size (default: 7 if it does, else 4, "
            "else 2: 7 for 28x28 Fashion-MNIST, 4 for 8x8 digits)."
        },
    )
    hidden_size: int = field(default=96, metadata={"help": "From-scratch ViT only: width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From-scratch ViT only: depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "From-scratch ViT only: attention heads."})


# Without --num_train_epochs the run sees this many training images: 4 epochs of the 12,000 Fashion-MNIST images,
# 34 epochs of the 1,437 digits of the fallback (4 epochs of those stop far short of what the model can learn).
IMAGES_TO_SEE = 48_000

# Defaults that make the no-flag run a few minutes on 2 CPU cores; every one can be overridden on the command line.
TRAINING_DEFAULTS = dict(
    output_dir="vit-vasso",
    num_train_epochs=4,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    learning_rate=2e-3,
    weight_decay=0.05,
    warmup_steps=0.1,
    lr_scheduler_type="cosine",
    eval_strategy="epoch",
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    remove_unused_columns=False,  # the transform needs the raw image column
    dataloader_num_workers=0,
    rho=0.05,
    theta=0.4,
)


def make_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, ModelArguments, VassoConfig))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


# ---------------------------------------------------------------------------------------------------- data


def load_data(script_args: ScriptArguments, seed: int):
    """Return `(DatasetDict(train, test), description)`; the columns are renamed to `image` and `label`."""
    import datasets

    if script_args.dataset_name is None:
        import sys

        sys.path.insert(0, HERE)
        from embedded_data import load_embedded_images

        dataset, name, _ = load_embedded_images(
            script_args.max_train_samples or None, script_args.max_test_samples or None, seed=seed
        )
        source = {"fashion_mnist": "Fashion-MNIST (Debian dataset-fashion-mnist)", "sklearn_digits": "sklearn digits"}
        return dataset, source[name]

    name = script_args.dataset_name
    try:
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, script_args.dataset_config)
    except Exception as e:  # the hub raises many types (connection, offline mode, not found, gated)
        raise ValueError(
            f"Could not load the dataset {name!r}: {type(e).__name__}: {e}\nIt may not exist, or this machine "
            f"cannot reach the hub (offline, HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 set, and it is not cached). "
            f"Use a reachable name, a local save_to_disk folder, or {EMBEDDED_DEFAULT}."
        ) from e

    for split in (script_args.train_split, script_args.test_split):
        if split not in dataset:
            raise ValueError(
                f"The dataset {name!r} has no split {split!r}; it has {sorted(dataset)}. Choose with "
                "--train_split / --test_split."
            )
    dataset = datasets.DatasetDict(train=dataset[script_args.train_split], test=dataset[script_args.test_split])
    columns = dataset["train"].column_names
    missing = [c for c in (script_args.image_column, script_args.label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"The dataset {name!r} has no column {', '.join(repr(c) for c in missing)}. Columns found: {columns}. "
            "Map them with --image_column and --label_column."
        )
    keep = [script_args.image_column, script_args.label_column]
    dataset = dataset.select_columns(keep)
    dataset = dataset.rename_columns({script_args.image_column: "image", script_args.label_column: "label"})
    for split, limit in (("train", script_args.max_train_samples), ("test", script_args.max_test_samples)):
        if limit and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(limit))
    return dataset, name


def check_labels(dataset) -> list[str]:
    """Refuse empty splits and labels outside [0, num_labels); return the label names."""
    import datasets
    import numpy as np

    for split in ("train", "test"):
        if len(dataset[split]) == 0:
            raise ValueError(f"The {split} split is empty: there is nothing to {split} on.")
    feature = dataset["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        labels = np.asarray(dataset["train"]["label"])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"Labels must be integers or a ClassLabel; the label column holds {labels.dtype} values. "
                "Encode them first (Dataset.class_encode_column)."
            )
        names = [str(i) for i in range(int(labels.max()) + 1)]
    for split in ("train", "test"):
        labels = np.asarray(dataset[split]["label"])
        bad = (labels < 0) | (labels >= len(names))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} {split} labels are out of range, e.g. {labels[bad][:5].tolist()}: labels must be "
                f"in [0, {len(names)}) for the {len(names)} classes {names[:10]}."
            )
    return names


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, print the result line; return the results (also written to `output_dir/results.json`)."""
    argv = sys.argv[1:] if argv is None else argv
    script_args, model_args, training_args = make_parser().parse_args_into_dataclasses(args=argv)
    if not 0 <= script_args.label_noise < 1:
        raise ValueError(
            f"--label_noise {script_args.label_noise} is invalid: the fraction of flipped training labels must be in "
            "[0, 1) (0.4 is the paper's heavy-noise setting)."
        )

    import json
    import math

    import evaluate
    import numpy as np
    import transformers
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    from hf_vasso import VassoTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    transformers.set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    dataset, source = load_data(script_args, training_args.seed)
    label_names = check_labels(dataset)
    num_labels = len(label_names)
    if training_args.max_steps <= 0 and not any(a.split("=")[0] == "--num_train_epochs" for a in argv):
        epochs = max(training_args.num_train_epochs, math.ceil(IMAGES_TO_SEE / len(dataset["train"])))
        training_args.num_train_epochs = epochs
    if script_args.label_noise > 0:
        sys.path.insert(0, HERE)
        from embedded_data import apply_label_noise

        noisy, flipped = apply_label_noise(
            dataset["train"]["label"], script_args.label_noise, num_labels, seed=training_args.seed
        )
        dataset["train"] = dataset["train"].remove_columns("label").add_column("label", noisy.tolist())
        logger.info(f"Label noise: {int(flipped.sum())} of {len(flipped)} training labels flipped.")

    # ------------------------------------------------------------------ model and processor
    id2label = dict(enumerate(label_names))
    label2id = {v: k for k, v in id2label.items()}
    sample = np.asarray(dataset["train"][0]["image"])
    embedded_arrays = script_args.dataset_name is None  # float32 [1, H, W] in [0, 1], not PIL images
    if model_args.model_name_or_path is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                num_labels=num_labels,
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,  # a new classification head for these labels
            )
        except OSError as e:
            raise ValueError(
                f"Could not load the model {model_args.model_name_or_path!r}: {e}\nIt may not exist, or this machine "
                "cannot reach the hub (offline, or HF_HUB_OFFLINE=1 set, and it is not cached). Use a reachable "
                "name or a local folder, or the embedded default: run without --model_name_or_path to train a "
                "small ViT from scratch."
            ) from e
        model_desc = f"{model_args.model_name_or_path} (fine-tuned)"
        channels = 3
    else:
        channels = sample.shape[0] if embedded_arrays else 3
        image_size = model_args.image_size or (sample.shape[-1] if embedded_arrays else 32)
        processor = ViTImageProcessor(
            do_resize=not embedded_arrays,
            size={"height": image_size, "width": image_size},
            do_rescale=not embedded_arrays,
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
            do_convert_rgb=not embedded_arrays,
        )
        patch_size = model_args.patch_size or next((p for p in (7, 4, 2) if image_size % p == 0), 1)
        if image_size % patch_size:
            raise ValueError(f"--patch_size {patch_size} does not divide the image size {image_size}.")
        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=channels,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=2 * model_args.hidden_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_labels,
            id2label=id2label,
            label2id=label2id,
        )
        model = ViTForImageClassification(config)
        n_params = sum(p.numel() for p in model.parameters())
        model_desc = f"small ViT (patch {patch_size}) trained from scratch ({n_params / 1e6:.2f}M parameters)"

    def transform(batch):
        if embedded_arrays:
            images = [np.asarray(x, dtype=np.float32) for x in batch["image"]]
            pixels = processor(images, return_tensors="pt", input_data_format="channels_first")
        else:
            images = [x.convert("RGB") if channels == 3 else x.convert("L") for x in batch["image"]]
            pixels = processor(images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "labels": batch["label"]}

    train_dataset = dataset["train"].with_transform(transform)
    test_dataset = dataset["test"].with_transform(transform)

    # ------------------------------------------------------------------ training
    accuracy = evaluate.load(os.path.join(HERE, "metrics", "accuracy"))  # a local module: no hub fetch

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    trainer = VassoTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        processing_class=processor,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate(metric_key_prefix="test")
    seconds = time.time() - start
    if training_args.save_strategy != "no" or training_args.push_to_hub:
        trainer.save_model()

    # ------------------------------------------------------------------ report
    results = {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "data": source,
        "num_train": len(dataset["train"]),
        "num_test": len(dataset["test"]),
        "label_noise": script_args.label_noise,
        "model": model_desc,
        "rho": training_args.rho,
        "theta": training_args.theta,
        "adversary_prob": training_args.adversary_prob,
        "global_steps": trainer.state.global_step,
        "num_processes": trainer.accelerator.num_processes,
        "seconds": seconds,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    noise = f", {script_args.label_noise:.0%} label noise" if script_args.label_noise else ""
    trainer.accelerator.print(
        f"Test accuracy {metrics['test_accuracy']:.2%} on {source} ({len(dataset['train'])} train / "
        f"{len(dataset['test'])} test images{noise}), {model_desc}, VASSO rho={training_args.rho} "
        f"theta={training_args.theta} adversary_prob={training_args.adversary_prob}, "
        f"{trainer.state.global_step} steps in {seconds:.0f} s. Results: {training_args.output_dir}/results.json"
    )
    return results


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_initialized():  # under accelerate launch / torchrun: shut the process group down cleanly
        dist.destroy_process_group()
