"""How faithful is a saliency map? Batched deletion and insertion AUC.

The two metrics of Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation
of Black-box Models" (BMVC 2018), computed for a whole batch at once:

* **deletion**: remove the most salient pixels first, a growing fraction at a time, and
  follow the probability of the explained class. A map that points at the evidence makes
  it fall fast: **lower deletion AUC = more faithful**.
* **insertion**: start from an image with the content removed and put the most salient
  pixels back first. **Higher insertion AUC = more faithful**.

"Removed" here means replaced by a blurred copy of the same image (the *blur* baseline):
colours and coarse layout stay, texture and edges go. Petsiuk et al. delete to black and
insert onto a blurred canvas; using the blur for both keeps the two curves on the same
pair of endpoints (the original image and its blurred copy), and avoids the black-pixel
artefacts a network trained on natural tiles has never seen. ``baseline="zero"`` (black)
and ``baseline="mean"`` (each image's mean colour) are there for comparison.

Curves have ``steps + 1`` points at fractions ``k / steps`` (``k = 0..steps``) of the
pixels; the AUC is the trapezoid rule over that fraction axis, so it lies in [0, 1].
Pixels are ranked by their saliency after bilinear upsampling of the map to the input
size; ties (flat regions, all-zero maps) are broken by one fixed pseudo-random order of
the pixel positions (the same for every image), never by raster order, which would
delete the top rows first.

Vectorised: the masked images of many (image, step) pairs are built as one
``(rows, H, W, C)`` array with ``np.where`` and run through the model in chunks of
``chunk`` rows, so memory is bounded by ``chunk`` and not by ``B * steps``. The endpoints
(original and fully removed) are the same for both curves and are computed once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

BASELINES = ("blur", "zero", "mean")
_TIE_SEED = 20181001  # fixes the tie-breaking order of pixel positions


# ------------------------------------------------------------------------------ baselines


def _reflect_index(j: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into 0..n-1 without repeating the edge pixel (OpenCV's REFLECT_101)."""
    if n == 1:
        return np.zeros_like(j)
    period = 2 * (n - 1)
    j = np.mod(j, period)
    return np.where(j > n - 1, period - j, j)


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with mirrored borders: ``M @ v`` blurs ``v``."""
    m = np.zeros((n, n), dtype=np.float64)
    if sigma <= 0:
        np.fill_diagonal(m, 1.0)
        return m.astype(np.float32)
    r = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-r, r + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    rows = np.repeat(np.arange(n), offsets.size)
    cols = _reflect_index(np.arange(n)[:, None] + offsets[None, :], n).reshape(-1)
    np.add.at(m, (rows, cols), np.tile(kernel, n))
    return m.astype(np.float32)


def default_sigma(height: int, width: int) -> float:
    """Blur strength of the blur baseline: 1/16 of the shorter side (8 px at 128 px)."""
    return max(1.0, min(height, width) / 16.0)


def blur(x: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Gaussian blur of a batch (B, H, W, C): two separable matrix products for the whole
    batch (any number of channels), so an image's blur never depends on its batch."""
    x = np.asarray(x, dtype=np.float32)
    _, h, w, _ = x.shape
    s = default_sigma(h, w) if sigma is None else float(sigma)
    gh, gw = gaussian_matrix(h, s), gaussian_matrix(w, s)
    return np.einsum("Hh,bhwc,Ww->bHWc", gh, x, gw, optimize=True).astype(np.float32)


def removed(x: np.ndarray, baseline: str = "blur", sigma: float | None = None) -> np.ndarray:
    """The "content removed" version of each image for ``baseline``."""
    if baseline == "blur":
        return blur(x, sigma)
    if baseline == "zero":
        return np.zeros_like(x, dtype=np.float32)
    if baseline == "mean":
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(np.float32)
    raise ValueError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")


def random_maps(shape, seed: int = 0) -> np.ndarray:
    """Uniform random saliency maps of ``shape`` (e.g. (B, h, w), the CAMs' own
    resolution, so that only the pixel ordering differs from the real maps): the baseline
    a CAM method has to beat."""
    return np.random.default_rng(seed).random(tuple(int(s) for s in shape), dtype=np.float32)


# ------------------------------------------------------------------------------ helpers


def _probability_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """x (N, H, W, C) -> class probabilities (N, K) as numpy, for a Keras model (compiled
    ``predict_on_batch``), a tilescan ``LoadedModel``, or any callable."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "predict_on_batch"):
        model = inner
    if hasattr(model, "predict_on_batch"):
        return lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32)
    if callable(model):
        return lambda x: np.asarray(model(x), dtype=np.float32)
    raise TypeError(f"model must be a Keras model or a callable, got {type(model).__name__}")


def saliency_rank(maps: np.ndarray) -> np.ndarray:
    """(B, N) rank of each pixel (0 = most salient) of flattened maps (B, N); ties broken
    by a fixed pseudo-random order of the positions."""
    b, n = maps.shape
    tie = np.random.default_rng(_TIE_SEED).permutation(n)
    order = np.lexsort((np.broadcast_to(tie, (b, n)), -maps), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), (b, n)), axis=1)
    return rank


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area of curves (B, S+1) sampled at evenly spaced fractions of [0, 1]."""
    c = np.asarray(curves, dtype=np.float64)
    if c.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    return ((c[..., 1:] + c[..., :-1]) * 0.5).sum(axis=-1) / (c.shape[-1] - 1)


