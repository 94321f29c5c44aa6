"""The library's messages go to the ``tilescan`` logger, never straight to the terminal.

Functions that report progress take a ``log`` callable (the CLI passes its own, which
prints); their default is :func:`emit`, which logs at the level the message's prefix
names (``error: …``, ``warning: …``, else info). A Python caller sees nothing unless it
configures logging.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import warnings
from typing import Iterator

logger = logging.getLogger("tilescan")
logger.addHandler(logging.NullHandler())


#: The prefixes a library message may start with, and the level each names.
LEVEL_PREFIXES = {"error: ": logging.ERROR, "warning: ": logging.WARNING}


def some(names: list, most: int = 3, sep: str = ", ") -> str:
    """The first ``most`` of ``names`` and how many more: a message stays one readable line over thousands of chips."""
    shown = sep.join(map(str, names[:most]))  # "a, b and 2 more"; "a: x; b: y; and 2 more"
    return shown + (f"{sep.rstrip(', ')} and {len(names) - most} more" if len(names) > most else "")


def emit(msg: str) -> None:
    """Log one message of the library at the level its prefix names, without the prefix (the
    record's level says it; the CLI writes it back)."""
    for prefix, level in LEVEL_PREFIXES.items():
        if msg.startswith(prefix):
            logger.log(level, msg[len(prefix):])
            return
    logger.info(msg)


#: Held while file descriptor 2 points at /dev/null (a quiet Keras import, which may run on a
#: worker thread); whoever prints to stderr from another thread takes it first.
STDERR_LOCK = threading.RLock()

_WARNINGS_LOCK = threading.RLock()


def stderr_to_devnull() -> None:
    """File descriptor 2 (and ``sys.stderr``, where there is none) onto /dev/null: where the
    reader of the messages is gone (a pipe closed at its end: ``2>&1 | head``) or there never
    was one (``2>&-``), the rest go nowhere and the work goes on; report.json is its record."""
    null = os.open(os.devnull, os.O_WRONLY)
    if null != 2:
        os.dup2(null, 2)
        os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)


@contextlib.contextmanager
def catching_warnings(record: bool = False) -> Iterator[list | None]:
    """``warnings.catch_warnings``, one thread at a time: its filters are process-wide, so two
    threads inside it at once (a scene opening while another scene's outputs are written)
    would lose or swallow each other's warnings."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=record) as caught:
        yield caught


class ReaderGoneSafe:
    """``stream`` (stderr) for a writer of its own, such as a progress bar: where the reader is
    gone (a closed pipe), stderr turns to /dev/null (:func:`stderr_to_devnull`) and the write is
    taken as done, instead of raising in the run."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            stderr_to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            stderr_to_devnull()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@functools.cache
def quiet_opencv():
    """cv2, its warnings off (unless ``OPENCV_LOG_LEVEL`` or the caller set another level): its
    TIFF reader warns on each GeoTIFF or GDAL tag it does not know, noise for every TIFF image GDAL wrote."""
    import cv2

    cvlog = cv2.utils.logging
    if "OPENCV_LOG_LEVEL" not in os.environ and cvlog.getLogLevel() == cvlog.LOG_LEVEL_WARNING:
        cvlog.setLogLevel(cvlog.LOG_LEVEL_ERROR)
    return cv2
