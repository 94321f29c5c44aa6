"""Shared fixtures: real data from ../shared/data, tiny models, quiet Keras.

Tests that need the real data skip with a clear reason when ``../shared/data`` is missing,
except when ``TILESCAN_REQUIRE_DATA=1`` (set by ``.ci/run``): there a missing folder fails.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
SCENES = DATA / "scenes"
AID = DATA / "aid"


def unavailable(msg: str, require_var: str):
    """Skip a test whose real part (data, a server, QGIS, Slurm) is missing here, with the
    reason; fail instead when ``require_var`` is 1 (``.ci/run`` sets it: there it must exist)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{msg} -- {require_var}=1, so this is an error, not a skip")
    pytest.skip(msg)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(path: Path) -> Path:
    if path.exists():
        return path
    unavailable(f"real data not found at {path} (clone the project beside ../shared, or set TILESCAN_DATA)",
                "TILESCAN_REQUIRE_DATA")


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
