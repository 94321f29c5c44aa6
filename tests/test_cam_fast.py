"""Grad-CAM from the GAP -> Dense head's kernel (no backward pass) against autodiff Grad-CAM:
on the packaged model and on small built models, which heads qualify, and what ``auto`` picks."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from tilescan.config import TilingConfig
from tilescan.errors import ConfigError
from tilescan.explain import cam as C
from tilescan.explain.layers import gap_dense_head
from tilescan.explain.shims import model_on_accelerator
from tilescan.model import load_model

from conftest import scene

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend only")

NAIP = "opengeos-naip/m_4709963_se_14_1_20100629.tif"
# Float roundoff only: the two paths sum the 512 channels in a different order (measured:
# up to ~1.3e-6 of a map's maximum on the packaged model).
RAW_RTOL_OF_PEAK = 1e-5
CAM_ATOL = 1e-5


def _tiny(head: str, seed: int = 1):
    """A small conv net whose head after the ``feat`` layer is ``head``."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="feat")(x)
    if head == "gap":
        x = L.GlobalAveragePooling2D(name="gap")(x)
    elif head == "flatten":
        x = L.Flatten()(x)
    elif head == "gap+dense":
        x = L.Dense(10, activation="relu")(L.GlobalAveragePooling2D()(x))
    elif head == "gmp":
        x = L.GlobalMaxPooling2D()(x)
    logits = L.Dense(5, name="logits")(x)
    out = L.Activation("softmax", name="predictions")(logits)
    return keras.Model(inp, out, name=f"tiny_{head.replace('+', '_')}")


def _compare(slow, fast, x, target=None):
    a, b = slow(x, target=target), fast(x, target=target)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.target, b.target)
    assert (a.layer, a.raw.shape, a.raw.dtype, a.cam.dtype) == (b.layer, b.raw.shape, np.float32, np.float32)
    peak = a.raw.reshape(len(a.raw), -1).max(1)
    assert (peak > 0).sum() >= len(peak) // 4  # maps with content: not a comparison of zeros
    raw_err = float(np.abs(a.raw - b.raw).max())
    cam_err = float(np.abs(a.cam - b.cam).max())
    assert raw_err <= RAW_RTOL_OF_PEAK * peak.max(), raw_err
    assert cam_err <= CAM_ATOL, cam_err
    np.testing.assert_array_equal(b.cam, C.normalize_per_image(b.raw))  # the device normalisation is numpy's
    return raw_err, cam_err


@pytest.fixture(scope="module")
def shipped():
    return load_model()


@pytest.fixture(scope="module")
def tiles(shipped):
    """16 real tiles of the NAIP scene, read as ``tilescan run`` reads them."""
    with shipped.open_scene(scene(NAIP), TilingConfig(bands=(1, 2, 3))) as reader:
        grid = list(reader.grid)
        picks = np.linspace(0, len(grid) - 1, num=16).astype(int)
        x, _ = reader.read_batch([grid[int(i)] for i in picks])
    return np.asarray(x, dtype=np.float32)


def test_shipped_model_head_is_detected(shipped):
    m = shipped.model
    kernel, bias = gap_dense_head(m, shipped.cam_layer)
    dense = m.get_layer("logits")
    np.testing.assert_array_equal(np.asarray(kernel), dense.kernel.numpy())
    np.testing.assert_array_equal(np.asarray(bias), dense.bias.numpy())
    assert tuple(kernel.shape) == (512, len(shipped.classes))
    assert gap_dense_head(m, "conv4_block2_out") is None  # more blocks follow: not GAP -> Dense


@pytest.mark.parametrize("named", [False, True], ids=["argmax", "named-target"])
def test_shipped_model_fast_equals_autodiff(shipped, tiles, named):
    slow = C.GradCAM(shipped.model, layer=shipped.cam_layer, fast_head=False)
    fast = C.GradCAM(shipped.model, layer=shipped.cam_layer, fast_head=True)
    assert (slow.path, fast.path) == ("autodiff", "gap-dense")
    assert fast._fast_step is not None and slow._fast_step is None
    target = (np.arange(len(tiles)) * 7 % len(shipped.classes)).astype(np.int32) if named else None
    raw_err, cam_err = _compare(slow, fast, tiles, target)
    print(f"shipped model, {'named' if named else 'argmax'}: raw max abs diff {raw_err:.3g}, cam {cam_err:.3g}")
    if not named:  # several classes are explained, not one
        assert len(set(fast(tiles).target.tolist())) > 1


