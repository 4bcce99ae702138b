"""Integrations with training frameworks (DeepSpeed, Accelerate's DeepSpeed plugin)."""
