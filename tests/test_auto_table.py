"""method="auto" picks per device and shape from the measured table, else the documented rule."""

from __future__ import annotations

import json

import torch

from htmuon_dist.spectral import auto_table, fast, get_method, method_cost, method_workspace, spectral_power
from htmuon_dist.spectral.accuracy import make_matrix


def _table(**devices):
    return {"version": 1, "devices": {k: {"entries": v} for k, v in devices.items()}}


SYNTH = _table(
    cpu=[
        {"shape": [512, 512], "methods": {
            "eigh": {"time_s": 0.040, "err_over_bar": 1e-6},
            "gram_rr": {"time_s": 0.030, "err_over_bar": 1e-4},
            "tracked_ns": {"time_s": 0.010, "err_over_bar": 1.5},   # fastest but fails the bar
            "ns5": {"time_s": 0.005, "err_over_bar": 6.0}}},
        {"shape": [5461, 2048], "methods": {
            "eigh": {"time_s": 2.5, "err_over_bar": 1e-6},
            "gram32": {"time_s": 1.0, "time_s_fallback": 3.0, "err_over_bar": 1e-4},
            "tracked_ns": {"time_s": 2.0, "err_over_bar": 0.05}}},
    ],
    **{"Fake GPU": [{"shape": [4096, 4096], "methods": {
        "eigh": {"time_s": 0.1, "err_over_bar": 1e-6},
        "gram32": {"time_s": 0.02, "time_s_fallback": 0.05, "err_over_bar": 1e-4}}}]},
)


def test_choice_follows_the_table():
    assert auto_table.choose("cpu", 512, 512, SYNTH)[0] == "gram_rr"  # tracked_ns/ns5 fail the bar
    assert auto_table.choose("cpu", 500, 700, SYNTH)[0] == "gram_rr"  # nearest measured shape
    # gram32 is ranked by its slower, ill-conditioned time (3.0 s): tracked_ns (2.0 s) wins
    assert auto_table.choose("cpu", 2048, 5461, SYNTH)[0] == "tracked_ns"
    assert auto_table.choose("Fake GPU", 11008, 4096, SYNTH)[0] == "gram32"
    name, why = auto_table.choose("Other GPU", 4096, 4096, SYNTH)
    assert name == auto_table.RULE_METHOD == "eigh" and why.startswith("rule")
    failing = _table(cpu=[{"shape": [64, 64], "methods": {"tracked_ns": {"time_s": 1, "err_over_bar": 2}}}])
    assert auto_table.choose("cpu", 64, 64, failing)[0] == "eigh"
    assert auto_table.choose("Other GPU", 64, 64, failing, rule="fast_ns")[0] == "fast_ns"


def test_cuda_rule_is_log_ns_where_it_met_the_bar():
    # no CUDA table entry is shipped: the documented rule applies (docs/spectral.md, "log_ns"):
    # log_ns on the MLP shapes (aspect >= 2) for p in [1/16, 1], near square for p >= 1/8 (where
    # it met the bar); eigh where it missed (square at p = 1/16), was not measured (p < 1/16) or
    # no bar can be met (p = 0)
    for m, n in [(2048, 5461), (5461, 2048), (4096, 11008), (1024, 512)]:
        assert fast.auto_choice("cuda", m, n) == "log_ns"
        for power in (1 / 16, 1 / 8, 0.5, 1.0):
            assert fast.auto_choice("cuda", m, n, power=power) == "log_ns"
        for power in (0.0, 0.03):
            assert fast.auto_choice("cuda", m, n, power=power) == "eigh"
    for m, n in [(2048, 2048), (4096, 4096), (3000, 2048)]:
        assert fast.auto_choice("cuda", m, n) == "eigh"
        assert fast.auto_choice("cuda", m, n, power=1 / 16) == "eigh"
        assert fast.auto_choice("cuda", m, n, power=1 / 8) == "log_ns"
        assert fast.auto_choice("cuda", m, n, power=0.25) == "log_ns"
    # the planner costs auto as the method it runs at the spec's power
    assert method_cost("auto", 2048, 2048, 0.125) == method_cost("log_ns", 2048, 2048)
    assert method_cost("auto", 2048, 2048, 0.0625) == method_cost("eigh", 2048, 2048)
    assert method_workspace("auto", 2048, 2048) == max(method_workspace(k, 2048, 2048) for k in ("eigh", "log_ns"))
    assert get_method("auto").cost(2048, 2048) == get_method("eigh").cost(2048, 2048)
    assert auto_table.rule_method("cpu") == "eigh"
    assert fast.auto_choice("cpu", 512, 512) in auto_table.CANDIDATES  # measured table
    # the planner costs auto as log_ns on every rank (device-independent plans)
    assert get_method("auto").cost(5461, 2048) == get_method("log_ns").cost(5461, 2048)


