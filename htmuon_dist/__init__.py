"""htmuon-dist: the HTMuon optimizer for sharded LLM training.

Layers: :mod:`htmuon_dist.spectral` (the math), :mod:`htmuon_dist.optimizer` (the update
rule), :mod:`htmuon_dist.distributed` (who computes what, and the communication).
"""

from .optimizer import HTMuon, attach_fsdp1
from .param_groups import param_groups
from .spectral import available_methods, default_rtol, newton_schulz5, spectral_power

__version__ = "0.1.0"

__all__ = [
    "HTMuon",
    "attach_fsdp1",
    "param_groups",
    "spectral_power",
    "newton_schulz5",
    "default_rtol",
    "available_methods",
]
