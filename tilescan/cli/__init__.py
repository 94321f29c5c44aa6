"""The `tilescan` command: click commands (commands.py) over the library, with the options
they share defined once (options.py)."""

from .commands import main

__all__ = ["entry", "main"]


def entry() -> None:
    """The ``tilescan`` command (console script, ``python -m tilescan``): :func:`main` in a
    process that is tilescan's own (:func:`tilescan.backend.own_process`)."""
    from ..backend import own_process

    own_process()
    main()
