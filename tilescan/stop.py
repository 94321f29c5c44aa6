"""Stopping a run cleanly on SIGTERM or SIGINT (preemption on Slurm and Kubernetes).

Schedulers that preempt a job send SIGTERM, wait a grace period, then send SIGKILL. While
:func:`handling` is active, the first SIGTERM or SIGINT only sets a flag: the batch loop
calls :func:`check` between batches, which raises :class:`Interrupted` so the unit in
flight is dropped (its staging folder removed, nothing moved into place) and the run
writes ``report.json`` naming it and exits with :data:`tilescan.errors.EXIT_INTERRUPTED`.
A unit already writing its outputs is finished first (seconds). A second signal (not a
SIGTERM again within :data:`REPEAT_S`) stops the process at once, with the default action of that signal; for the Python API, a second
SIGINT raises :class:`KeyboardInterrupt` instead (a notebook's kernel lives on).
:func:`request` asks the same from any thread (``tilescan.stop_runs()``: runs on worker
threads, which signals do not reach).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state: dict = {"signal": None, "second": "end", "at": 0.0, "runs": 0, "noted": None}
_runs_lock = threading.Lock()

#: What :func:`request` puts where a signal's name goes (report.json's ``interrupted.signal``).
REQUESTED = "tilescan.stop_runs()"


class Interrupted(BaseException):
    """A stop was requested by a signal. A BaseException, so no ``except Exception`` on the
    way up (a reader, a per-scene error handler) mistakes it for a failed scene."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def requested() -> str | None:
    """The name of the signal that asked to stop (``"SIGTERM"``), or None."""
    return _state["signal"]


def request() -> None:
    """Ask the runs at work in this process to stop as a SIGTERM stops them (from any thread: a
    service shutting down, a workflow's cancel, where signals reach the main thread only)."""
    if _state["signal"] is None:
        _state.update(signal=REQUESTED, at=time.monotonic())


def note(name: str | None) -> None:
    """Record a stop the command line raises as an exception in whatever code runs (``name``:
    the signal's; None forgets it, as each command starts and ends), so :func:`check_noted`
    raises it again where Python dropped it (an exception in a garbage-collector callback is
    only printed), and a run that begins after it stops at once."""
    _state["noted"] = name


def check_noted() -> None:
    """Raise :class:`Interrupted` if the command line noted a stop (:func:`note`); a stop asked
    of the runs (:func:`request`, a run's signal handling) is not this one's."""
    if _state["noted"] is not None:
        raise Interrupted(_state["noted"])


def settle(done: bool = True) -> None:
    """Say that the command's work is in place (``done``; False at a command's start): a stop
    that comes after has nothing left to act on, and the command line lets it pass."""
    _state["settled"] = done


def settled() -> bool:
    """Whether :func:`settle` said the work is in place."""
    return _state.get("settled", False)


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    name = _state["signal"]
    if name is not None:
        raise Interrupted(name)


#: A SIGTERM again within this many seconds of the first is the same request: a scheduler's
#: arrives twice, once to the process and once through its job script's trap. (A second
#: Ctrl-C is a person's: it ends the run at once.)
REPEAT_S = 1.0


def _handler(signum, frame) -> None:
    if _state["signal"] is not None:  # the second signal: stop now
        if signum == signal.SIGTERM and _state["signal"] == "SIGTERM" and time.monotonic() - _state["at"] < REPEAT_S:
            return
        if _state["second"] == "raise" and signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)  # a third: Python's own again
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state.update(signal=signal.Signals(signum).name, at=time.monotonic())


class Seen:
    """What :func:`handling` saw: ``signal``, the name of the signal that asked to stop
    while the block ran (set when it ends), or None."""

    signal: str | None = None


def _ours() -> list[int]:
    """The signals tilescan may handle for a while: not one whose handler was set outside Python
    (getsignal says None: an embedding program's), which Python could not put back after."""
    return [s for s in SIGNALS if signal.getsignal(s) is not None]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while the block runs (a checkpoint is written whole), then act
    on the first that came as the handler before would have (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in _ours()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if came and callable(old[came[0]]):
            old[came[0]](came[0], None)
        elif came and old[came[0]] == signal.SIG_DFL:
            os.kill(os.getpid(), came[0])


@contextlib.contextmanager
def handling(second: str = "end") -> Iterator[Seen]:
    """Turn SIGTERM/SIGINT into a stop request while the block runs (main thread only;
    elsewhere, e.g. the Python API called from a worker thread, signals keep their
    handlers, and :func:`request` stops it). ``second``: what a second signal does: ``"end"``
    the process; ``"raise"`` (a SIGINT): :class:`KeyboardInterrupt`. The previous handlers are
    restored after. A request is forgotten once no run is at work (the next starts afresh)."""
    seen = Seen()
    main = threading.current_thread() is threading.main_thread()
    with _runs_lock:
        if not _state["runs"]:
            _state.update(signal=_state["noted"])  # a stop the command line saw before the run began: now
        _state["runs"] += 1
        if main:
            _state["second"] = second
    old = {s: signal.signal(s, _handler) for s in _ours()} if main else {}
    try:
        yield seen
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        seen.signal = _state["signal"]
        with _runs_lock:
            _state["runs"] -= 1
            if main:
                _state["second"] = "end"
            if not _state["runs"]:
                _state.update(signal=None)
