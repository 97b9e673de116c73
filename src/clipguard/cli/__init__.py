"""``clipguard`` command line: subcommands only parse arguments and call the library.

``main`` (the console script) lives in :mod:`clipguard.cli.main`, the parser in
:mod:`clipguard.cli.parser`, the shared helpers in :mod:`clipguard.cli.common`, and ``defend`` in
:mod:`clipguard.cli.defend`.
"""

from clipguard.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
