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
lines and error messages show. STAC items (:mod:`tilescan.scene.stac`) follow the same protocol.
GDAL's side of it (URL to ``/vsi…`` path, redaction, direct VSI calls, network settings)
is :mod:`tilescan.scene.vsi`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote, unquote, urlsplit

from ..errors import InputError, NoScenesError, TilescanError
from ..log import catching_warnings
from .vsi import (
    cause,
    configure_gdal,
    headers,
    is_http,
    is_url,
    list_folder,
    probe,
    redact,
    remember_redacted,
    scrub,
    take_transfer_failure,
    to_gdal_path,
)

TIFF_SUFFIXES = (".tif", ".tiff")

#: bounded retries of a remote scene whose transfer failed (GDAL retries HTTP 429/5xx per
#: request itself, but not a transfer cut short by a timeout or a dropped connection)
UNIT_RETRIES = 2
UNIT_RETRY_DELAY_S = 2.0


# ----------------------------------------------------------------------------- errors


def server_of(scene: Any) -> str | None:
    """The server (scheme and host, or bucket) a remote scene is read from; None for a file."""
    if not getattr(scene, "remote", False):
        return None
    parts = urlsplit(str(scene))
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else None


def _network_error(message: str) -> bool:
    low = re.sub(r"(?:/vsi\w+/)?\w+://\S+|/vsi\w+/\S+", "", message.lower())  # not the URL's own "http" or "/vsis3/"
    return any(s in low for s in ("curl", "http", "timed out", "timeout", "connect", "vsis3", "vsigs", "vsiaz",
                                  "access denied", "accessdenied", "nosuch", "did not answer", "too slow", "transfer closed",
                                  "configuration option",  # GDAL's "...SECRET_ACCESS_KEY ... not defined": no credentials
                                  "bytes missing", "end of response"))


_TRANSIENT = ("timed out", "cannot reach the server", "server error", "cut short")


def timed_out(exc: InputError) -> bool:
    """Whether a failure is a timeout: GDAL has retried it GDAL_HTTP_MAX_RETRY times already,
    which a hung server makes cost minutes each try."""
    return "timed out" in exc.message


def _failure_text(scene: Any, text: str) -> str:
    """GDAL's read error for a remote scene, with the transfer failure behind it when GDAL
    noted one (a timeout or a dropped connection shows only as a block that came short)."""
    for url in getattr(scene, "urls", lambda: [])():
        noted = take_transfer_failure(url)
        if noted:
            return f"{noted} ({text})"
    if re.search(r"got \d+ bytes, expected \d+", text):
        for url in getattr(scene, "urls", lambda: [])():
            down = probe(url)
            if down:
                return f"{down} ({text})"
    return text


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
        told = exc.message.startswith(("cannot open: ", "asset "))  # its cause already said (a STAC asset's too)
        text = exc.message if told else _failure_text(scene, exc.message)
        if _network_error(text) and not told:
            text = re.sub(r"^corrupt or truncated TIFF(?: \(GDAL cannot open it\))?: ", "", text)
            if not text.startswith(("cannot open", "not found", "access denied")):
                text = f"remote read failed: {cause(text, str(scene))}"
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
        err = InputError(f"remote read failed: {cause(_failure_text(scene, _describe(exc)), str(scene))}", path=str(scene))
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
                and any(t in exc.message for t in _TRANSIENT if t != "timed out")  # not for a timeout alone
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
                probe(url)  # forget what GDAL cached about it (a failed HEAD, a short block)
        return True


# ----------------------------------------------------------------------------- scenes


def _url_path(url: str) -> str:
    """The path part of a URL: an HTTP URL's without query and fragment; an object store's key
    as written (``s3://b/x#1?.tif``: ``#`` and ``?`` are characters of the key)."""
    if is_http(url):
        return urlsplit(url).path
    return "/" + url.split("://", 1)[1].partition("/")[2] if "://" in url else url


def _leaf(url: str) -> str:
    leaf = _url_path(url).rstrip("/").rsplit("/", 1)[-1]
    return (unquote(leaf) if is_http(url) else leaf) or "scene"


class RemoteScene(os.PathLike):
    """A scene behind a URL. ``os.fspath()`` is GDAL's path (with any credentials the URL
    holds, for GDAL only); ``str()`` is the URL without them."""

    remote = True

    def __init__(self, url: str):
        self.url = url
        self.gdal_path = to_gdal_path(url)
        self.shown = redact(url)
        remember_redacted(url, self.shown)
        remember_redacted(self.gdal_path, to_gdal_path(self.shown) if "://" in self.shown else self.shown)
        self.name = _leaf(self.shown)

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
            with catching_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(self.gdal_path)
        except Exception as exc:
            from .info import _describe

            text = _failure_text(self, _describe(exc))  # with the transfer failure behind it, if any
            low = text.lower()
            if _network_error(text) or "does not exist in the file system" in low or "range downloading" in low \
                    or "certificate" in low:
                why = cause(text, self.gdal_path)
            elif "not recognized as" in low:
                why = f"not a GeoTIFF GDAL can read; GDAL said: {scrub(text)}"
            else:
                why = f"corrupt or truncated TIFF (GDAL cannot open it): {scrub(text)}"
            last = _url_path(self.shown).rsplit("/", 1)[-1]
            if is_http(self.shown) and last and "." not in last:  # a folder, or a STAC API's item or search
                why += "; if it is a folder, end the URL with '/' to list its files; a STAC document, give it with --stac"
            raise InputError(f"cannot open: {why}", path=self.shown) from None

    def identity(self) -> dict:
        """What the outputs depend on (the fingerprint): the URL without credentials, and
        the object's size and validators (ETag, Last-Modified) from its HTTP headers."""
        if not is_http(self.url) and {".", ".."} & set(_url_path(self.url).split("/")):
            raise InputError("its key has '.' or '..' path segments, which GDAL drops from the request after "
                             "signing it, so another object would be asked for (or the signature refused): copy the "
                             "object to a key without them", path=self.shown)
        configure_gdal()
        h = headers(self.gdal_path)
        if h is None:  # no headers: GDAL's open says why (404, refused...), or the scheme has none
            self.open().close()
            h = {}
        return {"scene": self.shown, "size": object_size(h),
                "etag": h.get("etag"), "last_modified": h.get("last-modified")}

    def manifest(self) -> dict:
        return {"source": {"kind": "url", "url": self.shown}}

    def urls(self) -> list[str]:
        """The URLs read for this scene, as GDAL is given them (for its failure notes)."""
        return [self.url]


