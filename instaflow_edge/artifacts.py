"""Artifacts: atomic output folders, manifests, content hashes.

Every artifact is a folder with a ``manifest.json`` saying what made it. Folders are written into a
temporary sibling and renamed into place, so a crash or Ctrl-C never leaves half an artifact, and an
existing output is only replaced with ``force=True``.

An output never overlaps an input of its command (``force`` replaces a previous output, never an input
or the folder the user stands in), and one process at a time writes it: a non-blocking ``fcntl.flock``
on ``.NAME.lock`` beside the output, held while the command works on it (the OS drops it when the
process dies). Whoever holds that lock removes the temporary folders a killed run of the same output
left (``.NAME.tmp-*``, ``.NAME.old-*``). See docs/DESIGN.md (Reliability rules) and docs/robustness.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError, OutputBusyError, OutputExistsError, writing_to
from .validators import json_file, with_article

MANIFEST = "manifest.json"
_VERSIONED = ("torch", "diffusers", "transformers", "numpy", "onnx", "onnxruntime", "coremltools", "accelerate")


def _forms(path: str | os.PathLike) -> set[Path]:
    """The absolute path as written and with every symlink resolved: an overlap in either counts."""
    p = Path(os.path.abspath(os.fspath(path)))
    return {p, Path(os.path.realpath(p))}


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_overlap(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output",
                  existing_only: bool = True, other: str = "input") -> None:
    """Refuse ``path`` (the ``what``) when it equals, contains or lies inside one of ``inputs`` (each an
    ``other``), symlinks resolved.

    ``existing_only``: skip inputs that are not on disk (a hub id names no local folder, and a path that
    does not exist cannot be destroyed)."""
    for inp in inputs:
        if inp is None or (existing_only and not os.path.lexists(os.fspath(inp))):
            continue
        for a in _forms(path):
            for b in _forms(inp):
                rel = _relation(a, b)
                if rel is not None:  # "is the input", "is inside the input", "contains the input"
                    raise InputError(f"{what} {path} {rel} the {other} {inp}",
                                     f"put the {what} elsewhere: --force replaces a previous output, never an {other}"
                                     if other == "input" else f"put the {what} and the {other} apart")


def _made_by_us(file: Path) -> bool:
    try:
        data = json.loads(file.read_bytes()[:1 << 20].decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("versions"), dict) and "instaflow-edge" in data["versions"]


def previous_output(path: str | os.PathLike) -> bool:
    """Whether ``--force`` may replace the existing ``path``: a file (the user named it as the output), an
    empty folder, or a folder this tool wrote — its ``manifest.json`` (or a demo folder's
    ``results.json`` or ``base/manifest.json``) records instaflow-edge's version. A model downloaded from
    elsewhere, a home folder or a project folder is none of these."""
    path = Path(path)
    if not path.is_dir():
        return True
    if not any(path.iterdir()):
        return True
    return any(_made_by_us(path / name) for name in (MANIFEST, "results.json", f"base/{MANIFEST}"))


def check_output(path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = (),
                 exists_ok: bool = False) -> Path:
    """Refuse an output that overlaps an input of the command (``inputs``) or is (or contains) the current
    folder, an existing output unless ``force`` or ``exists_ok`` (a command that resumes into its
    output), and an output whose parent is a file."""
    path = Path(path)
    check_overlap(path, inputs)
    cwd = Path.cwd()
    if any(a == cwd or a in cwd.parents for a in _forms(path)):
        raise InputError(f"output {path} is the current folder or contains it",
                         "choose an output folder inside or beside it: --force never replaces the folder you work in")
    if path.exists() and not (force or exists_ok):
        raise OutputExistsError(f"output {path} already exists", "pass --force to overwrite it, or choose another path")
    if path.exists() and force and not previous_output(path):
        raise InputError(f"output {path} exists and is not an instaflow-edge output (no manifest.json of ours in it)",
                         "--force only replaces a previous output: choose another path, or delete it yourself")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"cannot create {path}: {path.parent} is a file", "choose an output inside a folder")
    return path


# ---------------------------------------------------------------------------------------------------
# one writer per output: an exclusive lock beside it

_HELD: dict[str, list] = {}  # lock file → [fd, depth]: re-entrant within this process


def lock_path(path: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside ``path`` (its parent resolved, so two spellings of one output share a lock)."""
    p = Path(os.path.abspath(os.fspath(path)))
    return Path(os.path.realpath(p.parent)) / f".{p.name}.lock"


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    made = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        made.append(p)
    for p in reversed(made):
        with contextlib.suppress(FileExistsError):
            p.mkdir()
    return made


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = os.pread(fd, 32, 0).decode().strip()
        if pid.isdigit():
            return f" (pid {pid})"
    return ""


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``path`` (``.NAME.lock`` beside it) for the block.

    A second process gets :class:`OutputBusyError`; the same process may take it again (re-entrant).
    The lock file is removed on release; the OS releases the lock of a process that dies, so a lock
    file left by ``kill -9`` is simply taken over. Parent folders made for the lock file are removed
    again when they are still empty."""
    import fcntl

    lp = lock_path(path)
    key = str(lp)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield Path(path)
        finally:
            _HELD[key][1] -= 1
        return
    made: list[Path] = []
    fd = -1
    try:
        for _ in range(20):  # the lock file may vanish between open and flock (its holder releasing)
            made += _make_parents(lp.parent)
            try:
                fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                fd = -1
                raise OutputBusyError(f"{what} {path} is being written by another instaflow-edge process{holder}",
                                      "wait for it to finish, or choose another output") from None
            try:
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        else:  # pragma: no cover - a lock file that keeps being replaced
            raise OutputBusyError(f"{what} {path} is being written by another instaflow-edge process",
                                  "wait for it to finish, or choose another output")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        if fd >= 0:  # ours (locked or just created): a full disk must not keep it
            with contextlib.suppress(OSError):
                os.unlink(lp)
            os.close(fd)
        _remove_empty(made)
        raise InputError(f"cannot write beside {what} {path} ({e.strerror or e})",
                         "choose an output in a folder you can write to") from e
    except BaseException:
        _remove_empty(made)
        raise
    _HELD[key] = [fd, 1]
    try:
        yield Path(path)
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lp)  # while still holding it: a waiting opener sees the inode change and retries
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _stale_name(name: str) -> re.Pattern:
    """Names of the temporary folders :func:`atomic_dir` makes for output ``name`` (``tempfile.mkdtemp``)."""
    return re.compile(re.escape(f".{name}.") + r"(tmp|old)-[A-Za-z0-9_]+")


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders a killed run of output ``path`` left beside it (call it only while
    holding :func:`output_lock` on ``path``: then no live process writes them). When a killed ``--force``
    run had already moved the previous output aside, that output is put back first. Returns what was
    removed."""
    path = Path(os.path.abspath(os.fspath(path)))
    if not path.parent.is_dir():
        return []
    pattern = _stale_name(path.name)
    stale = sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    for p in stale:
        old = p / "old"
        if p.name.startswith(f".{path.name}.old-") and (old.exists() or old.is_symlink()) and not os.path.lexists(path):
            os.replace(old, path)  # the killed run never put its new output in place: keep the previous one
        shutil.rmtree(p, ignore_errors=True)
    return stale


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                 what: str = "output") -> Iterator[Path]:
    """:func:`check_output`, then hold the output's lock for the block, with the stale temporary folders
    of earlier killed runs removed. The checks run again under the lock: another process may have
    finished the same output meanwhile."""
    inputs = tuple(inputs)
    path = check_output(path, force, inputs)  # the cheap refusals before touching the disk
    with output_lock(path, what):
        remove_stale(path)
        yield check_output(path, force, inputs)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False,
               inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success rename it to ``target``.

    ``target`` is claimed first (:func:`claim_output`: no overlap with ``inputs``, one writer, stale
    temporary folders removed). On any exception (KeyboardInterrupt included) the temporary folder is
    removed and ``target`` is left as it was.
    """
    with claim_output(target, force, inputs) as target:
        target.parent.mkdir(parents=True, exist_ok=True)
        # absolute: writers may run tools inside a scratch working directory (onnxruntime's optimizer)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent.resolve()))
        try:
            with writing_to(target):  # a full disk or a permission names the output, not a temp file
                yield tmp
            if target.exists():  # force: move the old one aside first so the swap is short
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, trash / "old")
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(trash / "old", target)  # put the previous output back
                    raise
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


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


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


PROMPT_SAMPLE = 32


def prompt_sample(prompts, k: int = PROMPT_SAMPLE) -> list[str]:
    """Up to ``k`` of the distinct non-empty ``prompts``, evenly spread over their sorted list: what a
    trained model's manifest keeps of the prompts it learnt from (``prompts``). Exports calibrate their
    int8 activation ranges on them by default: a model calibrated on prompts unlike its own can lose its
    conditioning (docs/openvino.md)."""
    uniq = sorted({p for p in prompts if isinstance(p, str) and p.strip()})
    if len(uniq) <= k:
        return uniq
    return [uniq[(i * len(uniq)) // k] for i in range(k)]


def inherited_prompts(model: str | os.PathLike) -> dict:
    """``{"prompts": [...]}`` of a local model's manifest (a derived model keeps them), else ``{}``."""
    m = read_manifest(model) if Path(model).is_dir() else None
    prompts = (m or {}).get("prompts")
    return {"prompts": prompts} if isinstance(prompts, list) and prompts else {}


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
    manifest = json_file(path, "manifest", "restore or delete the manifest")
    if not isinstance(manifest, dict):
        raise InputError(f"{path} is not a JSON object (it is {with_article(type(manifest).__name__)})", "restore or delete the manifest")
    return manifest
