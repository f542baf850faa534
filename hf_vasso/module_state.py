"""Pass 2 replays the step's forward passes; whatever module state they change must see each step once.

BatchNorm's running statistics and `num_batches_tracked`, InstanceNorm's and SyncBatchNorm's when they track running
statistics, and a user's own running buffer all change inside `forward` in training mode. Pass 2 runs at x + ε on
the same micro-batches: its forward must not count the step a second time (the official VaSSO code and Composer
update BatchNorm twice per step; davda54/sam#17). `BufferSnapshot` saves every buffer of a module as pass 1 left it
and puts all of them back after pass 2: a buffer rebound to another tensor gets its original object back, and every
buffer its saved values (all of them: kernels such as BatchNorm's update running statistics in place without
moving the tensor's version counter, so what changed cannot be told on the host without a sync).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class BufferSnapshot:
    """The buffers of `module` (and its submodules), saved before pass 2 and restored after it.

    The copies are made once and reused (one foreach copy per device and dtype each way a step): memory and traffic
    are the size of the module's buffers, a few KB for BatchNorm or a rotary table. No host-device synchronisation.

    Example::

        snapshot = BufferSnapshot(model)
        with snapshot.restoring():       # around pass 2
            loss_fn(model(x), y).backward()
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._entries: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._copies: dict[int, torch.Tensor] = {}  # id(buffer) -> its copy, kept across steps

    def save(self) -> None:
        """Record every buffer (its module, name and object) and copy its values."""
        self._entries = [
            (owner, name, buffer)
            for owner in self.module.modules()
            for name, buffer in owner._buffers.items()
            if buffer is not None
        ]
        live = {id(buffer) for _, _, buffer in self._entries}
        self._copies = {k: v for k, v in self._copies.items() if k in live}
        for _, _, buffer in self._entries:
            copy = self._copies.get(id(buffer))
            if copy is None or (copy.shape, copy.dtype, copy.device) != (buffer.shape, buffer.dtype, buffer.device):
                self._copies[id(buffer)] = torch.empty_like(buffer)
        buffers = [b for _, _, b in self._entries]
        _copy_grouped([self._copies[id(b)] for b in buffers], buffers)

    def restore(self) -> None:
        """Put every buffer back as `save()` found it: the same object under the same name, the same values. A no-op
        when nothing was saved."""
        for owner, name, buffer in self._entries:
            if owner._buffers.get(name) is not buffer:
                owner._buffers[name] = buffer
        buffers = [b for _, _, b in self._entries]
        _copy_grouped(buffers, [self._copies[id(b)] for b in buffers])
        self._entries = []

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """`save()` on entry, `restore()` on exit, even when the block raises."""
        self.save()
        try:
            yield
        finally:
            self.restore()


def _copy_grouped(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`targets[i].copy_(sources[i])`, one foreach copy per (device, dtype)."""
    groups: dict[tuple, tuple[list, list]] = {}
    for t, s in zip(targets, sources):
        pair = groups.setdefault((t.device, t.dtype), ([], []))
        pair[0].append(t)
        pair[1].append(s)
    with torch.no_grad():
        for t, s in groups.values():
            torch._foreach_copy_(t, s)
