"""Heavy-tailed spectral diagnostics (HT-SR, WeightWatcher's conventions): per-matrix power-law
exponent α of the ESD of WᵀW and related statistics; ``htmuon-diagnose`` for saved models."""

from .esd import SpectralStats, eigenvalues, esd_alpha, fit_power_law, spectral_stats, stats_from_eigenvalues

__all__ = ["SpectralStats", "eigenvalues", "esd_alpha", "fit_power_law", "spectral_stats", "stats_from_eigenvalues"]
