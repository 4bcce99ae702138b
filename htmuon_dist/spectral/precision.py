"""Matrix products in a chosen operand precision with float32 accumulation and float32 output.

``mm(a, b, dtype)`` is the one product that :mod:`.fast_ns` (and any method priced at GPU
rates) uses. Its contract, identical on every device up to the order of the float32 sums:

* operands are rounded to ``dtype`` (round-to-nearest-even, as ``Tensor.to`` does);
* products are accumulated in float32 and the result is returned in **float32**, not rounded
  back to ``dtype``: cuBLAS accumulates bf16/fp16 GEMMs in float32 anyway, and keeping that
  output saves one rounding per product (the caller rounds again when the result becomes the
  next operand).

Per device:

* CUDA and ``meta``: the native low-precision kernel, ``torch.mm/bmm(a16, b16,
  out_dtype=torch.float32)`` (``aten::mm.dtype``/``bmm.dtype``, torch >= 2.8). A
  ``TorchDispatchMode`` (the cost counter of ``benchmarks/gpu_cost.py``) therefore sees the real
  operand dtype, and on ``meta`` every method runs at full size without computing anything.
* CPU: emulated. The CPU has no float32-output bf16 kernel (``mm.dtype`` is not registered for
  it) and its bf16 matmul is ~77x slower than float32 on CPUs without AMX, so the operands are
  rounded to ``dtype``, widened back to float32 and multiplied in float32. A product of two
  values with 8 (bf16) or 11 (fp16) significant bits is exact in float32, so the emulation
  differs from the GPU only in the order of the float32 accumulation.

``dtype=torch.float32`` is a plain float32 product on every device (IEEE, no TF32: see
tracked_ns's note on ``allow_tf32``).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
SUPPORTED = LOW_PRECISION + (torch.float32,)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and returned as float32 (the value an operand of ``mm`` has)."""
    return x.to(dtype).to(torch.float32)


def _check(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED:
        raise ValueError(
            f"precision.mm: dtype must be one of {[str(d) for d in SUPPORTED]}, got {dtype}; "
            "pass torch.bfloat16 or torch.float16 for tensor-core products"
        )
    if a.dim() < 2 or b.dim() < 2 or a.size(-1) != b.size(-2):
        raise ValueError(
            f"precision.mm: need (..., m, k) @ (..., k, n), got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _native(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a16, b16 = a.to(dtype), b.to(dtype)
    if a16.dim() == 2 and b16.dim() == 2:
        return torch.mm(a16, b16, out_dtype=torch.float32)
    batch = torch.broadcast_shapes(a16.shape[:-2], b16.shape[:-2])
    a3 = a16.expand(*batch, *a16.shape[-2:]).reshape(-1, *a16.shape[-2:])
    b3 = b16.expand(*batch, *b16.shape[-2:]).reshape(-1, *b16.shape[-2:])
    out = torch.bmm(a3, b3, out_dtype=torch.float32)
    return out.reshape(*batch, a16.size(-2), b16.size(-1))


def mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Batched ``a @ b`` with operands rounded to ``dtype``, float32 accumulation, float32 output.

    a: (..., m, k), b: (..., k, n), any float dtype, batch dimensions broadcast; dtype: bf16,
    fp16 or float32. Returns (..., m, n) float32 on a's device. See the module docstring for
    how each device computes it.
    """
    _check(a, b, dtype)
    if dtype == torch.float32:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32))
    if a.device.type == "cpu":
        return torch.matmul(round_to(a, dtype), round_to(b, dtype))
    return _native(a, b, dtype)


def mm_split(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with ``a`` carried as the sum of two ``dtype`` values (``hi + lo``) and ``b``
    rounded once: two products of :func:`mm`, and ``a``'s rounding error drops from ``u |a|``
    to about ``u^2 |a|``. For a left factor whose large entries would otherwise pollute small
    directions of the product (log_ns's ``exp(L)`` times its cut factor). float32 output."""
    if dtype == torch.float32:
        return mm(a, b, dtype)
    hi = round_to(a, dtype)
    return mm(hi, b, dtype) + mm(a.to(torch.float32) - hi, b, dtype)
