"""What a run did: one result per unit and the run's report and exit code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

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


def interruption(stream, log: Callable[[str], None]) -> dict:
    """report.json's ``interrupted``: the signal, the units dropped, those never started."""
    dropped = [job.unit for job in sorted(stream.dropped, key=lambda j: j.index)]  # in the run's order
    for unit in dropped:
        log(f"{unit.key}: stopped by {stream.interrupted.signame}; its partial outputs were removed")
    return {"signal": stream.interrupted.signame, "unit": dropped[0].key if dropped else None,
            "scene": str(dropped[0].scene) if dropped else None, "units": [u.key for u in dropped],
            "not_started": [u.key for u in stream.not_started]}


def overwritten_before(path: Path, config: dict, model_sha: str) -> set[str]:
    """The units that an ``--overwrite`` run a stop ended (its report at ``path``), with the same
    settings (``config``: this run's, as a dict) and model, had redone: this run, the same command
    again, resumes it rather than redoing them (a preempted job requeued with --overwrite never ended)."""
    from ..config import output_shaping

    if not (config.get("output") or {}).get("overwrite"):
        return set()
    try:
        was = json.loads(path.read_text())
        if was.get("interrupted") and (was.get("config") or {}).get("output", {}).get("overwrite") \
                and (was.get("model") or {}).get("sha256") == model_sha \
                and output_shaping(was["config"]) == output_shaping(config):
            return {str(u) for u in was.get("overwritten") or []}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # none, or not a report of tilescan's
        pass
    return set()
