"""VASSO for Trainer subclasses: TRL's SFT and DPO trainers, Seq2Seq, and the rules for a user's own."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import make_args, make_dataset, make_model, tiny_llama, weights
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from hf_vasso import (
    VassoArguments,
    VassoConfig,
    VassoSeq2SeqConfig,
    VassoSeq2SeqTrainer,
    VassoTrainer,
    VassoTrainerMixin,
)
from hf_vasso.rules import GENERATING_TRAINERS, refuse_generating_trainer

trl = pytest.importorskip("trl")
from hf_vasso.trl import VassoDPOConfig, VassoDPOTrainer, VassoSFTConfig, VassoSFTTrainer  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log red blue big small and is was very".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS` (ids < 64, the tiny Llama's vocabulary), built offline."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n_words),), generator=g))
        for n_words in torch.randint(4, 10, (n,), generator=g)
    ]


COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=4,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,
    seed=42,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
VOLATILE = ("runtime", "per_second", "vasso/", "total_flos")


def clean_logs(trainer) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(s in k for s in VOLATILE)} for row in trainer.state.log_history]


def assert_same_weights(a, b) -> None:
    for name, value in weights(a).items():
        assert torch.equal(value, weights(b)[name]), name


# ---------------------------------------------------------------- TRL: SFT


def sft(trainer_cls, config_cls, tmp_path, peft_config=None, **overrides):
    args = config_cls(output_dir=str(tmp_path), max_length=16, **{**COMMON, **overrides})
    data = Dataset.from_dict({"text": sentences(16)})
    trainer = trainer_cls(
        model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer(), peft_config=peft_config
    )
    trainer.train()
    return trainer


def test_sft_adversary_prob_0_is_plain_sft(tmp_path):
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "plain")
    vasso = sft(VassoSFTTrainer, VassoSFTConfig, tmp_path / "vasso", adversary_prob=0.0)
    assert_same_weights(plain.model, vasso.model)
    assert clean_logs(plain) == clean_logs(vasso)


def test_sft_metrics_are_the_clean_pass(tmp_path):
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "plain")
    vasso = sft(VassoSFTTrainer, VassoSFTConfig, tmp_path / "vasso", theta=0.4, rho=0.1)
    plain_rows, vasso_rows = clean_logs(plain)[:-1], clean_logs(vasso)[:-1]
    assert [r["num_tokens"] for r in vasso_rows] == [r["num_tokens"] for r in plain_rows]  # not doubled
    for key in ("loss", "mean_token_accuracy", "entropy"):  # step 1: the weights are still equal
        assert vasso_rows[0][key] == plain_rows[0][key], key
    assert [sorted(r) for r in vasso_rows] == [sorted(r) for r in plain_rows]
    assert all("vasso/sharpness" in row for row in vasso.state.log_history[:-1])
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), vasso.model.parameters()))


def test_sft_lora_through_trl_peft_config_keeps_the_base_frozen(tmp_path):
    from peft import LoraConfig

    before = weights(tiny_llama())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = sft(VassoSFTTrainer, VassoSFTConfig, tmp_path, peft_config=lora)
    after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in weights(trainer.model).items()
    }
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in weights(trainer.model).items())
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert sum(d.numel() for d in trainer.vasso.d if d is not None) == sum(p.numel() for p in trainable)


def test_sft_resume_is_bit_exact(tmp_path):
    saving = dict(save_strategy="steps", save_steps=2, adversary_prob=0.5)
    full = sft(VassoSFTTrainer, VassoSFTConfig, tmp_path / "full", **saving)
    args = VassoSFTConfig(output_dir=str(tmp_path / "resumed"), max_length=16, **{**COMMON, **saving})
    resumed = VassoSFTTrainer(
        model=tiny_llama(seed=5),
        args=args,
        train_dataset=Dataset.from_dict({"text": sentences(16)}),
        processing_class=tiny_tokenizer(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_weights(full.model, resumed.model)  # (num_tokens restarts at 0 on resume in plain TRL too)


def test_trl_configs_keep_trl_defaults():
    for vasso_cls, trl_cls in ((VassoSFTConfig, trl.SFTConfig), (VassoDPOConfig, trl.DPOConfig)):
        vasso_fields = {f.name: f.default for f in dataclasses.fields(vasso_cls)}
        for f in dataclasses.fields(trl_cls):
            assert vasso_fields[f.name] == f.default, (vasso_cls.__name__, f.name)
        assert vasso_fields["rho"] == 0.05


def test_plain_training_arguments_become_the_trl_config(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    trainer = VassoSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": sentences(8)}),
        processing_class=tiny_tokenizer(),
    )
    assert isinstance(trainer.args, VassoSFTConfig) and trainer.args.learning_rate == 1e-2


# ---------------------------------------------------------------- TRL: DPO


def dpo(trainer_cls, config_cls, tmp_path, **overrides):
    prompts, chosen, rejected = sentences(12, 1), sentences(12, 2), sentences(12, 3)
    data = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    args = config_cls(output_dir=str(tmp_path), max_length=24, **{**COMMON, **overrides})
    trainer = trainer_cls(
        model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    return trainer


def test_dpo_adversary_prob_0_is_plain_dpo(tmp_path):
    plain = dpo(trl.DPOTrainer, trl.DPOConfig, tmp_path / "plain")
    vasso = dpo(VassoDPOTrainer, VassoDPOConfig, tmp_path / "vasso", adversary_prob=0.0)
    assert_same_weights(plain.model, vasso.model)
    assert clean_logs(plain) == clean_logs(vasso)


def test_dpo_metrics_are_the_clean_pass(tmp_path):
    plain = dpo(trl.DPOTrainer, trl.DPOConfig, tmp_path / "plain")
    vasso = dpo(VassoDPOTrainer, VassoDPOConfig, tmp_path / "vasso", rho=0.1)
    plain_rows, vasso_rows = clean_logs(plain)[:-1], clean_logs(vasso)[:-1]
    assert [sorted(r) for r in vasso_rows] == [sorted(r) for r in plain_rows]
    assert [r["num_tokens"] for r in vasso_rows] == [r["num_tokens"] for r in plain_rows]
    # Step 1, every DPO metric (rewards, margins, log-probabilities); the Trainer's grad_norm is pass 2's by design.
    assert {k: v for k, v in vasso_rows[0].items() if k != "grad_norm"} == {
        k: v for k, v in plain_rows[0].items() if k != "grad_norm"
    }
    assert all("vasso/sharpness" in row for row in vasso.state.log_history[:-1])


# ---------------------------------------------------------------- TRL's other offline trainers: the README's two lines


class VassoRewardTrainer(VassoTrainerMixin, trl.RewardTrainer):
    pass


class VassoKTOTrainer(VassoTrainerMixin, trl.KTOTrainer):
    pass


def tiny_reward_model():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def reward(trainer_cls, tmp_path, **overrides):
    data = Dataset.from_dict({"chosen": sentences(16, 2), "rejected": sentences(16, 3)})
    args = trl.RewardConfig(output_dir=str(tmp_path), max_length=16, **{**COMMON, **overrides})
    trainer = trainer_cls(model=tiny_reward_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


def kto(trainer_cls, tmp_path, **overrides):
    labels = [i % 2 == 0 for i in range(16)]
    data = Dataset.from_dict({"prompt": sentences(16, 1), "completion": sentences(16, 2), "label": labels})
    args = trl.KTOConfig(output_dir=str(tmp_path), max_length=24, **{**COMMON, **overrides})
    trainer = trainer_cls(
        model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "run, plain_cls, vasso_cls",
    [(reward, trl.RewardTrainer, VassoRewardTrainer), (kto, trl.KTOTrainer, VassoKTOTrainer)],
    ids=["RewardTrainer", "KTOTrainer"],
)
def test_offline_trl_trainer_through_the_generic_mixin_logs_the_clean_pass(tmp_path, run, plain_cls, vasso_cls):
    """`class VassoX(VassoTrainerMixin, X)`: num_tokens counted once at every step, step-1 metrics plain TRL's."""
    plain = run(plain_cls, tmp_path / "p")
    vasso = run(vasso_cls, tmp_path / "v")  # the plain TRL config, upgraded with the default VASSO fields
    plain_rows, vasso_rows = clean_logs(plain)[:-1], clean_logs(vasso)[:-1]
    assert len(vasso_rows) == 4 and [sorted(r) for r in vasso_rows] == [sorted(r) for r in plain_rows]
    assert [r["num_tokens"] for r in vasso_rows] == [r["num_tokens"] for r in plain_rows]  # not doubled
    # Step 1: the weights are still equal, so every metric is (the Trainer's grad_norm is pass 2's by design).
    assert {k: v for k, v in vasso_rows[0].items() if k != "grad_norm"} == {
        k: v for k, v in plain_rows[0].items() if k != "grad_norm"
    }
    assert all("vasso/sharpness" in row for row in vasso.state.log_history[:-1])
    assert vasso.vasso.step == 4 and isinstance(vasso.args, VassoArguments)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), vasso.model.parameters()))


