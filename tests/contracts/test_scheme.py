"""The contract every registered quantization scheme keeps, for each record of ``quantize.schemes``.

A scheme applied to the ``tiny`` preset with its defaults quantizes exactly its ``default_components``,
leaves its ``marks`` in the graph (the op types or weight element types that show it was applied),
records its gate in the manifest and meets it. The enum the CLI offers and the registry agree. Core ML
compressions are checked op by op in ``tests/test_coreml_compress.py`` (parametrized over the same
records); this file covers every backend whose export runs here.
"""

from __future__ import annotations

import json

import pytest

from instaflow_edge.quantize.schemes import CHOICES, all_schemes

BACKENDS = ("onnx", "openvino", "executorch", "qnn")


def _records():
    out = []
    for s in all_schemes(BACKENDS):
        # NNCF's calibrated schemes take ~35 s each on tiny, ExecuTorch's int8 about 3.5 minutes (PT2E,
        # then lowering): the slow suite runs them (make test-slow)
        slow = (pytest.mark.slow,) if s.backend in ("openvino", "executorch") and s.calibrated else ()
        out.append(pytest.param(s, id=f"{s.backend}-{s.name}", marks=slow))
    return out


@pytest.mark.parametrize("backend", list(CHOICES))
def test_the_cli_choices_are_the_registry(backend):
    assert {s.name for s in all_schemes((backend,))} == {m.value for m in CHOICES[backend]}


@pytest.fixture(scope="session")
def onnx_fp32(tiny_onnx_fp32):
    return tiny_onnx_fp32


def _onnx_signature(path) -> set[str]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    types = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in g.initializer}
    return {n.op_type for n in g.node} | {f"{t} weights" for t in types}


def _openvino_signature(path) -> set[str]:
    import openvino as ov

    ops = ov.Core().read_model(str(path)).get_ops()
    return {o.get_type_name() for o in ops} | {f"{o.get_element_type().get_type_name()} weights"
                                                for o in ops if o.get_type_name() == "Constant"}


def _executorch_signature(manifest: dict):
    """The ops the lowering put inside the UNet's XNNPACK delegates and beside them (the .pte's delegate
    payload is XNNPACK's own serialization; the exporter records what it lowered)."""
    d = manifest["executorch"]["delegation"]["unet"]
    return lambda path: set(d["delegated_ops"]) | set(d["portable_ops"])


def _apply(record, tiny_dir, onnx_fp32, out):
    """The scheme applied with its defaults: ``(manifest, path of a quantized component's graph)``."""
    if record.backend == "executorch":
        pytest.importorskip("executorch")
        from instaflow_edge.convert import ConvertConfig, export

        m = export(ConvertConfig.of("executorch", model=str(tiny_dir), output=str(out), quantize=record.name))
        return m, out / "unet" / "model.pte", _executorch_signature(m)
    if record.backend == "qnn":
        pytest.importorskip("onnxruntime_qnn")
        from instaflow_edge.convert import ConvertConfig, export

        m = export(ConvertConfig.of("qnn", model=str(tiny_dir), output=str(out), quantize=record.name, no_compile=True))
        return m, out / "unet" / "model.onnx", _onnx_signature
    if record.backend == "onnx":
        from instaflow_edge.quantize.onnx_folder import QuantizeConfig, quantize

        quantize(QuantizeConfig(source=str(onnx_fp32), output=str(out), scheme=record.name))
        return json.loads((out / "manifest.json").read_text()), out / "unet" / "model.onnx", _onnx_signature
    pytest.importorskip("nncf")
    from instaflow_edge.convert import ConvertConfig, export

    export(ConvertConfig.of("openvino", model=str(tiny_dir), output=str(out), precision="f32", quantize=record.name))
    return json.loads((out / "manifest.json").read_text()), out / "unet" / "model.xml", _openvino_signature


@pytest.mark.parametrize("record", _records())
def test_scheme_marks_its_components_and_meets_its_gate(record, tiny_dir, onnx_fp32, tmp_path):
    m, graph, signature = _apply(record, tiny_dir, onnx_fp32, tmp_path / "q")
    assert m["quantize"]["scheme"] == record.name
    present = set(json.loads((tmp_path / "q" / "manifest.json").read_text())["sizes"])
    assert set(m["quantize"]["components"]) == set(record.default_components) & present
    sig = signature(graph)
    assert set(record.marks) <= sig, f"{record.name}: {sorted(set(record.marks) - sig)} missing from the graph"
    for row in m["parity"]:
        gate = m["gates"][row["component"]]
        if row["component"] in m["quantize"]["components"]:
            assert gate <= record.gate_db, (row["component"], gate)  # the scheme's gate (or a tighter precision's)
        assert row["psnr"] is None or row["psnr"] >= gate, row
    assert m["quantize"]["calibration_prompts"] > 0 if record.calibrated else m["quantize"]["calibration_prompts"] == 0


def test_a_scheme_parameter_is_one_record_field(tiny_dir, tmp_path):
    """int4-weights takes its group size as a parameter: checked when the config is made, recorded in
    the manifest, and a scheme without parameters refuses one."""
    from instaflow_edge.convert import ConvertConfig
    from instaflow_edge.errors import InputError
    from instaflow_edge.quantize.schemes import get_scheme

    rec = get_scheme("openvino", "int4-weights")
    assert rec.make_params({"group_size": "32"}).group_size == 32
    with pytest.raises(InputError, match="group_size=7"):
        ConvertConfig.of("openvino", model="m", output="o", quantize="int4-weights", quantize_params={"group_size": "7"})
    with pytest.raises(InputError, match="no parameter 'bits'"):
        rec.make_params({"bits": "3"})
    with pytest.raises(InputError, match="takes no parameters"):
        ConvertConfig.of("onnx", model="m", output="o", quantize="int8-static", quantize_params={"group_size": "32"})
