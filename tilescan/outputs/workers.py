"""Helper processes for the per-scene outputs that hold Python's GIL: the GeoPackage, the
label COG, the quicklook and the QGIS files.

In one process those writers take turns on the GIL with the opener, the writer and the
model's own Python thread, so with many small scenes the run stops scaling at a couple of
cores. :class:`OutputWorkers` runs them in long-lived child interpreters instead: each call
is pickled to an idle child (started on first use) and its result or error pickled back.

The children are plain ``python -m tilescan.outputs.workers`` processes, not
``multiprocessing``: that would import the caller's ``__main__`` again in each child (a
script calling :func:`tilescan.run` without a ``__main__`` guard would run itself), and
forking a process that has loaded TensorFlow is unsafe. A child never loads TensorFlow, so
GDAL's SQLite there has the R-tree module the GeoPackage index needs. Children ignore
SIGINT and SIGTERM (the run decides how to stop and waits for the calls it started) and
end when their stdin closes: when the run closes them, or when its process dies (killed: a
busy child first finishes its call). They end by a normal exit, so what they made in the
temporary folder is removed (a parent-death signal would kill them when the *thread* that
started them ends, before the run closes them, and leave that behind).
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import OutputError

__all__ = ["OutputWorkers", "WorkerDied"]

_LEN = struct.Struct("<Q")


def _send(f, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(data)))
    f.write(data)
    f.flush()


def _recv(f) -> Any:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("the output worker closed its pipe")
    n = _LEN.unpack(head)[0]
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the output worker closed its pipe")
    return pickle.loads(data)


class WorkerDied(OutputError):
    """An output helper process ended while it ran a call (killed, out of memory): the unit
    it wrote for fails; the next call gets a fresh process."""


def child_env() -> dict[str, str]:
    """This process's environment for a ``python -m tilescan...`` child: with this tilescan
    first on ``PYTHONPATH``, so the child imports the same package."""
    from ..backend import ascii_case_env

    env = ascii_case_env(dict(os.environ))  # GDAL's option names under a Turkish locale
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Child:
    def __init__(self, nice: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "tilescan.outputs.workers", str(int(nice))],
                                     env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=-1)

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            _send(self.proc.stdin, (fn.__module__, fn.__qualname__, args, kwargs))
            ok, value = _recv(self.proc.stdout)
        except (BrokenPipeError, OSError, EOFError) as exc:
            code = self.proc.poll()
            raise WorkerDied(f"the helper process writing {getattr(fn, '__name__', fn)} stopped "
                             f"(exit status {code})") from exc
        if ok:
            return value
        raise value

    def alive(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        """Tell the helper to end: it does when its stdin closes."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        self.end()
        wait_or_kill(self.proc)


def wait_or_kill(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Wait for a helper process told to end (its input closed), killing it after ``timeout`` s."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def close_all(children) -> None:
    """End helper processes (each with ``end()`` and ``close()``), all told first: they end
    side by side, not one after another."""
    for child in children:
        child.end()
    for child in children:
        child.close()


class OutputWorkers:
    """Up to ``n`` helper processes; :meth:`call` runs ``fn(*args, **kwargs)`` in an idle one
    (blocking the calling thread, which may be one of several) and returns its result or
    raises its error. ``fn`` must be a module-level function of an importable module."""

    def __init__(self, n: int, nice: int = 0):
        self.n, self.nice = max(1, int(n)), int(nice)
        self._idle: queue.LifoQueue = queue.LifoQueue()  # the most recently used first (warm caches)
        self._started = 0
        self._lock = threading.Lock()
        self._children: list[_Child] = []
        self._closed = False
        atexit.register(self.close)

    def _take(self) -> _Child:
        while True:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                break
            if child.alive():
                return child
            self._forget(child)  # died while idle: replaced below
        with self._lock:
            if self._closed:
                raise RuntimeError("the output workers are closed")
            if self._started < self.n:
                child = _Child(self.nice)  # counted once started (a failed start raises here)
                self._started += 1
                self._children.append(child)
                return child
        child = self._idle.get()
        if not child.alive():
            self._forget(child)
            return self._take()
        return child

    def _forget(self, child: _Child) -> None:
        with self._lock:  # its place may be taken by a fresh process
            self._started -= 1
            if child in self._children:
                self._children.remove(child)
        child.close()

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        child = self._take()
        try:
            return child.call(fn, args, kwargs)
        except WorkerDied:
            self._forget(child)
            child = None
            raise
        finally:
            if child is not None:
                self._idle.put(child)

    def close(self) -> None:
        """End every helper process (each stops when its stdin closes)."""
        with self._lock:
            self._closed = True
            children, self._children = self._children, []
        close_all(children)
        atexit.unregister(self.close)

    def __enter__(self) -> "OutputWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def helper_start(nice: int) -> None:
    """A helper process's first step: SIGINT and SIGTERM ignored (the run decides how to stop
    and ends its helpers), its CPU priority lowered by ``nice`` where allowed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


def _serve(nice: int) -> int:
    helper_start(nice)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing printed by a callee can corrupt the replies
    while True:
        try:
            module, name, args, kwargs = _recv(stdin)
        except EOFError:
            return 0
        try:
            fn: Any = importlib.import_module(module)
            for part in name.split("."):
                fn = getattr(fn, part)
            reply = (True, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            reply = (False, portable_error(exc, "the output helper process"))
        _send(stdout, reply)


def portable_error(exc: BaseException, where: str) -> BaseException:
    """``exc`` with its traceback in ``where`` as a note, made fit to be pickled back to the
    run: an error that cannot travel is replaced by a RuntimeError with its text."""
    exc.add_note(f"in {where}:\n" + "".join(traceback.format_exception(exc)).rstrip())
    try:
        pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - its text travels instead
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
