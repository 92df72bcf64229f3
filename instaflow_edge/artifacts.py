"""Artifacts: atomic output folders, manifests, content hashes.

Every artifact is a folder with a ``manifest.json`` saying what made it. Folders are written into a
temporary sibling and renamed into place, so a crash or Ctrl-C never leaves half an artifact, and an
existing output is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, OutputExistsError

MANIFEST = "manifest.json"
_VERSIONED = ("torch", "diffusers", "transformers", "numpy", "onnx", "onnxruntime", "coremltools", "accelerate")


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless ``force``; refuse an output whose parent is a file."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists", "pass --force to overwrite it, or choose another path")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"cannot create {path}: {path.parent} is a file", "choose an output inside a folder")
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success rename it to ``target``.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``target`` is
    left as it was.
    """
    target = check_output(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    # absolute: writers may run tools inside a scratch working directory (onnxruntime's optimizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent.resolve()))
    try:
        yield tmp
        if target.exists():  # force: move the old one aside first so the swap is short
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temp name + rename (same folder, so the rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums and paths → plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def package_versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str | None]:
    """Installed versions, read from metadata (no imports, so this is cheap and lean)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "instaflow-edge": None}
    for name in ("instaflow-edge", *names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """A content hash of a folder: sha256 over (relative path, file sha256) of every file, sorted."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if rel in exclude or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def make_manifest(kind: str, config: Any = None, **fields: Any) -> dict:
    """The common manifest header: kind, time, command line, versions, then ``fields``."""
    return {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "versions": package_versions(),
        **({"config": to_jsonable(config)} if config is not None else {}),
        **to_jsonable(fields),
    }


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none (a pipeline from elsewhere)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})", "restore or delete the manifest") from e
