"""One stream of tiles over every unit of a run, so the model always gets full batches.

Four kinds of threads share the work:

- the **opener** takes the units in order, checks and locks each (``prepare``), opens its
  scene (band stretch, empty blocks, staging folder) while the units before it are still
  being read, and keeps one opened unit ready (small ones: two batches' worth); it runs at
  a lower priority, and has the caller's thread make the engine when the first unit needs it
  (opening needs only the model's metadata: the first units open while the model loads);
- the **caller's thread** reads chunks of tiles (lockstep: between model steps, with GDAL
  decoding on every core; overlap: on reader threads, ahead), gathers them into batches
  of exactly ``batch_size`` that may span units, and hands them to the model + CAM step
  (on the CPU, two steps compute at once on the engine's threads: ``model_streams``);
- the **writer** turns each batch's results into each unit's rows, labels and heat;
- the **finishers** (two, or one per output helper process) each write a unit's outputs
  and move them into place as soon as its last tile is done, while the stream goes on with
  the next units.

A failing unit is dropped alone (its staging folder removed, its lock released). A stop
request (SIGTERM/SIGINT) ends reading: units whose every tile already went through the
model are finished, the others are dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import faults, stop
from ..config import Config
from ..errors import ModelError
from ..log import logger
from .engine import Engine
from .memory import ArrayPool, Batcher
from .process import UnitJob, warm_writers
from .readers import ReaderProcesses
from .report import UnitResult
from .threads import FINISH_NICE, SharedCore, SwitchInterval, background_priority

#: Most tiles an overlap reader reads with one call (a band of block rows, or part of one):
#: 128 tiles of 128 px are 25 MB of model input; each reader has at most two calls ahead.
BAND_CHUNK = 128

#: Most units waiting for (or in) the finisher before no further unit is opened.
FINISH_BACKLOG = 16

#: Units finished at once (with output helper processes, at least one for each helper).
#: While one waits for the disk or its tail steps the other writes, so the finishers keep up
#: with many small scenes instead of leaving a queue of them to write after the model is done.
FINISHERS = 2


@dataclass
class StreamStats:
    """Run-level timings of one stream (report.json)."""

    started: float = field(default_factory=time.monotonic)  # the run's start
    engine_ready: float | None = None  # seconds from the start until the model step was compiled
    first_batch: float | None = None  # seconds from the start until the first batch's results
    last_batch: float | None = None  # ... until the last batch's results (the stream's rate in between)
    model_s: float = 0.0  # in the model + CAM step
    batches: int = 0
    tiles: int = 0

    def startup(self) -> dict:
        """Seconds from the run's start until the engine was ready and the first batch done."""
        return {k: v for k, v in self.to_dict().items() if k in ("engine_ready_s", "first_batch_s")}

    def to_dict(self) -> dict:
        def r(v):
            return None if v is None else round(v, 3)

        return {"engine_ready_s": r(self.engine_ready), "first_batch_s": r(self.first_batch),
                "last_batch_s": r(self.last_batch), "model_s": round(self.model_s, 3), "batches": self.batches, "tiles": self.tiles}


