"""The batched CAM family: one base class, one override per method.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..config import resolve_target
from ..errors import ConfigError
from .layers import _keras, gap_dense_head, resolve_layer, split_model
from .shims import _GAP_DENSE_STEPS, _SHIMS, auto_flag, model_on_accelerator, resolve_jit

EPS = 1e-12  # guards every division by a per-image or per-channel sum/maximum


# --------------------------------------------------------------------------------------
# Results and small numpy helpers
# --------------------------------------------------------------------------------------


@dataclass
class CAMResult:
    """CAMs of one batch.

    probs (B, K) softmax of the logits · target (B,) explained class per tile ·
    raw (B, h, w) float32 un-normalised map · cam (B, h, w) float32 in [0, 1], each map
    divided by its own max · layer: the layer name · logits (B, K) float32.
    """

    probs: np.ndarray
    target: np.ndarray
    raw: np.ndarray
    cam: np.ndarray
    layer: str
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    def rows(self, a: int, b: int) -> "CAMResult":
        """The results of tiles ``a:b`` of the batch."""
        return dataclasses.replace(self, probs=self.probs[a:b], target=self.target[a:b], raw=self.raw[a:b],
                                   cam=self.cam[a:b], logits=None if self.logits is None else self.logits[a:b])


def normalize_per_image(raw: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Divide each map (B, h, w) by its own maximum; maps with max <= eps become zeros.

    Negative values (there are none after a ReLU) are clipped to 0, so the result is always
    in [0, 1] and never NaN.
    """
    raw = np.maximum(np.asarray(raw, dtype=np.float32), 0.0)
    peak = raw.reshape(raw.shape[0], -1).max(axis=1) if raw.size else np.zeros(raw.shape[:1], np.float32)
    scale = np.where(peak > eps, 1.0 / np.maximum(peak, eps), 0.0).astype(np.float32)
    return (raw * scale[:, None, None]).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling with half-pixel centres and edge
    clamping: the convention of ``tf.image.resize`` / ``keras.ops.image.resize`` without
    antialiasing."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def upsample(cams: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Bilinear resize of a batch of maps (B, h, w) to (B, H, W) (``size`` an int or (H, W)).

    Separable: two small interpolation matrices applied to the whole batch in one einsum,
    the same values as ``keras.ops.image.resize(..., "bilinear", antialias=False)``.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"upsample expects (B, h, w) maps, got shape {cams.shape}")
    out_h, out_w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    rh = _bilinear_matrix(out_h, cams.shape[1]).astype(np.float32)
    rw = _bilinear_matrix(out_w, cams.shape[2]).astype(np.float32)
    return np.einsum("Hh,bhw,Ww->bHW", rh, cams, rw, optimize=True).astype(np.float32)


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


