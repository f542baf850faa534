"""Every code block of the user docs runs here, one test per block, so a doc that drifts from the code fails CI.

The docs: README.md, recipes/README.md, tests/README.md and docs/*.md. Blocks by language:

- `python`: executed as written, in a namespace that supplies the names a block leaves undefined (`model`,
  `train_ds`, `eval_ds`, `loader`, `loss_fn`, `MyTrainer`, `MyTrainingArguments`) with tiny offline stand-ins.
  The only substitution: `hf_vasso.VassoConfig` is replaced, for the block, by a subclass that moves `output_dir`
  under the test's temporary folder and trains 2 steps on CPU with no reporting or saving; the block's text is never
  changed. Afterwards the test checks what the block built: a trainer trained with VASSO steps, a `VASSO` optimizer
  took a VASSO step (a block that loops over `loader`: one step per batch, or per `K` batches where it sets `K`, each
  equal to one step on the `K` batches joined; every param group in VASSO), a trainer or config class defined by the
  block trains and keeps its base class's defaults, an adversary geometry the block registers is built by the engine
  and takes an exactly restored step (and is unregistered after the test).
  A block that builds none of these fails: extend the checks rather than skip it.
- `bash`: each command is checked without running long jobs: `pip install` extras exist in pyproject.toml and pins
  equal `.ci/run`'s, `apt-get install` packages are the ones `.ci/run` installs, recipe flags are accepted by the
  recipe's own argument parser (also under `accelerate launch` and `torchrun`, whose own flags and config files are
  checked too), and a test command is `.ci/run`'s or a part of the suite (declared markers, test files and tests
  that exist). An unknown command fails: extend this file.
- `text`: a transcript of the recipe that the nearest heading above it names; each labelled line (`PROMPT:`) and
  the first words of each paragraph must be printed by that recipe.

Links: each relative link names a file that exists and, with an `#anchor`, one of that markdown file's headings.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from helpers import REPO, bash_blocks, make_data, make_dataset, readme_section, vasso_step, weights
from markdown_it import MarkdownIt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_vasso
from hf_vasso import VASSO, VassoArguments, VassoConfig, VassoTrainerMixin
from hf_vasso.adversary import GEOMETRIES, AdversaryGeometry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(REPO)
DOC_FILES = [
    "README.md",
    "recipes/README.md",
    "tests/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")),
]
FENCE = re.compile(r"^```(\S*)\s*$")


def code_blocks(path: str) -> list[tuple[str, int, str, str]]:
    """(file, line of the opening fence, language, text) for each fenced block of a markdown file."""
    found, lang, start, lines = [], None, 0, []
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if lang is None and fence:
            lang, start, lines = fence.group(1), number, []
        elif lang is not None and line.rstrip() == "```":
            found.append((path, start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path}: the block opened at line {start} is never closed"
    return found


MARKDOWN = MarkdownIt("commonmark").enable("table")  # GitHub's tables: the links and code spans in them count


def headings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each heading of a markdown file, its text as GitHub renders it (code spans without the
    backticks); a `#` line inside a code block is no heading."""
    tokens = MARKDOWN.parse(path.read_text())
    return [
        (opening.map[0] + 1, "".join(c.content for c in inline.children if c.type in ("text", "code_inline")))
        for opening, inline in zip(tokens, tokens[1:])
        if opening.type == "heading_open"
    ]


def github_anchors(titles: list[str]) -> list[str]:
    """The anchors GitHub gives headings (github-slugger's rules): lowercased, every character but letters, digits,
    `-`, `_` and spaces dropped, each space a `-`; a repeated anchor gets `-1`, `-2`, ..."""
    anchors, occurrences = [], {}
    for title in titles:
        anchor = base = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        while anchor in occurrences:
            occurrences[base] += 1
            anchor = f"{base}-{occurrences[base]}"
        occurrences[anchor] = 0
        anchors.append(anchor)
    return anchors


def links(path: Path) -> list[str]:
    """The target of each link and image of a markdown file (not the `](...)` text of its code blocks)."""

    def walk(tokens):
        for token in tokens:
            if token.type in ("link_open", "image"):
                yield token.attrGet("href" if token.type == "link_open" else "src")
            yield from walk(token.children or [])

    return list(walk(MARKDOWN.parse(path.read_text())))


BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]
IDS = [f"{path}:{line}" for path, line, _, _ in BLOCKS]


def test_the_docs_have_blocks_of_each_kind():
    """The sentinel for the parametrised tests below: they would pass vacuously on an empty list."""
    langs = {(path, lang) for path, _, lang, _ in BLOCKS}
    assert {("README.md", "python"), ("README.md", "bash"), ("recipes/README.md", "bash")} <= langs
    assert len(BLOCKS) >= 15


