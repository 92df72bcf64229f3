"""Component specs drive modules whose outputs have the declared shapes; the parity figures."""

import math

import numpy as np
import pytest
import torch

from instaflow_edge.components import COMPONENTS, Sizes
from instaflow_edge.parity import Parity, PsnrError, ShapeError, check, compare, psnr


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
