"""Tests of tilescan.explain.faithfulness: a model whose evidence sits in a known region (so the right
answer is known), batch == per image, chunking, shapes, the blur against OpenCV."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from tilescan.explain import faithfulness as F

S = 32  # image side
Q = 16  # the evidence sits in the top-left Q x Q quadrant


def _checker(n: int) -> np.ndarray:
    return (np.indices((n, n)).sum(axis=0) % 2).astype(np.float32)


def _texture_energy(x: np.ndarray) -> np.ndarray:
    """What the known model measures, in numpy: mean |Laplacian| over the top-left
    quadrant (valid 3x3 convolution, channel 0)."""
    c = x[..., 0]
    lap = 4 * c[:, 1:-1, 1:-1] - c[:, :-2, 1:-1] - c[:, 2:, 1:-1] - c[:, 1:-1, :-2] - c[:, 1:-1, 2:]
    return np.abs(lap[:, : Q - 1, : Q - 1]).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def images():
    """Three images: a checkerboard texture in the top-left quadrant (the class evidence),
    smooth gradients elsewhere, which a blur leaves almost unchanged."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1)
    out = []
    for a in (0.3, 0.5, 0.7):
        img = np.stack([a * yy + 0.2, 0.5 * xx + 0.2, 0.6 - 0.3 * yy], axis=-1).astype(np.float32)
        img[:Q, :Q, 0] = 0.2 + 0.6 * _checker(Q) * rng.uniform(0.8, 1.0)
        out.append(img)
    return np.stack(out)


