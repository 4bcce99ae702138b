"""A fair optimizer comparison: an lr sweep per optimizer over several seeds, the same model,
data, batches, schedule and steps for all, then each optimizer at its own best lr.

    python benchmarks/compare.py                          # tiny model, offline corpus, 1 process
    python benchmarks/compare.py --optimizers htmuon,muon,adamw,normuon,htnormuon \\
        --max_steps 120 --seeds 0,1,2 --lrs htmuon=0.025,0.05,0.1,0.2
    python benchmarks/compare.py --model 60m --dataset c4 \\
        --launcher "accelerate launch --config_file configs/accelerate/fsdp2.yaml"   # GPUs

Every run is ``launch/train.py`` in a subprocess (one process with ``--parallel none`` unless
``--launcher`` says otherwise) with ``--esd_steps`` on, into ``<work>/<opt>/lr<lr>_s<seed>``; a
finished run (summary.json present with the same settings) is reused, so an interrupted sweep
continues where it stopped. A run that diverges (the trainer stops on a non-finite loss) counts
as perplexity inf, and an lr with any diverged seed cannot be the best.

Output in ``--out`` (default benchmarks/results/compare_<model>_<dataset>): ``compare.md`` (the
exact command, the sweep table, mean ± std at the best lr, the HTMuon vs Muon verdict),
``compare.json`` (every run), ``loss_best_lr.png`` and ``alpha_over_training.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Default lr grids (x the reference table's lr for the model size; REFERENCE.md / config.py).
DEFAULT_FACTORS = (0.5, 1.0, 2.0, 4.0)


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="htmuon,muon,adamw",
                   help="comma list of trainer --optimizer names (e.g. add normuon,htnormuon where the trainer has them)")
    p.add_argument("--lrs", action="append", default=[], metavar="OPT=LR,LR,...",
                   help="lr grid of one optimizer (repeatable); default: --lr_factors x the reference lr")
    p.add_argument("--lr_factors", default=",".join(map(str, DEFAULT_FACTORS)),
                   help="multipliers of the reference table's lr for optimizers without --lrs (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (model init and data order)")
    p.add_argument("--model", default="tiny", help="trainer --model (tiny, 60m, ...)")
    p.add_argument("--dataset", default="offline", help="trainer --dataset (offline, c4, ...)")
    p.add_argument("--config", default=None,
                   help="trainer --config (default: configs/train/tiny_cpu.yaml for offline, c4_reference.yaml for c4)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: max_steps / 10")
    p.add_argument("--total_batch_size", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="sequences per forward (default: the config's)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--eval_tokens", type=int, default=None, help="validation tokens (default: the config's)")
    p.add_argument("--esd_steps", type=int, default=None, help="ESD alpha every N steps (default: max_steps / 6, or 1000 with the config's steps; 0 = off)")
    p.add_argument("--launcher", default="python",
                   help='"python" (one process, --parallel none) or a launcher prefix, e.g. '
                        '"accelerate launch --config_file configs/accelerate/fsdp2.yaml"')
    p.add_argument("--work", default=None, help="run directories (default outputs/compare/<model>_<dataset>)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/compare_<model>_<dataset>)")
    p.add_argument("--report_only", action="store_true", help="do not train; summarise the runs already in --work")
    args, extra = p.parse_known_args(argv)
    return args, extra


def reference_lr(model: str, optimizer: str) -> float:
    """The trainer's default lr for this size and optimizer (its reference table)."""
    from htmuon_dist.training.config import REFERENCE_TABLE, size_key

    row = REFERENCE_TABLE.get(size_key(model), REFERENCE_TABLE["60m"])
    return float({"adamw": row["adamw"], "muon": row["muon"], "normuon": row["muon"]}.get(optimizer, row["htmuon"]))


def lr_grids(args: argparse.Namespace, optimizers: list[str]) -> dict[str, list[float]]:
    given: dict[str, list[float]] = {}
    for spec in args.lrs:
        if "=" not in spec:
            raise SystemExit(f"--lrs {spec!r}: expected OPT=LR,LR,... (e.g. --lrs htmuon=0.025,0.05,0.1,0.2)")
        opt, values = spec.split("=", 1)
        given[opt.strip()] = [float(v) for v in values.split(",") if v.strip()]
    unknown = set(given) - set(optimizers)
    if unknown:
        raise SystemExit(f"--lrs names {sorted(unknown)}, which are not in --optimizers {optimizers}")
    factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
    return {o: given.get(o) or [round(reference_lr(args.model, o) * f, 10) for f in factors] for o in optimizers}


