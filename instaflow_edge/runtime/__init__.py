"""instaflow_edge.runtime: the format registry — which format an export folder is, and how to run it.

``open_export(folder)`` reads the folder's manifest once, finds its :class:`~.base.RuntimeFormat` by the
manifest's ``kind`` and opens it with that format's own runtime into an :class:`~.base.Export`.
``generate``, ``eval``, ``bench`` and ``report`` open every export this way; none of them knows a
format. The built-in formats are named here with their manifest kind and module, and their module is
imported only when a folder of that kind is opened (``import instaflow_edge.runtime`` stays light; no
registration happens as an import side effect). :func:`register` adds a format at run time (a test's
toy format, a script's own).

A plug-in package adds a format for the command line too, with an entry point in the group
``instaflow_edge.formats`` naming its :class:`~.base.RuntimeFormat` (``toy = "my_pkg.runtime:FORMAT"`` under
``[project.entry-points."instaflow_edge.formats"]``): its name becomes a ``--backend`` choice and its
exports open in ``generate``, ``eval``, ``bench`` and ``report``. Only the entry points' names are read at
import; a plug-in module is imported when its format is first needed.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, InputError, ModelError
from .base import Export, ExportFacts, RuntimeFormat  # noqa: F401  (the registry's API)

# The one table of built-in targets: name -> (manifest kind, module defining FORMAT, has a runtime in
# Python, the convert options class as "module:Class"). The names are the convert targets (convert/config.py
# makes its Target enum and finds each options class here, both by name, so a target's modules load only
# when it is used); those with a runtime in Python are also the --backend choices.
BUILTIN: dict[str, tuple[str, str, bool, str]] = {
    "onnx": ("onnx-export", "instaflow_edge.runtime.onnx", True, "instaflow_edge.convert.config:OnnxOptions"),
    "openvino": ("openvino-export", "instaflow_edge.runtime.openvino", True, "instaflow_edge.convert.config:OpenVINOOptions"),
    "coreml": ("coreml", "instaflow_edge.runtime.coreml", True, "instaflow_edge.convert.config:CoreMLOptions"),
    "web": ("web-site", "instaflow_edge.runtime.web", False, "instaflow_edge.convert.config:WebOptions"),  # a browser runs it
    "executorch": ("executorch-export", "instaflow_edge.runtime.executorch", True, "instaflow_edge.convert.executorch:ExecuTorchOptions"),
    "qnn": ("qnn-export", "instaflow_edge.runtime.qnn", True, "instaflow_edge.convert.qnn:QnnOptions"),
}
_REGISTERED: dict[str, RuntimeFormat] = {}
ENTRY_POINTS = "instaflow_edge.formats"  # the entry-point group of plug-in formats
log = logging.getLogger(__name__)


@functools.cache
def _plugins() -> dict:
    """Installed plug-in formats: entry-point name -> entry point (not loaded). A name that is a built-in
    format is ignored: the built-in one is used."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS) if ep.name not in BUILTIN and ep.name != "torch"}


def _load_plugin(name: str) -> RuntimeFormat:
    """Import the plug-in format ``name`` and register it; a plug-in that fails to import, or that names
    something other than a RuntimeFormat of that name, is a one-line error."""
    ep = _plugins()[name]
    fix = f"reinstall or uninstall the package that provides it (entry point {ep.value!r} in {ENTRY_POINTS})"
    try:
        fmt = ep.load()
    except Exception as e:  # a plug-in's own bug: said in one line, with where it comes from
        raise ModelError(f"the plug-in format {name!r} failed to load ({type(e).__name__}: {e})", fix) from e
    if not isinstance(fmt, RuntimeFormat) or fmt.name != name:
        raise ModelError(f"the plug-in format {name!r} is not a RuntimeFormat named {name!r} (got {type(fmt).__name__})", fix)
    return register(fmt)


