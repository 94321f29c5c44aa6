"""Where the run's background threads (the opener, the finishers and their tail steps) run:
at a lower priority than the model's, and with the model on the CPU on one shared core; and
numpy's BLAS threads, one during a run."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

#: How much nicer than the run the opener and finisher threads are (off the model's cores).
FINISH_NICE = 10


def host_core(engine) -> int | None:
    """With the model on the CPU (two cores or more), the core that the threads which open
    scenes and write their outputs share: the last the process may use. Spread over every
    core they interrupted each of the model's threads, and each of its ops waits for the
    slowest; on one core they stall one of them, and wait less for each other (fewer thread
    switches, less CPU per scene; benchmarks/README.md). None with the model on an
    accelerator, where the host's cores are theirs and they must spread. Threads these start
    keep the core too: GDAL's pool for the large COGs, when a tail step starts it first."""
    if (getattr(engine, "runtime", None) or {}).get("device") != "cpu":
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return cpus[-1] if len(cpus) >= 2 else None


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one; threads it
    starts inherit it): a unit's outputs are then written in the time the model leaves the
    cores, instead of slowing the model down."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FINISH_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


class SharedCore:
    """The core a run's background threads share (:func:`host_core`), once the engine is
    known; each such thread moves there once (:meth:`join`)."""

    def __init__(self):
        self.cpu: int | None = None
        self._joined = threading.local()

    def set(self, engine) -> None:
        self.cpu = host_core(engine)

    def join(self) -> None:
        """Move the calling thread to :attr:`cpu`, once, if there is one (best effort)."""
        if self.cpu is None or getattr(self._joined, "done", False):
            return
        self._joined.done = True
        try:
            os.sched_setaffinity(threading.get_native_id(), {self.cpu})
        except (AttributeError, OSError):  # not Linux, or not allowed: any core
            pass

    def background(self) -> None:
        """A finisher's or tail step's thread starts: at a lower priority, on the shared core."""
        background_priority()
        self.join()


class SwitchInterval:
    """The GIL's switch interval of a run (``[inference] switch_interval_ms``): set when its
    engine is known (:meth:`set`), as before when the last run that set one ends
    (:meth:`restore`); runs at once in one process keep the shortest they asked for."""

    _lock = threading.Lock()
    _held: list[float] = []  # the intervals (s) of the runs holding one
    _before = 0.0  # the interval before the first of them

    def __init__(self):
        self._mine: float | None = None

    def set(self, ms: float | None) -> None:
        if ms is None or self._mine is not None:
            return
        with self._lock:
            if not SwitchInterval._held:
                SwitchInterval._before = sys.getswitchinterval()
            self._mine = ms / 1e3
            SwitchInterval._held.append(self._mine)
            sys.setswitchinterval(min(SwitchInterval._held))

    def restore(self) -> None:
        if self._mine is None:
            return
        with self._lock:
            SwitchInterval._held.remove(self._mine)
            self._mine = None
            sys.setswitchinterval(min(SwitchInterval._held, default=SwitchInterval._before))


#: Settings of the BLAS thread count that are the user's choice (:func:`one_blas_thread`).
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread during a run, then as before (``threadpoolctl``, which
    finds the BLAS library numpy loaded and sets its thread count). A run's matrix products
    are small (heat blending, CAM upsampling) and gain nothing from BLAS's threads, whose
    workers spin-wait after each product on the cores the readers and the model need
    (benchmarks/README.md). A thread count the user set in the environment is kept."""
    if any(v in os.environ for v in _BLAS_THREAD_VARS):
        yield
        return
    controller = _blas_controller()
    if controller is None:  # an install without threadpoolctl: BLAS as numpy set it up
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the thread pools of the libraries loaded, made once per process
    (finding them walks every loaded library: too slow to do again on each run); None
    without threadpoolctl. numpy's BLAS is loaded with numpy, before any run."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()