@pytest.mark.parametrize("name", ["CPO", "ORPO", "TPO"])
def test_experimental_offline_trl_trainers_count_their_stored_metrics_once(tmp_path, name):
    """CPO and ORPO keep their metrics in `_stored_metrics`, TPO in `_metrics` with a token count: at
    `adversary_prob=0` the weights and logs equal plain TRL's, and with VASSO every row has the same keys, step 1 the
    same values and `num_tokens` (TPO) is counted once."""
    module = importlib.import_module(f"trl.experimental.{name.lower()}")
    trainer_cls, config_cls = getattr(module, f"{name}Trainer"), getattr(module, f"{name}Config")
    vasso_cls = type(f"Vasso{name}Trainer", (VassoTrainerMixin, trainer_cls), {})
    vasso_config_cls = dataclasses.dataclass(type(f"Vasso{name}Config", (VassoArguments, config_cls), {}))
    columns = {"prompt": sentences(12, 1), "chosen": sentences(12, 2), "rejected": sentences(12, 3)}
    if name == "TPO":  # a triple preference: the gold completion too
        columns["reference"] = sentences(12, 4)
    data = Dataset.from_dict(columns)

    def train(cls, out, config=config_cls, **overrides):
        args = config(output_dir=str(tmp_path / out), max_length=24, **{**COMMON, **overrides})
        trainer = cls(model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
        trainer.train()
        return trainer

    plain, vasso = train(trainer_cls, "p"), train(vasso_cls, "v")  # the plain TRL config, given the VASSO defaults
    off = train(vasso_cls, "off", config=vasso_config_cls, adversary_prob=0.0)
    assert_same_weights(plain.model, off.model)
    assert clean_logs(plain) == clean_logs(off) and off.vasso.step == 4

    plain_rows, vasso_rows = clean_logs(plain)[:-1], clean_logs(vasso)[:-1]
    assert len(vasso_rows) == 4 and [sorted(r) for r in vasso_rows] == [sorted(r) for r in plain_rows]
    assert {k: v for k, v in vasso_rows[0].items() if k != "grad_norm"} == {
        k: v for k, v in plain_rows[0].items() if k != "grad_norm"
    }
    if "num_tokens" in plain_rows[0]:
        assert [r["num_tokens"] for r in vasso_rows] == [r["num_tokens"] for r in plain_rows]  # not doubled
    assert vasso.vasso.step == 4
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), vasso.model.parameters()))


