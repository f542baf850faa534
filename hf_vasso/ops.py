"""The step's tensor operations that are not the update's math, shaped for accelerators and forced on a CPU by the
tests: the norms in fp32, the EMA's foreach form, the non-finite clean, and how low-precision weights are handled
on a device whose mixed-dtype kernels copy their operands (a CPU's) or cast them inside the kernel (an
accelerator's)."""

from __future__ import annotations

import torch

# The device types that take the CPU plans: their mixed-dtype elementwise kernels copy each low-precision operand to
# fp32 first and run several times slower (a CPU's TensorIterator; CUDA's and other accelerators' cast inside the
# kernel), and their fp32 norm of a bf16 tensor takes a slow cast path. A test empties it to run every accelerator
# branch on a CPU.
CPU_PLAN_DEVICES = {"cpu"}


def casts_in_kernel(t: torch.Tensor) -> bool:
    """Whether a mixed-dtype op on `t`'s device casts its low-precision operands inside the kernel (no fp32 copies),
    so that it moves low-precision weights within the memory bound; False on a CPU."""
    return t.device.type not in CPU_PLAN_DEVICES


def pieces(weights: list[torch.Tensor], d: list[torch.Tensor]):
    """`(w, d)` pairs covering the tensors: whole, or, for low-precision weights whose mixed ops copy to fp32 (a CPU),
    two flat halves of each contiguous tensor, so that a method holding two fp32 temporaries of a piece stays within
    one tensor's fp32 bytes. The geometries are elementwise, so their work on the pieces is their work on the
    tensors."""
    for w, di in zip(weights, d):
        if w.dtype == torch.float32 or casts_in_kernel(w) or not w.is_contiguous() or w.numel() < 2:
            yield w, di
        else:
            yield from zip(w.view(-1).chunk(2), di.reshape(-1).chunk(2))


def fp32_norms(tensors: list[torch.Tensor], device_type: str | None = None) -> list[torch.Tensor]:
    """The 2-norm of each tensor as an fp32 0-d tensor, accumulated in fp32 whatever the dtype.

    Reductions over bf16 accumulate in fp32 on every device. On an accelerator the fp32 result is asked for directly
    (one multi-tensor kernel). On a CPU that cast path is about 20x slower than the norm itself, so there the norm of
    a bf16 tensor is returned in bf16 (3 significant digits; bf16 overflows where fp32 does, so finiteness is
    unchanged) and widened; fp16 (whose range a loss-scaled norm exceeds) takes the fp32 result. `device_type`
    names the device whose plan to take (default: the tensors'; see `CPU_PLAN_DEVICES`).
    """
    dtypes = {t.dtype for t in tensors}
    on_cpu = (device_type or tensors[0].device.type) in CPU_PLAN_DEVICES
    if on_cpu and torch.bfloat16 in dtypes and dtypes <= {torch.bfloat16, torch.float32}:
        return list(torch.stack(torch._foreach_norm(tensors, 2)).float().unbind())  # one cast, not one per tensor
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def ema_(d: list, g: list, keep: torch.Tensor, take: torch.Tensor, lerp: bool) -> None:
    """d <- keep·d + take·g in place: one `lerp_` (3 passes) where keep = 1 - take holds and g has d's dtype, else a
    `mul_` and an `addcmul_` (a loss scale folded into take, or mixed dtypes cast in the kernel)."""
    if not g:
        return
    if lerp:
        torch._foreach_lerp_(d, g, [take] * len(g))  # d + take·(g − d)
    else:
        torch._foreach_mul_(d, keep)
        torch._foreach_addcmul_(d, g, [take] * len(g))


def words(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as 16-byte elements where its layout allows it and it is large, else `t`. A `masked_fill_` with a
    one-element mask then loops over 4x (fp32) to 8x (bf16) fewer elements on a CPU, where its loop is the cost
    (11.6 ms against 2.8 ms for 20M fp32 elements on one thread here); an accelerator's kernel streams the same bytes
    either way. Below 2^16 elements the two view ops cost more than they save. Zero bits are +0.0."""
    size = t.element_size()
    if t.numel() < 1 << 16 or (t.numel() * size) % 16 or t.storage_offset() * size % 16 or not t.is_contiguous():
        return t
    return t.view(-1).view(torch.complex128)


def sq_norm(tensors: list, device: torch.device) -> torch.Tensor:
    """Σ‖t‖² over the present tensors of one bucket (fp32 0-d), 0 without any."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros((), device=device)
    return torch.stack(fp32_norms(present)).square().sum()
