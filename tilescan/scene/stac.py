"""STAC inputs: each Item of an Item, ItemCollection, or static Catalog/Collection is a scene.

The document is read with pystac (a local file or a URL; URLs through GDAL's network file
systems, so the same credentials and endpoints apply as for scenes). An item's scene is one
asset (``--asset visual``: a multi-band COG), or several single-band assets stacked in the
model's band order (``--asset red,green,blue``: asset keys, or the common names of their
``eo:bands`` / ``bands``). Without ``--asset``: ``visual`` where the item has it, else the
red, green and blue bands by common name. Several assets are stacked by a GDAL VRT built in
memory (the bands must cover the same footprint in one CRS; a coarser band is resampled to
the finest grid, nearest neighbour), so reads stay windowed on every asset.

An item's output folder is named after its id, which also goes into ``tiles.parquet``
(the ``scene`` column) and ``run.json`` (``source.item``).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

from ..errors import InputError, NoScenesError
from ..log import catching_warnings
from . import sources, vsi

DEFAULT_ASSET = "visual"
DEFAULT_BANDS = ("red", "green", "blue")
_COLORINTERP = {"red": "Red", "green": "Green", "blue": "Blue"}


def _pystac():
    try:
        import pystac
    except ImportError:  # pragma: no cover - a dependency
        raise InputError("reading STAC needs pystac (pip install pystac)") from None
    return pystac


def _stac_io():
    """A pystac StacIO that reads URLs through GDAL (same credentials as the scenes)."""
    pystac = _pystac()

    class GdalStacIO(pystac.StacIO):
        def read_text(self, source, *args, **kwargs) -> str:
            href = str(source)
            if vsi.is_url(href):
                vsi.configure_gdal()  # the scenes' retries, timeouts and no folder listing, for documents too
                return vsi.read_bytes(vsi.to_gdal_path(href), shown=vsi.redact(href)).decode("utf-8")
            try:
                # non-blocking: a FIFO or device named as a document is refused, not waited on for ever
                with os.fdopen(os.open(href, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DOCUMENT_BYTES:
                        raise InputError("not a STAC document: not a regular file" if not stat.S_ISREG(st.st_mode) else
                                         f"a STAC document of {st.st_size / 2**20:.0f} MiB: over the "
                                         f"{MAX_DOCUMENT_BYTES >> 20} MiB tilescan reads", path=href)
                    return fh.read().decode("utf-8")
            except OSError as exc:
                raise InputError(f"cannot read the STAC document: {exc.strerror}", path=href) from None
            except UnicodeDecodeError as exc:
                raise InputError(f"not a STAC document: not UTF-8 text ({exc.reason})", path=href) from None

        def write_text(self, dest, txt, *args, **kwargs) -> None:  # pragma: no cover - never writes
            raise InputError("tilescan does not write STAC documents here", path=str(dest))

    return GdalStacIO()


def load_items(source: str, assets: Sequence[str] | None = None, failed: list | None = None) -> list["StacScene"]:
    """The scenes of a STAC document (file or URL): one per item, in document order. A
    catalogue's item or child link that cannot be read fails alone, into ``failed`` (given)."""
    pystac = _pystac()
    io = _stac_io()
    href = source if vsi.is_url(source) else str(Path(source).resolve())
    shown = vsi.redact(source) if vsi.is_url(source) else href
    try:
        data = json.loads(io.read_text(href))
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"not a JSON document: {exc}", path=shown) from None
    kind = data.get("type") if isinstance(data, dict) else None
    failed = [] if failed is None else failed
    before = len(failed)
    try:
        if kind == "Feature":
            items = [pystac.Item.from_dict(data, href=href, migrate=True)]
        elif kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(data, preserve_dict=False).items)
        elif kind in ("Catalog", "Collection"):
            cat = pystac.read_file(href, stac_io=io)
            items = list(_catalog_items(cat, failed, href))
        else:
            raise InputError(f"not a STAC Item, ItemCollection, Catalog or Collection (type {kind!r})", path=shown)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a valid STAC document: {type(exc).__name__}: {vsi.scrub(str(exc))}", path=shown) from None
    if not items and len(failed) == before:
        raise NoScenesError("the STAC document holds no items", path=shown)
    named = [f"{_document(item, shown)}#{item.id}" for item in items]
    ids = Counter(named)  # one id in several collections (a search across them): each named with its collection
    return [StacScene(item, shown, href, assets, by_collection=ids[n] > 1) for item, n in zip(items, named)]


def _document(item, source_shown: str) -> str:
    """The document an item is named after: its own href (credentials removed), else the one read."""
    self_href = item.get_self_href()
    return (vsi.redact(self_href) if vsi.is_url(self_href) else self_href) if self_href else source_shown


