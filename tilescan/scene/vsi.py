"""GDAL's network file systems, as tilescan uses them for remote scenes
(:mod:`tilescan.scene.sources`) and STAC documents (:mod:`tilescan.scene.stac`).

URLs as GDAL paths (``https://`` -> ``/vsicurl/https://``, ``s3://`` -> ``/vsis3/``, ``gs://``
-> ``/vsigs/``, ``az://`` -> ``/vsiaz/``); URLs without their credentials for everything a
user sees (:func:`redact`, and :func:`scrub` for any text holding a URL tilescan has seen); the
few VSI calls rasterio does not wrap (listing a folder, HTTP headers, reading a whole file,
probing a server), through ctypes on the GDAL library rasterio loaded; tilescan's GDAL
settings for the network file systems only (:data:`REMOTE_GDAL_OPTIONS`); the transfer
failures GDAL notes only in its debug messages; and a short cause for a network error message.
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
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InputError


#: URL scheme -> GDAL virtual file system prefix.
VSI = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/", "azure": "/vsiaz/"}

#: The same, the other way (for messages about a path given in GDAL's own syntax).
_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/", "/vsiswift/")

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
    if getattr(text, "remote", False):  # a RemoteScene or a STAC item
        return True
    if not isinstance(text, str):
        return False
    if text.startswith(_PREFIXES):
        return True
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return scheme in VSI


def is_http(url: str) -> bool:
    """Whether ``url`` is an HTTP(S) URL (query and fragment are URL syntax there, not part of
    an object store's key)."""
    return "://" in url and url.split("://", 1)[0].lower() in ("http", "https")


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
    if not is_http(url):
        return prefix + url  # an object store's key as written: '?' and '#' belong to it, no secret does
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


def remember_redacted(raw: str, shown: str) -> None:
    """Have :func:`scrub` show ``raw`` (a URL with credentials) as ``shown`` from now on."""
    if raw != shown:
        with _secrets_lock:
            _secrets[raw] = shown


_URL_IN_TEXT = re.compile(r"\w+://[^\s'\"<>]+")


def _redacted_in_text(m: re.Match) -> str:
    """A URL found in free text, redacted when its query holds a secret-looking parameter
    (else as written: :func:`redact` re-encodes a query); trailing punctuation kept."""
    url = m.group(0)
    tail = len(url) - len(url.rstrip(":;,.)]'"))
    url, end = url[: len(url) - tail], url[len(url) - tail:]
    query = url.partition("?")[2]
    if query and any(_SECRET_PARAM.search(k) for k, _ in parse_qsl(query, keep_blank_values=True)):
        url = redact(url)
    return url + end


def scrub(text: str) -> str:
    """``text`` (an error message, a log line) with every URL tilescan has seen replaced by
    its redacted form, and any other URL with a secret in its query or ``user:password@``
    redacted too (a URL that reached a message by a way tilescan did not foresee)."""
    with _secrets_lock:
        pairs = sorted(_secrets.items(), key=lambda kv: -len(kv[0]))
    for raw, shown in pairs:
        text = text.replace(raw, shown)
    return _URL_IN_TEXT.sub(_redacted_in_text, _USERINFO.sub(r"\1", text))


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
            if hasattr(lib, "VSIGetLastErrorMsg"):
                lib.VSIStatExL.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
                lib.VSIGetLastErrorMsg.restype = ctypes.c_char_p
                lib.VSIErrorReset.argtypes = []
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


def list_folder(gdal_dir: str, shown: str | None = None) -> list[str]:
    """Relative names of every file under a remote folder (GDAL's VSIReadDirRecursive).
    Raises :class:`InputError` naming ``shown`` (default: the path without credentials) when
    it cannot be listed."""
    lib = _gdal()
    shown = shown or scrub(gdal_dir)
    if lib is None:
        raise InputError("cannot list a remote folder: GDAL's library was not found", path=shown)
    with _gdal_env():
        lib.CPLErrorReset()
        names = _strings(lib, lib.VSIReadDirRecursive(gdal_dir.encode()))
        err = _last_error(lib)
    err = err or (stat_error(gdal_dir + "/") if not names else "")
    if not names and err and (why := _why_unlisted(lib, gdal_dir)):
        err = f"{err} ({why})"  # GDAL's error says only "HTTP response code: 0"; the transfer, why (a certificate)
    if not names and err:
        web = gdal_dir.startswith("/vsicurl/") and "(HTTP 403)" in cause(err)  # a web server may refuse any listing
        hint = "; or the server does not list this folder: give the scenes' own URLs" if web else ""
        raise InputError(f"cannot list this folder URL: {cause(err, gdal_dir)}{hint}", path=shown)
    return names


def _why_unlisted(lib, gdal_dir: str) -> str | None:
    """The transfer's failure behind a folder that could not be listed: as GDAL noted it, else
    from a new request (GDAL's cached failure of an earlier check keeps only "response code 0")."""
    url = gdal_dir.removeprefix("/vsicurl/")
    if why := take_transfer_failure(url) or take_transfer_failure(url.rstrip("/") + "/"):
        return why
    if not hasattr(lib, "VSICurlPartialClearCache"):
        return None
    lib.VSICurlPartialClearCache(gdal_dir.rstrip("/").encode())
    why = stat_error(gdal_dir.rstrip("/") + "/")
    return why if why and "curl error" in why.lower() else None


#: VSIStatExL flags: whether the path exists; set VSI's last error when it does not.
_STAT_EXISTS, _STAT_SET_ERROR = 0x1, 0x8


def stat_error(gdal_path: str) -> str | None:
    """Why GDAL cannot find ``gdal_path`` (its words, e.g. "HTTP response code: 403"), or None
    when it exists. A folder that lists empty, or a file GDAL "cannot open", says no more than
    that; this asks for the server's answer."""
    lib = _gdal()
    if lib is None or not hasattr(lib, "VSIGetLastErrorMsg"):
        return None
    stat = ctypes.create_string_buffer(512)  # a VSIStatBufL (struct stat), not read
    with _gdal_env():
        lib.VSIErrorReset()
        if lib.VSIStatExL(gdal_path.encode(), stat, _STAT_EXISTS | _STAT_SET_ERROR) == 0:
            return None
        msg = lib.VSIGetLastErrorMsg()
    return msg.decode("utf-8", "replace") if msg else "no such file"


def _http_answer(message: str | None) -> str | None:
    """``message`` when it gives a server's answer (an HTTP code, a cloud error name)."""
    return message if message and re.search(r"\b[1-5]\d\d\b|Error|Denied|NoSuch", message) else None


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


def read_bytes(gdal_path: str, limit: int = 64 << 20, shown: str | None = None) -> bytes:
    """A whole remote (or local) file through GDAL (a STAC JSON document). An error names
    ``shown`` (default: the path without credentials)."""
    lib = _gdal()
    shown = shown or scrub(gdal_path)
    if lib is None:
        raise InputError("cannot read a remote file: GDAL's library was not found", path=shown)
    buf = ctypes.c_void_p()
    size = ctypes.c_uint64()
    with _gdal_env():
        lib.CPLErrorReset()
        ok = lib.VSIIngestFile(None, gdal_path.encode(), ctypes.byref(buf), ctypes.byref(size), limit)
        err = _last_error(lib)
    if not ok:
        why = (_http_answer(stat_error(gdal_path)) or take_transfer_failure(gdal_path.removeprefix("/vsicurl/"))
               or err or "no such file")  # "Cannot open file" says less than the server's answer or curl's failure
        raise InputError(f"cannot read: {cause(why, gdal_path)}", path=shown)
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


def probe(url: str) -> str | None:
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
    if ok:
        return None
    # no headers and no error: the server's answer (403 once a signed URL expires), else none came
    return err or _http_answer(stat_error(path)) or "the server did not answer (connection refused or dropped)"


# ----------------------------------------------------------------------------- transfer failures


_curl_last: dict[str, str] = {}  # URL -> the last transfer failure GDAL's /vsicurl/ noted for it
_CURL_LINE = re.compile(r"VSICURL: \w+\((?P<url>[^)]+)\).*?(?:curl error )?msg=(?P<msg>.+)$")


class _CurlWatch(logging.Filter):
    """Keeps the last transfer failure per URL from GDAL's VSICURL debug messages: GDAL
    reports a timed-out or cut transfer only there (the read error just says a block came
    short), and the cause belongs in the scene's error message. A filter on rasterio's
    loggers, which it turns to DEBUG: records below the level the logger would have without
    it (its own level set before, else its parents', as the user sets them now or later) are
    seen here and dropped, so the user's logging shows nothing new and loses nothing."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.own = logger, logger.level  # NOTSET (0): its parents decide

    @property
    def level(self) -> int:
        parent = self.logger.parent
        return self.own or (parent.getEffectiveLevel() if parent is not None else logging.WARNING)

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
    environment sets CPL_DEBUG) to :class:`_CurlWatch`. Set for the calling thread only: set
    for the process (rasterio does so from the main thread), GDAL printed them, URLs with their
    credentials, on stderr from every thread that reads outside rasterio's error handler."""
    from rasterio.env import get_gdal_config

    lib = _gdal()
    if "CPL_DEBUG" not in os.environ and not get_gdal_config("CPL_DEBUG") and lib is not None:
        lib.CPLSetThreadLocalConfigOption(b"CPL_DEBUG", b"VSICURL")
    for name in ("rasterio._err", "rasterio._env"):
        lg = logging.getLogger(name)
        if any(isinstance(f, _CurlWatch) for f in lg.filters):
            continue
        lg.addFilter(_CurlWatch(lg))
        lg.setLevel(logging.DEBUG)


def transfer_failure(url: str) -> str | None:
    """The last transfer failure GDAL noted for ``url`` (e.g. "Operation timed out ..."), if any."""
    return _curl_last.get(url)


def take_transfer_failure(url: str) -> str | None:
    """:func:`transfer_failure`, forgotten once read (the next failure is a new one)."""
    return _curl_last.pop(url, None)


def configure_gdal(watch: bool = True) -> None:
    """Apply :data:`REMOTE_GDAL_OPTIONS` to GDAL's network file systems only (path-specific
    options, GDAL >= 3.6; local files keep GDAL's defaults). A key set in the environment
    wins (path-specific options would otherwise hide it). Cheap: called per run and open.
    ``watch``: also note transfer failures (:func:`_watch_transfers`); every remote scene
    turns it on when it is listed, identified or opened. Off, rasterio's debug messages are
    not made at all (a local scene's outputs open GDAL a few times each)."""
    lib = _gdal()
    if watch:
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


_UNTRUSTED = ("ssl certificate problem", "certificate verify failed", "self-signed certificate",
              "self signed certificate", "unable to get local issuer certificate")


def cause(message: str, where: str = "") -> str:
    """A short reason for a GDAL/cURL network error message, followed by GDAL's words;
    ``where``: the URL or GDAL path it came from (an object store's wants other credentials)."""
    m = scrub(message.strip())
    low = m.lower()
    code = re.search(r"http (?:response )?(?:code|error)[: ]+(\d{3})|\b(\d{3})\b (?:not found|forbidden|unauthorized)"
                     r"|response code(?: on \S+)?: (\d+)$", low)
    num = next((g for g in code.groups() if g), None) if code else None
    if "configuration option" in low and "not defined" in low:  # GDAL found no credentials to sign with
        why = ("no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
               "an instance or pod role; GS_*, AZURE_* for Google and Azure), or AWS_NO_SIGN_REQUEST=YES "
               "(GS_/AZURE_NO_SIGN_REQUEST) for a public bucket")
    elif any(s in low for s in _UNTRUSTED):  # before 404 and "no answer": GDAL says those of a refused certificate
        why = ("the server's TLS certificate is not trusted: set GDAL_CURL_CA_BUNDLE to your CA bundle (or "
               "GDAL_HTTP_UNSAFESSL=YES to skip the check)")
    elif "range downloading not supported" in low:
        why = ("the server does not answer HTTP Range requests, which reading part of a remote GeoTIFF needs: "
               "download the file, or serve it from a server that does")
    elif any(s in low for s in _UNREACHABLE) or num == "0":  # curl's code 0: no answer at all  # before 404: GDAL calls an unreachable file "does not exist"
        why = "cannot reach the server (connection refused, reset or dropped" + (
            "; or its TLS certificate is not trusted here: GDAL_CURL_CA_BUNDLE)" if "https://" in f"{low} {where.lower()}"
            else ")")  # GDAL's cached failure of a certificate keeps only "code 0"
    elif "timed out" in low or "too slow" in low or "timeout" in low:
        why = "timed out (GDAL_HTTP_TIMEOUT / GDAL_HTTP_LOW_SPEED_TIME)"
    elif num == "404" or "does not exist in the file system" in low or "nosuchkey" in low or "nosuchbucket" in low \
            or re.search(r"specified (?:key|bucket) does not exist", low):
        why = "not found (HTTP 404)"
    elif num in ("401", "403") or any(s in low for s in ("accessdenied", "access denied", "signaturedoesnotmatch",
                                                         "invalidaccesskeyid", "authentication", "unauthorized",
                                                         "signature we calculated", "access key id you provided")):
        cloud = any(k in f"{low} {where.lower()}" for k in ("vsis3", "vsigs", "vsiaz", "s3://", "gs://", "az://")) \
            or "http" not in low
        why = f"access denied (HTTP {num or '403'}): check the credentials " + (
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GS_*, AZURE_*; AWS_NO_SIGN_REQUEST=YES for public "
            "buckets)" if cloud else "(GDAL_HTTP_AUTH + GDAL_HTTP_USERPWD, GDAL_HTTP_HEADERS, or a new signed URL)")
    elif re.search(r"transfer closed|bytes remaining|bytes missing|partial file", low):
        why = "the transfer was cut short (the server closed the connection mid-block)"
    elif num and num[0] == "5":
        why = f"server error (HTTP {num}), still failing after GDAL_HTTP_MAX_RETRY retries"
    elif num:
        why = f"HTTP {num}"
    else:
        return m or "unknown error"
    return f"{why}; GDAL said: {m}" if m else why