# ---------------------------------------------------------------------------------------------------- python blocks


class DocModel(nn.Module):
    """A regressor with a `backbone` and a `head`: `model(x)` gives predictions (plain loops), and
    `model(x=..., labels=...)` a dict with `loss` (the Trainer's convention)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x, labels=None):
        out = self.head(self.backbone(x)).squeeze(-1)
        if labels is None:
            return out
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


@dataclasses.dataclass
class MyTrainingArguments(TrainingArguments):
    """A user's arguments class: one field of its own and one default of its own."""

    my_field: int = 7
    learning_rate: float = 0.0123


class MyTrainer(Trainer):
    """A user's trainer whose `compute_loss` has a side effect that must count each step once."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.my_counter = getattr(self, "my_counter", 0) + 1
        return super().compute_loss(model, inputs, *args, **kwargs)


TINY = dict(
    max_steps=2,
    per_device_train_batch_size=8,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
)


def tiny_config_class(base: type, tmp_path: Path) -> type:
    """`base` with `output_dir` under `tmp_path` and the tiny run of `TINY`, whatever the block passes."""

    @dataclasses.dataclass
    class Tiny(base):
        def __post_init__(self) -> None:
            self.output_dir = str(tmp_path / os.path.basename(str(self.output_dir or "out")))
            for name, value in TINY.items():
                setattr(self, name, value)
            super().__post_init__()

    Tiny.__name__ = Tiny.__qualname__ = base.__name__
    return Tiny


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_vasso, "VassoConfig", tiny_config_class(VassoConfig, tmp_path))
    x, y = make_data(32)
    return {
        "model": DocModel(),
        "train_ds": make_dataset(32),
        "eval_ds": make_dataset(8, seed=2),
        "loader": DataLoader(TensorDataset(x, y), batch_size=8),
        "loss_fn": nn.functional.mse_loss,
        "MyTrainer": MyTrainer,
        "MyTrainingArguments": MyTrainingArguments,
    }


def check_trained_trainer(trainer) -> str:
    assert isinstance(trainer, VassoTrainerMixin), f"{type(trainer).__name__} is not a VASSO trainer"
    assert trainer.state.global_step == TINY["max_steps"], "the block's trainer did not train"
    assert trainer.vasso is not None and trainer.vasso.step == trainer.state.global_step
    return f"trainer {type(trainer).__name__} trained"


def check_optimizer(optimizer: VASSO, model: nn.Module) -> str:
    if optimizer.vasso.step == 0:  # built, not stepped: take one VASSO step with it
        x, y = make_data(32)
        before = weights(model)
        vasso_step(optimizer, lambda: nn.functional.mse_loss(model(x), y))
        assert any(not torch.equal(v, weights(model)[k]) for k, v in before.items()), "the step moved nothing"
    assert optimizer.vasso.step >= 1
    assert optimizer.vasso.d and any(d is not None for d in optimizer.vasso.d)
    # Every param group, one added with `add_param_group` included, is in VASSO, and each trainable tensor has a d.
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_groups} == {id(p) for p in optimizer.vasso.params}, "a param group is not in VASSO"
    assert all(d is not None for d, p in zip(optimizer.vasso.d, optimizer.vasso.params) if p.requires_grad)
    return "VASSO optimizer stepped"


def check_geometry_class(cls: type, monkeypatch) -> str:
    """A geometry the block registers: the engine builds it for a param group and takes a step with it, which moves
    the weights and restores them bit for bit. (Its identities are the registry-wide tests of test_engine_variants.)"""
    assert GEOMETRIES.get(cls.name) is cls, f"{cls.__name__} is not registered under {cls.name!r}"
    model, (x, y) = DocModel(), make_data(32)
    optimizer = VASSO(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, theta=0.4, adversary=cls.name)
    assert [type(g) for g in optimizer.vasso.geometries] == [cls], "the engine did not build the block's geometry"
    before = weights(model)
    nn.functional.mse_loss(model(x), y).backward()
    assert optimizer.first_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(v, weights(model)[k]) for k, v in before.items()), "the perturbation moved nothing"
    optimizer.restore()
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items()), "the restore is not exact"
    return f"geometry {cls.name!r} registered, built and stepped"


@contextlib.contextmanager
def geometries_restored():
    """A geometry a block registers is removed afterwards: the registry other tests iterate over stays as it was."""
    saved = dict(GEOMETRIES)
    try:
        yield
    finally:
        GEOMETRIES.clear()
        GEOMETRIES.update(saved)


def check_loop_steps(optimizer: VASSO, model: nn.Module, namespace: dict, loader: DataLoader) -> str:
    """A block that loops over `loader` took its own steps: one per batch, or one per `K` batches where the block sets
    `K` (gradient accumulation by hand). Each accumulated step must equal one step on the `K` batches joined: the same
    weights and `d` as the same base optimizer and hyperparameters on a fresh model, up to the order of float sums."""
    k = namespace.get("K", 1)
    batches = list(loader)
    assert len(batches) >= k >= 1
    assert optimizer.vasso.step == len(batches) // k, f"{optimizer.vasso.step} VASSO steps over {len(batches)} batches"
    if k == 1:
        return f"loop took {optimizer.vasso.step} VASSO steps"
    twin = DocModel()
    base = optimizer.base_optimizer
    accepted = inspect.signature(type(base)).parameters
    twin_optimizer = VASSO(
        type(base)(twin.parameters(), **{n: v for n, v in base.defaults.items() if n in accepted}),
        rho=optimizer.vasso.rho,
        theta=optimizer.vasso.theta,
        adversary_prob=optimizer.vasso.adversary_prob,
        seed=optimizer.vasso.seed,
        adversary=optimizer.vasso.adversary,
    )
    for start in range(0, len(batches) - k + 1, k):
        x, y = (torch.cat(t) for t in zip(*batches[start : start + k]))
        vasso_step(twin_optimizer, lambda x=x, y=y: namespace["loss_fn"](twin(x), y))
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters())) < 1e-6
    pairs = [(a, b) for a, b in zip(optimizer.vasso.d, twin_optimizer.vasso.d) if a is not None]
    assert pairs and max((a - b).abs().max().item() for a, b in pairs) < 1e-6
    return f"{k} micro-batches per step equal one batch of {k}x"


def check_trainer_class(cls: type, config_class: type, tmp_path: Path) -> str:
    args = config_class(output_dir=str(tmp_path / f"{cls.__name__}-run"), **TINY)
    trainer = cls(model=DocModel(), args=args, train_dataset=make_dataset(32))
    trainer.train()
    check_trained_trainer(trainer)
    if issubclass(cls, MyTrainer) and "perturbed_pass_context" in cls.__dict__:
        # The hook's promise: the side effect counts each step once, as in the plain trainer (one call per step).
        assert trainer.my_counter == TINY["max_steps"], f"compute_loss side effect counted {trainer.my_counter}"
    return f"class {cls.__name__} trains"


def check_config_class(cls: type, tmp_path: Path) -> str:
    """The config the block defines holds every value its non-VASSO base class would, plus the VASSO defaults."""
    base = next(b for b in cls.__mro__[1:] if b is not VassoArguments and dataclasses.is_dataclass(b))
    mine, theirs = cls(output_dir=str(tmp_path / "c")), base(output_dir=str(tmp_path / "c"))
    differ = [f.name for f in dataclasses.fields(base) if getattr(mine, f.name) != getattr(theirs, f.name)]
    assert not differ, f"{cls.__name__} lost {base.__name__}'s values of {differ}"
    assert mine.rho == VassoArguments.rho
    return f"config {cls.__name__} keeps {base.__name__}'s defaults"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b[2] == "python"], ids=[i for i, b in zip(IDS, BLOCKS) if b[2] == "python"]
)
def test_python_block_runs(block, namespace, tmp_path, monkeypatch):
    registered = dict(GEOMETRIES)
    with geometries_restored():
        checked = run_python_block(block, namespace, tmp_path, monkeypatch)
    assert GEOMETRIES == registered, "a geometry the block registered was left in the registry"
    assert checked, f"{block[0]}:{block[1]} built nothing this test knows how to check: extend tests/test_docs.py"


def run_python_block(block, namespace, tmp_path, monkeypatch) -> list[str]:
    path, line, _, text = block
    supplied = dict(namespace)
    namespace["__name__"] = "doc_block"  # the module of the classes the block defines
    exec(compile(text, f"{path}:{line}", "exec"), namespace)
    built = {k: v for k, v in namespace.items() if k != "__builtins__" and supplied.get(k) is not v}
    # Classes the block defines (not those it imports), and the objects it builds.
    built = {k: v for k, v in built.items() if not isinstance(v, type) or v.__module__ == "doc_block"}
    checked = []
    for value in built.values():
        if isinstance(value, Trainer):
            checked.append(check_trained_trainer(value))
        elif isinstance(value, VASSO):
            if re.search(r"^\s*for .* in loader:", text, flags=re.M):
                checked.append(check_loop_steps(value, namespace["model"], namespace, supplied["loader"]))
            checked.append(check_optimizer(value, namespace["model"]))
    config_classes = [v for v in built.values() if isinstance(v, type) and issubclass(v, VassoArguments)]
    for value in built.values():
        if isinstance(value, type) and issubclass(value, VassoTrainerMixin):
            config_class = config_classes[0] if config_classes else hf_vasso.VassoConfig
            checked.append(check_trainer_class(value, config_class, tmp_path))
    for cls in config_classes:
        checked.append(check_config_class(cls, tmp_path))
    for value in built.values():
        if isinstance(value, type) and issubclass(value, AdversaryGeometry):
            checked.append(check_geometry_class(value, monkeypatch))
        if isinstance(value, type) and issubclass(value, TrainerCallback):
            checked.append(check_callback_class(value, tmp_path))
    return checked


def check_callback_class(cls: type, tmp_path: Path) -> str:
    """A callback the block defines (a ρ schedule): a VassoTrainer with it and a decaying learning rate trains, and
    the ρ the engine used changed with the schedule from step to step."""

    class Record(TrainerCallback):
        seen: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(trainer.vasso.rho)

    args = VassoConfig(output_dir=str(tmp_path / "cb"), lr_scheduler_type="linear", **dict(TINY, max_steps=4))
    trainer = hf_vasso.VassoTrainer(model=DocModel(), args=args, train_dataset=make_dataset(32))
    trainer.add_callback(cls())
    trainer.add_callback(Record())
    trainer.train()
    assert len(set(Record.seen)) == 4, f"the engine's rho did not follow the callback: {Record.seen}"
    return f"callback {cls.__name__} drives rho"


# ------------------------------------------------------------------------------------------------------ bash blocks

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CI = (ROOT / ".ci" / "run").read_text()


def commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuations joined, comments dropped, `&&` chains split."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            found.append(words[:cut])
            words = words[cut + 1 :]
    return [c for c in found if c]


def ci_commands() -> list[list[str]]:
    """`.ci/run`'s commands, `python3` written `python` as in the docs."""
    lines = [line for line in CI.splitlines() if not line.startswith(("if ", "fi", "set ", "cd ", "export "))]
    return [["python" if w == "python3" else w for w in c] for c in commands("\n".join(lines))]


