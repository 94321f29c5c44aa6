"""Memory for the batches' model inputs, reused from batch to batch.

A batch array taken from an :class:`ArrayPool` goes back to the pool by itself once nothing
refers to it any more (the model has taken what it needs and its last view is dropped), and
the next read writes into it. Freshly allocated memory is not free: the kernel zeroes every
page on its first write (measured in benchmarks/README.md, "The host side").

A :class:`Batcher` gathers the pieces read into batches of the model's size across units; a
batch of several pieces is put together in such memory too (one piece is passed as it is).

:func:`keep_freed_memory` has the C library's ``malloc`` keep the other arrays a run frees
(a scene's quicklook, heat and table columns) for the next ones.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from typing import Any, Callable

import numpy as np

__all__ = ["ArrayPool", "Batcher", "keep_freed_memory"]

#: Freed blocks up to this size stay with ``malloc`` for reuse (:func:`keep_freed_memory`).
KEEP_FREED_BYTES = 16 * 2**20

_kept = False


class _Lease:
    """Exposes a pool's buffer to numpy; when the last array made from it goes, so does the
    lease, and the buffer returns to the pool."""

    def __init__(self, pool: "ArrayPool", buf: np.ndarray):
        self._pool, self._buf = pool, buf
        self.__array_interface__ = buf.__array_interface__

    def __del__(self):
        self._pool._give_back(self._buf)


class ArrayPool:
    """``empty(shape, dtype)`` like ``np.empty``, from buffers used before where one fits
    (at least the size asked, at most twice it); at most ``keep`` unused buffers are kept.
    ``make(nbytes)`` makes a new buffer (uint8; default: ``np.empty``) and ``dropped(buf)``
    hears of each one not kept (e.g. memory shared with helper processes)."""

    def __init__(self, keep: int = 4, make: Callable[[int], np.ndarray] | None = None,
                 dropped: Callable[[np.ndarray], None] | None = None):
        self.keep = keep
        self._make = make or (lambda n: np.empty(n, dtype=np.uint8))
        self._dropped = dropped
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        #: Arrays handed out from a used buffer, and from new memory.
        self.reused = self.fresh = 0

    def empty(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        need = max(1, size)
        buf = None
        with self._lock:
            for i, b in enumerate(self._free):
                if need <= b.nbytes <= 2 * need:
                    buf = self._free.pop(i)
                    self.reused += 1
                    break
            else:
                self.fresh += 1
        if buf is None:
            buf = self._make(need)
        return np.asarray(_Lease(self, buf))[:size].view(dtype).reshape(shape)

    def _give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)
                return
        if self._dropped is not None:
            self._dropped(buf)

    def clear(self) -> None:
        """Forget the unused buffers (their memory is freed)."""
        with self._lock:
            free, self._free = self._free, []
        if self._dropped is not None:
            for buf in free:
                self._dropped(buf)


class Batcher:
    """Read tiles gathered into batches of exactly ``size`` across units; ``step(pieces, x)``
    gets each full batch as ``[(job, tiles, valid, fractions)]`` and the stacked inputs."""

    def __init__(self, size: int, step: Callable[[list, np.ndarray], None], memory: ArrayPool):
        self.size, self.step, self.memory = size, step, memory  # memory: for batches put together
        self.pieces: list = []  # (job, tiles, x, valid, fractions)
        self.count = 0

    def add(self, job, tiles: list, x: np.ndarray, valid: np.ndarray, fractions: np.ndarray) -> None:
        i = 0
        while i < len(tiles):
            take = min(self.size - self.count, len(tiles) - i)
            self.pieces.append((job, tiles[i:i + take], x[i:i + take], valid[i:i + take], fractions[i:i + take]))
            self.count += take
            i += take
            if self.count == self.size:
                self.flush()

    def drop(self, keep: Callable[[Any], bool]) -> None:
        """Forget the gathered tiles of the jobs ``keep`` rejects."""
        self.pieces = [p for p in self.pieces if keep(p[0])]
        self.count = sum(len(p[1]) for p in self.pieces)

    def flush(self) -> None:
        """Hand over what is gathered (a short last batch too)."""
        if not self.pieces:
            return
        pieces, self.pieces, self.count = self.pieces, [], 0
        xs = [p[2] for p in pieces]  # one piece: no copy; more: into reused memory, as fresh pages cost
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, out=self.memory.empty(
            (sum(map(len, xs)), *xs[0].shape[1:]), xs[0].dtype))
        self.step([(job, tiles, valid, fr) for job, tiles, _, valid, fr in pieces], x)


def keep_freed_memory(nbytes: int = KEEP_FREED_BYTES) -> bool:
    """Once per process, have glibc's ``malloc`` keep freed blocks of up to ``nbytes`` for the
    next allocations instead of handing them back to the kernel, whose fresh pages are zeroed
    one by one on first write. glibc does this by itself once a program frees a block that
    large (its dynamic mmap threshold); freeing one here gets there from the first scene on,
    and a threshold the user set (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``) stays, as
    glibc then ignores the free. True if done now; False elsewhere than on glibc, or done before."""
    global _kept
    if _kept or not _glibc():
        return False
    _kept = True
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        malloc, free = libc.malloc, libc.free
    except (OSError, AttributeError):
        return False
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    free(malloc(int(nbytes)))
    return True


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or no such name here
        return False
