"""Importing Keras (and its backend) once, quietly, only when a command needs the model.

``tilescan --help`` and a rerun with nothing left to do never come here, so they never pay
for TensorFlow's import.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
import threading

from .log import STDERR_LOCK, ReaderGoneSafe


#: True in the ``tilescan`` command's process (:func:`own_process`), False where tilescan is
#: a library inside someone else's program.
_OWN_PROCESS = False


def own_process() -> None:
    """Say that this process is tilescan's own (the ``tilescan`` command, :func:`tilescan.cli.entry`):
    what Keras' import leaves in memory then stays out of the garbage collector's way until
    the process ends (:func:`_keras_import_gc`). Not for a program that uses tilescan as a
    library: it would do the same to that program's objects."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    ascii_case_ctype()


def _dotted_i(locale_name: str) -> bool:
    """Whether a locale's language pairs 'i' with a dotted capital 'İ' (Turkish, Azerbaijani)."""
    return locale_name.split("_")[0].split(".")[0].lower() in ("tr", "az")


def ascii_case_ctype() -> None:
    """Under a Turkish or Azerbaijani locale the C library upper-cases 'i' to 'İ', and GDAL,
    which compares option names without case that way, finds none of its own (dozens of
    "ERROR 1" lines, creation options ignored): this process's character classes become
    C.UTF-8's (Python's own text handling does not use them)."""
    import locale

    # a UTF-8 one only: another's encoding (ISO-8859-9) is what Python decodes text files by
    if _dotted_i(locale.setlocale(locale.LC_CTYPE)) and locale.nl_langinfo(locale.CODESET).upper() in ("UTF-8", "UTF8"):
        for name in ("C.UTF-8", "C"):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                return
            except locale.Error:
                continue


def ascii_case_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process, its character classes C.UTF-8's where they would be a
    Turkish or Azerbaijani locale's (:func:`ascii_case_ctype`)."""
    ctype = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or ""
    if _dotted_i(ctype) and ctype.upper().replace("-", "").endswith("UTF8"):
        if "LC_ALL" in env:  # it would win over LC_CTYPE: the other categories get its value by LANG
            env["LANG"] = env.pop("LC_ALL")
        env["LC_CTYPE"] = "C.UTF-8"
    return env


# Keras imports these when they are installed, for features tilescan never calls (its scikit-learn
# wrappers, its image-gallery plots); in tilescan's own process they stay out of the start-up.
_KERAS_OPTIONAL = ("sklearn", "matplotlib.pyplot")


@contextlib.contextmanager
def callers_draws():
    """Python's ``random`` and numpy's global generator as the caller left them, afterwards:
    importing TensorFlow and loading a Keras model draw from them, and training seeds them, so
    a caller's seeded draws would otherwise depend on whether tilescan ran before."""
    import random

    import numpy as np

    draws = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(draws[0])
        np.random.set_state(draws[1])


