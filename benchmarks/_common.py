"""Provenance shared by the benchmark and study scripts: the machine and command that produced a result, and
atomic writes of the result files. (Models and data come from `tests/helpers.py` and `recipes/embedded_data.py`.)"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results")


def machine() -> dict:
    """What produced a result: CPU model, cores, threads used, library versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def command() -> str:
    """The command line that produced a result, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join(["python", script] + [shlex.quote(a) for a in sys.argv[1:]])


def provenance_md(info: dict, cmd: str) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"Command: `{cmd}`\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; {info['date_utc']}.\n"
    )


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
