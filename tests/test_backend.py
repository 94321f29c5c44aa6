"""tilescan/backend.py: which Keras backend and device a run computes on, and the warning
when the machine has a GPU that the backend cannot use."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import need_jax
from tilescan.backend import describe_device, device_warning, host_gpus


def _machine_has_gpu() -> bool:
    """An independent look at this machine: an NVIDIA driver tool or device file."""
    return bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*"))


# ----------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_no_warning_when_the_backend_uses_a_gpu(backend):
    assert device_warning(backend, ["gpu:0 NVIDIA H200"], gpu_visible=True) is None


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_no_warning_on_a_machine_without_gpu(backend):
    assert device_warning(backend, [], gpu_visible=False) is None


def test_unused_gpu_with_tensorflow_cpu_says_what_to_install():
    msg = device_warning("tensorflow", [], gpu_visible=True)
    assert msg.startswith("warning:")  # the CLI and tilescan.log route it as a warning
    assert "runs on the CPU" in msg and "tensorflow-cpu" in msg
    assert 'pip install "tilescan[gpu]"' in msg and "KERAS_BACKEND=jax" in msg


def test_unused_gpu_with_jax_names_the_cuda_extra_not_the_backend_switch():
    msg = device_warning("jax", [], gpu_visible=True)
    assert 'pip install "tilescan[gpu]"' in msg and "jax[cuda12]" in msg
    assert "KERAS_BACKEND" not in msg  # already on JAX: only the install is missing


def test_unused_gpu_with_torch():
    msg = device_warning("torch", [], gpu_visible=True)
    assert "PyTorch" in msg and 'pip install "tilescan[gpu]"' in msg


# ----------------------------------------------------------------------------- this machine


def test_cuda_visible_devices_empty_hides_every_gpu(monkeypatch):
    # a user (or scheduler) who hides the GPUs asked for the CPU: no GPU to warn about
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert host_gpus() == []


def test_host_gpus_matches_the_machine():
    assert bool(host_gpus()) == _machine_has_gpu()


def test_describe_device_on_this_machine():
    import keras

    d = describe_device()
    assert d["backend"] == keras.backend.backend() == "tensorflow"  # tilescan's default backend
    assert json.loads(json.dumps(d)) == d  # goes into run.json as it is
    if not _machine_has_gpu():
        assert d["device"] == "cpu" and d["accelerators"] == [] and d["gpu_visible"] is False
        assert d["warning"] is None
    elif not d["accelerators"]:  # a GPU machine with tensorflow-cpu: the case the warning is for
        assert d["device"] == "cpu" and 'pip install "tilescan[gpu]"' in d["warning"]


@pytest.mark.gpu
def test_jax_backend_computes_on_the_gpu():
    if not _machine_has_gpu():
        pytest.skip("no GPU on this machine")
    pytest.importorskip("jax")
    code = "import json; from tilescan.backend import describe_device; print(json.dumps(describe_device()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KERAS_BACKEND": "jax"})
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert d["backend"] == "jax" and d["device"] != "cpu" and d["warning"] is None, d


def test_compilation_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from tilescan.backend import compilation_cache_dir

    monkeypatch.delenv("TILESCAN_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / "tilescan" / "jax")
    monkeypatch.setenv("TILESCAN_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compilation_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("TILESCAN_COMPILE_CACHE", "off")
    assert compilation_cache_dir() is None


def test_jax_caches_every_compiled_step(tmp_path):
    """With JAX, a second process finds the model step in the persistent cache: JAX keeps
    only compiles over 1 s by default, which a small model's step on a CPU is not."""
    need_jax()
    code = ("import json, os, jax; from tilescan.backend import import_keras; import_keras(); "
            "print(json.dumps([jax.config.jax_compilation_cache_dir, "
            "jax.config.jax_persistent_cache_min_compile_time_secs]))")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TILESCAN_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [str(tmp_path / "cache"), 0.0]


# ----------------------------------------------------------------------------- CPU cores


def _fake_proc(tmp_path, cgroup: str, mounts: list[str]):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(f"{i} 1 0:{i} {m}\n" for i, m in enumerate(mounts, 30)))
    return str(proc)


def test_cgroup_v2_quota_of_the_process_and_the_folders_above(tmp_path):
    """A container's CPU limit (cgroup v2 ``cpu.max``), set on its own cgroup or a parent:
    the smallest counts; ``max`` is no limit."""
    from tilescan.backend import cgroup_cpu_quota

    root = tmp_path / "cg"
    pod = root / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (pod / "cpu.max").write_text("150000 100000\n")
    proc = _fake_proc(tmp_path, "0::/kubepods/pod1\n", [f"/ {root} rw,nosuid - cgroup2 cgroup2 rw"])
    assert cgroup_cpu_quota(proc) == 1.5
    (pod / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) == 4.0
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) is None


