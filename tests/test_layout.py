"""The package keeps its shape (docs/architecture.md): no module over 600 lines, no function
over 80, and the layers that must stay light (scene/, outputs/, cli/ and the small top-level
modules) import no Keras or TensorFlow, nor the layers above them."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "tilescan"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # end_lineno - lineno of the def: its signature, docstring and body

# Each exception states why it is allowed; an entry that no longer exceeds the limit fails the
# test below, so the list only ever shrinks.
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}

LIGHT = ("tilescan.scene", "tilescan.outputs", "tilescan.cli", "tilescan.config", "tilescan.layout", "tilescan.errors",
         "tilescan.log")
HEAVY = ("keras", "tensorflow", "jax", "torch")


def _sources() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(text: str):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno


def test_no_module_over_600_lines():
    sizes = {path: len(text.splitlines()) for path, text in _sources().items()}
    too_long = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES and p not in LONG_MODULES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them along a seam): {too_long}"
    stale = [p for p in LONG_MODULES if sizes.get(p, 0) <= MAX_MODULE_LINES]
    assert not stale, f"no longer over {MAX_MODULE_LINES} lines: remove from LONG_MODULES: {stale}"


def test_no_function_over_80_lines():
    found = {(path, name): (line, n) for path, text in _sources().items() for name, line, n in _functions(text)
             if n > MAX_FUNCTION_LINES}
    too_long = {f"{p}:{line} {name}": n for (p, name), (line, n) in found.items() if (p, name) not in LONG_FUNCTIONS}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (cut them into named steps): {too_long}"
    stale = [key for key in LONG_FUNCTIONS if key not in found]
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines (or gone): remove from LONG_FUNCTIONS: {stale}"


def test_light_layers_import_no_keras_nor_the_layers_above():
    """Every module of scene/, outputs/ and cli/, and config, layout, errors, log, imported in a
    fresh interpreter: no Keras, TensorFlow, JAX or torch, and none of pipeline/, training/,
    explain/ or the model (``tilescan --help`` and a rerun with nothing to do stay fast)."""
    probe = f"""
import importlib, pkgutil, sys
names = []
for name in {LIGHT!r}:
    mod = importlib.import_module(name)
    names.append(name)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
        if not info.name.endswith(".__main__"):  # running the CLI is not importing it
            importlib.import_module(info.name)
            names.append(info.name)
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
above = sorted(m for m in sys.modules if m.startswith(("tilescan.pipeline", "tilescan.training", "tilescan.explain"))
               or m in ("tilescan.model", "tilescan.backend"))
print(len(names), heavy, above)
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    n, heavy_and_above = res.stdout.split(" ", 1)
    assert int(n) >= 25, res.stdout  # the walk found the subpackages' modules
    assert heavy_and_above.strip() == "[] []", res.stdout
