"""What a run did: one result per unit and the run's report and exit code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import __version__, layout, stop
from ..errors import (
    EXIT_ALL_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    InputError,
    LockedError,
    OutputError,
    OutputExistsError,
    TilescanError,
)
from ..outputs.files import write_json, write_json_in_place

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
    outputs_in: str | None = None  # failed: its finished outputs are in OUT/<this>, named by an earlier tilescan

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, "", [])}


def _now() -> str:
    return datetime.now(timezone.utc).strftime(layout.TIME_FORMAT)


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
            "results_version": layout.RESULTS_VERSION,  # what the units it left undone would have been made by
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


def overwrite_since(path: Path, config: dict, model_sha: str) -> str | None:
    """When the ``--overwrite`` run began that this one, the same command again, resumes: the
    last run's report at ``path`` is of one with the same settings (``config``: this run's, as a
    dict), model and tilescan that a stop ended or that was killed (still ``running``: the caller
    knows no live process holds it), its shard's report among OUT's latest (a run that did nothing
    meanwhile, a start refused, carries it on). Units it finished since then are kept, not redone
    again (a preempted job requeued with --overwrite never ended). None: a new --overwrite, or none."""
    from ..config import output_shaping
    from ..outputs.finished import latest_reports

    if not (config.get("output") or {}).get("overwrite"):
        return None
    try:
        was = json.loads(path.read_text())
        if _resumable(was) and was.get("tilescan") == __version__ and path in latest_reports(path.parent) \
                and (was.get("config") or {}).get("output", {}).get("overwrite") \
                and (was.get("model") or {}).get("sha256") == model_sha \
                and output_shaping(was["config"]) == output_shaping(config):
            return str(was["overwrite_since"])
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # none, or not a report of tilescan's
        pass
    return None


def _resumable(report: dict) -> bool:
    """Whether a run's report is of one a run of the same command resumes: stopped, killed (still
    ``running``), or a run that did nothing after such a one and carried it on. Not one that
    failed after doing work: the --overwrite then starts afresh."""
    return bool(report.get("interrupted") or report.get("running") or report.get("overwrite_carried"))


def _overwrite_chain(path: Path) -> dict:
    """What a report at ``path`` of a resumable ``--overwrite`` says for the run that resumes it
    (:func:`overwrite_since`), for a run that did nothing to carry on; {} otherwise."""
    try:
        was = json.loads(path.read_text())
        if _resumable(was) and was.get("overwrite_since"):
            return {**{k: was[k] for k in ("config", "model", "overwrite_since")}, "overwrite_carried": True}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        pass
    return {}


def finished_since(manifest: dict, since: str | None) -> bool:
    """Whether a unit's outputs (its run.json) were finished after ``since`` (a report's time)."""
    if since is None:
        return False
    try:
        done = datetime.strptime(manifest["finished_at"], layout.TIME_FORMAT).replace(tzinfo=timezone.utc)
        return done > datetime.fromisoformat(since)  # seconds: one finished in the same second is redone
    except (KeyError, TypeError, ValueError):
        return False


def is_scene_folder(out: Path) -> bool:
    """Whether ``out`` is a scene's output folder (a unit's run.json is in it, or in its row
    bands' folders), not a run's."""
    def unit(folder: Path) -> bool:
        m = layout.read_manifest(folder)
        return isinstance(m, dict) and "fingerprint" in m and "unit" in m

    try:
        return unit(out) or any(layout.PART_RE.fullmatch(p.name) and unit(p) for p in out.iterdir())
    except OSError:  # not a folder (yet)
        return False


def report_failed_start(out: str | os.PathLike, shard: tuple[int, int], exc: Exception) -> None:
    """:func:`report_failure` for a run that could not start (its settings or shard are wrong)."""
    report_failure(Path(out), shard, exc, RunReport())


def report_failure(out: Path, shard: tuple[int, int], exc: Exception, report: RunReport) -> None:
    """A run that ended with an error (no scene found, the model, a bug) replaces the shard's
    report in an OUT that exists, so a report of an earlier run is never taken for this one's:
    the units' results so far, and the error. An OUT that does not exist is not made for it."""
    if not out.is_dir() or report.held_by is not None or is_scene_folder(out):  # never into a scene's folder
        return
    if isinstance(exc, InputError) and exc.path and not report.results:  # the input that gave no scene
        report.results.append(UnitResult(exc.path, exc.path, "failed", reason=str(exc), error_kind=exc.kind))
    kind, code = (exc.kind, exc.exit_code) if isinstance(exc, TilescanError) else ("internal", EXIT_INTERNAL)
    message = str(exc) if isinstance(exc, TilescanError) else f"{type(exc).__name__}: {exc}"
    path = out / layout.report_name(shard)
    if isinstance(exc, (stop.Interrupted, KeyboardInterrupt)):  # a stop before the run began (the CLI's start)
        name = exc.signame if isinstance(exc, stop.Interrupted) else "SIGINT"
        kind, code, message = "interrupted", EXIT_INTERRUPTED, f"stopped by {name} before the run began"
        report.interrupted = {"signal": name, "unit": None, "scene": None, "units": [], "not_started": []}
    if not report.results and "overwrite_since" not in report.extra:  # it did nothing: an --overwrite stays resumable
        report.extra.update(_overwrite_chain(path))
    data = {**report.to_dict(), "exit_code": code, "error": {"kind": kind, "message": message}, "shard": list(shard)}
    try:
        write_json(path, data)
    except (OSError, TilescanError):  # OUT not writable: the error raised is the run's own
        # a full disk: the short form over the running report, so that it is not taken for a killed run's
        write_json_in_place(path, {k: data[k] for k in ("tilescan", "counts", "exit_code", "error", "shard",
                                                        "started_at", "finished_at")})