def _catalog_items(cat, failed: list, document: str, seen: set | None = None):
    """A catalogue's items, then its children's, in document order (as pystac's ``get_items``
    gives them), each link resolved alone: one that cannot be read, or that the document read
    (``document``) may not aim at (:func:`_may_follow`), becomes an error in ``failed``; a link
    back to a document already read is followed once (``seen``: their hrefs)."""
    seen = {cat.get_self_href()} if seen is None else seen
    for rel in ("item", "child"):
        for link in cat.get_links(rel):
            href = link.get_absolute_href() or link.href
            if href in seen:
                continue  # a loop of links, or one document linked twice
            seen.add(href)
            try:
                _may_follow(f"the {rel} link of {cat.id!r}", href, document, vsi.redact(href) if vsi.is_url(href) else href)
            except InputError as exc:
                failed.append(exc)
                continue
            try:
                link.resolve_stac_object(root=cat.get_root())
            except Exception as exc:
                href = link.get_absolute_href() or link.href
                shown = vsi.redact(href) if vsi.is_url(href) else href
                failed.append(InputError(f"the {rel} link of {cat.id!r} cannot be read: {type(exc).__name__}: "
                                         f"{vsi.scrub(str(exc))}", path=shown))
                continue
            if rel == "item":
                yield link.target
            else:
                yield from _catalog_items(link.target, failed, document, seen)


def _band_name(asset) -> str | None:
    """The common name of a single-band asset (eo:bands or STAC 1.1 bands)."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    if len(bands) == 1 and isinstance(bands[0], dict):
        return bands[0].get("common_name") or bands[0].get("eo:common_name") or bands[0].get("name")
    return None


#: The largest STAC document file read (a catalogue of items is far smaller).
MAX_DOCUMENT_BYTES = 256 << 20

#: GDAL's settings that send credentials with every HTTP request, whatever its host.
_HTTP_CREDENTIALS = ("GDAL_HTTP_HEADERS", "GDAL_HTTP_HEADER_FILE", "GDAL_HTTP_USERPWD", "GDAL_HTTP_BEARER",
                     "GDAL_HTTP_COOKIE")


def _http_credentials() -> list[str]:
    """Those of :data:`_HTTP_CREDENTIALS` set, in the environment or GDAL's configuration file."""
    import rasterio
    from rasterio.env import get_gdal_config

    with rasterio.Env():  # GDAL's configuration file is read as its drivers are registered
        return [k for k in _HTTP_CREDENTIALS if os.environ.get(k) or get_gdal_config(k)]


def _origin(url) -> tuple:
    return url.scheme, url.hostname, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _may_follow(what: str, href: str, document: str, shown: str) -> None:
    """Refuse what a document's author, not the user, could aim the run at (an asset, or a
    catalogue's link): from a document read over the network, a local file or a GDAL path
    (/vsi…); and, while GDAL sends HTTP credentials with every request, another origin (scheme,
    host, port) than the document's, which would receive them."""
    from urllib.parse import urlsplit

    if not vsi.is_url(document):
        return
    if not vsi.is_url(href) or href.startswith("/vsi") or href.startswith("file:"):
        raise InputError(f"{what} ({href}) is a local file or a GDAL path, named by a document read over the "
                         "network: refused (download the document to read local files it names)", path=shown)
    there, here = urlsplit(href), urlsplit(document)
    if there.scheme in ("http", "https") and _origin(there) != _origin(here) and (creds := _http_credentials()):
        raise InputError(f"{what} is on {there.scheme}://{there.netloc}, not on the document's server "
                         f"{here.scheme}://{here.netloc}, and GDAL would send it the credentials of {', '.join(creds)}: "
                         "refused (unset them, and give each host its own user and password in a .netrc file, "
                         "GDAL_HTTP_NETRC_FILE: curl sends a host only its own)", path=shown)


