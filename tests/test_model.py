"""Tests of tilescan.model: the ResNet-18 builder, the .keras file with metadata, refusals."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from tilescan.errors import EXIT_MODEL, ModelError
from tilescan.model import (
    DEFAULT_CAM_LAYER,
    META_MEMBER,
    PACKAGE_MODEL,
    build_resnet18,
    conv_layer_names,
    file_sha256,
    load_model,
    read_metadata,
    save_model,
)

keras = pytest.importorskip("keras")

META = {
    "classes": ["water", "forest", "urban", "field"],
    "bands": ["red", "green", "blue"],
    "normalization": {"mean": [0.4, 0.4, 0.35], "std": [0.2, 0.18, 0.18]},
    "gsd_m": 2.0,
    "training": {"dataset": "synthetic", "terms": "test only"},
    "scores": {"val": {"accuracy": 0.5}},
}


@pytest.fixture(scope="module")
def resnet224():
    return build_resnet18((224, 224, 3), 6)


@pytest.fixture(scope="module")
def small_model():
    """A small-input ResNet-18 with normalisation, non-trivial BatchNorm statistics and a
    scaled-up head, so its softmax is not flat and a float16 round trip can show."""
    keras.utils.set_random_seed(0)
    m = build_resnet18((64, 64, 3), 4, mean=META["normalization"]["mean"], std=META["normalization"]["std"])
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    head = m.get_layer("logits")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 40.0, bias])
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_model):
    """``small_model`` saved once with META (saving 11 M parameters takes seconds)."""
    path = tmp_path_factory.mktemp("saved") / "m.keras"
    return path, save_model(small_model, path, META)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0, 1, (6, 64, 64, 3)).astype("float32")


# ------------------------------------------------------------------------------------
# the architecture


def test_parameter_count(resnet224):
    # trainable: exactly torchvision's resnet18 (11,689,512) with a 6-way head instead of
    # 1000-way (-513,000 + 3,078); Keras also counts BatchNorm's moving mean and variance
    trainable = sum(int(np.prod(w.shape)) for w in resnet224.trainable_weights)
    assert trainable == 11_179_590
    assert 11_180_000 <= resnet224.count_params() <= 11_190_000


def test_layer_structure_of_he_et_al(resnet224):
    m = resnet224
    layers = {l.name: l for l in m.layers}
    assert m.input_shape == (None, 224, 224, 3) and m.output_shape == (None, 6)
    # stem: 7x7/2 conv with 64 filters, 3x3/2 max pool
    stem = layers["conv1_conv"]
    assert stem.kernel_size == (7, 7) and stem.strides == (2, 2) and stem.filters == 64
    assert layers["pool1_pool"].pool_size == (3, 3) and layers["pool1_pool"].strides == (2, 2)
    assert isinstance(layers["pool1_pool"], keras.layers.MaxPooling2D)
    # four stages of two basic blocks (two 3x3 convs each); downsampling in the first
    # block of stages 3-5, with a 1x1/2 projection shortcut there and nowhere else
    size = 56
    for stage, filters in zip(range(2, 6), (64, 128, 256, 512)):
        if stage > 2:
            size //= 2
        for block in (1, 2):
            name = f"conv{stage}_block{block}"
            stride = 2 if (stage > 2 and block == 1) else 1
            c1, c2 = layers[name + "_1_conv"], layers[name + "_2_conv"]
            assert (c1.kernel_size, c1.strides, c1.filters) == ((3, 3), (stride, stride), filters)
            assert (c2.kernel_size, c2.strides, c2.filters) == ((3, 3), (1, 1), filters)
            assert isinstance(layers[name + "_add"], keras.layers.Add)
            has_proj = (name + "_0_conv") in layers
            assert has_proj == (stride == 2)
            if has_proj:
                p = layers[name + "_0_conv"]
                assert (p.kernel_size, p.strides, p.filters) == ((1, 1), (2, 2), filters)
            assert layers[name + "_out"].output.shape == (None, size, size, filters)
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 1 + 16 + 3
    assert sum(1 for l in m.layers if isinstance(l, keras.layers.BatchNormalization)) == len(convs)
    # 18 weighted layers on the main path: stem + 16 convs + dense
    assert 1 + sum(1 for c in convs if c.kernel_size == (3, 3)) + 1 == 18
    # head: global average pool, dense logits, softmax
    assert isinstance(layers["avg_pool"], keras.layers.GlobalAveragePooling2D)
    assert isinstance(layers["logits"], keras.layers.Dense) and layers["logits"].units == 6
    assert m.layers[-1].name == "predictions"
    x = np.random.default_rng(0).uniform(0, 1, (2, 224, 224, 3)).astype("float32")
    p = np.asarray(m(x, training=False))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_named_blocks_and_conv5_is_input_over_32():
    for size in (64, 128, 160):
        m = build_resnet18((size, size, 3), 3)
        names = conv_layer_names(m)
        for stage in range(2, 6):
            for block in (1, 2):
                assert f"conv{stage}_block{block}_out" in names
        assert names[-1] == DEFAULT_CAM_LAYER == "conv5_block2_out"
        assert m.get_layer("conv5_block2_out").output.shape == (None, size // 32, size // 32, 512)
        assert m.get_layer("conv4_block2_out").output.shape == (None, size // 16, size // 16, 256)
    # any tile size: a model with unknown H, W takes several sizes
    m = build_resnet18((None, None, 3), 3)
    for size in (64, 96):
        assert m(np.zeros((1, size, size, 3), "float32")).shape == (1, 3)


def test_normalization_layer_is_part_of_the_model():
    m = build_resnet18((32, 32, 3), 2, mean=[0.5, 0.4, 0.3], std=[0.2, 0.1, 0.25])
    norm = m.get_layer("normalize")
    x = np.full((1, 2, 2, 3), 0.7, "float32")
    np.testing.assert_allclose(np.asarray(norm(x))[0, 0, 0], [(0.7 - 0.5) / 0.2, (0.7 - 0.4) / 0.1, (0.7 - 0.3) / 0.25], rtol=1e-4)
    with pytest.raises(ValueError):
        build_resnet18((32, 32, 3), 2).get_layer("normalize")


# ------------------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip_keeps_metadata_and_predictions(tmp_path, small_model, saved, images):
    ref = np.asarray(small_model(images, training=False))
    assert ref.max(axis=1).mean() > 0.3  # the softmax is not flat: a real comparison
    path, sha = saved
    assert sha == file_sha256(path)
    assert os.listdir(path.parent) == ["m.keras"]  # the temp file was renamed into place
    meta = read_metadata(path)
    for k, v in META.items():
        assert meta[k] == v
    assert meta["input_size"] == [64, 64] and meta["architecture"] == "resnet18"
    assert meta["cam_layer"] == "conv5_block2_out" and meta["format"] == "tilescan-model/1"
    lm = load_model(path)
    assert lm.meta == meta and lm.sha256 == sha and lm.path == str(path)
    assert lm.classes == META["classes"] and lm.input_size == 64 and lm.num_bands == 3
    assert lm.cam_layer == "conv5_block2_out" and lm.model_id == f"m-{sha[:12]}"
    np.testing.assert_allclose(np.asarray(lm.model(images, training=False)), ref, atol=1e-6)

    # float16 storage: half the file, float32 variables, probabilities within 1e-2
    half = tmp_path / "half.keras"
    save_model(small_model, half, {**META, "id": "half-model"}, half=True)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(path)
    lh = load_model(half)
    assert lh.model_id == "half-model"
    assert all(w.dtype == "float32" for w in lh.model.weights)
    got = np.asarray(lh.model(images, training=False))
    np.testing.assert_allclose(got, ref, atol=1e-2)
    assert not np.array_equal(got, ref)  # the weights really were rounded
    np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1))


def test_a_diverged_loss_is_written_as_strict_json(tmp_path, saved):
    """A training whose loss diverged (NaN) saves a model whose tilescan.json other readers
    parse (strict JSON: the loss null), not Python's bare NaN; rewriting it keeps it so."""
    from tilescan.model import META_MEMBER, rewrite_metadata

    path = tmp_path / "m.keras"
    path.write_bytes(saved[0].read_bytes())
    rewrite_metadata(path, lambda m: m["scores"]["val"].update(loss=float("nan"), accuracy=float("inf")))

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read(META_MEMBER), parse_constant=refuse)
    assert meta["scores"]["val"] == {"loss": None, "accuracy": None}
    assert read_metadata(path)["classes"] == META["classes"]


