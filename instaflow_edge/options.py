"""Choices shared by the CLI and the Python API, as ``str`` enums Typer accepts directly.

This module is imported by ``instaflow-edge --help``: keep it free of heavy imports.
"""

from __future__ import annotations

import enum


class Flow(str, enum.Enum):
    """What a model without our manifest is: ``--flow`` (docs/DESIGN.md, the flow math)."""

    rectified_flow = "rectified-flow"
    diffusion = "diffusion"


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


# the components of a one-step export, in calling order (token ids → hidden states → latents → image)
ONE_STEP = ("text_encoder", "unet", "vae_decoder")