@contextlib.contextmanager
def _keras_optional_hidden():
    """While Keras is imported in tilescan's own process (:func:`own_process`): the modules of
    ``_KERAS_OPTIONAL`` not yet imported look absent to it, as if not installed (Keras then
    leaves those features off); they import normally afterwards (``tilescan train`` plots with
    pyplot). A library user's process imports Keras untouched."""
    hidden = [n for n in _KERAS_OPTIONAL if _OWN_PROCESS and n not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # an import of it raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextlib.contextmanager
def _keras_import_gc():
    """The cyclic garbage collector paused while Keras and its backend are imported: the
    import creates objects by the million that all stay, so the full collections it would
    trigger meanwhile walk them all and find nothing. The collector is left on or off as it
    was. In tilescan's own process (:func:`own_process`) the objects alive after the import
    are then frozen (``gc.freeze``): later full collections, and the one at the process's
    exit, no longer walk them (benchmarks/README.md, "Start-up and exit")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if _OWN_PROCESS:
            gc.freeze()
    finally:
        if enabled:
            gc.enable()


def import_keras(verbosity: int | None = None):
    """Import Keras with TensorFlow unless ``KERAS_BACKEND`` says otherwise; with
    ``verbosity <= 0``, or None (the Python API) unless ``TF_CPP_MIN_LOG_LEVEL`` is set to 0,
    the C++ start-up chatter that TensorFlow writes straight to file descriptor 2 stays off
    the terminal (``TF_CPP_MIN_LOG_LEVEL=2`` where unset), and its Python-side warnings
    (retracing notes) are lowered to errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity is not None and verbosity > 0 else "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if _OWN_PROCESS and os.environ["KERAS_BACKEND"] == "jax":
        # JAX reserves 75 % of a GPU's memory at its first transfer, seconds of start-up on a
        # large GPU (benchmarks/README.md); a run needs far less. The user's own setting stays.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "keras" in sys.modules:
        import keras

        _compilation_cache(keras)
        return keras
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
    with _keras_import_gc(), _keras_optional_hidden(), callers_draws():
        if "tensorflow" not in sys.modules:
            tensorflow_threads()
            tensorflow_onednn()
        if not quiet:
            import keras
        else:
            with STDERR_LOCK, _without_tensorflow_chatter():
                import keras
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.get_logger().setLevel("ERROR")
        _compilation_cache(keras)
    return keras


#: The lines TensorFlow's C++ side writes to file descriptor 2 as it starts: absl's note,
#: glog-style records (``I0000 00:00:… file.cc:N] …``) and the CPU-feature note's second line.
_TF_CHATTER = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ "
                         r"\S+:\d+\]|To enable the following instructions: .*rebuild TensorFlow")


@contextlib.contextmanager
def _without_tensorflow_chatter():
    """File descriptor 2 into a scratch file while the block runs; then what was written there
    goes on to the real stderr, but TensorFlow's start-up lines (:data:`_TF_CHATTER`). Other
    threads' messages meanwhile (a library user's log handler, which takes no lock of
    tilescan's) are delayed, not lost."""
    import tempfile

    _flush_stderr()
    saved = os.dup(2)
    scratch = tempfile.TemporaryFile()
    try:
        os.dup2(scratch.fileno(), 2)
        yield
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        os.close(saved)
        scratch.seek(0)
        lines = scratch.read().decode("utf-8", "replace").splitlines(keepends=True)
        scratch.close()
        kept = "".join(line for line in lines if not _TF_CHATTER.match(line))
        if kept:
            _flush_stderr(kept)


def _flush_stderr(text: str = "") -> None:
    """``text`` onto stderr, and what it holds out; where its reader is gone (a closed pipe), onto /dev/null."""
    stream = ReaderGoneSafe(sys.stderr)
    stream.write(text)
    stream.flush()


_loading = threading.local()  # set on the thread that loads a model under loading_without_compiles
_patch_lock = threading.Lock()  # one such load at a time patches Keras' JAX variable class