def test_auto_runs_what_the_table_names(monkeypatch, tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(SYNTH))
    monkeypatch.setattr(auto_table, "TABLE_PATH", path)
    x = make_matrix("gaussian", 512, 512, 1.0, seed=0)
    assert fast.auto_choice("cpu", 512, 512) == "gram_rr"
    got = spectral_power(x, 0.125, method="auto")
    assert torch.equal(got, spectral_power(x, 0.125, method="gram_rr"))
    assert not torch.equal(got, spectral_power(x, 0.125, method="eigh"))
    path.write_text("not json")
    auto_table._load.cache_clear()
    monkeypatch.setattr(auto_table, "TABLE_PATH", tmp_path / "other.json")  # unreadable -> rule
    assert fast.auto_choice("cpu", 512, 512) == "eigh"


def test_merge_measurements_round_trip():
    rows = [
        {"shape": [5461, 2048], "method": "eigh", "time_s": 2.0, "err_over_bar": 1e-6},
        {"shape": [2048, 5461], "method": "eigh", "time_s": 2.4, "err_over_bar": 2e-6},
        {"shape": [2048, 5461], "method": "gram32", "time_s": 1.0, "time_s_fallback": 2.9, "err_over_bar": 1e-4},
        {"shape": [2048, 5461], "method": "ns5", "time_s": 0.5, "err_over_bar": 6.0},
        {"shape": [2048, 5461], "method": "auto", "time_s": 2.0, "err_over_bar": 1e-6},
    ]
    table = auto_table.merge_measurements(SYNTH, "cpu", rows, "test")
    (entry,) = table["devices"]["cpu"]["entries"]
    assert entry["shape"] == [5461, 2048] and set(entry["methods"]) == {"eigh", "gram32"}
    assert entry["methods"]["eigh"] == {"time_s": 2.4, "err_over_bar": 2e-6}  # the slower orientation
    assert "Fake GPU" in table["devices"]  # other devices kept
    assert auto_table.choose("cpu", 2048, 5461, table)[0] == "eigh"


def test_shipped_table_names_registered_methods():
    table = json.loads(auto_table.TABLE_PATH.read_text())
    assert table["devices"], "the package ships measurements"
    for key, dev in table["devices"].items():
        for entry in dev["entries"]:
            for name in entry["methods"]:
                assert get_method(name).powers == "any", (key, name)
    for m, n in [(512, 512), (5461, 2048), (11008, 4096)]:
        assert get_method(auto_table.choose("cpu", m, n)[0]).powers == "any"


def test_cost_is_device_independent():
    # one fixed method (the CUDA rule's) on every rank, whatever device the rank has
    assert fast.auto_cost(5461, 2048) == get_method("log_ns").cost(5461, 2048)


def test_the_engine_plans_auto_at_each_spec_power():
    # the exchange engine balances owners on method_cost at the spec's power: auto is costed as
    # log_ns on a square matrix at p = 1/8 and as eigh at p = 1/16 (the CUDA rule on every rank)
    from htmuon_dist.distributed.engine import ExchangeEngine, SpectralSpec

    shapes = [(64, 64), (128, 64)]
    pieces = [((0, m * n),) for m, n in shapes]
    for power, square in ((0.125, "log_ns"), (0.0625, "eigh")):
        engine = ExchangeEngine(shapes, pieces, [SpectralSpec(power, "auto")] * 2, ["a", "b"])
        want = method_cost(square, 64, 64) + method_cost("log_ns", 128, 64)
        assert engine.plan.loads == (want,), (power, engine.plan.loads, want)
