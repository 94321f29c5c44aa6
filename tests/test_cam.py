"""Tests of tilescan.explain.cam: every method against an independent reference, batch == per image,
no NaN for empty maps, layer choice and errors, other Keras backends in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from tilescan.explain import cam as C
from tilescan.errors import ConfigError
from tilescan.model import build_resnet18
from conftest import REPO, need_jax

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="references use tf.GradientTape")

LAST, MID = "conv5_block2_out", "conv4_block2_out"
TARGETS = np.array([1, 4, 0, 2], dtype=np.int32)  # a user-named class per tile


def _relu(a):
    return np.maximum(a, 0.0)


def _norm(raw):
    peak = raw.reshape(len(raw), -1).max(1)
    return np.where(peak[:, None, None] > 0, raw / np.where(peak > 0, peak, 1)[:, None, None], 0)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(7)
    return build_resnet18((64, 64, 3), 5, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(3).random((4, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def cams(model):
    """One instance per (method, layer), shared by the tests (tracing costs seconds)."""
    cache = {}

    def get(name, layer=LAST, **kw):
        key = (name, layer, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = C.get_cam(name, model, layer=layer, **kw)
        return cache[key]

    return get


def _eager_reference(model, layer, x, target):
    """acts, grads of sum_b logits[b, target_b] (None: argmax), logits -- eager tape, no cam.py."""
    acts_t = model.get_layer(layer).output
    logits_t = model.get_layer("logits").output
    body = keras.Model(model.input, acts_t)
    acts = body(x, training=False)
    if layer == LAST:  # the head is GAP + dense: write it out by hand
        dense = model.get_layer("logits")

        def head(a):
            return tf.matmul(tf.reduce_mean(a, axis=(1, 2)), dense.kernel) + dense.bias

    else:
        head = keras.Model(acts_t, logits_t)
    with tf.GradientTape() as tape:
        tape.watch(acts)
        logits = head(acts)
        t = np.argmax(logits.numpy(), -1) if target is None else target
        score = tf.reduce_sum(logits * tf.one_hot(t, logits.shape[-1]))
    grads = tape.gradient(score, acts)
    return acts.numpy(), grads.numpy(), logits.numpy(), t


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("target", [None, TARGETS], ids=["argmax", "named"])
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_closed_form_gap_dense(model, x, cams, method, target):
    acts = np.asarray(keras.Model(model.input, model.get_layer(LAST).output)(x))
    w = model.get_layer("logits").kernel.numpy()
    probs = np.asarray(model(x))
    t = probs.argmax(-1) if target is None else target
    h, wd = acts.shape[1:3]
    expected = _relu(np.einsum("bhwk,kb->bhw", acts, w[:, t]) / (h * wd))
    res = cams(method)(x, target=target)
    assert res.layer == LAST and res.raw.dtype == np.float32 and res.cam.dtype == np.float32
    np.testing.assert_array_equal(res.target, t)
    np.testing.assert_allclose(res.raw, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.cam, _norm(expected), atol=1e-5)
    np.testing.assert_allclose(res.probs, probs, atol=1e-6)
    assert res.raw.max() > 0  # the test is not vacuous


# ---------------------------------------------------------------- numpy references


def _ref_map(method, a, g):
    axes = (1, 2)
    if method == "gradcam":
        return _relu(np.einsum("bhwk,bk->bhw", a, g.mean(axes)))
    if method == "hirescam":
        return _relu((a * g).sum(-1))
    if method == "xgradcam":
        w = (a * g).sum(axes) / (a.sum(axes) + 1e-7)
        return _relu(np.einsum("bhwk,bk->bhw", a, w))
    if method == "layercam":
        return _relu((_relu(g) * a).sum(-1))
    if method == "gradcam++":
        b, h, wd, k = a.shape
        w = np.zeros((b, k))
        for i in range(b):  # deliberately the slow, per-position way
            for c in range(k):
                s = a[i, :, :, c].sum()
                for yy in range(h):
                    for xx in range(wd):
                        gv = float(g[i, yy, xx, c])
                        den = 2 * gv**2 + s * gv**3
                        alpha = gv**2 / den if den != 0 else 0.0
                        w[i, c] += alpha * max(gv, 0.0)
        return _relu(np.einsum("bhwk,bk->bhw", a, w))
    raise AssertionError(method)


@pytest.mark.parametrize("layer", [LAST, MID])
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam", "layercam", "gradcam++"])
def test_gradient_methods_match_reference(model, x, cams, method, layer):
    a, g, logits, t = _eager_reference(model, layer, x, TARGETS)
    res = cams(method, layer)(x, target=TARGETS)
    np.testing.assert_allclose(res.logits, logits, atol=1e-5)
    expected = _ref_map(method, a.astype(np.float64), g.astype(np.float64))
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(res.raw - expected).max() / scale < 1e-5
    np.testing.assert_allclose(res.cam, _norm(expected), atol=1e-5)
    assert res.raw.max() > 0


@pytest.mark.parametrize("layer", [LAST, MID])
def test_eigencam_matches_per_image_svd(model, x, cams, layer):
    acts = np.asarray(keras.Model(model.input, model.get_layer(layer).output)(x)).astype(np.float64)
    res = cams("eigencam", layer)(x)
    for i in range(len(x)):
        m = acts[i].reshape(-1, acts.shape[-1])
        _, _, vt = np.linalg.svd(m, full_matrices=False)
        p = m @ vt[0]
        if np.corrcoef(p, m.sum(1))[0, 1] < 0:
            p = -p
        expected = _relu(p).reshape(acts.shape[1:3])
        np.testing.assert_allclose(res.raw[i], expected, rtol=1e-4, atol=1e-5 * expected.max())
        assert np.corrcoef(res.raw[i].ravel(), acts[i].sum(-1).ravel())[0, 1] > 0
    np.testing.assert_array_equal(res.target, np.asarray(model(x)).argmax(-1))


def test_eigencam_is_the_same_map_for_every_target(x, cams):
    """What the README says of eigencam: class-agnostic, unlike Grad-CAM."""
    eigen, grad = cams("eigencam"), cams("gradcam")
    np.testing.assert_array_equal(eigen(x, target=np.zeros(len(x), int)).raw, eigen(x, target=np.full(len(x), 3)).raw)
    assert not np.allclose(grad(x, target=np.zeros(len(x), int)).raw, grad(x, target=np.full(len(x), 3)).raw)


def test_scorecam_matches_per_image_reference():
    keras.utils.set_random_seed(11)
    small = build_resnet18((32, 32, 3), 5)
    layer, n = "conv2_block2_out", 8
    xs = np.random.default_rng(5).random((3, 32, 32, 3)).astype(np.float32)
    res = C.get_cam("scorecam", small, layer=layer, max_channels=n, chunk_size=5)(xs)
    to_logits = keras.Model(small.input, small.get_layer("logits").output)
    for i in range(len(xs)):
        acts, grads, logits, t = _eager_reference(small, layer, xs[i : i + 1], None)
        a, base, c = acts[0], logits[0], int(t[0])  # (8, 8, 64)
        part = a.mean((0, 1)) * grads[0].mean((0, 1))  # the channels' part in the target's logit
        top = np.argsort(-part, kind="stable")[:n]
        gains = []
        for ch in top:
            up = np.asarray(keras.ops.image.resize(a[None, :, :, ch, None], (32, 32), interpolation="bilinear"))[0, :, :, 0]
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            gains.append(np.asarray(to_logits(xs[i : i + 1] * mask[None, :, :, None]))[0, c] - base[c])
        gains = np.array(gains, dtype=np.float64)
        w = np.exp(gains - gains.max())
        w /= w.sum()
        expected = _relu(np.einsum("hwk,k->hw", a[:, :, top], w))
        assert res.target[i] == c
        np.testing.assert_allclose(res.raw[i], expected, rtol=1e-4, atol=1e-5 * max(expected.max(), 1e-6))
    assert res.raw.shape == (3, 8, 8) and res.raw.max() > 0


def test_scorecam_finds_the_explained_class_where_it_is(aid_dir):
    """A 2 x 2 mosaic of three desert images and one of storage tanks, the tanks in each
    quadrant in turn: Score-CAM of StorageTanks, with its default 32 channels, is hottest in
    the tanks' quadrant, as Grad-CAM is (the most active channels alone are the desert's)."""
    from pathlib import Path

    from tilescan.model import load_model
    from tilescan.training.data import load_eval_image

    images = aid_dir / "images"
    desert = [load_eval_image(images / "Desert" / f"desert_{i}.jpg", 64) for i in (10, 11, 12, 13)]
    tanks = load_eval_image(Path(images / "StorageTanks" / "storagetanks_122.jpg"), 64)
    mosaics = []
    for q in range(4):
        parts = [tanks if k == q else d for k, d in enumerate(desert)]
        mosaics.append(np.vstack([np.hstack(parts[:2]), np.hstack(parts[2:])]))
    loaded = load_model(None)
    res = C.get_cam("scorecam", loaded.model, layer=loaded.cam_layer)(np.stack(mosaics).astype(np.float32),
                                                                     target=np.full(4, loaded.classes.index("StorageTanks")))
    hottest = [int(np.argmax([c[:2, :2].mean(), c[:2, 2:].mean(), c[2:, :2].mean(), c[2:, 2:].mean()])) for c in res.cam]
    assert hottest == [0, 1, 2, 3]


# ---------------------------------------------------------------- batch vs per image


@pytest.mark.parametrize("method", list(C.CAM_METHODS))
def test_batch_equals_per_image(model, x, cams, method):
    kw = {"max_channels": 6, "chunk_size": 4} if method == "scorecam" else {}
    cam = cams(method, **kw)
    target = None if method in ("eigencam", "scorecam") else TARGETS
    batch = cam(x, target=target)
    for i in range(len(x)):
        one = cam(x[i : i + 1], target=None if target is None else target[i : i + 1])
        np.testing.assert_array_equal(one.target, batch.target[i : i + 1])
        np.testing.assert_allclose(one.cam, batch.cam[i : i + 1], atol=1e-5)
        scale = max(np.abs(batch.raw[i]).max(), 1e-12)
        assert np.abs(one.raw[0] - batch.raw[i]).max() / scale < 1e-5
        np.testing.assert_allclose(one.probs, batch.probs[i : i + 1], atol=1e-6)


# ---------------------------------------------------------------- empty maps


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_all_negative_map_gives_zeros_not_nan(x, method):
    keras.utils.set_random_seed(7)
    m = build_resnet18((64, 64, 3), 5)
    dense = m.get_layer("logits")
    kernel = dense.kernel.numpy()
    kernel[:, 2] = -np.abs(kernel[:, 2]) - 1e-3  # block outputs are post-ReLU (>= 0): A.W < 0
    dense.kernel.assign(kernel)
    res = C.get_cam(method, m)(x, target=2)
    assert not np.isnan(res.cam).any() and not np.isnan(res.raw).any()
    np.testing.assert_array_equal(res.cam, 0.0)
    np.testing.assert_array_equal(res.raw, 0.0)
    np.testing.assert_array_equal(res.target, 2)


def test_normalize_per_image_edge_cases():
    raw = np.stack([np.zeros((2, 2)), -np.ones((2, 2)), np.array([[0, 1], [2, 4]])]).astype(np.float32)
    out = C.normalize_per_image(raw)
    assert not np.isnan(out).any() and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_allclose(out[2], [[0, 0.25], [0.5, 1]])


# ---------------------------------------------------------------- layers, errors, helpers


def test_earlier_layer_has_twice_the_resolution(x, cams):
    last, mid = cams("gradcam", LAST)(x), cams("gradcam", MID)(x)
    assert last.raw.shape == (4, 2, 2) and mid.raw.shape == (4, 4, 4)
    assert mid.layer == MID
    np.testing.assert_allclose(mid.probs, last.probs, atol=1e-6)


def test_head_rebuild_fallback_matches_keras_split(model, x):
    body, head, _ = C.split_model(model, MID)
    _, rebuilt, _ = C.split_model(model, MID, force_rebuild=True)
    acts = body(x)
    assert any(type(l).__name__ == "Add" for l in rebuilt.layers)  # residual adds re-applied
    np.testing.assert_allclose(np.asarray(rebuilt(acts)), np.asarray(head(acts)), atol=1e-6)


def test_errors_name_the_choices(model):
    with pytest.raises(ConfigError, match="known methods: gradcam, gradcam\\+\\+"):
        C.get_cam("gradcam+++", model)
    with pytest.raises(ConfigError, match="candidate layers: .*conv4_block2_out"):
        C.get_cam("gradcam", model, layer="conv9_block1_out")
    with pytest.raises(ConfigError, match="no \\(B, h, w, k\\) output"):
        C.get_cam("gradcam", model, layer="avg_pool")
    with pytest.raises(ConfigError, match="does not separate"):
        C.get_cam("gradcam", model, layer="conv4_block2_1_conv")
    with pytest.raises(ConfigError, match="jit_compile"):
        C.get_cam("gradcam", model, jit_compile="sometimes")


def test_target_checks(x, cams):
    with pytest.raises(ValueError, match="0..4"):
        cams("gradcam")(x, target=5)
    with pytest.raises(ValueError):
        cams("gradcam")(x, target=[1, 2])
    np.testing.assert_array_equal(cams("gradcam")(x, target=3).target, 3)


def test_upsample_matches_keras_bilinear():
    maps = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    for size in (64, (13, 7), (4, 5)):
        hw = (size, size) if isinstance(size, int) else size
        ref = np.asarray(keras.ops.image.resize(maps[..., None], hw, interpolation="bilinear", antialias=False))[..., 0]
        out = C.upsample(maps, size)
        assert out.shape == (3, *hw) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=1e-6)


def test_xla_path_equals_default(model, x, cams):
    jit = C.GradCAM(model, jit_compile="true")
    assert jit.jit_compile is True and cams("gradcam").jit_compile is False  # "auto" on TF CPU
    np.testing.assert_allclose(jit(x).raw, cams("gradcam")(x).raw, atol=1e-5)


def test_time_methods_reports_tiles_per_second(model, x):
    rates = C.time_methods(model, x[:2], ["gradcam", C.ScoreCAM(model, max_channels=2)], repeats=1)
    assert set(rates) == {"inference", "gradcam", "scorecam"}
    assert all(r > 0 for r in rates.values())


# ---------------------------------------------------------------- other backends

_BACKEND_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras
    from tilescan.explain import cam as C
    from tilescan.model import build_resnet18
    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    keras.utils.set_random_seed(7)
    m = build_resnet18((64, 64, 3), 5, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])
    x = np.random.default_rng(3).random((4, 64, 64, 3)).astype("float32")
    layer = m.get_layer("conv5_block2_out")
    acts = keras.ops.convert_to_numpy(keras.Model(m.input, layer.output)(x))
    w = keras.ops.convert_to_numpy(m.get_layer("logits").kernel)
    fast = C.GradCAM(m, fast_head=True)  # no backward pass: the GAP -> Dense head's closed form
    assert fast.path == "gap-dense", fast
    for target in (None, np.array([1, 4, 0, 2])):
        res = C.GradCAM(m, fast_head=False)(x, target=target)
        quick = fast(x, target=target)
        assert (quick.target == res.target).all() and np.array_equal(quick.probs, res.probs)
        assert np.abs(quick.raw - res.raw).max() < 1e-5 and np.abs(quick.cam - res.cam).max() < 1e-5
        assert np.array_equal(quick.cam, C.normalize_per_image(quick.raw))
        t = keras.ops.convert_to_numpy(m(x)).argmax(-1) if target is None else target
        exp = np.maximum(np.einsum("bhwk,kb->bhw", acts, w[:, t]) / 4.0, 0)
        assert (res.target == t).all(), (res.target, t)
        err = np.abs(res.raw - exp).max()
        assert err < 1e-5, err
        assert res.raw.max() > 0
    mid = C.get_cam("layercam", m, layer="conv4_block2_out")(x)
    assert mid.raw.shape == (4, 4, 4) and not np.isnan(mid.cam).any()
    print("OK", keras.backend.backend())
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradcam_closed_form_other_backend(backend):
    if backend == "jax":
        need_jax()  # the GPU extra's backend: tested in CI
    elif importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed; the {backend} gradient shim is untested here")
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    code = f"BACKEND = {backend!r}\n" + _BACKEND_SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK " + backend in proc.stdout


def test_tensorflow_steps_trace_without_autograph_and_fall_back_when_a_layer_needs_it(tmp_path, monkeypatch):
    """The TensorFlow steps are traced without AutoGraph (no converted module written to the
    temporary folder); a function with Python control flow on a tensor, as a custom layer
    may have, still runs, through AutoGraph, with the right branch for each input."""
    import tempfile

    from tilescan.explain.shims import _tf_function

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def plain(x):
        return tf.nn.relu(x) * 2.0

    def branchy(x):
        if tf.reduce_sum(x) > 0:  # a tensor as a Python bool: needs AutoGraph in a graph
            return x * 2.0
        return -x

    x = np.array([1.0, -3.0], np.float32)
    assert _tf_function(plain, False)(tf.constant(x)).numpy().tolist() == [2.0, 0.0]
    assert not list(tmp_path.glob("__autograph_generated_file*"))
    f = _tf_function(branchy, False)
    assert f(tf.constant(x)).numpy().tolist() == [-1.0, 3.0]
    assert f(tf.constant(-x)).numpy().tolist() == [-2.0, 6.0]


def test_the_shipped_models_cam_step_writes_no_autograph_module(tmp_path, monkeypatch):
    """Grad-CAM of the shipped model through the TensorFlow step leaves nothing in the
    temporary folder."""
    import tempfile

    from tilescan.model import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    loaded = load_model()
    n = loaded.input_size
    got = C.get_cam("gradcam", loaded.model)(np.random.default_rng(0).random((2, n, n, loaded.num_bands), np.float32))
    assert got.cam.shape[0] == 2
    assert not list(tmp_path.iterdir())


def test_pixels_outside_0_1_are_refused_not_classified(x, cams):
    """0..255 pixels (uint8, or floats from np.asarray(image, float)) run through the model give
    confident, wrong labels: the CAM methods refuse them and say what the model takes."""
    with pytest.raises(ValueError, match=r"float pixels in 0\.\.1 \(uint8 / 255\).*got uint8 pixels"):
        cams("gradcam")((x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"got values up to 2\d\d"):
        cams("gradcam")(x * 255)
    cams("gradcam")(x)  # 0..1 as before
    one = x.copy()
    one.reshape(-1)[7] = 255.0  # one stray 0..255 value is found, wherever it is
    with pytest.raises(ValueError, match=r"got values up to 255"):
        cams("gradcam")(one)
    with pytest.raises(ValueError, match=r"got values down to -0\.99\d* \(normalised already\? the model normalises"):
        cams("gradcam")(x * 2 - 1)  # [-1, 1], as some preprocessing gives


def test_nan_pixels_and_other_shapes_are_refused_with_what_is_wrong(x, cams):
    """A NaN pixel (a float raster's nodata) gave NaN probabilities, read as class 0; bands
    first (as rasterio reads), another band count, an empty batch or images of another size gave
    TensorFlow's own error: each is a ValueError that says what to do."""
    holed = x.copy()
    holed[0, 5, 5, 0] = np.nan
    with pytest.raises(ValueError, match=r"holds NaN pixels \(nodata\?\): set them to 0 first"):
        cams("gradcam")(holed)
    with pytest.raises(ValueError, match=r"channels last; got shape \(\d+, 3, \d+, \d+\) \(channels first, as "
                                         r"rasterio reads: np.moveaxis\(x, 1, -1\)\)"):
        cams("gradcam")(np.moveaxis(x, -1, 1).copy())
    with pytest.raises(ValueError, match=r"must be a batch \(B, H, W, 3\).*got shape \(\d+, \d+, \d+, 4\)$"):
        cams("gradcam")(np.concatenate([x, x[..., :1]], axis=-1))
    with pytest.raises(ValueError, match=r"of one or more images.*got shape \(0,"):
        cams("gradcam")(x[:0])
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # tiles not resized to the model's input
    with pytest.raises(ValueError, match=rf"must be {x.shape[1]} x {x.shape[2]} px images, the model's input size; "
                                         rf"got {big.shape[1]} x {big.shape[2]}: resize them first"):
        cams("gradcam")(big)
