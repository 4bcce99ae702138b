"""What ``method="auto"`` runs: the fastest method that met the accuracy bar, from measurements.

The measurements are ``auto_table.json`` next to this file (package data), written by
``python benchmarks/spectral.py --write-table`` on each device (one entry per device name:
``"cpu"`` or the CUDA device name, e.g. ``"NVIDIA H100 80GB HBM3"``). For a matrix of shape
(m, n), m >= n, on a device:

1. the device's measured shape nearest to (m, n) (distance of ``log m`` and ``log n``) is taken;
2. of that shape's runs (one per measured power ``p'``), the one at the largest ``p' <= p`` is
   read: the bar's gap shrinks with p while a method's error does not (``log_ns`` at 2048^2:
   err/gap 0.46, 0.19, 0.06 at p = 1/16, 1/8, 1/4), so a method that met the bar at ``p'``
   meets it at larger powers, not at smaller ones. Nothing measured at or below p: the rule
   (4.). Without a power (the planner's "p unknown"), every run of the shape counts: a method
   must have met the bar in all of them and is ranked by its slowest time;
3. among its methods that met the bar in that run (``err/bar <= 1``; Muon's ``ns5`` never
   does), the one with the smallest time wins. A method with a slower ``time_s_fallback``
   (``gram32`` on an ill-conditioned input, where it redoes the matrix in float64) is ranked by
   that slower time: real momenta are often ill-conditioned.
4. No measurement for the device (or the table unreadable): the documented rule
   :func:`rule_method`. On CUDA devices it is ``"log_ns"`` (16-bit products with a soft rank
   cut) where it met the accuracy bar (err/gap <= 0.25 on bf16 data's heavy-tailed, two-bulk,
   Marchenko-Pastur and power-law spectra; benchmarks/fast_ns_frontier.py, docs/spectral.md
   "log_ns"):

   * matrices at least :data:`FAST_MIN_ASPECT` times longer than wide, for p in
     [:data:`MIN_POWER`, 1]: measured at 512x256, 1365x512 and 5461x2048 (worst 0.130), priced
     at 1.06-1.09x bf16 NS5 at the LLaMA-1B/7B MLP shapes against 7-21x for ``eigh`` (cuSOLVER
     cannot batch it);
   * near-square matrices for p >= :data:`SQUARE_MIN_POWER` (the paper's 1/8 included):
     measured worst 0.20 at 1024x1024 and 2048x2048, priced at 1.87-1.93x NS5 against 39-67x.
     At p = 1/16 it missed on square Marchenko-Pastur spectra (0.44-0.46: many singular values
     near the noise cutoff), so smaller powers keep ``eigh``.

   Everywhere else, p = 0 included (no bar can be met there: the HTMuon update is the exact
   polar factor), it is :data:`RULE_METHOD` = ``"eigh"``, the exact method, fastest or
   near-fastest on every CPU measured (0.6-1.7x NS5). A measured table entry for the device
   overrides the rule.

Entries record the power they were measured at (``benchmarks/spectral.py --powers``); entries
of tables written before powers were recorded count as measured at :data:`LEGACY_POWER`, that
script's default then and now.

Lookups use host metadata only (device name, shape, power): no sync. The chosen method may sync
(``gram32`` syncs once per call to decide its float64 fallback); the others do not.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

TABLE_PATH = Path(__file__).with_name("auto_table.json")
RULE_METHOD = "eigh"
# the rule per device type where it differs from RULE_METHOD (see the module docstring, 3.)
RULE_BY_DEVICE_TYPE = {"cuda": "log_ns"}
# where the fast method met the bar (module docstring, 3.): aspect >= FAST_MIN_ASPECT for p in
# [MIN_POWER, 1], any aspect for p >= SQUARE_MIN_POWER
FAST_MIN_ASPECT = 2.0
MIN_POWER, SQUARE_MIN_POWER = 1.0 / 16.0, 1.0 / 8.0
# Methods auto may pick: HTMuon-capable (any p), with a rank cutoff, meeting the bar when measured.
CANDIDATES = ("eigh", "svd", "gram32", "gram_rr", "tracked_ns", "fast_ns", "log_ns")
# the power of an entry without one (module docstring)
LEGACY_POWER = 0.125

Table = dict[str, Any]


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Table:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"devices": {}}
    return data if isinstance(data.get("devices"), dict) else {"devices": {}}


def load_table(path: Optional[Path] = None) -> Table:
    """The shipped table (or ``path``); an unreadable file counts as no measurements."""
    return _load(str(path or TABLE_PATH))


def rule_method(device_type: str, m: Optional[int] = None, n: Optional[int] = None,
                power: Optional[float] = None) -> str:
    """The documented rule's method for a device type without measurements, for an (m, n)
    matrix (either orientation) at ``power``; without a shape, the device type's fast method;
    without a power, the choice for the powers the fast method covers at every aspect it covers
    (what the planner costs when it does not know p)."""
    return rule_with_reason(device_type, m, n, power)[0]


def rule_with_reason(device_type: str, m: Optional[int] = None, n: Optional[int] = None,
                     power: Optional[float] = None) -> tuple[str, str]:
    """(:func:`rule_method`'s method, which clause of the rule chose it)."""
    name = RULE_BY_DEVICE_TYPE.get(device_type, RULE_METHOD)
    if name == RULE_METHOD:
        return name, f"the exact method on {device_type}"
    if power is not None and not MIN_POWER <= power <= 1.0:
        return RULE_METHOD, f"p = {power:g} is outside [{MIN_POWER:g}, 1], where {name} was measured"
    if m is not None and n is not None and max(m, n) < FAST_MIN_ASPECT * min(m, n):
        if power is not None and power >= SQUARE_MIN_POWER:
            return name, f"near square at p >= {SQUARE_MIN_POWER:g}, where {name} met the bar"
        return RULE_METHOD, f"near square at p < {SQUARE_MIN_POWER:g} or unknown, where {name} missed the bar"
    return name, f"m/n >= {FAST_MIN_ASPECT:g}, where {name} met the bar"


@functools.lru_cache(maxsize=16)
def device_key(device_type: str, index: Optional[int] = None) -> str:
    """Table key of a device: ``"cpu"``, or the CUDA device's name."""
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return device_type


def _shape_distance(entry: dict, m: int, n: int) -> float:
    em, en = max(entry["shape"]), min(entry["shape"])
    return abs(math.log(em / m)) + abs(math.log(en / n))


def entry_power(entry: dict) -> float:
    """The power an entry was measured at (:data:`LEGACY_POWER` where it has none)."""
    return float(entry.get("power", LEGACY_POWER))


def _runs_for(entries: list[dict], m: int, n: int, power: Optional[float]) -> tuple[list[dict], tuple[int, int]]:
    """(the runs that decide, the nearest measured shape): the largest measured power <= power,
    or every run of the shape where power is None (module docstring, 1.-2.)."""
    nearest = min(entries, key=lambda e: _shape_distance(e, m, n))
    shape = (max(nearest["shape"]), min(nearest["shape"]))
    runs = [e for e in entries if (max(e["shape"]), min(e["shape"])) == shape]
    if power is None:
        return runs, shape
    below = [e for e in runs if entry_power(e) <= power + 1e-12]
    if not below:
        return [], shape
    top = max(entry_power(e) for e in below)
    return [e for e in below if entry_power(e) == top], shape


def choose(
    key: str, m: int, n: int, table: Optional[Table] = None, rule: str = RULE_METHOD,
    power: Optional[float] = None, rule_reason: str = "",
) -> tuple[str, str]:
    """(method, why) for one (m, n) matrix (either orientation) at ``power`` on the device
    ``key``; ``rule`` where the table has nothing for it (``rule_method(device_type, m, n,
    power)``; ``rule_reason``, its clause, is added to ``why`` then). ``power=None``: a method
    must have met the bar at every measured power."""

    def by_rule(why: str) -> tuple[str, str]:
        return rule, f"rule: {why}" + (f"; {rule_reason}" if rule_reason else "")

    m, n = max(m, n), min(m, n)
    table = load_table() if table is None else table
    entries = table.get("devices", {}).get(key, {}).get("entries", [])
    if not entries or m < 1 or n < 1:
        return by_rule(f"no measurements for {key!r}")
    runs, shape = _runs_for(entries, m, n, power)
    label = f"{shape[0]}x{shape[1]}"
    if not runs:
        return by_rule(f"nothing measured at p <= {power:g} at {label} on {key!r}")
    best: Optional[tuple[float, str]] = None
    for name in sorted(set.intersection(*(set(e.get("methods", {})) for e in runs))):
        rows = [e["methods"][name] for e in runs]
        if name not in CANDIDATES or not all(r.get("err_over_bar", math.inf) <= 1.0 for r in rows):
            continue
        t = max(max(r.get("time_s", math.inf), r.get("time_s_fallback", 0.0)) for r in rows)
        if best is None or (t, name) < best:
            best = (t, name)
    powers = "/".join(f"{p:g}" for p in sorted({entry_power(e) for e in runs}))
    if best is None:
        return by_rule(f"no method met the bar at {label}, p = {powers} on {key!r}")
    return best[1], f"measured at {label}, p = {powers} on {key!r}: {best[0] * 1e3:.1f} ms"


def merge_measurements(table: Table, key: str, rows: list[dict], source: str) -> Table:
    """``table`` with device ``key``'s runs at the (shape, power) pairs of ``rows`` replaced by
    them; its runs at other shapes or powers are kept. ``rows``: benchmarks/spectral.py's dicts
    (shape, method, time_s, err_over_bar, power; gram32 also time_s_fallback; a row without a
    power counts as :data:`LEGACY_POWER`)."""
    entries: dict[tuple[int, int, float], dict] = {}
    for row in rows:
        if row["method"] not in CANDIDATES:
            continue
        m, n = max(row["shape"]), min(row["shape"])
        power = float(row.get("power", LEGACY_POWER))
        entry = entries.setdefault((m, n, power), {"shape": [m, n], "power": power, "source": source,
                                                   "methods": {}})
        kept = {k: row[k] for k in ("time_s", "time_s_fallback", "err_over_bar") if k in row}
        old = entry["methods"].get(row["method"])
        # both orientations of a shape land here: keep the slower time, the larger error
        if old is not None:
            kept["time_s"] = max(kept["time_s"], old["time_s"])
            kept["err_over_bar"] = max(kept["err_over_bar"], old["err_over_bar"])
            if "time_s_fallback" in old:
                kept["time_s_fallback"] = max(kept.get("time_s_fallback", 0.0), old["time_s_fallback"])
        entry["methods"][row["method"]] = kept
    device = table.get("devices", {}).get(key, {})
    for old in device.get("entries", []):
        slot = (max(old["shape"]), min(old["shape"]), entry_power(old))
        if slot not in entries:  # an older run's provenance stays with its entries
            entries[slot] = {"source": device.get("source", "unknown"), **old, "power": entry_power(old)}
    out = {"version": 2, "devices": dict(table.get("devices", {}))}
    out["devices"][key] = {"source": source, "torch": torch.__version__,
                           "entries": sorted(entries.values(), key=lambda e: (e["shape"], e["power"]))}
    return out
