"""convert --target coreml on the tiny preset: packages, I/O, metadata, sizes, bad input, the Linux backend.

One full export with the defaults (Apple layout, fp16) plus split-einsum and two enumerated sizes is shared
by the session (``coreml_run`` in conftest.py; --fused is slow); one native-layout export keeps today's
packages covered. Apple's pipeline itself is in test_coreml_apple.py. Every compression scheme runs through
the real converter on the text encoder in test_coreml_compress.py, and through the whole CLI in the slow
tests there.
"""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

pytest.importorskip("coremltools")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def coreml_export(coreml_run):
    return coreml_run[0]


@pytest.fixture(scope="session")
def native_export(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("coreml-native") / "fp32"
    r = run("convert", tiny_dir, "--target", "coreml", "-o", out, "--layout", "native", "--precision", "fp32",
            "--parity-size", 32)
    assert r.exit_code == 0, r.output
    return out


def test_export_layout_and_manifest(coreml_export, tiny_dir):
    names = {p.name for p in coreml_export.iterdir()}
    assert {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "vocab.json", "merges.txt",
            "manifest.json"} <= names
    assert (coreml_export / "vocab.json").read_bytes() == (tiny_dir / "tokenizer" / "vocab.json").read_bytes()
    m = json.loads((coreml_export / "manifest.json").read_text())
    assert m["kind"] == "coreml" and m["config"]["target"] == "coreml"
    assert m["config"]["options"]["precision"] == "fp16" and m["config"]["options"]["attention"] == "split-einsum"
    assert m["layout"] == "apple" and m["scheduler"]["scheduler"] == "dpmpp"
    assert m["image_sizes"] == [[64, 64], [96, 64]]
    assert m["gate"]["min_psnr"] == 35.0
    for name in ("text_encoder", "unet", "vae_decoder"):
        c = m["components"][name]
        assert c["parity"]["psnr"] is None or c["parity"]["psnr"] >= 35.0
        assert 12 < c["bits_per_weight"] < 20  # fp16 weights plus small-tensor overhead
        assert c["weights_match"]["matched"] > 0 and c["weights_match"]["max_rel_error"] < 2e-3
    assert m["end_to_end"]["psnr"] >= 35.0
    assert [r["component"] for r in m["report"]][-1] == "image (end to end)"


@pytest.mark.parametrize("layout", ["apple", "native"])
def test_packages_declare_the_specs_io(request, layout, tiny_pipe):
    from instaflow_edge.convert import coreml as cm
    from instaflow_edge.convert import coreml_check as cc

    from instaflow_edge.components import Sizes

    export = request.getfixturevalue("coreml_export" if layout == "apple" else "native_export")
    precision = "fp16" if layout == "apple" else "fp32"
    default, taller = Sizes.of(tiny_pipe, 1), Sizes.of(tiny_pipe, 1, height=96, width=64)
    for file, name in (("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")):
        ml = cc.load(export / f"{file}.mlpackage")
        got = cc.io(ml)
        spec = cm.specs(layout)[name]
        assert [f["name"] for f in got["inputs"]] == [t.name for t in spec.inputs]
        assert [f["name"] for f in got["outputs"]] == [t.name for t in spec.outputs]
        for f, t in zip(got["inputs"], spec.inputs):
            assert f["shape"] == list(default.shape(t)) and f["dtype"] == "FLOAT32" and f["description"]
            if layout == "apple" and default.shape(t) != taller.shape(t):
                assert sorted(map(tuple, f["enumerated"])) == sorted({default.shape(t), taller.shape(t)})
        assert all(f["dtype"] == "FLOAT32" and f["description"] for f in got["outputs"])
        meta = ml.user_defined_metadata
        assert meta["component"] == name and meta["precision"] == precision and meta["version.coremltools"]
        assert meta["layout"] == layout
        assert ml.license and ml.short_description and ml.author == "instaflow-edge"
    if layout == "apple":
        unet = cc.io(cc.load(export / "Unet.mlpackage"))["inputs"][0]
        assert sorted(unet["enumerated"]) == [[1, 4, 8, 8], [1, 4, 12, 8]]


def test_parity_chain_size_is_its_own_and_recorded(native_export, coreml_export):
    m = json.loads((native_export / "manifest.json").read_text())
    assert m["image_sizes"] == [[64, 64]] and m["quality_image_size"] == [32, 32]  # --parity-size 32
    assert m["end_to_end"]["psnr"] is None or m["end_to_end"]["psnr"] >= 60  # None: identical
    assert json.loads((coreml_export / "manifest.json").read_text())["quality_image_size"] == [64, 64]


def test_fp16_quality_chain_of_a_full_size_unet_runs_small(tiny_pipe):
    """PyTorch's CPU float16 is slow: an SD-size fp16 chain runs at 128² unless --parity-size says otherwise."""
    import types

    import torch

    from instaflow_edge.convert import ConvertConfig
    from instaflow_edge.convert.coreml import quality_size

    class Big:  # the tiny pipeline, but its UNet counts 200 M parameters (on the meta device: no memory)
        unet = types.SimpleNamespace(parameters=lambda: [torch.empty(200_000_000, device="meta")],
                                     config=tiny_pipe.unet.config)

        def __getattr__(self, name):
            return getattr(tiny_pipe, name)

    big = Big()
    full = types.SimpleNamespace(height=512, width=512)
    cfg = lambda **kw: ConvertConfig.of("coreml", model="m", output="o", **kw)  # noqa: E731
    assert quality_size(cfg(precision="fp32"), big, full) is full
    assert quality_size(cfg(), tiny_pipe, full) is full  # a small UNet: the conversion size
    small = quality_size(cfg(), big, full)
    assert (small.height, small.width) == (128, 128)
    chosen = quality_size(cfg(parity_size=256), big, full)
    assert (chosen.height, chosen.width) == (256, 256)


def test_native_layout_keeps_todays_packages(native_export):
    m = json.loads((native_export / "manifest.json").read_text())
    assert m["layout"] == "native" and m["scheduler"]["scheduler"] is None
    assert m["components"]["unet"]["io"]["outputs"][0]["name"] == "out_sample"
    assert m["components"]["vae_decoder"]["io"]["inputs"][0]["name"] == "latent_sample"
    assert m["end_to_end"]["psnr"] is None or m["end_to_end"]["psnr"] >= 60


def test_op_census_shows_fp16_compute_and_no_compression(coreml_export):
    m = json.loads((coreml_export / "manifest.json").read_text())
    ops = m["components"]["unet"]["ops"]
    assert ops.get("conv", 0) > 0 and not any(k.startswith("constexpr") for k in ops)
    assert ops.get("einsum", 0) > 0 and "matmul" not in ops  # split-einsum attention: per-head einsums
    assert m["components"]["unet"]["io"]["inputs"][2]["name"] == "encoder_hidden_states"
    assert m["components"]["unet"]["io"]["inputs"][2]["shape"] == [1, 32, 1, 77]  # Apple's (B, C, 1, 77)


def test_report_is_printed(coreml_run):
    out, output, _ = coreml_run
    assert "PSNR vs fp32" in output and "image (end to end)" in output and "bits/w" in output
    m = json.loads((out / "manifest.json").read_text())
    for row in m["report"]:
        assert row["component"] in output
        assert f"{row['size_mb']:.3f}" in output


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("extra,needles", [
    (["--compress", "palettize-3"], ["unknown --compress", "palettize-4", "mixed-bit", "prune-2:4"]),
    (["--compress", "prune-50+palettize-4"], ["iOS18", "--min-target"]),
    (["--compress", "prune-50+palettize-4", "--min-target", "macOS14"], ["iOS18", "macOS14"]),
    (["--compress", "mixed-bit"], ["--target-bits"]),
    (["--compress", "palettize-4", "--target-bits", "4"], ["--target-bits", "mixed-bit"]),
    (["--min-target", "iOS15"], ["--min-target", "iOS16", "macOS15"]),
    (["--sizes", "64by64"], ["--sizes"]),
    (["--sizes", "60x64"], ["multiple of 16"]),
    (["--quantize", "int8-dynamic"], ["--quantize", "coreml"]),
    (["--layout", "ios"], ["unknown --layout 'ios'", "apple", "native"]),
    (["--parity-size", "40"], ["parity_size", "multiple of 16"]),
    (["--fused"], ["--fused", "Apple's Swift pipeline", "--layout native --fused"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_dir, extra, needles):
    before = set(tmp_path.iterdir())
    _one_line_error(run("convert", tiny_dir, "--target", "coreml", "-o", tmp_path / "o", *extra), *needles)
    assert set(tmp_path.iterdir()) == before


# every convert target (the table of built-in targets, runtime.BUILTIN); each exports end to end in
# tests/contracts/test_format.py, and the test below dispatches each one cheaply
from instaflow_edge.runtime import BUILTIN as _BUILTIN  # noqa: E402

TESTED_TARGETS = list(_BUILTIN)


def test_every_target_is_tested():
    """Every built-in target's exporter registers, and every registered exporter is a built-in target."""
    import importlib

    from instaflow_edge.convert import TARGETS, Target
    from instaflow_edge.convert.config import options_class

    for t in Target:  # an exporter registers when its options' module loads
        importlib.import_module(options_class(t).module)

    assert {getattr(t, "value", t) for t in TARGETS} == set(TESTED_TARGETS)
    assert set(TARGETS) == set(Target)


@pytest.mark.parametrize("name", TESTED_TARGETS)
def test_every_target_dispatches_and_fails_cleanly(tmp_path, name):
    """``export`` reaches the target's exporter, which refuses a folder that is not a pipeline, writing nothing."""
    from instaflow_edge.convert import ConvertConfig, Target, export

    from instaflow_edge.errors import InstaflowError

    (tmp_path / "empty").mkdir()
    cfg = ConvertConfig.of(name, model=str(tmp_path / "empty"), output=str(tmp_path / "o"))
    assert cfg.target is Target(name)
    with pytest.raises(InstaflowError, match="model_index.json"):
        export(cfg)
    assert not (tmp_path / "o").exists()


def test_config_is_normalized_once_when_made():
    from instaflow_edge.convert.config import (
        ConvertConfig,
        CoreMLAttention,
        CoreMLLayout,
        Optimize,
        Precision,
        Target,
    )
    from instaflow_edge.quantize.schemes import (
        CoreMLCompression,
        MinTarget,
        OnnxScheme,
        QuantEngine,
    )

    from instaflow_edge.errors import InputError

    cfg = ConvertConfig.of("coreml", model="m", output="o", min_target="iOS18", precision="fp32",
                        attention="split-einsum", compress="prune-50+palettize-4", layout="native")
    o = cfg.options
    assert (cfg.target, o.min_target, o.precision, o.attention, o.compress, o.layout) == (
        Target.coreml, MinTarget.iOS18, Precision.fp32, CoreMLAttention.split_einsum, CoreMLCompression.prune_50_palettize_4,
        CoreMLLayout.native)
    assert ConvertConfig.of("coreml", model="m", output="o").options.layout is CoreMLLayout.apple
    assert all(type(v) is not str for v in (cfg.target, o.min_target, o.compress))
    cfg = ConvertConfig.of("onnx", model="m", output="o", optimize="none", quantize="int8-static", engine="ort")
    o = cfg.options
    assert (o.optimize, o.quantize, o.engine) == (Optimize.none, OnnxScheme.int8_static, QuantEngine.ort)
    for kwargs, needle in [
        ({"min_psnr": float("nan")}, "min_psnr must be a finite number"),
        ({"height": 0}, "height must be a positive integer"),
        ({"engine": "tvm"}, "unknown --engine 'tvm'"),
        ({"target": "coreml", "compress": "palettize-3"}, "unknown --compress 'palettize-3'"),
        ({"target": "coreml", "target_bits": "4"}, "target_bits must be a finite number"),
        ({"opset": 9}, "--opset 9 is not supported"),
        ({"layout": "native"}, "--layout does not apply to --target onnx"),
        ({"target": "coreml", "layout": "apple", "fused": True}, "--layout apple does not take it"),
    ]:
        with pytest.raises(InputError, match=needle):
            ConvertConfig.of(kwargs.pop("target", "onnx"), model="m", output="o", **kwargs)


def test_unknown_target_lists_targets(tmp_path, tiny_dir):
    r = run("convert", tiny_dir, "--target", "tflite", "-o", tmp_path / "o")
    assert r.exit_code != 0 and "coreml" in r.output and "onnx" in r.output
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, tiny_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(run("convert", tiny_dir, "--target", "coreml", "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_coremltools_names_the_extra(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import now raises ImportError
    _one_line_error(run("convert", tiny_dir, "--target", "coreml", "-o", tmp_path / "o"),
                    "coremltools is not installed", "instaflow-edge[coreml]")
    assert not (tmp_path / "o").exists()


def test_psnr_gate_failure_names_component_and_leaves_nothing(tmp_path, tiny_dir):
    r = run("convert", tiny_dir, "--target", "coreml", "-o", tmp_path / "o", "--compress", "prune-50", "--min-psnr", "99")
    assert r.exit_code == 3 and "text_encoder: PSNR" in r.output and "below the 99.0 dB gate" in r.output
    assert "--min-psnr" in r.output and "converting" not in r.output  # failed before converting anything
    assert not [p for p in tmp_path.iterdir()]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML can predict")
def test_generate_coreml_on_linux_is_one_line(tmp_path, coreml_export):
    _one_line_error(run("generate", coreml_export, "a red fox", "-o", tmp_path / "g", "--backend", "coreml"),
                    "Core ML prediction needs macOS")
    assert not (tmp_path / "g").exists()


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_macos_predict_parity(native_export, tiny_pipe):
    """Real MLModel.predict of every native-layout package against the PyTorch fp32 reference, at the fp16
    gate (the Apple layout's packages run under Apple's pipeline in test_coreml_apple.py)."""
    import coremltools as ct
    import numpy as np

    from instaflow_edge.components import COMPONENTS, Sizes
    from instaflow_edge.parity import check, compare

    sizes = Sizes.of(tiny_pipe, batch=1)
    for file, name in (("TextEncoder", "text_encoder"), ("Unet", "unet"), ("VAEDecoder", "vae_decoder")):
        spec = COMPONENTS[name]
        inputs = spec.example_inputs(tiny_pipe, sizes)
        ref = spec.module(tiny_pipe)(*inputs).detach().numpy()
        ml = ct.models.MLModel(str(native_export / f"{file}.mlpackage"))
        feed = {t.name: x.numpy().astype(np.float32) for t, x in zip(spec.inputs, inputs)}
        out = ml.predict(feed)[spec.outputs[0].name]
        check(compare(name, ref, out), 35.0)


@pytest.mark.slow
def test_fused_generator_package(tmp_path, tiny_dir, tiny_pipe):
    from instaflow_edge.convert import coreml_check as cc

    from instaflow_edge.components import COMPONENTS, Sizes

    out = tmp_path / "fused"
    r = run("convert", tiny_dir, "--target", "coreml", "-o", out, "--fused", "--precision", "fp32", "--layout", "native")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["files"]["generator"] == "Generator.mlpackage"
    g = m["components"]["generator"]
    assert g["parity"]["psnr"] is None or g["parity"]["psnr"] >= 60
    got = cc.io(cc.load(out / "Generator.mlpackage"))
    sizes = Sizes.of(tiny_pipe, 1)
    spec = COMPONENTS["generator"]
    assert [(f["name"], f["shape"]) for f in got["inputs"]] == [(t.name, list(sizes.shape(t))) for t in spec.inputs]
    assert got["outputs"][0]["name"] == "image"
