"""The `tilescan` command: click commands (commands.py) over the library, with the options
they share defined once (options.py)."""

from .commands import main

__all__ = ["entry", "main"]


def entry() -> None:
    """The ``tilescan`` command (console script, ``python -m tilescan``): :func:`main` in a
    process that is tilescan's own (:func:`tilescan.backend.own_process`)."""
    import os
    import sys

    from ..backend import own_process
    from ..errors import EXIT_INTERRUPTED

    own_process()
    if sys.stderr is None:  # started with file descriptor 2 closed (2>&-): messages go nowhere, the run goes on
        from ..log import stderr_to_devnull

        stderr_to_devnull()
    try:
        main()
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:  # stopped: end now, its files closed, without the interpreter's teardown,
            for stream in (sys.stdout, sys.stderr):  # where a TensorFlow thread a stop left at work can abort
                try:  # the process (SIGABRT, not 75); a stream gone (closed, or a closed pipe) holds nothing to keep
                    stream.flush()
                except (AttributeError, OSError, ValueError):
                    pass
            os._exit(EXIT_INTERRUPTED)
        raise
