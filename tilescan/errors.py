"""Errors tilescan raises on purpose, each with the exit code the CLI uses.

This module imports nothing from tilescan, so every other module may import it.

Exit codes (documented in the README):

====  ==========================================================
0     success: every scene was processed (or was already done)
1     an unexpected internal error (a bug: please report it)
2     usage or configuration error (bad flag, bad config file)
3     some scenes failed; the others were written
4     no scene could be processed (every input failed, or none found)
5     model error (missing, corrupt, foreign, or without metadata)
6     output error (unwritable folder, disk full, outputs exist, locked)
75    stopped by SIGTERM or SIGINT (preempted): finished scenes are kept, the
      interrupted one is named in report.json; rerun the same command to resume
====  ==========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_ALL_FAILED = 4
EXIT_MODEL = 5
EXIT_OUTPUT = 6
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"


class TilescanError(Exception):
    """Base of all deliberate tilescan errors.

    ``path`` names the file the error is about (a scene, a config file, a model),
    so the message a user sees always says *which* file is wrong; for a setting, where it
    was given when that is no file (``command-line flags``, an environment variable,
    ``arguments given in code``).
    """

    exit_code = EXIT_INTERNAL
    kind = "error"

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        if self.path:
            # a newline or other control character in a file name, escaped: one message stays one line
            shown = "".join(repr(c)[1:-1] if ord(c) < 32 or ord(c) == 127 else c for c in self.path)
            return f"{shown}: {self.message}"
        return self.message


class ConfigError(TilescanError):
    """A bad config file, environment variable or flag value."""

    exit_code = EXIT_USAGE
    kind = "config"


class InputError(TilescanError):
    """A scene that cannot be read or processed (missing, corrupt, wrong bands...)."""

    exit_code = EXIT_ALL_FAILED
    kind = "input"


class NoScenesError(InputError):
    """The inputs named no scene at all."""

    kind = "no-scenes"


class ModelError(TilescanError):
    """A model file that is missing, corrupt, foreign or lacks tilescan metadata."""

    exit_code = EXIT_MODEL
    kind = "model"


class OutputError(TilescanError):
    """Outputs cannot be written: unwritable folder, full disk, existing outputs, lock held."""

    exit_code = EXIT_OUTPUT
    kind = "output"


class OutputExistsError(OutputError):
    """Finished outputs exist and ``--overwrite`` was not given; ``outputs_in``: the folder under
    OUT that holds them where it is not the scene's own (named so by an earlier tilescan)."""

    kind = "exists"

    def __init__(self, message: str, path: str | None = None, outputs_in: str | None = None):
        super().__init__(message, path)
        self.outputs_in = outputs_in


class LockedError(OutputError):
    """Another tilescan process holds the lock on this output."""

    kind = "locked"
