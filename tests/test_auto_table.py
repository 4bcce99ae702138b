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


def test_auto_explains_which_clause_of_the_rule_chose():
    # each clause names itself, and the method is rule_method's
    cases = {
        ("cuda", 5461, 2048, 1 / 16): ("log_ns", "m/n >= 2"),
        ("cuda", 2048, 2048, 1 / 8): ("log_ns", "near square at p >= 0.125"),
        ("cuda", 2048, 2048, 1 / 16): ("eigh", "near square at p < 0.125"),
        ("cuda", 2048, 2048, None): ("eigh", "or unknown"),
        ("cuda", 5461, 2048, 0.0): ("eigh", "p = 0 is outside [0.0625, 1]"),
        ("mps", 5461, 2048, 1 / 8): ("eigh", "the exact method on mps"),
    }
    for (device, m, n, power), (method, clause) in cases.items():
        name, reason = auto_table.rule_with_reason(device, m, n, power)
        assert (name, name) == (method, auto_table.rule_method(device, m, n, power)) and clause in reason
        name, why = fast.auto_explain(device, m, n, power=power)  # no table entry for these devices
        assert name == method and why.startswith("rule: no measurements") and why.endswith(reason)
    name, why = fast.auto_explain("cpu", 512, 512, power=0.125)  # the shipped CPU table
    assert name == fast.auto_choice("cpu", 512, 512, power=0.125) and why.startswith("measured at 512x512")


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
    small, entry = table["devices"]["cpu"]["entries"]
    # rows without a power count as LEGACY_POWER: they replace that run at 5461 x 2048 only
    assert entry["shape"] == [5461, 2048] and entry["power"] == auto_table.LEGACY_POWER
    assert set(entry["methods"]) == {"eigh", "gram32"} and entry["source"] == "test"
    assert entry["methods"]["eigh"] == {"time_s": 2.4, "err_over_bar": 2e-6}  # the slower orientation
    assert small["shape"] == [512, 512] and small["methods"] == SYNTH["devices"]["cpu"]["entries"][0]["methods"]
    assert small["source"] == "unknown"  # an older run's entry keeps (the lack of) its provenance
    assert "Fake GPU" in table["devices"]  # other devices kept
    assert auto_table.choose("cpu", 2048, 5461, table)[0] == "eigh"


def _run(shape, power, **methods):
    return {"shape": list(shape), "power": power,
            "methods": {k: {"time_s": t, "err_over_bar": e} for k, (t, e) in methods.items()}}


def test_choice_reads_the_run_at_the_largest_measured_power_at_or_below_p():
    # log_ns met the bar at p = 1/8 on a square shape, missed at 1/16 (as measured on CPUs);
    # the table must not hand it a power it was never shown to meet
    table = _table(**{"Fake GPU": [
        _run((2048, 2048), 0.125, eigh=(0.030, 1e-6), log_ns=(0.005, 0.8)),
        _run((2048, 2048), 0.0625, eigh=(0.030, 1e-6), log_ns=(0.005, 1.8)),
        _run((5461, 2048), 0.125, eigh=(0.040, 1e-6), log_ns=(0.006, 0.5)),
    ]})
    choose = auto_table.choose
    assert choose("Fake GPU", 2048, 2048, table, power=0.125)[0] == "log_ns"
    assert choose("Fake GPU", 2048, 2048, table, power=0.25)[0] == "log_ns"  # read off the 1/8 run
    assert choose("Fake GPU", 2048, 2048, table, power=0.1)[0] == "eigh"  # the 1/16 run decides
    assert choose("Fake GPU", 2048, 2048, table, power=0.0625)[0] == "eigh"
    # power unknown: a method must have met the bar in every run of the shape
    assert choose("Fake GPU", 2048, 2048, table)[0] == "eigh"
    # nothing measured at or below p: the rule, whatever the larger powers say
    name, why = choose("Fake GPU", 5461, 2048, table, rule="eigh", power=0.0625)
    assert name == "eigh" and "nothing measured at p <= 0.0625" in why
    assert choose("Fake GPU", 5461, 2048, table, rule="log_ns", power=0.0625)[0] == "log_ns"
    assert choose("Fake GPU", 5461, 2048, table, power=0.0)[0] == auto_table.RULE_METHOD
    name, why = choose("Fake GPU", 5461, 2048, table, power=0.5)
    assert name == "log_ns" and "p = 0.125" in why
    # an entry without a power (a table written before powers were recorded) counts as 1/8
    legacy = _table(cpu=[{"shape": [512, 512], "methods": {"gram_rr": {"time_s": 0.01, "err_over_bar": 1e-4}}}])
    assert choose("cpu", 512, 512, legacy, power=0.125)[0] == "gram_rr"
    assert choose("cpu", 512, 512, legacy, power=0.0625)[0] == auto_table.RULE_METHOD


