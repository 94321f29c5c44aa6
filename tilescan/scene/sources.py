"""Scenes that are not local files: URLs read through GDAL's network file systems.

``https://host/a.tif`` is read as ``/vsicurl/https://host/a.tif``, ``s3://bucket/key`` as
``/vsis3/bucket/key``, ``gs://`` as ``/vsigs/`` and ``az://`` (or ``azure://``) as
``/vsiaz/``: GDAL fetches only the byte ranges of the blocks a read needs. Credentials and
endpoints come from GDAL's and the cloud SDKs' usual environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_S3_ENDPOINT``, ``AWS_NO_SIGN_REQUEST``, ``GS_*``, ``AZURE_*``,
``GDAL_HTTP_*``), never from tilescan's files. A URL ending in ``/`` (or an ``s3://``,
``gs://``, ``az://`` URL whose last part has no extension) is a folder: its ``*.tif`` /
``*.tiff`` objects are listed (HTML index pages for HTTP, the bucket API for the clouds).

A remote scene is a :class:`RemoteScene`: it quacks like the ``pathlib.Path`` of a local
scene where tilescan needs one (``name``, ``stem``, ``resolve()``, ``str()``) and hands GDAL
its ``/vsi…`` path through ``os.fspath``. ``str()`` is the URL without credentials (user
info and signature-like query values removed): that is what run.json, report.json, log
lines and error messages show. STAC items (:mod:`tilescan.stac`) follow the same protocol.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from ..errors import InputError, NoScenesError, TilescanError

#: URL scheme -> GDAL virtual file system prefix.
VSI = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/", "azure": "/vsiaz/"}
#: The same, the other way (for messages about a path given in GDAL's own syntax).
_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/", "/vsiswift/")
TIFF_SUFFIXES = (".tif", ".tiff")

#: GDAL settings for remote scenes, set for the /vsi… prefixes only (local files keep GDAL's
#: defaults) and only where the environment does not set the key. Chosen by measurement
#: against a local nginx (README "Scenes in the cloud", benchmarks/README.md).
REMOTE_GDAL_OPTIONS = {
    # no listing of the scene's "folder" when it is opened (a bucket prefix may hold millions
    # of keys), and so no probing for .aux.xml / .ovr / .msk sidecars
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # the blocks of one window read go out as parallel range requests, adjacent ones merged
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # transient failures (HTTP 429/5xx, dropped connections) are retried with a growing delay
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    # a connection that moves less than 1 kB/s for 60 s is given up (a hung server)
    "GDAL_HTTP_LOW_SPEED_TIME": "60",
    "GDAL_HTTP_LOW_SPEED_LIMIT": "1024",
}


# ----------------------------------------------------------------------------- URLs


def is_url(text: Any) -> bool:
    """Whether ``text`` names a remote scene or folder (a URL of a known scheme, or a GDAL
    network path such as ``/vsis3/bucket/key``)."""
    if isinstance(text, (RemoteScene,)) or getattr(text, "remote", False):
        return True
    if not isinstance(text, str):
        return False
    if text.startswith(_PREFIXES):
        return True
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return scheme in VSI


def to_gdal_path(url: str) -> str:
    """The GDAL virtual file system path of a URL (``s3://b/k`` -> ``/vsis3/b/k``)."""
    if url.startswith(_PREFIXES):
        return url
    scheme, rest = url.split("://", 1)
    prefix = VSI[scheme.lower()]
    if prefix == "/vsicurl/":
        return prefix + url
    return prefix + rest


_SECRET_PARAM = re.compile(r"(sig|signature|token|secret|password|passwd|credential|key|auth|session|policy|sas)"
                           r"|^(x-amz-|x-goog-)|^(se|sp|sv|sr|st|spr|srt|ss|skoid|sktid|skt|ske|sks|skv)$", re.I)


def redact(url: str) -> str:
    """``url`` without credentials: no ``user:password@``, and the values of query
    parameters that look like signatures or tokens replaced by ``REDACTED``."""
    prefix = ""
    for p in ("/vsicurl/",):
        if url.startswith(p) and "://" in url:
            prefix, url = p, url[len(p):]
    try:
        parts = urlsplit(url)
    except ValueError:
        return prefix + re.sub(r"//[^/@]*@", "//", url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "REDACTED" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:,")
    return prefix + urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_secrets: dict[str, str] = {}
_secrets_lock = threading.Lock()
_USERINFO = re.compile(r"(\w+://)[^/\s@]+@")


def _remember(raw: str, shown: str) -> None:
    if raw != shown:
        with _secrets_lock:
            _secrets[raw] = shown


def scrub(text: str) -> str:
    """``text`` (an error message, a log line) with every URL tilescan has seen replaced by
    its redacted form, and any ``user:password@`` left removed."""
    with _secrets_lock:
        pairs = sorted(_secrets.items(), key=lambda kv: -len(kv[0]))
    for raw, shown in pairs:
        text = text.replace(raw, shown)
    return _USERINFO.sub(r"\1", text)


def _leaf(url: str) -> str:
    from urllib.parse import unquote

    path = urlsplit(url).path if "://" in url else url
    return unquote(path.rstrip("/").rsplit("/", 1)[-1]) or "scene"


# ----------------------------------------------------------------------------- GDAL (ctypes)


@functools.cache
def _gdal() -> ctypes.CDLL | None:
    """The GDAL library rasterio loaded, for the few VSI calls rasterio does not wrap
    (listing a folder, reading HTTP headers, path-specific settings). None if not found."""
    import rasterio  # noqa: F401 - loads libgdal

    candidates = []
    try:
        with open("/proc/self/maps") as fh:
            candidates += [line.split()[-1] for line in fh if "libgdal" in line and "/" in line]
    except OSError:
        pass
    here = Path(rasterio.__file__).parent
    for pattern in ("../rasterio.libs/libgdal*", ".dylibs/libgdal*", "../rasterio.libs/gdal*.dll"):
        candidates += sorted(glob.glob(str(here / pattern)))
    found = ctypes.util.find_library("gdal")
    if found:
        candidates.append(found)
    for cand in candidates:
        try:
            lib = ctypes.CDLL(cand)
            strlist = ctypes.POINTER(ctypes.c_char_p)
            lib.VSIReadDirRecursive.restype = strlist
            lib.VSIReadDirRecursive.argtypes = [ctypes.c_char_p]
            lib.VSIGetFileMetadata.restype = strlist
            lib.VSIGetFileMetadata.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
            lib.CSLDestroy.argtypes = [strlist]
            lib.CPLGetLastErrorMsg.restype = ctypes.c_char_p
            lib.CPLErrorReset.argtypes = []
            lib.VSIIngestFile.restype = ctypes.c_int
            lib.VSIIngestFile.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                                          ctypes.POINTER(ctypes.c_uint64), ctypes.c_int64]
            lib.VSIFree.argtypes = [ctypes.c_void_p]
            if hasattr(lib, "VSICurlPartialClearCache"):
                lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
            if hasattr(lib, "VSISetPathSpecificOption"):
                lib.VSISetPathSpecificOption.argtypes = [ctypes.c_char_p] * 3
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _strings(lib, ptr) -> list[str]:
    out = []
    if ptr:
        i = 0
        while ptr[i]:
            out.append(ptr[i].decode("utf-8", "replace"))
            i += 1
        lib.CSLDestroy(ptr)
    return out


def _last_error(lib) -> str:
    msg = lib.CPLGetLastErrorMsg()
    return msg.decode("utf-8", "replace") if msg else ""


def list_folder(gdal_dir: str) -> list[str]:
    """Relative names of every file under a remote folder (GDAL's VSIReadDirRecursive).
    Raises :class:`InputError` when it cannot be listed."""
    lib = _gdal()
    shown = scrub(gdal_dir)
    if lib is None:
        raise InputError("cannot list a remote folder: GDAL's library was not found", path=shown)
    with _gdal_env():
        lib.CPLErrorReset()
        names = _strings(lib, lib.VSIReadDirRecursive(gdal_dir.encode()))
        err = _last_error(lib)
    if not names and err:
        raise InputError(f"cannot list this folder URL: {cause(err)}", path=shown)
    return names


def headers(gdal_path: str) -> dict[str, str] | None:
    """The HTTP headers GDAL got for a remote file (a HEAD request, cached by GDAL), or
    None when there are none (the object does not exist, or the scheme has no headers)."""
    lib = _gdal()
    if lib is None:
        return None
    with _gdal_env():
        lib.CPLErrorReset()
        items = _strings(lib, lib.VSIGetFileMetadata(gdal_path.encode(), b"HEADERS", None))
    if not items:
        return None
    return {k.lower(): v for k, _, v in (i.partition("=") for i in items)}


def read_bytes(gdal_path: str, limit: int = 64 << 20) -> bytes:
    """A whole remote (or local) file through GDAL (a STAC JSON document)."""
    lib = _gdal()
    if lib is None:
        raise InputError("cannot read a remote file: GDAL's library was not found", path=scrub(gdal_path))
    buf = ctypes.c_void_p()
    size = ctypes.c_uint64()
    with _gdal_env():
        lib.CPLErrorReset()
        ok = lib.VSIIngestFile(None, gdal_path.encode(), ctypes.byref(buf), ctypes.byref(size), limit)
        err = _last_error(lib)
    if not ok:
        raise InputError(f"cannot read: {cause(err or 'no such file')}", path=scrub(gdal_path))
    try:
        return ctypes.string_at(buf, size.value)
    finally:
        lib.VSIFree(buf)


@contextlib.contextmanager
def _gdal_env() -> Iterator[None]:
    """rasterio's GDAL environment (its error handler, drivers) around direct GDAL calls."""
    import rasterio

    with rasterio.Env():
        yield


_curl_last: dict[str, str] = {}  # URL -> the last transfer failure GDAL's /vsicurl/ noted for it
_CURL_LINE = re.compile(r"VSICURL: \w+\((?P<url>[^)]+)\).*?(?:curl error )?msg=(?P<msg>.+)$")
#: bounded retries of a remote scene whose transfer failed (GDAL retries HTTP 429/5xx per
#: request itself, but not a transfer cut short by a timeout or a dropped connection)
UNIT_RETRIES = 2
UNIT_RETRY_DELAY_S = 2.0


class _CurlWatch(logging.Filter):
    """Keeps the last transfer failure per URL from GDAL's VSICURL debug messages: GDAL
    reports a timed-out or cut transfer only there (the read error just says a block came
    short), and the cause belongs in the scene's error message. A filter on rasterio's
    loggers: records below the level the logger had before are seen here and dropped, so
    the user's logging shows nothing new."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            try:
                m = _CURL_LINE.search(record.getMessage())
            except Exception:  # a record that does not format: not ours
                m = None
            if m and m.group("msg").strip():
                _curl_last[m.group("url").removeprefix("/vsicurl/")] = m.group("msg").strip()
        return record.levelno >= self.level


def _watch_transfers() -> None:
    """Route GDAL's VSICURL debug messages (only those: CPL_DEBUG=VSICURL, unless the
    environment sets CPL_DEBUG) to :class:`_CurlWatch`."""
    from rasterio.env import get_gdal_config, set_gdal_config

    if "CPL_DEBUG" not in os.environ and not get_gdal_config("CPL_DEBUG"):
        set_gdal_config("CPL_DEBUG", "VSICURL")
    for name in ("rasterio._err", "rasterio._env"):
        lg = logging.getLogger(name)
        if any(isinstance(f, _CurlWatch) for f in lg.filters):
            continue
        lg.addFilter(_CurlWatch(lg.getEffectiveLevel()))
        lg.setLevel(logging.DEBUG)


def transfer_failure(url: str) -> str | None:
    """The last transfer failure GDAL noted for ``url`` (e.g. "Operation timed out ..."), if any."""
    return _curl_last.get(url)


def configure_gdal() -> None:
    """Apply :data:`REMOTE_GDAL_OPTIONS` to GDAL's network file systems only (path-specific
    options, GDAL >= 3.6; local files keep GDAL's defaults). A key set in the environment
    wins (path-specific options would otherwise hide it). Cheap: called per run and open."""
    lib = _gdal()
    _watch_transfers()
    if lib is None or not hasattr(lib, "VSISetPathSpecificOption"):
        return
    for key, default in REMOTE_GDAL_OPTIONS.items():
        value = os.environ.get(key, default)
        for prefix in ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/"):
            lib.VSISetPathSpecificOption(prefix.encode(), key.encode(), value.encode())


# ----------------------------------------------------------------------------- errors


_UNREACHABLE = ("couldn't connect", "could not connect", "connection refused", "failed to connect", "could not resolve",
                "couldn't resolve", "connection reset", "empty reply", "recv failure", "send failure",
                "server returned nothing", "did not answer")


def cause(message: str) -> str:
    """A short reason for a GDAL/cURL network error message, followed by GDAL's words."""
    m = scrub(message.strip())
    low = m.lower()
    code = re.search(r"http (?:response )?(?:code|error)[: ]+(\d{3})|\b(\d{3})\b (?:not found|forbidden|unauthorized)", low)
    num = next((g for g in code.groups() if g), None) if code else None
    if any(s in low for s in _UNREACHABLE):  # before 404: GDAL calls an unreachable file "does not exist"
        why = "cannot reach the server (connection refused, reset or dropped)"
    elif "timed out" in low or "too slow" in low or "timeout" in low:
        why = "timed out (GDAL_HTTP_TIMEOUT / GDAL_HTTP_LOW_SPEED_TIME)"
    elif num == "404" or "does not exist in the file system" in low or "nosuchkey" in low or "nosuchbucket" in low:
        why = "not found (HTTP 404)"
    elif num in ("401", "403") or any(s in low for s in ("accessdenied", "access denied", "signaturedoesnotmatch",
                                                         "invalidaccesskeyid", "authentication", "unauthorized")):
        why = (f"access denied (HTTP {num or '403'}): check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
               "AWS_PROFILE, GS_*, AZURE_*; AWS_NO_SIGN_REQUEST=YES for public buckets)")
    elif re.search(r"transfer closed|bytes remaining|bytes missing|partial file", low):
        why = "the transfer was cut short (the server closed the connection mid-block)"
    elif num and num[0] == "5":
        why = f"server error (HTTP {num}), still failing after GDAL_HTTP_MAX_RETRY retries"
    elif num:
        why = f"HTTP {num}"
    else:
        return m or "unknown error"
    return f"{why}; GDAL said: {m}" if m else why


