"""The newcomer's path: README.md's Install and Try-it commands, run as written and in order, in a fresh virtual
environment, the way someone who has just cloned the repository runs them.

What runs as written: every command of the bash blocks of the README's "Install" and "Try it offline" sections, each
through `bash -c`, word for word, in a copy of the checkout (git's tracked and unignored files, uncommitted edits
included: what a clone holds), with a venv made by `python -m venv` (no system site-packages) first on PATH, as an
activated one is. pip reaches the package index this machine's pip is configured for, as a newcomer's reaches PyPI.

The one command not run: the torch line. Its index (download.pytorch.org) is out of reach here and torch is hundreds
of MB; the test checks that the line is `pip install torch==<.ci/run's pin> --index-url <PyTorch's CPU index>` and
gives the venv the running interpreter's torch instead, when that is the pinned version: its files and those of its
dependencies, linked from a folder outside the venv by a `.pth` file, so pip sees them installed (and, being outside
the environment, never removes them). Everything else the venv holds, the README's own commands installed.

The try-it command runs on the digits fallback (`HF_VASSO_FORCE_DIGITS=1`: the same path whether or not the Debian
package is installed) and offline (`HF_HUB_OFFLINE=1`); it must finish, print its result line and leave a model that
`from_pretrained` loads. Then a recipe needing an extra the README's commands did not install (`sft_trl.py`: TRL)
must stop with one line naming the command that installs it. A README that forgets `[recipes]` fails here: the
try-it command then stops at the digits fallback, asking for scikit-learn.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, bash_blocks, readme_section
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def command_lines(heading: str) -> list[str]:
    """The commands of a README section's bash blocks as written: continuation lines joined, blank and comment-only
    lines dropped."""
    text = "\n".join(bash_blocks(readme_section(heading)))
    lines = re.sub(r"\\\n", " ", text).splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def is_torch_install(line: str) -> bool:
    words = shlex.split(line, comments=True)
    return words[:2] == ["pip", "install"] and any(re.fullmatch(r"torch(\W.*)?", w) for w in words[2:])


def ci_torch_pin() -> str:
    ci = (Path(REPO) / ".ci" / "run").read_text()
    (pin,) = re.findall(r"pip install -q (torch==\S+)", ci)
    return pin


def checkout_copy(dest: Path) -> Path:
    """What a clone of this checkout holds: git's tracked files and the untracked ones it does not ignore."""
    listed = subprocess.run(
        ["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = Path(REPO) / name
        if source.is_file():  # a file deleted but not yet committed is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def link_running_torch(venv: Path, folder: Path) -> str:
    """Give `venv` this interpreter's torch and its dependencies (their top-level files and dist-info folders,
    linked into `folder`, which a .pth file puts on the venv's path). Returns the torch version."""
    folder.mkdir()
    todo, done = ["torch"], set()
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in done:
            continue
        done.add(name)
        for top in {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "linked-torch.pth").write_text(f"{folder}\n")
    return importlib.metadata.version("torch")


def venv_env(venv: Path, tmp_path: Path) -> dict[str, str]:
    """An activated venv's environment: its bin/ first on PATH; nothing of this interpreter's own path leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PYTHONNOUSERSITE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_VASSO_FORCE_DIGITS="1",
    )
    return env


def bash(line: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(1200)
def test_the_readme_install_and_try_it_commands_work_as_written_in_a_fresh_venv(tmp_path):
    install, try_it = command_lines("Install"), command_lines("Try it offline")
    assert install and try_it, "the README lost its Install or Try-it commands"
    checkout = checkout_copy(tmp_path / "hf_vasso")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = venv_env(venv, tmp_path)

    for line in install + try_it:
        if is_torch_install(line):
            words = shlex.split(line, comments=True)
            assert ci_torch_pin() in words, f"the README's torch line {line!r} is not .ci/run's {ci_torch_pin()}"
            index = words[words.index("--index-url") + 1] if "--index-url" in words else None
            assert index == TORCH_CPU_INDEX, f"{line!r} does not name PyTorch's CPU index, {TORCH_CPU_INDEX}"
            version = link_running_torch(venv, tmp_path / "linked-torch")
            if version.split("+")[0] != ci_torch_pin().split("==")[1]:
                pytest.skip(f"this interpreter's torch is {version}, not the README's {ci_torch_pin()}")
            continue
        result = bash(line, checkout, env, timeout=900)
        assert result.returncode == 0, f"`{line}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    assert "Test accuracy" in result.stdout and "sklearn digits" in result.stdout, result.stdout[-2000:]
    saved = re.search(r"Model and results.json saved to (\S+)", result.stdout).group(1)
    load = f"from transformers import AutoModelForImageClassification as M; print(M.from_pretrained({saved!r}).config)"
    loaded = bash(f"python -c {shlex.quote(load)}", checkout, env, timeout=300)
    assert loaded.returncode == 0 and '"ViTForImageClassification"' in loaded.stdout, loaded.stderr[-2000:]

    # A recipe whose extra the README's commands did not install: one line naming the install command, no traceback.
    assert bash("python -c 'import trl'", checkout, env, timeout=120).returncode != 0, (
        "the README's commands now install TRL: pick another missing extra for this check"
    )
    missing = bash("python recipes/sft_trl.py", checkout, env, timeout=300)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .endswith('pip install -e ".[trl]" in the hf_vasso checkout installs it.')
    )
