"""Distillation distances: pseudo-Huber by hand, LPIPS loading (the lpips package's names) and its properties."""

import math

import pytest
import torch
from instaflow_edge.train.losses import LPIPS, make_distance, pseudo_huber
from safetensors.torch import save_file

from instaflow_edge.errors import InputError


def test_pseudo_huber_by_hand():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 0]])
    c = 0.00054 * math.sqrt(4)
    expect = ((math.sqrt(25 + c * c) - c) + 0.0) / 2
    assert pseudo_huber(b, a).item() == pytest.approx(expect, rel=1e-6)


def _lpips_package_state_dict(seed=0):
    """A state dict with exactly the keys lpips.LPIPS(net='vgg') saves (random values)."""
    torch.manual_seed(seed)
    ours = LPIPS().state_dict()
    sd = {"scaling_layer.shift": ours["shift"], "scaling_layer.scale": ours["scale"]}
    for k, v in ours.items():
        if k.startswith("slices."):
            i, rest = k[len("slices."):].split(".", 1)
            sd[f"net.slice{int(i) + 1}.{rest}"] = torch.randn_like(v) * 0.05
        elif k.startswith("lins."):
            sd[f"lin{k[5]}.model.1.weight"] = torch.rand_like(v)
    return sd


def test_lpips_loads_package_names_and_behaves(tmp_path):
    f = tmp_path / "lpips_vgg.safetensors"
    save_file(_lpips_package_state_dict(), f)
    m = LPIPS.from_file(f)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = x + 0.3 * torch.randn_like(x)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, m(y, x), atol=1e-5)


def test_lpips_errors(tmp_path, tiny_pipe):
    with pytest.raises(InputError, match="--lpips-weights"):
        make_distance("lpips", tiny_pipe, None)
    with pytest.raises(InputError, match="not found"):
        make_distance("lpips", tiny_pipe, str(tmp_path / "nope.safetensors"))
    sd = _lpips_package_state_dict()
    del sd["lin4.model.1.weight"]
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(InputError, match="lack 1 tensors"):
        LPIPS.from_file(tmp_path / "partial.safetensors")
    with pytest.raises(InputError, match="unknown --loss"):
        make_distance("l1")


def test_decoded_lpips_gradient_reaches_latents(tmp_path, tiny_pipe):
    f = tmp_path / "w.safetensors"
    save_file(_lpips_package_state_dict(), f)
    dist = make_distance("lpips", tiny_pipe, str(f))
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = dist(pred, torch.randn(2, 4, 8, 8))
    loss.backward()
    assert loss.item() > 0 and pred.grad.abs().sum() > 0
