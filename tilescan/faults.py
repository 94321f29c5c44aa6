"""Fault injection for tests: the named points of a unit's pipeline where a test can make
the process kill or signal itself. No effect unless one of these variables is set:

- ``TILESCAN_TEST_KILL_AT=<phase>[:N]``: SIGKILL the Nth time (default 1st) the process
  reaches ``phase`` (tests/test_resume.py: a rerun after the kill equals a clean run);
- ``TILESCAN_TEST_SIGNAL_AT=<phase>[:N][@SIG]``: send SIGTERM (or ``SIG``, e.g. SIGINT)
  instead (tests/test_preempt.py: a clean stop, then resume).

Phases: ``reading`` (a tile was read), ``inference`` (a batch was computed), ``writing``
(the unit's tiles.parquet is written in staging), ``before-rename`` (run.json is written in
staging, the folder not yet moved into place); ``start`` (``tilescan run`` has read its
settings, before the run begins), ``swapping`` (``collect`` is moving its new set into place),
``collected`` (``collect`` has said its last line). The
variables are read at the first point a process reaches.
"""

from __future__ import annotations

import os
import signal

_seen: dict[tuple[str, str], int] = {}
_specs: tuple | None = None  # (variable, default signal, value), read once: points are on the per-batch path


def point(phase: str, times: int = 1) -> None:
    """A fault-injection point of the pipeline (see the module doc), reached ``times`` times
    in a row (e.g. once per tile of a chunk read at once)."""
    global _specs
    if _specs is None:
        _specs = tuple((var, default, os.environ.get(var)) for var, default in
                       (("TILESCAN_TEST_SIGNAL_AT", "SIGTERM"), ("TILESCAN_TEST_KILL_AT", "SIGKILL")))
    for var, default, spec in _specs:
        if not spec:
            continue
        spec, _, sig = spec.partition("@")
        name, _, nth = spec.partition(":")
        if name != phase:
            continue
        key = (var, phase)
        before = _seen.get(key, 0)
        _seen[key] = before + times
        if before < int(nth or 1) <= before + times:
            os.kill(os.getpid(), getattr(signal, sig or default))
