"""Importing Keras (and its backend) once, quietly, only when a command needs the model.

``tilescan --help`` and a rerun with nothing left to do never come here, so they never pay
for TensorFlow's import.
"""

from __future__ import annotations

import os
import sys

from .log import STDERR_LOCK


def import_keras(verbosity: int | None = None):
    """Import Keras with TensorFlow unless ``KERAS_BACKEND`` says otherwise; with
    ``verbosity <= 0`` (or ``TF_CPP_MIN_LOG_LEVEL`` >= 1 when ``verbosity`` is None) the
    C++ start-up chatter that TensorFlow writes straight to file descriptor 2 stays off the
    terminal, and its Python-side warnings (retracing notes) are lowered to errors."""
    if verbosity is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if verbosity <= 0 else "0")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
    if not quiet or "keras" in sys.modules:
        import keras

        _compilation_cache(keras)
        return keras
    with STDERR_LOCK:  # no other thread's message goes to /dev/null meanwhile
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import keras
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    _compilation_cache(keras)
    return keras


def compilation_cache_dir() -> str | None:
    """Where compiled model steps persist between processes (JAX's compilation cache):
    ``TILESCAN_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/tilescan/jax`` (``~/.cache/...``);
    None when that variable is ``off``."""
    where = os.environ.get("TILESCAN_COMPILE_CACHE")
    if where is not None:
        return None if where.lower() in ("", "0", "off", "no") else where
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tilescan", "jax")


def _compilation_cache(keras) -> None:
    """Turn on JAX's persistent compilation cache, so a later process skips the XLA compile
    of the same step (TensorFlow's traced functions have no such cache)."""
    if keras.backend.backend() != "jax":
        return
    where = compilation_cache_dir()
    if where is None:
        return
    import jax

    try:
        os.makedirs(where, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        # every step, however short its compile: JAX keeps only those over 1 s by default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except (OSError, AttributeError):  # a read-only home, or a JAX without the option: compile each time
        pass


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


# ----------------------------------------------------------------------------- devices

_CPU_ONLY_REASON = {
    "tensorflow": "this TensorFlow sees no GPU (tilescan installs the CPU-only tensorflow-cpu by default)",
    "jax": "this JAX sees no GPU (installed without jax[cuda12], or its CUDA plugin found no usable driver)",
    "torch": "this PyTorch sees no GPU (a build without CUDA, or no usable driver)",
}


def host_gpus(timeout: float = 10.0) -> list[str]:
    """NVIDIA GPUs this machine shows, whatever Python packages are installed: the
    ``nvidia-smi -L`` lines, else one entry per ``/dev/nvidiaN`` device file. Empty when
    ``CUDA_VISIBLE_DEVICES`` hides every GPU on purpose ("" or "-1")."""
    import glob
    import shutil
    import subprocess

    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1", "NoDevFiles"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            p = None
        if p is not None and p.returncode == 0:
            gpus = [line.strip() for line in p.stdout.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
    return sorted(d for d in glob.glob("/dev/nvidia[0-9]*") if d[len("/dev/nvidia"):].isdigit())


def backend_accelerators(keras) -> list[str]:
    """The GPUs (or other accelerators) the active Keras backend computes on, e.g.
    ``["gpu:0 NVIDIA H200"]``; empty when it runs on the CPU. Asks only the active backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        found = []
        for i, dev in enumerate(tf.config.list_physical_devices("GPU")):
            try:
                name = tf.config.experimental.get_device_details(dev).get("device_name", "")
            except (ValueError, RuntimeError):
                name = ""
            found.append(f"gpu:{i} {name}".strip())
        return found
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                for d in jax.devices() if d.platform != "cpu"]
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return []
        return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return []


def device_warning(backend: str, backend_gpus: list[str], gpu_visible: bool) -> str | None:
    """The warning to give when the machine has a GPU but the Keras backend computes on the
    CPU (None when the backend uses a GPU, or when there is none to use)."""
    if backend_gpus or not gpu_visible:
        return None
    reason = _CPU_ONLY_REASON.get(backend, f"Keras' {backend} backend sees no GPU")
    also = "" if backend == "jax" else " and set KERAS_BACKEND=jax"
    return (f"warning: this machine has a GPU but Keras' {backend} backend cannot use it: {reason}; "
            f'tilescan runs on the CPU. To use the GPU: pip install "tilescan[gpu]"{also} '
            '(README.md, "Running on a GPU").')


def describe_device(keras=None) -> dict:
    """Which Keras backend and device tilescan computes on: ``backend``, ``device`` ("cpu" or
    the first accelerator), ``accelerators`` (all the backend uses), ``host_gpus`` and
    ``gpu_visible`` (what the machine shows), and ``warning`` (a string when a GPU is there
    but unused, else None). Imports Keras when ``keras`` is not given."""
    if keras is None:
        keras = import_keras()
    backend = keras.backend.backend()
    accelerators = backend_accelerators(keras)
    host = host_gpus()
    return {
        "backend": backend,
        "keras": keras.__version__,
        "device": accelerators[0] if accelerators else "cpu",
        "accelerators": accelerators,
        "host_gpus": host,
        "gpu_visible": bool(host),
        "warning": device_warning(backend, accelerators, bool(host)),
    }