PIP_OPTIONS_WITH_VALUES = {"--index-url", "-i", "--extra-index-url"}


def pip_requirements(args: list[str]) -> list[str]:
    """The requirements of a `pip install` (or `apt-get install`) command: its words less the options and their
    values."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in PIP_OPTIONS_WITH_VALUES:
            skip = True
        elif not arg.startswith("-"):
            found.append(arg)
    return found


IMPORT_MODULE = importlib.import_module  # compare.py's import, patched below per test


class Parsed(Exception):
    """Raised by the patched argument parser once a recipe's flags have parsed: nothing else runs."""


def check_recipe_flags(script: str, argv: list[str], monkeypatch) -> str:
    assert (ROOT / script).is_file(), f"{script} does not exist"
    assert script.startswith("recipes/") and script.endswith(".py"), f"not a recipe: {script}"
    module = IMPORT_MODULE(Path(script).stem)
    with contextlib.suppress(ImportError):  # sft_trl.py imports TRL's parser inside main(): its class must exist now
        import trl.scripts.utils  # noqa: F401
    # transformers' HfArgumentParser and TRL's own copy of it (TrlParser's base): every parser class that builds the
    # dataclasses, so the config's own checks (`VassoConfig.__post_init__`) run on the flags too.
    for parser_class in _subclasses(argparse.ArgumentParser):
        parse = parser_class.__dict__.get("parse_args_into_dataclasses")
        if parse is not None and not hasattr(parse, "stops"):
            monkeypatch.setattr(parser_class, "parse_args_into_dataclasses", _parse_then_stop(parse))
    # A parser this test missed must not start a training run.
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail(f"{script} started training"))
    try:
        module.main(list(argv))
    except SystemExit as exit_:  # argparse's way of refusing a flag
        pytest.fail(f"{script} refused {argv}: exit {exit_.code}")
    except Parsed:
        return f"{script} accepts {argv}"
    pytest.fail(f"{script} {argv}: the recipe returned without parsing its flags")


