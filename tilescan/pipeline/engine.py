"""The model step: the model and its CAM method compiled once, one call per batch.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from ..backend import cpu_has_bf16, usable_cores
from ..config import Config, resolve_target
from ..errors import ConfigError
from ..explain.shims import model_on_accelerator


# ----------------------------------------------------------------------------- engine


def resolve_pipeline(pipeline: str, backend: str) -> str:
    """``[inference] pipeline`` -> "lockstep" or "overlap" (``auto``: lockstep on the CPU)."""
    if pipeline != "auto":
        return pipeline
    return "overlap" if model_on_accelerator(backend) else "lockstep"


def resolve_precision(precision: str, backend: str) -> str:
    """``[inference] precision`` -> "float32" or "bf16". ``auto`` picks bf16 only where it
    was measured faster within tolerance (benchmarks/README.md): TensorFlow on a CPU with
    AVX512_BF16/AMX and no GPU. JAX/torch and GPUs were not measured, so they stay float32."""
    if precision != "auto":
        return precision
    if backend != "tensorflow" or not cpu_has_bf16():
        return "float32"
    return "float32" if model_on_accelerator(backend) else "bf16"


def resolve_readers(readers: str, backend: str) -> int:
    """``[inference] reader_threads`` -> reader threads with the overlap pipeline. ``auto``:
    one per usable core when the model runs on an accelerator (the cores are the host's to
    read with), 1 when it runs on the CPU (readers there take the model's cores)."""
    if readers != "auto":
        return int(readers)
    return usable_cores() if model_on_accelerator(backend) else 1


#: ``switch_interval_ms = "auto"`` with the model on an accelerator: the model's thread gets the
#: GIL back after each device call in about this long (benchmarks/README.md, gil_wait.py)
ACCELERATOR_SWITCH_MS = 0.5


def resolve_switch_interval(setting: str, on_accelerator: bool) -> float | None:
    """``[inference] switch_interval_ms`` -> the interval in ms, or None to leave Python's own
    (``auto`` with the model on the CPU, where its steps hold no GIL to wait for)."""
    if setting != "auto":
        return float(setting)
    return ACCELERATOR_SWITCH_MS if on_accelerator else None


def switch_ms_used(ms: float | None) -> float:
    """The interval (ms) a run streams at, as reported: ``ms`` as resolved, or Python's own
    where the run leaves it (None)."""
    return ms if ms is not None else round(1e3 * sys.getswitchinterval(), 3)


def resolve_streams(streams: str, backend: str) -> int:
    """``[inference] model_streams`` -> how many model + CAM steps run at once. ``auto``: 2
    for TensorFlow on a CPU of two cores or more that this process may use (one step leaves
    cores idle at its sync points, and a second fills them; on one core it only adds
    switching: measured in benchmarks/README.md), 1 on accelerators (their steps are
    asynchronous already) and for the backends not measured."""
    if streams != "auto":
        return int(streams)
    on_cpu = backend == "tensorflow" and not model_on_accelerator(backend)
    return 2 if on_cpu and usable_cores() >= 2 else 1


def with_precision(model, precision: str):
    """``model`` itself for float32; for bf16 a clone whose layers compute in bfloat16
    (``mixed_bfloat16``: float32 weights, bf16 activations) except the input normalisation
    and the ``logits``/``predictions`` head, which stay float32, with the same weights."""
    if precision == "float32":
        return model
    import keras

    keep = {"normalize", "logits", "predictions"}

    def clone(layer):
        config = layer.get_config()
        if layer.name not in keep and "dtype" in config and type(layer).__name__ != "InputLayer":
            config["dtype"] = "mixed_bfloat16"
        return type(layer).from_config(config)

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(model.get_weights())
    return out


class Engine:
    """The model + CAM step, loaded once per invocation."""

    def __init__(self, cfg: Config, model_path: str | None = None):
        from .. import stop
        from ..backend import import_keras

        keras = import_keras()
        stop.check()  # a stop asked while Keras loaded (seconds): before the model, not after its compile
        from ..explain.cam import get_cam
        from ..model import load_model

        self.loaded = load_model(model_path)
        stop.check()
        lm = self.loaded
        self.classes = lm.classes
        self.input_size = lm.input_size
        self.bands = lm.num_bands
        self.target = resolve_target(cfg.cam.target_class, self.classes, "[cam] target_class")

        backend = keras.backend.backend()
        self.precision = resolve_precision(cfg.inference.precision, backend)
        self.pipeline = resolve_pipeline(cfg.inference.pipeline, backend)
        self.streams = resolve_streams(cfg.inference.model_streams, backend)
        self._auto_readers = resolve_readers("auto", backend)  # asks the backend for its device once
        self.on_accelerator = model_on_accelerator(backend)
        self.cores = usable_cores()  # the cores this process may keep busy (affinity, cgroup quota)
        from ..backend import compilation_cache_dir, describe_device

        # backend, device, and a warning when a GPU is there but this backend cannot use it
        self.runtime = {**describe_device(keras), "precision": self.precision, "pipeline": self.pipeline,
                        "model_streams": self.streams, "compile_cache": compilation_cache_dir() if backend == "jax" else None}
        self.model = with_precision(lm.model, self.precision)
        try:
            self.cam = get_cam(cfg.cam.method, self.model, layer=cfg.cam.layer or lm.cam_layer,
                               jit_compile=cfg.inference.jit_compile)
        except ConfigError as exc:  # a layer of the user's: named as they set it (flag, variable, file)
            if cfg.cam.layer:
                exc.message = f"{cfg.cam.origin('layer')}: {exc.message}"
            raise
        self.batch_size = cfg.inference.batch_size
        # several streams: each step on one of these threads (the backend releases the GIL)
        self._pool = None
        if self.streams > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="tilescan-model")
        # Trace/compile the step for the run's one batch shape on a side thread while the
        # caller goes on (run() plans its units meanwhile); joined by ready() or first use.
        self.ready_at: float | None = None  # time.monotonic() when the step was compiled
        self._warm: threading.Thread | None = threading.Thread(target=self._warmup, name="tilescan-warmup", daemon=True)
        self._warm.start()

    def readers(self, setting: str) -> int:
        """Reader threads of the overlap pipeline for ``[inference] reader_threads`` here (a run's
        setting: the engine is shared by runs whose settings differ)."""
        return self._auto_readers if setting == "auto" else int(setting)

    def switch_interval(self, setting: str) -> float | None:
        """The GIL's switch interval (ms) for ``[inference] switch_interval_ms`` here, or None
        for Python's own (:func:`resolve_switch_interval`)."""
        return resolve_switch_interval(setting, self.on_accelerator)

    def ready(self) -> None:
        """Wait until the step is traced/compiled (a one-time start-up cost, not a scene's)."""
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.join()

    def _warmup(self) -> None:
        try:
            self._step(np.zeros((self.batch_size, self.input_size, self.input_size, self.bands), np.float32))
        except Exception:  # the first real batch raises it again, where it is handled
            pass
        self.ready_at = time.monotonic()

    def __call__(self, x: np.ndarray):
        return self.submit(x)()

    def submit(self, x: np.ndarray):
        """Start the step on ``x``; returns a function that waits for its result (see
        :meth:`~tilescan.explain.cam.CAMMethod.submit`: asynchronous where the device is, or
        with several ``streams``, on one of the engine's threads)."""
        self.ready()
        return self._submit(x)

    def _step(self, x: np.ndarray):
        return self._submit(x)()

    def _submit(self, x: np.ndarray):
        n = len(x)
        if 0 < n < self.batch_size:  # a short last batch: padded, so the step keeps one shape (no retrace)
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        target = None if self.target is None else np.full(len(x), self.target, dtype=np.int32)
        if self._pool is not None:
            collect = self._pool.submit(lambda: self.cam.submit(x, target=target)()).result
        else:
            collect = self.cam.submit(x, target=target)
        if len(x) == n:
            return collect
        return lambda: collect().rows(0, n)


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(cfg: Config, model_path: str | None = None) -> Engine:
    """The process's engine for this model and these settings: loaded and compiled once per
    process, so a notebook or a worker calling ``tilescan.run`` again starts at once."""
    from ..model import file_identity, model_path as resolve_path

    path = resolve_path(model_path)
    key = (str(path), *file_identity(os.stat(path)), cfg.cam.method, cfg.cam.layer, cfg.cam.target_class,
           cfg.inference.precision, cfg.inference.pipeline, cfg.inference.batch_size, cfg.inference.jit_compile,
           cfg.inference.model_streams)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            _ENGINES.clear()  # one model in memory at a time
            engine = _ENGINES[key] = Engine(cfg, model_path)
    return engine
