"""NorMuon's per-row normalisation of an (HT)Muon update, the owner-side pure function.

The reference (``normuon.py`` of TDCSZ327/HTmuon; REFERENCE.md) after the orthogonalised or
HTMuon update ``O`` (m, n):

    v <- lerp(v, mean over columns of O^2, 1 - beta2)       (per row, no bias correction)
    O' = O / sqrt(v + eps),  then rescaled to the Frobenius norm O had:  O' * ||O|| / (||O'|| + eps)

and then Muon's ``max(1, m/n)^0.5`` (applied by the optimizer, not here). With ``O`` Muon's
polar factor it is NorMuon; with ``O = U Σ^p V^T`` it is HTNorMuon.
"""

from __future__ import annotations

import torch


def normuon_rescale(
    O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(update, new_v)``: the row-normalised ``O`` at ``O``'s Frobenius norm, and the
    updated second moment. Runs on the matrix's owner, after the spectral step.

    Args:
        O: (m, n) update, float32 (other float dtypes are computed in float32).
        v: (m,) per-row second moment from the previous step (zeros at the start), float32.
        beta2: EMA factor in [0, 1) (the reference: 0.95).
        eps: added to ``v`` under the square root and to the norm in the rescale (1e-10 as the
            reference).

    Returns:
        (update (m, n) float32, new_v (m,) float32); the inputs are not modified.
    """
    if O.ndim != 2 or not O.is_floating_point():
        raise ValueError(f"O must be a floating-point (m, n) matrix, got {O.dtype} {tuple(O.shape)}")
    if v.shape != (O.size(0),):
        raise ValueError(f"v must have shape ({O.size(0)},) (one value per row of O {tuple(O.shape)}), got {tuple(v.shape)}")
    if not 0.0 <= float(beta2) < 1.0:
        raise ValueError(f"beta2 must be in [0, 1) (the reference uses 0.95), got {beta2!r}")
    o = O.to(torch.float32)
    norm = torch.linalg.matrix_norm(o)
    row_ms = o.square().mean(dim=1)
    new_v = torch.lerp(v.to(torch.float32), row_ms, 1.0 - float(beta2))
    scaled = o * torch.rsqrt(new_v + eps).unsqueeze(1)
    scaled = scaled * (norm / (torch.linalg.matrix_norm(scaled) + eps))
    return scaled, new_v