class _Writer(threading.Thread):
    """Runs ``handle(item)`` for each item put, in order, off the model's thread."""

    def __init__(self, handle: Callable[[Any], None], maxsize: int):
        super().__init__(name="tilescan-write", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.handle = handle

    def run(self):
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                self.handle(item)
            finally:
                self.q.task_done()

    def put(self, item) -> None:
        self.q.put(item)

    def wait_idle(self) -> None:
        self.q.join()

    def finish(self) -> None:
        self.q.put(None)
        self.join()


class Stream:
    """Runs the units that ``units`` yields through one engine; see the module doc.

    ``prepare(index, unit)`` (on the opener thread) returns an unopened, locked
    :class:`UnitJob`, or a :class:`UnitResult` for a unit that is skipped or failed its checks.
    ``fail(job_or_unit, exc) -> UnitResult`` turns an error into the unit's result (raising
    for errors that end the run). Results reach ``on_result`` as they happen."""

    def __init__(self, make_engine: Callable[[], Engine], cfg: Config, prepare: Callable[[int, Any], Any],
                 fail: Callable[[Any, BaseException], UnitResult], on_result: Callable[[int, UnitResult], None],
                 progress: Any = None, started: float | None = None):
        self.make_engine, self.cfg = make_engine, cfg
        self.engine: Engine | None = None
        self.prepare, self.fail, self.on_result = prepare, fail, on_result
        self.bar = progress
        self.stats = StreamStats() if started is None else StreamStats(started)
        self.batch_size = cfg.inference.batch_size
        self.ahead = max(1, cfg.inference.queue_size)
        self.in_flight: dict[int, UnitJob] = {}  # opened, not yet finished or dropped
        self.not_started: list = []
        self.interrupted: stop.Interrupted | None = None
        self.dropped: list[UnitJob] = []  # dropped by a stop request
        self._fatal: BaseException | None = None
        self._lock = threading.Lock()
        # helper processes for the writers that hold the GIL ([inference] output_workers)
        nw = cfg.inference.output_workers
        self._workers = None
        if nw:
            from ..outputs.workers import OutputWorkers

            self._workers = OutputWorkers(nw, nice=FINISH_NICE)
        finishers = max(FINISHERS, nw)
        self._core = SharedCore()  # where the background threads run, set with the engine
        self._switch = SwitchInterval()  # the GIL's switch interval, set with the engine
        self._finishers = ThreadPoolExecutor(max_workers=finishers, thread_name_prefix="tilescan-finish",
                                             initializer=self._core.background)
        self._room = threading.Condition()
        self._ahead = (0, 0)  # units opened and not yet taken for reading, and their tiles
        self._backlog = 0  # units handed to the finisher and not yet finished
        self._tail = ThreadPoolExecutor(max_workers=2 * finishers, thread_name_prefix="tilescan-tail",
                                        initializer=self._core.background)
        self._finishing: list[Future] = []
        self._engine_asked = False  # the opener asked the caller's thread for the engine
        self._warmed = False  # warm_writers submitted
        self._writer = _Writer(self._handle, maxsize=max(2, cfg.inference.queue_size))
        self._pending: deque = deque()  # started batches not yet collected, oldest first
        self._memory, self._batches = ArrayPool(), ArrayPool(keep=3)  # model inputs read, and batches of pieces
        self._read_procs = ReaderProcesses.for_run(cfg.inference)  # off, or starting while the model loads
        self._collected = 0.0  # when the last batch was collected
        self._since = 0.0  # units taken count their time from here: the engine made, then its step ready

    # -- the opener

    def _opener(self, units: list, out: queue.Queue, halt: threading.Event) -> None:
        background_priority()  # it opens ahead of the reading: the model's threads come first
        self._read_procs.bind(-1)  # with reader processes, scenes open in a process of their own
        for k, unit in units:
            self._core.join()  # once the engine is known (the first units open while it loads)
            self._wait_for_room(halt)
            if halt.is_set() or stop.requested():
                out.put(("not_started", k, unit))
                continue
            job = None
            try:
                job = self.prepare(k, unit)
                if isinstance(job, UnitJob):
                    if not self._engine_asked:  # the first unit with work: the caller loads the model
                        job.check_file()  # not for a broken file (a cron batch's, on every rerun)
                        self._engine_asked = True
                        out.put(("engine", k, None))
                    job.run_timings = self.stats.startup
                    job.tail_pool = self._tail
                    job.workers = self._workers
                    job.batch_memory = self._memory
                    job.open()  # meanwhile: opening needs only the model's metadata
                    with self._room:
                        self._ahead = (self._ahead[0] + 1, self._ahead[1] + len(job.tiles))
                    out.put(("job", k, job))
                else:
                    out.put(("result", k, job))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                if isinstance(job, UnitJob):
                    job.abort()
                out.put(("error", k, (job if isinstance(job, UnitJob) else unit, exc)))
        out.put(None)

    def _wait_for_room(self, halt: threading.Event) -> None:
        """Wait while opened, not yet read units hold two batches' worth of tiles or more: one
        large scene is opened ahead of the reading, but as many small ones as fill the next
        two batches (all of a batch's units must be open before it can be read). Wait too
        while ``FINISH_BACKLOG`` read units wait for the finisher: the model then pauses until
        their outputs are written, instead of open scenes (memory, file handles) piling up."""
        with self._room:
            while (((self._ahead[0] and self._ahead[1] >= 2 * self.batch_size) or self._backlog >= FINISH_BACKLOG)
                   and not halt.is_set()):
                self._room.wait(0.1)

    def _finished_one(self, _fut: Future) -> None:
        with self._room:
            self._backlog -= 1
            self._room.notify()

    def _taken(self, job: UnitJob) -> None:
        with self._room:
            self._ahead = (self._ahead[0] - 1, self._ahead[1] - len(job.tiles))
            self._room.notify()

    def _engine(self) -> Engine:
        """The engine, made on the caller's thread when the first unit needs it (a rerun with
        nothing to do never imports Keras). There, Keras' quiet import (stderr on /dev/null
        for a moment, :data:`~tilescan.log.STDERR_LOCK` held) hides no other thread's
        messages, and the model's thread pools start at the run's priority, not the opener's
        lower one. Meanwhile the opener opens the first units: that needs only the model's
        metadata; each gets the engine when the caller takes it (:meth:`_take`). With the model
        on an accelerator the readers read while the step compiles on the engine's thread, on
        cores the model does not use, until the first batch needs it (:meth:`_ready`); on the
        CPU the two would share the model's cores (measured no faster), so the step comes first."""
        with self._lock:
            if self.engine is None:
                self.engine = self.make_engine()
                self._since = time.monotonic()
                # the lanes' count known: reader processes start while the step compiles
                self._read_procs.start(0 if self.lockstep else self.engine.readers(self.cfg.inference.reader_threads))
                if not getattr(self.engine, "on_accelerator", False):
                    self._ready(taken=False)  # no unit is taken before the engine is made
                self._core.set(self.engine)
                self._switch.set(self.engine.switch_interval(self.cfg.inference.switch_interval_ms))
            return self.engine

    def _ready(self, taken: bool = True) -> None:
        """Wait until the engine's step is compiled, once (before the first batch, or at the
        end). Units ``taken`` before count their time from then: what they opened and read
        while the model got ready is the run's start-up, not theirs."""
        if self.engine is None or self.stats.engine_ready is not None:
            return
        self.engine.ready()
        # when it compiled (an engine made before this run: when the run got it), not when asked
        self._since = max(getattr(self.engine, "ready_at", None) or time.monotonic(), self._since)
        self.stats.engine_ready = self._since - self.stats.started
        logger.debug(f"model step ready {self.stats.engine_ready:.2f} s after the run's start")
        if taken:
            with self._lock:
                for job in self.in_flight.values():
                    job.t0 = max(job.t0, self._since)

    @property
    def lockstep(self) -> bool:
        return self.engine is not None and self.engine.pipeline == "lockstep"

    def _opened(self, units: list) -> Iterator[UnitJob]:
        """Opened jobs in unit order; the next is opened on the opener thread meanwhile."""
        q: queue.Queue = queue.Queue()  # how far the opener runs ahead: _wait_for_room
        halt = threading.Event()
        t = threading.Thread(target=self._opener, args=(units, q, halt), name="tilescan-open", daemon=True)
        t.start()
        try:
            while (item := q.get()) is not None:
                job = self._take(item, wanted=True)
                if job is not None:
                    yield job
        finally:
            halt.set()
            late = None  # drained: the opener is never stuck on a full queue, and what it
            while t.is_alive() or not q.empty():  # queued before it ended is removed too
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    break
                try:
                    self._take(item, wanted=False)
                except BaseException as exc:  # noqa: BLE001 - e.g. a model error: the rest is removed first
                    late = late or exc
            t.join()
            if late is not None:
                raise late

    def _take(self, item: tuple, wanted: bool) -> UnitJob | None:
        """One thing the opener handed over: an opened job (returned if ``wanted``, else
        removed: dropped, as its scene was opened and its staging folder made), a result, a
        unit not started, or an error."""
        kind, k, what = item
        if kind == "engine":  # not made for a run that is ending
            if wanted:
                self._engine()
            return None
        if kind == "job":
            self._taken(what)
        if kind == "job" and wanted:
            try:
                engine = self._engine()  # made already: its request came before any job
                what.use(engine, self._since)
            except BaseException as exc:
                what.abort()
                if isinstance(exc, stop.Interrupted):  # a stop while the model loaded: opened, dropped
                    self.dropped.append(what)
                raise
            if not self._warmed:  # the first unit's writers load while it is read (after Keras,
                self._warmed = True  # which can change what the GeoPackage writer needs)
                self._tail.submit(warm_writers, self.cfg)
            with self._lock:
                self.in_flight[k] = what
            if self.bar is not None:
                self.bar.total = (self.bar.total or 0) + what.n_tiles
                self.bar.update(what.n_empty)
            return what
        if kind == "job":
            what.abort()
            self.dropped.append(what)
        elif kind == "result":
            self.on_result(k, what)
        elif kind == "not_started":
            self.not_started.append(what)
        else:
            self.on_result(k, self.fail(*what))
        return None

    # -- reading

    def _chunks(self, units: list) -> Iterator[tuple[UnitJob, list | None, bool]]:
        for job in self._opened(units):
            # lockstep reads a batch at a time; overlap whole bands of block rows, one reader each
            chunks = job.chunks(self.batch_size) if self.lockstep else job.band_chunks(max(self.batch_size, BAND_CHUNK))
            if not chunks:
                yield job, None, True
            for i, c in enumerate(chunks):
                yield job, c, i == len(chunks) - 1

    def _reads(self, units: list) -> Iterator[tuple[UnitJob, bool, Any]]:
        """(job, last chunk of the job?, read result or the exception) in tile order."""
        def read(job, chunk):
            if chunk is None or job.failed is not None:
                return None
            try:
                return job.read(chunk)
            except Exception as exc:  # noqa: BLE001 - the job's own failure
                return exc

        chunks = self._chunks(units)
        try:
            first = next(chunks, None)
            if first is None:
                return
            if self.lockstep:
                for job, chunk, last in chain((first,), chunks):
                    yield job, last, read(job, chunk)
                return
            # one single-thread lane per reader; a band of block rows always goes to the same
            # lane, so no block is decoded by two readers (each has its own GDAL handle)
            n = self.engine.readers(self.cfg.inference.reader_threads)
            lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tilescan-read{i}",
                                        initializer=self._read_procs.bind, initargs=(i,))  # its process, if any
                     for i in range(n)]
            try:
                pending: deque = deque()
                for job, chunk, last in chain((first,), chunks):
                    lane = lanes[job.band(chunk) % n] if chunk else lanes[0]
                    pending.append((job, last, lane.submit(read, job, chunk)))
                    if len(pending) >= max(self.ahead, 2 * n):
                        job, last, fut = pending.popleft()
                        yield job, last, fut.result()
                while pending:
                    job, last, fut = pending.popleft()
                    yield job, last, fut.result()
            finally:
                for lane in lanes:
                    lane.shutdown(wait=True, cancel_futures=True)
        finally:
            chunks.close()  # the opener stops; what it opened but nobody read is removed

    # -- the model step and the writer

    def _step(self, pieces: list, x: np.ndarray) -> None:
        """Hand a batch to the model. Overlap: the batch is started before the one before it
        is collected, so where the device works asynchronously (JAX) it receives this batch
        while it still computes the last one; lockstep: started and collected at once, or,
        with an engine of several streams, once that many are started (:meth:`_depth`)."""
        self._ready()
        if self.lockstep:  # the model alone on the cores: the writer is done with the last batch
            self._writer.wait_idle()
        t = time.monotonic()
        collect = self._model(pieces, lambda: self.engine.submit(x))
        if collect is None:
            return
        self._pending.append((pieces, len(x), collect, t))
        while len(self._pending) > self._depth():
            self._collect()

    def _model(self, pieces: list, call: Callable[[], Any]) -> Any:
        """``call()`` (starting or collecting a batch); on an error other than a
        :class:`ModelError` (which ends the run) every unit of the batch fails: None."""
        try:
            return call()
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch's units' failure
            for job, *_ in pieces:
                self._drop(job, exc)
            return None

    def _depth(self) -> int:
        """How many started batches stay uncollected once a new one has started: lockstep
        collects each at once unless the engine computes several (``streams``) at a time;
        overlap keeps one more started, so the engine has the next batch before it is idle."""
        return self.engine.streams - 1 if self.lockstep else self.engine.streams

    def _collect_all(self) -> None:
        while self._pending:
            self._collect()

    def _collect(self) -> None:
        """The oldest started batch's result to the writer, as rows per unit."""
        pieces, n_x, collect, t = self._pending.popleft()
        res = self._model(pieces, collect)
        if res is None:
            return
        done = time.monotonic()
        dt = done - max(t, self._collected)  # its model time, not counting the batch before's
        self._collected = done
        self.stats.model_s += dt
        self.stats.batches += 1
        self.stats.tiles += n_x
        if self.stats.first_batch is None:
            self.stats.first_batch = done - self.stats.started
            logger.debug(f"first batch done {self.stats.first_batch:.2f} s after the run's start")
        self.stats.last_batch = done - self.stats.started
        faults.point("inference")
        start = 0
        for job, tiles, valid, fractions in pieces:
            n = len(tiles)
            job.timings["compute"] += dt * n / n_x
            job.n_sent += n
            self._writer.put(("rows", job, tiles, valid, fractions, res.rows(start, start + n)))
            start += n
        if self.bar is not None:
            self.bar.update(n_x)

    def _handle(self, item) -> None:
        """On the writer thread: a batch's rows for a job, or a check whether it is done."""
        try:
            self._handle_item(item)
        except BaseException as exc:  # noqa: BLE001 - a run-ending error: raised on the caller's thread
            self._fatal = exc

    def _handle_item(self, item) -> None:
        kind, job = item[0], item[1]
        if kind == "abort":
            job.abort()
            return
        if job.failed is not None:
            return
        if kind == "rows":
            try:
                job.consume(*item[2:])
            except Exception as exc:  # noqa: BLE001 - e.g. the disk filled while writing heat
                self._drop(job, exc, on_writer=True)
                return
        if job.ready_to_finish():
            with self._room:
                self._backlog += 1
            fut = self._finishers.submit(self._finish, job)
            fut.add_done_callback(self._finished_one)
            self._finishing.append(fut)

    def _finish(self, job: UnitJob) -> None:
        try:
            res = job.finish()
        except BaseException as exc:  # noqa: BLE001
            job.abort()
            try:
                res = self.fail(job, exc)
            except BaseException as fatal:  # noqa: BLE001 - the run ends; raised on the caller's thread
                self._fatal = fatal
                return
        self._result(job, res)

    def _result(self, job: UnitJob, res: UnitResult) -> None:
        with self._lock:
            self.in_flight.pop(job.index, None)
        self.on_result(job.index, res)

    def _drop(self, job: UnitJob, exc: BaseException, on_writer: bool = False) -> None:
        """Fail ``job`` now: no more of its tiles are read or used; it is removed once no
        reader can still be reading it (:meth:`_abort_when_idle`)."""
        with job.state:
            if job.failed is not None:
                return
            job.failed = exc
        if not isinstance(exc, stop.Interrupted):
            self._result(job, self.fail(job, exc))
        else:
            self.dropped.append(job)
            with self._lock:
                self.in_flight.pop(job.index, None)
        self._abort_when_idle(job, on_writer)

    def _abort_when_idle(self, job: UnitJob, on_writer: bool = False) -> None:
        """Remove a failed job once its last chunk was read (no reader holds it any more);
        on the writer thread, so no batch of it is being written meanwhile."""
        with job.state:
            if job.failed is None or not job.reads_over or job.abort_queued:
                return
            job.abort_queued = True
        if on_writer:
            job.abort()
        else:
            self._writer.put(("abort", job))

    # -- the run

    def run(self, units: Iterable[tuple[int, Any]]) -> None:
        """Process ``units`` ((index, unit) pairs); returns when every one has a result, was
        dropped by a stop, or was not started."""
        units = list(units)
        batcher = Batcher(self.batch_size, self._step, self._batches)
        self._writer.start()
        reads = self._reads(units)
        try:
            try:
                for job, last, got in reads:
                    if last:
                        with job.state:
                            job.reads_over = True  # no reader touches the job any more
                        self._read_procs.forget(job.reader)
                    stop.check()
                    self._raise_fatal()
                    if job.failed is None and isinstance(got, BaseException):
                        batcher.drop(lambda j: j is not job)
                        self._drop(job, got)
                    if job.failed is not None:
                        self._abort_when_idle(job)
                        continue
                    if got is not None:
                        kept, x, valid, fractions, n_read = got
                        faults.point("reading", n_read)
                        job.n_kept += len(kept)
                        job.skipped += n_read - len(kept)
                        if self.bar is not None and n_read > len(kept):
                            self.bar.update(n_read - len(kept))
                        if last:
                            job.reading_done = True
                        batcher.add(job, kept, x, valid, fractions)
                    elif last:
                        job.reading_done = True
                    if last:
                        self._writer.put(("check", job))
                stop.check()
                batcher.flush()
                self._collect_all()
            except stop.Interrupted as intr:
                self.interrupted = intr
                reads.close()  # readers stopped; opened but unread units are not started
                self._collect_all()  # batches the model has started are finished, not thrown away
                with self._lock:
                    jobs = sorted(self.in_flight.values(), key=lambda j: j.index)
                for job in jobs:  # every tile through the model: finished; the rest dropped
                    if not (job.reading_done and job.n_sent == job.n_kept):
                        with job.state:
                            job.reads_over = True
                        self._drop(job, intr)
                batcher.drop(lambda j: j.failed is None)
        finally:
            reads.close()
            self._ready()  # a run without batches too: its report says when, and no compile outlives it
            self._read_procs.close()
            self._switch.restore()
            self._writer.finish()
            for f in list(self._finishing):
                f.result()
            self._finishers.shutdown()
            self._tail.shutdown()
            for pool in (self._memory, self._batches):
                pool.clear()
            if self._workers is not None:
                self._workers.close()
            with self._lock:
                leftover = list(self.in_flight.values())
            for job in leftover:  # an error ended the run: nothing of these is left behind
                job.abort()
        self._raise_fatal()

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal
