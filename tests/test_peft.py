"""Every common PEFT method: VASSO perturbs and trains the adapters only, and the frozen base stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers import make_args, tiny_llama, token_dataset
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PromptTuningConfig, TaskType

from hf_vasso import VassoTrainer

ATTENTION = ["q_proj", "v_proj"]
PEFT_METHODS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.0),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, lora_dropout=0.0, use_dora=True),
    "lora_modules_to_save": LoraConfig(r=4, target_modules=ATTENTION, modules_to_save=["lm_head"], lora_dropout=0.0),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt_tuning": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "lokr": LoKrConfig(r=4, target_modules=ATTENTION),
    "loha": LoHaConfig(r=4, target_modules=ATTENTION),
}


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_method_trains_adapters_and_keeps_the_base(tmp_path, method):
    trainer = VassoTrainer(
        tiny_llama(),
        make_args(tmp_path, max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2),
        train_dataset=token_dataset(),
        peft_config=PEFT_METHODS[method],
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    held = [p for p, d in zip(trainer.vasso.params, trainer.vasso.d) if d is not None]
    assert {id(p) for p in held} == {id(p) for n, p in after.items() if n in trainable}  # d for adapters only