def _network_error(message: str) -> bool:
    low = message.lower()
    return any(s in low for s in ("curl", "http", "timed out", "timeout", "connect", "vsis3", "vsigs", "vsiaz",
                                  "access denied", "accessdenied", "nosuch", "did not answer", "transfer closed",
                                  "bytes missing", "end of response"))


_TRANSIENT = ("timed out", "cannot reach the server", "server error", "cut short")


def _failure_text(scene: Any, text: str) -> str:
    """GDAL's read error for a remote scene, with the transfer failure behind it when GDAL
    noted one (a timeout or a dropped connection shows only as a block that came short)."""
    for url in getattr(scene, "urls", lambda: [])():
        noted = _curl_last.pop(url, None)
        if noted:
            return f"{noted} ({text})"
    if re.search(r"got \d+ bytes, expected \d+", text):
        for url in getattr(scene, "urls", lambda: [])():
            down = _probe(url)
            if down:
                return f"{down} ({text})"
    return text


def _probe(url: str) -> str | None:
    """Why ``url`` cannot be reached now (GDAL's error), or None when it answers."""
    lib = _gdal()
    if lib is None:
        return None
    path = to_gdal_path(url)
    with _gdal_env():
        if hasattr(lib, "VSICurlPartialClearCache"):
            lib.VSICurlPartialClearCache(path.encode())
        lib.CPLErrorReset()
        ok = _strings(lib, lib.VSIGetFileMetadata(path.encode(), b"HEADERS", None))
        err = _last_error(lib)
    return None if ok else (err or "the server did not answer (connection refused or dropped)")


