"""`adversary_prob = 0` is the base optimizer across the Trainer's features, and `adversary_prob = 1` keeps the
Trainer's bookkeeping (steps, token counts, log cadence, checkpoint layout) across the same features.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_args, tiny_llama, token_dataset, weights
from transformers import Trainer

from hf_vasso import VassoTrainer

BASE = dict(per_device_train_batch_size=4, max_steps=-1, num_train_epochs=2, learning_rate=1e-2, logging_steps=2)
SAVING = dict(save_strategy="steps", save_steps=2)

# Each entry: the Trainer features it turns on. 20 rows = 5 micro-batches an epoch; with accumulation 3 the last
# step of each epoch is uneven (2 micro-batches).
FEATURES = {
    "uneven_accumulation": dict(gradient_accumulation_steps=3),
    "checkpointing_reentrant": dict(
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    ),
    "checkpointing": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    "label_smoothing": dict(label_smoothing_factor=0.1),
    "neftune": dict(neftune_noise_alpha=5.0),
    "adamw_torch_fused": dict(optim="adamw_torch_fused"),
    "sgd": dict(optim="sgd", learning_rate=0.1),
    "adafactor": dict(optim="adafactor"),
    "clipping_cosine": dict(max_grad_norm=0.5, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1),
    "tokens_seen": dict(include_num_input_tokens_seen=True, gradient_accumulation_steps=2),
    "best_model_at_end": dict(
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss", **SAVING
    ),
}

VOLATILE = ("runtime", "per_second", "vasso/", "total_flos")


def run(trainer_cls, output_dir, *, model_init=False, resume_at=None, **overrides):
    """Train a tiny Llama; returns (weights, log rows without timings, files of each checkpoint, total_flos)."""
    args = make_args(output_dir, **{**BASE, **overrides})
    data = dict(train_dataset=token_dataset(20, seed=3), eval_dataset=token_dataset(8, seed=4))
    if model_init:
        trainer = trainer_cls(model_init=lambda: tiny_llama(), args=args, **data)
        trainer.train()
        trainer.train()
    else:
        trainer = trainer_cls(tiny_llama(), args, **data)
        trainer.train()
        if resume_at is not None:
            trainer = trainer_cls(tiny_llama(seed=9), args, **data)
            trainer.train(resume_from_checkpoint=os.path.join(output_dir, f"checkpoint-{resume_at}"))
    logs = [{k: v for k, v in row.items() if not any(s in k for s in VOLATILE)} for row in trainer.state.log_history]
    checkpoints = {
        name: sorted(os.listdir(os.path.join(output_dir, name)))
        for name in sorted(os.listdir(output_dir))
        if name.startswith("checkpoint-")
    }
    return weights(trainer.model), logs, checkpoints, trainer.state.total_flos


CASES = {**FEATURES, "model_init": dict(model_init=True), "resume_mid_epoch": dict(resume_at=2, **SAVING)}


@pytest.mark.parametrize("case", CASES)
def test_adversary_prob_0_is_the_plain_trainer(tmp_path, case):
    plain = run(Trainer, str(tmp_path / "plain"), **CASES[case])
    vasso = run(VassoTrainer, str(tmp_path / "vasso"), adversary_prob=0.0, **CASES[case])
    for name, value in plain[0].items():
        assert torch.equal(value, vasso[0][name]), name
    assert plain[1] == vasso[1]  # every logged value: loss, grad_norm, lr, steps, epochs, token counts, eval
    assert {k: [f for f in v if not f.startswith("vasso_state")] for k, v in vasso[2].items()} == plain[2]
    assert plain[3] == vasso[3]


@pytest.mark.parametrize("case", CASES)
def test_adversary_prob_1_keeps_the_trainer_bookkeeping(tmp_path, case):
    plain = run(Trainer, str(tmp_path / "plain"), **CASES[case])
    vasso = run(VassoTrainer, str(tmp_path / "vasso"), adversary_prob=1.0, **CASES[case])
    counters = ("step", "epoch", "num_input_tokens_seen")
    assert [{k: row.get(k) for k in counters} | {"keys": sorted(row)} for row in plain[1]] == [
        {k: row.get(k) for k in counters} | {"keys": sorted(row)} for row in vasso[1]
    ]
    assert {k: [f for f in v if f != "vasso_state.pt"] for k, v in vasso[2].items()} == plain[2]
    assert all("vasso_state.pt" in files for files in vasso[2].values())
    changed = [name for name, value in plain[0].items() if not torch.equal(value, vasso[0][name])]
    assert changed  # VASSO really ran
