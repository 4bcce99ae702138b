"""``htmuon-diagnose PATH`` (or ``python -m htmuon_dist.diagnostics PATH``): heavy-tailed
spectral diagnostics of a saved model, one matrix at a time (the model is never loaded whole).

PATH is a ``save_pretrained`` directory with ``*.safetensors`` (one file or shards; any Hugging
Face LLaMA, or any model whose weights are safetensors) or a single ``.safetensors`` file.
Prints one row per >= 2-D weight (α, x_min, KS distance, tail size, stable rank, spectral norm,
α-weighted) and the mean α per matrix type, and writes a PNG of chosen matrices' ESDs with the
fitted power law.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .esd import SpectralStats, eigenvalues, stats_from_eigenvalues
from .monitor import is_hidden, matrix_type, short_name


class DiagnoseError(Exception):
    """A problem with the input, reported as one line."""


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of ``path`` (a directory or one file), or a one-line error."""
    if not path.exists():
        raise DiagnoseError(f"{path}: no such file or directory (expected a save_pretrained directory "
                            f"or a .safetensors file)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise DiagnoseError(f"{path}: not a .safetensors file (pass the model directory or its .safetensors file)")
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))[:2] + sorted(p.name for p in path.glob("*.pt"))[:2]
        hint = (f"; it has {', '.join(other)}: re-save with save_pretrained(..., safe_serialization=True)"
                if other else "; expected a model saved with save_pretrained")
        raise DiagnoseError(f"{path}: no *.safetensors files in this directory{hint}")
    return files


def _natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def iter_matrices(files: Sequence[Path], pattern: Optional[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every >= 2-D weight, one at a time, in natural name order over all
    shards (only one tensor is materialised at a time; safetensors memory-maps the files)."""
    from safetensors import SafetensorError, safe_open

    regex = re.compile(pattern) if pattern else None
    handles, where = [], {}
    for f in files:
        try:
            handles.append(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as exc:
            raise DiagnoseError(f"{f}: cannot read it as safetensors ({exc})") from None
        for name in handles[-1].keys():
            where[name] = handles[-1]
    for name in sorted(where, key=_natural):
        if regex is not None and not regex.search(name):
            continue
        shape = where[name].get_slice(name).get_shape()
        if len(shape) < 2 or 0 in shape:
            continue
        yield name, where[name].get_tensor(name)


def _fmt(v: float, digits: int = 3) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-2) else f"{v:.{digits}f}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="htmuon-diagnose",
        description="Per-layer heavy-tailed spectral diagnostics (WeightWatcher conventions: power-law "
                    "alpha of the ESD of W^T W, x_min by the KS method, MLE alpha) of a saved model.",
    )
    p.add_argument("path", help="save_pretrained directory with *.safetensors, or one .safetensors file")
    p.add_argument("--match", default=None, help="regex: analyse only weights whose name matches (default: every >= 2-D weight)")
    p.add_argument("--plot_layers", default=r"layers\.0\.",
                   help="regex of the weights whose ESD goes into the PNG (default: the first decoder layer's; at most 12 panels)")
    p.add_argument("--png", default="esd.png", help="where to write the ESD plot (default %(default)s; 'none' to skip)")
    p.add_argument("--json", default=None, help="also write every matrix's statistics to this JSON file")
    p.add_argument("--device", default="cpu", help="torch device for the eigenvalues (cpu, cuda)")
    p.add_argument("--min_tail", type=int, default=None, help="fewest eigenvalues a fitted tail may hold (default min(10, N/2))")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    files = safetensors_files(Path(args.path))
    device = torch.device(args.device)
    plot_regex = re.compile(args.plot_layers) if args.plot_layers else None
    rows: list[dict] = []
    panels: list[tuple[str, torch.Tensor, SpectralStats]] = []
    header = f"{'matrix':44} {'shape':>12} {'alpha':>7} {'xmin':>9} {'KS':>6} {'tail':>5} {'st.rank':>8} {'||W||2':>8} {'a_wtd':>7}"
    print(header)
    print("-" * len(header))
    for name, tensor in iter_matrices(files, args.match):
        W = tensor.to(device)
        lam = eigenvalues(W)
        st = stats_from_eigenvalues(lam, args.min_tail)
        shape = "x".join(map(str, tensor.shape))
        print(f"{short_name(name)[:44]:44} {shape:>12} {_fmt(st.alpha, 2):>7} {_fmt(st.xmin):>9} {_fmt(st.ks_distance):>6} "
              f"{st.num_tail:>5} {_fmt(st.stable_rank, 1):>8} {_fmt(st.spectral_norm, 2):>8} {_fmt(st.alpha_weighted, 2):>7}", flush=True)
        rows.append({"name": name, "shape": list(tensor.shape), **st.as_dict()})
        if plot_regex is not None and plot_regex.search(name) and len(panels) < 12:
            panels.append((f"{short_name(name)} {shape}", lam.cpu(), st))
    if not rows:
        raise DiagnoseError(f"{args.path}: no >= 2-D weights" + (f" match --match {args.match!r}" if args.match else ""))
    by_type: dict[str, list[float]] = {}
    for r in rows:
        if math.isfinite(r["alpha"]):
            by_type.setdefault(matrix_type(r["name"]), []).append(r["alpha"])
    hidden = [r["alpha"] for r in rows if is_hidden(r["name"]) and math.isfinite(r["alpha"])]
    print("-" * len(header))
    print("mean alpha per type: " + ", ".join(f"{k} {sum(v) / len(v):.2f} ({len(v)})" for k, v in by_type.items()))
    if hidden:
        print(f"mean alpha of the {len(hidden)} hidden matrices: {sum(hidden) / len(hidden):.3f} "
              f"(HT-SR reading: 2-6 typical of trained layers, smaller = heavier tail)")
    if args.json:
        Path(args.json).write_text(json.dumps({"path": str(args.path), "matrices": rows}, indent=1))
        print(f"statistics: {args.json}")
    if args.png and args.png != "none":
        if not panels:
            print(f"no ESD plot: no analysed weight matches --plot_layers {args.plot_layers!r}")
        else:
            from .plots import plot_esd_fits

            msg = plot_esd_fits(panels, Path(args.png))
            print(msg or f"ESD plot ({len(panels)} matrices): {args.png}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DiagnoseError as exc:
        print(f"htmuon-diagnose: {exc}", file=sys.stderr)
        return 2
    except re.error as exc:
        print(f"htmuon-diagnose: bad regular expression in --match/--plot_layers: {exc}", file=sys.stderr)
        return 2