class StacScene(os.PathLike):
    """One STAC item as a scene (the :class:`tilescan.scene.sources.RemoteScene` protocol)."""

    remote = True

    def __init__(self, item, source_shown: str, source_href: str, assets: Sequence[str] | None,
                 by_collection: bool = False):
        # ``by_collection``: named DOCUMENT#COLLECTION/ID (its id is in other collections of the document too)
        self.item = item
        self.id = item.id
        self.name = item.id
        self.stem = item.id
        self.suffix = ""
        self.source = source_shown
        self.collection = item.collection_id
        qualified = f"{self.collection}/" if by_collection and self.collection else ""
        self.shown = f"{_document(item, source_shown)}#{qualified}{item.id}"
        self.base_href = item.get_self_href() or source_href  # relative asset hrefs are relative to this
        self.unusable: InputError | None = None  # an item without the assets asked for: fails alone, as a scene
        try:
            self.keys, self.hrefs = self._pick(assets)
            for key, href in zip(self.keys, self.hrefs):
                _may_follow(f"asset {key!r}", href, source_href, self.shown)
        except InputError as exc:
            self.unusable, self.keys, self.hrefs = exc, [], []
        self.paths = [self._gdal_path(h) for h in self.hrefs]
        self._vrt: str | None = None

    def _usable(self) -> None:
        if self.unusable is not None:
            raise self.unusable

    # -- assets ------------------------------------------------------------------------

    def _pick(self, wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
        assets = self.item.assets
        where = f"{self.shown}"
        given = wanted is not None
        if wanted is None:
            wanted = [DEFAULT_ASSET] if DEFAULT_ASSET in assets else list(DEFAULT_BANDS)
        by_band = {}
        for key, a in assets.items():
            name = _band_name(a)
            if name:
                by_band.setdefault(name.lower(), key)
        keys = []
        chosen = "" if given else f"no {DEFAULT_ASSET!r} asset, and "  # what the default pick looked for
        for w in wanted:
            key = w if w in assets else by_band.get(w.lower())
            if key is None:
                have = ", ".join(sorted(assets)) or "none"
                raise InputError(f"item has {chosen}no asset or band named {w!r} (assets: {have}); choose with --asset",
                                 path=where)
            keys.append(key)
        return keys, [self._absolute(assets[k]) for k in keys]

    def _absolute(self, asset) -> str:
        href = asset.get_absolute_href() or asset.href
        if vsi.is_url(href) or os.path.isabs(href) or href.startswith("file://"):
            return href
        if vsi.is_url(self.base_href):  # an ItemCollection's items have no self link
            from urllib.parse import urljoin

            return urljoin(self.base_href, href)
        return str(Path(self.base_href).parent / href)

    @staticmethod
    def _gdal_path(href: str) -> str:
        if vsi.is_url(href):
            scene = sources.RemoteScene(href)  # remembers the credential-free form for messages
            return scene.gdal_path
        if href.startswith("file://"):
            href = href[len("file://"):]
        return href

    # -- the pathlib.Path protocol tilescan uses --------------------------------------------

    def __fspath__(self) -> str:
        return self._vrt if self._vrt is not None else self.paths[0] if self.paths else self.shown

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"StacScene({self.shown!r}, assets={self.keys})"

    def __eq__(self, other: object) -> bool:  # the same item of the same document, with the same assets
        return isinstance(other, StacScene) and (other.shown, other.keys) == (self.shown, self.keys)

    def __hash__(self) -> int:
        return hash(("stac", self.shown, tuple(self.keys)))

    def __lt__(self, other: Any) -> bool:
        return str(self) < str(other)

    def resolve(self) -> "StacScene":
        return self

    def exists(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    # -- opening ---------------------------------------------------------------------------

    def open(self, decode_threads: int = 1):
        import rasterio

        self._usable()
        vsi.configure_gdal()
        for key, href, path in zip(self.keys, self.hrefs, self.paths):
            if not vsi.is_url(href) and not os.path.exists(path):
                raise InputError(f"asset {key!r}: no such file {path}", path=self.shown)
            if not vsi.is_url(href) and not os.path.isfile(path):  # a FIFO or device: GDAL would wait on it for ever
                raise InputError(f"asset {key!r}: {path} is not a regular file", path=self.shown)
        if len(self.paths) == 1:
            return self._open_one(0)
        if self._vrt is None:
            self._vrt = self._build_vrt()
        with catching_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(self._vrt)

    def _open_one(self, i: int):
        import rasterio

        href = self.hrefs[i]
        if vsi.is_url(href):
            return sources.RemoteScene(href).open()
        try:
            with catching_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                return rasterio.open(self.paths[i])
        except Exception as exc:
            from .info import _describe

            raise InputError(f"asset {self.keys[i]!r}: corrupt or truncated TIFF (GDAL cannot open it): "
                             f"{_describe(exc)}", path=self.shown) from None

    def _build_vrt(self) -> str:
        """A VRT stacking band 1 of each asset, in order, on the finest asset's grid."""
        infos = []
        for i in range(len(self.paths)):
            try:
                with self._open_one(i) as ds:
                    if ds.count != 1:
                        raise InputError(f"asset {self.keys[i]!r} has {ds.count} bands; stacked assets must have one "
                                         "each (name a multi-band asset alone, e.g. --asset visual)", path=self.shown)
                    infos.append({"crs": ds.crs, "bounds": ds.bounds, "w": ds.width, "h": ds.height,
                                  "transform": ds.transform, "dtype": ds.dtypes[0], "nodata": ds.nodata,
                                  "block": ds.block_shapes[0]})
            except InputError as exc:
                exc.message = f"asset {self.keys[i]!r}: {exc.message}" if not exc.message.startswith("asset") else exc.message
                exc.path = self.shown
                raise
        first = infos[0]
        for k, inf in zip(self.keys, infos):
            if inf["crs"] != first["crs"] or any(abs(a - b) > 1e-6 * max(1.0, abs(b))
                                                 for a, b in zip(inf["bounds"], first["bounds"])):
                raise InputError(f"assets {self.keys[0]!r} and {k!r} do not cover the same footprint in one CRS; "
                                 "tilescan stacks bands of one grid", path=self.shown)
            if inf["dtype"] != first["dtype"]:
                raise InputError(f"assets {self.keys[0]!r} ({first['dtype']}) and {k!r} ({inf['dtype']}) differ in "
                                 "data type", path=self.shown)
        fine = max(infos, key=lambda inf: inf["w"] * inf["h"])
        W, H = fine["w"], fine["h"]
        t = fine["transform"]
        gdt = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}[first["dtype"]]
        parts = [f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}">']
        if first["crs"] is not None:
            parts.append(f"<SRS>{escape(first['crs'].to_wkt())}</SRS>")
        parts.append(f"<GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>")
        for n, (key, path, inf) in enumerate(zip(self.keys, self.paths, infos), start=1):
            parts.append(f'<VRTRasterBand dataType="{gdt}" band="{n}">')
            band = (_band_name(self.item.assets[key]) or key).lower()
            if band in _COLORINTERP:
                parts.append(f"<ColorInterp>{_COLORINTERP[band]}</ColorInterp>")
            parts.append(f"<Description>{escape(band)}</Description>")
            if inf["nodata"] is not None:
                parts.append(f"<NoDataValue>{inf['nodata']!r}</NoDataValue>")
            kind = "ComplexSource" if inf["nodata"] is not None else "SimpleSource"
            by, bx = inf["block"]
            parts.append(
                f'<{kind}><SourceFilename relativeToVRT="0">{escape(path)}</SourceFilename><SourceBand>1</SourceBand>'
                f'<SourceProperties RasterXSize="{inf["w"]}" RasterYSize="{inf["h"]}" DataType="{gdt}" '
                f'BlockXSize="{bx}" BlockYSize="{by}"/>'
                f'<SrcRect xOff="0" yOff="0" xSize="{inf["w"]}" ySize="{inf["h"]}"/>'
                f'<DstRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/>'
                + (f"<NODATA>{inf['nodata']!r}</NODATA>" if inf["nodata"] is not None else "")
                + f"</{kind}>")
            parts.append("</VRTRasterBand>")
        parts.append("</VRTDataset>")
        return "".join(parts)

    # -- fingerprint and run.json ------------------------------------------------------------

    def identity(self) -> dict:
        """The item id and each asset's href (without credentials) and size/validators."""
        self._usable()
        out = []
        for key, href, path in zip(self.keys, self.hrefs, self.paths):
            if vsi.is_url(href):
                try:
                    ident = sources.RemoteScene(href).identity()
                except InputError as exc:  # which asset, at which URL: stacked bands fail one by one
                    exc.message, exc.path = f"asset {key!r} ({exc.path}): {exc.message}", self.shown
                    raise
            else:
                try:
                    st = os.stat(path)
                except OSError:
                    raise InputError(f"asset {key!r}: no such file {path}", path=self.shown) from None
                ident = {"scene": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            out.append({"asset": key, **ident})
        return {"scene": f"stac-item:{self.collection or ''}/{self.id}", "assets": out}

    def urls(self) -> list[str]:
        return [h for h in self.hrefs if vsi.is_url(h)]

    def manifest(self) -> dict:
        meta = self.item.common_metadata
        span = {k: t.isoformat() for k, t in (("start_datetime", meta.start_datetime), ("end_datetime", meta.end_datetime))
                if t is not None}  # an item of a time range: the output item gets the range
        return {"source": {"kind": "stac", "item": self.id, "collection": self.collection, "document": self.source,
                           "datetime": self.item.datetime.isoformat() if self.item.datetime else None, **span,
                           "assets": {k: (vsi.redact(h) if vsi.is_url(h) else h)
                                      for k, h in zip(self.keys, self.hrefs)}}}
