"""A legend's own colours, from the files a GIS user keeps them in, for ``train --class-colors``.

:func:`read_class_colors` reads a QGIS style (``.qml``: a categorised vector layer, by category
value and label, the colour its symbols draw: fill, line or marker, the outline where the fill
is hidden; or a paletted raster), QGIS's exported colour map (``INTERPOLATION:`` then
``value,r,g,b,alpha,label``), JSON (``{"water": "#1f78b4"}``) or text lines ``name,#rrggbb`` /
``name,r,g,b`` (tab, ``,`` or ``;``; CSV quoting for a name that holds one, or starts with ``#``,
which otherwise starts a comment line; a header line is skipped).
:func:`legend_colors` gives each class of a model its colour: the file's, a parent's, else a
palette colour no other class has. Alpha is not kept: outputs draw classes opaque.
"""

from __future__ import annotations

import collections
import json
import os
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError
from ..outputs.palette import class_colors, farthest_colors, hex_color, parse_color

RGB = tuple[int, int, int]


def read_class_colors(path: str | os.PathLike) -> dict[str, RGB]:
    """Class name -> colour from ``path`` (see the module docstring); a ValueError says what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text: save it as UTF-8 (QGIS and most editors offer that)") from None
    if p.suffix.lower() == ".qml" or text.lstrip().startswith("<"):
        return _qml_colors(text)
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _json_colors(text)
    return _text_colors(text)


def _json_colors(text: str) -> dict[str, RGB]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError('a JSON colour file holds an object: {"class name": "#rrggbb", ...}')
    out = {}
    for name, value in data.items():
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = ",".join(map(str, value))
        if not isinstance(value, str):
            raise ValueError(f"{name!r}: {value!r} is not a colour (\"#rrggbb\" or [r, g, b])")
        out[str(name)] = _file_color(value)
    return out


def _file_color(text: str) -> RGB:
    """A colour as a colour file may give it: :func:`parse_color`'s spellings, or a CSS colour
    name (``steelblue``), as a person writes one."""
    t = str(text).strip()
    if t.isalpha():
        from PIL import ImageColor

        if t.lower() in ImageColor.colormap:
            return ImageColor.getrgb(t.lower())[:3]  # type: ignore[return-value]
        raise ValueError(f"{t!r} is not a colour (#rrggbb, r,g,b, or a CSS colour name such as steelblue)")
    return parse_color(t)


def _text_colors(text: str) -> dict[str, RGB]:
    """Lines ``name,colour``, or QGIS's exported colour map (``value,r,g,b,alpha,label``)."""
    out: dict[str, RGB] = {}
    header = None  # (line number, text) of a header line skipped
    lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.lstrip().startswith("#")]
    exported = bool(lines) and lines[0][1].upper().startswith("INTERPOLATION")
    for k, (i, line) in enumerate(lines[1:] if exported else lines):
        try:
            if exported:  # value,r,g,b,alpha,label: the label as it is, commas included
                parts = [x.strip() for x in line.split(",", 5)]
                rgb, names = parse_color(",".join(parts[1:4])), [parts[0], *parts[5:]]
            elif k == 0 and _header(line):
                header = (i, line)  # a header line (class,color; class,r,g,b): "water,blue" is a line, blue a colour
                continue
            else:
                name, rgb = _name_colour(line)
                names = [name]
        except (ValueError, IndexError) as e:
            raise ValueError(f"line {i}: {line!r}: {e if isinstance(e, ValueError) else 'a name and a colour'}") from None
        for name in filter(None, names):
            if out.setdefault(name, rgb) != rgb:
                raise ValueError(f"line {i}: {name!r} is given {hex_color(rgb)} and, before, {hex_color(out[name])}")
    if not out and header is not None:  # one line, taken as a header: its colour is none
        raise ValueError(f"line {header[0]}: {header[1]!r} is read as a header (its colour field is no colour: "
                         "#rrggbb, r,g,b or a CSS name), and no line follows it")
    return out


def _first_sep(line: str) -> str:
    """The separator a line is split at first: a tab, else ``;``, else ``,``."""
    return "\t" if "\t" in line else ";" if ";" in line else ","


def _fields(line: str, sep: str) -> list[str]:
    import csv

    return next(csv.reader([line], delimiter=sep), [])


