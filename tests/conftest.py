"""Shared fixtures: a tiny seeded pipeline folder, built once per session (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from instaflow_edge.presets import InitConfig, init

    out = tmp_path_factory.mktemp("models") / "tiny"
    init(InitConfig(preset="tiny", output=str(out), seed=0))
    return out


@pytest.fixture(scope="session", autouse=True)
def judge_cache(tmp_path_factory):
    """A session cache for the digits judge (trained once per session when a test needs it), so no
    test writes to ~/.cache."""
    path = tmp_path_factory.mktemp("judge-cache")
    old = os.environ.get("INSTAFLOW_EDGE_CACHE")
    os.environ["INSTAFLOW_EDGE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("INSTAFLOW_EDGE_CACHE", None)
    else:
        os.environ["INSTAFLOW_EDGE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from instaflow_edge.pipeline import load_pipeline

    return load_pipeline(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tmp_path_factory, tiny_dir) -> Path:
    """The session's plain ONNX fp32 export of tiny (``--optimize none``), shared read-only by the tests
    that only read an export (bench, report, the scheme contracts): one conversion instead of one each."""
    from instaflow_edge.convert import ConvertConfig, export

    out = tmp_path_factory.mktemp("shared-onnx") / "onnx-fp32"
    export(ConvertConfig.of("onnx", model=str(tiny_dir), output=str(out), optimize="none"))
    return out


@pytest.fixture(scope="session")
def tiny_executorch(tmp_path_factory, tiny_dir) -> Path:
    """The session's ExecuTorch fp32 export of tiny (about 2 minutes: lowering to XNNPACK is Python-heavy),
    shared read-only by the format contracts and tests/test_executorch.py."""
    pytest.importorskip("executorch")
    from instaflow_edge.convert import ConvertConfig, export

    out = tmp_path_factory.mktemp("shared-executorch") / "executorch-fp32"
    export(ConvertConfig.of("executorch", model=str(tiny_dir), output=str(out)))
    return out


@pytest.fixture(scope="session")
def tiny_qnn(tmp_path_factory, tiny_dir) -> Path:
    """The session's QNN export of tiny (W8A16, compiled for HTP v73 and v79), shared read-only by the
    format contracts and tests/test_qnn.py."""
    pytest.importorskip("onnxruntime_qnn", reason="the QNN provider's host wheel (x86-64 Linux, Windows) is not installed")
    from instaflow_edge.convert import ConvertConfig, export

    out = tmp_path_factory.mktemp("shared-qnn") / "qnn"
    export(ConvertConfig.of("qnn", model=str(tiny_dir), output=str(out), htp_arch=["73", "79"]))
    return out


@pytest.fixture(scope="session")
def coreml_run(tmp_path_factory, tiny_dir):
    """The session's Core ML export through the CLI with the defaults (Apple layout, fp16) plus
    split-einsum and two sizes: ``(folder, CLI output, {component: module as traced})``. The traced modules
    are kept by wrapping the registered exporter for the duration of the run."""
    pytest.importorskip("coremltools")
    import functools

    from typer.testing import CliRunner

    from instaflow_edge.cli import app
    from instaflow_edge.convert import TARGETS, Target
    from instaflow_edge.convert.coreml import export_coreml

    out = tmp_path_factory.mktemp("coreml") / "fp16"
    traced: dict = {}
    TARGETS[Target.coreml] = functools.partial(export_coreml, traced=traced)
    try:
        r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--target", "coreml", "-o", str(out),
                                     "--attention", "split-einsum", "--sizes", "64x64,96x64"])
    finally:
        TARGETS[Target.coreml] = export_coreml
    assert r.exit_code == 0, r.output
    return out, r.output, traced


@pytest.fixture(scope="session")
def source_image(tmp_path_factory) -> Path:
    """A 48×40 RGB picture to edit (not a model's size: generate resizes it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]
    arr = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) % 256 + rng.integers(0, 20, (40, 48, 3))
    path = tmp_path_factory.mktemp("img2img") / "source.png"
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def edit_image(source_image, tmp_path):
    """``edit_image(model, backend, strength, steps)``: ``generate --image source_image`` of one prompt and
    seed with that backend, as an int16 (H, W, 3) array; asserts the command succeeded."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    def run(model, backend, strength, steps=1, prompt="a red fox in snow", seed=5):
        out = tmp_path / f"edit-{backend}-{strength}-{steps}"
        args = ["generate", str(model), prompt, "--backend", backend, "--image", str(source_image), "--strength",
                str(strength), "--steps", str(steps), "--seed", str(seed), "-o", str(out)]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        (png,) = out.glob("*.png")
        return np.asarray(Image.open(png)).astype(np.int16)

    return run