def test_sft_config_given_to_vasso_sft_trainer_becomes_the_one_vasso_sft_config(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=16, **COMMON)
    trainer = VassoSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": sentences(8)}),
        processing_class=tiny_tokenizer(),
    )
    assert type(trainer.args) is VassoSFTConfig  # not a second class of the same name
    assert trainer.args.max_length == 16 and not isinstance(args, VassoArguments)


# ---------------------------------------------------------------- online trainers are refused


# Every Trainer class the installed TRL defines (in `trl` and `trl.experimental`), classified by hand from its source:
# True = samples completions from the current policy inside `training_step` (refused: pass 2 would sample anew),
# False = trains on the batch it is given (CPO and ORPO generate in evaluation only). A TRL release that adds or
# removes a trainer fails `test_the_refused_trainers_are_pinned_against_installed_trl` until it is classified here.
TRL_TRAINERS = {
    **dict.fromkeys(["GRPOTrainer", "AsyncGRPOTrainer", "GMPOTrainer", "RLOOTrainer", "OnlineDPOTrainer"], True),
    **dict.fromkeys(["GKDTrainer", "GOLDTrainer", "DistillationTrainer", "AsyncDistillationTrainer"], True),
    **dict.fromkeys(["ServerDistillationTrainer", "IWOPDTrainer", "SDFTTrainer", "SDPOTrainer", "A2POTrainer"], True),
    **dict.fromkeys(["SFTTrainer", "DPOTrainer", "KTOTrainer", "RewardTrainer", "CPOTrainer", "ORPOTrainer"], False),
    "TPOTrainer": False,
}
# Refused for TRL 1.0, pyproject.toml's lower bound, whose trl.experimental had them (ppo, nash_md, xpo); gone since.
GENERATING_IN_OLDER_TRL = {"PPOTrainer", "NashMDTrainer", "XPOTrainer"}


