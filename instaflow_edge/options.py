"""Choices shared by the CLI and the Python API, as ``str`` enums Typer accepts directly.

This module is imported by ``instaflow-edge --help``: keep it free of heavy imports.
"""

from __future__ import annotations

import enum


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# The --backend choices (torch and the export formats) come from the format registry: runtime.Backend.