def _parse_then_stop(parse):
    def parse_then_stop(self, *args, **kwargs):
        raise Parsed(parse(self, *args, **kwargs))

    parse_then_stop.stops = True
    return parse_then_stop


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


ENV_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")


def check_command(words: list[str], monkeypatch) -> str:
    program, args = words[0], words[1:]
    if program == "sudo" or ENV_ASSIGNMENT.fullmatch(program):  # `OMP_NUM_THREADS=1 python ...`
        return check_command(args, monkeypatch)
    if program == "pip" and args[0] == "install":
        for req in pip_requirements(args[1:]):
            if req.startswith("."):
                extras = re.fullmatch(r"\.(?:\[(.*)\])?", req).group(1)
                for extra in filter(None, (extras or "").split(",")):
                    assert extra in PYPROJECT["project"]["optional-dependencies"], f"no extra [{extra}]"
            else:
                pins = {r for c in ci_commands() if c[:4] == ["python", "-m", "pip", "install"] for r in c[4:]}
                assert req in pins, f"{req}: .ci/run pins {sorted(p for p in pins if '==' in p)}"
        return "pip install"
    if program == "apt-get" and args[0] == "install":
        for package in pip_requirements(args[1:]):
            assert f"apt-get install -y -q {package}" in CI, f"{package} is not what .ci/run installs"
        return "apt-get install"
    if program == "python" and args[:2] == ["-m", "pytest"]:
        return "the CI test command" if words in ci_commands() else check_pytest_selection(args[2:])
    if program == "python" and args[0] == "recipes/compare.py":
        return check_compare(args[1:], monkeypatch)
    if program == "python":
        return check_recipe_flags(args[0], args[1:], monkeypatch)
    if program == "accelerate" and args[0] == "launch":
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(args[1:])
        if launch.config_file:
            assert (ROOT / launch.config_file).is_file(), f"{launch.config_file} does not exist"
            load_config_from_file(str(ROOT / launch.config_file))
        return check_recipe_flags(launch.training_script, launch.training_script_args, monkeypatch)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        run = get_args_parser().parse_args(args)
        return check_recipe_flags(run.training_script, run.training_script_args, monkeypatch)
    pytest.fail(f"no check for `{' '.join(words)}`: extend tests/test_docs.py")


