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
    try:
        main()
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:  # stopped: end now, its files closed, without the interpreter's teardown,
            sys.stdout.flush()  # where a TensorFlow thread a stop left at work can abort the process (SIGABRT, not 75)
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        raise
