"""Counts the aten operator calls (and profiler self-CPU time) inside HTMuon.step() of the tiny
LLaMA, one process, 1 thread, steps 10-29, with torch.profiler. The call count does not depend on
the machine's load, so it compares checkouts on a busy machine where timings cannot:

    PYTHONPATH=<checkout>:<checkout>/tests python benchmarks/step_ops.py [v]   (v: the top 25 ops)
"""
import sys
import torch
torch.set_num_threads(1)
from dist_models import build, loss_fn, make_batches, wrap
from htmuon_dist import HTMuon, param_groups
model = build("llama"); wrapped = wrap(model, "llama", "none")
opt = HTMuon(param_groups(model, "reference"), lr=0.02, power=0.125, weight_decay=0.1, adamw_lr=3e-3, adamw_weight_decay=0.01)
batches = make_batches("llama", 30, 1, 2)
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
for k in range(30):
    loss_fn("llama", wrapped, batches[k][0]).backward()
    if k >= 10: prof.start() if k == 10 else prof.toggle_collection_dynamic(True, [torch.profiler.ProfilerActivity.CPU])
    opt.step()
    if k >= 10: prof.toggle_collection_dynamic(False, [torch.profiler.ProfilerActivity.CPU])
    opt.zero_grad()
prof.stop()
ka = prof.key_averages()
top = [e for e in ka if e.key.startswith("aten::")]
n = sum(e.count for e in top)
eig = sum(e.self_cpu_time_total for e in top if "eigh" in e.key)
tot = sum(e.self_cpu_time_total for e in ka)
print(f"aten calls/step {n/20:.0f}  self CPU/step {tot/20/1e3:.2f} ms  of which eigh {eig/20/1e3:.2f} ms")
if len(sys.argv) > 1:
    for e in sorted(top, key=lambda e: -e.count)[:25]:
        print(f"{e.key:<32}{e.count/20:>7.1f}")