DECLARED_MARKERS = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}


def marker_names(expression: str) -> set[str]:
    return set(re.findall(r"\w+", expression)) - {"not", "and", "or"}


def defined_tests(path: Path) -> set[str]:
    """The names of the test functions a test file defines."""
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def check_pytest_selection(args: list[str]) -> str:
    """A part of the suite (CI's whole command is checked above): `-q`, `-m` over markers pyproject.toml declares,
    and test files or folders that exist (`file.py::test` a test the file defines)."""
    words = iter(args)
    for word in words:
        if word == "-m":
            names = marker_names(next(words))
            assert names and names <= DECLARED_MARKERS, f"-m names markers not declared: {names - DECLARED_MARKERS}"
        elif not word.startswith("-"):
            file, _, test = word.partition("::")
            assert (ROOT / file).exists(), f"pytest {word}: {file} does not exist"
            assert not test or test.split("[")[0] in defined_tests(ROOT / file), f"pytest {word}: no such test"
        elif word != "-q":
            pytest.fail(f"no check for pytest's {word}: extend tests/test_docs.py")
    return "a part of the test suite"


def check_compare(argv: list[str], monkeypatch) -> str:
    """`compare.py`'s own flags, then the recipe flags it passes on (its first run stops after parsing them)."""
    import compare

    recipes = {file[:-3] for file, *_ in compare.RECIPES.values()}

    def recipe_that_only_parses(name):  # compare.py's import of a recipe; any other import as it is
        return _ParsingRecipe(IMPORT_MODULE(name), monkeypatch) if name in recipes else IMPORT_MODULE(name)

    monkeypatch.setattr(compare.importlib, "import_module", recipe_that_only_parses)
    try:
        compare.main(list(argv))
    except SystemExit as exit_:
        pytest.fail(f"compare.py refused {argv}: exit {exit_.code}")
    except Parsed:
        return f"compare.py accepts {argv}"
    pytest.fail(f"compare.py {argv}: no recipe flags were parsed")


class _ParsingRecipe:
    """A recipe module whose `main` parses its flags with the recipe's own parser and stops."""

    def __init__(self, module, monkeypatch) -> None:
        self.module, self.monkeypatch = module, monkeypatch

    def main(self, argv):
        script = f"recipes/{self.module.__name__}.py"
        check_recipe_flags(script, argv, self.monkeypatch)
        raise Parsed(argv)


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b[2] == "bash"], ids=[i for i, b in zip(IDS, BLOCKS) if b[2] == "bash"]
)
def test_bash_block_commands_hold(block, monkeypatch, tmp_path):
    path, line, _, text = block
    monkeypatch.chdir(tmp_path)  # a recipe that parsed its flags must not leave files in the checkout
    found = commands(text)
    assert found, f"{path}:{line}: no command"
    for words in found:
        check_command(words, monkeypatch)


