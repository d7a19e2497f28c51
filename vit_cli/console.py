"""Console output that suits where it goes: rich on a terminal, whole plain lines elsewhere.

On a terminal, log records, error messages and the summary table are drawn by rich, fitted
to the terminal's width. Off one (a pipe, `nohup`, a CI or Slurm log) rich would fit them
to 80 columns, splitting each record over several lines and paths in the middle; there
each log record is one plain line, as in train.log, and each message and table row is
printed whole.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler


def on_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal, rather than a pipe or a file.

    Only the stream decides: FORCE_COLOR or TTY_COMPATIBLE (set by some CI systems) would
    have rich draw for a terminal of 80 columns in a log file.
    """
    isatty = getattr(stream, "isatty", None)
    try:
        return isatty is not None and isatty()
    except ValueError:  # a closed stream
        return False


def log_handler(plain_format: str) -> logging.Handler:
    """The console's log handler (Hydra's job_logging `console`), writing to stdout.

    On a terminal, a RichHandler (time, level and a message wrapped to the terminal's
    width); elsewhere one line per record in `plain_format`.
    """
    if on_terminal(sys.stdout):
        # rich's global console follows sys.stdout, which a progress bar redirects to keep
        # the records above itself.
        return RichHandler(show_path=False, markup=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(plain_format))
    return handler


def console_for(stream: TextIO) -> Console:
    """A rich Console for tables and messages on `stream`: fitted to the terminal's width,
    or, off one, as wide as each line needs, so that no row or path is wrapped."""
    if on_terminal(stream):
        return Console(file=stream)
    return Console(file=stream, width=1_000_000)
