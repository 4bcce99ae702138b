# Where a process reaches its peak RSS (benchmarks/results/memory_cpu.txt, issue 20):
#   RSS_PROBE_DIR=/tmp/probe PYTHONPATH=benchmarks/rss_probe:$PWD accelerate launch ... launch/train.py ...
# RSS probe: a daemon thread samples VmRSS every 10 ms; at each new maximum (+8 MiB) it writes
# the main thread's innermost project frames to $RSS_PROBE_DIR/<pid>.txt (os._exit-safe).
import os, sys, threading, time, traceback
_d = os.environ.get("RSS_PROBE_DIR")
if _d:
    def _rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
    def _loop():
        main = threading.main_thread().ident
        best = 0
        path = os.path.join(_d, f"{os.getpid()}.txt")
        while True:
            r = _rss()
            if r > best + (8 << 20):
                best = r
                fr = sys._current_frames().get(main)
                stack = traceback.extract_stack(fr) if fr is not None else []
                names = [f"{os.path.basename(s.filename)}:{s.lineno}:{s.name}" for s in stack
                         if "htmuon_dist" in s.filename or "benchmarks" in s.filename or "launch" in s.filename]
                with open(path, "a") as f:
                    f.write(f"{r / 2**20:.0f} MiB rank={os.environ.get('RANK','?')} argv0={os.path.basename(sys.argv[0]) if sys.argv else ''} " + " > ".join(names[-6:]) + "\n")
            time.sleep(0.01)
    threading.Thread(target=_loop, daemon=True).start()