def test_readme_test_section_is_what_ci_installs_and_runs():
    """The README gives CI's installs and test command (its torch line is Install's, less the CPU index CI cannot
    reach: CI's machines take the same pinned CPU wheel from their own package sources); what CI adds beyond them is
    stated in the text."""
    section = readme_section("Running the tests")
    install = commands(code_blocks_of(readme_section("Install")))
    (torch_line,) = [c for c in install if any(w.startswith("torch==") for w in c)]  # one line installs torch
    cut = torch_line.index("--index-url")
    assert torch_line[cut + 1] == "https://download.pytorch.org/whl/cpu"
    torch_line = torch_line[:cut] + torch_line[cut + 2 :]
    block = code_blocks_of(section)
    doc = [torch_line] + [["python" if w == "python3" else w for w in c] for c in commands(block)]
    doc = [[w for w in c if w != "-q" or c[:3] == ["python", "-m", "pytest"]] for c in doc]
    ci = [c for c in ci_commands() if "install" in c or "pytest" in c]
    ci_norm = []
    for c in ci:
        if c[:3] == ["python", "-m", "pip"]:
            c = ["pip", *[w for w in c[3:] if w != "-q"]]
        if c[0] == "HF_VASSO_FORCE_DIGITS=1":
            continue
        ci_norm.append(c)
    apt = [c for c in ci_norm if c[0] == "apt-get"]
    assert apt and all("dataset-fashion-mnist" in c for c in apt)
    assert [c for c in ci_norm if c[0] != "apt-get"] == doc
    for added in ("dataset-fashion-mnist", "ruff check .", "ruff format --check .", "HF_VASSO_FORCE_DIGITS=1"):
        assert added in section and added in CI, added


def code_blocks_of(markdown: str) -> str:
    blocks = bash_blocks(markdown)
    assert len(blocks) == 1, "the section has one bash block"
    return blocks[0]


# ------------------------------------------------------------------------------------------------------ text blocks


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b[2] == "text"], ids=[i for i, b in zip(IDS, BLOCKS) if b[2] == "text"]
)
def test_text_block_is_what_a_recipe_prints(block):
    """The transcript's labels and paragraph openings are in the source of the recipe it shows, and only that one's."""
    path, line, _, text = block
    recipe = recipe_shown(path, line)
    source = recipe.read_text()
    checked = 0
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = paragraph.splitlines()
        labels = [m.group(0) for m in (re.match(r"[A-Z][A-Z-]+:\s+", s) for s in lines) if m]
        for label in labels:
            assert label in source, f"{path}:{line}: {recipe.name} does not print {label!r}"
            checked += 1
        if not labels:
            opening = " ".join(lines[0].split()[:2])
            assert opening in source, f"{path}:{line}: {recipe.name} does not print {opening!r}"
            checked += 1
    assert checked


def recipe_shown(path: str, line: int) -> Path:
    """The recipe a transcript shows: the one that the nearest heading above it names (`### `sft_trl.py``)."""
    above = [title for at, title in headings(ROOT / path) if at < line]
    named = [ROOT / "recipes" / n for n in re.findall(r"[\w-]+\.py", above[-1] if above else "")]
    named = [p for p in named if p.is_file()]
    assert len(named) == 1, f"{path}:{line}: the heading above a transcript names the one recipe that prints it"
    return named[0]


def test_every_block_has_a_known_language():
    unknown = [f"{i} ({b[2] or 'no language'})" for i, b in zip(IDS, BLOCKS) if b[2] not in ("python", "bash", "text")]
    assert not unknown, f"blocks this test cannot run: {unknown}"


# ------------------------------------------------------------------------------------------------------------ links


@pytest.mark.parametrize("path", DOC_FILES)
def test_relative_links_resolve(path):
    """Each relative link names a file that exists and, with an `#anchor` (alone: into this file), a heading of that
    markdown file, as GitHub names its headings' anchors."""
    targets = [t for t in links(ROOT / path) if not re.match(r"[a-z]+:", t)]
    assert targets or path.startswith("docs/"), f"{path} links nothing"
    for target in targets:
        file, _, anchor = (unquote(part) for part in target.partition("#"))
        linked = ROOT / Path(path).parent / file if file else ROOT / path
        assert linked.exists(), f"{path} links to {target}, which does not exist"
        if anchor:
            assert linked.suffix == ".md", f"{path} links to {target}: an anchor this test cannot check"
            anchors = github_anchors([title for _, title in headings(linked)])
            assert anchor in anchors, f"{path} links to {target}: no heading of {file or path} has it ({anchors})"


