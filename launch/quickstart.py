"""Single-process HTMuon quickstart: a tiny LLaMA learns from the standard library's docstrings.

    python launch/quickstart.py [--steps 60] [--power 0.125]

Needs no download: the text is the docstrings of the Python standard library on this machine,
tokenised as bytes. Prints the loss every 10 steps; it should fall from ~5.6 to below 3.
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from htmuon_dist import HTMuon, param_groups

MODULES = ("argparse", "collections", "json", "pathlib", "re", "subprocess", "textwrap", "unittest")


def stdlib_text() -> str:
    """Docstrings of a few standard-library modules and their public members (~200 KB)."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--power", type=float, default=0.125)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(stdlib_text().encode("utf-8")), dtype=torch.uint8).long()
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = HTMuon(param_groups(model), lr=args.lr, power=args.power, adamw_lr=3e-3)
    print(f"{len(data):,} bytes of docstrings, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, HTMuon p={args.power}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data) - args.seq, (args.batch,))
        batch = torch.stack([data[i : i + args.seq] for i in idx])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
