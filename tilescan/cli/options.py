"""Shared CLI pieces: options defined once (with their config keys and defaults), -v/-q, errors to exit codes.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Mapping

import click

from .. import stop
from ..config import CAM_METHOD_NAMES, Config
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TilescanError
from ..log import LEVEL_PREFIXES, STDERR_LOCK, ReaderGoneSafe, emit, logger


class OutPath(click.Path):
    """A path option or argument that must name something: ``-o ""`` (an unset variable in a
    script) is a usage error, not the current folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty (an unset variable in a script?): give a path", param, ctx)
        return super().convert(value, param, ctx)


class _Ctx:
    """The command line's state: its verbosity (-v/-q anywhere), and the ``tilescan`` logger
    configured to print on stderr as that verbosity says."""

    def __init__(self, verbosity: int):
        self.verbosity = verbosity
        configure_logging(self)

    def log(self, msg: str) -> None:
        emit(msg)

    def debug(self, msg: str) -> None:
        logger.debug(msg)


#: A warning or a scene's error alike but for what it names first (its scene) and its figures is printed
#: this many times, then counted, and the count said when the command ends (-v prints each): 272 chips
#: of one sensor printed 272 lines of one warning, a rerun with another tile size 399 of one refusal.
FOLD_AFTER = 3

#: Where the folded lines of each kind are all found.
_FOLDED_IN = {logging.WARNING: "each scene's run.json has its own", logging.ERROR: "report.json lists each failed scene"}


class _CliHandler(logging.Handler):
    """The library's log records on stderr: errors and warnings always, other messages unless
    -q, debug with -v (read when each record comes, so -v/-q after the command count too);
    warnings and errors alike past :data:`FOLD_AFTER` counted, not printed, without -v."""

    def __init__(self, ctx: _Ctx):
        super().__init__(logging.DEBUG)
        self.ctx = ctx
        # (level, a message's text after its first "name: ", figures left out) -> [count, first not printed]
        self.alike: dict[tuple[int, str], list] = {}

    def emit(self, record: logging.LogRecord) -> None:
        v = self.ctx.verbosity
        if record.levelno >= logging.WARNING or (record.levelno >= logging.INFO and v >= 0) or v > 0:
            msg = record.getMessage()
            if record.levelno in _FOLDED_IN and v <= 0 and not self._first_alike(record.levelno, msg):
                return
            prefix = next((p for p, level in LEVEL_PREFIXES.items() if record.levelno == level), "")
            self._echo(prefix + msg)

    def _first_alike(self, level: int, msg: str) -> bool:
        """Whether ``msg`` is one of the first FOLD_AFTER messages of its level alike (the same
        after the name before its first ': ', but for their figures: each scene's share of data
        left out)."""
        _, sep, what = msg.partition(": ")
        if not sep:
            return True
        seen = self.alike.setdefault((level, re.sub(r"\d+(?:[.,]\d+)*", "#", what)), [0, what])
        seen[0] += 1
        if seen[0] == FOLD_AFTER + 1:
            seen[1] = msg  # the first not printed, with its scene: the folded line quotes it
        return seen[0] <= FOLD_AFTER

    def say_folded(self) -> None:
        """The messages counted, not printed: how many more of each (the first of them, as it came)."""
        for (level, _), (n, what) in self.alike.items():
            if n > FOLD_AFTER:
                prefix = next(p for p, lv in LEVEL_PREFIXES.items() if lv == level)
                self._echo(f"{prefix}{n - FOLD_AFTER} more alike, not printed (-v prints each; {_FOLDED_IN[level]}), "
                           f"the first: {what}")

    @staticmethod
    def _echo(line: str) -> None:
        say(line)


#: Characters a terminal acts on rather than shows (escape sequences, C1 controls, bidirectional
#: overrides): a scene or item name holding them is printed with them spelt out.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def say(line: str) -> None:
    """A line on stderr, the characters a terminal would act on spelt out (``\\x1b``); where its
    reader is gone (a closed pipe), stderr turns to /dev/null and the command goes on."""
    line = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                            line)
    with STDERR_LOCK:  # not while a worker's quiet Keras import has stderr on /dev/null
        click.echo(line, file=ReaderGoneSafe(sys.stderr))


def configure_logging(ctx: _Ctx) -> None:
    """The CLI's logging (rasterio's way): the library only logs; this prints its records
    until :func:`unconfigure_logging` (when the command ends)."""
    unconfigure_logging()
    logger.addHandler(_CliHandler(ctx))
    logger.setLevel(logging.DEBUG)
    # its notes that HOME is not writable (a cache folder made in /tmp instead): nothing a run acts on
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def unconfigure_logging() -> None:
    """Detach the CLI's handler, so a Python caller in the same process sees nothing again."""
    for h in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        h.say_folded()
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)