@functools.cache
def installed_trl_trainers() -> dict[str, tuple[type, ...]]:
    """Each `transformers.Trainer` subclass the installed TRL's modules define, by name (two DPOTrainers: TRL's and
    trl.experimental.bema_for_ref_model's). Only the modules whose source defines a class named or based on a
    `...Trainer` are imported."""
    root, found = Path(trl.__file__).parent, {}
    for file in sorted(root.rglob("*.py")):
        if not re.search(r"^class (\w*Trainer|\w+\([^)]*Trainer)", file.read_text(), flags=re.M):
            continue
        parts = file.relative_to(root).with_suffix("").parts
        with warnings.catch_warnings():  # TRL warns on each import from trl.experimental
            warnings.simplefilter("ignore")
            module = importlib.import_module(".".join(("trl", *parts[: -1 if parts[-1] == "__init__" else None])))
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, Trainer) and value.__module__ == module.__name__:
                if not name.startswith("_"):
                    found[name] = (*found.get(name, ()), value)
    return found


@pytest.mark.parametrize("name", sorted(TRL_TRAINERS))
def test_trl_trainers_that_generate_in_training_step_are_refused(name):
    """`class VassoX(VassoTrainerMixin, X)`, for each TRL trainer X: refused when constructed if X generates in
    `training_step` (by its name or a base class's), with a message that names the offline trainers that work."""
    classes = installed_trl_trainers().get(name)
    assert classes, f"the installed TRL has no {name}"
    for base in classes:
        vasso_class = type(f"Vasso{name}", (VassoTrainerMixin, base), {})
        if not TRL_TRAINERS[name]:
            refuse_generating_trainer(vasso_class)  # raises nothing: an offline trainer works
            continue
        with pytest.raises(ValueError, match="generates completions inside training_step") as error:
            vasso_class(model=None)
        assert "RewardTrainer, KTOTrainer" in str(error.value)


def test_the_refused_trainers_are_pinned_against_installed_trl():
    """As `OptimizerNames` is pinned in test_trainer_paths.py: every trainer the installed TRL defines is classified
    above, and every name the refusal matches is a generating trainer of this TRL or of TRL 1.0."""
    installed = installed_trl_trainers()
    assert set(installed) == set(TRL_TRAINERS), f"classify: {sorted(set(installed) ^ set(TRL_TRAINERS))}"
    generating = {name for name, generates in TRL_TRAINERS.items() if generates}
    assert not GENERATING_TRAINERS - generating - GENERATING_IN_OLDER_TRL, "refused, but no TRL trainer of that name"
    assert GENERATING_IN_OLDER_TRL <= GENERATING_TRAINERS and not GENERATING_IN_OLDER_TRL & set(installed)
    assert not GENERATING_TRAINERS & (set(TRL_TRAINERS) - generating), "an offline trainer is refused"


