"""Distillation distances between the student's one-step latents ``z + v(z)`` and the teacher's ``x1``.

* ``l2`` — mean squared error in latent space (InstaFlow's first distillation stage);
* ``pseudo-huber`` — ``sqrt(‖d‖² + c²) − c`` per sample, ``c = 0.00054·sqrt(dim)`` (the consistency-model
  choice: L2 near zero, L1 for outliers);
* ``lpips`` — LPIPS (Zhang et al. 2018, VGG16 variant) between the VAE-decoded images, InstaFlow's second
  stage. Its weights (the VGG16 backbone and the linear heads) cannot be downloaded here: the user passes
  a file holding ``lpips.LPIPS(net="vgg").state_dict()`` (safetensors, or a pickle with
  ``allow_pickle``), e.g. made with
  ``python -c "import lpips, torch; from safetensors.torch import save_file;
  save_file(lpips.LPIPS(net='vgg').state_dict(), 'lpips_vgg.safetensors')"``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..pipeline import check_plain_tensors, check_safetensors
from ..validators import choice
from .config import DistillLoss

DISTANCES = tuple(m.value for m in DistillLoss)  # the registry of distances: one enum, one test each

# VGG16 "features" up to relu5_3, as torchvision numbers them; LPIPS cuts it after relu1_2, 2_2, 3_3, 4_3, 5_3
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_CUTS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = (pred.float() - target.float()).flatten(1)
    c = 0.00054 * math.sqrt(d.shape[1])
    return (torch.sqrt(d.pow(2).sum(1) + c * c) - c).mean()


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG with the ``lpips`` package's parameter names, so its state dict loads as is."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        feats = _vgg16_features()
        self.slices = nn.ModuleList()
        start = 0
        for end in _CUTS:
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), feats[i])
            self.slices.append(s)
            start = end
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)

    @classmethod
    def from_file(cls, path: str | Path, allow_pickle: bool = False) -> "LPIPS":
        """Load ``lpips.LPIPS(net="vgg").state_dict()`` from a file; a one-line error names what is missing."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"LPIPS weights {path} not found",
                             "pass --lpips-weights FILE holding lpips.LPIPS(net='vgg').state_dict() (see --help)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            check_safetensors(path)
            sd = load_file(path)
        elif allow_pickle:
            check_plain_tensors(path)  # torch's safe loader, with a one-line error for anything else
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"LPIPS weights {path} are not safetensors", "convert them, or pass --allow-pickle")
        if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
            raise InputError(f"LPIPS weights {path} are not a state dict (names → tensors)",
                             "save lpips.LPIPS(net='vgg').state_dict()")
        model = cls()
        mapped = {}
        for k, v in sd.items():  # the lpips package's names → ours
            if k.startswith("scaling_layer."):
                mapped[k.split(".", 1)[1]] = v
            elif k.startswith("net.slice"):
                n, rest = k[len("net.slice"):].split(".", 1)
                mapped[f"slices.{int(n) - 1}.{rest}"] = v
            elif k.startswith("lin") and ".model.1." in k:
                mapped[f"lins.{int(k[3])}.{k.split('.model.1.', 1)[1]}"] = v
        missing = sorted(set(model.state_dict()) - set(mapped))
        if missing:
            raise InputError(f"LPIPS weights {path} lack {len(missing)} tensors (e.g. {missing[0]})",
                             "save lpips.LPIPS(net='vgg').state_dict(), which holds the VGG backbone and the heads")
        model.load_state_dict(mapped, strict=True)
        return model.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS of images in [-1, 1]: shape (B,)."""
        xa, xb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = 0
        for s, lin in zip(self.slices, self.lins):
            xa, xb = s(xa), s(xb)
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(2, 3))
        return total.flatten()


class DecodedLPIPS(nn.Module):
    """LPIPS between VAE-decoded latents: the decoder is frozen but gradients flow through it."""

    def __init__(self, vae: nn.Module, scaling_factor: float, lpips: LPIPS, min_size: int = 64):
        super().__init__()
        self.vae, self.lpips, self.scaling_factor, self.min_size = vae, lpips, float(scaling_factor), min_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(pred / self.scaling_factor, return_dict=False)[0]
        with torch.no_grad():
            ref = self.vae.decode(target / self.scaling_factor, return_dict=False)[0]
        if img.shape[-1] < self.min_size:  # VGG's five stages need room: upsample small images (digits: 32 px)
            img = F.interpolate(img, size=self.min_size, mode="bilinear", align_corners=False)
            ref = F.interpolate(ref, size=self.min_size, mode="bilinear", align_corners=False)
        return self.lpips(img.float(), ref.float()).mean()


def make_distance(name: str | DistillLoss, pipe=None, lpips_weights: str | None = None, allow_pickle: bool = False):
    """The distance ``fn(pred_latents, target_latents) -> scalar`` called ``name``."""
    loss = choice("loss", name, DistillLoss)
    if loss is DistillLoss.l2:
        return l2
    if loss is DistillLoss.pseudo_huber:
        return pseudo_huber
    if not lpips_weights:
        raise InputError("--loss lpips needs LPIPS weights, which cannot be downloaded here",
                         "pass --lpips-weights FILE (lpips.LPIPS(net='vgg').state_dict()), or use --loss l2")
    model = LPIPS.from_file(lpips_weights, allow_pickle).to(pipe.device)
    pipe.vae.requires_grad_(False)
    return DecodedLPIPS(pipe.vae, pipe.scaling_factor, model)