def train_command(args, extra: list[str], opt: str, lr: float, seed: int, run_dir: Path) -> list[str]:
    if args.launcher.strip() == "python":
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--parallel", "none"]
    else:
        cmd = shlex.split(args.launcher) + [str(ROOT / "launch/train.py")]
    config = args.config or str(ROOT / ("configs/train/tiny_cpu.yaml" if args.dataset == "offline"
                                        else "configs/train/c4_reference.yaml"))
    cmd += ["--config", config, "--model", args.model, "--dataset", args.dataset, "--optimizer", opt,
            "--lr", repr(lr), "--seed", str(seed), "--output_dir", str(run_dir), "--resume", "never",
            "--progress_bar", "false", "--export_model", "false", "--save_steps", "0", "--eval_steps", "0",
            "--report_to", "jsonl"]
    for name in ("max_steps", "warmup_steps", "total_batch_size", "micro_batch_size", "seq_len", "eval_tokens", "esd_steps"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    return cmd + extra


def _final_hidden_mean(rows: list[dict[str, Any]], stat: str) -> Optional[float]:
    """Mean of ``esd/layers.*/<stat>`` over the hidden matrices in the last ESD row."""
    esd_rows = [r for r in rows if "esd_alpha_mean" in r]
    if not esd_rows:
        return None
    values = [v for k, v in esd_rows[-1].items()
              if k.startswith("esd/layers.") and k.endswith("/" + stat) and isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def load_run(run_dir: Path) -> Optional[dict[str, Any]]:
    """Final eval perplexity, the train-loss curve and the mean hidden-matrix alpha curve; None
    for a run that neither finished nor diverged."""
    from htmuon_dist.training.metrics import read_metrics

    summary_path = run_dir / "summary.json"
    rows = read_metrics(run_dir / "metrics.jsonl")
    out: dict[str, Any] = {
        "loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
        "alpha": [(r["step"], r["esd_alpha_mean"]) for r in rows if r.get("esd_alpha_mean") is not None],
        "esd_seconds": sum(r.get("esd_seconds", 0.0) for r in rows),
        "stable_rank": _final_hidden_mean(rows, "stable_rank"),
    }
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        out.update(eval_ppl=s.get("eval_ppl", math.inf), eval_loss=s.get("eval_loss"), train_seconds=s.get("train_seconds"),
                   diverged=False)
    else:
        log = run_dir / "train.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        # The trainer's own stop on a non-finite loss (or HTMuon's on a non-finite gradient);
        # anything else without a summary is unfinished or crashed and is left out.
        if "FloatingPointError" not in text:
            return None
        out.update(eval_ppl=math.inf, eval_loss=None, train_seconds=None, diverged=True)
    return out


def _run_child(cmd: list[str], log) -> int:
    """Runs one training; a SIGTERM/Ctrl-C of the sweep also stops the run it is waiting on."""
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})

    def stop(signum, frame):
        child.terminate()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(args, extra, grids, seeds, work: Path) -> list[dict[str, Any]]:
    runs = []
    total = sum(len(v) for v in grids.values()) * len(seeds)
    done = 0
    for seed in seeds:  # seeds outermost: a cut-short sweep still has every lr at some seeds
        for opt, lrs in grids.items():
            for lr in lrs:
                run_dir = work / opt / f"lr{lr:g}_s{seed}"
                cmd = train_command(args, extra, opt, lr, seed, run_dir)
                marker = run_dir / "compare_cmd.json"
                reuse = (run_dir / "summary.json").exists() and marker.exists() and json.loads(marker.read_text()) == cmd[1:]
                done += 1
                if not args.report_only and not reuse:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "summary.json").unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    with open(run_dir / "train.log", "w") as log:
                        rc = _run_child(cmd, log)
                    marker.write_text(json.dumps(cmd[1:]))
                    print(f"[{done}/{total}] {opt} lr {lr:g} seed {seed}: rc {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
                loaded = load_run(run_dir) if (run_dir / "metrics.jsonl").exists() else None
                if loaded is None:
                    if not args.report_only:
                        print(f"  {run_dir}: no summary and no divergence in train.log: left out (see the log)", flush=True)
                    continue
                runs.append({"optimizer": opt, "lr": lr, "seed": seed, "dir": str(run_dir), **loaded})
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values or any(not math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarise(runs: list[dict[str, Any]], grids: dict[str, list[float]]) -> dict[str, Any]:
    table: dict[str, dict[float, dict[str, Any]]] = {}
    for opt, lrs in grids.items():
        table[opt] = {}
        for lr in lrs:
            ppl = [r["eval_ppl"] for r in runs if r["optimizer"] == opt and r["lr"] == lr]
            mean, std = _mean_std(ppl)
            table[opt][lr] = {"mean": mean, "std": std, "n": len(ppl), "ppl": ppl}
    best = {}
    for opt, by_lr in table.items():
        finite = [(v["mean"], lr) for lr, v in by_lr.items() if math.isfinite(v["mean"]) and v["n"]]
        if finite:
            mean, lr = min(finite)
            lrs = sorted(by_lr)
            best[opt] = {"lr": lr, **by_lr[lr], "edge": (lr in (lrs[0], lrs[-1])) if len(lrs) > 1 else None}
    return {"table": table, "best": best}


# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 10: ~2).
_T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def verdict(runs, best: dict[str, Any], a: str = "htmuon", b: str = "muon") -> str:
    """Paired by seed (same init and data order): mean and std of ppl_b - ppl_a at each one's best lr."""
    if a not in best or b not in best:
        return f"no verdict: {a} or {b} has no finished run"
    pa = {r["seed"]: r["eval_ppl"] for r in runs if r["optimizer"] == a and r["lr"] == best[a]["lr"]}
    pb = {r["seed"]: r["eval_ppl"] for r in runs if r["optimizer"] == b and r["lr"] == best[b]["lr"]}
    seeds = sorted(set(pa) & set(pb))
    diffs = [pb[s] - pa[s] for s in seeds]
    if len(diffs) < 2:
        return f"no verdict: fewer than 2 seeds with both {a} and {b}"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    se = std / math.sqrt(len(diffs))
    spread = max(best[a]["std"], best[b]["std"])
    t = mean / se if se > 0 else math.copysign(math.inf, mean)
    crit = _T_975.get(len(diffs) - 1, 2.0)  # two-sided 95% for a paired t-test with n-1 dof
    wins = sum(d > 0 for d in diffs)
    if abs(t) < crit:
        head = (f"**No measurable difference: at this scale {a} does not beat {b} beyond the seed noise** "
                f"(|t| = {abs(t):.2f} < {crit:.2f}, the 95% paired t threshold for {len(diffs)} seeds; "
                f"{a} lower on {wins} of {len(diffs)} seeds)")
    elif mean > 0:
        head = f"**Yes: {a} beats {b} at this scale** (|t| = {abs(t):.2f} >= {crit:.2f}; lower on {wins} of {len(diffs)} seeds)"
    else:
        head = (f"**No: {b} beats {a} at this scale** (|t| = {abs(t):.2f} >= {crit:.2f}; {a} lower on "
                f"{wins} of {len(diffs)} seeds)")
    return (f"{head}. {b}'s eval perplexity minus {a}'s, paired by seed over {len(diffs)} seeds, is "
            f"{mean:+.2f} ± {std:.2f} (std; standard error {se:.2f}, t = {t:.1f}); the seed-to-seed std "
            f"at the best lr is up to {spread:.2f}, so the mean difference is "
            f"{abs(mean) / spread if spread > 0 else math.inf:.1f}x the seed spread." +
            (" Caveat: each best lr is picked on the same seeds it is scored on, which favours every "
             "optimizer a little (more the noisier its sweep)." if best[a]["edge"] is not None or best[b]["edge"] is not None
             else " Each optimizer ran at one given lr, so no lr was selected on these seeds."))


def plots(runs, best, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["no plots: matplotlib is not installed"]
    made = []
    for kind, fname, ylabel in (("loss", "loss_best_lr.png", "train loss (nats/token), mean over seeds"),
                                ("alpha", "alpha_over_training.png", "mean ESD α of the hidden matrices, mean over seeds")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for opt, b in best.items():
            curves = [r[kind] for r in runs if r["optimizer"] == opt and r["lr"] == b["lr"] and r[kind]]
            if not curves:
                continue
            steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
            by = [dict(c) for c in curves]
            mean = [statistics.fmean(d[s] for d in by) for s in steps]
            line, = ax.plot(steps, mean, lw=1.5, label=f"{opt} (lr {b['lr']:g}, {len(curves)} seeds)",
                            marker="o" if kind == "alpha" else None, ms=3)
            if len(by) > 1:
                lo = [min(d[s] for d in by) for s in steps]
                hi = [max(d[s] for d in by) for s in steps]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"{kind} at each optimizer's best lr (band: min-max over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        made.append(fname)
    return made


def write_report(args, argv, runs, summary, grids, seeds, out: Path, wall_s: float) -> str:
    table, best = summary["table"], summary["best"]
    cmd = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
    previous = out / "compare.json"
    if args.report_only and previous.exists():  # keep what the sweep itself recorded
        old = json.loads(previous.read_text())
        cmd, wall_s = old.get("command", cmd), old.get("wall_s", math.nan)
    lines = [f"# Optimizer comparison: {args.model} LLaMA, {args.dataset}", "",
             f"Command: `{cmd}`", "",
             f"{len(runs)} runs, seeds {seeds}" + (f", sweep wall time {wall_s / 60:.1f} min" if math.isfinite(wall_s) else "") +
             ". Example run command: "
             f"`{' '.join(shlex.quote(c) for c in train_command(args, [], 'htmuon', 0.05, 0, Path('RUN'))).replace(sys.executable, 'python').replace(str(ROOT) + '/', '')}`", "",
             "## Eval perplexity per lr (mean ± std over seeds; inf = a seed diverged)", "",
             "| optimizer | " + " | ".join(f"lr #{i + 1}" for i in range(max(len(v) for v in grids.values()))) + " |",
             "|---|" + "---|" * max(len(v) for v in grids.values())]
    for opt, by_lr in table.items():
        cells = []
        for lr, v in by_lr.items():
            mark = " **best**" if opt in best and best[opt]["lr"] == lr else ""
            val = "inf" if not math.isfinite(v["mean"]) else f"{v['mean']:.2f} ± {v['std']:.2f}"
            cells.append(f"{lr:g}: {val} (n={v['n']}){mark}")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    lines += ["", "## Each optimizer at its best lr", "",
              "| optimizer | best lr | eval ppl mean ± std | seeds | per-seed ppl | final mean α (hidden) | final mean stable rank (hidden) | best lr at grid edge |",
              "|---|---|---|---|---|---|---|---|"]
    for opt, b in best.items():
        alphas = [r["alpha"][-1][1] for r in runs if r["optimizer"] == opt and r["lr"] == b["lr"] and r["alpha"]]
        a = f"{statistics.fmean(alphas):.2f}" if alphas else "-"
        ranks = [r["stable_rank"] for r in runs if r["optimizer"] == opt and r["lr"] == b["lr"] and r.get("stable_rank")]
        sr = f"{statistics.fmean(ranks):.1f}" if ranks else "-"
        lines.append(f"| {opt} | {b['lr']:g} | {b['mean']:.2f} ± {b['std']:.2f} | {b['n']} | "
                     f"{', '.join(f'{p:.2f}' for p in b['ppl'])} | {a} | {sr} | {'n/a (one lr)' if b['edge'] is None else 'yes' if b['edge'] else 'no'} |")
    lines += ["", "## HTMuon vs Muon", "", verdict(runs, best), ""]
    if "htnormuon" in best and "normuon" in best:
        lines += ["## HTNorMuon vs NorMuon", "", verdict(runs, best, "htnormuon", "normuon"), ""]
    esd = [r["esd_seconds"] for r in runs if r["esd_seconds"]]
    train = [r["train_seconds"] for r in runs if r.get("train_seconds")]
    if esd and train:
        lines.append(f"ESD cost: {statistics.fmean(esd):.2f} s per run on average against {statistics.fmean(train):.1f} s of training.")
    lines += ["", "Plots: `loss_best_lr.png` (train loss), `alpha_over_training.png` (mean α of the hidden matrices).", ""]
    text = "\n".join(lines)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps({"command": cmd, "wall_s": wall_s, "grids": grids, "seeds": seeds, "runs": runs,
                                                  "best": best}, indent=1, default=str))
    return text


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    from htmuon_dist.training.config import OPTIMIZERS

    missing = [o for o in optimizers if o not in OPTIMIZERS]
    if missing:
        raise SystemExit(f"--optimizers: {missing} are not trainer optimizers here ({', '.join(OPTIMIZERS)}); drop them")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.esd_steps is None:  # about 6 points per curve (the reference sizes run 10k+ steps)
        args.esd_steps = max(1, args.max_steps // 6) if args.max_steps else 1000
    if args.max_steps is not None and args.warmup_steps is None:
        args.warmup_steps = max(1, args.max_steps // 10)  # the config's warmup is for its own step count
    grids = lr_grids(args, optimizers)
    tag = f"{Path(args.model).stem}_{args.dataset}"
    work = Path(args.work or ROOT / "outputs" / "compare" / tag)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compare_{tag}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {', '.join(f'{o} {g}' for o, g in grids.items())}; seeds {seeds}; runs in {work}", flush=True)
    t0 = time.perf_counter()
    runs = run_sweep(args, extra, grids, seeds, work)
    wall = math.nan if args.report_only else time.perf_counter() - t0
    summary = summarise(runs, grids)
    text = write_report(args, argv, runs, summary, grids, seeds, out, wall)
    made = plots(runs, summary["best"], out)
    print(text)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, " + ", ".join(str(out / m) for m in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
