# /// script
# requires-python = ">=3.10"
# dependencies = ["torch", "transformers>=5.23,<6", "datasets", "evaluate", "scikit-learn", "tqdm"]
# # and hf_vasso, which is on no package index: `pip install -e .` in its checkout
# ///
# Copyright 2026 The hf_vasso authors. MIT licence.
"""Image classification with a Vision Transformer, trained by `VassoTrainer`.

Offline default (no network, no flags): Fashion-MNIST from the Debian package `dataset-fashion-mnist`, 12,000 train
and 2,000 test images (without the package: scikit-learn's 1,797 8x8 digits, the run says which), and a small ViT
trained FROM SCRATCH (no package ships pretrained ViT weights) on 48,000 images' worth of epochs: 4 on Fashion-MNIST,
34 on the digits. About 1.5 minutes on 2 CPU cores with `OMP_NUM_THREADS=1` (45 s on the digits). It says which data
it uses when it starts, and saves the model (and its image processor) to `--output_dir` when it ends.

    python recipes/vit_image_classification.py
    python recipes/vit_image_classification.py --label_noise 0.4 --theta 0.2     # 40% of the labels flipped
    python recipes/vit_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name uoft-cs/cifar10 --image_column img --learning_rate 2e-5 --num_train_epochs 3
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/vit_image_classification.py \\
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name uoft-cs/cifar10 --image_column img

Every `VassoConfig` / `TrainingArguments` flag works (`--adversary_prob 0.3` is eVASSO, `--theta 1` is SAM); `--help`
lists them. `--dataset_name` also takes a folder written by `DatasetDict.save_to_disk`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import embedded_data  # the offline defaults, next to this file
from transformers import HfArgumentParser

from hf_vasso import VassoConfig, VassoTrainer

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES_TO_SEE = 48_000  # without --num_train_epochs: 4 epochs of 12,000 Fashion-MNIST images, 34 of 1,437 digits


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, print the result line; return the results (also written to `output_dir/results.json`)."""
    import evaluate
    import numpy as np
    import transformers

    argv = sys.argv[1:] if argv is None else argv
    script_args, model_args, training_args = make_parser().parse_args_into_dataclasses(args=argv)
    if not 0 <= script_args.label_noise < 1:
        raise ValueError(
            f"--label_noise {script_args.label_noise} is invalid: the fraction of flipped training labels must be in "
            "[0, 1) (0.4 is the paper's heavy-noise setting)."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    transformers.set_seed(training_args.seed)

    embedded_data.warn_if_overwriting(training_args)
    dataset, source = load_data(script_args, training_args.seed)
    label_names = embedded_data.check_labels(dataset)
    if training_args.max_steps <= 0 and not any(a.split("=")[0] == "--num_train_epochs" for a in argv):
        training_args.num_train_epochs = max(
            training_args.num_train_epochs, math.ceil(IMAGES_TO_SEE / len(dataset["train"]))
        )
    model, processor, transform, model_desc = build_model(
        model_args, script_args, label_names, dataset["train"][0]["image"]
    )
    sizes = f"{len(dataset['train'])} train / {len(dataset['test'])} test images"
    logger.info(f"Training on {source} ({sizes}), {model_desc}.")
    accuracy = evaluate.load(os.path.join(HERE, "metrics", "accuracy"))  # a local module: no hub fetch

    trainer = VassoTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"].with_transform(transform),
        eval_dataset=dataset["test"].with_transform(transform),
        processing_class=processor,
        compute_metrics=lambda p: accuracy.compute(predictions=np.argmax(p[0], axis=-1), references=p[1]),
    )
    trainer.train(resume_from_checkpoint=embedded_data.checkpoint_to_resume(training_args))
    metrics = trainer.evaluate(metric_key_prefix="test")
    trainer.save_model()  # the model and its image processor: from_pretrained(output_dir) loads them

    results = {  # embedded_data.write_results adds the VASSO settings, steps and log history
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "data": source,
        "num_train": len(dataset["train"]),
        "num_test": len(dataset["test"]),
        "label_noise": script_args.label_noise,
        "model": model_desc,
        "seconds": time.time() - start,
    }
    embedded_data.write_results(trainer, results)
    noise = f", {script_args.label_noise:.0%} label noise" if script_args.label_noise else ""
    trainer.accelerator.print(
        f"Test accuracy {metrics['test_accuracy']:.2%} on {source} ({results['num_train']} train / "
        f"{results['num_test']} test images{noise}), {model_desc}, VASSO rho={training_args.rho} "
        f"theta={training_args.theta} adversary_prob={training_args.adversary_prob} "
        f"adversary={training_args.adversary}, "
        f"{trainer.state.global_step} steps in {results['seconds']:.0f} s. "
        f"Model and results.json saved to {training_args.output_dir}"
    )
    trainer.accelerator.end_training()  # under accelerate launch / torchrun: the process group ends cleanly
    return results


# ---------------------------------------------------------------------------------------------------- arguments