def test_cgroup_v1_quota_in_a_container_namespace(tmp_path):
    """cgroup v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), as a container sees it: its
    cgroup is the mount's root; ``-1`` is no limit; other controllers are not read."""
    from tilescan.backend import cgroup_cpu_quota

    cpu, mem = tmp_path / "cpu", tmp_path / "memory"
    cpu.mkdir()
    mem.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (mem / "cpu.cfs_quota_us").write_text("50000\n")  # not the cpu controller: ignored
    (mem / "cpu.cfs_period_us").write_text("100000\n")
    proc = _fake_proc(tmp_path, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
                      [f"/docker/abc {cpu} rw - cgroup cgroup rw,cpu,cpuacct",
                       f"/docker/abc {mem} rw - cgroup cgroup rw,memory"])
    assert cgroup_cpu_quota(proc) == 2.0
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(proc) is None


def test_no_quota_when_the_files_are_missing(tmp_path):
    from tilescan.backend import cgroup_cpu_quota

    assert cgroup_cpu_quota(str(tmp_path / "nowhere")) is None
    assert cgroup_cpu_quota(_fake_proc(tmp_path, "0::/a\n", [f"/ {tmp_path / 'gone'} rw - cgroup2 cgroup2 rw"])) is None


def test_usable_cores_take_the_smaller_of_affinity_and_quota(monkeypatch):
    import tilescan.backend as backend

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda proc="/proc/self": 1.5)
    assert backend.cpu_budget() == {"cores": 2, "affinity": 16, "quota": 1.5}  # a fraction rounds up
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda proc="/proc/self": 0.25)
    assert backend.usable_cores() == 1
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda proc="/proc/self": 64.0)
    assert backend.usable_cores() == 16
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda proc="/proc/self": None)
    assert backend.usable_cores() == 16


def _cpu_limited_cgroup(tmp_name: str):
    """A real cgroup with a quota of one CPU (v1 ``cpu`` controller or v2), or a skip."""
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.isfile(os.path.join(v1, "cpu.cfs_quota_us")):
        folder = os.path.join(v1, tmp_name)
        files = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
    elif os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
        folder = os.path.join("/sys/fs/cgroup", tmp_name)
        files = {"cpu.max": "100000 100000"}
    else:
        pytest.skip("no cgroup CPU controller mounted at /sys/fs/cgroup")
    try:
        os.mkdir(folder)
        for name, value in files.items():
            with open(os.path.join(folder, name), "w") as fh:
                fh.write(value)
    except OSError as exc:
        if os.path.isdir(folder):
            os.rmdir(folder)
        pytest.skip(f"cannot make a CPU-limited cgroup here: {exc}")
    return folder