def test_github_anchor_rules():
    """Anchors as GitHub gives them to headings of these docs, and to repeated headings."""
    titles = ["Results: what it costs, what it buys", "What a run leaves in --output_dir", "ASAM and per-group ρ"]
    assert github_anchors(titles) == [
        "results-what-it-costs-what-it-buys",
        "what-a-run-leaves-in---output_dir",
        "asam-and-per-group-ρ",
    ]
    assert github_anchors(["Setup", "Setup", "Setup-1", "Setup"]) == ["setup", "setup-1", "setup-1-1", "setup-2"]


# -------------------------------------------------------------------------------------------------------- packaging


def test_py_typed_ships_in_the_package():
    """The modules are annotated: `py.typed` tells type checkers so (PEP 561), and the wheel must carry it."""
    assert (ROOT / "hf_vasso" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["hf_vasso"]


def test_wheel_carries_py_typed_and_metadata(tmp_path):
    """Build the wheel from a copy of the package (the checkout stays clean) and read what pip would install."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "hf_vasso", src / "hf_vasso", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("hf_vasso-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "hf_vasso/py.typed" in names
    for field in ("Author:", "Keywords:", "Classifier: Typing :: Typed", "License-Expression: MIT", "Project-URL:"):
        assert field in metadata or field.replace("Author:", "Author-email:") in metadata, field


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built as `python -m build --sdist --no-isolation` builds it (the project's PEP 517 backend, called
    in a copy of the checkout so the checkout stays clean), with a stray bytecode file planted in the copy."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    skipped = shutil.ignore_patterns(".git", "*.egg-info", ".venv", "venv", ".pytest_cache", ".ruff_cache", "build")
    shutil.copytree(ROOT, src, ignore=skipped, symlinks=True)
    for folder in ("tests", "hf_vasso"):  # as a test run leaves them: MANIFEST.in must keep them out
        (src / folder / "__pycache__").mkdir(exist_ok=True)
        (src / folder / "__pycache__" / "planted.cpython-311.pyc").write_bytes(b"")
    backend = PYPROJECT["build-system"]["build-backend"]
    build = f"import {backend} as backend; backend.build_sdist({str(tmp)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True, timeout=300)
    (archive,) = tmp.glob("*.tar.gz")
    return archive


def sdist_files(archive: Path) -> set[str]:
    """The files of an sdist, relative to its top folder."""
    with tarfile.open(archive) as tar:
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and tar.getmember(n).isfile()}


def repo_files_imported(files: list[Path], folders: list[Path]) -> set[Path]:
    """The repository's Python files that `files` import, and those import in turn: every `import` and `from`
    statement (also inside functions) and `importlib.import_module("...")`/`pytest.importorskip("...")` with a
    literal name, each found as Python would find it in the file's own folder (pytest puts a test's folder on
    `sys.path`) or in `folders`."""
    found, todo = set(), list(files)
    while todo:
        file = todo.pop()
        for node in ast.walk(ast.parse(file.read_text())):
            wanted = []  # (folders to look in, dotted name)
            if isinstance(node, ast.Import):
                wanted = [([file.parent, *folders], a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                where = [file.parents[node.level - 1]] if node.level else [file.parent, *folders]
                stem = f"{node.module}." if node.module else ""
                wanted = [(where, stem + a.name) for a in node.names] + [(where, node.module)] * bool(node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("import_module", "importorskip"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    wanted = [([file.parent, *folders], node.args[0].value)]
            for where, name in wanted:
                parts = name.split(".")
                for folder in where:  # each package on the way is imported too
                    modules = [folder.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]
                    modules = [m / "__init__.py" if m.is_dir() else m.with_suffix(".py") for m in modules]
                    modules = [m for m in modules if m.is_file()]
                    if modules:
                        todo += [m for m in modules if m not in found]
                        found.update(modules)
                        break
    return found


def test_sdist_manifest_ships_what_the_tests_import(sdist):
    """The sdist ships `tests/`, so it must ship every file the tests import from the repository: the helpers,
    conftest files, the reference, and the recipes', benchmarks' and studies' modules on pytest's `pythonpath`."""
    test_files = sorted((ROOT / "tests").rglob("*.py"))
    folders = [ROOT / f for f in PYPROJECT["tool"]["pytest"]["ini_options"]["pythonpath"]] + [ROOT]
    needed = {str(f.relative_to(ROOT)) for f in test_files + sorted(repo_files_imported(test_files, folders))}
    sentinel = {"tests/helpers.py", "tests/conftest.py", "tests/reference.py", "recipes/embedded_data.py"}
    assert sentinel | {"benchmarks/_common.py", "studies/crash_resume.py", "hf_vasso/trl.py"} <= needed
    missing = sorted(needed - sdist_files(sdist))
    assert not missing, f"the sdist lacks what the tests import: {missing} (MANIFEST.in)"


def test_sdist_ships_no_bytecode(sdist):
    shipped = sdist_files(sdist)
    assert "tests/helpers.py" in shipped and "hf_vasso/__init__.py" in shipped
    bytecode = sorted(n for n in shipped if "__pycache__" in n or n.endswith((".pyc", ".pyo")))
    assert not bytecode, f"the sdist ships bytecode: {bytecode}"


@pytest.mark.slow
def test_sdists_tests_collect_as_the_checkouts(sdist, tmp_path):
    """Unpacked, the sdist's suite collects the same tests as the checkout's: nothing it reads at import (the docs,
    `.ci/run`, the recipes) is missing."""

    def collected(folder: Path) -> list[str]:
        env = {**os.environ, "PYTHONPATH": str(folder)}
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        ids = sorted(line for line in done.stdout.splitlines() if "::" in line)
        report = "\n".join(line for line in done.stdout.splitlines() if "::" not in line)  # the errors, not the ids
        assert done.returncode == 0, f"collecting in {folder} failed:\n{report[-4000:]}{done.stderr[-2000:]}"
        return ids

    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    assert collected(unpacked) == collected(ROOT)


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_readme_states_the_supported_transformers_range():
    """pyproject.toml bounds transformers from below and above, and the README's Install section says the same range
    and the version the suite was run with."""
    (transformers,) = [r for r in PYPROJECT["project"]["dependencies"] if requirement_name(r) == "transformers"]
    assert ">=" in transformers and "<" in transformers.replace("<=", ""), transformers
    import transformers as installed

    install = readme_section("Install")
    tested = ".".join(installed.__version__.split(".")[:2])
    assert f"`{transformers}` (tested with {tested})" in install


def test_readme_quick_subset_selects_by_markers_the_suite_declares():
    """The quick subset the README gives is a marker expression over markers pyproject.toml declares."""
    (expression,) = re.findall(r'`python -m pytest -q -m "([^"]+)"`', readme_section("Running the tests"))
    names = marker_names(expression)
    assert names and names <= DECLARED_MARKERS, f"{expression!r} names markers the suite does not declare"


def test_tests_readme_names_tests_that_exist():
    """tests/README.md's table of mutants names the tests that killed them: each `file.py::test` is one."""
    named = re.findall(r"`(test_\w+\.py)::(\w+)", (ROOT / "tests" / "README.md").read_text())
    assert len(named) >= 10
    missing = [f"{file}::{test}" for file, test in named if test not in defined_tests(ROOT / "tests" / file)]
    assert not missing, f"tests/README.md names tests that do not exist: {missing}"


