"""What every benchmark shares: the machine description and writing its JSON result."""

from __future__ import annotations

import os
from pathlib import Path

from ..artifacts import make_manifest, write_json
from ..envinfo import collect

MACHINE_KEYS = ("cpu", "memory_gib", "torch_threads", "platform")


def machine() -> dict:
    """The short machine description a bench result carries (``instaflow-edge env`` has the rest)."""
    return {k: v for k, v in collect().items() if k in MACHINE_KEYS}


def save_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically, creating the folder (``artifacts.write_json``)."""
    return write_json(path, obj)


def save_result(path: str | os.PathLike, name: str, result: dict) -> Path:
    """A bench result wrapped in the project's manifest header (kind ``bench``, versions, time)."""
    return save_json(path, make_manifest("bench", None, name=name, **result))
