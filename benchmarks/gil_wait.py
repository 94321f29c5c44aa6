"""What the other threads' hold on the GIL costs the model's thread, per batch.

On a GPU host the run's main thread spends a batch waiting on the device: each call that lets
the GIL go (an upload, a copy of a result to the host) must get it back, and while another
thread runs Python code that takes up to ``sys.getswitchinterval()`` (5 ms by default), a
wait that more cores do not shorten. This measures it without a GPU: JAX's one-pass Grad-CAM
step (the GPU install's) on this CPU with XLA on one thread, pinned to one core, and a
thread that runs pure Python beside it on the other core (or none), each way in a fresh
process: ms a batch, and its excess over the quiet run against the switch interval::

    python benchmarks/gil_wait.py [--batch 8] [--batches 40] [--switch-ms 5,0.5] [--repo A --repo B] [--out X.json]

With ``--repo`` each checkout's tilescan runs the same step (its own shims), alternated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys, threading, time
import numpy as np
batch, batches, busy, switch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "busy", float(sys.argv[4])
busy_core = int(sys.argv[5].split(",")[1])
from tilescan.model import load_model
from tilescan.explain.cam import GradCAM
card = load_model()
cam = GradCAM(card.model, layer=card.cam_layer, fast_head=True)
x = np.random.default_rng(0).random((batch, card.input_size, card.input_size, 3), dtype=np.float32)
for _ in range(3):
    cam.submit(x)()  # compiled and warm
stop = threading.Event()

def spin():
    os.sched_setaffinity(0, {busy_core})  # the process is on the model's core; this thread alone on the other
    n = 0
    while not stop.is_set():
        for i in range(200):
            n += i

sys.setswitchinterval(switch / 1e3)
if busy:
    threading.Thread(target=spin, daemon=True).start()
    time.sleep(0.05)
times = []
for _ in range(batches):
    t = time.perf_counter()
    cam.submit(x)()
    times.append(time.perf_counter() - t)
stop.set()
print(json.dumps({"ms_per_batch": 1e3 * float(np.median(times)), "path": cam.path, "backend": cam.backend}))
"""


def _once(repo: Path, batch: int, batches: int, busy: bool, switch_ms: float) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:2]
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    p = subprocess.run(["taskset", "-c", str(cores[0]), sys.executable, "-c", _CHILD, str(batch),
                        str(batches), "busy" if busy else "quiet", str(switch_ms), ",".join(map(str, cores))],
                       capture_output=True, text=True, env=env, cwd="/", check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--switch-ms", default="5,0.5", help="switch intervals to measure, comma separated")
    ap.add_argument("--repo", action="append", help="a checkout to measure (repeat to compare; default: this one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("gil_wait.py needs 2 usable cores: the model's and the busy thread's")
    repos = [Path(r).resolve() for r in (args.repo or [REPO])]
    switches = [float(s) for s in args.switch_ms.split(",")]
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for repo in (repos if r % 2 == 0 else repos[::-1]):
            for sw in switches:
                for busy in (False, True):
                    got = _once(repo, args.batch, args.batches, busy, sw)
                    if got["path"] != "gap-dense":
                        raise SystemExit(f"{repo}: the step is {got['path']}, not the one-pass gap-dense step")
                    key = f"{repo}|{sw}|{'busy' if busy else 'quiet'}"
                    runs.setdefault(key, []).append(round(got["ms_per_batch"], 3))
                    print(f"round {r + 1}: {repo.name}, switch {sw} ms, {'busy' if busy else 'quiet'}: "
                          f"{got['ms_per_batch']:.2f} ms a batch", file=sys.stderr)
    table = {}
    for repo in repos:
        for sw in switches:
            quiet, busy = (median(runs[f"{repo}|{sw}|{k}"]) for k in ("quiet", "busy"))
            table[f"{repo.name} switch {sw} ms"] = {
                "quiet_ms_per_batch": round(quiet, 2), "busy_ms_per_batch": round(busy, 2),
                "excess_ms": round(busy - quiet, 2), "excess_in_switch_intervals": round((busy - quiet) / sw, 2)}
    res = {"command": "python benchmarks/gil_wait.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "batch": args.batch, "batches": args.batches, "rounds": args.rounds,
           "repos": [str(r) for r in repos], "results": table, "runs": runs}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
