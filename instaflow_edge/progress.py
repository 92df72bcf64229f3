"""Stage lines of long commands (``[onnx     3s] unet: optimizing for cpu``), through ``logging``.

Every library module logs its stages to its own logger (``logging.getLogger(__name__)``, level INFO).
Nothing is printed unless a handler is installed: the CLI installs :func:`stage_lines` for the length of a
command (stderr, so stdout stays the command's result); a Python caller silences or redirects them with
the standard ``logging`` configuration of the ``instaflow_edge`` logger.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

ROOT = "instaflow_edge"
# packages whose modules are named for the format or step they hold: the tag is the module's own name
_TAG_BY_MODULE = ("convert", "digits", "runtime")


def tag(logger_name: str) -> str:
    """The short tag of a logger: ``instaflow_edge.convert.onnx`` → ``onnx``, ``instaflow_edge.quantize.onnx``
    → ``quantize``, ``instaflow_edge.bench.latency`` → ``bench``."""
    parts = logger_name.split(".")
    if parts[0] != ROOT or len(parts) == 1:
        return parts[-1]
    return parts[-1] if parts[1] in _TAG_BY_MODULE else parts[1]


class StageFormatter(logging.Formatter):
    """``[tag   Ns] message``, with the seconds since the formatter was made (the command's start)."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.time()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{getattr(record, 'tag', None) or tag(record.name)} {record.created - self.start:6.0f}s] {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def stage_lines(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Print the package's stage lines on stderr while the block runs (the CLI does this per command)."""
    logger = logging.getLogger(ROOT)
    handler = _StderrHandler()
    handler.setFormatter(StageFormatter())
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def say(tag_: str, msg: str) -> None:
    """Log ``msg`` under the stage tag ``tag_`` (for callers without a module logger of that name)."""
    logging.getLogger(f"{ROOT}.{tag_}").info(msg, extra={"tag": tag_})
