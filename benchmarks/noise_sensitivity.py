"""How far each spectral method carries tiny gradient noise into the parameters (one process).

    python benchmarks/noise_sensitivity.py                           # eigh, stream, ns5; batch 6 and 4
    python benchmarks/noise_sensitivity.py --methods stream --batches 8 --steps 5

Sharded runs sum gradients in another order than one process, a relative difference of about
1e-7. This measures what such a difference becomes: the tiny LLaMA of the tests is trained
``--steps`` HTMuon steps twice from the same start and data, once with every gradient
multiplied by ``1 + noise·N(0, 1)``, and the worst relative parameter difference
``||a - b|| / ||a||`` is printed per method and global batch. It sets the tolerance of the
sharded equivalence tests (tests/test_stream_sharded.py): a method that amplifies 1e-7 to 1e-5
cannot be held to 1e-5 against one process, whatever the sharding does. Small batches make
the gradients rank-deficient, where a warm-started method (``stream``) carries rounding noise
from step to step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # dist_models.py: the tests' tiny LLaMA and batches

from dist_models import build, loss_fn, make_batches  # noqa: E402
from htmuon_dist import HTMuon, param_groups  # noqa: E402


def train(method: str, batch: int, steps: int, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """The tiny LLaMA after ``steps`` steps; gradients scaled by (1 + noise·N(0, 1))."""
    model = build("llama")
    power = 0.0 if method == "ns5" else 0.125
    opt = HTMuon(param_groups(model, "reference"), process_group=None, lr=0.02, power=power,
                 method=method, weight_decay=0.1, adamw_lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for micro in make_batches("llama", steps, 1, batch):
        loss_fn("llama", model, micro[0]).backward()
        for p in model.parameters():
            p.grad.mul_(1 + noise * torch.randn(p.grad.shape, generator=gen))
        opt.step()
        opt.zero_grad()
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="eigh,stream,ns5", help="comma list of spectral methods")
    ap.add_argument("--batches", default="6,4", help="comma list of global batch sizes (sequences)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps")
    ap.add_argument("--noise", type=float, default=1e-7, help="relative gradient noise")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"tiny LLaMA, {args.steps} steps, gradient noise {args.noise:g} (relative), fp32 CPU")
    print(f"{'method':>8} {'batch':>6} {'worst rel. change':>18}  parameter")
    for method in args.methods.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            clean = train(method, batch, args.steps, 0.0, args.seed)
            noisy = train(method, batch, args.steps, args.noise, args.seed)
            change = {n: float((clean[n] - noisy[n]).norm() / clean[n].norm().clamp_min(1e-30)) for n in clean}
            worst = max(change, key=change.get)
            print(f"{method:>8} {batch:>6} {change[worst]:>18.2e}  {worst}", flush=True)


if __name__ == "__main__":
    main()