@contextlib.contextmanager
def remote_errors(scene: Any) -> Iterator[None]:
    """Around the work on one scene: for a remote scene, turn network failures (GDAL's own
    exceptions, or tilescan's "cannot read" errors caused by them) into an
    :class:`InputError` naming the URL without credentials and the cause; one whose cause
    may pass (a timeout, a dropped connection, HTTP 5xx) is marked ``transient``."""
    if not getattr(scene, "remote", False):
        yield
        return
    try:
        yield
    except TilescanError as exc:
        text = exc.message if exc.message.startswith("cannot open: ") else _failure_text(scene, exc.message)
        if _network_error(text) and not text.startswith("cannot open: "):
            text = re.sub(r"^corrupt or truncated TIFF(?: \(GDAL cannot open it\))?: ", "", text)
            if not text.startswith(("cannot open", "not found", "access denied")):
                text = f"remote read failed: {cause(text)}"
        exc.message = scrub(text)
        exc.path = str(scene)
        exc.transient = any(t in exc.message for t in _TRANSIENT)  # type: ignore[attr-defined]
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        from rasterio.errors import RasterioError

        from .info import _describe

        if isinstance(exc, OSError) and not isinstance(exc, RasterioError):
            raise  # the output side (disk full, permissions), not the network
        err = InputError(f"remote read failed: {cause(_failure_text(scene, _describe(exc)))}", path=str(scene))
        err.transient = any(t in err.message for t in _TRANSIENT)  # type: ignore[attr-defined]
        raise err from None


