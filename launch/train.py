#!/usr/bin/env python
"""Thin entry point: ``accelerate launch [--config_file configs/accelerate/X.yaml] launch/train.py
--config configs/train/Y.yaml [--option value ...]``. Everything lives in htmuon_dist.training."""

import sys

from htmuon_dist.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