def _quiet_backend(verbosity: int) -> None:
    """Import Keras now, its start-up chatter kept off the terminal unless -v is given."""
    from ..backend import import_keras

    import_keras(verbosity)


def env_near_misses(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``TILESCAN_`` variables that look like a setting misspelt, which the settings
    would pass over (they read ``TILESCAN_<SECTION>__<KEY>`` only): one underscore between the
    section and the key (``TILESCAN_TILING_TILE_SIZE``), or the key alone (``TILESCAN_TILE_SIZE``)."""
    keys = {(s, k) for s, section in Config().to_dict().items() for k in section}
    said = []
    for name in sorted(environ):
        rest = name[len("TILESCAN_"):].lower() if name.startswith("TILESCAN_") and "__" not in name else None
        meant = [f"TILESCAN_{s}__{k}".upper() for s, k in sorted(keys) if rest in (f"{s}_{k}", k)]
        if rest and meant:
            said.append(f"{name} is not a setting and is ignored: settings are TILESCAN_<SECTION>__<KEY>, "
                        f"two underscores (did you mean {' or '.join(meant)}?)")
    return said


def _raise_on_sigterm(signum, frame) -> None:
    if not stop.settled():  # once the work is in place, a stop has nothing to act on
        stop.note("SIGTERM")  # raised where Python drops it, stop.check_noted() raises it again
        raise stop.Interrupted("SIGTERM")


def _raise_on_sigint(signum, frame) -> None:
    if not stop.settled():
        stop.note("SIGINT")
        raise KeyboardInterrupt


def work_done() -> None:
    """The command's work is done and its report written: a SIGTERM or Ctrl-C from now on (a
    scheduler's stop as the job ends) is let pass, and in tilescan's own process ignored, so the
    exit is the work's code, not a kill (143) or a traceback during the interpreter's teardown."""
    from .. import backend

    stop.settle()
    if backend._OWN_PROCESS and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def _guard(fn: Callable[[], Any]) -> None:
    """Run a command body; map errors to messages and exit codes. SIGTERM (a scheduler's
    stop) and Ctrl-C unwind it as an exception, so what it has half made is removed, and end
    it with exit 75 (``tilescan run`` stops between batches itself, see :mod:`tilescan.stop`)."""
    stop.settle(False)
    stop.note(None)
    ours = ((signal.SIGTERM, _raise_on_sigterm), (signal.SIGINT, _raise_on_sigint))
    before = {s: signal.signal(s, h) for s, h in ours} if threading.current_thread() is threading.main_thread() else {}
    try:
        code = _body(fn)
    finally:
        from .. import backend

        work_done()  # first, no gap with the default handlers before the exit: a stop now is let pass, or ignored
        stop.note(None)  # not for what this process does next (a notebook, a test's next command)
        if not backend._OWN_PROCESS:  # a caller in this process (a test's CliRunner) keeps its own handlers
            for s, h in before.items():
                signal.signal(s, h)
    sys.exit(code or 0)


def _model_from_env(exc: TilescanError) -> str:
    """Where a model that fails came from, when the user did not type it: TILESCAN_MODEL."""
    ctx = click.get_current_context(silent=True)
    if exc.kind == "model" and ctx is not None and "model_path" in ctx.params \
            and ctx.get_parameter_source("model_path") == click.core.ParameterSource.ENVIRONMENT:
        return " (the model TILESCAN_MODEL names)"
    return ""


def _body(fn: Callable[[], Any]):
    """``fn()``'s exit code; its errors as messages and exits."""
    try:
        return fn()
    except TilescanError as exc:
        say(f"tilescan: error: {exc}{_model_from_env(exc)}")  # "error:" as a scene's error lines
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, stop.Interrupted) as exc:
        name = exc.signame if isinstance(exc, stop.Interrupted) else "SIGINT"
        say(f"tilescan: stopped by {name}")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as exc:  # pragma: no cover - a bug
        import traceback

        say(traceback.format_exc().rstrip("\n"))
        say(f"tilescan: internal error {type(exc).__name__}: {exc} (please report this)")
        sys.exit(EXIT_INTERNAL)


# ----------------------------------------------------------------------------- options

_DEFAULTS = Config()


_VERBOSITY_NOTE = "before or after the command name"


