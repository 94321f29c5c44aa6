"""A real HTTP server for the remote-scene tests: nginx from Debian's packages, started on a
free port of 127.0.0.1 with its own config, prefix and logs in a temp folder.

It serves ``root`` (the real scenes) with Range support and HTML folder listings, plus
``/extra/`` (a folder the test fills), ``/slow/`` (the scenes at a limited rate), ``/503/``
(always 503), ``/403/`` (always 403) and ``/norange/`` (the scenes without Range support);
and, where ``openssl`` makes it a certificate, the scenes over HTTPS (``tls_url``) with a
self-signed certificate (``cert``). The access log has one line per request: method,
path, status, bytes sent and the Range header, which the tests count.

Tests skip with the reason when nginx is not installed and cannot be (``apt-get install
nginx-light`` as root), except with ``TILESCAN_REQUIRE_NGINX=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, unavailable

_CONF = """\
{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format tilescan '$request_method $uri $status $bytes_sent "$http_range"';
  access_log {prefix}/access.log tilescan;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    autoindex on;
    location /extra/ {{ alias {extra}/; autoindex on; }}
    location /slow/ {{ alias {root}/; limit_rate {slow_rate}; }}
    location /503/ {{ return 503; }}
    location /403/ {{ return 403; }}
    location /norange/ {{ alias {root}/; max_ranges 0; }}
  }}
{tls}}}
"""
# the scenes over HTTPS with a self-signed certificate (a server whose CA the machine does not trust)
_TLS = """  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {prefix}/cert.pem;
    ssl_certificate_key {prefix}/key.pem;
    root {root};
  }}
"""


def _nginx() -> str | None:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    # the package starts a system nginx on port 80: the tests run their own
    subprocess.run(["sh", "-c", "service nginx stop || kill $(cat /run/nginx.pid)"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def need_nginx() -> str:
    exe = _nginx()
    if exe:
        return exe
    unavailable("nginx is not installed and cannot be installed here (apt-get install nginx-light, as root)",
                "TILESCAN_REQUIRE_NGINX")


@dataclass
class Request:
    method: str
    path: str
    status: int
    bytes_sent: int
    range: str | None


class Nginx:
    def __init__(self, root: Path, workdir: Path, slow_rate: str = "20k"):
        self.exe = need_nginx()
        self.root = Path(root).resolve()
        self.prefix = Path(workdir) / "nginx"
        self.extra = Path(workdir) / "extra"
        self.slow_rate = slow_rate
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tls_port = 0
        self.cert = self.prefix / "cert.pem"

    @property
    def tls_url(self) -> str | None:
        return f"https://127.0.0.1:{self.tls_port}" if self.tls_port else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> "Nginx":
        """Start on ``port`` (a restart on the same one), else on a free port."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.extra.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = port or free_port()
            conf = self.prefix / "nginx.conf"
            tls = ""
            if self._certificate():
                self.tls_port = self.tls_port or free_port()
                tls = _TLS.format(port=self.tls_port, prefix=self.prefix, root=self.root)
            conf.write_text(_CONF.format(user="user root;\n" if os.geteuid() == 0 else "", prefix=self.prefix,
                                         port=self.port, root=self.root, extra=self.extra, slow_rate=self.slow_rate,
                                         tls=tls))
            self.proc = subprocess.Popen([self.exe, "-c", str(conf), "-p", str(self.prefix)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return self
                except OSError:
                    time.sleep(0.05)
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else "did not listen in 10 s"
            self.stop()
            if "Address already in use" not in err:
                raise RuntimeError(f"nginx did not start: {err}")
        raise RuntimeError("nginx did not start: no free port")

    def _certificate(self) -> bool:
        """A self-signed certificate for 127.0.0.1 in the prefix (made once); False without openssl."""
        if self.cert.exists():
            return True
        if not shutil.which("openssl"):
            return False
        p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                            "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                            str(self.prefix / "key.pem"), "-out", str(self.cert)], capture_output=True, timeout=60)
        return p.returncode == 0

    def stop(self) -> None:
        """Stop at once (SIGTERM to the master: a "server that dies")."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def clear_log(self) -> None:
        (self.prefix / "access.log").write_text("")

    def requests(self) -> list[Request]:
        out = []
        path = self.prefix / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            head, _, rng = line.partition(' "')
            method, rest = head.split(" ", 1)
            p, status, sent = rest.rsplit(" ", 2)  # nginx logs the path decoded: it may hold spaces
            rng = rng.rstrip('"')
            out.append(Request(method, p, int(status), int(sent), None if rng == "-" else rng))
        return out
