"""The package's import layers: ``training`` may use ``diagnostics`` (the ESD monitor, its plots),
never the reverse, and every module of both imports on its own in a fresh interpreter, in
either order. Lazy (function-level) imports count: they hid a training <-> diagnostics cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "htmuon_dist"
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for sub in ("training", "diagnostics") for p in (PKG / sub).glob("*.py")
    if p.name not in ("__main__.py",)
)


def _imported(path: Path, module: str) -> set[str]:
    """Every htmuon_dist module ``path`` imports anywhere (top level or inside functions)."""
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("htmuon_dist")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("htmuon_dist"):
                out.add(name)
    return out


def test_diagnostics_never_imports_training():
    offenders = {}
    for path in sorted((PKG / "diagnostics").glob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        bad = sorted(m for m in _imported(path, module) if m.startswith("htmuon_dist.training"))
        if bad:
            offenders[module] = bad
    assert not offenders, f"diagnostics must not import training (a cycle): {offenders}"


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_each_module_imports_alone_and_in_both_orders():
    """One interpreter per order; every training and diagnostics module imported after all of
    the other package's modules, then the reverse."""
    training = [m for m in MODULES if m.startswith("htmuon_dist.training")]
    diagnostics = [m for m in MODULES if m.startswith("htmuon_dist.diagnostics")]
    for first, second in ((training, diagnostics), (diagnostics, training)):
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in first + second)
        proc = _fresh(code)
        assert proc.returncode == 0, f"{first[0]}... then {second[0]}...:\n{proc.stderr[-3000:]}"
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in MODULES)
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_diagnostics_and_their_plots_load_no_training(tmp_path):
    """Importing every diagnostics module, and drawing the alpha plot from a metrics.jsonl,
    leaves ``htmuon_dist.training`` unimported."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "esd/q/0/alpha": 3.0}\n{"step": 2, "esd/q/0/alpha": 3.5}\n')
    diagnostics = [m for m in MODULES if m.startswith("htmuon_dist.diagnostics")]
    code = ("import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in diagnostics)
            + "from htmuon_dist.diagnostics.plots import plot_alpha_over_steps\n"
            f"plot_alpha_over_steps({str(metrics)!r}, {str(tmp_path / 'a.png')!r}, 't')\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('htmuon_dist.training'))\n"
            "assert not loaded, loaded\n")
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
