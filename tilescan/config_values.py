"""A setting's value as written (TOML, an environment variable's text, a flag, a Python
argument) turned into its field's type, or a :class:`~tilescan.errors.ConfigError` naming the
key and where it came from; the ``[tiling] nodata`` and ``scaling`` settings read."""

from __future__ import annotations

import typing
from typing import Any

from .errors import ConfigError


def coerce(section: str, key: str, value: Any, typ: Any, source: str) -> Any:
    """Convert ``value`` to ``typ`` or raise a ConfigError naming key and source."""
    where, origin = f"[{section}] {key}", typing.get_origin(typ)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # np.int64(128), np.array([3, 2, 1])
        narrow = value.dtype.kind == "f" and value.dtype.itemsize < 8  # float32's shortest decimal: 0.1, not 0.10000000149
        value = value.tolist() if not narrow else [float(str(v)) for v in value.ravel()] if value.ndim else float(str(value))

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}", path=source)

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.strip().lower() in {"1", "true", "yes", "on"}
        raise bad("true or false")
    if typ in (int, float):  # a float setting takes a whole number too, an int one no fraction
        expected, taken = ("an integer", (int,)) if typ is int else ("a number", (int, float))
        if isinstance(value, taken) and not isinstance(value, bool):
            return typ(value)
        if isinstance(value, str):
            try:
                return typ(value.strip())
            except ValueError:
                raise bad(expected) from None
        raise bad(expected)
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # a TOML true for an auto/true/false setting
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # "auto" or a number
            return str(value)
        raise bad("a string or a number")
    if origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, str):  # "3,2,1", "3 2 1", or as TOML writes it: "[3, 2, 1]"
            value = [v.strip("'\"") for v in value.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and args[-1] is Ellipsis:
            value = [value]  # one value of a list that may hold one (gsd_m=5.0), as "5" reads
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(section, key, v, args[0], source) for v in value)
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(coerce(section, key, v, t, source) for v, t in zip(value, args))
    raise bad(str(typ))  # pragma: no cover - all field types are handled above


def nodata_setting(text: str) -> tuple[bool, float | None]:
    """``[tiling] nodata`` read: whether it replaces the files' own nodata, and by what (None:
    no nodata at all). Raises ValueError for text that is none of ``file``, ``none``, a number."""
    t = str(text).strip().lower()
    if t == "file":
        return False, None
    if t == "none":
        return True, None
    return True, float(t)  # "nan" and "-inf" too: a float scene's nodata may be either


def nodata_key(text: str) -> str:
    """A ``[tiling] nodata`` value in one spelling: ``file``, ``none`` or the number ("0", "0.0"
    and "-0" alike; "NaN" as "nan"). Raises ValueError as :func:`nodata_setting`."""
    replaces, value = nodata_setting(text)
    return "file" if not replaces else "none" if value is None else repr(value + 0.0)


def is_nodata_setting(text: str) -> bool:
    """Whether ``text`` is a ``[tiling] nodata`` value (:func:`nodata_setting` reads it)."""
    try:
        nodata_setting(text)
    except ValueError:
        return False
    return True


def scaling_mode(scaling: str, dtype: Any) -> str:
    """The stretch ``[tiling] scaling`` gives a scene of ``dtype`` (a numpy dtype or its name):
    ``auto`` is the dtype's range for uint8, else percentiles."""
    return ("dtype" if str(dtype) == "uint8" else "percentile") if scaling == "auto" else scaling