class SceneRetries:
    """Bounded retries of remote scenes whose transfer failed for a cause that may pass
    (timeout, dropped connection, HTTP 5xx after GDAL's own retries): such a unit is run
    again after the others, ``TILESCAN_REMOTE_RETRIES`` times (default :data:`UNIT_RETRIES`),
    waiting :data:`UNIT_RETRY_DELAY_S` seconds, then twice as long each time; a stop
    request (SIGTERM) ends the waiting. Errors come out of :func:`remote_errors`."""

    def __init__(self):
        try:
            self.retries = max(0, int(os.environ.get("TILESCAN_REMOTE_RETRIES", UNIT_RETRIES)))
        except ValueError:
            self.retries = UNIT_RETRIES
        self.attempt = 0  # retries done so far
        self.delay = UNIT_RETRY_DELAY_S

    def wants(self, scene: Any, exc: BaseException) -> bool:
        """Whether ``exc`` of ``scene`` earns it another try."""
        return (getattr(scene, "remote", False) and isinstance(exc, InputError) and getattr(exc, "transient", False)
                and self.attempt < self.retries)

    def annotate(self, exc: BaseException) -> None:
        """Say in a final error how often the scene was tried again."""
        if self.attempt and isinstance(exc, InputError) and getattr(exc, "transient", False):
            exc.message += f" (after {self.attempt} retr{'y' if self.attempt == 1 else 'ies'} of the scene)"

    def wait(self, scenes: Sequence[Any], log) -> bool:
        """Wait before the next try of ``scenes``; False if a stop request came meanwhile."""
        from .. import stop

        self.attempt += 1
        log(f"trying {len(scenes)} scene(s) again in {self.delay:g} s ({self.attempt} of {self.retries})")
        end = time.monotonic() + self.delay
        while time.monotonic() < end and not stop.requested():
            time.sleep(0.1)
        if stop.requested():
            return False
        self.delay *= 2
        for scene in scenes:
            for url in scene.urls():
                _probe(url)  # forget what GDAL cached about it (a failed HEAD, a short block)
        return True


