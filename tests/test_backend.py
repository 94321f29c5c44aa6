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
    pytest.importorskip("jax")
    code = ("import json, os, jax; from tilescan.backend import import_keras; import_keras(); "
            "print(json.dumps([jax.config.jax_compilation_cache_dir, "
            "jax.config.jax_persistent_cache_min_compile_time_secs]))")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TILESCAN_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [str(tmp_path / "cache"), 0.0]