def register(fmt: RuntimeFormat) -> RuntimeFormat:
    """Add (or replace) a format; returns it."""
    _REGISTERED[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def names() -> list[str]:
    """Every format's name: built-in first, then installed plug-ins, then those registered at run time."""
    out = list(BUILTIN) + [n for n in _plugins() if n not in BUILTIN]
    return out + [n for n in _REGISTERED if n not in out]


def manifest_kind(name: str) -> str:
    """The manifest ``kind`` an export of format ``name`` carries (what convert writes)."""
    if name in BUILTIN and name not in _REGISTERED:
        return BUILTIN[name][0]
    return get(name).kind


def get(name: str) -> RuntimeFormat:
    """The format record ``name``; an unknown name is a one-line error listing the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name][1]).FORMAT
    if name in _plugins():
        return _load_plugin(name)
    raise InputError(f"unknown export format {name!r}", f"choose one of: {', '.join(names())}")


def _by_kind(kind) -> str | None:
    for n, fmt in _REGISTERED.items():
        if fmt.kind == kind:
            return n
    for n, (k, *_) in BUILTIN.items():
        if k == kind:
            return n
    if not isinstance(kind, str):  # a pipeline folder, or no manifest: no plug-in is imported to say so
        return None
    for n in _plugins():
        if n in _REGISTERED:
            continue
        try:
            fmt = _load_plugin(n)
        except ModelError as e:  # a broken plug-in does not stop the folders of every other format
            log.warning("skipping %s", e)
            continue
        if fmt.kind == kind:
            return n
    return None


def kinds() -> list[str]:
    """The manifest kinds of every format that loads (for messages: a broken plug-in is left out)."""
    out = []
    for n in names():
        try:
            out.append(manifest_kind(n))
        except ModelError:
            continue
    return out


def format_of(folder: str | Path, manifest: dict | None = None) -> str:
    """The format name of an export folder, from its manifest's ``kind``; a folder that is not an export
    is a one-line error listing the formats (and what makes them)."""
    folder = Path(folder)
    m = manifest if manifest is not None else (read_manifest(folder) if folder.is_dir() else None)
    name = _by_kind((m or {}).get("kind"))
    if name is None:
        raise InputError(f"{folder} is not an export folder (no manifest.json of kind {', '.join(kinds())})",
                         "pass a folder written by `instaflow-edge convert` or `instaflow-edge quantize`")
    return name


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an export of a known format (a pipeline folder is not)."""
    m = read_manifest(folder) if Path(folder).is_dir() else None
    return _by_kind((m or {}).get("kind")) is not None


def _check_available(fmt: RuntimeFormat, device: str) -> None:
    why = fmt.open is not None and fmt.unavailable(device)
    if why:
        raise DeviceError(why, f"run {fmt.name} exports where their runtime runs, or use another export here")


def open_export(folder: str | Path, *, expect: str | None = None, steps: int | None = None, guidance: float = 1.0,
                threads: int | None = None, device: str = "cpu", manifest: dict | None = None) -> Export:
    """Open the export in ``folder`` with its own runtime, for sampling ``steps`` (None: its default).

    ``expect``: the format the caller was told (``--backend``); a folder of another format is a one-line
    error. ``manifest``: the folder's manifest when the caller has read it already. Everything that can be
    refused (manifest, files, sizes, platform) is refused before the first model loads."""
    folder = Path(folder)
    if expect is not None:  # what the caller asked for cannot run here: say so before reading the folder
        _check_available(get(expect), device)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder", "pass a folder written by `instaflow-edge convert`")
    if manifest is None:
        manifest = read_manifest(folder) or {}
    if expect is not None and _by_kind(manifest.get("kind")) is None:
        fmt = get(expect)
        raise ModelError(f"{folder} has no {fmt.title or expect} export manifest",
                         f"pass a folder written by `instaflow-edge convert {expect}`")
    name = format_of(folder, manifest)
    if expect is not None and expect != name:
        raise InputError(f"{folder} is a {name} export, not {expect}", f"pass --backend {name}, or a {expect} export")
    fmt = get(name)
    if fmt.open is None:
        raise InputError(f"{folder} is a {name} export, which has no runtime here ({fmt.description})", fmt.refusal)
    _check_available(fmt, device)
    return fmt.open(folder, manifest, steps=steps, guidance=guidance, threads=threads, device=device)


def export_label(folder: str | Path, manifest: dict | None = None) -> str:
    """A short name for an export from its manifest: ``ort fp32``, ``ort int8-static``, ``openvino auto``,
    ``openvino int8``, ``coreml palettize-6``."""
    m = manifest if manifest is not None else (read_manifest(folder) or {})
    return get(format_of(folder, m)).label(m)


def parse_exports(items: list[str]) -> dict[str, Path]:
    """``[DIR | LABEL=DIR]`` → ``{label: folder}``, every folder recognized as an export of a known format;
    a user's label takes its format's prefix (``ort ``); labels made unique with the folder's name."""
    out: dict[str, Path] = {}
    seen: dict[Path, str] = {}  # real folder -> its label
    for item in items:
        label, sep, d = str(item).partition("=")
        own = bool(sep) and not Path(item).exists()
        folder = Path(d if own else item)
        if not folder.is_dir():
            raise InputError(f"export {item}: no such folder", "pass an export folder (or LABEL=DIR)")
        real = folder.resolve()
        if real in seen:
            raise InputError(f"export {folder} is given twice (the first time as {seen[real]!r})", "pass each export once")
        m = read_manifest(folder) or {}
        fmt = get(format_of(folder, m))
        name = label if own else fmt.label(m)
        if fmt.label_prefix and not name.startswith(fmt.label_prefix):
            name = fmt.label_prefix + name
        if name in out:
            name = f"{name} ({folder.name})"
        base, k = name, 2
        while name in out:  # three folders of one name and kind: number them
            name, k = f"{base} #{k}", k + 1
        out[name] = folder
        seen[real] = name
    return out


def source_pipeline(folder: str | Path, hops: int = 4) -> Path | None:
    """The local pipeline folder an export was made from, following ``source.model`` through quantized
    exports (a ``quantize`` output names its fp32 export); None when it cannot be told (a hub id, a
    missing folder, a manifest without a source)."""
    folder = Path(folder)
    for _ in range(hops):
        m = read_manifest(folder) or {}
        src = get(format_of(folder, m)).source(m).get("model") if is_export(folder) else None
        if not src or not Path(src).is_dir():
            return None
        folder = Path(src)
        if not is_export(folder):
            return folder
    return None


def source_hash(folder: str | Path) -> str | None:
    """The content hash of the model an export was made from, where its manifest records one."""
    m = read_manifest(folder) or {}
    return get(format_of(folder, m)).source(m).get("content_sha256")


def backend_names() -> list[str]:
    """``torch`` and every format with a runtime in Python: the choices of ``--backend``."""
    return ["torch"] + [n for n in names() if (BUILTIN[n][2] if n in BUILTIN else get(n).open is not None)]


# The --backend choices of generate and eval: the built-in formats with a runtime in Python and the
# installed plug-ins, by name (Typer needs an enum; a plug-in that turns out to have no runtime is refused
# in one line when opened). A format registered at run time is accepted by the Python API's configs, which
# check ``backend_names()``.
Backend = enum.Enum("Backend", {n: n for n in ["torch"] + [n for n, (_, _, py, _) in BUILTIN.items() if py] + list(_plugins())},
                    type=str)
Backend.__doc__ = "``--backend``: PyTorch on the pipeline folder, or an export's own runtime."