def _upsampled(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 4 and cams.shape[-1] == 1:
        cams = cams[..., 0]
    if cams.ndim != 3:
        raise ValueError(f"cams must be (B, h, w), got shape {cams.shape}")
    if cams.shape[1:] == tuple(size):
        return cams
    from .cam import upsample

    return upsample(cams, size)


# ------------------------------------------------------------------------------ the metric


def deletion_insertion(
    model: Any,
    x: np.ndarray,
    cams: np.ndarray,
    target,
    steps: int = 16,
    chunk: int = 256,
    baseline: str = "blur",
    sigma: float | None = None,
    return_curves: bool = False,
):
    """Deletion and insertion AUC of saliency maps ``cams`` for images ``x``.

    ``model``: Keras model giving class probabilities (or a ``LoadedModel``, or a callable
    x -> probs). ``x``: (B, H, W, C) model input. ``cams``: (B, h, w) maps, any resolution
    (bilinearly upsampled to H x W; only their order matters). ``target``: the class to
    follow, an int or (B,) ints. ``steps``: curve resolution (``steps + 1`` points).
    ``chunk``: most rows per model call. ``baseline``: "blur" (default), "zero" or "mean".

    Returns ``(deletion, insertion)``, each (B,) float64 AUCs; with ``return_curves`` also
    the curves ``(B, steps + 1)`` (probability of ``target`` against the fraction of
    pixels deleted / inserted).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch (B, H, W, C), got shape {x.shape}")
    b, h, w, c = x.shape
    steps, chunk = int(steps), int(chunk)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    maps = _upsampled(cams, (h, w))
    if maps.shape[0] != b:
        raise ValueError(f"{maps.shape[0]} maps for {b} images")
    t = np.asarray(target)
    t = np.full((b,), int(t)) if t.ndim == 0 else t.astype(np.int64)
    if t.shape != (b,):
        raise ValueError(f"target must be an int or {b} ints, got shape {t.shape}")
    predict = _probability_fn(model)

    n_pix = h * w
    rank = saliency_rank(maps.reshape(b, n_pix)).astype(np.int32)
    counts = np.rint(np.arange(steps + 1) / steps * n_pix).astype(np.int64)
    base = removed(x, baseline, sigma)

    # Rows to evaluate: the two shared endpoints of each image, then the interior steps of
    # deletion (mode 1: salient pixels show the baseline) and insertion (mode 0: salient
    # pixels show the image). Row r: image img[r], pixel count cnt[r], mode del_[r].
    img_ep = np.arange(b)
    img_in = np.repeat(np.arange(b), max(0, steps - 1))
    k_in = np.tile(np.arange(1, steps), b)
    img = np.concatenate([img_ep, img_ep, img_in, img_in])
    cnt = np.concatenate([np.zeros(b, np.int64), np.full(b, n_pix), counts[k_in], counts[k_in]])
    del_ = np.concatenate([np.ones(b, bool), np.ones(b, bool), np.ones(img_in.size, bool), np.zeros(img_in.size, bool)])

    score = np.empty(img.size, dtype=np.float64)
    xf, basef = x.reshape(b, n_pix, c), base.reshape(b, n_pix, c)
    for s in range(0, img.size, chunk):
        sl = slice(s, s + chunk)
        i = img[sl]
        salient = rank[i] < cnt[sl, None]  # (rows, H*W): among the first cnt pixels
        show_image = salient != del_[sl, None]  # deletion hides them, insertion shows them
        rows = np.where(show_image[..., None], xf[i], basef[i]).reshape(-1, h, w, c)
        if len(i) < chunk < img.size:  # pad the last chunk: one input shape, one trace
            rows = np.concatenate([rows, np.zeros((chunk - len(i), h, w, c), np.float32)])
        probs = predict(rows)[: len(i)]
        score[sl] = probs[np.arange(len(i)), t[i]]

    original, gone = score[:b], score[b : 2 * b]
    interior = score[2 * b :]
    n_in = img_in.size
    dele = np.empty((b, steps + 1))
    ins = np.empty((b, steps + 1))
    dele[:, 0], dele[:, -1] = original, gone
    ins[:, 0], ins[:, -1] = gone, original
    if steps > 1:
        dele[:, 1:-1] = interior[:n_in].reshape(b, steps - 1)
        ins[:, 1:-1] = interior[n_in:].reshape(b, steps - 1)
    out = (auc(dele), auc(ins))
    return (*out, dele, ins) if return_curves else out
