"""PNG plots of the diagnostics (matplotlib, Agg backend; main process only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from .esd import SpectralStats

# Plot order of LLaMA matrix types; anything else follows alphabetically.
_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_alpha_over_steps(metrics_path: Path, out_png: Path, title: str) -> Optional[str]:
    """α against step per matrix type from a metrics.jsonl: the mean over layers (line) and the
    range over layers (band). Returns None on success, else why no plot was made."""
    from ..metrics_jsonl import read_metrics
    from .monitor import matrix_type

    plt = _pyplot()
    if plt is None:
        return "no esd_alpha plot: matplotlib is not installed (pip install matplotlib)"
    series: dict[str, dict[int, list[float]]] = {}
    for row in read_metrics(metrics_path):
        for key, value in row.items():
            if key.startswith("esd/") and key.endswith("/alpha") and isinstance(value, (int, float)):
                kind = matrix_type(key[len("esd/"): -len("/alpha")] + ".weight")
                series.setdefault(kind, {}).setdefault(int(row["step"]), []).append(float(value))
    if not series:
        return "no esd_alpha plot: metrics.jsonl has no esd rows (train with --esd_steps N)"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    kinds = [k for k in _ORDER if k in series] + sorted(k for k in series if k not in _ORDER)
    for kind in kinds:
        steps = sorted(series[kind])
        values = [series[kind][s] for s in steps]
        line, = ax.plot(steps, [sum(v) / len(v) for v in values], "o-", ms=3, lw=1.4, label=kind)
        if any(len(v) > 1 for v in values):
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.12, lw=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ESD power-law α (mean over layers; band: min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return None


def plot_esd_fits(entries: Sequence[tuple[str, torch.Tensor, SpectralStats]], out_png: Path) -> Optional[str]:
    """One panel per matrix: log-log histogram of the ESD (density of WᵀW's eigenvalues), the
    x_min cutoff and the fitted power law over the tail, scaled to the tail's share of the mass.

    Args:
        entries: (title, eigenvalues (1-D float64), fitted stats) per panel.
    """
    plt = _pyplot()
    if plt is None:
        return "no ESD plot: matplotlib is not installed (pip install matplotlib)"
    import numpy as np
    from matplotlib.ticker import NullFormatter

    n = len(entries)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax, (title, evals, st) in zip(axes.flat, entries):
        x = evals.double().cpu().numpy()
        x = x[x > 0]
        if x.size < 2:
            ax.set_title(f"{title}\n(no nonzero eigenvalues)", fontsize=8)
            continue
        bins = np.logspace(np.log10(x.min()), np.log10(x.max()), min(60, max(10, x.size // 5)) + 1)
        ax.hist(x, bins=bins, density=True, alpha=0.55, label="ESD")
        if math.isfinite(st.alpha):
            share = st.num_tail / x.size
            grid = np.logspace(np.log10(st.xmin), np.log10(x.max()), 50)
            pdf = share * (st.alpha - 1) / st.xmin * (grid / st.xmin) ** (-st.alpha)
            ax.plot(grid, pdf, "r-", lw=1.6, label=f"fit α={st.alpha:.2f}")
            ax.axvline(st.xmin, color="r", ls="--", lw=0.9, label=f"x_min (tail {st.num_tail})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow ranges
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("eigenvalue of WᵀW", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return None