@contextlib.contextmanager
def loading_without_compiles(keras):
    """While a saved model loads with JAX as the backend: its variables start as zeros made on
    the host and take the file's arrays there, instead of the layers' random initialisers and
    ``jnp.asarray``, each of which JAX compiles once per shape (dozens of small compiles before
    the first batch, benchmarks/README.md "Start-up"); once loaded, the values move to the
    device in one ``jax.device_put`` of them all rather than one transfer per variable. The
    saved values replace the initial ones either way. Only the loading thread is affected; anything
    else (another backend, a distributed layout, a dtype numpy lacks, a narrowing cast)
    takes Keras' own path, as does everything when this Keras has no such JAX variable class."""
    if keras.backend.backend() != "jax":
        yield
        return
    try:
        import jax
        import numpy as np
        from keras.src.backend.jax.core import JaxVariable

        init, convert = JaxVariable._initialize_with_initializer, JaxVariable._convert_to_tensor
    except (ImportError, AttributeError):
        yield
        return

    def numpy_dtype(dtype):  # a Keras dtype name as numpy's; None where numpy has none
        try:
            return None if dtype is None else np.dtype(str(dtype))
        except TypeError:
            return None

    def host_zeros(self, initializer):
        dtype = numpy_dtype(self._dtype)
        if getattr(_loading, "on", False) and dtype is not None:
            self._initialize_layout()  # as Keras' own path does first; a distributed layout stays with it
            if self._layout is None:
                _loading.held.append(self)
                return self._initialize(np.zeros(self._shape, dtype))
        return init(self, initializer)

    def host_array(self, value, dtype=None):
        want = numpy_dtype(dtype)
        if getattr(_loading, "on", False) and want is not None and hasattr(value, "__array__") \
                and not isinstance(value, jax.Array):
            value = np.asarray(value)
            if np.can_cast(value.dtype, want, "safe"):  # exact, e.g. float16 weights to float32
                _loading.held.append(self)
                return value.astype(want, copy=True)  # its own copy: the file's buffer may be reused
        return convert(self, value, dtype)

    with _patch_lock:
        JaxVariable._initialize_with_initializer, JaxVariable._convert_to_tensor = host_zeros, host_array
        _loading.on, _loading.held = True, []
        try:
            yield
        finally:
            _loading.on = False
            JaxVariable._initialize_with_initializer, JaxVariable._convert_to_tensor = init, convert
            held, _loading.held = _loading.held, []
        # the model loaded: every value still on the host moves to the device in one call
        moving = list({id(v): v for v in held if isinstance(v._value, np.ndarray)}.values())
        for var, value in zip(moving, jax.device_put([v._value for v in moving])):
            var._direct_assign(value)


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


# ----------------------------------------------------------------------------- CPU cores


def usable_cores() -> int:
    """The cores this process may keep busy: those it may run on (its affinity: ``taskset``,
    a Slurm or cgroup cpuset), fewer where its cgroup's CPU quota allows less (a container's
    CPU limit, e.g. Kubernetes' ``limits.cpu``; a fraction rounds up)."""
    return cpu_budget()["cores"]


