"""Importing Keras (and its backend) once, quietly, only when a command needs the model.

``tilescan --help`` and a rerun with nothing left to do never come here, so they never pay
for TensorFlow's import.
"""

from __future__ import annotations

import os
import sys


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

        return keras
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
    return keras


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