def test_save_refuses_bad_names_and_metadata(tmp_path, small_model):
    with pytest.raises(ModelError, match=r"\.keras"):
        save_model(small_model, tmp_path / "m.h5", META)
    with pytest.raises(ModelError, match="lacks"):
        save_model(small_model, tmp_path / "m.keras", {"classes": ["a"]})
    with pytest.raises(ModelError, match="non-empty"):
        save_model(small_model, tmp_path / "m.keras", {**META, "classes": []})
    assert not list(tmp_path.iterdir())


def _refused(path, match):
    with pytest.raises(ModelError, match=match) as err:
        load_model(path)
    assert err.value.exit_code == EXIT_MODEL == 5
    assert str(path) in str(err.value)  # the message names the file
    return err.value


def test_load_refuses_model_without_metadata(tmp_path, small_model):
    plain = tmp_path / "plain.keras"
    keras.saving.save_model(small_model, plain)
    _refused(plain, "no tilescan metadata")
    with pytest.raises(ModelError):
        read_metadata(plain)


def test_load_refuses_foreign_corrupt_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.keras"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "not a model")
    _refused(foreign, "not a Keras 3")
    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(noise, "not a .keras model file")
    _refused(tmp_path / "missing.keras", "not found")
    _refused(tmp_path, "directory")
    scene = tmp_path / "scene.tif"  # a scene given to `tilescan info`: said what info is for
    scene.write_bytes(b"II*\x00" + bytes(64))
    _refused(scene, "not a .keras model file .*; tilescan info describes models: for a scene, `gdalinfo`")
    (tmp_path / "gone.keras").symlink_to(tmp_path / "nowhere.keras")
    _refused(tmp_path / "gone.keras", r"model file not found \(a broken link\)")



