"""Faults of remote I/O, against a real nginx on 127.0.0.1 (tests/http_server.py): a URL
that 404s, access denied, a server error that persists (retried with backoff, bounded), a
truncated file, a response too slow for the timeout, and the server dying mid-scene. Each
fails its scene with an error naming the URL (without credentials) and the cause; the
other scenes go on, nothing finished is lost, and a rerun once the server is back completes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

import batch_helpers as bh
from conftest import SCENES, scene
from http_server import Nginx

COGEO = "rasterio/cogeo.tif"
LOCAL = "rio-tiler/cog_rgb.tif"  # a small local scene that must be done whatever the network does
ARGS = ("--units", "px", "--tile-size", "256")


@pytest.fixture
def server(tmp_path):
    scene(COGEO)
    srv = Nginx(SCENES, tmp_path / "srv", slow_rate="20k").start()
    yield srv
    srv.stop()


def _run(out, *inputs, **env):
    return bh.tilescan("run", "--no-progress", "-o", out, *inputs, *ARGS, **env)


def _failed(out) -> dict[str, str]:
    report = json.loads((out / "report.json").read_text())
    return {f["unit"]: f["reason"] for f in report["failed"]}


def test_404_and_access_denied_fail_alone_naming_the_url_without_credentials(server, tmp_path):
    missing = f"{server.url}/rasterio/no-such-scene.tif"
    secret = f"http://alice:hunter2@127.0.0.1:{server.port}/403/cogeo.tif?X-Amz-Signature=s3cr3tsig&x=1"
    out = tmp_path / "out"
    p = _run(out, scene(LOCAL), missing, secret)
    assert p.returncode == 3, p.stderr  # some scenes failed
    report = json.loads((out / "report.json").read_text())
    assert [d["unit"] for d in report["done"]] == ["cog_rgb"]
    failed = _failed(out)
    assert failed["no-such-scene"].startswith(f"{missing}: ") and "not found (HTTP 404)" in failed["no-such-scene"]
    assert "access denied (HTTP 403)" in failed["cogeo"] and "check the credentials" in failed["cogeo"]
    assert f"127.0.0.1:{server.port}/403/cogeo.tif" in failed["cogeo"]
    for text in [p.stderr, p.stdout, *(f.read_text(errors="replace") for f in out.rglob("*") if f.is_file()
                                        and f.suffix in (".json", ".txt", ".log"))]:
        assert "hunter2" not in text and "s3cr3tsig" not in text and "alice" not in text


def test_server_errors_are_retried_with_backoff_then_reported(server, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = _run(out, f"{server.url}/503/cogeo.tif", GDAL_HTTP_MAX_RETRY="2", GDAL_HTTP_RETRY_DELAY="0.5",
             TILESCAN_REMOTE_RETRIES="1")
    assert p.returncode == 4, p.stderr
    assert "server error (HTTP 503)" in _failed(out)["cogeo"] and "(after 1 retry of the scene)" in _failed(out)["cogeo"]
    tries = [r for r in server.requests() if r.path == "/503/cogeo.tif"]
    # three rounds of one try and GDAL's two retries, no more: the scene, the probe before its retry, the retry
    assert len(tries) == 3 * 3, tries
    assert time.monotonic() - t0 > 2 * (0.5 + 1.0) + 2  # each second retry waited longer than the first; 2 s between


def test_truncated_file_fails_alone(server, tmp_path):
    data = scene(COGEO).read_bytes()
    (server.extra / "cut.tif").write_bytes(data[: len(data) * 6 // 10])
    out = tmp_path / "out"
    p = _run(out, scene(LOCAL), f"{server.url}/extra/cut.tif")
    assert p.returncode == 3, p.stderr
    reason = _failed(out)["cut"]
    assert reason.startswith(f"{server.url}/extra/cut.tif: ") and "truncated" in reason.lower(), reason
    assert (out / "cog_rgb" / "run.json").exists() and not (out / "cut").exists()


def test_slow_response_times_out(server, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = _run(out, f"{server.url}/slow/{COGEO}", GDAL_HTTP_TIMEOUT="1", GDAL_HTTP_MAX_RETRY="1",
             GDAL_HTTP_RETRY_DELAY="0.2")
    assert p.returncode == 4, p.stderr
    assert "timed out" in _failed(out)["cogeo"]
    assert time.monotonic() - t0 < 60


def test_a_server_down_when_a_scene_starts_is_tried_again(server, tmp_path):
    """A scene whose first request (its checks, before any read) finds the server down is tried
    again, as one cut short mid-read is: with the server back within the wait, the run completes."""
    url, port, out = f"{server.url}/{COGEO}", server.port, tmp_path / "out"
    server.stop()
    proc = subprocess.Popen([bh.exe(), "run", "--no-progress", "-o", str(out), str(scene(LOCAL)), url, *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=bh.env(GDAL_HTTP_MAX_RETRY="0", TILESCAN_REMOTE_RETRIES="2"))
    said = []
    for line in proc.stderr:
        said.append(line)
        if "cannot reach the server" in line and "will be tried again (1 of 2)" in line:
            server.start(port=port)
    assert proc.wait(timeout=120) == 0, "".join(said)
    assert (out / "cogeo" / "run.json").exists() and (out / "cog_rgb" / "run.json").exists()


def test_a_rerun_while_the_server_is_down_keeps_finished_scenes(server, tmp_path):
    """A rerun that cannot reach the server to check a finished remote scene for changes keeps
    it as it is (skipped, with the reason and a warning) instead of failing it after waiting
    for retries; a scene never finished still fails, and once the server is back a change to
    the finished scene is found."""
    (server.extra / "cogeo.tif").write_bytes(scene(COGEO).read_bytes())
    url, other, out = f"{server.url}/extra/cogeo.tif", f"{server.url}/rio-tiler/cog_rgb.tif", tmp_path / "out"
    p = _run(out, url)
    assert p.returncode == 0, p.stderr
    manifest = (out / "cogeo" / "run.json").read_bytes()
    port = server.port
    server.stop()
    t0 = time.monotonic()
    p = _run(out, url, other, GDAL_HTTP_MAX_RETRY="0", TILESCAN_REMOTE_RETRIES="1")
    assert p.returncode == 3, p.stderr  # the scene never finished failed; the finished one did not
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == ["cogeo"]
    reason = report["skipped"][0]["reason"]
    assert "could not be reached to check it for changes" in reason and "cannot reach the server" in reason, reason
    assert "warning: cogeo: already complete; kept unchecked" in p.stderr, p.stderr
    assert "cannot reach the server" in _failed(out)["cog_rgb"]
    assert (out / "cogeo" / "run.json").read_bytes() == manifest
    assert time.monotonic() - t0 < 60

    server.start(port=port)
    later = (server.extra / "cogeo.tif").stat().st_mtime + 60  # a newer Last-Modified: not the finished scene
    os.utime(server.extra / "cogeo.tif", (later, later))
    p = _run(out, url)
    said = next(line for line in p.stderr.splitlines() if "made from another version of the scene (" in line)
    assert p.returncode == 6 and "ETag " in said and "; Last-Modified " in said and " -> " in said, p.stderr


class _Hung:
    """A server that takes connections and never answers (a hung host), on ``port``; counts them."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        for c in [*self.held, self.sock]:
            c.close()


