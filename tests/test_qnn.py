"""``convert --target qnn``: the HTP rewrites keep the fp32 graph's arithmetic, the QDQ graphs pass their
gates, every compute node of every component lands on the HTP for each architecture, and the compiled
EP-context models load back in the QNN provider and compute the PyTorch image (the host's HTP emulation).
The format contracts (generate, edit, eval, bench, report) run in tests/contracts/test_format.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instaflow_edge.errors import InputError

pytest.importorskip("onnxruntime_qnn", reason="the QNN provider's host wheel (x86-64 Linux, Windows) is not installed")


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_the_htp_rewrites_keep_the_fp32_arithmetic(name, tiny_dir, tmp_path):
    """``prepare``'s graph (folded shapes, finite causal mask, GroupNorm's affine as a depthwise Conv)
    computes what the exported graph computes, in fp32."""
    import dataclasses

    from instaflow_edge.convert import reference
    from instaflow_edge.convert.onnx import export_component, onnx_spec
    from instaflow_edge.quantize.qnn import prepare
    from instaflow_edge.runtime import onnx_io

    pipe, sizes = reference.load_source(tiny_dir, False, None, None)
    spec = dataclasses.replace(onnx_spec(name), dynamic=())
    inputs = spec.example_inputs(pipe, sizes)
    export_component(spec, spec.module(pipe), inputs, tmp_path / "raw" / "model.onnx", 17)
    done = prepare(tmp_path / "raw" / "model.onnx", tmp_path / "prepared" / "model.onnx")
    if name == "text_encoder":
        assert done["causal_mask"] >= 1
    else:
        assert done["groupnorm_affine"] >= 1
    feed = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    a = onnx_io.session(tmp_path / "raw" / "model.onnx").run(None, feed)[0]
    b = onnx_io.session(tmp_path / "prepared" / "model.onnx").run(None, feed)[0]
    np.testing.assert_allclose(b, a, atol=2e-5 * max(1.0, float(np.abs(a).max())))


def test_tiny_compiles_whole_onto_the_htp_for_two_architectures(tiny_qnn):
    import onnx

    from instaflow_edge.convert.qnn import qnn_session
    from instaflow_edge.runtime.qnn import context_model

    m = json.loads((tiny_qnn / "manifest.json").read_text())
    assert m["kind"] == "qnn-export" and m["quantize"]["scheme"] == "w8a16"
    assert all(r["psnr"] >= m["gates"][r["component"]] for r in m["parity"])
    assert m["conditioning"]["ratio"] >= 0.9
    archs = m["htp"]["archs"]
    assert sorted(archs) == ["73", "79"]
    binaries = {}
    for arch, comps in archs.items():
        assert sorted(comps) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
        for name, row in comps.items():
            ctx = context_model(tiny_qnn, arch, name)
            graph = onnx.load(str(ctx), load_external_data=False).graph
            assert [n.op_type for n in graph.node].count("EPContext") == 1
            # everything but the float32 I/O conversions is inside the one EPContext node
            assert row["all_compute_on_htp"] and {o["op"] for o in row["on_cpu"]} <= {"QuantizeLinear", "DequantizeLinear"}
            assert len(row["on_cpu"]) == len(graph.node) - 1
            bins = sorted(ctx.parent.glob("*.bin"))
            assert bins and row["binary_bytes"] == sum(b.stat().st_size for b in bins)
            binaries[(arch, name)] = b"".join(b.read_bytes() for b in bins)
            assert row["peak_rss_mib"] > 0 and row["seconds"] > 0
            # the compiled graph, run by the host's HTP emulation, computes the PyTorch output
            assert row["htp_emulated"]["psnr"] >= m["gates"][name], (arch, name, row["htp_emulated"])
            qnn_session(ctx, arch)  # loads back here too
    assert binaries[("73", "unet")] != binaries[("79", "unet")]  # a binary per architecture


def test_the_qdq_graphs_quantize_every_tensor(tiny_qnn):
    import onnx

    g = onnx.load(str(tiny_qnn / "unet" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    compute = [o for o in ops if o not in ("QuantizeLinear", "DequantizeLinear")]
    assert ops.count("QuantizeLinear") >= len(compute) // 2  # activations between the ops are quantized
    domains = {n.domain for n in g.node if n.op_type == "QuantizeLinear"}
    assert domains <= {"com.microsoft", ""}  # 16-bit Q/DQ


@pytest.mark.parametrize("options, message", [
    ({"htp_arch": ["71"]}, "unknown --htp-arch '71'"),
    ({"htp_arch": ["73"], "no_compile": True}, "--htp-arch and --no-compile contradict"),
    ({"quantize": "int8"}, "quantize"),
])
def test_bad_qnn_options_are_one_line(options, message):
    from instaflow_edge.convert import ConvertConfig

    with pytest.raises(InputError, match=message):
        ConvertConfig.of("qnn", model="m", output="o", **options)

