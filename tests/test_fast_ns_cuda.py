"""On CUDA, the low-precision methods compute what their CPU emulation computes, to the rounding
of their operand dtype (``precision.mm``: native bf16/fp16 kernels there, rounded operands and
float32 products here; the two differ only in the order of the float32 sums, which can flip an
operand's rounding in the next product).

    pytest -m gpu tests/test_fast_ns_cuda.py        # needs one CUDA GPU; skipped without it
"""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.spectral import available_methods, spectral_power
from htmuon_dist.spectral.accuracy import make_matrix

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_EPS = 2.0**-7
SPECTRA = ["gaussian", "inv_i", "spike_bulk", "logspace"]


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def tolerance(dtype: torch.dtype) -> float:
    """Relative Frobenius distance allowed between the CUDA result and the CPU emulation: two
    unit roundoffs of the operand dtype (bf16 7.8e-3, fp16 9.8e-4). The accumulation order
    flips about 1e-5 of the operand roundings per product, far below this; running the products
    in another precision (float32, TF32) is not (test_the_tolerance_tells_precisions_apart)."""
    return 2 * _unit_roundoff(dtype)


def _operand_dtype(method: str) -> torch.dtype:
    import importlib

    return getattr(importlib.import_module(f"htmuon_dist.spectral.{method}"), "DEFAULT_DTYPE", torch.float16)


def _both(method: str, x: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CUDA result moved to the CPU, CPU result), float64, same input values."""
    y_gpu = spectral_power(x.cuda(), power, method=method, eps=BF16_EPS).double().cpu()
    y_cpu = spectral_power(x, power, method=method, eps=BF16_EPS).double()
    return y_gpu, y_cpu


@needs_cuda
@pytest.mark.parametrize("method", ["fast_ns", "log_ns"])
@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])
def test_fp16_methods_on_cuda_match_their_cpu_emulation(method, kind, shape):
    if method not in available_methods():
        pytest.skip(f"{method} is not registered")
    # bf16-rounded input held in float32 (momentum after a bf16 exchange), p = 1/8
    x = make_matrix(kind, *shape, 1.0, seed=5).to(torch.bfloat16).float()
    y_gpu, y_cpu = _both(method, x, 0.125)
    diff = float((y_gpu - y_cpu).norm() / y_cpu.norm())
    # far below the method's own error (err/gap <= 0.25 of a gap ~0.05-0.15)
    assert diff <= tolerance(_operand_dtype(method)), diff


@needs_cuda
@pytest.mark.parametrize("kind", SPECTRA)
def test_polar_express_bf16_on_cuda_matches_its_cpu_emulation(kind):
    from htmuon_dist.spectral.polar_express import polar_express

    x = make_matrix(kind, 384, 256, 1.0, seed=5).to(torch.bfloat16).float()
    y_gpu = polar_express(x.cuda()).double().cpu()  # bf16 by default on CUDA
    y_cpu = polar_express(x, dtype=torch.bfloat16).double()
    diff = float((y_gpu - y_cpu).norm() / y_cpu.norm())
    assert diff <= tolerance(torch.bfloat16), diff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_tolerance_tells_precisions_apart(dtype):
    # runs everywhere: the same method with float32 products instead of ``dtype`` lands outside
    # the tolerance, so a CUDA path that silently ran another precision would fail above
    from htmuon_dist.spectral.polar_express import polar_express

    x = make_matrix("gaussian", 384, 256, 1.0, seed=5).to(torch.bfloat16).float()
    low = polar_express(x, dtype=dtype).double()
    high = polar_express(x, dtype=torch.float32).double()
    assert float((low - high).norm() / high.norm()) > tolerance(dtype)
