"""A real S3-compatible server for the tests: OpenStack Swift with its s3api middleware, from
Debian's packages (``swift-proxy swift-object swift-container swift-account memcached``),
as one node with one device in a temp folder, on free ports of 127.0.0.1.

Four Swift daemons (proxy with s3api + tempauth, account, container, object) and memcached
(tempauth needs it); the rings and ``swift.conf`` live in the temp folder (``swift_dir``).
S3 credentials: access key ``test:tester``, secret ``testing``. Objects are uploaded through
Swift's own API (``requests``), so the tests need no S3 client library.

Tests skip with the reason when the packages are missing and cannot be installed, except
with ``TILESCAN_REQUIRE_S3=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from conftest import free_port, unavailable

ACCESS_KEY, SECRET_KEY = "test:tester", "testing"
_PACKAGES = ["swift", "swift-proxy", "swift-object", "swift-container", "swift-account", "memcached"]
_SERVERS = ("account", "container", "object")


def _exe(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.path.exists(p)), None)


def need_swift() -> None:
    missing = [b for b in ("swift-proxy-server", "swift-object-server", "swift-ring-builder", "memcached") if not _exe(b)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *_PACKAGES], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        missing = [b for b in ("swift-proxy-server", "swift-object-server", "swift-ring-builder", "memcached") if not _exe(b)]
    if missing:
        unavailable(f"no S3-compatible server here ({', '.join(missing)} missing; apt-get install "
                    f"{' '.join(_PACKAGES)} as root)", "TILESCAN_REQUIRE_S3")


def _wait(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} in {timeout} s")


class SwiftS3:
    def __init__(self, workdir: Path):
        need_swift()
        self.dir = Path(workdir)
        self.procs: list[subprocess.Popen] = []
        self.port = 0
        self._token = self._storage = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gdal_env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """GDAL's variables for this server (path-style, plain HTTP, signed requests)."""
        return {"AWS_S3_ENDPOINT": self.endpoint, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}

    def start(self) -> "SwiftS3":
        etc, srv, logs = self.dir / "etc", self.dir / "srv", self.dir / "log"
        for d in (etc, srv / "sdb1", logs):
            d.mkdir(parents=True, exist_ok=True)
        (etc / "swift.conf").write_text(
            f"[swift-hash]\nswift_hash_path_suffix = {uuid.uuid4().hex}\nswift_hash_path_prefix = {uuid.uuid4().hex}\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n")
        ports = {name: free_port() for name in (*_SERVERS, "proxy", "memcached")}
        self.port = ports["proxy"]
        builder = _exe("swift-ring-builder")
        for name in _SERVERS:
            b = str(etc / f"{name}.builder")
            for args in (["create", "6", "1", "1"], ["add", f"r1z1-127.0.0.1:{ports[name]}/sdb1", "100"], ["rebalance"]):
                p = subprocess.run([builder, b, *args], capture_output=True, text=True, timeout=60)
                if p.returncode not in (0, 1):  # 1: rebalance warnings
                    raise RuntimeError(f"swift-ring-builder {args[0]}: {p.stdout}{p.stderr}")
        import getpass

        common = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nworkers = 0\nswift_dir = {etc}\nuser = {getpass.getuser()}\n"
                  f"log_name = swift\nlog_level = WARNING\nlog_udp_host = \n")
        as_root = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root without -u
        self._spawn([_exe("memcached"), *as_root, "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-U", "0"],
                    ports["memcached"], "memcached")
        for name in _SERVERS:
            conf = etc / f"{name}-server.conf"
            conf.write_text(common + f"bind_port = {ports[name]}\ndevices = {srv}\nmount_check = false\n"
                            f"[pipeline:main]\npipeline = {name}-server\n"
                            f"[app:{name}-server]\nuse = egg:swift#{name}\n"
                            f"[{name}-replicator]\n[{name}-auditor]\n" + ("[object-updater]\n" if name == "object" else ""))
            self._spawn([_exe(f"swift-{name}-server"), str(conf)], ports[name], f"swift-{name}-server")
        conf = etc / "proxy-server.conf"
        conf.write_text(common + f"bind_port = {ports['proxy']}\n"
                        "[pipeline:main]\npipeline = catch_errors proxy-logging cache s3api tempauth proxy-logging proxy-server\n"
                        "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
                        "[filter:catch_errors]\nuse = egg:swift#catch_errors\n"
                        "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n"
                        f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{ports['memcached']}\n"
                        "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\n"
                        f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SECRET_KEY} .admin\n")
        self._spawn([_exe("swift-proxy-server"), str(conf)], ports["proxy"], "swift-proxy-server")
        return self

    def _spawn(self, argv: list, port: int, what: str) -> None:
        log = open(self.dir / "log" / f"{what}.log", "wb")
        proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        try:
            _wait(port, proc, what)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {(self.dir / 'log' / f'{what}.log').read_text()[-2000:]}") from None

    def _auth(self) -> tuple[str, str]:
        import requests

        if self._token is None:
            r = requests.get(f"http://{self.endpoint}/auth/v1.0", headers={"X-Auth-User": ACCESS_KEY,
                                                                          "X-Auth-Key": SECRET_KEY}, timeout=30)
            r.raise_for_status()
            self._token, self._storage = r.headers["X-Auth-Token"], r.headers["X-Storage-Url"]
        return self._token, self._storage

    def put(self, bucket: str, key: str, path: Path) -> None:
        """Upload a file as ``s3://bucket/key`` (Swift API: the bucket is a container)."""
        import requests

        token, url = self._auth()
        requests.put(f"{url}/{bucket}", headers={"X-Auth-Token": token}, timeout=30).raise_for_status()
        with open(path, "rb") as fh:
            requests.put(f"{url}/{bucket}/{key}", data=fh, headers={"X-Auth-Token": token}, timeout=120).raise_for_status()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
