"""``method="stream"`` (the reference's htmuon_stream) sharded: its warm-started basis is state
stored like the parameter, carried to each owner and back by the exchange engine.

FSDP2, FSDP1, DDP and DeepSpeed ZeRO-1/2/3 at W = 1..4 equal the single-process optimizer
(fp32, gloo); the basis is bit-identical on every rank that holds it; the traffic is
each piece and its part of the basis once each way (tests/traffic_oracle.py); a DCP checkpoint saved at W
loads at W' with the basis, and the run continues exactly (a cold basis would not).

Tolerance: 1e-4 relative per parameter, not 1e-5, because the method itself amplifies the
backends' summation-order noise. Measured in ONE process (tiny LLaMA, 3 steps,
benchmarks/noise_sensitivity.py): multiplying every gradient by (1 + 1e-7·N(0, 1)) moves a
parameter by 1.4e-5 with stream (eigh: 3.7e-7) at a global batch of 6; at a batch of 4 the q/k gradients are rank-deficient, the warm basis's
trailing columns are set by rounding noise and the same 1e-7 moves them by 4.5e-3, so every
case here steps on at least 6 sequences. The odd-shapes model of the other sharded tests is
worse (its 5 x 3 conv weight moves by 1.1e-3 under that noise in one process), so uneven,
straddling and empty pieces are tested on the engine alone, with identical inputs on every
rank count: there the result must be bit for bit that of one process. A sharding fault (a basis part lost, misplaced or
cold) moves them by more than 1e-3 (the last test shows a cold restart does).
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from dist_models import build, loss_fn
from htmuon_dist import HTMuon, param_groups
from htmuon_dist.optimizer import METHOD_STATE
from multirank import run_ranks
from test_checkpoint_reshard import batches, phase_worker
from test_distributed import OPT, PER_RANK_BATCH, assert_same_on_every_rank, assert_same_params, reference_run, sharded_worker
from traffic_oracle import expected_sent, report_pieces

pytestmark = pytest.mark.multirank

STREAM = dict(OPT, method="stream")
TOL = 1e-4


def _bases(opt: HTMuon) -> dict[str, torch.Tensor]:
    """The whole method state per parameter name (DTensors gathered; non-ZeRO)."""
    out = {}
    for group in opt.param_groups:
        if not group["htmuon"]:
            continue
        for p, name in zip(group["params"], group["param_names"]):
            value = opt.state.get(p, {}).get(METHOD_STATE)
            if value is not None:
                out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
    return out


def _report(opt: HTMuon) -> dict:
    return {"bases": _bases(opt), "stream_error": opt.stream_error(), **report_pieces(opt)}


def worker(rank, world, kind, backend, steps, accum, opt_kwargs):
    return sharded_worker(rank, world, kind, backend, steps, accum, opt_kwargs, report=_report)


@pytest.mark.parametrize("backend,world,kind", [
    ("fsdp2", 1, "llama"),
    ("fsdp2", 2, "llama"),
    ("fsdp2", 3, "llama"),
    ("fsdp1", 2, "llama"),
    ("ddp", 4, "llama"),
], ids=["fsdp2-w1", "fsdp2-w2", "fsdp2-w3", "fsdp1-w2", "ddp-w4"])
def test_sharded_stream_equals_single_process(backend, world, kind):
    steps, accum = 3, -(-6 // (PER_RANK_BATCH * world))  # >= 6 sequences (module docstring)
    want = reference_run(kind, world, steps, accum, STREAM)
    results = run_ranks(worker, world, kind, backend, steps, accum, STREAM)
    for r in results:
        assert_same_params(r["params"], want, tol=TOL)
    for rank, r in enumerate(results):
        # first principles (tests/traffic_oracle.py): pieces and basis parts, each once each way
        assert r["sent"] == [expected_sent(results, rank, backend, state="stream")] * steps, rank
        assert r["stream_error"] == results[0]["stream_error"] and 0.0 <= r["stream_error"] < 1.0
    if backend in ("fsdp2", "ddp"):  # the basis of every matrix: orthonormal, on every rank
        assert_same_on_every_rank([r["bases"] for r in results])
        for name, basis in results[0]["bases"].items():
            m, n = basis.shape
            k = min(m, n)
            v = basis.reshape(-1)[: k * k].reshape(k, k)
            assert torch.allclose(v.T @ v, torch.eye(k), atol=1e-4), name
            assert not basis.reshape(-1)[k * k :].any(), name


def test_bf16_wire_keeps_the_basis_float32_and_replicas_identical():
    """DDP at W = 3 with a bf16 wire: parameters and bases bit-identical on every rank, and
    the basis holds values bf16 cannot: it travelled as float32 bits."""
    opts = dict(STREAM, comm_dtype=torch.bfloat16)
    results = run_ranks(worker, 3, "llama", "ddp", 2, 1, opts)
    first = results[0]
    assert_same_on_every_rank([r["params"] for r in results])
    assert_same_on_every_rank([r["bases"] for r in results])
    exact = sum(int((b != b.bfloat16().float()).sum()) for b in first["bases"].values())
    assert exact > 0


@pytest.mark.parametrize("stage,world", [(1, 2), (2, 3), (3, 2)])
def test_zero_stream_equals_single_process_and_resumes(stage, world, tmp_path):
    pytest.importorskip("deepspeed")
    import ds_workers

    steps, k = 3, 2
    accum = 2 if world < 3 else 1  # at least 6 sequences per step (module docstring)
    want = ds_workers.reference_run(world, steps, accum, STREAM)
    full = run_ranks(ds_workers.zero_worker, world, stage, steps, accum, STREAM, False,
                     str(tmp_path), k, timeout=400)
    for r in full:
        assert_same_params(r["params"], want, tol=TOL)
        assert METHOD_STATE in r["momentum_keys"]
    resumed = run_ranks(ds_workers.zero_worker, world, stage, steps, accum, STREAM, False,
                        str(tmp_path), None, True, timeout=400)
    for a, b in zip(full, resumed):
        assert b["first_step"] == k
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name


def _single_process(steps: int, drop_state_at: int | None = None) -> dict[str, torch.Tensor]:
    model = build("llama")
    opt = HTMuon(param_groups(model, "reference"), process_group=None, **STREAM)
    for step, x in enumerate(batches(steps)):
        if step == drop_state_at:  # what a checkpoint without the basis would give
            sd = opt.state_dict()
            for st in sd["state"].values():
                st.pop(METHOD_STATE, None)
            opt.load_state_dict(sd)
        loss_fn("llama", model, x).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_basis_saved_at_w2_loads_at_w3_and_continues_exactly(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run_ranks(phase_worker, 2, ckpt, False, 2, 0, STREAM, _bases)
    loaded = run_ranks(phase_worker, 3, ckpt, True, 2, 2, STREAM, _bases)
    want = _single_process(4)
    for r in loaded:
        for name, basis in saved[0]["final"].items():  # the saved basis, whole, after the load
            assert torch.equal(r["loaded"][name], basis), name
        assert_same_params(r["params"], want, tol=TOL)
    # the test can fail: restarting cold at step 2 lands far outside the tolerance
    cold = _single_process(4, drop_state_at=2)
    with pytest.raises(AssertionError):
        assert_same_params(cold, want, tol=1e-3)


# -- the engine's state channel on its own: arbitrary cuts, identical inputs -------------------

# (m, n): square, tall, wide, a 3-row matrix that a rank at W = 4 holds none of, one row
SHAPES = [(16, 16), (24, 9), (7, 20), (3, 16), (1, 5)]


def _flat_ranges(world: int, rank: int) -> list[tuple[int, int]]:
    """ZeRO-like: the matrices flattened one after the other and cut into W equal pieces, so
    pieces straddle rows and matrices and some are empty; this rank's range of each matrix."""
    total = sum(m * n for m, n in SHAPES)
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, base = [], 0
    for m, n in SHAPES:
        out.append((min(max(lo - base, 0), m * n), min(max(hi - base, 0), m * n)))
        base += m * n
    return out


