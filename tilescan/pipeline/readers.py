"""Reader processes: the overlap pipeline's reads (decoding and scaling) outside the run's
process, so they do not take turns on Python's GIL with the model's thread and the writer.

With ``[inference] reader_processes = true`` each reader lane of :mod:`~tilescan.pipeline.stream`
hands its chunks of tiles to its own child (``python -m tilescan.pipeline.readers``, started
like the output helpers of :mod:`tilescan.outputs.workers`, for the same reasons). The child
gets the scene's :class:`~tilescan.scene.reader.SceneReader` once (pickled: the grid, bands,
masks and stretch, no handles), reads each chunk exactly as the reader would in the run, and
sends the model input and the valid masks back over a socket, received straight into the
batch's memory with one call each (no Python loop, no GIL while it waits). The quicklook's
samples it took from the windows come back with them.

Only local files not held in memory go to a child: a small scene's reads come from memory
and a remote one's from the run's own connection, on the lane's thread as before. A child
ignores SIGINT and SIGTERM (the run decides how to stop) and ends when its socket closes.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from ..outputs.workers import child_env, portable_error
from ..scene.decimate import pick
from ..scene.grid import TileSet
from ..scene.reader import SceneReader

__all__ = ["ReaderDied", "ReaderProcesses", "read_batch"]

_LEN = struct.Struct("<Q")
_BUFFER = 8 * 2**20  # socket buffers: a chunk's arrays cross in a few large copies
_KEEP = 8  # scenes a child keeps (the lanes read at most a few at once)
_keys = itertools.count()
_lane = threading.local()


class ReaderDied(RuntimeError):
    """A reader process ended while reading (killed, out of memory): the unit fails; the lane
    starts a fresh process for its next read."""


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise EOFError("the reader process closed its socket")
        got += k


def _recv(sock: socket.socket) -> Any:
    head = bytearray(_LEN.size)
    _recv_into(sock, memoryview(head))
    data = bytearray(_LEN.unpack(head)[0])
    _recv_into(sock, memoryview(data))
    return pickle.loads(data)


class _Child:
    """One reader process and the run's end of its socket (used by one lane thread at a time)."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "tilescan.pipeline.readers", str(theirs.fileno())],
                                         env=child_env(), pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        self.known: set[int] = set()  # the readers it holds
        self.forget: list[int] = []  # readers it may drop, told with the next read

    def read(self, reader: SceneReader, tiles: TileSet, empty: Callable) -> tuple[np.ndarray, np.ndarray]:
        if reader.process_key is None:
            reader.process_key = next(_keys)
        key = reader.process_key
        state = None if key in self.known else pickle.dumps(reader, protocol=pickle.HIGHEST_PROTOCOL)
        preview = reader._preview
        view = (preview.rows, preview.cols) if preview is not None and key not in self.known else None
        forget, self.forget = self.forget, []
        t, s = reader.tile_px, reader.input_size
        x = empty((len(tiles), s, s, len(reader.bands)), np.float32)
        valid = np.empty((len(tiles), t, t), dtype=bool)
        try:
            _send(self.sock, (forget, key, state, view, tiles.row, tiles.col))
            self.known.add(key)
            ok, got = _recv(self.sock)
            if ok:
                _recv_into(self.sock, memoryview(x).cast("B"))
                _recv_into(self.sock, memoryview(valid).cast("B"))
        except (OSError, EOFError) as exc:
            raise ReaderDied(f"the reader process stopped (exit status {self.proc.poll()})") from exc
        if not ok:
            raise got
        windows, pixels, picked = got
        with reader._lock:
            reader.windows_read += windows
            reader.pixels_read += pixels
        if preview is not None:
            for p in picked:
                preview.put(p)
        return x, valid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()  # the child ends at the end of its socket
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ReaderProcesses:
    """One reader process per lane, started when first asked for (:meth:`start` starts some
    ahead, while the model loads). A lane's thread calls :meth:`bind` once; then
    :func:`read_batch` on that thread reads through the lane's process."""

    def __init__(self):
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, n: int) -> None:
        for lane in range(n):
            self._child(lane)

    def _child(self, lane: int) -> _Child:
        with self._lock:
            if self._closed:
                raise RuntimeError("the reader processes are closed")
            child = self._children.get(lane)
            if child is None or not child.alive():
                if child is not None:
                    child.close()
                child = self._children[lane] = _Child()
            return child

    def bind(self, lane: int) -> None:
        """Have this thread read through lane ``lane``'s process (a lane's initializer)."""
        _lane.procs, _lane.index = self, lane

    def forget(self, reader: SceneReader) -> None:
        """Every tile of ``reader`` is read: the processes may drop their copy of it."""
        key = reader.process_key
        if key is None:
            return
        with self._lock:
            for child in self._children.values():
                if key in child.known:
                    child.known.discard(key)
                    child.forget.append(key)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children, self._children = list(self._children.values()), {}
        for child in children:
            child.close()


def read_batch(reader: SceneReader, tiles: TileSet, empty: Callable = np.empty) -> tuple[np.ndarray, np.ndarray]:
    """``reader.read_batch(tiles, empty)``, through this thread's reader process when it has one
    (:meth:`ReaderProcesses.bind`) and the scene is a local file not held in memory."""
    procs = getattr(_lane, "procs", None)
    if procs is None or reader.holds_whole() or not os.path.isfile(reader.info.path):
        return reader.read_batch(tiles, empty)
    return procs._child(_lane.index).read(reader, tiles, empty)


# -- the child -------------------------------------------------------------------------


class _Picks:
    """Stands in for a reader's preview in the child: keeps what each window gives it."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows, self.cols, self.picked = rows, cols, []

    def take(self, window, data: np.ndarray, valid: np.ndarray) -> None:
        p = pick(self.rows, self.cols, window, data, valid)
        if p is not None:
            self.picked.append(p)


class _Scratch:
    """``empty(shape, dtype)`` in one buffer reused from read to read (sent before the next)."""

    def __init__(self):
        self.buf = np.empty(0, np.uint8)

    def __call__(self, shape: tuple, dtype) -> np.ndarray:
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.buf.nbytes < need:
            self.buf = np.empty(need, np.uint8)
        return self.buf[:need].view(dtype).reshape(shape)


def _serve(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    readers: OrderedDict[int, tuple[SceneReader, _Picks | None]] = OrderedDict()
    scratch = _Scratch()
    while True:
        try:
            forget, key, state, view, row, col = _recv(sock)
        except (EOFError, OSError):
            return 0
        for k in forget:
            if k in readers:
                readers.pop(k)[0].close()
        x = valid = None
        try:
            if state is not None:
                readers[key] = (pickle.loads(state), None if view is None else _Picks(*view))
                while len(readers) > _KEEP:
                    readers.popitem(last=False)[1][0].close()
            readers.move_to_end(key)
            reader, picks = readers[key]
            reader._preview = picks
            w0, p0 = reader.windows_read, reader.pixels_read
            x, valid = reader.read_batch(TileSet(reader.grid, row, col), scratch)
            reply = (True, (reader.windows_read - w0, reader.pixels_read - p0, picks.picked if picks else []))
            if picks is not None:
                picks.picked = []
        except BaseException as exc:  # noqa: BLE001 - handed back to the run
            reply = (False, portable_error(exc, "the reader process"))
        try:
            _send(sock, reply)
            if reply[0]:
                sock.sendall(memoryview(np.ascontiguousarray(x)).cast("B"))
                sock.sendall(memoryview(np.ascontiguousarray(valid)).cast("B"))
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