def _header(line: str) -> bool:
    """Whether a first line is a header: all after its first field holds no digit and no ``#``
    and is no colour (``class,red,green,blue``; ``water,blue`` is a line)."""
    sep = _first_sep(line)
    rest = sep.join(_fields(line, sep)[1:])
    return not any(ch.isdigit() or ch == "#" for ch in rest) and not _is_color(rest)


def _unquoted(text: str) -> str:
    t = text.strip()
    return (t[1:-1] if len(t) > 1 and t.endswith('"') else t[1:]) if t.startswith('"') else t


def _name_colour(line: str) -> tuple[str, RGB]:
    """A line's class name and colour: split at its first separator (:func:`_first_sep`) where
    that gives a colour and the line has no quotes; else CSV fields (quoting honoured:
    ``"Crop, fallow",#ff0000``) at tabs, commas or semicolons, the colour last (``#rrggbb``, a
    CSS name, or fields r, g, b[, a]) and the name all before it, so a name may hold the other
    separators; else the first split with its quotes as they are."""
    name, _, colour = line.partition(_first_sep(line))
    try:  # as earlier releases read every line
        plain, first_err = (_unquoted(name), _file_color(_unquoted(colour))), None
    except ValueError as e:
        plain, first_err = None, e
    if plain and '"' not in line:
        return plain
    first = None
    for sep in (c for c in "\t,;" if c in line):
        fields = _fields(line, sep)
        # r,g,b,a / r,g,b / one field / all after the first (QGIS's "r,g,b,a,rgb:..."): the first that reads
        cuts = [n for n in (4, 3) if len(fields) > n and all(f.strip().isdigit() for f in fields[-n:])]
        for n in (*cuts, 1, len(fields) - 1):
            if 0 < n < len(fields):
                try:
                    return sep.join(fields[:-n]).strip(), _file_color(",".join(map(_unquoted, fields[-n:])))
                except ValueError as e:
                    first = first or e
    if plain:
        return plain
    raise first or first_err


def _is_color(text: str) -> bool:
    try:
        _file_color(text.strip().strip('"'))
    except ValueError:
        return False
    return True


# a symbol layer's colour keys, by what it draws: a fill, a line, a marker
_COLOUR_KEYS = ("color", "fill_color", "line_color")


def _symbol_colour(sym) -> RGB | None:
    """The colour a QGIS symbol draws: its first layer's fill (or line, marker) colour, or its
    outline where the fill is hidden (``style`` ``no``)."""
    for layer in sym.iter("layer"):
        props = {}
        for el in layer.iter():
            if el.tag == "Option" and el.get("name") and el.get("value") is not None:
                props.setdefault(el.get("name"), el.get("value"))
            elif el.tag == "prop" and el.get("k"):
                props.setdefault(el.get("k"), el.get("v"))
        if props.get("style") == "no" and props.get("outline_color"):
            return parse_color(props["outline_color"])
        for key in _COLOUR_KEYS:
            if props.get(key):
                return parse_color(props[key])
    return None