def test_tiny_gap_dense_fast_equals_autodiff():
    m = _tiny("gap")
    assert gap_dense_head(m, "feat") is not None
    x = np.random.default_rng(2).random((6, 16, 16, 3)).astype(np.float32)
    slow, fast = C.GradCAM(m, fast_head=False), C.GradCAM(m, fast_head=True)
    assert fast.path == "gap-dense" and fast.layer == "feat"
    _compare(slow, fast, x)
    _compare(slow, fast, x, target=3)
    # the closed form itself, written out from the kernel
    acts = keras.Model(m.input, m.get_layer("feat").output)(x).numpy()
    res = fast(x)
    w = m.get_layer("logits").kernel.numpy()[:, res.target].T / (acts.shape[1] * acts.shape[2])
    np.testing.assert_allclose(res.raw, np.maximum(np.einsum("bhwk,bk->bhw", acts, w), 0), rtol=1e-5, atol=1e-7)


def test_fast_path_follows_new_weights():
    m = _tiny("gap", seed=4)
    fast, slow = C.GradCAM(m, fast_head=True), C.GradCAM(m, fast_head=False)
    x = np.random.default_rng(8).random((3, 16, 16, 3)).astype(np.float32)
    before = fast(x).raw
    dense = m.get_layer("logits")
    dense.kernel.assign(-dense.kernel.numpy())  # a compiled step must read the variable, not a copy
    after = fast(x)
    assert not np.allclose(before, after.raw)
    _compare(slow, fast, x)


@pytest.mark.parametrize("head", ["flatten", "gap+dense", "gmp"])
def test_other_heads_fall_back_to_autodiff(head):
    m = _tiny(head)
    assert gap_dense_head(m, "feat") is None
    cam = C.GradCAM(m)  # auto
    assert cam.path == "autodiff" and cam._fast_step is None
    assert C.GradCAM(m, fast_head=False).path == "autodiff"
    with pytest.raises(ConfigError, match="GlobalAveragePooling2D -> Dense"):
        C.GradCAM(m, fast_head=True)
    res = cam(np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32))
    assert res.raw.shape == (2, 8, 8) and not np.isnan(res.cam).any()


def test_auto_keeps_autodiff_on_the_cpu(shipped):
    # the tables store raw CAM maxima; the paths differ by roundoff, so the CPU keeps autodiff
    auto = C.GradCAM(shipped.model, layer=shipped.cam_layer)
    expected = "gap-dense" if model_on_accelerator(auto.backend) else "autodiff"
    assert auto.path == expected
    assert C.get_cam("gradcam", shipped.model, layer=shipped.cam_layer, fast_head="true").path == "gap-dense"
    with pytest.raises(ConfigError, match="fast_head"):
        C.GradCAM(shipped.model, fast_head="sometimes")


def test_other_methods_never_take_the_fast_path(shipped):
    for name in ("gradcam++", "hirescam", "eigencam"):
        cam = C.get_cam(name, shipped.model, layer=shipped.cam_layer)
        assert cam.path == "autodiff" and cam._fast_step is None


@pytest.mark.parametrize("fast_head", [False, True], ids=["autodiff", "gap-dense"])
def test_a_tiles_result_does_not_depend_on_its_batch(shipped, tiles, fast_head):
    """The same bits for a tile wherever it sits in its batch and whatever else the batch
    holds: a run batches tiles of several scenes together, and shards or a resumed run batch
    them otherwise (on AVX2-only CPUs the matrix product and Eigen's convolutions did not)."""
    cam = C.GradCAM(shipped.model, layer=shipped.cam_layer, fast_head=fast_head)
    whole = cam(tiles)
    order = np.roll(np.arange(len(tiles))[::-1], 5)
    for idx in (order, np.arange(5), np.arange(3, 16, 2)):
        part = cam(tiles[idx])
        for field in ("probs", "logits", "target", "raw", "cam"):
            np.testing.assert_array_equal(getattr(part, field), getattr(whole, field)[idx], err_msg=field)
