"""Shared fixtures: real data from ../shared/data, tiny models, quiet Keras.

Tests that need the real data skip with a clear reason when ``../shared/data`` is missing,
except when ``TILESCAN_REQUIRE_DATA=1`` (set by ``.ci/run``): there a missing folder fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
SCENES = DATA / "scenes"
AID = DATA / "aid"


def _need(path: Path) -> Path:
    if path.exists():
        return path
    msg = f"real data not found at {path} (clone the project beside ../shared, or set TILESCAN_DATA)"
    if os.environ.get("TILESCAN_REQUIRE_DATA") == "1":
        pytest.fail(msg + " -- TILESCAN_REQUIRE_DATA=1, so this is an error, not a skip")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def scenes_dir() -> Path:
    return _need(SCENES)


@pytest.fixture(scope="session")
def aid_dir() -> Path:
    return _need(AID)


def scene(rel: str) -> Path:
    """Path of a real scene under ../shared/data/scenes (skips/fails when missing)."""
    return _need(SCENES / rel)


@pytest.fixture
def scene_path():
    return scene
