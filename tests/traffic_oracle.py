"""Expected exchange traffic from first principles, for the stream method's and NorMuon's
traffic tests: nothing here reads the engine's ranges, sources or layouts.

What a rank must send per step (bytes), given only the matrices' names and full shapes, each
rank's local pieces (where its elements sit in ``matrix.view(-1)``, found in the test, not asked
of the engine), the owner of each matrix (the planner's choice) and W:
  * sharded (FSDP2, FSDP1): each element of each piece once to the owner and the update's once
    back, so a rank sends its piece of every matrix it does not own and, for each matrix it
    owns, the other ranks' pieces of the update;
  * replicated (DDP, one process): no gather; the owner sends the whole update to the W - 1
    others;
  * the step's non-finite flag: 4 bytes from each rank to each of the W - 1 others;
  * stream's basis (float32): a (m, n) matrix's basis is a k x k block, k = min(m, n), stored
    in the first k² elements of a parameter-shaped tensor, so a piece carries the part of its
    flat range below k², both ways, as the piece does (replicated: k² from the owner to each
    other rank);
  * NorMuon's v (float32, m values, replicated on every rank): the owner sends m values to
    each of the W - 1 other ranks, also to ranks whose piece is empty.
"""

from __future__ import annotations

from typing import Optional

import torch

Range = tuple[int, int]


def matrix_shape(full_shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter's matrix: (out, prod(rest)); conv weights are (out, in * kh * kw)."""
    rows = full_shape[0]
    cols = 1
    for d in full_shape[1:]:
        cols *= d
    return rows, cols


def report_pieces(opt) -> dict:
    """For a worker's ``report``: per HTMuon matrix (the engine's order), its name, owner and
    this rank's local elements, flattened (a DTensor's local rows, FSDP1's 1-D view, or all)."""
    engine = opt.engine
    by_name = {}
    for group in opt.param_groups:
        if group["htmuon"]:
            for p, name in zip(group["params"], group["param_names"]):
                local = p.to_local() if hasattr(p, "to_local") else p
                by_name[name] = local.detach().reshape(-1).clone()
    return {"oracle_names": list(engine.names), "oracle_owners": list(engine.plan.owners),
            "oracle_local": [by_name[n] for n in engine.names]}


def fsdp2_rows(m: int, world: int, rank: int) -> Range:
    """FSDP2 ``Shard(0)``: torch.chunk's split, ceil(m / W) rows per rank, the last ones short
    or empty."""
    c = -(-m // world)
    return min(rank * c, m), min((rank + 1) * c, m)


def locate(local: torch.Tensor, full: torch.Tensor, name: str) -> Range:
    """Where ``local`` (a contiguous run of ``full.view(-1)``) sits, found by its values."""
    flat = full.reshape(-1)
    n = local.numel()
    if n == 0:
        return (0, 0)
    hits = [int(i) for i in torch.nonzero(flat == local[0]).flatten()]
    found = [s for s in hits if s + n <= flat.numel() and torch.equal(flat[s:s + n], local)]
    assert len(found) == 1, f"{name}: local piece found at {found} in the full tensor"
    return found[0], found[0] + n


def flat_ranges(results: list[dict], index: int, backend: str) -> list[Range]:
    """Each rank's [start, end) of matrix ``index`` in ``matrix.view(-1)``."""
    name = results[0]["oracle_names"][index]
    full = results[0]["params"][name]
    m, n = matrix_shape(tuple(full.shape))
    world = len(results)
    if backend == "fsdp2":
        out = []
        for rank in range(world):
            lo, hi = fsdp2_rows(m, world, rank)
            out.append((lo * n, hi * n))
        for rank, r in enumerate(results):  # the literal formula is what FSDP2 really holds
            assert r["oracle_local"][index].numel() == out[rank][1] - out[rank][0], (name, rank)
        return out
    if backend == "fsdp1":
        return [locate(r["oracle_local"][index], full, name) for r in results]
    return [(0, m * n)] * world  # ddp, one process: whole everywhere


def expected_sent(results: list[dict], rank: int, backend: str, elem: int = 4,
                  state: Optional[str] = None) -> int:
    """Bytes ``rank`` sends in one step. ``elem``: bytes of a wire element (4 fp32, 2 bf16);
    ``state``: None, ``"stream"`` (the basis) or ``"normuon"`` (v)."""
    world = len(results)
    replicated = backend in ("ddp", "replicated") or world == 1
    me = results[rank]
    total = 0
    for i, (name, owner) in enumerate(zip(me["oracle_names"], me["oracle_owners"])):
        m, n = matrix_shape(tuple(results[0]["params"][name].shape))
        ranges = flat_ranges(results, i, "ddp" if replicated else backend)
        size = [e - s for s, e in ranges]
        k2 = min(m, n) ** 2
        below = [min(e, k2) - min(s, k2) for s, e in ranges]  # the basis part of each piece
        if replicated:
            if owner == rank:
                total += (world - 1) * m * n * elem
                total += (world - 1) * k2 * 4 if state == "stream" else 0
        elif owner == rank:
            total += sum(size[q] for q in range(world) if q != rank) * elem
            total += sum(below[q] for q in range(world) if q != rank) * 4 if state == "stream" else 0
        else:
            total += size[rank] * elem
            total += below[rank] * 4 if state == "stream" else 0
        if state == "normuon" and owner == rank:
            total += (world - 1) * m * 4
    flag = (world - 1) * 4 if me["oracle_names"] else 0
    return total + flag
