"""Core ML compression: every scheme through the real converter (on the tiny text encoder, which converts
in about a second), the package-vs-PyTorch weight check, mixed-bit selection, split-einsum attention."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("coremltools")

from instaflow_edge.convert import coreml as cm  # noqa: E402
from instaflow_edge.convert import coreml_check as cc  # noqa: E402
from instaflow_edge.convert.config import ConvertConfig  # noqa: E402
from instaflow_edge.quantize import coreml as cq  # noqa: E402
from instaflow_edge.quantize.schemes import CoreMLCompression  # noqa: E402

from instaflow_edge.components import COMPONENTS, Sizes  # noqa: E402
from instaflow_edge.errors import InputError, ModelError, ParityError  # noqa: E402
from instaflow_edge.parity import psnr  # noqa: E402

# every Core ML compression and the ops its package must hold: the tests below run each one

EXPECTED_OPS = {
    "palettize-4": {"constexpr_lut_to_dense"}, "palettize-6": {"constexpr_lut_to_dense"},
    "palettize-8": {"constexpr_lut_to_dense"}, "mixed-bit": {"constexpr_lut_to_dense"},
    "int8": {"constexpr_affine_dequantize"},
    "prune-50": {"constexpr_sparse_to_dense"}, "prune-2:4": {"constexpr_sparse_to_dense"},
    "prune-50+palettize-4": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
}


def _family(name: str) -> str:
    if "+" in name:
        return "joint"
    return {"int8": "quantization", "prune-50": "pruning", "prune-2:4": "pruning"}.get(name, "palettization")


def test_every_registered_scheme_is_covered():
    """Adding a compression to the registry (or its enum) without adding it to EXPECTED_OPS fails here."""
    assert {s.value for s in cq.SCHEMES} == set(EXPECTED_OPS)
    assert set(cq.SCHEMES) == set(CoreMLCompression) and all(s.name is k for k, s in cq.SCHEMES.items())


@pytest.mark.parametrize("name", list(cq.SCHEMES))
def test_scheme_in_pytorch_and_in_the_package(tiny_pipe, tmp_path, name, uncompressed_bits):
    spec = COMPONENTS["text_encoder"]
    sizes = Sizes.of(tiny_pipe, batch=1)
    module = spec.module(tiny_pipe)
    inputs = spec.example_inputs(tiny_pipe, sizes)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    target_bits = 4.0 if name == "mixed-bit" else None
    compressed, report = cq.compress(module, name, inputs, target_bits)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the input is untouched
    layers = cq.compressed_layers(compressed)
    assert report["layers"] == len(layers) > 0
    assert "text_encoder.embeddings.position_embedding" not in layers  # folded by the converter: skipped
    kinds = {k for v in layers.values() for k in v.split("+")}
    assert kinds == {"palettization": {"palettization"}, "quantization": {"quantization"}, "pruning": {"pruning"},
                     "joint": {"pruning", "palettization"}}[_family(name)] | ({"palettization"} if "+" in name else set())

    mods = dict(compressed.named_modules())
    for layer in layers:
        w = mods[layer].weight
        if "palettization" in layers[layer]:
            assert torch.unique(w).numel() <= 2 ** int(report.get("n_bits", 8))
        if "pruning" in layers[layer]:
            assert (w == 0).float().mean() >= 0.45  # 2:4 over 37 inputs (the tiny MLP) leaves a ragged tail
    with torch.no_grad():
        q = psnr(module(*inputs), compressed(*inputs))
    assert 0 < q < 200  # compression changes the output, measurably and finitely

    min_target = "iOS18" if cq.SCHEMES[name].min_ios == 18 else "iOS17"
    cfg = ConvertConfig.of("coreml", model="m", output="o", compress=name, target_bits=target_bits, min_target=min_target)
    ml = cm._to_coreml(cfg, spec, compressed, [sizes])
    path = tmp_path / "TextEncoder.mlpackage"
    ml.save(str(path))
    pkg = cc.load(path)
    ops = cc.op_census(pkg)
    assert EXPECTED_OPS[name] <= set(ops), ops
    match = cc.check_weights("text_encoder", pkg, compressed, sorted(layers))
    assert match["compressed_layers"] == len(layers) and match["max_rel_error"] < 2e-3
    bits = cc.sizes(path, cm.used_parameters(compressed, inputs))["bits_per_weight"]
    assert bits < uncompressed_bits, (bits, uncompressed_bits)


@pytest.fixture(scope="module")
def uncompressed_bits(tiny_pipe, tmp_path_factory):
    spec = COMPONENTS["text_encoder"]
    sizes = Sizes.of(tiny_pipe, batch=1)
    module = spec.module(tiny_pipe)
    cfg = ConvertConfig.of("coreml", model="m", output="o")
    path = tmp_path_factory.mktemp("fp16") / "TextEncoder.mlpackage"
    cm._to_coreml(cfg, spec, module, [sizes]).save(str(path))
    return cc.sizes(path, cm.used_parameters(module, spec.example_inputs(tiny_pipe, sizes)))["bits_per_weight"]


def test_weight_check_catches_a_package_that_differs(tiny_pipe, tmp_path):
    spec = COMPONENTS["text_encoder"]
    sizes = Sizes.of(tiny_pipe, batch=1)
    inputs = spec.example_inputs(tiny_pipe, sizes)
    compressed, _ = cq.compress(spec.module(tiny_pipe), "palettize-4", inputs)
    cfg = ConvertConfig.of("coreml", model="m", output="o", compress="palettize-4")
    cm._to_coreml(cfg, spec, compressed, [sizes]).save(str(tmp_path / "t.mlpackage"))
    other = copy.deepcopy(compressed)
    with torch.no_grad():
        next(m for n, m in other.named_modules() if n.endswith("fc1")).weight.mul_(1.1)
    with pytest.raises(ParityError, match="differs from the PyTorch weight"):
        cc.check_weights("text_encoder", cc.load(tmp_path / "t.mlpackage"), other, sorted(cq.compressed_layers(other)))


def test_pick_bits_meets_the_target_and_spends_bits_on_sensitive_layers():
    sens = {  # PSNR when only this layer is palettized at b bits
        "tough": {2: 10.0, 4: 20.0, 6: 40.0, 8: 60.0},
        "easy": {2: 45.0, 4: 60.0, 6: 70.0, 8: 80.0},
        "mid": {2: 25.0, 4: 42.0, 6: 55.0, 8: 70.0},
    }
    sizes = {"tough": 100, "easy": 100, "mid": 100}
    for target in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        bits, t = cq.pick_bits(sens, sizes, target)
        avg = sum(bits[n] * sizes[n] for n in bits) / 300
        assert avg <= target + 1e-9
        assert bits["tough"] >= bits["mid"] >= bits["easy"]
    bits, _ = cq.pick_bits(sens, sizes, 4.0)
    assert bits == {"tough": 6, "mid": 4, "easy": 2}


def test_attention_split_einsum_equals_original_and_is_restored(tiny_pipe):
    from instaflow_edge.convert.coreml_attention import (
        SplitEinsumAttnProcessor,
        attention_implementation,
    )

    spec = COMPONENTS["unet"]
    inputs = spec.example_inputs(tiny_pipe, Sizes.of(tiny_pipe, batch=2))
    module = spec.module(tiny_pipe)
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    with torch.no_grad():
        ref = module(*inputs)
        with attention_implementation(tiny_pipe.unet, "split-einsum"):
            assert all(isinstance(p, SplitEinsumAttnProcessor) for p in tiny_pipe.unet.attn_processors.values())
            out = module(*inputs)
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-5), (ref - out).abs().max()


def test_split_einsum_on_a_unet_without_attention_processors_is_an_error():
    """No silent fallback to the original attention: a model that cannot take split-einsum says so."""
    from instaflow_edge.convert.coreml_attention import attention_implementation

    with pytest.raises(ModelError, match="split-einsum needs a diffusers UNet.*Linear — use --attention original"):
        with attention_implementation(torch.nn.Linear(2, 2), "split-einsum"):
            pass
    plain = torch.nn.Linear(2, 2)
    with attention_implementation(plain, "original") as m:
        assert m is plain


def test_split_einsum_math_against_softmax_attention():
    from instaflow_edge.convert.coreml_attention import split_einsum_attention

    g = torch.Generator().manual_seed(0)
    b, c, heads, sq, sk = 2, 16, 4, 7, 5
    q, k, v = (torch.randn(b, c, 1, s, generator=g, dtype=torch.float64) for s in (sq, sk, sk))
    d = c // heads
    qh = q.squeeze(2).view(b, heads, d, sq).transpose(2, 3)  # (B, H, Sq, d)
    kh = k.squeeze(2).view(b, heads, d, sk).transpose(2, 3)
    vh = v.squeeze(2).view(b, heads, d, sk).transpose(2, 3)
    ref = torch.softmax(qh @ kh.transpose(2, 3) / d ** 0.5, dim=-1) @ vh  # (B, H, Sq, d)
    ref = ref.transpose(2, 3).reshape(b, c, 1, sq)
    assert torch.allclose(split_einsum_attention(q, k, v, heads, d ** -0.5), ref, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# the whole CLI per scheme (each is a full three-package conversion: ~1 min on 2 cores)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cq.SCHEMES))
def test_cli_convert_every_scheme(tiny_dir, tmp_path, name):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    args = ["convert", str(tiny_dir), "--target", "coreml", "-o", str(tmp_path / "o"), "--compress", name.value]
    if cq.SCHEMES[name].min_ios == 18:
        args += ["--min-target", "iOS18"]
    if name == "mixed-bit":
        args += ["--target-bits", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["gate"]["min_psnr"] == cq.SCHEMES[name].min_psnr
    for comp in ("text_encoder", "unet", "vae_decoder"):
        c = m["components"][comp]
        assert c["compression"]["scheme"] == name and EXPECTED_OPS[name] <= set(c["ops"])
    # the text encoder's token embedding is not prunable (Linear/Conv only): judge sizes on the Unet
    assert m["components"]["unet"]["bits_per_weight"] < 16
    assert m["end_to_end"]["psnr"] >= cq.SCHEMES[name].min_psnr


def test_fp32_precision_keeps_fp32_weights(tiny_pipe, tmp_path):
    spec = COMPONENTS["text_encoder"]
    sizes = Sizes.of(tiny_pipe, batch=1)
    module = spec.module(tiny_pipe)
    cfg = ConvertConfig.of("coreml", model="m", output="o", precision="fp32")
    assert cfg.options.precision is cm.Precision.fp32  # normalized when made
    path = tmp_path / "t.mlpackage"
    cm._to_coreml(cfg, spec, module, [sizes]).save(str(path))
    pkg = cc.load(path)
    assert cc.sizes(path, cm.used_parameters(module, spec.example_inputs(tiny_pipe, sizes)))["bits_per_weight"] > 30
    assert cc.check_weights("text_encoder", pkg, module, [])["max_rel_error"] == 0.0


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_lean_lut_indices_decode_like_coremltools(bits):
    """Our O(weights) palette-index search decodes to exactly what coremltools' dense search does."""
    import numpy as np
    from coremltools.optimize import _utils as ou

    rng = np.random.default_rng(bits)
    lut = rng.normal(size=2 ** bits).astype(np.float16).reshape(1, 1, 2 ** bits, 1)
    data = (lut.reshape(-1)[rng.integers(0, 2 ** bits, size=(37, 11))] + rng.normal(scale=1e-3, size=(37, 11))).astype(np.float32)
    ref = ou.find_indices_for_lut(data, lut)
    with cm._lean_lut_indices():
        got = ou.find_indices_for_lut(data, lut)
    assert ou.find_indices_for_lut is not None and got.dtype == ref.dtype and got.shape == ref.shape
    table = lut.reshape(-1)
    assert np.array_equal(table[got], table[ref])  # equal up to duplicate LUT entries (same value)


def test_compressed_pipeline_compresses_every_component_and_leaves_the_source(tiny_pipe):
    """What ``eval --coreml-compress`` scores: the one-step components as the converter compresses them."""
    import logging

    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    level = logging.getLogger("coremltools").level
    pipe, reports = cq.compressed_pipeline(tiny_pipe, "palettize-4")
    assert logging.getLogger("coremltools").level == level  # k-means chatter silenced only while compressing
    assert set(reports) == {"text_encoder", "unet", "vae_decoder"} and all(r["layers"] > 0 for r in reports.values())
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    assert pipe.tokenizer is tiny_pipe.tokenizer and pipe.unet is not tiny_pipe.unet
    layers = cq.compressed_layers(pipe.unet)
    assert layers and set(layers.values()) == {"palettization"}
    modules = dict(pipe.unet.named_modules())
    for name in list(layers)[:5]:
        assert modules[name].weight.unique().numel() <= 16, name  # 4 bits: a 16-entry palette
    with pytest.raises(InputError, match="unknown --compress 'palettize-3'"):
        cq.compressed_pipeline(tiny_pipe, "palettize-3")