def test_a_cpu_limited_cgroup_sizes_the_run(tmp_path):
    """In a real cgroup with a one-CPU quota (a container with ``limits.cpu: 1``) on a
    machine of two cores or more: ``tilescan info --runtime`` counts one usable core, runs
    one model step at a time and gives TensorFlow one compute thread."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine of two cores or more")
    folder = _cpu_limited_cgroup(f"tilescan-test-{os.getpid()}")
    try:
        env = {k: v for k, v in os.environ.items() if k != "TF_NUM_INTRAOP_THREADS"}
        code = ("import os, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()));"
                "from tilescan.cli import main; main(['info', '--runtime'])")
        p = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, timeout=300,
                           env=env)
        assert p.returncode == 0, p.stderr
        rt = json.loads(p.stdout)["runtime"]
        assert rt["cpu"] == {"cores": 1, "affinity": len(os.sched_getaffinity(0)), "quota": 1.0,
                             "tf_intra_op_threads": 1, "onednn": True}
        if rt["device"] == "cpu":
            assert rt["model_streams"]["used"] == 1
    finally:
        os.rmdir(folder)  # the process has left it


@pytest.mark.parametrize("user", [None, "0"])
def test_tensorflow_runs_onednn_unless_the_user_says_otherwise(user):
    """``tilescan info --runtime`` in a fresh process: TensorFlow runs oneDNN's kernels
    (they keep a tile's result the same wherever it sits in its batch), on any x86 CPU;
    a ``TF_ENABLE_ONEDNN_OPTS`` the user set wins, and run.json says which."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user
    p = subprocess.run([sys.executable, "-m", "tilescan", "info", "--runtime"], capture_output=True, text=True,
                       timeout=300, env={**env, "KERAS_BACKEND": "tensorflow"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["runtime"]["cpu"]["onednn"] is (user is None)


# ----------------------------------------------------------------------------- Keras' import and the collector

_IMPORT_GC = """
import gc, json, sys
from tilescan import backend
if sys.argv[1] == "off":
    gc.disable()
if sys.argv[1] == "own":
    backend.own_process()
collections = []
gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None)
backend.import_keras(verbosity=0)
print(json.dumps({"collections": collections, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""


@pytest.mark.parametrize("mode", ["library", "off", "own"])
def test_keras_import_runs_no_collection_and_leaves_the_collector_as_it_was(mode):
    """Keras' import creates objects by the million that all stay: no full garbage collection
    runs meanwhile (before, several walked them all for nothing). The collector is on or off
    afterwards as it was; only in tilescan's own process is anything frozen, and there not
    even a young collection walks the import's objects."""
    p = subprocess.run([sys.executable, "-c", _IMPORT_GC, mode], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert 2 not in got["collections"]
    assert got["enabled"] is (mode != "off")
    if mode == "own":
        assert got["collections"] == []
        assert got["frozen"] > 100_000  # Keras and its backend, out of every later collection's way
    else:
        assert got["frozen"] == 0  # a program using tilescan as a library keeps its collector as it was


def test_the_tilescan_command_owns_its_process():
    """The console script and ``python -m tilescan`` go through ``tilescan.cli.entry``, which
    freezes what Keras' import left (so the exit does not walk it); ``main`` alone, as
    click's test runner and a program calling it use it, does not."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tilescan"]
    assert script.value == "tilescan.cli:entry"
    at_exit = "import atexit, gc, runpy, sys; atexit.register(lambda: print('FROZEN', gc.get_freeze_count()));"
    runs = {"python -m tilescan": "sys.argv[1:] = ['info', '--runtime']; runpy.run_module('tilescan', run_name='__main__')",
            "python -m tilescan.cli": "sys.argv[1:] = ['info', '--runtime']; runpy.run_module('tilescan.cli', run_name='__main__')",
            "main()": "from tilescan.cli import main; main(['info', '--runtime'])"}
    for how, code in runs.items():
        p = subprocess.run([sys.executable, "-c", at_exit + code], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (how, p.stderr)
        info, _, frozen = p.stdout.rpartition("FROZEN")
        assert json.loads(info)["runtime"]["backend"]
        assert (int(frozen) > 100_000) is (how != "main()"), (how, frozen)


_OPTIONAL = """
import json, sys
from tilescan import backend
if sys.argv[1] == "own":
    backend.own_process()
keras = backend.import_keras(verbosity=0)
during = "matplotlib.pyplot" in sys.modules
import matplotlib.pyplot  # noqa: E402  (tilescan train plots with it later in the same process)
from keras.src.visualization import plot_image_gallery  # noqa: E402
print(json.dumps({"during": during, "keras_sees_pyplot": plot_image_gallery.plt is not None}))
"""


@pytest.mark.parametrize("mode", ["own", "library"])
def test_tilescans_own_process_imports_keras_without_its_unused_extras(mode):
    """Keras imports pyplot (and scikit-learn) when installed, for features tilescan never
    calls: in tilescan's own process they stay out of its start-up, and import normally
    afterwards; a program using tilescan as a library gets Keras untouched."""
    p = subprocess.run([sys.executable, "-c", _OPTIONAL, mode], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"during": mode == "library", "keras_sees_pyplot": mode == "library"}


_PREALLOCATE = """
import os, sys
from tilescan import backend
if sys.argv[1] == "own":
    backend.own_process()
backend.import_keras(verbosity=0)
import jax
jax.devices()
print(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "unset"))
"""


@pytest.mark.parametrize("mode, user, want", [("own", None, "false"), ("own", "true", "true"),
                                              ("library", None, "unset")])
def test_the_tilescan_command_lets_jax_take_gpu_memory_as_needed(mode, user, want):
    """JAX reserves most of a GPU's memory at its first transfer, seconds of every run's
    start-up on a large GPU: the tilescan command asks it to allocate as needed instead,
    unless the user said otherwise; a program using tilescan as a library decides itself."""
    need_jax()
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    if user is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user
    p = subprocess.run([sys.executable, "-c", _PREALLOCATE, mode], capture_output=True, text=True, timeout=300,
                       env={**env, "KERAS_BACKEND": "jax"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == want


def test_a_model_loaded_with_jax_has_every_variable_on_the_device(tmp_path):
    """With JAX, the model's values are read on the host and moved to the device in one
    transfer: afterwards every variable holds a device array (none left as a host array that
    each step would copy again), with the file's values."""
    need_jax()
    code = ("import json, numpy as np, jax; from tilescan.backend import import_keras; import_keras(0); "
            "from tilescan.model import load_model; m = load_model().model; "
            "vals = [v._value for v in m.variables]; "
            "print(json.dumps([len(vals), sum(isinstance(v, jax.Array) for v in vals), "
            "float(sum(np.abs(np.asarray(v)).sum() for v in vals))]))")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TILESCAN_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    n, on_device, total = json.loads(p.stdout.strip().splitlines()[-1])
    from tilescan.model import load_model

    keras_model = load_model().model  # this process's backend (TensorFlow in the suite)
    assert n == len(keras_model.variables) and on_device == n
    assert total == pytest.approx(float(sum(abs(v.numpy()).sum() for v in keras_model.variables)), rel=1e-6)
