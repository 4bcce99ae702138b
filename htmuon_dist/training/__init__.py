"""LLaMA pretraining with HTMuon, Muon or AdamW under ``accelerate launch``.

Modules: :mod:`.config` (arguments, reference table), :mod:`.data` (corpora, tokenizers,
per-rank token streams), :mod:`.model` (LLaMA configs, init, export), :mod:`.parallel`
(FSDP2/FSDP1/DDP/DeepSpeed), :mod:`.optim` (optimizers, schedule), :mod:`.checkpoint`,
:mod:`.metrics`, :mod:`.loop` (the loop), :mod:`.cli` (the ``htmuon-train`` command).
"""

from .config import Config, ConfigError, DataArguments, ModelArguments, TrainArguments, parse_args

__all__ = ["Config", "ConfigError", "DataArguments", "ModelArguments", "TrainArguments", "parse_args", "main"]


def main(argv=None) -> int:
    """The ``htmuon-train`` console script."""
    from .cli import main as _main

    return _main(argv)