class _StateUpdate:
    """A MatrixUpdate over given pieces that keeps a method state shaped like each matrix
    (offsets are into this rank's flat piece)."""

    keeps_method_state = True
    keeps_row_state = False
    device = torch.device("cpu")

    def __init__(self, inputs, ranges, states):
        self.inputs, self.ranges, self.states = inputs, ranges, states
        self.out = [None] * len(inputs)

    def dtype(self, i):
        return torch.float32

    def agreed(self, found):
        pass

    def source_into(self, i, a, b, out):
        out.copy_(self.inputs[i][a:b])

    def state_into(self, i, a, b, out):
        out.copy_(self.states[i][a:b])

    def finish_rows(self, i, result):
        raise AssertionError("no row state here")

    def apply_rows(self, items):
        raise AssertionError("no row state here")

    def apply_state(self, items):
        for i, a, values in items:
            self.states[i][a : a + values.numel()] = values

    def apply(self, items):
        for i, piece in items:
            self.out[i] = piece.clone()


def engine_worker(rank, world, steps, comm_dtype):
    """Three steps of ``stream`` through the engine on slowly drifting matrices; this rank's
    pieces of the last outputs and of the states, and the owners' error estimates."""
    from htmuon_dist.distributed.engine import ExchangeEngine, SpectralSpec

    ranges = _flat_ranges(world, rank)
    engine = ExchangeEngine(SHAPES, ranges, [SpectralSpec(0.125, "stream")] * len(SHAPES),
                            [f"m{i}" for i in range(len(SHAPES))],
                            group=torch.distributed.group.WORLD if world > 1 else None,
                            comm_dtype=comm_dtype)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(m, n, generator=gen) for m, n in SHAPES]
    states = [torch.zeros(e - s) for s, e in ranges]
    errors = {}
    for step in range(steps):
        inputs = [(x + 0.01 * step * x.roll(1, 0)).reshape(-1)[s:e] for x, (s, e) in zip(base, ranges)]
        update = _StateUpdate(inputs, ranges, states)
        engine.step(update, [True] * len(SHAPES))
        errors.update({i: float(err) for i, err in engine.state_errors.items()})
    return {"ranges": ranges, "out": update.out, "states": states, "errors": errors}


