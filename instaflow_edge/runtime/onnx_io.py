"""Reading and writing ONNX files safely: external-data checks, sessions, saving big models.

Every ONNX file this package opens from a user-supplied folder goes through :func:`check_model_file`
first: it parses only the protobuf (never the external data) and refuses any initializer whose
external-data ``location`` is absolute, climbs out with ``..``, or resolves (through a symlink)
outside the model's folder — the ONNX external-data path-traversal CVEs (CVE-2022-25882,
CVE-2024-27318/27319) let a crafted model read arbitrary files otherwise. Only then is the model
loaded by onnxruntime or onnx with its external data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import InputError, ModelError

MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx_data"  # optimum's name for the weights file beside a > 2 GB model
PROTOBUF_LIMIT = 2_000_000_000  # a single ModelProto cannot exceed 2 GB: bigger weights go external


def _sparse(sp):
    yield sp.values
    yield sp.indices


def _graph_tensors(graph):
    """Every TensorProto of ``graph`` and its subgraphs: initializers, sparse initializers (their values
    and indices) and node attributes (dense and sparse), which are all places external data can hide."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield from _sparse(sp)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield from _sparse(a.sparse_tensor)
        for sp in a.sparse_tensors:
            yield from _sparse(sp)
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)


def _all_tensors(model):
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            yield from _node_tensors(node)


def check_model_file(path: str | os.PathLike):
    """Parse ``path`` without its external data and check every external location stays in its folder.

    Returns the ModelProto (weights not loaded). Raises ModelError for a corrupt file and InputError
    for an escaping external-data path; nothing is read outside the folder either way.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} is missing", "re-export the model (instaflow-edge convert --target onnx)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelError(f"{path} is not a valid ONNX file ({type(e).__name__})", "re-export the model") from e
    if not model.graph.node:
        raise ModelError(f"{path} is not a valid ONNX model (empty graph)", "re-export the model")
    folder = path.parent.resolve()
    for t in _all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (path.parent / loc)
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts or not target.resolve().is_relative_to(folder):
            raise InputError(
                f"{path}: tensor {t.name!r} points its external data outside the model folder ({loc!r})",
                "refusing to load it (ONNX external-data path traversal); re-export the model from a trusted source",
            )
    return model


def check_folder(folder: str | os.PathLike) -> list[Path]:
    """Check every ``*.onnx`` under ``folder`` (see check_model_file); returns their paths."""
    paths = sorted(Path(folder).rglob("*.onnx"))
    for p in paths:
        check_model_file(p)
    return paths


def session(path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None,
            optimization: str = "all"):
    """An onnxruntime InferenceSession for ``path``, after the external-data check."""
    import onnxruntime as ort

    check_model_file(path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load {path}: {first}", "re-export the model") from e


def model_bytes(model) -> int:
    """Bytes of the initializers of ``model`` (weights loaded)."""
    return sum(len(t.raw_data) for t in _all_tensors(model) if t.HasField("raw_data"))


def save(model, path: str | os.PathLike) -> Path:
    """Save ``model`` (weights loaded) to ``path``; weights go to ``model.onnx_data`` beside it when the
    protobuf would pass 2 GB. Returns the path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = model_bytes(model) > PROTOBUF_LIMIT
    for old in (path, path.parent / EXTERNAL_DATA):
        if old.exists():
            old.unlink()
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def load(path: str | os.PathLike):
    """Load a checked model with its weights."""
    import onnx

    check_model_file(path)
    return onnx.load(str(path), load_external_data=True)


def file_sizes(folder: str | os.PathLike) -> int:
    """Total bytes of a component folder (model + external data)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@contextlib.contextmanager
def scratch_cwd(prefix: str = "instaflow-onnx-") -> Iterator[Path]:
    """A temporary working directory: onnxruntime's optimizer and quantizer drop ``*.data``,
    ``sym_shape_infer_temp.onnx`` and ``nc_workspace/`` into the CWD; this keeps them out of the user's."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d, contextlib.chdir(d), quiet():
        yield Path(d)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime's tooling chatter (tqdm bars of the fusions, root-logger advice of the
    quantizer) for the duration, so a failing command still prints one error line; restored after."""
    import logging

    root = logging.getLogger()
    level, env = root.level, os.environ.get("TQDM_DISABLE")
    root.setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"  # read by every tqdm bar created while it is set
    try:
        yield
    finally:
        root.setLevel(level)
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env
