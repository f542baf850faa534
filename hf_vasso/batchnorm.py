"""BatchNorm running statistics must see each optimizer step once, not once per pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with batch statistics but leave their buffers untouched.

    With `track_running_stats=False` a training-mode BatchNorm neither updates `running_mean`/`running_var` nor counts
    `num_batches_tracked` (momentum 0 would still count the batch). The flags are put back even if the block raises.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True