def _qml_colors(text: str) -> dict[str, RGB]:
    """Class colours of a QGIS style: categories (value and label -> their symbol's colour) or a
    raster palette (label and value -> colour)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not a readable QGIS style (XML: {e})") from None
    out: dict[str, RGB] = {}
    symbols = {s.get("name"): s for holder in root.iter("symbols") for s in holder.findall("symbol")}  # not source-symbol
    for cat in root.iter("category"):
        rgb = _symbol_colour(symbols[cat.get("symbol")]) if cat.get("symbol") in symbols else None
        for name in (cat.get("value"), cat.get("label")):
            if rgb is not None and name:
                out.setdefault(name, rgb)
    for entry in root.iter("paletteEntry"):
        rgb = parse_color(entry.get("color", ""))
        for name in (entry.get("label"), entry.get("value")):
            if name:
                out.setdefault(name, rgb)
    if not out:
        kinds = sorted({r.get("type") for r in root.iter("renderer-v2")} | {r.get("type") for r in root.iter("rasterrenderer")})
        raise ValueError(f"this QGIS style has no categories or palette entries with colours (its renderer: "
                         f"{', '.join(filter(None, kinds)) or 'none'}); style the layer Categorized by the class "
                         "field, or a raster Paletted/Unique values, and save it again")
    return out


def _key(name: str) -> str:
    """A name as matched when no name is exact: one Unicode form, case folded, no spaces at its ends."""
    return unicodedata.normalize("NFC", str(name)).strip().casefold()


def legend_colors(path: str, origin: str, classes: Sequence[str], parent, log: Callable[[str], None],
                  aliases: dict[str, str] | None = None) -> dict | None:
    """The model's ``legend`` colours (``colors``: ``#rrggbb`` per class, ``colors_from``): the
    user's colour file ``path`` (``[train] class_colors``, said as ``origin``) by class name (or
    ``aliases``: the name in the labels file a chips class was renamed from; any Unicode form,
    then ignoring case), else a parent's own colours of the classes it shares with the child,
    else palette colours no class has yet (named in the log). None where neither gives any. A
    :class:`ConfigError` when the file cannot be read or names no class."""
    picked: list[RGB | None] = [None] * len(classes)
    sources = []
    if path:
        try:
            mine = read_class_colors(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{origin}: the colour file cannot be used: {e}") from None
        except RecursionError:  # JSON nested thousands deep
            raise ConfigError(f"{origin}: the colour file cannot be used: nested too deep to be a colour list") from None
        picked = _match(mine, classes, aliases)
        if all(rgb is None for rgb in picked):
            raise ConfigError(f"{origin}: the colour file names none of the {len(classes)} classes "
                              f"({_names(classes)}); it names {_names(list(mine)) if mine else 'none (it is empty)'}")
        unused = [n for n, rgb in mine.items()
                  if not _names_a_class(n, classes, aliases) and rgb not in picked]  # a category's value: its label's colour
        if unused:
            log(f"warning: {Path(path).name} names {len(unused)} that the model has no class of, unused: {_names(unused)}")
        sources.append(Path(path).name)
    if parent is not None and (own := (parent.meta.get("legend") or {}).get("colors")):
        inherited = _match(dict(zip(parent.meta["classes"], map(parse_color, own))), classes, aliases)
        if any(rgb is not None for rgb, mine_ in zip(inherited, picked) if mine_ is None):
            sources.append(f"the parent {parent.model_id}")
        picked = [mine_ if mine_ is not None else rgb for mine_, rgb in zip(picked, inherited)]
    if not sources:
        return None
    return {"colors": [hex_color(rgb) for rgb in _fill_in(classes, picked, log, " and ".join(sources))],
            "colors_from": ", then ".join(sources)}


def _match(table: dict[str, RGB], classes: Sequence[str], aliases: dict[str, str] | None) -> list[RGB | None]:
    """Each class's colour in ``table``: by its name or its alias, in any Unicode form, else by
    :func:`_key` (case and spaces at the ends), except for classes alike that way (``water``,
    ``Water``): each of those by its own name only, so none takes another's colour."""
    exact = {unicodedata.normalize("NFC", str(k)): v for k, v in table.items()}
    folded = {_key(k): v for k, v in reversed(list(table.items()))}  # of names alike but for case, the first
    twins = collections.Counter(_key(c) for c in classes)
    out = []
    for c in classes:
        names = [unicodedata.normalize("NFC", n) for n in (c, *([aliases[c]] if aliases and c in aliases else []))]
        rgb = next((exact[n] for n in names if n in exact), None)
        if rgb is None and twins[_key(c)] == 1:
            rgb = next((folded[_key(n)] for n in names if _key(n) in folded), None)
        out.append(rgb)
    return out


def _names_a_class(name: str, classes: Sequence[str], aliases: dict[str, str] | None) -> bool:
    """Whether :func:`_match` gives a class the colour of the file's ``name``."""
    return any(rgb is not None for rgb in _match({name: (0, 0, 0)}, classes, aliases))


def _fill_in(classes: Sequence[str], picked: list, log: Callable[[str], None], source: str) -> list[RGB]:
    """The picked colours, with palette colours no class has for the classes without one; both said."""
    missing = [c for c, rgb in zip(classes, picked) if rgb is None]
    if missing:
        log(f"warning: {source} gives no colour for {len(missing)} class(es) ({_names(missing)}): they get "
            "colours picked far from the others (in CIELAB), so none looks like another")
    taken = [rgb for rgb in picked if rgb is not None]
    spare = iter(farthest_colors(taken, len(missing)) if taken else class_colors(len(missing)))
    out = [rgb if rgb is not None else next(spare) for rgb in picked]
    same: dict[RGB, list[str]] = {}
    for c, rgb in zip(classes, out):
        same.setdefault(rgb, []).append(c)
    for rgb, names in same.items():
        if len(names) > 1:
            log(f"warning: classes {_names(names)} have the same colour {hex_color(rgb)}: they look alike in every output")
    return out


def _names(names: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (", ..." if len(names) > most else "")