class CAMMethod:
    """Base of the CAM methods: split the model once, then for each batch run one
    forward+backward step and turn (acts, grads) into maps with numpy.

    Subclasses override ONE step: ``channel_weights(acts, grads, ...) -> (B, k)`` (the map
    is relu(sum_k w_k A_k)), or ``combine(acts, grads, ...) -> (B, h, w)`` for methods whose
    map is not a channel-weighted sum.
    """

    name = "cam"
    needs_grads = True  # False: only a forward pass (acts, logits) is run
    path = "autodiff"  # how the maps are computed; GradCAM may switch to "gap-dense"
    _fast_step: Callable | None = None  # set where one device step returns (logits, target, raw, cam)
    classes: Sequence[str] | None = None  # the model's class names, where known: a target may be one

    def __init__(self, model, layer: str | None = None, jit_compile: bool | str = "auto"):
        keras = _keras()
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.backend = keras.backend.backend()
        if self.backend not in _SHIMS:
            raise ConfigError(f"no CAM gradient shim for Keras backend {self.backend!r}; use one of {', '.join(_SHIMS)}")
        self.jit_compile = resolve_jit(jit_compile, self.backend)
        self.body, self.head, self.both = split_model(model, self.layer)
        self._grad_step, self._forward = _SHIMS[self.backend](self.body, self.head, self.both, self.jit_compile)
        self.num_classes = int(self.head.output_shape[-1])

    # -- the overridable steps ------------------------------------------------------------

    def channel_weights(self, acts: np.ndarray, grads: np.ndarray | None, **context) -> np.ndarray:
        """(B, k) weight of each activation channel. ``context`` holds ``x``, ``target``,
        ``logits`` for methods that need them."""
        raise NotImplementedError

    def combine(self, acts: np.ndarray, grads: np.ndarray | None, **context) -> np.ndarray:
        """(B, h, w) raw map; default relu(sum_k w_k A_k)."""
        w = self.channel_weights(acts, grads, **context).astype(np.float32)
        return np.maximum(np.einsum("bhwk,bk->bhw", acts, w, optimize=True), 0.0)

    # -- driver ----------------------------------------------------------------------------

    def _targets(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full((batch,), -1, dtype=np.int32)
        if isinstance(target, str):
            if self.classes is None:
                raise ValueError(f"target {target!r}: a class name needs the model's classes (get_cam on "
                                 "tilescan.load_model()'s model), else give the class index")
            target = resolve_target(target, self.classes)
        t = np.asarray(target)
        if t.ndim == 0:
            t = np.full((batch,), int(t))
        if t.shape != (batch,) or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"target must be None, an int, or {batch} ints; got {np.asarray(target)!r}")
        if t.min() < 0 or t.max() >= self.num_classes:
            raise ValueError(f"target classes must be in 0..{self.num_classes - 1}, got {t.tolist()}")
        return t.astype(np.int32)

    def _checked(self, x, target, sample: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``x`` as float32 and the targets, or a ValueError saying what is wrong with ``x``;
        ``sample``: look at a strided sample of the values only (run's own batches, scaled by
        its reader: a whole pass over each batch is time a GPU's step would wait for)."""
        raw = np.asarray(_keras().ops.convert_to_numpy(x) if not isinstance(x, np.ndarray) else x)
        want = self.model.input_shape[-1] if isinstance(self.model.input_shape, tuple) else None
        if raw.ndim != 4 or raw.shape[0] == 0 or (want is not None and raw.shape[-1] != want):
            first = raw.ndim == 4 and want is not None and raw.shape[1] == want and raw.shape[-1] != want
            raise ValueError(f"CAM input must be a batch (B, H, W, {want or 'C'}) of one or more images, channels last; "
                             f"got shape {raw.shape}" + (" (channels first, as rasterio reads: np.moveaxis(x, 1, -1))"
                                                          if first else ""))
        size = self.model.input_shape[1:3] if isinstance(self.model.input_shape, tuple) else (None, None)
        if None not in size and tuple(raw.shape[1:3]) != tuple(size):  # Keras would fail deep in its layers
            raise ValueError(f"CAM input must be {size[0]} x {size[1]} px images, the model's input size; got "
                             f"{raw.shape[1]} x {raw.shape[2]}: resize them first (cv2.resize), as tilescan run resizes its tiles")
        # 0..255 pixels give confident, wrong labels, as do pixels normalised already (the model normalises
        # them itself: [-1, 1], or mean/std); NaN ones NaN probabilities read as class 0: refused
        seen = (raw.reshape(-1)[::1009] if sample else raw) if raw.dtype.kind == "f" else np.zeros(1)
        top, low = float(np.max(seen)), float(np.min(seen))
        if math.isnan(top):
            raise ValueError("CAM input holds NaN pixels (nodata?): set them to 0 first, as tilescan run feeds nodata")
        if raw.dtype.kind in "iub" or top > 1.5 or low < -0.1:
            got = (f"{raw.dtype} pixels" if raw.dtype.kind in "iub" else f"values up to {top:g}" if top > 1.5
                   else f"values down to {low:g} (normalised already? the model normalises its 0..1 input itself)")
            raise ValueError(f"CAM input must be float pixels in 0..1 (uint8 / 255), as the model was trained on; "
                             f"got {got}")
        return raw.astype(np.float32, copy=False), self._targets(target, raw.shape[0])

    def _fast_result(self, logits, t, raw, cam) -> CAMResult:
        return CAMResult(probs=softmax(logits), target=t.astype(np.int32), raw=raw.astype(np.float32),
                         cam=cam.astype(np.float32), layer=self.layer, logits=logits.astype(np.float32))

    def submit(self, x, target=None) -> Callable[[], CAMResult]:
        """Start the step on ``x`` and return a function that waits for its :class:`CAMResult`.
        Where the device step is asynchronous (JAX's one-pass Grad-CAM), the caller can hand
        the device its next batch before collecting this one, so the upload of the next
        overlaps this one's compute; elsewhere the step runs here and now."""
        x, t = self._checked(x, target, sample=True)  # run's own batches: a strided look at their values
        dispatch = getattr(self._fast_step, "dispatch", None)
        if dispatch is None:
            res = self._compute(x, t)
            return lambda: res
        collect = dispatch(x, t)
        return lambda: self._fast_result(*collect())

    def __call__(self, x, target=None) -> CAMResult:
        return self._compute(*self._checked(x, target))

    def _compute(self, x: np.ndarray, t: np.ndarray) -> CAMResult:
        if self._fast_step is not None:
            return self._fast_result(*self._fast_step(x, t))
        if self.needs_grads:
            acts, grads, logits, t = self._grad_step(x, t)
        else:
            acts, logits = self._forward(x)
            grads = None
            t = np.where(t < 0, logits.argmax(axis=-1), t)
        t = t.astype(np.int32)
        raw = self.combine(acts, grads, x=x, target=t, logits=logits).astype(np.float32)
        return CAMResult(
            probs=softmax(logits),
            target=t,
            raw=raw,
            cam=normalize_per_image(raw),
            layer=self.layer,
            logits=logits.astype(np.float32),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer={self.layer!r}, backend={self.backend!r}, "
                f"jit_compile={self.jit_compile}, path={self.path!r})")


def resolve_fast_head(fast_head: bool | str) -> bool | None:
    """"auto" | "true" | "false" (or a bool) -> True (required), False (never) or None
    (auto: only where the model runs on an accelerator; on the CPU the autodiff path is as
    fast and its raw maps are the ones earlier outputs were written with)."""
    return auto_flag(fast_head, "fast_head")


class GradCAM(CAMMethod):
    """Grad-CAM: channel weight = spatial mean of the gradient.

    When the head from the CAM layer to the logits is GlobalAveragePooling2D -> Dense, that
    gradient is kernel[k, c] / (h * w) at every position, so ``fast_head`` can skip the
    backward pass: one forward pass for activations and logits, and the maps and their
    normalisation computed on the model's device (``path == "gap-dense"``). ``fast_head``:
    "auto" (default) uses it when the head qualifies and the model runs on an accelerator;
    True requires it (ConfigError for another head); False always differentiates
    (``path == "autodiff"``). The two paths agree to float roundoff, not bit for bit.
    """

    name = "gradcam"

    def __init__(self, model, layer: str | None = None, jit_compile: bool | str = "auto", fast_head: bool | str = "auto"):
        super().__init__(model, layer=layer, jit_compile=jit_compile)
        want = resolve_fast_head(fast_head)
        head = gap_dense_head(model, self.layer) if want is not False else None
        if want is True and head is None:
            raise ConfigError(
                f"fast_head=True needs a GlobalAveragePooling2D -> Dense head after CAM layer {self.layer!r} "
                f"of model {model.name!r}; use fast_head='auto' or False for this model"
            )
        if head is not None and (want is True or model_on_accelerator(self.backend)):
            self._fast_step = _GAP_DENSE_STEPS[self.backend](self.both, head[0], self.jit_compile, EPS)
            self.path = "gap-dense"

    def channel_weights(self, acts, grads, **context):
        return grads.mean(axis=(1, 2))


class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018). With the class score taken through exp(),
    the 2nd and 3rd derivatives are G^2 and G^3 times exp(score), giving
    alpha_ij = G_ij^2 / (2 G_ij^2 + sum_ab A_ab * G_ij^3) (0 where the denominator is 0)
    and w_k = sum_ij alpha_ij relu(G_ij). The positive factor exp(score) of the paper's
    weights is dropped: it would scale ``raw`` by exp(logit) and cancels in ``cam``.
    """

    name = "gradcam++"

    def channel_weights(self, acts, grads, **context):
        g2 = grads * grads
        g3 = g2 * grads
        act_sum = acts.sum(axis=(1, 2), keepdims=True)
        denom = 2.0 * g2 + act_sum * g3
        safe = np.where(denom != 0.0, denom, 1.0)
        alpha = np.where(denom != 0.0, g2 / safe, 0.0)
        return (alpha * np.maximum(grads, 0.0)).sum(axis=(1, 2))


class HiResCAM(CAMMethod):
    """HiResCAM: elementwise gradient x activation, summed over channels."""

    name = "hirescam"

    def combine(self, acts, grads, **context):
        return np.maximum((grads * acts).sum(axis=-1), 0.0)


class XGradCAM(CAMMethod):
    """XGrad-CAM: w_k = sum(G_k * A_k) / (sum(A_k) + eps)."""

    name = "xgradcam"

    def channel_weights(self, acts, grads, **context):
        return (grads * acts).sum(axis=(1, 2)) / (acts.sum(axis=(1, 2)) + 1e-7)


class LayerCAM(CAMMethod):
    """LayerCAM: relu(gradient) x activation, summed over channels."""

    name = "layercam"

    def combine(self, acts, grads, **context):
        return np.maximum((np.maximum(grads, 0.0) * acts).sum(axis=-1), 0.0)


class EigenCAM(CAMMethod):
    """Eigen-CAM: projection of each position's activation vector on the first right
    singular vector of the (h*w, k) activation matrix (not mean-centred, as in the paper),
    batched as one SVD over (B, h*w, k). The singular vector's sign is arbitrary, so it is
    chosen to make the map correlate positively with the channel sum of the activations.
    No gradients: only a forward pass.
    """

    name = "eigencam"
    needs_grads = False

    def combine(self, acts, grads, **context):
        b, h, w, k = acts.shape
        flat = acts.reshape(b, h * w, k).astype(np.float64)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        proj = np.einsum("bnk,bk->bn", flat, vt[:, 0, :])
        total = flat.sum(axis=-1)
        cov = ((proj - proj.mean(1, keepdims=True)) * (total - total.mean(1, keepdims=True))).sum(1)
        dot = (proj * total).sum(1)
        sign = np.where(cov != 0.0, np.sign(cov), np.where(dot < 0.0, -1.0, 1.0))
        return np.maximum(proj * sign[:, None], 0.0).reshape(b, h, w).astype(np.float32)


class ScoreCAM(CAMMethod):
    """Score-CAM: each activation channel, upsampled to the input size and min-max
    normalised to [0, 1], masks the input; the channel weight is the softmax over channels
    of the target logit's increase over the unmasked input's logit. Forward passes only,
    run ``chunk_size`` masked tiles at a time. ``max_channels`` keeps, per tile, the N
    channels that add most to the target's logit (mean activation times mean gradient, as
    Grad-CAM weighs them; the others get weight 0): the most active channels alone are those
    of what fills the tile, not of the class explained. Default 32, which keeps Score-CAM
    usable on a CPU (all 512 channels of ResNet-18's last block cost 512 forward passes per
    tile); ``None`` uses all, and needs no gradient. Cost: B * N forward passes.
    """

    name = "scorecam"

    def __init__(self, model, layer=None, jit_compile="auto", chunk_size: int = 64, max_channels: int | None = 32):
        super().__init__(model, layer=layer, jit_compile=jit_compile)
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_channels is not None and int(max_channels) < 1:
            raise ConfigError(f"max_channels must be >= 1 or None, got {max_channels}")
        self.chunk_size = int(chunk_size)
        self.max_channels = None if max_channels is None else int(max_channels)
        self.needs_grads = self.max_channels is not None  # to pick the channels of the target

    def select_channels(self, acts: np.ndarray, grads: np.ndarray | None) -> np.ndarray:
        """(B, N) channel indices per tile: all, or the top-N by their part in the target's
        logit (mean activation x mean gradient)."""
        b, k = acts.shape[0], acts.shape[-1]
        if self.max_channels is None or self.max_channels >= k:
            return np.broadcast_to(np.arange(k), (b, k))
        part = acts.mean(axis=(1, 2)) * grads.mean(axis=(1, 2))
        return np.argsort(-part, axis=1, kind="stable")[:, : self.max_channels]

    def channel_weights(self, acts, grads, x=None, target=None, logits=None, **context):
        b, h, w, k = acts.shape
        size = x.shape[1:3]
        chans = self.select_channels(acts, grads)  # (B, N)
        n = chans.shape[1]
        img_idx = np.repeat(np.arange(b), n)
        ch_idx = chans.reshape(-1)
        scores = np.empty(b * n, dtype=np.float32)
        for start in range(0, b * n, self.chunk_size):  # chunks of masked tiles, not images
            sl = slice(start, start + self.chunk_size)
            bi, ci = img_idx[sl], ch_idx[sl]
            maps = upsample(acts[bi, :, :, ci], size)  # (c, H, W)
            lo = maps.min(axis=(1, 2), keepdims=True)
            span = maps.max(axis=(1, 2), keepdims=True) - lo
            masks = np.where(span > EPS, (maps - lo) / np.maximum(span, EPS), 0.0).astype(np.float32)
            _, out = self._forward(x[bi] * masks[..., None])
            scores[sl] = out[np.arange(len(bi)), target[bi]]
        base = logits[np.arange(b), target][:, None]
        gain = scores.reshape(b, n) - base  # score increase over the unmasked tile
        weights = np.zeros((b, k), dtype=np.float32)
        np.put_along_axis(weights, chans, softmax(gain, axis=1), axis=1)
        return weights


CAM_METHODS: dict[str, type[CAMMethod]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}


def checked_methods(methods) -> list[str]:
    """CAM method names, lower-cased without repeats; a :class:`ConfigError` for none or an
    unknown one, before any work."""
    names = list(dict.fromkeys(str(m).strip().lower() for m in methods))
    if not names:
        raise ConfigError("no CAM method given")
    unknown = [m for m in names if m not in CAM_METHODS]
    if unknown:
        raise ConfigError(f"unknown CAM method {unknown[0]!r}; known methods: {', '.join(CAM_METHODS)}")
    return names


def get_cam(name: str, model, layer: str | None = None, **kw) -> CAMMethod:
    """A CAM method by registry name (case-insensitive); extra keywords go to its
    constructor (``jit_compile``, and for scorecam ``chunk_size``, ``max_channels``)."""
    key = str(name).strip().lower()
    if key not in CAM_METHODS:
        raise ConfigError(f"unknown CAM method {name!r}; known methods: {', '.join(CAM_METHODS)}")
    return CAM_METHODS[key](model, layer=layer, **kw)


# --------------------------------------------------------------------------------------
# Benchmark helper
# --------------------------------------------------------------------------------------


def time_methods(
    model,
    x,
    methods: Iterable[str | CAMMethod] = ("gradcam",),
    repeats: int = 5,
    layer: str | None = None,
    baseline: bool = True,
    **kw,
) -> dict[str, float]:
    """Tiles per second of each CAM method on batch ``x`` (median of ``repeats`` timed
    calls after one warm-up call; the methods are alternated round by round so that
    machine noise hits them alike). ``baseline`` adds ``"inference"``: the plain compiled
    forward pass (acts + logits) of the same model, the floor every method is compared to.
    ``kw`` goes to :func:`get_cam` for methods given by name.
    """
    x = np.asarray(x, dtype=np.float32)
    runners: dict[str, Callable[[], Any]] = {}
    if baseline:
        ref = GradCAM(model, layer=layer, jit_compile=kw.get("jit_compile", "auto"))
        runners["inference"] = lambda: ref._forward(x)
    for m in methods:
        cam = m if isinstance(m, CAMMethod) else get_cam(m, model, layer=layer, **kw)
        key = m if isinstance(m, str) else cam.name
        runners[key] = (lambda c=cam: c(x))
    for fn in runners.values():
        fn()  # warm-up: tracing / compilation
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(max(1, int(repeats))):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: float(x.shape[0] / np.median(v)) for k, v in times.items()}