# ----------------------------------------------------------------------------- scenes


class RemoteScene(os.PathLike):
    """A scene behind a URL. ``os.fspath()`` is GDAL's path (with any credentials the URL
    holds, for GDAL only); ``str()`` is the URL without them."""

    remote = True

    def __init__(self, url: str):
        self.url = url
        self.gdal_path = to_gdal_path(url)
        self.shown = redact(url)
        _remember(url, self.shown)
        _remember(self.gdal_path, to_gdal_path(self.shown) if "://" in self.shown else self.shown)
        self.name = _leaf(self.shown.split("?", 1)[0])

    # -- the pathlib.Path protocol tilescan uses ---------------------------------------

    def __fspath__(self) -> str:
        return self.gdal_path

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"RemoteScene({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteScene) and other.shown == self.shown

    def __hash__(self) -> int:
        return hash(("remote", self.shown))

    def __lt__(self, other: Any) -> bool:
        return str(self) < str(other)

    @property
    def stem(self) -> str:
        stem, dot, suffix = self.name.rpartition(".")
        return stem if dot and stem else self.name

    @property
    def suffix(self) -> str:
        stem, dot, suffix = self.name.rpartition(".")
        return f".{suffix}" if dot and stem else ""

    def resolve(self) -> "RemoteScene":
        return self

    def exists(self) -> bool:
        return True  # found out when it is opened: a URL costs a request

    def is_dir(self) -> bool:
        return False

    def is_file(self) -> bool:
        return True

    # -- remote --------------------------------------------------------------------------

    def open(self, decode_threads: int = 1):
        """The rasterio dataset; :class:`InputError` naming the URL and the cause if not."""
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        configure_gdal()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(self.gdal_path)
        except Exception as exc:
            from .info import _describe

            text = _failure_text(self, _describe(exc))  # with the transfer failure behind it, if any
            low = text.lower()
            if _network_error(text) or "does not exist in the file system" in low:
                why = cause(text)
            elif "not recognized as" in low:
                why = f"not a GeoTIFF GDAL can read; GDAL said: {scrub(text)}"
            else:
                why = f"corrupt or truncated TIFF (GDAL cannot open it): {scrub(text)}"
            raise InputError(f"cannot open: {why}", path=self.shown) from None

    def identity(self) -> dict:
        """What the outputs depend on (the fingerprint): the URL without credentials, and
        the object's size and validators (ETag, Last-Modified) from its HTTP headers."""
        configure_gdal()
        h = headers(self.gdal_path)
        if h is None:  # no headers: GDAL's open says why (404, refused...), or the scheme has none
            self.open().close()
            h = {}
        return {"scene": self.shown, "size": _int(h.get("content-length")),
                "etag": h.get("etag"), "last_modified": h.get("last-modified")}

    def manifest(self) -> dict:
        return {"source": {"kind": "url", "url": self.shown}}

    def urls(self) -> list[str]:
        """The URLs read for this scene, as GDAL is given them (for its failure notes)."""
        return [self.url]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def scene_identity(scene: Any) -> dict:
    """The part of a unit's fingerprint that names its scene: path, size and mtime of a
    local file (as tilescan always had it), URL and validators of a remote one."""
    if hasattr(scene, "identity"):
        return scene.identity()
    st = scene.stat()
    return {"scene": str(scene.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def manifest_fields(scene: Any) -> dict:
    """Extra run.json fields for a remote or STAC scene (nothing for a local file)."""
    return scene.manifest() if hasattr(scene, "manifest") else {}


def _is_folder_url(url: str) -> bool:
    path = urlsplit(url).path if "://" in url else url
    if path.endswith("/") or not path.strip("/"):
        return True
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    return scheme in ("s3", "gs", "az", "azure") and "." not in leaf and "?" not in url


def expand_url(url: str) -> list[RemoteScene]:
    """A scene URL as one scene; a folder URL as its ``*.tif`` / ``*.tiff`` objects (sorted)."""
    if not _is_folder_url(url):
        return [RemoteScene(url)]
    configure_gdal()
    base = url if url.endswith("/") else url + "/"
    gdal_dir = to_gdal_path(base)
    _remember(base, redact(base))
    _remember(gdal_dir, to_gdal_path(redact(base)))
    names = [n for n in list_folder(gdal_dir.rstrip("/")) if n.lower().endswith(TIFF_SUFFIXES)]
    if not names:
        raise NoScenesError("no *.tif / *.tiff objects found under this folder URL", path=redact(base))
    http = base.split("://", 1)[0].lower() in ("http", "https")
    scenes = []
    for n in sorted(set(names)):
        rel = quote(n, safe="/") if http else n
        if "?" in base:  # a signed folder URL: its query goes after each object's path
            head, _, q = base.partition("?")
            scenes.append(RemoteScene(f"{head}{rel}?{q}"))
        else:
            scenes.append(RemoteScene(base + rel))
    return scenes


def find_inputs(inputs: Sequence[Any], stac: Sequence[str] = (), assets: Sequence[str] | None = None) -> tuple[list, list[InputError]]:
    """The scenes of ``inputs`` (local files and folders, URLs, STAC documents: ``*.json``)
    and ``stac`` (STAC documents whatever their name), in a fixed order (local files as
    :func:`tilescan.scene.info.find_scenes` sorts them, then URLs and STAC items in the order
    given), and the inputs that failed alone, as errors. Raises when nothing is left: the
    first input's error, or :class:`NoScenesError`.
    """
    from .info import find_scenes

    local = [p for p in inputs if not is_url(p) and not _is_stac_file(p)]
    other = [p for p in inputs if is_url(p) or _is_stac_file(p)]
    failed: list[InputError] = []
    missing = [p for p in local if not os.path.exists(p)]
    present = [p for p in local if os.path.exists(p)]
    for p in missing:
        failed.append(InputError("no such file or directory", path=str(p)))
    remote: list = []
    for item in list(other) + [(s, "stac") for s in stac]:
        src, forced = (item if isinstance(item, tuple) else (item, None))
        try:
            if forced or _is_stac_file(src):
                from .stac import load_items

                remote.extend(load_items(str(src), assets))
            elif getattr(src, "remote", False):
                remote.append(src)
            else:
                remote.extend(expand_url(str(src)))
        except InputError as exc:
            failed.append(exc)
    scenes: list = []
    if present:
        try:
            scenes = list(find_scenes(present))
        except NoScenesError as exc:  # a local folder without scenes: alone, when URLs give some
            if not remote:
                raise
            failed.append(exc)
    elif missing and not remote:
        find_scenes(local)  # raises the first missing input's error, as tilescan always did
    seen = set()
    for s in remote:
        if s not in seen:
            seen.add(s)
            scenes.append(s)
    if not scenes:
        if failed:
            raise failed[0]
        raise NoScenesError("no scenes given")
    return scenes, failed


def _is_stac_file(p: Any) -> bool:
    text = str(p)
    return not getattr(p, "remote", False) and text.split("?", 1)[0].lower().endswith(".json")


def scene_path(text: str | os.PathLike) -> Any:
    """One named input as a scene: a :class:`RemoteScene` for a URL, else a ``Path``."""
    if getattr(text, "remote", False):
        return text
    if isinstance(text, str) and is_url(text):
        return RemoteScene(text)
    return Path(text)
