"""What a run did: one result per unit and the run's report and exit code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .. import __version__
from ..errors import (
    EXIT_ALL_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    LockedError,
    OutputError,
    OutputExistsError,
)

# ----------------------------------------------------------------------------- results


@dataclass
class UnitResult:
    """One unit's (a scene, or a shard's row band of it) outcome: ``status``, its output folder
    (``out_dir``), counts, warnings, and for a failure the ``reason`` and ``error_kind``."""

    unit: str
    scene: str
    status: str  # done | skipped (already complete) | failed; waiting (another process's, for now: never reported)
    out_dir: str | None = None
    reason: str | None = None
    error_kind: str | None = None
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list = field(default_factory=list)  # structured: {"code", "message", ...}
    replaced: str | None = None  # done over finished outputs (--update, --overwrite): what they were made from

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, "", [])}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunReport:
    """What :func:`tilescan.run` did: ``results`` (one :class:`UnitResult` per unit; ``done``,
    ``skipped``, ``failed`` by status), ``exit_code`` as the command's, and ``to_dict()``,
    the contents of ``report.json``."""

    results: list[UnitResult] = field(default_factory=list)
    interrupted: dict | None = None  # set when a signal stopped the run (tilescan.stop)
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None  # set by :meth:`finish`
    extra: dict = field(default_factory=dict)  # more fields of report.json (shard, model, timings)
    held_by: int | None = None  # another live run's pid, whose report.json this run leaves alone

    def finish(self, **extra) -> None:
        """The run has ended: its end time, and ``extra`` fields for ``report.json``."""
        self.finished_at = _now()
        self.extra.update(extra)

    def running(self) -> dict:
        """The report while the run goes on (replaced at its end): one still ``running`` whose
        process is gone was killed (SIGKILL, out of memory, a lost node)."""
        return {"tilescan": __version__, "running": True, "started_at": self.started_at, "pid": os.getpid(),
                "host": os.uname().nodename}

    @property
    def done(self) -> list[UnitResult]:
        """Units classified by this run."""
        return [r for r in self.results if r.status == "done"]

    @property
    def skipped(self) -> list[UnitResult]:
        """Units whose outputs were already complete."""
        return [r for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[UnitResult]:
        """Units that failed, each with its ``reason`` and ``error_kind``: a run with failures returns, not raises."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        failed = self.failed
        if not failed:
            return EXIT_OK
        if len(failed) == len(self.results):
            # nothing written because of the output side only (exists, locked, disk full)
            output_kinds = {OutputError.kind, OutputExistsError.kind, LockedError.kind}
            if all(r.error_kind in output_kinds for r in failed):
                return EXIT_OUTPUT
            return EXIT_ALL_FAILED
        return EXIT_PARTIAL

    def to_dict(self) -> dict:
        return {
            "tilescan": __version__,
            "done": [r.to_dict() for r in self.done],
            "skipped": [r.to_dict() for r in self.skipped],
            "failed": [r.to_dict() for r in self.failed],
            "counts": {s: sum(r.status == s for r in self.results) for s in ("done", "skipped", "failed")},
            "exit_code": self.exit_code,
            **({"interrupted": self.interrupted} if self.interrupted else {}),
            "started_at": self.started_at,
            "finished_at": self.finished_at or _now(),  # the end time, once the run has ended
            **self.extra,
        }
