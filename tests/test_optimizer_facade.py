"""HTMuon is a facade: framework guards come from the integration layer's registry (the
constructor names no framework), and the names importers use still import from where they did."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

from htmuon_dist import HTMuon, integrations

OPTIMIZER = Path(__file__).resolve().parents[1] / "htmuon_dist" / "optimizer.py"


def test_a_registered_build_guard_runs_for_every_new_optimizer():
    seen = []

    def guard(opt):
        seen.append(opt)
        return ["handle"]

    integrations.register_build_guard(guard)
    try:
        opt = HTMuon([nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))])
    finally:
        integrations._BUILD_GUARDS.remove(guard)
    assert seen == [opt] and "handle" in opt._guard_handles
    # the DeepSpeed guard is registered by the integration layer itself
    from htmuon_dist.integrations.deepspeed import deepspeed_build_guard
    assert deepspeed_build_guard in integrations._BUILD_GUARDS


def test_the_optimizer_module_names_no_framework():
    """No DeepSpeed/Accelerate import or sys.modules probe in optimizer.py: the guards are the
    integration layer's."""
    tree = ast.parse(OPTIMIZER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not {m for m in imported if "deepspeed" in m or "accelerate" in m or m == "sys"}, imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "install_guards" not in names and "sys" not in names


def test_import_paths_kept():
    from htmuon_dist.integrations import install_guards  # noqa: F401  (the earlier name)
    from htmuon_dist.optimizer import METHOD_STATE, NORMUON_STATE, HTMuon as H, attach_fsdp1  # noqa: F401

    assert METHOD_STATE == "method_state" and NORMUON_STATE == "normuon_v" and H is HTMuon