def cpu_budget(proc: str = "/proc/self") -> dict:
    """``cores`` (see :func:`usable_cores`), ``affinity`` (how many cores the process may
    run on) and ``quota`` (the CPUs its cgroup quota allows, None when unlimited or unknown)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    cores = affinity if quota is None else max(1, min(affinity, math.ceil(quota - 1e-9)))
    return {"cores": cores, "affinity": affinity, "quota": quota}


def cgroup_cpu_quota(proc: str = "/proc/self") -> float | None:
    """The CPUs this process's cgroup (or one above it) may use per period, as
    ``cpu.max`` (cgroup v2) or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1) set it;
    None when no quota is set or the files cannot be read. ``proc``: where the process's
    ``cgroup`` and ``mountinfo`` files are."""
    try:
        with open(os.path.join(proc, "cgroup")) as fh:
            memberships = [line.rstrip("\n").split(":", 2) for line in fh if line.count(":") >= 2]
        with open(os.path.join(proc, "mountinfo")) as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    limits = []
    for fields in mounts:
        if "-" not in fields:
            continue
        root, mount_point = fields[3], fields[4]
        i = fields.index("-")
        fstype, options = fields[i + 1], fields[i + 3].split(",") if len(fields) > i + 3 else []
        if fstype == "cgroup2":
            member = next((m[2] for m in memberships if m[0] == "0" and m[1] == ""), None)
        elif fstype == "cgroup" and "cpu" in options:
            member = next((m[2] for m in memberships if "cpu" in m[1].split(",")), None)
        else:
            continue
        if member is None:
            continue
        limits += _quotas_up(mount_point, root, member, fstype == "cgroup2")
    return min(limits) if limits else None


def _quotas_up(mount_point: str, root: str, member: str, v2: bool) -> list[float]:
    """The CPU quotas set on the process's cgroup folder under ``mount_point`` and on each
    folder above it up to the mount point (a container sees its own cgroup as the root)."""
    rel = os.path.relpath(member, root) if member.startswith(root) else "."
    folder = os.path.normpath(os.path.join(mount_point, rel))
    if not os.path.isdir(folder):
        folder = mount_point
    found = []
    while True:
        q = _read_quota(folder, v2)
        if q is not None:
            found.append(q)
        if os.path.normpath(folder) == os.path.normpath(mount_point):
            return found
        folder = os.path.dirname(folder)


def _read_quota(folder: str, v2: bool) -> float | None:
    """The quota in CPUs set in one cgroup folder, or None (unlimited, or no such file)."""
    try:
        if v2:
            with open(os.path.join(folder, "cpu.max")) as fh:
                quota, period = (fh.read().split() + ["100000"])[:2]
            if quota == "max":
                return None
        else:
            with open(os.path.join(folder, "cpu.cfs_quota_us")) as fh:
                quota = fh.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us")) as fh:
                period = fh.read().strip()
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def tensorflow_threads() -> None:
    """Size TensorFlow's compute thread pool by :func:`usable_cores` where a cgroup quota
    allows fewer cores than the process may run on: TensorFlow counts only the latter, and
    its threads then wait on the quota (benchmarks/README.md). A ``TF_NUM_INTRAOP_THREADS``
    the user set wins. Call before TensorFlow starts."""
    budget = cpu_budget()
    if budget["cores"] < budget["affinity"]:
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(budget["cores"]))


def tensorflow_onednn() -> None:
    """Turn on TensorFlow's oneDNN kernels, which it turns on by itself only on CPUs with
    AVX-512 VNNI/BF16 or AMX: without them (Eigen's kernels, e.g. on AVX2-only CPUs) a
    convolution's result for a tile changed in its last bits with the tile's place in the
    batch, so the same tile batched with other scenes' tiles (one stream over several
    scenes, shards, a resumed run) got other floats; oneDNN's are the same there, and
    faster (benchmarks/README.md). A ``TF_ENABLE_ONEDNN_OPTS`` the user set wins. Call
    before TensorFlow starts."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def tensorflow_onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN's kernels (None: not TensorFlow, or it
    cannot say)."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    with STDERR_LOCK, _without_tensorflow_chatter():  # asking logs "oneDNN custom operations are on"
        return bool(_pywrap_util_port.IsMklEnabled())


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
    import shutil
    import subprocess

    if _gpus_hidden():
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
    return gpu_device_files()


def _gpus_hidden() -> bool:
    """``CUDA_VISIBLE_DEVICES`` hides every GPU on purpose ("", "-1")."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1", "NoDevFiles")


def gpu_device_files() -> list[str]:
    """The NVIDIA GPUs' device files (``/dev/nvidiaN``), none when :func:`_gpus_hidden`: a
    look at the machine without running anything (:func:`host_gpus` asks ``nvidia-smi`` first)."""
    import glob

    if _gpus_hidden():
        return []
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
    ``gpu_visible`` (what the machine shows), ``warning`` (a string when a GPU is there
    but unused, else None), and ``cpu``: :func:`cpu_budget`, the compute threads
    TensorFlow was told to use (``TF_NUM_INTRAOP_THREADS``; None: its own choice, one per
    core it may run on) and whether it runs oneDNN's kernels (:func:`tensorflow_onednn`).
    Imports Keras when ``keras`` is not given."""
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
        "cpu": {**cpu_budget(), "tf_intra_op_threads": _env_int("TF_NUM_INTRAOP_THREADS"),
                "onednn": tensorflow_onednn_enabled() if backend == "tensorflow" else None},
    }


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None