def object_size(h: dict[str, str]) -> int | None:
    """A remote object's size from the headers GDAL got: the total of a ranged answer's
    ``Content-Range`` (``bytes 0-16383/2526050``: on S3 GDAL's first request is a ranged
    GET, whose ``Content-Length`` is the range's), else ``Content-Length`` (a HEAD's)."""
    total = (h.get("content-range") or "").rpartition("/")[2]
    return _int(total) if total.strip().isdigit() else _int(h.get("content-length"))


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


def recorded_path(scene: Any) -> str:
    """The scene as ``run.json`` names it (``scene``): a local file's absolute path with its
    folders resolved and its own name kept, so a symbolic link to a content-named file
    (git-annex, DataLad) stays the link the user gave (a plain file's path is the resolved
    one, as before); a URL as given."""
    if getattr(scene, "remote", False):
        return str(scene)
    p = Path(scene)
    return str(Path(os.path.realpath(p.parent)) / p.name)


def manifest_fields(scene: Any) -> dict:
    """Extra run.json fields for a remote or STAC scene (nothing for a local file)."""
    return scene.manifest() if hasattr(scene, "manifest") else {}


def _is_folder_url(url: str) -> bool:
    path = _url_path(url)
    if path.endswith("/") or not path.strip("/"):
        return True
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    return scheme in ("s3", "gs", "az", "azure") and "." not in leaf


def expand_url(url: str) -> list[RemoteScene]:
    """A scene URL as one scene; a folder URL as its ``*.tif`` / ``*.tiff`` objects (sorted)."""
    if not _is_folder_url(url):
        return [RemoteScene(url)]
    if "?" in url and is_http(url):  # GDAL lists no folder URL with a query (a signed or token URL)
        raise InputError("cannot list a folder URL with a query (a signature or token): give the scenes' own URLs, "
                         "or the credentials in the environment (README: Scenes in the cloud)", path=redact(url))
    configure_gdal()
    base = url if url.endswith("/") else url + "/"
    gdal_dir = to_gdal_path(base)
    remember_redacted(base, redact(base))
    remember_redacted(gdal_dir, to_gdal_path(redact(base)))
    names = [n for n in list_folder(gdal_dir.rstrip("/"), redact(base)) if n.lower().endswith(TIFF_SUFFIXES)]
    if not names:
        raise NoScenesError("no *.tif / *.tiff objects found under this folder URL (GDAL lists a folder that does not "
                            "exist or may not be read as empty: check the URL and the credentials)", path=redact(base))
    scenes = []
    for n in sorted(set(names)):
        # an index page's links come percent-encoded (nginx, Apache) or, from some servers, as plain names
        scenes.append(RemoteScene(base + (quote(unquote(n), safe="/") if is_http(base) else n)))
    return scenes


def find_inputs(inputs: Sequence[Any], stac: Sequence[str] = (), assets: Sequence[str] | None = None,
                out: Path | None = None) -> tuple[list, list[InputError]]:
    """The scenes of ``inputs`` (local files and folders, URLs, STAC documents: ``*.json``)
    and ``stac`` (STAC documents whatever their name), in a fixed order (local files as
    :func:`tilescan.scene.info.find_scenes` sorts them, then URLs and STAC items in the order
    given), and the inputs that failed alone, as errors. Raises when nothing is left: the
    first input's error, or :class:`NoScenesError`. ``out``: the run's output folder, never
    searched for scenes.
    """
    from .info import find_scenes, missing_input, one_error

    local = [p for p in inputs if not is_url(p) and not _is_stac_file(p)]
    other = [p for p in inputs if is_url(p) or _is_stac_file(p)]
    failed: list[InputError] = []
    missing = [p for p in local if not os.path.exists(p)]
    present = [p for p in local if os.path.exists(p)]
    for p in missing:
        failed.append(missing_input(p))
    remote: list = []
    for item in list(other) + [(s, "stac") for s in stac]:
        src, forced = (item if isinstance(item, tuple) else (item, None))
        try:
            if forced or _is_stac_file(src):
                from .stac import load_items

                remote.extend(load_items(str(src), assets, failed))
            elif getattr(src, "remote", False):
                remote.append(src)
            else:
                remote.extend(expand_url(str(src)))
        except InputError as exc:
            failed.append(exc)
    scenes: list = []
    if present:
        try:
            scenes = list(find_scenes(present, failed, exclude=out))
        except NoScenesError as exc:  # a local folder without scenes: alone, when URLs give some
            if not remote:
                raise
            failed.append(exc)
    seen = set()
    for s in remote:
        if s not in seen:
            seen.add(s)
            scenes.append(s)
    if not scenes:
        if failed:
            raise one_error(failed)
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
