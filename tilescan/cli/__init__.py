"""The `tilescan` command: click commands (commands.py) over the library, with the options
they share defined once (options.py)."""

from .commands import main

__all__ = ["main"]
