"""Core ML quality in PyTorch: the fp32 reference chain and the shipped chain, one component at a time.

Core ML cannot predict on Linux, so ``convert --target coreml`` measures each package's quality on the
PyTorch module exactly as it ships (compressed as the converter compresses it, run in float16 for
``--precision fp16``): per component on the reference's own inputs, and end to end by chaining the shipped
outputs (text → latent → image) against the fp32 chain. :class:`QualityChain` holds both chains' states
and every figure measured, so the converter hands one object from component to component.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

from ..validators import image_size
from . import coreml_apple as apple
from .config import ConvertConfig, CoreMLLayout, Precision

log = logging.getLogger(__name__)

BIG_UNET = 100_000_000  # parameters: a full-size UNet (SD1.5: 860 M), where each CPU pass costs seconds to minutes
FP16_QUALITY_SIDE = 128
_STATE_KEY = {"text_encoder": "hidden", "unet": "latents", "vae_decoder": "image", "vae_encoder": "image_latent",
              "generator": "fused_image"}


def quality_size(config: ConvertConfig, pipe, full):
    """The sizes the PyTorch quality chain runs at: ``--parity-size``; else the (first) conversion size,
    except for ``--precision fp16`` packages of a full-size UNet: PyTorch's float16 kernels on a CPU are
    two orders of magnitude slower than its float32 ones (an SD1.5 chain at 512² takes hours), so there
    the chain runs at 128² (the modules are convolutional: the packages still take the conversion size).
    The manifest records the size as ``quality_image_size``."""
    from ..components import Sizes

    side = config.options.parity_size
    if side is None:
        big = sum(p.numel() for p in pipe.unet.parameters()) > BIG_UNET
        if not (big and config.options.precision is Precision.fp16 and min(full.height, full.width) > FP16_QUALITY_SIDE):
            return full
        side = FP16_QUALITY_SIDE
        log.info(f"fp16 quality chain at {side}×{side} (PyTorch's CPU float16 kernels are slow); --parity-size N changes it")
    side = image_size("parity_size", side, pipe.size_multiple)
    return Sizes.of(pipe, batch=1, height=side, width=side)


@dataclasses.dataclass
class QualityChain:
    """The two chains (``ref``: fp32 PyTorch; ``ship``: the modules as shipped), each a dict of the
    quantities handed on (``input_ids``, ``noise``, ``hidden``, ``latents``, ``image``), the layout they
    are measured in, every figure measured so far (``measured``: Parity rows, the end-to-end image last)
    and the end-to-end image's figures (``parity``)."""

    ref: dict
    ship: dict
    scaling_factor: float
    layout: CoreMLLayout
    parity: dict | None = None
    measured: list = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, pipe, sizes, layout: CoreMLLayout) -> "QualityChain":
        """Inputs of the chain: real prompts' token ids and seeded noise; two prompts, or one for a
        full-size UNet (> 100 M parameters), where every forward pass costs seconds to minutes on a CPU."""
        from ..components import EXAMPLE_PROMPTS
        from ..generator import make_noise

        n = 1 if sum(p.numel() for p in pipe.unet.parameters()) > BIG_UNET else 2
        ids = pipe.tokenize(EXAMPLE_PROMPTS[:n])
        noise = make_noise(list(range(n)), (sizes.latent_channels, sizes.latent_height, sizes.latent_width))
        return cls({"input_ids": ids, "noise": noise}, {"input_ids": ids, "noise": noise}, pipe.scaling_factor,
                   CoreMLLayout(layout))

    @property
    def batch(self) -> int:
        return int(self.ref["input_ids"].shape[0])

    def inputs(self, name: str, which: str | dict) -> tuple:
        """Component ``name``'s inputs from chain ``which`` (``"ref"`` or ``"ship"``, or a state dict of
        its own), in the layout's form."""
        state = getattr(self, which) if isinstance(which, str) else which
        if self.layout is CoreMLLayout.apple:
            return apple.inputs(name, state)
        if name == "text_encoder":
            return (state["input_ids"],)
        if name == "unet":
            return (state["noise"], state["hidden"])
        if name == "vae_decoder":
            return (state["latents"] / self.scaling_factor,)
        return (state["input_ids"], state["noise"])

    def observed(self, name: str, out, ins: tuple):
        """The quantity measured and handed on: the output itself, or (Apple layout) what the Swift pipeline
        makes of it (the hidden states, the scheduler's x0, the image)."""
        return apple.observed(name, out, ins) if self.layout is CoreMLLayout.apple else out

    def empty_prompt_state(self, pipe, text_encoder) -> dict:
        """The reference chain's state with the empty prompt's hidden states (same noise): the UNet's input
        for the conditioning check. ``text_encoder``: the fp32 module of the layout's text encoder."""
        import torch

        state = {"input_ids": pipe.tokenize([""] * self.batch), "noise": self.ref["noise"]}
        ins = self.inputs("text_encoder", state)
        with torch.no_grad():
            state["hidden"] = self.observed("text_encoder", text_encoder(*ins), ins).float()
        return state

    def store(self, name: str, which: str, out) -> None:
        getattr(self, which)[_STATE_KEY[name]] = out.float()

    def close(self) -> None:
        """The end-to-end image of both chains, compared (once the decoder has run on both)."""
        from ..generator import to_unit_range
        from ..parity import compare

        image = compare("image", to_unit_range(self.ref["image"]), to_unit_range(self.ship["image"]))
        self.parity = image.as_dict()
        self.measured.append(dataclasses.replace(image, component="image (end to end)"))

    def misses(self, gate: float) -> bool:
        return any(m.psnr < gate for m in self.measured)


def as_shipped(module, precision: Precision):
    """``(module, cast)`` as the package computes: a float16 copy for ``--precision fp16``, whose float
    inputs are cast to float16 unless the module casts them itself (``keeps_input_dtype``: the Apple Unet's
    ε̂ tail reads the float32 sample, as the package's fp32 ops do; float token ids stay exact)."""
    if precision is Precision.fp32:
        return module, lambda xs: xs
    half = copy.deepcopy(module).half()
    if getattr(module, "keeps_input_dtype", False):
        return half, lambda xs: xs
    return half, lambda xs: tuple(x.half() if x.is_floating_point() else x for x in xs)


@contextlib.contextmanager
def fp16_tail_figure(shipped, ins: tuple, ref_x0, into: dict):
    """Within the block (where the fp16 Apple Unet runs once on ``ins``), hook the UNet's v; after it,
    ``into["x0_psnr_tail_fp16"]``: x0's PSNR (vs fp32) had the ε̂ tail been computed in fp16 like the
    rest, the figure that keeping those ops fp32 avoids. No extra UNet pass."""
    from ..parity import psnr

    got: list = []
    h = shipped.unet.register_forward_hook(lambda m, i, o: got.append(o[0]))
    try:
        yield
    finally:
        h.remove()
    eps16 = apple.eps_hat(ins[0].half(), got[0].half(), shipped.alpha, shipped.sigma)
    into["x0_psnr_tail_fp16"] = psnr(ref_x0, apple.x0_from_eps(ins[0], eps16.float()))