@dataclass
class ScriptArguments:
    """Which data to train on, and how much of it."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset or save_to_disk folder. Default: the embedded Fashion-MNIST, or sklearn digits."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer (or class) labels."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to report test accuracy on."})
    max_train_samples: int | None = field(default=12000, metadata={"help": "Seeded random subset (0: all)."})
    max_test_samples: int | None = field(default=2000, metadata={"help": "Seeded random subset (0: all)."})
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction of training labels replaced by a different class drawn uniformly, in [0, 1)."},
    )


@dataclass
class ModelArguments:
    """A pretrained checkpoint to fine-tune, or a small ViT built from `ViTConfig` and trained from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained image classifier (hub name or folder). Default: a small ViT."}
    )
    image_size: int | None = field(default=None, metadata={"help": "From scratch: input size (default: the data's)."})
    patch_size: int | None = field(
        default=None, metadata={"help": "From scratch: patch size (default: 7, 4 or 2, the first that divides it)."}
    )
    hidden_size: int = field(default=96, metadata={"help": "From scratch: width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})


TRAINING_DEFAULTS = dict(  # a minute or two on 2 CPU cores; every one can be overridden on the command line
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


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, ModelArguments, VassoConfig))
    parser.set_defaults(**TRAINING_DEFAULTS)
    embedded_data.vasso_flags_first(parser, VassoConfig)
    return parser


# ---------------------------------------------------------------------------------------------------- data, model


def load_data(script_args: ScriptArguments, seed: int):
    """Return `(DatasetDict(train, test) with 'image' and 'label' columns, description)`."""
    import datasets

    if script_args.dataset_name is None:
        dataset, name, _ = embedded_data.load_embedded_images(
            script_args.max_train_samples or None, script_args.max_test_samples or None, seed=seed
        )
        source = {"fashion_mnist": "Fashion-MNIST (Debian dataset-fashion-mnist)", "sklearn_digits": "sklearn digits"}[
            name
        ]
    else:
        s = script_args
        raw = embedded_data.load_named_dataset(
            s.dataset_name,
            s.dataset_config,
            [s.train_split, s.test_split],
            [s.image_column, s.label_column],
            "--image_column and --label_column",
            "the embedded default (run without --dataset_name: Fashion-MNIST from the Debian package "
            "dataset-fashion-mnist, or scikit-learn digits)",
        )
        dataset = datasets.DatasetDict(train=raw[s.train_split], test=raw[s.test_split])
        dataset = dataset.select_columns([s.image_column, s.label_column])
        dataset = dataset.rename_columns({s.image_column: "image", s.label_column: "label"})
        for split, limit in (("train", s.max_train_samples), ("test", s.max_test_samples)):
            if limit and limit < len(dataset[split]):
                dataset[split] = dataset[split].shuffle(seed=seed).select(range(limit))
        source = s.dataset_name
    if script_args.label_noise > 0:
        noisy, flipped = embedded_data.apply_label_noise(
            dataset["train"]["label"], script_args.label_noise, len(embedded_data.check_labels(dataset)), seed=seed
        )
        dataset["train"] = dataset["train"].remove_columns("label").add_column("label", noisy.tolist())
        logger.info(f"Label noise: {int(flipped.sum())} of {len(flipped)} training labels flipped.")
    return dataset, source


def build_model(model_args: ModelArguments, script_args: ScriptArguments, label_names: list[str], sample):
    """Return `(model, image processor, transform for with_transform, description)`."""
    import numpy as np
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    id2label = dict(enumerate(label_names))
    labels = dict(num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    arrays = script_args.dataset_name is None  # the embedded data: float32 [1, H, W] in [0, 1], not PIL images
    sample = np.asarray(sample)
    if model_args.model_name_or_path is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                ignore_mismatched_sizes=True,
                **labels,  # a new head for these labels
            )
        except OSError as e:
            raise embedded_data.model_load_error(
                model_args.model_name_or_path, e, "run without --model_name_or_path to train a small ViT from scratch"
            ) from e
        channels, desc = 3, f"{model_args.model_name_or_path} (fine-tuned)"
    else:
        channels = sample.shape[0] if arrays else 3
        size = model_args.image_size or (sample.shape[-1] if arrays else 32)
        patch = model_args.patch_size or next((p for p in (7, 4, 2) if size % p == 0), 1)
        if size % patch:
            raise ValueError(f"--patch_size {patch} does not divide the image size {size}.")
        processor = ViTImageProcessor(
            do_resize=not arrays,
            size={"height": size, "width": size},
            do_rescale=not arrays,
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
            do_convert_rgb=not arrays,
        )
        config = ViTConfig(
            image_size=size,
            patch_size=patch,
            num_channels=channels,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=2 * model_args.hidden_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **labels,
        )
        model = ViTForImageClassification(config)
        n = sum(p.numel() for p in model.parameters())
        desc = f"small ViT (patch {patch}) trained from scratch ({n / 1e6:.2f}M parameters)"

    def transform(batch):
        if arrays:
            images = [np.asarray(x, dtype=np.float32) for x in batch["image"]]
            pixels = processor(images, return_tensors="pt", input_data_format="channels_first")
        else:
            images = [x.convert("RGB" if channels == 3 else "L") for x in batch["image"]]
            pixels = processor(images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "labels": batch["label"]}

    return model, processor, transform, desc


if __name__ == "__main__":
    main()
