"""Copies out of an input folder that never carry a file from outside it.

A model or export folder may hold symlinks (a hub cache does; so may a folder from someone else). A copy
that follows a symlink out of its folder would pack the converter's own files (``~/.ssh/…``) into an
output that is made to be shared. So every copy checks first: a symlink whose real path leaves the input
folder is a one-line :class:`InputError` naming it, and so is a special file (a FIFO, a device). The one
layout that needs links out of the folder is the Hugging Face hub cache, whose ``snapshots/<rev>/`` files
link into the repository's ``blobs/``: that folder counts as inside.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .errors import InputError

FIX = "copy the file into the folder itself (cp -L) or remove the link"


def allowed_roots(folder: str | os.PathLike) -> list[Path]:
    """The real paths a copy of ``folder`` may read from: the folder, and the ``blobs/`` of the hub cache
    repository it is a snapshot of (if it is one)."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith(("models--", "datasets--")):
            roots.append(p.parent.parent / "blobs")
            break
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_links(folder: str | os.PathLike, root: str | os.PathLike | None = None, ignore=None) -> None:
    """Every entry under ``folder`` (but those ``ignore`` skips, as ``shutil.copytree`` takes it) resolves
    inside ``root`` (default: ``folder``) and is a regular file or a folder; else a one-line error naming
    the first that does not."""
    folder = Path(folder)
    roots = allowed_roots(root if root is not None else folder)
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        d = Path(dirpath)
        real_d = Path(os.path.realpath(d))
        if real_d in seen:  # a link back up the tree: visited already
            dirnames[:] = []
            continue
        seen.add(real_d)
        skip = ignore(dirpath, dirnames + filenames) if ignore else set()
        dirnames[:] = [n for n in dirnames if n not in skip]
        for name in [n for n in dirnames + filenames if n not in skip]:
            check_entry(d / name, roots, folder)


def check_entry(path: Path, roots: list[Path], folder: Path) -> Path:
    """``path``'s real path, which must lie inside ``roots`` and be a regular file or a folder."""
    real = Path(os.path.realpath(path))
    if not _inside(real, roots):
        raise InputError(f"{path} is a symlink out of {folder} (to {real}); nothing from outside an input folder is copied", FIX)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError as e:
        raise InputError(f"{path} is a broken symlink (to {real})", FIX) from e
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"{path} is not a regular file or a folder", "remove it from the folder")
    return real


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, root: str | os.PathLike | None = None,
              ignore=None, dirs_exist_ok: bool = False) -> None:
    """``shutil.copytree`` (links copied as the files they point at) after :func:`check_links`."""
    check_links(src, root, ignore)
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=dirs_exist_ok)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, root: str | os.PathLike) -> None:
    """Copy one file of the input folder ``root`` (its content, if it is a link inside ``root``)."""
    src = Path(src)
    check_entry(src, allowed_roots(root), Path(root))
    shutil.copyfile(src, dst)
