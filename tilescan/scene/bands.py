"""Which scene bands a model reads: picked by colour interpretation or description, given by
``--bands``, refused where they cannot be read as brightness (a paletted band), and the
warnings when they are not the model's inputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..config import TilingConfig
from ..errors import ConfigError, InputError
from .info import SceneInfo, tiling_warning

_DEFAULT_BAND_NAMES = {3: ("red", "green", "blue")}


_WORD = re.compile(r"[a-z]+")


def _rgb_from_names(names: Sequence[str | None]) -> list[int] | None:
    """1-based indexes of the red, green and blue bands named in ``names``, if all three."""
    found: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            continue
        words = set(_WORD.findall(name.lower()))
        for colour in ("red", "green", "blue"):
            if colour in words and colour not in found:
                found[colour] = i + 1
    if len(found) == 3 and len(set(found.values())) == 3:
        return [found["red"], found["green"], found["blue"]]
    return None


def _coded_rgb_hint(descriptions) -> str:
    """For bands described by sensor band codes (B01, B02, ...: a Sentinel-2 or Landsat stack),
    where red, green and blue are in Sentinel-2's and Landsat 8/9's numbering; "" otherwise."""
    codes = {re.sub(r"^(?:SR_)?B0*(?=\d)", "B", (d or "").strip().upper()): i + 1 for i, d in enumerate(descriptions)}
    rgb = [codes.get(c) for c in ("B4", "B3", "B2")]
    if None in rgb:
        return ""
    return (f"; its bands are described by band codes: if it is Sentinel-2 or Landsat 8/9, red, green and blue are "
            f"B04, B03, B02: --bands {','.join(map(str, rgb))} (Landsat 4-7: B03, B02, B01)")


def _declared_colour(info: SceneInfo, band: int) -> str | None:
    """The colour a scene band says it holds (its colour interpretation, else a colour word
    in its description), or None when it says none."""
    ci = info.colorinterp[band - 1].lower() if band <= len(info.colorinterp) else ""
    if ci in ("red", "green", "blue"):
        return ci
    text = info.band_descriptions[band - 1] if band <= len(info.band_descriptions) else None
    words = set(_WORD.findall((text or "").lower()))
    said = [c for c in ("red", "green", "blue") if c in words]
    return said[0] if len(said) == 1 and not words & {"nir", "infrared", "edge"} else None


def band_warning(info: SceneInfo, bands: Sequence[int], model_band_names: Sequence[str] | None,
                 path: str, own: Sequence[int] = ()) -> dict | None:
    """A structured warning when the picked scene bands are not what the model's inputs are:
    for a model that reads bands of its own (``own``: its ``scene_bands``, its chips' ``--bands``),
    other bands; else one band fed to several inputs (a grey image to a colour model), or a band
    the file declares one colour fed to the input of another (false colour). None otherwise, and
    for a model whose inputs are not named red, green, blue."""
    if own:
        if list(bands) == list(own):
            return None
        return {"code": "bands_unlike_model", "bands": list(bands), "model_scene_bands": list(own),
                "message": (f"{path}: bands {','.join(map(str, bands))} are not the scene bands the model was "
                            f"trained on ({','.join(map(str, own))}, its chips' --bands): its labels for other input "
                            "were never measured (the same bands in another file's order are fine)")}
    names = [str(n).lower() for n in model_band_names or ()]
    if len(names) != len(bands) or not set(names) <= {"red", "green", "blue"}:
        return None
    problems = []
    if len(set(bands)) < len(bands):
        repeated = sorted(b for b in set(bands) if list(bands).count(b) > 1)
        problems.append(f"band {', '.join(map(str, repeated))} feeds several inputs (the model was trained "
                        "on three different colours)")
    crossed = [f"band {b} {said}, fed as {want}" for b, want in zip(bands, names)
               if (said := _declared_colour(info, b)) is not None and said != want]
    if crossed:
        problems.append("the file declares " + ", ".join(crossed))
    if not problems:
        return None
    return {"code": "bands_unlike_model", "bands": list(bands), "model_bands": names,
            "message": (f"{path}: bands {','.join(map(str, bands))} are not the model's inputs "
                        f"({', '.join(names)}): " + "; ".join(problems)
                        + "; labels and confidences for such input were never measured")}


def check_band_count(cfg: TilingConfig, model_bands: int) -> None:
    """Refuse ``bands``, or ``value_range`` pairs, of another count than the model's inputs
    (every scene would fail alike)."""
    if cfg.bands and len(cfg.bands) != model_bands:
        raise ConfigError(f"{cfg.origin('bands')} lists {len(cfg.bands)} band(s), but the model expects {model_bands}")
    if len(cfg.value_range) not in (0, 2, 2 * model_bands):
        raise ConfigError(f"{cfg.origin('value_range')} gives {len(cfg.value_range) // 2} low/high pairs, but the "
                          f"model takes {model_bands} band(s): give one pair for all, or one per band")


def _paletted(info: SceneInfo, band: int) -> bool:
    return band <= len(info.colorinterp) and info.colorinterp[band - 1] == "palette"


def _refuse_paletted(info: SceneInfo, bands: Sequence[int], model_bands: int) -> None:
    """Refuse bands of colour-table indices: the model would read the indices as grey levels."""
    if not (paletted := [b for b in bands if _paletted(info, b)]):
        return
    name = Path(str(info.path)).name
    others = [b for b in range(1, info.count + 1) if b != info.alpha_band and not _paletted(info, b)]
    instead = (f"; or read its other bands: --bands {','.join(map(str, others[:model_bands]))}"
               if len(others) >= model_bands else "")
    alpha = " (an alpha band is not kept: set its fill as nodata afterwards)" if info.alpha_band else ""
    raise InputError(
        f"band {paletted[0]} is paletted: its values index a colour table, they are not brightness, and the "
        f"model would read them as grey levels; expand the colour table first, e.g. "
        f"gdal_translate -b {paletted[0]} -expand rgb {name} {Path(name).stem}-rgb.tif{alpha}{instead}",
        path=str(info.path))


def _pick_bands(info: SceneInfo, cfg: TilingConfig, model_bands: int,
                model_band_names: Sequence[str] | None) -> list[int]:
    p = str(info.path)
    if cfg.bands:
        _refuse_paletted(info, cfg.bands, model_bands)
        given = cfg.origin("bands")  # as the user set it: --bands 4,2,1, the variable, or the file
        check_band_count(cfg, model_bands)
        bad = [b for b in cfg.bands if not 1 <= b <= info.count]
        if bad:
            raise InputError(
                f"{given} names band {bad[0]}, but the scene has "
                f"{info.count} band(s) (valid indexes 1..{info.count})", path=p)
        if info.alpha_band in cfg.bands:
            image = [b for b in range(1, info.count + 1) if b != info.alpha_band]
            raise InputError(f"{given} names band {info.alpha_band}, the scene's alpha band (its transparency, which "
                             f"masks the tiles, not image data): name image bands ({', '.join(map(str, image))})", path=p)
        return list(cfg.bands)
    plain = [i for i in range(1, info.count + 1) if i != info.alpha_band]
    if model_bands == 3:
        rgb = _rgb_from_names(info.colorinterp) or _rgb_from_names(info.band_descriptions)
        if rgb is not None:
            return rgb
    _refuse_paletted(info, plain[:model_bands], model_bands)
    if len(plain) == model_bands:
        if model_bands == 3:
            tiling_warning(
                f"{p}: the bands carry no red/green/blue colour interpretation; using bands "
                f"{plain} as red, green, blue (if the order differs, give --bands, e.g. "
                "--bands 3,2,1, or [tiling] bands = [3, 2, 1])", stacklevel=3)
        return plain
    if len(plain) > model_bands:
        pick = plain[:model_bands]
        names = model_band_names or _DEFAULT_BAND_NAMES.get(model_bands)
        tiling_warning(
            f"{p}: scene has {len(plain)} bands and the model takes {model_bands}; using "
            f"bands {pick}{' as ' + ', '.join(names) if names else ''} (--bands {','.join(map(str, pick))} picks "
            "them without this warning; choose others with --bands or [tiling] bands)"
            + (_coded_rgb_hint(info.band_descriptions) if model_bands == 3 else ""), stacklevel=3)
        return pick
    names = model_band_names or _DEFAULT_BAND_NAMES.get(model_bands)
    expected = f"{model_bands} bands" + (f" ({', '.join(names)})" if names else "")
    found = f"{len(plain)}" + (" plus an alpha band" if info.alpha_band else "")
    repeat = (plain + [plain[-1]] * model_bands)[:model_bands] if plain else [1] * model_bands  # the last again
    flag = ",".join(str(b) for b in repeat)
    raise InputError(
        f"model expects {expected}, scene has {found}; map scene bands onto the model's "
        f"with --bands {flag} (or [tiling] bands = {repeat}), which repeats band {repeat[-1]}: "
        "list one 1-based scene band per model band, in the model's order", path=p)