# ---------------------------------------------------------------- Seq2Seq


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def seq2seq(trainer_cls, config_cls, tmp_path, **overrides):
    g = torch.Generator().manual_seed(0)
    source = torch.randint(2, 64, (16, 8), generator=g)
    data = Dataset.from_dict({"input_ids": source.tolist(), "labels": source.flip(-1).tolist()}).with_format("torch")
    args = config_cls(
        output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=6, **{**COMMON, **overrides}
    )
    trainer = trainer_cls(model=tiny_t5(), args=args, train_dataset=data, eval_dataset=data.select(range(4)))
    trainer.train()
    return trainer, trainer.predict(data.select(range(4)))


def test_seq2seq_adversary_prob_0_is_plain_seq2seq_and_generates(tmp_path):
    plain, plain_out = seq2seq(Seq2SeqTrainer, Seq2SeqTrainingArguments, tmp_path / "plain")
    vasso, vasso_out = seq2seq(VassoSeq2SeqTrainer, VassoSeq2SeqConfig, tmp_path / "vasso", adversary_prob=0.0)
    assert_same_weights(plain.model, vasso.model)
    assert clean_logs(plain) == clean_logs(vasso)
    assert (vasso_out.predictions == plain_out.predictions).all()  # generated in predict, as Seq2SeqTrainer does


def test_seq2seq_vasso_trains_and_logs(tmp_path):
    vasso, out = seq2seq(VassoSeq2SeqTrainer, VassoSeq2SeqConfig, tmp_path, rho=0.1)
    assert vasso.vasso.step == 4 and "vasso/sharpness" in vasso.state.log_history[0]
    assert out.predictions.shape[0] == 4


# ---------------------------------------------------------------- a user's own subclass: the base order rule


class MyTrainer(Trainer):
    """A user's trainer with a side effect in compute_loss that must count each step once."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls = getattr(self, "calls", 0) + 1
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@dataclasses.dataclass
class MyArgs(TrainingArguments):
    my_flag: int = 7
    learning_rate: float = 3e-3


@dataclasses.dataclass
class VassoMyArgs(VassoArguments, MyArgs):
    pass


class VassoMyTrainer(VassoTrainerMixin, MyTrainer):
    def __init__(self, *args, **kwargs):  # the common pass-through constructor
        super().__init__(*args, **kwargs)

    def perturbed_pass_context(self, model):
        import contextlib

        from hf_vasso import restored_attributes

        stack = contextlib.ExitStack()
        stack.enter_context(super().perturbed_pass_context(model))
        stack.enter_context(restored_attributes(self, ("calls",)))
        return stack


def test_a_users_subclass_with_the_documented_base_order(tmp_path):
    args = VassoMyArgs(output_dir=str(tmp_path), max_steps=3, use_cpu=True, report_to=[], rho=0.2)
    assert (args.learning_rate, args.my_flag, args.rho) == (3e-3, 7, 0.2)  # the user's defaults survive
    trainer = VassoMyTrainer(make_model(), args, train_dataset=make_dataset())
    trainer.train()
    assert trainer.calls == 3 and trainer.vasso.step == 3  # pass 2 ran, its side effect was undone
    with pytest.raises(ValueError, match="rho"):
        VassoMyArgs(output_dir=str(tmp_path), rho=-1.0)


def test_vasso_config_is_the_mixin_on_training_arguments(tmp_path):
    assert issubclass(VassoConfig, VassoArguments) and issubclass(VassoTrainer, VassoTrainerMixin)
    trainer = VassoTrainer(make_model(), make_args(tmp_path), train_dataset=make_dataset())
    assert trainer.args.rho == 0.1
