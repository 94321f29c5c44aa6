"""Stopping a run cleanly on SIGTERM or SIGINT (preemption on Slurm and Kubernetes).

Schedulers that preempt a job send SIGTERM, wait a grace period, then send SIGKILL. While
:func:`handling` is active, the first SIGTERM or SIGINT only sets a flag: the batch loop
calls :func:`check` between batches, which raises :class:`Interrupted` so the unit in
flight is dropped (its staging folder removed, nothing moved into place) and the run
writes ``report.json`` naming it and exits with :data:`tilescan.errors.EXIT_INTERRUPTED`.
A unit already writing its outputs is finished first (seconds). A second signal stops
the process at once, with the default action of that signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {"signal": None}
_seen: dict[str, int] = {}


class Interrupted(BaseException):
    """A stop was requested by a signal. A BaseException, so no ``except Exception`` on the
    way up (a reader, a per-scene error handler) mistakes it for a failed scene."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def requested() -> str | None:
    """The name of the signal that asked to stop (``"SIGTERM"``), or None."""
    return _state["signal"]


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    name = _state["signal"]
    if name is not None:
        raise Interrupted(name)


def _handler(signum, frame) -> None:
    if _state["signal"] is not None:  # the second signal: stop now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state["signal"] = signal.Signals(signum).name


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into a stop request while the block runs (main thread only;
    elsewhere, e.g. the Python API called from a worker thread, signals keep their
    handlers). The previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["signal"] = None
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state["signal"] = None


def test_point(phase: str) -> None:
    """Test hook (no effect unless set): ``TILESCAN_TEST_SIGNAL_AT=<phase>[:N][@SIG]``
    makes this process send itself SIGTERM (or ``SIG``, e.g. ``SIGINT``) the Nth time
    (default 1st) it reaches ``phase`` (the phases of ``TILESCAN_TEST_KILL_AT``,
    tilescan/job.py). tests/test_preempt.py uses it to stop runs at exact points."""
    spec = os.environ.get("TILESCAN_TEST_SIGNAL_AT")
    if not spec:
        return
    spec, _, sig = spec.partition("@")
    name, _, nth = spec.partition(":")
    if name != phase:
        return
    _seen[phase] = _seen.get(phase, 0) + 1
    if _seen[phase] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, sig or "SIGTERM"))
