"""One command that checks a GPU machine end to end and writes a Markdown and a JSON report.

    python benchmarks/gpu_acceptance.py --out benchmarks/results/gpu_acceptance_h200   # ~8 min, 1 GPU
    python benchmarks/gpu_acceptance.py --dry-run                                      # the plan, no GPU needed

Sections, in order (each a subprocess with its own timeout, all inside ``--budget-s``; a failed
or timed-out section is recorded with its output tail and the next one runs):

1. fast_ns: ``benchmarks/fast_ns_timing.py --device cuda``: log_ns and fast_ns against bf16 NS5,
   Polar Express, eigh (and tracked_ns) at issue 19's five shapes: measured time, ratio to NS5, the
   priced time of benchmarks/gpu_cost.py beside it, err/gap against float64 on a bf16 input;
2. env: torch, CUDA, NCCL, driver, GPUs;
3. spectral: ``benchmarks/spectral.py --device cuda`` on 60M/1B/7B shapes, bf16 input (the
   momentum a bf16 wire delivers) at p = 1/16 and 1/8, every method: time, ratio to bf16 NS5,
   err/bar; also the measured auto table for this GPU (``auto_table.json`` in the report folder,
   one entry per shape and power: copy it over htmuon_dist/spectral/auto_table.json to ship it);
4. memory: ``benchmarks/memory.py --layers 7b --world 1 --device cuda`` (measured
   ``max_memory_allocated`` against the formula);
5. trainer: a bf16 run of ``launch/train.py`` (FSDP2 config; 2 processes where 2 GPUs exist)
   that stops at step 6 with a checkpoint, then resumes to step 12;
6. deepspeed: ZeRO-1 and ZeRO-3 trainer runs at W = 1;
7. sharded example: ``launch/examples/sharded_htmuon.py`` over NCCL at W = 1 per backend;
8. scaling: ``benchmarks/scaling.py --device cuda`` at W = 1..#GPUs (two ranks cannot share
   a GPU under NCCL, so W > 1 only runs where several GPUs are present).

Outputs in ``--out``: report.md, report.json (every section: command, exit status, seconds,
parsed results, output tail), and each tool's own JSON/log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
# issue 19's five shapes: LLaMA-1B's MLP (both orientations) and square attention, 7B's MLP and square
KEY_SHAPES = [(2048, 5461), (5461, 2048), (2048, 2048), (4096, 11008), (4096, 4096)]


def _row_power(row: dict) -> float:
    """The power a spectral.py row was measured at: rows from before ``--powers`` have none and
    ran at its default, 1/8 (auto_table.LEGACY_POWER; this script does not import the package)."""
    return float(row.get("power", 0.125))


@dataclass
class Section:
    name: str
    what: str
    commands: list[list[str]]
    timeout_s: float
    result: dict = field(default_factory=dict)


def _py() -> str:
    return sys.executable


def _accelerate() -> str:
    found = shutil.which("accelerate")
    return found or str(Path(sys.executable).with_name("accelerate"))


def plan(out: Path, gpus: int, quick: bool, work: Optional[Path] = None) -> list[Section]:
    """The sections with their commands (nothing runs here). Reports go to ``out``; trainer
    outputs (checkpoints) to ``work``, so that the report folder stays small enough to commit."""
    py, acc = _py(), _accelerate()
    work = work or out / "work"
    tiny = ["--config", "configs/train/tiny_cpu.yaml", "--seq_len", "128", "--micro_batch_size", "8",
            "--total_batch_size", "16", "--eval_steps", "0", "--eval_tokens", "4096", "--logging_steps", "1",
            "--report_to", "jsonl", "--plot", "false", "--progress_bar", "false", "--export_model", "false"]
    train_procs = "2" if gpus >= 2 else "1"
    train_out = str(work / "train_bf16")
    trainer = [acc, "launch", "--config_file", "configs/accelerate/fsdp2.yaml", "--num_processes", train_procs,
               "--main_process_port", "29611", "launch/train.py", *tiny, "--mixed_precision", "bf16",
               "--max_steps", "12", "--warmup_steps", "2", "--save_steps", "6", "--output_dir", train_out]
    ds = []
    for stage in (1, 3):
        ds.append([acc, "launch", "--config_file", f"configs/accelerate/deepspeed_zero{stage}.yaml",
                   "--num_processes", "1", "--main_process_port", str(29620 + stage), "launch/train.py", *tiny,
                   "--mixed_precision", "bf16", "--max_steps", "4", "--warmup_steps", "1", "--save_steps", "0",
                   "--output_dir", str(work / f"zero{stage}")])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    examples = [[torchrun, "--nproc_per_node", "1", "--master_port", str(29630 + i), "launch/examples/sharded_htmuon.py",
                 "--backend", b, "--steps", "10"] for i, b in enumerate(["fsdp2", "fsdp1", "ddp"])]
    worlds = ",".join(str(w) for w in range(1, max(gpus, 1) + 1))
    shapes = "60m,1b" if quick else "60m,1b,7b"
    return [
        Section("fast_ns", "log_ns and fast_ns vs bf16 NS5, Polar Express and eigh at issue 19's five shapes: "
                "measured time, x NS5, priced time, err/gap vs float64",
                [[py, "benchmarks/fast_ns_timing.py", "--device", "cuda", "--repeat", "3",
                  "--json", str(out / "fast_ns.json")]], 120),
        Section("env", "torch, CUDA, NCCL, driver, GPUs", [[py, __file__, "--env-only"]], 60),
        Section("spectral", "Σ^p methods on 60M/1B/7B shapes, bf16 input, p = 1/16 and 1/8: time, ratio to bf16 NS5, err/bar",
                [[py, "benchmarks/spectral.py", "--device", "cuda", "--dtype", "bfloat16", "--powers", "0.0625,0.125",
                  "--shapes", shapes, "--repeat", "3",
                  "--methods", "svd,eigh,gram32,gram_rr,tracked_ns,fast_ns,log_ns,auto", "--json", str(out / "spectral.json"),
                  "--write-table", str(out / "auto_table.json")]], 270),
        Section("memory", "memory contract on a 7B layer set: max_memory_allocated vs the formula",
                [[py, "benchmarks/memory.py", "--layers", "7b", "--world", "1", "--device", "cuda",
                  "--json", str(out / "memory.json")]], 90),
        Section("trainer", f"bf16 trainer, FSDP2 config, {train_procs} process(es): stop at 6 with a checkpoint, resume to 12",
                [trainer + ["--stop_at_step", "6"], trainer], 180),
        Section("deepspeed", "DeepSpeed ZeRO-1 and ZeRO-3 trainer runs at W = 1", ds, 150),
        Section("examples", "launch/examples/sharded_htmuon.py over NCCL at W = 1: fsdp2, fsdp1, ddp", examples, 120),
        Section("scaling", f"benchmarks/scaling.py --device cuda at W = {worlds}",
                [[py, "benchmarks/scaling.py", "--device", "cuda", "--worlds", worlds, "--model", "60m",
                  "--steps", "3", "--json", str(out / "scaling.json")]], 120),
    ]


def environment() -> dict:
    """Versions and devices (runs in the env section's subprocess)."""
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__,
                  "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info["nccl"] = f"unknown ({e})"
    if info["gpus"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
        info["memory_gib"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                              for i in range(info["gpus"])]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    for mod in ("accelerate", "deepspeed", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def run_section(sec: Section, deadline: float, log: Path, env: dict) -> None:
    """Runs the section's commands in order until one fails; records everything in sec.result."""
    start = time.monotonic()
    sec.result = {"status": "ok", "runs": []}
    if deadline - start < min(10.0, sec.timeout_s):
        sec.result["status"] = "skipped (time budget spent)"
        return
    for cmd in sec.commands:
        left = min(sec.timeout_s - (time.monotonic() - start), deadline - time.monotonic())
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(left, 1))
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        except OSError as e:
            rc, out, err = "not started", "", str(e)
        with log.open("a") as f:
            f.write(f"\n===== {sec.name}: {' '.join(cmd)} (rc {rc})\n{out}\n{err}\n")
        sec.result["runs"].append({"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                                   "stdout_tail": out[-3000:], "stderr_tail": err[-3000:]})
        if rc != 0:
            sec.result["status"] = "timeout" if rc == "timeout" else f"failed (rc {rc})"
            break
    sec.result["seconds"] = round(time.monotonic() - start, 1)


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parse_results(sections: list[Section], out: Path, work: Optional[Path] = None) -> None:
    """Adds the tools' own JSON (and the env section's) to each section's result."""
    for sec in sections:
        if sec.name == "env" and sec.result.get("runs"):
            try:
                sec.result["data"] = json.loads(sec.result["runs"][0]["stdout_tail"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
        for name in ("fast_ns", "spectral", "memory", "scaling"):
            if sec.name == name:
                data = _load(out / f"{name}.json")
                if data is not None:
                    sec.result["data"] = data
        if sec.name == "trainer":
            metrics = (work or out / "work") / "train_bf16" / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
            log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
            sec.result["data"] = {"steps_logged": sorted({r["step"] for r in rows if "loss" in r}),
                                  "losses": [r["loss"] for r in rows if "loss" in r][-3:],
                                  "resumed_at_step_6": "resumed at step 6" in log}


def markdown(sections: list[Section], args: argparse.Namespace, total_s: float) -> str:
    lines = ["# GPU acceptance report", "", f"Command: `python benchmarks/gpu_acceptance.py --out {args.out}`"
             f"{' --quick' if args.quick else ''}, {total_s:.0f} s in all.", ""]
    env = next((s.result.get("data") for s in sections if s.name == "env"), None) or {}
    lines += ["## Environment", "", "| item | value |", "|---|---|"]
    for k, v in env.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Sections", "", "| section | what | status | seconds |", "|---|---|---|---|"]
    for s in sections:
        lines.append(f"| {s.name} | {s.what} | {s.result.get('status', 'not run')} | {s.result.get('seconds', '')} |")
    fast = next((s.result.get("data") for s in sections if s.name == "fast_ns"), None)
    if fast and fast.get("rows"):
        lines += ["", "## Σ^p at issue 19's shapes (fast_ns_timing.py)", "",
                  f"Measured on {fast.get('device')}: best of 3 after a warm-up; × NS5 = ratio to bf16 NS5 timed in "
                  "the same run; priced = benchmarks/gpu_cost.py at H100 rates (not measured); err/gap <= 0.25 is "
                  "issue 19's target (HTMuon methods, p = 1/8); polar err = ||Y - UV^T|| / ||UV^T|| (Muon methods).", "",
                  "| shape | method | time (ms) | × NS5 | priced (ms) | err/gap | polar err |", "|---|---|---|---|---|---|---|"]
        for r in fast["rows"]:
            priced = f"{r['priced_s'] * 1e3:.2f}" if "priced_s" in r else "n/a"
            eg = f"{r['err_over_gap']:.3f}" if "err_over_gap" in r else ""
            pe = f"{r['polar_err']:.3f}" if "polar_err" in r else ""
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['method']} | {r['time_s'] * 1e3:.2f} | "
                         f"{r.get('ratio_to_ns5', float('nan')):.2f} | {priced} | {eg} | {pe} |")
    spec = next((s.result.get("data") for s in sections if s.name == "spectral"), None)
    if spec:
        rows = spec["rows"]
        lines += ["", "## Σ^p per matrix (spectral.py)", "",
                  "Time per matrix (best of 3 after a warm-up), ratio to bf16 NS5 timed in the same run, err/bar "
                  "(<= 1 meets the HTMuon bar; NS5's row is rescaled Muon).", "",
                  "| shape | p | method | time (ms) | × NS5 | err/bar |", "|---|---|---|---|---|---|"]
        for r in rows:
            name = r["method"] + (f" → {r['resolved']}" if r["method"] == "auto" else "")
            extra = f" (ill-conditioned: {r['time_s_fallback'] * 1e3:.2f} ms)" if "time_s_fallback" in r else ""
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {_row_power(r):g} | {name} | "
                         f"{r['time_s'] * 1e3:.2f}{extra} | {r.get('ratio_to_ns5', float('nan')):.2f} | "
                         f"{r['err_over_bar']:.2e} |")
        lines += ["", "Key ratios (HTMuon Σ^p / bf16 NS5):", ""]
        for shape in KEY_SHAPES:
            for power in sorted({_row_power(r) for r in rows}):
                here = [r for r in rows if tuple(r["shape"]) == shape and _row_power(r) == power
                        and r["method"] != "ns5" and r["err_over_bar"] <= 1]
                if here:
                    best = min(here, key=lambda r: r["time_s"])
                    eigh = next((r for r in here if r["method"] == "eigh"), None)
                    lines.append(f"- {shape[0]}×{shape[1]}, p = {power:g}: fastest within the bar {best['method']} "
                                 f"{best.get('ratio_to_ns5', float('nan')):.2f}× NS5"
                                 + (f"; eigh {eigh.get('ratio_to_ns5', float('nan')):.2f}×" if eigh else ""))
                else:
                    lines.append(f"- {shape[0]}×{shape[1]}, p = {power:g}: not measured")
    mem = next((s.result.get("data") for s in sections if s.name == "memory"), None)
    if mem and mem.get("rows"):
        lines += ["", "## Memory contract (memory.py)", "", "| case | peak (GiB) | bound (GiB) | ok |", "|---|---|---|---|"]
        for r in mem["rows"]:
            lines.append(f"| {r.get('case')} | {r.get('peak_bytes', 0) / 2**30:.2f} | {r.get('bound_bytes', 0) / 2**30:.2f} | {r.get('ok')} |")
    for s in sections:
        if s.result.get("status", "ok") != "ok" and s.result.get("runs"):
            last = s.result["runs"][-1]
            lines += ["", f"## {s.name}: {s.result['status']}", "", f"`{last['cmd']}`", "", "```",
                      (last["stderr_tail"] or last["stdout_tail"])[-1500:], "```"]
    tr = next((s.result.get("data") for s in sections if s.name == "trainer"), None)
    if tr:
        lines += ["", "## Trainer (bf16, checkpoint and resume)", "",
                  f"Steps logged: {tr['steps_logged']}; resumed from the step-6 checkpoint: "
                  f"{tr['resumed_at_step_6']}; last losses: {tr['losses']}"]
    for s in sections:
        if s.name in ("trainer", "scaling", "examples") and s.result.get("runs"):
            lines += ["", f"## {s.name} output (tail)", "", "```", s.result["runs"][-1]["stdout_tail"][-1200:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_acceptance",
                    help="report folder (created)")
    ap.add_argument("--work", type=Path, default=None,
                    help="trainer outputs and checkpoints (default: a fresh temporary folder, removed at the end)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all sections")
    ap.add_argument("--sections", default=None, help="comma list of sections to run (default all)")
    ap.add_argument("--quick", action="store_true", help="spectral on 60M/1B shapes only")
    ap.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_only:
        print(json.dumps(environment()))
        return 0
    gpus = 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_acceptance.py: error: no CUDA device is visible (torch {torch.__version__}, "
                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it on a GPU "
                  f"machine, or pass --dry-run to print the plan", file=sys.stderr)
            return 2
        gpus = torch.cuda.device_count()
    import tempfile

    if args.work is not None:
        work = args.work
    elif args.dry_run:  # nothing is created in a dry run
        work = Path(tempfile.gettempdir()) / "htmuon_acceptance_XXXXXX"
    else:
        work = Path(tempfile.mkdtemp(prefix="htmuon_acceptance_"))
    sections = plan(args.out, gpus or 1, args.quick, work)
    if args.sections:
        wanted = set(args.sections.split(","))
        unknown = wanted - {s.name for s in sections}
        if unknown:
            ap.error(f"--sections: unknown {sorted(unknown)}; choose from {[s.name for s in sections]}")
        sections = [s for s in sections if s.name in wanted]
    if args.dry_run:
        total = sum(s.timeout_s for s in sections)
        print(f"gpu_acceptance plan (dry run): report in {args.out}/report.md and report.json; budget "
              f"{args.budget_s:.0f} s (section timeouts sum to {total:.0f} s; sections past the budget are skipped)")
        print("W > 1 runs only with several GPUs (two NCCL ranks cannot share one GPU); shown for 1 GPU.")
        for i, s in enumerate(sections, 1):
            print(f"\n{i}. {s.name} (timeout {s.timeout_s:.0f} s): {s.what}")
            for cmd in s.commands:
                print("     " + " ".join(cmd).replace(str(REPO) + "/", ""))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    table = REPO / "htmuon_dist" / "spectral" / "auto_table.json"
    if table.exists():  # the report's table starts from the shipped one: other devices stay
        shutil.copy(table, args.out / "auto_table.json")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log = args.out / "log.txt"
    log.write_text("")
    start = time.monotonic()
    deadline = start + args.budget_s
    for s in sections:
        print(f"[{time.monotonic() - start:5.0f} s] {s.name}: {s.what}", flush=True)
        if s.name == "memory" and not (REPO / "benchmarks" / "memory.py").exists():
            s.result = {"status": "skipped (benchmarks/memory.py not in this checkout)"}
        else:
            run_section(s, deadline, log, env)
        print(f"           -> {s.result['status']} ({s.result.get('seconds', 0)} s)", flush=True)
        parse_results([s], args.out, work)
        # written after every section, so an interrupted run still leaves a report
        report = {"args": {k: str(v) for k, v in vars(args).items()},
                  "sections": [asdict(x) for x in sections]}
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "report.md").write_text(markdown(sections, args, time.monotonic() - start))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = [s.name for s in sections if s.result.get("status") != "ok"]
    print(f"report: {args.out / 'report.md'}" + (f"; not ok: {', '.join(failed)}" if failed else "; all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
