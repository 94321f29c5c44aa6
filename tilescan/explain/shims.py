"""One gradient step per Keras backend (TensorFlow, JAX, torch): activations, gradients and logits for a batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ConfigError
from .layers import _keras

# What ``jit_compile="auto"`` means for TensorFlow: off, because XLA measured slower on the
# CPU (benchmarks/README.md); TensorFlow on a GPU was never measured, so off there too.
_TF_CPU_AUTO_JIT = False


_TF_GPU_AUTO_JIT = False


# --------------------------------------------------------------------------------------
# Backend shim: the only backend-specific code
# --------------------------------------------------------------------------------------
#
# Each ``_<backend>_shim(body, head, both, jit)`` returns two callables on numpy input:
#   grad_step(x, target) -> (acts, grads, logits, target) float32 numpy; ``target`` entries
#       < 0 mean "argmax of the logits"; grads = d(sum_b logits[b, target_b]) / d acts
#   forward(x) -> (acts, logits) float32 numpy (no gradient)


def _tf_function(fn, jit: bool):
    """``tf.function(fn)`` without AutoGraph: a model without Python control flow on tensors
    (any Keras 3 model that also runs on JAX) traces the same graph sooner, and AutoGraph
    leaves no converted module in the temporary folder (which a killed process would not
    remove). A model whose layers need AutoGraph gets it, from the first call that needs it."""
    import tensorflow as tf

    plain = tf.function(fn, jit_compile=jit, reduce_retracing=True, autograph=False)
    chosen = [plain]

    def call(*args):
        f = chosen[0]
        try:
            return f(*args)
        except tf.errors.OperatorNotAllowedInGraphError:  # e.g. `if tensor:` in a custom layer
            if f is not plain:
                raise
            chosen[0] = tf.function(fn, jit_compile=jit, reduce_retracing=True)
            return chosen[0](*args)

    return call


def _tensorflow_shim(body, head, both, jit: bool):
    import tensorflow as tf

    def step(x, target):
        acts = body(x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(acts)
            logits = tf.cast(head(acts, training=False), tf.float32)
            best = tf.argmax(logits, axis=-1, output_type=tf.int32)
            t = tf.where(target < 0, best, target)
            score = tf.reduce_sum(tf.gather(logits, t, axis=1, batch_dims=1))
        grads = tape.gradient(score, acts)
        return tf.cast(acts, tf.float32), tf.cast(grads, tf.float32), logits, t

    def fwd(x):
        acts, logits = both(x, training=False)
        return tf.cast(acts, tf.float32), tf.cast(logits, tf.float32)

    step_fn, fwd_fn = _tf_function(step, jit), _tf_function(fwd, jit)

    def grad_step(x, target):
        return tuple(np.asarray(v) for v in step_fn(tf.convert_to_tensor(x), tf.convert_to_tensor(target)))

    def forward(x):
        return tuple(np.asarray(v) for v in fwd_fn(tf.convert_to_tensor(x)))

    return grad_step, forward


def _jax_shim(body, head, both, jit: bool):
    import jax
    import jax.numpy as jnp

    def step(bvars, hvars, x, target):
        acts, _ = body.stateless_call(bvars[0], bvars[1], x, training=False)

        def score(a):
            logits, _ = head.stateless_call(hvars[0], hvars[1], a, training=False)
            logits = logits.astype(jnp.float32)
            t = jnp.where(target < 0, jnp.argmax(logits, axis=-1).astype(target.dtype), target)
            return jnp.sum(jnp.take_along_axis(logits, t[:, None], axis=1)), (logits, t)

        grads, (logits, t) = jax.grad(score, has_aux=True)(acts)
        return acts.astype(jnp.float32), grads.astype(jnp.float32), logits, t

    def fwd(vars_, x):
        (acts, logits), _ = both.stateless_call(vars_[0], vars_[1], x, training=False)
        return acts.astype(jnp.float32), logits.astype(jnp.float32)

    if jit:
        step, fwd = jax.jit(step), jax.jit(fwd)

    def values(m):
        return ([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])

    def grad_step(x, target):
        out = step(values(body), values(head), jnp.asarray(x), jnp.asarray(target))
        return tuple(np.asarray(v) for v in out)

    def forward(x):
        return tuple(np.asarray(v) for v in fwd(values(both), jnp.asarray(x)))

    return grad_step, forward


def _torch_shim(body, head, both, jit: bool):
    import torch

    keras = _keras()

    def to_np(t):
        return keras.ops.convert_to_numpy(t)

    def grad_step(x, target):
        xt = keras.ops.convert_to_tensor(x)
        with torch.no_grad():
            acts = body(xt, training=False)
        acts = acts.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(acts, training=False).float()
            tt = torch.as_tensor(target, device=logits.device, dtype=torch.int64)
            t = torch.where(tt < 0, logits.argmax(dim=-1), tt)
            score = logits.gather(1, t[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
        return (to_np(acts.detach().float()), to_np(grads.float()), to_np(logits.detach()), to_np(t))

    def forward(x):
        with torch.no_grad():
            acts, logits = both(keras.ops.convert_to_tensor(x), training=False)
        return to_np(acts.float()), to_np(logits.float())

    return grad_step, forward


_SHIMS: dict[str, Callable] = {"tensorflow": _tensorflow_shim, "jax": _jax_shim, "torch": _torch_shim}


# --------------------------------------------------------------------------------------
# Grad-CAM through a GlobalAveragePooling2D -> Dense head: forward pass only
# --------------------------------------------------------------------------------------
#
# Each ``_<backend>_gap_dense(both, kernel, jit, eps)`` returns one callable on numpy input:
#   step(x, target) -> (logits, target, raw, cam) float32/int32 numpy, where the Grad-CAM
#       channel weights are kernel[:, target] / (h * w) (the exact gradient of the logit
#       through the pooling), raw = relu(sum_k w_k A_k) and cam = raw / its per-map maximum
#       (zeros where the maximum <= eps), all computed on the model's device in one call.


def _tensorflow_gap_dense(both, kernel, jit: bool, eps: float):
    import tensorflow as tf

    def step(x, target):
        acts, logits = both(x, training=False)
        acts, logits = tf.cast(acts, tf.float32), tf.cast(logits, tf.float32)
        t = tf.where(target < 0, tf.argmax(logits, axis=-1, output_type=tf.int32), target)
        area = tf.cast(tf.shape(acts)[1] * tf.shape(acts)[2], tf.float32)
        weights = tf.transpose(tf.gather(tf.cast(kernel.value, tf.float32), t, axis=1)) / area  # (B, k)
        raw = tf.nn.relu(tf.einsum("bhwk,bk->bhw", acts, weights))
        peak = tf.reduce_max(raw, axis=(1, 2))
        # 1/peak through float64: TensorFlow's graph-mode float32 reciprocal on the CPU is not
        # correctly rounded, numpy's (normalize_per_image) is; rounding the float64 quotient is
        inv = tf.cast(1.0 / tf.cast(tf.maximum(peak, eps), tf.float64), tf.float32)
        scale = tf.where(peak > eps, inv, tf.zeros_like(peak))
        return logits, t, raw, raw * scale[:, None, None]

    step_fn = _tf_function(step, jit)

    def run(x, target):
        return tuple(np.asarray(v) for v in step_fn(tf.convert_to_tensor(x), tf.convert_to_tensor(target)))

    return run


def _jax_gap_dense(both, kernel, jit: bool, eps: float):
    import jax
    import jax.numpy as jnp

    traced: dict[str, tuple[int, int, int]] = {}  # (classes, CAM height, width), set when the step is traced

    def step(vars_, w, x, target):
        (acts, logits), _ = both.stateless_call(vars_[0], vars_[1], x, training=False)
        acts, logits = acts.astype(jnp.float32), logits.astype(jnp.float32)
        t = jnp.where(target < 0, jnp.argmax(logits, axis=-1).astype(target.dtype), target)
        weights = w.astype(jnp.float32)[:, t].T / (acts.shape[1] * acts.shape[2])
        raw = jnp.maximum(jnp.einsum("bhwk,bk->bhw", acts, weights), 0.0)
        peak = raw.max(axis=(1, 2))
        scale = jnp.where(peak > eps, 1.0 / jnp.maximum(peak, eps), 0.0)
        cam = raw * scale[:, None, None]
        traced["shape"] = (logits.shape[1], *raw.shape[1:])
        # one array, so one copy to the host: each copy lets the GIL go, and getting it back
        # waits out the other threads' switch interval (class indexes are exact in float32)
        b = raw.shape[0]
        return jnp.concatenate([logits, t.astype(jnp.float32)[:, None], raw.reshape(b, -1), cam.reshape(b, -1)],
                               axis=1)

    if jit:
        step = jax.jit(step)

    def dispatch(x, target):
        """Queue the step on the device and return at once (JAX dispatches asynchronously) a
        function that waits for its (logits, target, raw, cam), copied to the host at once.
        The jitted step takes the numpy batch itself: one call uploads and queues it."""
        vars_ = ([v.value for v in both.trainable_variables], [v.value for v in both.non_trainable_variables])
        if not jit:
            x, target = jnp.asarray(x), jnp.asarray(target)
        packed = step(vars_, kernel.value, x, target)
        k, h, w = traced["shape"]

        def collect():
            got = np.asarray(packed)
            n, a = len(got), k + 1 + h * w
            return (got[:, :k], got[:, k].astype(np.int32), got[:, k + 1:a].reshape(n, h, w),
                    got[:, a:].reshape(n, h, w))

        return collect

    def run(x, target):
        return dispatch(x, target)()

    run.dispatch = dispatch
    return run


def _torch_gap_dense(both, kernel, jit: bool, eps: float):
    import torch

    keras = _keras()

    def run(x, target):
        with torch.no_grad():
            acts, logits = both(keras.ops.convert_to_tensor(x), training=False)
            acts, logits = acts.float(), logits.float()
            tt = torch.as_tensor(target, device=logits.device, dtype=torch.int64)
            t = torch.where(tt < 0, logits.argmax(dim=-1), tt)
            weights = kernel.value.float()[:, t].T / (acts.shape[1] * acts.shape[2])
            raw = torch.relu(torch.einsum("bhwk,bk->bhw", acts, weights))
            peak = raw.amax(dim=(1, 2))
            scale = torch.where(peak > eps, 1.0 / torch.clamp(peak, min=eps), torch.zeros_like(peak))
            cam = raw * scale[:, None, None]
        return tuple(keras.ops.convert_to_numpy(v) for v in (logits, t.int(), raw, cam))

    return run


_GAP_DENSE_STEPS: dict[str, Callable] = {
    "tensorflow": _tensorflow_gap_dense,
    "jax": _jax_gap_dense,
    "torch": _torch_gap_dense,
}


def model_on_accelerator(backend: str) -> bool:
    """Whether the Keras backend computes on a GPU (or another accelerator), not the CPU."""
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def auto_flag(value, name: str) -> bool | None:
    """An ``auto``/``true``/``false`` setting (or a bool): True, False, or None for auto."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    if text != "auto":
        raise ConfigError(f"{name} must be 'auto', 'true' or 'false', got {value!r}")
    return None


def resolve_jit(jit_compile: bool | str, backend: str) -> bool:
    """"auto" | "true" | "false" (or a bool) -> whether the gradient step is compiled.

    auto: TensorFlow -> XLA only where measured faster (not on the development CPU);
    JAX -> ``jax.jit`` (always faster than op-by-op); torch -> eager autograd.
    """
    choice = auto_flag(jit_compile, "jit_compile")
    if choice is not None:
        return choice
    if backend == "tensorflow":
        return _TF_GPU_AUTO_JIT if model_on_accelerator(backend) else _TF_CPU_AUTO_JIT
    return backend == "jax"