class _Option(click.Option):
    """A click option whose help shows its default without click's parentheses.

    ``config_key=(section, key)`` ties the option to a config value: it defaults to None
    (so the TILESCAN_* variables, the --config file and the defaults decide), and its help
    shows the built-in default from :mod:`tilescan.config`, so it cannot drift from
    configs/default.toml.
    """

    def __init__(self, *decls: Any, config_key: tuple[str, str] | None = None, **kw: Any):
        if config_key is not None:
            kw.setdefault("default", None)
        super().__init__(*decls, **kw)
        self.config_key = config_key
        if config_key is not None and self.show_default is None:
            self.show_default = self._builtin_default()

    def _builtin_default(self) -> str:
        section, key = self.config_key  # type: ignore[misc]
        value = getattr(getattr(_DEFAULTS, section), key)
        if isinstance(value, bool):
            if self.secondary_opts:  # --gpkg/--no-gpkg: name the side that is on
                return (self.opts if value else self.secondary_opts)[-1].lstrip("-")
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        return str(value)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str) and self.show_default:
            extra["default"] = self.show_default
        return extra

    def as_typed(self, value: Any) -> str:
        """The flag as the user would type it, e.g. ``--bands 4,2,1`` (for messages)."""
        if self.is_bool_flag:
            return max(self.opts if value else self.secondary_opts or self.opts, key=len)
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return f"{max(self.opts, key=len)} {shlex.quote(text)}"


option = functools.partial(click.option, cls=_Option)


def _one_config(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str | None:
    """The --config file; given twice, the last would take the place of the first unsaid."""
    if len(value) > 1:
        raise click.BadParameter(f"given {len(value)} times ({', '.join(value)}): give one file; flags and "
                                 "TILESCAN_<SECTION>__<KEY> variables set single settings over it", ctx, param)
    return value[0] if value else None


def config_option(help: str) -> Callable:
    """The ``--config FILE`` option of a command, with its ``help``."""
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), multiple=True,
                        callback=_one_config, metavar="FILE", help=help)


def _config_flags(ctx: click.Context) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """The config values given as flags (None = not given), and each flag as typed."""
    layer: dict[str, dict[str, Any]] = {}
    typed: dict[tuple[str, str], str] = {}
    for param in ctx.command.params:
        key = getattr(param, "config_key", None)
        value = ctx.params.get(param.name) if param.name else None
        if key is None or value is None:
            continue
        layer.setdefault(key[0], {})[key[1]] = value
        typed[key] = param.as_typed(value)  # type: ignore[attr-defined]
    return layer, typed


def _typed_flags(ctx: click.Context, *names: str) -> dict[str, str]:
    """The options among ``names`` given on the command line, each as typed (for messages)."""
    source = click.core.ParameterSource.COMMANDLINE
    return {p.name: p.as_typed(ctx.params[p.name]) for p in ctx.command.params  # type: ignore[attr-defined]
            if p.name in names and ctx.get_parameter_source(p.name) == source}


def _count_verbosity(ctx: click.Context, param: click.Parameter, count: int) -> None:
    if count and isinstance(ctx.obj, _Ctx):
        ctx.obj.verbosity += count if param.name == "verbose" else -count


def _verbosity(cmd: Callable) -> Callable:
    """-v/-q on a subcommand too (``tilescan run -v``), adding to those given before it."""
    cmd = click.option("-q", "--quiet", count=True, expose_value=False, show_default=False, callback=_count_verbosity,
                       help=f"Less output: errors and warnings only ({_VERBOSITY_NOTE}).")(cmd)
    return click.option("-v", "--verbose", count=True, expose_value=False, show_default=False, callback=_count_verbosity,
                        help=f"More output; repeatable ({_VERBOSITY_NOTE}).")(cmd)


class _Bands(click.ParamType):
    name = "N,N,N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(v) for v in str(value).replace(",", " ").split())
        except ValueError:
            self.fail(f"expected 1-based band numbers like 3,2,1, got {value!r}", param, ctx)


class _CamMethods(click.ParamType):
    """One or more CAM methods, comma-separated, each one of ``CAM_METHOD_NAMES``."""

    name = "METHOD[,METHOD...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        methods = [m.strip().lower() for m in str(value).split(",") if m.strip()]
        unknown = [m for m in methods if m not in CAM_METHOD_NAMES]
        if unknown or not methods:
            got = f"unknown CAM method {unknown[0]!r}" if unknown else "no CAM method"
            self.fail(f"{got}; choose from {', '.join(CAM_METHOD_NAMES)} (comma-separated)", param, ctx)
        return methods


def _old_spelling(ctx: click.Context, name: str, old_name: str) -> Any:
    """The value of option ``name``, or of its hidden old spelling ``old_name`` when only
    that was used."""
    value, old = ctx.params[name], ctx.params[old_name]
    if old is None:
        return value
    if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
        spelled = {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}
        raise click.UsageError(f"{spelled[old_name]} is the old spelling of {spelled[name]}: give only one of them", ctx)
    return old


_CAM_HELP = ", ".join(CAM_METHOD_NAMES)


_LAYERS_EPILOG = (
    "Options not given here are taken from TILESCAN_<SECTION>__<KEY> environment variables, "
    "then from the --config file, then from the built-in defaults shown above (the values in "
    "configs/default.toml). An error about a value names the flag, variable or file it came from."
)