def _assemble(results, key):
    whole = [torch.zeros(m * n) for m, n in SHAPES]
    for r in results:
        for i, (s, e) in enumerate(r["ranges"]):
            if e > s:
                whole[i][s:e] = r[key][i]
    return whole


@pytest.mark.parametrize("world", [2, 3, 4])
def test_engine_carries_the_state_through_any_cut(world):
    """Pieces cut anywhere (straddling rows and matrices, empty) give bit for bit the outputs,
    states and error estimates of one process, and every matrix's state is its orthonormal
    (k, k) basis followed by zeros."""
    one = run_ranks(engine_worker, 1, 3, None)
    many = run_ranks(engine_worker, world, 3, None)
    assert any(e == s for r in many for s, e in r["ranges"])  # some rank holds none of a matrix
    for key in ("out", "states"):
        for i, (a, b) in enumerate(zip(_assemble(one, key), _assemble(many, key))):
            assert torch.equal(a, b), (key, SHAPES[i])
    assert {i: v for r in many for i, v in r["errors"].items()} == one[0]["errors"]
    for (m, n), state in zip(SHAPES, _assemble(many, "states")):
        k = min(m, n)
        v = state[: k * k].reshape(k, k)
        assert torch.allclose(v.T @ v, torch.eye(k), atol=1e-5)
        assert not state[k * k :].any()


def test_engine_state_travels_as_float32_bits_on_a_bf16_wire():
    one = run_ranks(engine_worker, 1, 2, torch.bfloat16)
    many = run_ranks(engine_worker, 3, 2, torch.bfloat16)
    for a, b in zip(_assemble(one, "states"), _assemble(many, "states")):
        assert torch.equal(a, b)
    states = torch.cat(_assemble(many, "states"))
    assert (states != states.bfloat16().float()).any()  # values bf16 cannot hold survived
