"""Where the GIL is held, from a ``py-spy record --format raw --gil --threads`` file.

``py-spy --gil`` samples only the thread that holds the GIL, so the samples outside imports,
over the tiles run, are the held GIL a tile: the serial part of the host side that more cores
cannot share (benchmarks/README.md). Summarises by thread, by frame (inclusive) and by the
innermost tilescan frame (where the holding code is)::

    py-spy record --format raw --gil --threads --subprocesses -r 200 -o spy.txt -- \\
        python benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --work DIR
    python benchmarks/gil_profile.py spy.txt --tiles 16704 --rate 200 [--out results/X.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

_THREAD = re.compile(r"^thread \((\d+)\): (.*)$|^thread : (.*)$")


def _stacks(path: str):
    """(process, frames, samples) of each stack outside imports (start-up, not the tiles' path);
    the process is the innermost one named (with --subprocesses: the child's command)."""
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if any("importlib" in fr for fr in frames):
                continue
            procs = [fr for fr in frames if fr.startswith("process ")]
            yield (procs[-1].split(":", 1)[-1] if procs else "?"), frames, int(count)


def summarise(path: str, tiles: int, rate: int, top: int = 40) -> dict:
    """The held GIL of the run's process (the one with tilescan's writer thread); other
    processes (reader or output helpers, the benchmark's parent) are listed apart."""
    by_process: Counter = Counter()
    runs: set = set()
    for proc, frames, n in _stacks(path):
        by_process[proc] += n
        if any("tilescan-write" in fr for fr in frames):
            runs.add(proc)
    by_thread: Counter = Counter()
    inclusive: Counter = Counter()
    innermost: Counter = Counter()
    held = 0
    for proc, frames, n in _stacks(path):
        if proc not in runs:
            continue
        thread = next((fr for fr in frames if fr.startswith("thread")), "?")
        name = _THREAD.match(thread)
        thread = (name.group(2) or name.group(3)) if name else thread
        thread = re.sub(r"_\d+$", "", thread)  # a pool's threads together
        code = [fr for fr in frames if " (" in fr and not fr.startswith(("process", "thread"))]
        if not code:
            continue  # outside any Python frame
        held += n
        by_thread[thread] += n
        for fr in set(code):
            inclusive[fr] += n
        ours = [fr for fr in code if "tilescan/" in fr]
        innermost[(ours[-1] if ours else code[-1]) + (" > " + code[-1] if ours and ours[-1] != code[-1] else "")] += n
    s = held / rate
    return {"tiles": tiles, "rate_hz": rate, "run_processes": sorted(runs),
            "samples_by_process": dict(by_process.most_common()),
            "gil_held_samples": held, "gil_held_s": round(s, 3),
            "gil_held_ms_per_tile": round(1e3 * s / tiles, 4) if tiles else None,
            "by_thread": dict(by_thread.most_common()),
            "top_frames_inclusive": dict(inclusive.most_common(top)),
            "innermost_tilescan_frame": dict(innermost.most_common(top))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="py-spy's --format raw output")
    ap.add_argument("--tiles", type=int, required=True, help="tiles the profiled run classified")
    ap.add_argument("--rate", type=int, default=200, help="py-spy's -r")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", help="also write the summary here (JSON)")
    a = ap.parse_args()
    res = summarise(a.raw, a.tiles, a.rate, a.top)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