def test_a_keras_archive_under_another_name_is_told_to_be_renamed(tmp_path, saved):
    """A model copied as .h5 (a habit of Keras 2): Keras would read it as HDF5 ("file signature
    not found"); the message says what it is and what to do."""
    copy = tmp_path / "model.h5"
    copy.write_bytes(saved[0].read_bytes())
    _refused(copy, "a .keras model archive under another name: .*rename it to end in .keras")


def test_load_refuses_broken_or_inconsistent_metadata(tmp_path, saved):
    good = saved[0]

    def rewrite(name, meta_bytes):
        dst = tmp_path / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(dst, "w") as out:
            for n in src.namelist():
                out.writestr(n, meta_bytes if n == META_MEMBER else src.read(n))
        return dst

    meta = read_metadata(good)
    _refused(rewrite("badjson.keras", b"{not json"), "not valid JSON")
    _refused(rewrite("lacking.keras", json.dumps({"classes": ["a"]}).encode()), "lacks")
    three = {**meta, "classes": ["a", "b", "c"]}
    _refused(rewrite("mismatch.keras", json.dumps(three).encode()), "4 outputs but its metadata names 3")
    _refused(rewrite("bands.keras", json.dumps({**meta, "bands": ["r", "g", "b", "nir"]}).encode()), "3 bands but its metadata lists 4")
    # weights damaged inside a valid archive
    dst = tmp_path / "noweights.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(dst, "w") as out:
        for n in src.namelist():
            out.writestr(n, b"garbage" if n.endswith(".h5") else src.read(n))
    _refused(dst, "cannot load")


# ------------------------------------------------------------------------------------
# the packaged model


def test_packaged_model_metadata():
    assert PACKAGE_MODEL.is_file()
    meta = read_metadata(PACKAGE_MODEL)
    assert len(meta["classes"]) == 30 and len(set(meta["classes"])) == 30
    assert {"Airport", "Forest", "Viaduct", "StorageTanks"} <= set(meta["classes"])
    assert meta["input_size"] == [128, 128]
    assert meta["bands"] == ["red", "green", "blue"]
    norm = meta["normalization"]
    assert len(norm["mean"]) == len(norm["std"]) == 3 and all(s > 0 for s in norm["std"])
    assert all(0 < m < 1 for m in norm["mean"])
    tr = meta["training"]
    assert tr["dataset"] == "AID"
    assert "Xia" in tr["citation"] and "AID" in tr["citation"] and "2017" in tr["citation"]
    assert "research" in tr["terms"].lower()
    assert 0.5 < meta["scores"]["val"]["accuracy"] <= 1.0
    assert meta["cam_layer"] == "conv5_block2_out"


def test_packaged_classes_are_aid_order(aid_dir):
    assert read_metadata(PACKAGE_MODEL)["classes"] == (aid_dir / "classes.txt").read_text().split()


def test_packaged_model_loads_as_resnet18():
    lm = load_model()
    assert lm.path == str(PACKAGE_MODEL) and lm.sha256 == file_sha256(PACKAGE_MODEL)
    m = lm.model
    assert m.output_shape == (None, 30) and m.input_shape[-1] == 3
    assert 11_180_000 < m.count_params() < 11_250_000
    assert m.get_layer("conv1_conv").kernel_size == (7, 7)
    assert all(f"conv{s}_block{b}_out" in conv_layer_names(m) for s in range(2, 6) for b in (1, 2))


def test_file_sha256_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """A process running many runs hashes its model once; a file changed in place, even to
    the same size with its modification time put back, is hashed again."""
    import hashlib

    import tilescan.model as model_mod

    path = tmp_path / "m.keras"
    path.write_bytes(b"a" * 4096)
    first = file_sha256(path)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()

    def no_reading(*a, **k):
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(model_mod, "open", no_reading, raising=False)
    assert file_sha256(path) == first
    monkeypatch.undo()

    st = os.stat(path)
    with open(path, "r+b") as f:  # same size, other bytes, the same modification time
        f.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()
