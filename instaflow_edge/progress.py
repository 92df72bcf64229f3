"""One-line stage messages for long commands (``[onnx] unet: optimizing (cpu)``), on stderr so that
stdout stays the command's result."""

from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()


def say(tag: str, msg: str) -> None:
    """Print ``[tag] msg`` with the seconds since the process started."""
    print(f"[{tag} {time.perf_counter() - _T0:6.0f}s] {msg}", file=sys.stderr, flush=True)
