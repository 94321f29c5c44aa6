"""Where a run's start-up goes, phase by phase, in this fresh process: imports, the backend's
device, the model's load, the step's trace and compile (or its load from JAX's compilation
cache), and the first steps. With JAX, also JAX's own compile events (trace, lowering, XLA
compile, cache lookups) summed by name.

    python benchmarks/startup.py --batch 256 --out startup.json   # run it twice: cold, then warm cache
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write the phases as JSON here")
    args = ap.parse_args(argv)
    phases: dict[str, float] = {}
    last = [T0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - last[0], 3)
        last[0] = now

    import numpy as np
    import rasterio

    del rasterio  # imported for its start-up cost only

    mark("import numpy, rasterio")
    from tilescan.backend import import_keras, own_process

    own_process()  # as the tilescan command does
    keras = import_keras(0)
    mark("import keras (and its backend)")
    events: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if keras.backend.backend() == "jax":
        import jax

        def on_event(name: str, secs: float, **_kw) -> None:
            events[name][0] += 1
            events[name][1] += secs

        jax.monitoring.register_event_duration_secs_listener(on_event)
        jax.devices()
        mark("backend's devices (CUDA start-up on a GPU)")
    from tilescan.config import build_config, load_config
    from tilescan.pipeline.engine import Engine

    mark("import tilescan's pipeline")
    settings = load_config().to_dict()
    settings["inference"]["batch_size"] = args.batch
    engine = Engine(build_config(settings))
    mark("engine built (model loaded; warm-up started)")
    engine.ready()
    mark("engine ready (step traced, compiled or loaded from cache)")
    x = np.random.default_rng(0).random((args.batch, engine.input_size, engine.input_size, engine.bands), np.float32)
    for k in (1, 2):
        engine(x)
        mark(f"step {k}")
    res = {"command": " ".join(["python", "benchmarks/startup.py", *(argv if argv is not None else sys.argv[1:])]),
           "backend": keras.backend.backend(), "runtime": engine.runtime, "phases_s": phases,
           "total_s": round(time.perf_counter() - T0, 3),
           "backend_events": {k: {"n": n, "s": round(s, 3)} for k, (n, s) in sorted(events.items())}}
    print(json.dumps(res, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
