"""Metrics sinks (main process only): JSON Lines always, TensorBoard and wandb when installed
and asked for, and a PNG of the loss curves at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from ..metrics_jsonl import read_metrics


class MetricsWriter:
    """Writes one JSON object per line to ``output_dir/metrics.jsonl`` (appending, so a resumed
    run continues the file) and mirrors scalars to TensorBoard/wandb.

    Create it on every rank; only the main process writes.
    """

    def __init__(self, output_dir: Path, report_to: str, is_main: bool, run_name: Optional[str],
                 config: dict[str, Any], resumed_step: int = 0) -> None:
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.messages: list[str] = []
        self._tb = None
        self._wandb = None
        targets = {t.strip() for t in report_to.split(",") if t.strip()} - {"none"}
        unknown = targets - {"jsonl", "tensorboard", "wandb"}
        if unknown:
            from .config import ConfigError

            raise ConfigError(f"--report_to: unknown {sorted(unknown)}; use jsonl, tensorboard, wandb or none")
        self.jsonl = "jsonl" in targets
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.jsonl and self.path.exists():
            # Drop rows past the checkpoint we resume from: they were written after it and the
            # resumed run writes them again.
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard" / (run_name or "run")))
            except ImportError:
                self.messages.append("TensorBoard not installed (pip install tensorboard): logging to metrics.jsonl only")
        if "wandb" in targets:
            try:
                import wandb

                self._wandb = wandb.init(project="htmuon-dist", name=run_name, config=config, resume="allow")
            except ImportError:
                self.messages.append("wandb requested but not installed (pip install wandb): skipped")

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"time": round(time.time(), 3), **row}
        if self.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_losses(metrics_path: Path, out_png: Path, title: str) -> Optional[str]:
    """Train loss (and its moving average) and eval loss against step, as a PNG.

    Returns None on success, else a message saying why no plot was made.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss plot: matplotlib is not installed (pip install matplotlib)"
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return "no loss plot: metrics.jsonl has no training rows"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.45, label="train loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"train loss ({window}-point mean)")
    if evals:
        es, el = zip(*evals)
        ax.plot(es, el, "o-", lw=1.6, label=f"eval loss (final ppl {math.exp(el[-1]):.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return None
