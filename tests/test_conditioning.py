"""The conditioning check: every export's UNet must answer the text about as strongly as PyTorch's
(std of u(x, prompt) − u(x, "") ≥ 0.9 × PyTorch's). A quantized UNet that ignores its prompt can keep
its PSNR; here one is planted (the text embedding quantized with a step so coarse that every value
rounds to zero) and fails the check in each path that quantizes an ONNX graph, with every PSNR gate
off. The figure itself is in every target's manifest (tests/contracts/test_format.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instaflow_edge.parity import CONDITIONING_GATE, ConditioningError, check_conditioning, conditioning


def test_the_ratio_is_the_text_response_of_the_export_over_pytorchs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 8, 8))
    d = rng.normal(size=x.shape) * 0.1
    same = conditioning(x + d, x, x + d, x)
    assert same.ratio == pytest.approx(1.0) and same.cosine == pytest.approx(1.0)
    half = conditioning(x + d, x, x + 0.5 * d, x)
    assert half.ratio == pytest.approx(0.5) and half.cosine == pytest.approx(1.0)
    with pytest.raises(ConditioningError, match=r"answers the text 0\.50x as strongly.*below the 0\.9 gate"):
        check_conditioning(half)
    assert check_conditioning(conditioning(x + d, x, x + 0.95 * d, x)).ratio >= CONDITIONING_GATE
    deaf = conditioning(x + d, x, x, x)
    assert deaf.ratio == 0.0


def _ignore_text(path) -> None:
    """Quantize the UNet graph's text input with scale 1000: every embedding value rounds to 0."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    name = "encoder_hidden_states"
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == name:
                n.input[i] = f"{name}/deaf"
    g.initializer.extend([numpy_helper.from_array(np.array(1000.0, np.float32), "deaf_scale"),
                          numpy_helper.from_array(np.array(0, np.int8), "deaf_zero")])
    g.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}/q", "deaf_scale", "deaf_zero"], [f"{name}/deaf"]))
    g.node.insert(0, helper.make_node("QuantizeLinear", [name, "deaf_scale", "deaf_zero"], [f"{name}/q"]))
    onnx.save(model, str(path))


def _deaf(monkeypatch, backend: str, name: str) -> None:
    """Make scheme ``name`` of ``backend`` plant a text-deaf UNet after quantizing."""
    from instaflow_edge.quantize import schemes

    record = schemes.get_scheme(backend, name)

    def apply(src, dst, component, calibration, params):
        record.apply(src, dst, component, calibration, params)
        if component == "unet":
            _ignore_text(dst)

    monkeypatch.setitem(schemes.SCHEMES, (backend, record.name), dataclasses.replace(record, apply=apply))


@pytest.mark.parametrize("path", ["quantize", "convert onnx", "convert qnn"])
def test_a_unet_quantized_to_ignore_the_text_fails(path, monkeypatch, tiny_dir, tiny_onnx_fp32, tmp_path):
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.quantize.onnx_folder import QuantizeConfig, quantize

    out = tmp_path / "deaf"
    if path == "quantize":
        _deaf(monkeypatch, "onnx", "int8-dynamic")
        run = lambda: quantize(QuantizeConfig(source=str(tiny_onnx_fp32), output=str(out), scheme="int8-dynamic", min_psnr=0))
    elif path == "convert onnx":
        _deaf(monkeypatch, "onnx", "int8-dynamic")
        run = lambda: export(ConvertConfig.of("onnx", model=str(tiny_dir), output=str(out), quantize="int8-dynamic",
                                              optimize="none", min_psnr=0))
    else:
        pytest.importorskip("onnxruntime_qnn")
        _deaf(monkeypatch, "qnn", "w8a16")
        run = lambda: export(ConvertConfig.of("qnn", model=str(tiny_dir), output=str(out), no_compile=True, min_psnr=0))
    with pytest.raises(ConditioningError, match=r"unet: the export answers the text 0\.00x as strongly"):
        run()
    assert not out.exists()  # nothing half-written