def test_a_rerun_against_a_hung_server_waits_for_it_once_not_once_a_scene(server, tmp_path):
    """A rerun whose server takes connections and never answers waited its timeout for every
    finished scene in turn (60 s each by default: hours for a cron job of many scenes); once the
    server has not answered a check, its other finished scenes are kept unchecked at once."""
    names = [f"c{i}.tif" for i in range(3)]
    for n in names:
        (server.extra / n).write_bytes(scene(COGEO).read_bytes())
    urls, out = [f"{server.url}/extra/{n}" for n in names], tmp_path / "out"
    assert _run(out, *urls).returncode == 0
    port = server.port
    server.stop()
    hung = _Hung(port)
    try:
        p = _run(out, *urls, GDAL_HTTP_TIMEOUT="2", GDAL_HTTP_MAX_RETRY="0", TILESCAN_REMOTE_RETRIES="0")
        connections = len(hung.held)
    finally:
        hung.close()
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    reasons = {u["unit"]: u["reason"] for u in report["skipped"]}
    assert sorted(reasons) == ["c0", "c1", "c2"] and all("kept unchecked" in r for r in reasons.values()), reasons
    assert sum("not asked, as its server did not answer for" in r for r in reasons.values()) == 2, reasons
    assert connections <= 2, connections  # the first scene's check only (one was three, and three timeouts)


def test_a_new_scene_on_a_hung_server_is_given_up_after_gdals_retries(tmp_path):
    """A server that takes connections and never answers: GDAL retries the timed-out request
    (GDAL_HTTP_MAX_RETRY times), and tilescan does not try the scene again on top of that (each
    try would cost those timeouts again: 25 of them, 25 minutes at the default low-speed time),
    nor ask that server for another new scene in the run."""
    hung = _Hung(0)
    port = hung.sock.getsockname()[1]
    first, second = (f"http://127.0.0.1:{port}/a/{n}.tif" for n in ("new", "other"))
    try:
        t0 = time.monotonic()
        p = _run(tmp_path / "out", first, second, GDAL_HTTP_TIMEOUT="1", GDAL_HTTP_MAX_RETRY="1",
                 GDAL_HTTP_RETRY_DELAY="0.2")
        seconds, connections = time.monotonic() - t0, len(hung.held)
    finally:
        hung.close()
    assert p.returncode == 4, p.stderr
    failed = _failed(tmp_path / "out")
    assert failed["new"].startswith(f"{first}: ") and "timed out" in failed["new"], failed
    assert "retr" not in failed["new"]  # no "(after 2 retries of the scene)"
    assert failed["other"].startswith(f"{second}: not asked, as its server did not answer for {first}: "), failed
    assert connections <= 2, connections  # GDAL's first request and its one retry (it was 12: three tries each)
    assert seconds < 60


def test_server_dies_mid_scene_then_rerun_completes(server, tmp_path):
    url = f"{server.url}/slow/rio-tiler/mosaic_cog1.tif"  # 2.9 MB at 20 kB/s: still reading when killed
    out = tmp_path / "out"
    proc = subprocess.Popen([bh.exe(), "run", "--no-progress", "-o", str(out), str(scene(LOCAL)), url, *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bh.env(GDAL_HTTP_MAX_RETRY="1", GDAL_HTTP_RETRY_DELAY="0.2"))
    deadline = time.monotonic() + 120
    while not any(r.method == "GET" and r.path.startswith("/slow/") for r in server.requests()) \
            and not (out / ".tilescan-staging" / "mosaic_cog1").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the remote scene was never read"
        time.sleep(0.1)
    time.sleep(0.5)
    port = server.port
    server.stop()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    reason = _failed(out)["mosaic_cog1"]
    assert reason.startswith(url) and ("cannot reach the server" in reason or "timed out" in reason), reason
    assert (out / "cog_rgb" / "run.json").exists() and not (out / "mosaic_cog1").exists()

    server.slow_rate = "0"  # back, at full speed
    server.start(port=port)
    p = _run(out, scene(LOCAL), url)
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [u["unit"] for u in report["skipped"]] == ["cog_rgb"]
    assert [u["unit"] for u in report["done"]] == ["mosaic_cog1"]