def test_merge_keeps_other_powers_and_replaces_the_same_one():
    first = [{"shape": [2048, 2048], "method": "eigh", "power": 0.125, "time_s": 0.03, "err_over_bar": 1e-6},
             {"shape": [2048, 2048], "method": "log_ns", "power": 0.125, "time_s": 0.005, "err_over_bar": 0.8}]
    second = [{"shape": [2048, 2048], "method": "eigh", "power": 0.0625, "time_s": 0.03, "err_over_bar": 1e-6},
              {"shape": [2048, 2048], "method": "log_ns", "power": 0.0625, "time_s": 0.005, "err_over_bar": 1.8}]
    table = auto_table.merge_measurements({"devices": {}}, "G", first, "run 1")
    table = auto_table.merge_measurements(table, "G", second, "run 2")
    runs = table["devices"]["G"]["entries"]
    assert [(e["power"], e["source"]) for e in runs] == [(0.0625, "run 2"), (0.125, "run 1")]
    assert auto_table.choose("G", 2048, 2048, table, power=0.125)[0] == "log_ns"
    assert auto_table.choose("G", 2048, 2048, table, power=0.0625)[0] == "eigh"
    redo = [dict(first[1], err_over_bar=1.5)]  # a later run at 1/8 replaces that run whole
    table = auto_table.merge_measurements(table, "G", redo, "run 3")
    assert [(e["power"], e["source"], sorted(e["methods"])) for e in table["devices"]["G"]["entries"]] == [
        (0.0625, "run 2", ["eigh", "log_ns"]), (0.125, "run 3", ["log_ns"])]
    assert auto_table.choose("G", 2048, 2048, table, rule="eigh", power=0.125)[0] == "eigh"
    assert json.loads(json.dumps(table)) == table  # what --write-table writes reads back the same


def test_shipped_table_names_registered_methods():
    table = json.loads(auto_table.TABLE_PATH.read_text())
    assert table["devices"], "the package ships measurements"
    for key, dev in table["devices"].items():
        for entry in dev["entries"]:
            assert 0.0 < entry["power"] <= 1.0 and entry["source"], (key, entry["shape"])
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


def test_spectral_benchmark_writes_one_entry_per_shape_and_power(tmp_path):
    # benchmarks/spectral.py --powers ... --write-table: each row carries its power, and the
    # table it writes gives auto each power's own run (other devices' entries untouched)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import spectral as bench

    path = tmp_path / "table.json"
    path.write_text(json.dumps(SYNTH))
    bench.main(["--device", "cpu", "--shapes", "60m", "--methods", "eigh", "--powers", "0.125,0.0625",
                "--repeat", "1", "--json", str(tmp_path / "rows.json"), "--write-table", str(path)])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert sorted({(tuple(r["shape"]), r["method"], r["power"]) for r in rows}) == sorted(
        (shape, name, p) for shape in [(512, 512), (512, 1376), (1376, 512)] for name in ("ns5", "eigh")
        for p in (0.0625, 0.125))
    assert all(r["err_over_bar"] <= 1.0 for r in rows if r["method"] == "eigh")
    table = json.loads(path.read_text())
    assert table["version"] == 2 and "Fake GPU" in table["devices"]
    measured = {(tuple(e["shape"]), e["power"]) for e in table["devices"]["cpu"]["entries"]}
    assert {((512, 512), 0.0625), ((512, 512), 0.125), ((1376, 512), 0.0625), ((1376, 512), 0.125),
            ((5461, 2048), 0.125)} == measured  # SYNTH's 5461 x 2048 run (no power: 1/8) is kept
    for p in (0.0625, 0.125):
        assert auto_table.choose("cpu", 512, 512, table, power=p)[0] == "eigh"
