"""The checks a local model folder passes before any library loads it: the diffusers layout, every
config a JSON object, weights as sound safetensors (headers parsed and checked against the file's size:
a truncated or crafted file is a one-line error, not a crash in a Rust loader) or, with ``--allow-pickle``,
plain tensor checkpoints only (torch's ``weights_only`` loader; never a pickle that runs code).

This is the security boundary of ``load_pipeline``: nothing of a user's folder reaches diffusers,
transformers or torch before it passed here.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ModelError
from .validators import json_file, short, with_article

# the subfolders of a Stable Diffusion-style pipeline folder (model_index.json names each)
SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
_WEIGHTS = ("unet", "text_encoder", "vae")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CONFIGS = {"text_encoder": "config.json", "unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


# ---------------------------------------------------------------------------------------------------
# validation of a local folder, before diffusers sees it


# safetensors dtypes and their bytes per element (sub-byte float formats: None, their size is not checked)
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
              "F4": None, "F6_E2M3": None, "F6_E3M2": None}
_ST_HEADER_MAX = 100_000_000  # the format's own limit on the JSON header


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (None: the header is sound and covers the file).
    Checks what the loader would trip over: the header's type, every tensor's dtype, shape and offsets,
    and that the offsets tile the data exactly (no gap, no overlap, nothing swapped)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _ST_HEADER_MAX):
            return "header length exceeds the file"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"header is not JSON: {str(e)[:80]}"
    if not isinstance(header, dict):
        return f"header is a JSON {type(header).__name__}, not an object"
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict):
                return "__metadata__ is not an object"
            continue
        what = f"tensor {short(name, 40)}"
        if not isinstance(t, dict):
            return f"{what} is not an object"
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in _ST_DTYPES:
            return f"{what} has unknown dtype {short(dtype, 20)}"
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return f"{what} has a bad shape {short(shape, 40)}"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            return f"{what} has bad data_offsets {short(offsets, 40)}"
        if _ST_DTYPES[dtype] is not None and offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPES[dtype]:
            return f"{what}: its shape {shape} and dtype {dtype} do not match its {offsets[1] - offsets[0]} bytes"
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return "tensor data overlaps or leaves a gap (offsets swapped or corrupt)"
        end = stop
    if 8 + n + end != size:
        return f"file has {size} bytes, header says {8 + n + end}"
    return None


def check_safetensors(path: Path) -> None:
    """Integrity check before any loader sees the file: the header parses, is sound and covers the file."""
    problem = _safetensors_problem(path)
    if problem:
        raise ModelError(f"{path} is truncated or corrupt safetensors ({problem})", "re-download or re-create this model")


def check_plain_tensors(path: Path) -> None:
    """A pickle weights file (``--allow-pickle``) must be a plain tensor checkpoint: what torch's safe
    loader (``weights_only=True``) accepts. Anything else (a pickle that would import or call code) is
    refused here, before a library is handed the file."""
    import pickle
    import zipfile

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError,
            ImportError, UnicodeDecodeError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path} is not a plain tensor checkpoint: torch's safe loader refuses it ({first[:120]})",
                         "use safetensors weights; --allow-pickle loads only plain tensors, never code") from e


def _require_readable(path: Path) -> None:
    """``path`` (a folder: listable and enterable; a file: readable), else PermissionError naming it
    (``Path.is_file``/``glob`` would hide it as "missing")."""
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if path.exists() and not os.access(path, mode):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _read_json(path: Path, what: str) -> Any:
    return json_file(path, "file", f"restore {what}", error=ModelError)


def check_pipeline_folder(folder: Path, allow_pickle: bool = False) -> dict:
    """Validate a local diffusers pipeline folder; return its ``model_index.json``."""
    try:
        return _check_pipeline_folder(folder, allow_pickle)
    except PermissionError as e:
        raise ModelError(f"cannot read {e.filename or folder}: permission denied",
                         "make the model folder readable for this user (chmod -R u+rX), or run as its owner") from e


def _check_pipeline_folder(folder: Path, allow_pickle: bool) -> dict:
    if not folder.is_dir():
        raise ModelError(f"model path {folder} is not a folder", "pass a diffusers pipeline folder or a hub id")
    _require_readable(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder",
            "pass the folder that holds model_index.json (e.g. one made by `instaflow-edge init`)",
        )
    index = _read_json(index_path, "the file")
    if not isinstance(index, dict):
        raise ModelError(f"{index_path} is not a JSON object (it is {with_article(type(index).__name__)})",
                         "restore the file: it maps each component to its [library, class]")
    for comp in SUBFOLDERS:
        if comp not in index:
            raise ModelError(f"{index_path} lists no {comp!r} component", "this is not a Stable Diffusion-style pipeline")
        if not (folder / comp).is_dir():
            raise ModelError(f"component folder {folder / comp} is missing", "restore it or re-create the pipeline")
        _require_readable(folder / comp)
    for comp, name in _CONFIGS.items():  # a config that is not a JSON object fails here, not deep in a library
        path = folder / comp / name
        if path.is_file() and not isinstance(_read_json(path, f"{comp}/{name}"), dict):
            raise ModelError(f"{path} is not a JSON object", f"restore {comp}/{name}, or re-create the model")
    for comp in _WEIGHTS:
        sub = folder / comp
        safes = sorted(sub.glob("*.safetensors"))
        pickles = sorted(p for p in sub.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not safes and not pickles:
            raise ModelError(f"{sub} holds no weights (*.safetensors)", "restore the weights or re-create the pipeline")
        if not safes and not allow_pickle:
            raise ModelError(
                f"{sub} has only pickle weights ({pickles[0].name}); pickle can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        for p in safes:
            check_safetensors(p)
        if not safes:
            for p in pickles:
                check_plain_tensors(p)
    return index