@pytest.fixture(scope="module")
def region_model(images):
    """Softmax over 2 classes; class 0's logit rises with the texture energy of the top-left
    quadrant only: relu(+lap), relu(-lap) -> crop quadrant -> average -> dense."""
    layers = keras.layers
    inp = keras.Input((S, S, 3))
    lap = np.zeros((3, 3, 3, 2), np.float32)
    k = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32)
    lap[:, :, 0, 0], lap[:, :, 0, 1] = k, -k
    conv = layers.Conv2D(2, 3, padding="valid", use_bias=False, activation="relu")
    h = conv(inp)
    h = layers.Cropping2D(((0, S - 2 - (Q - 1)), (0, S - 2 - (Q - 1))))(h)
    h = layers.GlobalAveragePooling2D()(h)
    dense = layers.Dense(2)
    logits = dense(h)
    model = keras.Model(inp, layers.Activation("softmax")(logits))
    conv.set_weights([lap])
    # calibrate: full evidence -> p ~ 0.98, blurred (no texture) -> p ~ 0.02
    e_full = float(_texture_energy(images).mean())
    e_none = float(_texture_energy(F.blur(images)).mean())
    a = 8.0 / (e_full - e_none)
    b = -a * (e_full + e_none) / 2
    dense.set_weights([np.array([[a, 0.0], [a, 0.0]], np.float32), np.array([b, 0.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def maps():
    true = np.zeros((3, S, S), np.float32)
    true[:, :Q, :Q] = 1.0
    true += np.random.default_rng(1).random(true.shape).astype(np.float32) * 0.01  # no flat ties
    return true


def test_model_sees_the_evidence(region_model, images):
    p = region_model.predict_on_batch(images)
    assert (p[:, 0] > 0.9).all()
    assert (region_model.predict_on_batch(F.blur(images))[:, 0] < 0.1).all()


def test_true_region_beats_inverted_and_random_maps(region_model, images, maps):
    t = np.zeros(3, dtype=np.int64)
    d_true, i_true = F.deletion_insertion(region_model, images, maps, t, steps=16)
    d_inv, i_inv = F.deletion_insertion(region_model, images, 1.0 - maps, t, steps=16)
    d_rnd, i_rnd = zip(*(F.deletion_insertion(region_model, images, F.random_maps((3, 8, 8), seed=s), t, steps=16)
                         for s in range(3)))
    d_rnd, i_rnd = np.mean(d_rnd, axis=0), np.mean(i_rnd, axis=0)
    assert (d_true < d_rnd).all() and (d_rnd < d_inv).all()
    assert (i_true > i_rnd).all() and (i_rnd > i_inv).all()
    # the evidence is a quarter of the image: deleting it first leaves little area
    assert d_true.max() < 0.35 and i_true.min() > 0.65


def test_curves_shapes_and_endpoints(region_model, images, maps):
    d, i, dc, ic = F.deletion_insertion(region_model, images, maps[:, ::4, ::4], 0, steps=8, return_curves=True)
    assert d.shape == i.shape == (3,)
    assert dc.shape == ic.shape == (3, 9)
    p = region_model.predict_on_batch(images)[:, 0]
    pb = region_model.predict_on_batch(F.blur(images))[:, 0]
    np.testing.assert_allclose(dc[:, 0], p, atol=1e-6)  # nothing deleted yet
    np.testing.assert_allclose(ic[:, -1], p, atol=1e-6)  # everything inserted
    np.testing.assert_allclose(dc[:, -1], pb, atol=1e-6)
    np.testing.assert_allclose(ic[:, 0], pb, atol=1e-6)
    np.testing.assert_allclose(d, F.auc(dc))
    assert ((0 <= d) & (d <= 1) & (0 <= i) & (i <= 1)).all()


def test_batched_equals_per_image_and_chunking(region_model, images):
    cams = F.random_maps((3, 4, 4), seed=5)
    t = np.array([0, 1, 0])
    d, i = F.deletion_insertion(region_model, images, cams, t, steps=6, chunk=256)
    for b in range(3):
        d1, i1 = F.deletion_insertion(region_model, images[b : b + 1], cams[b : b + 1], t[b], steps=6)
        np.testing.assert_allclose(d1[0], d[b], atol=1e-6)
        np.testing.assert_allclose(i1[0], i[b], atol=1e-6)
    d7, i7 = F.deletion_insertion(region_model, images, cams, t, steps=6, chunk=7)
    np.testing.assert_allclose(d7, d, atol=1e-6)
    np.testing.assert_allclose(i7, i, atol=1e-6)


def test_counting_model_gives_exact_curves():
    """A 'model' that reports the fraction of original pixels kept: the deletion curve is
    1 - f and insertion f exactly, so both AUCs are 0.5 whatever the map."""
    x = np.ones((2, 8, 8, 1), np.float32)

    def kept(z):
        f = z.reshape(len(z), -1).mean(axis=1)
        return np.stack([f, 1 - f], axis=1)

    d, i, dc, ic = F.deletion_insertion(kept, x, F.random_maps((2, 8, 8), 0), 0, steps=4, baseline="zero", return_curves=True)
    np.testing.assert_allclose(dc, np.tile([1, 0.75, 0.5, 0.25, 0], (2, 1)), atol=1e-7)
    np.testing.assert_allclose(ic, 1 - dc, atol=1e-7)
    np.testing.assert_allclose(d, 0.5)
    np.testing.assert_allclose(i, 0.5)


def test_blur_matches_opencv_and_keeps_constants():
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(2).random((2, 20, 24, 3)).astype(np.float32)
    sigma = 1.5
    r = int(np.ceil(3 * sigma))
    ref = np.stack([cv2.GaussianBlur(im, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_REFLECT_101) for im in x])
    np.testing.assert_allclose(F.blur(x, sigma), ref, atol=1e-5)
    const = np.full((1, 16, 16, 5), 0.3, np.float32)  # any channel count
    np.testing.assert_allclose(F.blur(const), const, atol=1e-6)


def test_random_maps_and_auc_helpers():
    a, b = F.random_maps((2, 4, 4), seed=3), F.random_maps((2, 4, 4), seed=3)
    assert a.shape == (2, 4, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, F.random_maps((2, 4, 4), seed=4))
    assert ((a >= 0) & (a < 1)).all()
    np.testing.assert_allclose(F.auc(np.array([[1.0, 0.5, 0.0], [0.3, 0.3, 0.3]])), [0.5, 0.3])


def test_ties_are_not_broken_in_raster_order():
    rank = F.saliency_rank(np.zeros((1, 64), np.float32))
    assert sorted(rank[0].tolist()) == list(range(64))
    assert rank[0, :8].max() > 8  # the first row of pixels is not simply deleted first


def test_bad_arguments(region_model, images, maps):
    with pytest.raises(ValueError):
        F.deletion_insertion(region_model, images, maps[:2], 0)
    with pytest.raises(ValueError):
        F.deletion_insertion(region_model, images, maps, 0, steps=0)
    with pytest.raises(ValueError):
        F.deletion_insertion(region_model, images, maps, 0, baseline="noise")
