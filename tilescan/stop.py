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
