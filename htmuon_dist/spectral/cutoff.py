"""The rank cutoff: which singular values are rounding noise and map to zero.

A matrix that was rounded to a float format with machine epsilon ``eps`` carries an error
``E`` whose entries are about ``eps / sqrt(12) * |M_ij|`` each (round to nearest, spacing
``eps |M_ij|`` up to a factor 2), with random signs. A random matrix with i.i.d. entries of size
``s`` has largest singular value about ``s (sqrt(m) + sqrt(n))``; with ``|M_ij| ~ ||M||_F /
sqrt(mn)`` that gives

    ||E||_2  ~  c * eps * ||M||_F * (sqrt(m) + sqrt(n)) / sqrt(m n),   c ~ 0.2-0.3.

A singular value that rounding created (a null direction of the unrounded matrix) is at most
about ``||E||_2``; a real one is perturbed by at most ``||E||_2``. So the cutoff is

    tau = NOISE_MULTIPLE * eps * ||M||_F * (sqrt(m) + sqrt(n)) / sqrt(m n)

(docs/spectral.md has the derivation and the measurements: the largest rounding-made singular
value measured 0.10-0.37 of ``tau / NOISE_MULTIPLE`` on rank-deficient, centred-row,
row-heterogeneous and spiked matrices, 64-1024 sides, bf16/fp16/fp32). Relative to
``sigma_max`` it is at most ``2 NOISE_MULTIPLE eps`` (a flat full-rank spectrum) and usually far
less, whereas the former fixed ``4 eps sigma_max`` removed real directions of bf16 momentum
(3.1e-2 sigma_max). ``||M||_F = ||sigma||_2`` is known wherever the singular values are, so the
rule needs no extra pass over the matrix and no host sync.

A floor ``FLOOR * sigma_max`` covers what the exact methods themselves cannot resolve: the
float64 Gram matrix of ``eigh`` gives singular values to about ``sqrt(eps_64) sigma_max`` = 1.5e-8.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

NOISE_MULTIPLE = 1.0
FLOOR = 8.0 * math.sqrt(torch.finfo(torch.float64).eps)  # 1.2e-7


class Cutoff(float):
    """A rank cutoff: ``sigma`` counts as zero when ``sigma <= max(rel * sigma_max, fro * ||sigma||_2)``.

    A float subclass whose value is ``rel`` (the part relative to ``sigma_max``; what host-side
    code that only knows "a relative tolerance" sees), plus ``fro``, the part relative to the
    Frobenius norm (the rounding-noise rule). An explicit user ``rtol`` is ``Cutoff(rtol)``.
    """

    fro: float

    def __new__(cls, rel: float, fro: float = 0.0) -> "Cutoff":
        obj = super().__new__(cls, rel)
        obj.fro = float(fro)
        return obj

    @property
    def rel(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Cutoff(rel={float(self):.3g}, fro={self.fro:.3g})"

    def __reduce__(self):  # pickles (and deep-copies) with its Frobenius part
        return (Cutoff, (float(self), self.fro))


def threshold(sigma: torch.Tensor, rtol: float) -> torch.Tensor:
    """Absolute cutoff per matrix, (b, 1), from singular values ``sigma`` (b, k) >= 0.

    ``rtol`` is a :class:`Cutoff` or a plain float (relative to ``sigma_max`` only).
    """
    cut = float(rtol) * sigma.amax(dim=-1, keepdim=True)
    fro = getattr(rtol, "fro", 0.0)
    if fro > 0.0:
        cut = torch.maximum(cut, fro * torch.linalg.vector_norm(sigma, dim=-1, keepdim=True))
    return cut


def noise_cutoff(shape: Sequence[int], eps: float) -> Cutoff:
    """The default cutoff for an (m, n) matrix whose data had machine epsilon ``eps``."""
    m, n = int(shape[-2]), int(shape[-1])
    if m < 1 or n < 1:
        return Cutoff(FLOOR, 0.0)
    fro = NOISE_MULTIPLE * eps * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n)
    return Cutoff(FLOOR, fro)


def operand_cutoff(rtol: float, x: torch.Tensor, dtype: torch.dtype) -> Cutoff:
    """The cutoff of a method whose products round their operands to ``dtype``: ``rtol`` raised
    to the noise rule of the coarsest 16-bit format x's values pass through (x's own dtype if it
    is 16-bit, else ``dtype``: a float32 input is rounded to ``dtype`` by the first product, and
    that rounding noise must not be lifted). Used by fast_ns and log_ns."""
    low = (torch.bfloat16, torch.float16)
    coarsest = max((torch.finfo(d).eps for d in (x.dtype, dtype) if d in low), default=0.0)
    floor = noise_cutoff(x.shape, coarsest).fro if coarsest > 0 else 0.0
    return Cutoff(float(rtol), max(getattr(rtol, "fro", 0.0), floor))