def test_readme_is_at_most_2500_words():
    assert len((ROOT / "README.md").read_text().split()) <= 2500, "the README has grown past 2,500 words (wc -w)"


def script_header_requirements(path: Path) -> list[str]:
    """The `dependencies` of a file's PEP 723 `# /// script` block."""
    match = re.search(r"^# /// script\n((?:#.*\n)*?)# ///$", path.read_text(), flags=re.M)
    assert match, f"{path} has no `# /// script` header"
    toml = "\n".join(line[2:] for line in match.group(1).splitlines())
    return tomllib.loads(toml)["dependencies"]


RECIPE_SCRIPTS = sorted(p for p in (ROOT / "recipes").glob("*.py") if "# /// script" in p.read_text())


@pytest.mark.parametrize("path", RECIPE_SCRIPTS, ids=[p.name for p in RECIPE_SCRIPTS])
def test_recipe_script_headers_name_what_the_project_installs(path):
    """Each name a recipe's header lists is one pyproject.toml or .ci/run installs from the package index, with the
    same bounds or pin where the header gives some; hf_vasso itself, on no index, is not among them."""
    project = PYPROJECT["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {requirement_name(r): r for r in declared}
    pinned = {requirement_name(r): r for c in ci_commands() if "install" in c for r in pip_requirements(c[4:])}
    for requirement in script_header_requirements(path):
        name = requirement_name(requirement)
        assert name != requirement_name(project["name"]), f"{path.name}: {name} is on no package index"
        assert name in declared or name in pinned, f"{path.name}: {requirement} is installed by nothing here"
        if requirement != name:  # bounds or a pin: the ones pyproject.toml or .ci/run give
            assert requirement in (declared.get(name), pinned.get(name)), f"{path.name}: {requirement} differs"
    assert RECIPE_SCRIPTS
