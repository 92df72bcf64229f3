"""Component specs drive modules whose outputs have the declared shapes; the parity figures."""

import math

import numpy as np
import pytest
import torch

from instaflow_edge.components import COMPONENTS, Sizes
from instaflow_edge.parity import (
    Parity,
    PsnrError,
    ShapeError,
    check,
    check_all,
    compare,
    format_table,
    psnr,
)


@pytest.mark.parametrize("name", list(COMPONENTS))
@torch.no_grad()
def test_component_outputs_match_declared_shapes(tiny_pipe, name):
    spec = COMPONENTS[name]
    sizes = Sizes.of(tiny_pipe, batch=2)
    inputs = spec.example_inputs(tiny_pipe, sizes)
    for t, s in zip(inputs, spec.inputs):
        assert tuple(t.shape) == sizes.shape(s) and str(t.dtype).endswith(s.dtype), s.name
    out = spec.module(tiny_pipe)(*inputs)
    assert tuple(out.shape) == sizes.shape(spec.outputs[0])


@torch.no_grad()
def test_components_compose_to_the_generator(tiny_pipe):
    sizes = Sizes.of(tiny_pipe, batch=2)
    ids, noise = COMPONENTS["generator"].example_inputs(tiny_pipe, sizes)
    hidden = COMPONENTS["text_encoder"].module(tiny_pipe)(ids)
    lat = COMPONENTS["unet"].module(tiny_pipe)(noise, hidden)
    img = COMPONENTS["vae_decoder"].module(tiny_pipe)(lat / tiny_pipe.scaling_factor)
    full = COMPONENTS["generator"].module(tiny_pipe)(ids, noise)
    assert torch.allclose((img / 2 + 0.5).clamp(0, 1), full, atol=1e-6)


def test_psnr_is_apples_formula():
    ref = np.array([1.0, -2.0, 0.5, 0.0])
    out = ref + np.array([0.1, -0.1, 0.1, -0.1])
    assert psnr(ref, out) == pytest.approx(20 * math.log10((2.0 + 1e-5) / (0.1 + 1e-10)))
    assert psnr(ref, ref) == math.inf


def test_compare_and_gates():
    ref = torch.randn(2, 3, 8, 8)
    p = compare("unet", ref, ref + 1e-4 * torch.randn_like(ref))
    assert isinstance(p, Parity) and p.psnr > 60 and p.cosine > 0.9999
    assert check(p, 35.0) is p
    with pytest.raises(PsnrError, match="unet: PSNR"):
        check(compare("unet", ref, ref + 0.5 * torch.randn_like(ref)), 35.0)
    with pytest.raises(ShapeError, match="shape"):
        compare("vae_decoder", ref, ref[:1])
    assert compare("x", ref, ref).as_dict()["psnr"] is None


def test_check_all_lists_every_miss_in_one_line():
    ref = torch.randn(2, 3, 8, 8)
    good = compare("text_encoder", ref, ref + 1e-4 * torch.randn_like(ref))
    bad_unet = compare("unet", ref, ref + 0.5 * torch.randn_like(ref))
    bad_e2e = compare("end_to_end", ref, ref + 0.3 * torch.randn_like(ref))
    rows = [good, bad_unet, bad_e2e]
    gates = {"text_encoder": 35.0, "unet": 35.0, "end_to_end": 30.0}
    assert check_all([good], gates) == [good]
    with pytest.raises(PsnrError) as e:
        check_all(rows, gates)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 of 3 outputs miss their gate: ")
    assert f"unet: PSNR {bad_unet.psnr:.1f} dB is below the 35.0 dB gate" in msg
    assert f"end_to_end: PSNR {bad_e2e.psnr:.1f} dB is below the 30.0 dB gate" in msg
    assert "text_encoder" not in msg and "--min-psnr" in msg  # the fix
    assert e.value.rows == rows and e.value.gates == gates  # the whole table, for a caller that shows it
    # one gate for all, with the reference and the gate's source named
    with pytest.raises(PsnrError, match=r"^unet: PSNR [\d.]+ dB vs fp32 is below the 35.0 dB gate \(scheme int8; max abs"):
        check_all([good, bad_unet], 35.0, against="fp32", source="scheme int8")
    # a single miss reads as it always did
    with pytest.raises(PsnrError, match=r"^unet: PSNR [\d.]+ dB is below the 35.0 dB gate \(max abs error"):
        check(bad_unet, 35.0)


def test_format_table_from_measured_or_manifest_rows():
    ref = torch.randn(2, 3, 8, 8)
    rows = [compare("unet", ref, ref + 1e-3 * torch.randn_like(ref)), compare("end_to_end", ref, ref)]
    gates = {"unet": 35.0, "end_to_end": 35.0}
    table = format_table(rows, gates)
    assert table.splitlines()[0].split() == ["component", "PSNR", "dB", "max", "abs", "cosine", "gate"]
    assert "inf" in table.splitlines()[-1] and "≥35" in table
    # the CLI prints the table from the manifest's rows: the same text
    assert format_table([p.as_dict() for p in rows], gates) == format_table(
        [Parity.from_dict(p.as_dict()) for p in rows], gates)
    assert Parity.from_dict(rows[1].as_dict()) == rows[1]
