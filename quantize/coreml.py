"""Core ML weight compression, applied on the PyTorch side with ``coremltools.optimize.torch``.

Compressing in PyTorch (not on the converted program) means the quality effect can be measured here,
on Linux, by running the compressed module; ``ct.convert`` then reads the ``_COREML_/…`` metadata the
compressors leave on each layer and emits the compressed weights as they are (``constexpr_lut_to_dense``,
``constexpr_affine_dequantize``, ``constexpr_sparse_to_dense``, ``constexpr_lut_to_sparse``).

Schemes are a registry (``@scheme``); each maps ``(module, example_inputs, target_bits)`` to a
compressed *copy* (the caller's module is never modified) plus a small report. ``mixed-bit`` follows
Apple's mixed-bit palettization recipes: a sensitivity analysis (PSNR of the component's output with
one layer palettized at a time, for each candidate bit width), then the PSNR threshold whose per-layer
choice (the fewest bits that keep that layer's PSNR above the threshold) meets ``--target-bits``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Callable

from ..errors import InputError, quiet_loggers, require
from ..validators import choice
from .schemes import MIN_TARGET_IOS, CoreMLCompression, MinTarget
from .schemes import scheme as common_scheme

MIXED_BIT_CANDIDATES = (2, 4, 6, 8)


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: CoreMLCompression
    nominal_bits: float | None  # bits per compressed weight (mixed-bit: --target-bits)
    min_ios: int  # the oldest Core ML (as iOS version) that holds this representation
    apply: Callable  # (module, example_inputs, target_bits, skip) -> (compressed copy, report dict)
    description: str
    # default gate (dB, shipped vs fp32), written into the manifest; --min-psnr overrides. These are
    # floors that catch a broken compression (garbage output), not quality targets: the figures measured
    # on the model are what to judge a scheme by (README: Core ML).
    min_psnr: float


# keyed by schemes.CoreMLCompression (a test checks every member is registered)
SCHEMES: dict[CoreMLCompression, Scheme] = {}


def scheme(name: CoreMLCompression, nominal_bits: float | None, description: str, min_ios: int = 16, min_psnr: float = 0.0):
    """Register a compression: its Core ML record here (bits, minimum iOS) and its common scheme record
    (``quantize/schemes.py``: backend ``coreml``, the gate)."""
    def deco(fn):
        SCHEMES[CoreMLCompression(name)] = Scheme(CoreMLCompression(name), nominal_bits, min_ios, fn, description, min_psnr)
        common_scheme("coreml", name, gate_db=min_psnr, default_components=("text_encoder", "unet", "vae_decoder"),
                      description=description)(fn)
        return fn

    return deco


def validate(compress: CoreMLCompression | str | None, min_target: MinTarget | str,
             target_bits: float | None) -> Scheme | None:
    """Check a --compress/--min-target/--target-bits combination before any work is done; returns the
    scheme (None without --compress). Nothing is changed: configs call this when they are made."""
    min_target = choice("min_target", min_target, MinTarget)
    if compress is None:
        if target_bits is not None:
            raise InputError("--target-bits applies only to --compress mixed-bit", "drop it or add --compress mixed-bit")
        return None
    compress = choice("compress", compress, CoreMLCompression)
    s = SCHEMES[compress]
    if MIN_TARGET_IOS[min_target] < s.min_ios:
        raise InputError(
            f"--compress {compress.value} needs Core ML of iOS{s.min_ios}/macOS{s.min_ios - 3} or later, but --min-target is {min_target.value}",
            f"pass --min-target iOS{s.min_ios} (or macOS{s.min_ios - 3}), or choose a single compression",
        )
    if compress is CoreMLCompression.mixed_bit:
        lo, hi = min(MIXED_BIT_CANDIDATES), max(MIXED_BIT_CANDIDATES)
        if target_bits is None or not (lo <= target_bits <= hi):
            raise InputError(f"--compress mixed-bit needs --target-bits between {lo} and {hi} (got {target_bits})",
                             "pass e.g. --target-bits 4")
    elif target_bits is not None:
        raise InputError("--target-bits applies only to --compress mixed-bit", "drop it or use --compress mixed-bit")
    return s


def compress(module, name: CoreMLCompression | str, example_inputs: tuple, target_bits: float | None = None):
    """A compressed copy of ``module`` by scheme ``name``, and the scheme's report.

    Only layers that ``module``'s forward pass calls are compressed (a VAE decoder component holds the
    whole VAE; its encoder is not in the package and must not be counted or compressed)."""
    with _quiet():
        skip = unused_layers(module, example_inputs)
        m, rep = SCHEMES[choice("compress", name, CoreMLCompression)].apply(module, example_inputs, target_bits, skip)
    return m, {**rep, "skipped_unused_layers": len(skip)}


# which pipeline attribute each one-step component wraps (TextEncoderComponent.text_encoder, ...)
_WRAPPED = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}


def compressed_pipeline(pipe, name: CoreMLCompression | str, target_bits: float | None = None):
    """A copy of ``pipe`` whose one-step components (text encoder, one-step denoiser, VAE decoder) carry
    scheme ``name``'s weights exactly as ``convert --target coreml --compress NAME`` compresses them
    (same compressor, same example inputs), so ``eval``/``generate`` measure the scheme's effect on
    quality in PyTorch. ``pipe`` is not modified. Returns ``(pipeline, {component: report})``."""
    from ..components import COMPONENTS, ONE_STEP, Sizes

    validate(name, MinTarget.iOS18, target_bits)
    out = dataclasses.replace(pipe)
    sizes = Sizes.of(pipe, batch=1)
    reports = {}
    for comp in ONE_STEP:
        spec = COMPONENTS[comp]
        m, reports[comp] = compress(spec.module(pipe), name, spec.example_inputs(pipe, sizes), target_bits)
        setattr(out, _WRAPPED[comp], getattr(m, _WRAPPED[comp]).eval())
    return out, reports


@dataclasses.dataclass(frozen=True)
class PyTorchCompression:
    """A Core ML compression applied to a loaded pipeline in PyTorch, as ``convert --target coreml
    --compress`` ships it: a transform for ``digits.evaluate.evaluate(config, transform=...)``. Checked
    when made (an unknown scheme or a missing ``--target-bits`` fails before any model loads)."""

    scheme: CoreMLCompression
    target_bits: float | None = None
    result_key: str = "coreml_compression"

    def __post_init__(self) -> None:
        require("coremltools", "coreml")
        object.__setattr__(self, "scheme", choice("coreml_compress", self.scheme, CoreMLCompression))
        validate(self.scheme, MinTarget.iOS18, self.target_bits)

    def __call__(self, pipe, steps: int) -> tuple[object, dict]:
        """``(compressed copy of pipe, report)``. Core ML packages hold the one-step denoiser only, so the
        model must sample in one step; weights must be float32."""
        import time

        import torch

        if steps != 1:
            raise InputError(f"--coreml-compress measures the one-step Core ML package, but this eval samples {steps} steps",
                             "pass --steps 1 (a one-step model: a distilled student or a 2-rectified flow)")
        if pipe.dtype != torch.float32:
            raise InputError("--coreml-compress compresses float32 weights", "drop --dtype (float32 is the default)")
        t, device = time.perf_counter(), pipe.device
        out, reports = compressed_pipeline(pipe.to("cpu"), self.scheme, self.target_bits)
        out.to(device)
        return out, {"scheme": self.scheme.value, "target_bits": self.target_bits,
                     "seconds": round(time.perf_counter() - t, 2), "components": reports}


def unused_layers(module, example_inputs) -> list[str]:
    """Weight layers (Linear, Conv, Embedding) to leave uncompressed: those a forward pass does not
    call, and those whose output does not depend on the inputs (the one-step UNet's time embedding at
    the fixed τ = 1000, CLIP's position embedding): the converter folds those into dense constants, so
    their compression would be lost in the package anyway."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    layers = {n: m for n, m in module.named_modules() if isinstance(m, kinds)}
    g = torch.Generator().manual_seed(0)
    other = tuple(x + torch.randn(x.shape, generator=g, dtype=x.dtype) if x.is_floating_point() else torch.roll(x, 1, -1)
                  for x in example_inputs)
    seen: list[dict[str, torch.Tensor]] = []
    for inputs in (example_inputs, other):
        outs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.detach().clone()))
                 for n, m in layers.items()]
        try:
            with torch.no_grad():
                module(*inputs)
        finally:
            for h in hooks:
                h.remove()
        seen.append(outs)
    a, b = seen
    return sorted(n for n in layers if n not in a or (a[n].shape == b[n].shape and torch.equal(a[n], b[n])))


@contextlib.contextmanager
def _quiet():
    """coremltools' k-means logs a progress line per layer at INFO: raised to WARNING inside, restored after;
    its pruner warns that the finalized mask (0.49997 of the weights) is not exactly its 0.5 schedule,
    which it calls harmless itself: ERROR (a one-line error must stay one line)."""
    with quiet_loggers("coremltools", "coremltools.optimize.torch._utils.k_means", level=logging.WARNING), \
            quiet_loggers("coremltools.optimize.torch.pruning._base_pruning_method"):
        yield


# ---------------------------------------------------------------------------------------------------
# the compressors


def _palettize(module, bits: int | None = None, per_layer: dict[str, int] | None = None, skip: list[str] = ()):
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
    )

    if per_layer is not None:
        cfg = {"module_name_configs": {n: {"n_bits": b, "granularity": "per_tensor"} for n, b in per_layer.items()}}
    else:
        cfg = {"global_config": {"n_bits": bits, "granularity": "per_tensor"},
               "module_name_configs": {n: None for n in skip}}
    # one k-means worker: more spawn processes that re-import torch and the caller's __main__ (slow, and
    # fragile from scripts without a main guard); per-tensor 6-bit k-means runs ~5 M weights/s anyway
    return PostTrainingPalettizer(module, PostTrainingPalettizerConfig.from_dict(cfg)).compress(
        num_kmeans_workers=1, inplace=False)


def _prune(module, sparsity: float | None = None, n_m: tuple[int, int] | None = None, skip: list[str] = ()):
    from coremltools.optimize.torch.pruning import (
        MagnitudePruner,
        MagnitudePrunerConfig,
    )

    g: dict = {"scheduler": {"update_steps": [1]}}  # [0] prunes nothing, silently (coremltools 9.0)
    g.update({"n_m_ratio": list(n_m)} if n_m else {"target_sparsity": sparsity})
    model = copy.deepcopy(module)
    cfg = MagnitudePrunerConfig.from_dict({"global_config": g, "module_name_configs": {n: None for n in skip}})
    pruner = MagnitudePruner(model, cfg)
    model = pruner.prepare(inplace=True)
    pruner.step()
    pruner.step()  # the schedule applies the mask at step 1
    pruner.finalize(inplace=True)
    return model


def compressed_layers(model) -> dict[str, str]:
    """Layer name → compression type, read from the ``_COREML_`` metadata the compressors leave."""
    out = {}
    for name, buf in model.named_buffers():
        if name.endswith("_COREML_/weight/compression_type"):
            kinds = {1: "pruning", 2: "palettization", 3: "quantization"}
            out[name.rsplit("._COREML_", 1)[0]] = "+".join(kinds.get(int(v), str(int(v))) for v in buf.flatten())
    return out


def _report(model, **extra) -> dict:
    layers = compressed_layers(model)
    return {"layers": len(layers), **extra}


for _bits in (4, 6, 8):
    def _pal(module, example_inputs, target_bits, skip, _b=_bits):
        m = _palettize(module, _b, skip=skip)
        return m, _report(m, n_bits=_b, granularity="per_tensor")

    scheme(CoreMLCompression(f"palettize-{_bits}"), _bits, f"{_bits}-bit k-means palettization (one LUT per tensor)",
           min_psnr={4: 15.0, 6: 20.0, 8: 30.0}[_bits])(_pal)


@scheme(CoreMLCompression.int8, 8, "int8 linear weight quantization (symmetric, per output channel)", min_psnr=30.0)
def _int8(module, example_inputs, target_bits, skip):
    from coremltools.optimize.torch.quantization import (
        PostTrainingQuantizer,
        PostTrainingQuantizerConfig,
    )

    cfg = PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int8", "granularity": "per_channel"},
                                                 "module_name_configs": {n: None for n in skip}})
    m = PostTrainingQuantizer(module, cfg).compress(inplace=False)
    return m, _report(m, weight_dtype="int8", granularity="per_channel")


@scheme(CoreMLCompression.prune_50, None, "50% unstructured magnitude pruning (sparse weights)", min_psnr=8.0)
def _prune50(module, example_inputs, target_bits, skip):
    m = _prune(module, sparsity=0.5, skip=skip)
    return m, _report(m, sparsity=0.5)


@scheme(CoreMLCompression.prune_2_4, None, "2:4 structured magnitude pruning (2 of every 4 weights zero)", min_psnr=8.0)
def _prune24(module, example_inputs, target_bits, skip):
    m = _prune(module, n_m=(2, 4), skip=skip)
    return m, _report(m, n_m_ratio=[2, 4])


def _joint(n_m: tuple[int, int] | None, sparsity: float | None, bits: int):
    def fn(module, example_inputs, target_bits, skip):
        pruned = _prune(module, sparsity=sparsity, n_m=n_m, skip=skip)
        m = _palettize(pruned, bits, skip=skip)
        del pruned
        return m, _report(m, sparsity=sparsity, n_m_ratio=list(n_m) if n_m else None, n_bits=bits)

    return fn


scheme(CoreMLCompression.prune_50_palettize_4, 4, "joint: 50% magnitude pruning, then 4-bit palettization of the survivors", min_ios=18,
       min_psnr=8.0)(_joint(None, 0.5, 4))
# (2:4 pruning then palettization is not offered: coremltools 9.0's palettizer drops the 2:4 zeros)


@scheme(CoreMLCompression.mixed_bit, None, "mixed-bit palettization: bits per layer from a PSNR sensitivity analysis, to meet --target-bits",
        min_psnr=15.0)
def _mixed_bit(module, example_inputs, target_bits, skip):
    sens, sizes = sensitivity(module, example_inputs, skip)
    per_layer, threshold = pick_bits(sens, sizes, target_bits)
    m = _palettize(module, per_layer=per_layer)
    avg = sum(per_layer[n] * sizes[n] for n in per_layer) / sum(sizes.values())
    hist = {str(b): sum(1 for v in per_layer.values() if v == b) for b in MIXED_BIT_CANDIDATES}
    return m, _report(m, target_bits=target_bits, average_bits=round(avg, 3), psnr_threshold=round(threshold, 2),
                      layers_per_bits=hist, bits_per_layer=per_layer,
                      sensitivity={n: {str(b): round(p, 2) for b, p in d.items()} for n, d in sens.items()})


def sensitivity(module, example_inputs, skip: list[str] = ()) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """For each palettizable layer and each candidate bit width: the PSNR (dB, vs the uncompressed
    module) of the module's output when only that layer is palettized. Also each layer's weight count.

    Each bit width is palettized once for all layers; then layer by layer its palettized weight is
    swapped into the uncompressed module for one forward pass and swapped back.
    """
    import torch

    from ..parity import psnr

    module = module.eval()
    with torch.no_grad():
        ref = module(*example_inputs)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for b in MIXED_BIT_CANDIDATES:
        pal = _palettize(module, b, skip=skip)
        names = compressed_layers(pal)
        mods = dict(pal.named_modules())
        weights[b] = {n: mods[n].weight.detach().clone() for n in names}
        del pal
    layers = sorted(set.intersection(*(set(w) for w in weights.values())))
    own = dict(module.named_modules())
    sizes = {n: own[n].weight.numel() for n in layers}
    out: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for n in layers:
            w0 = own[n].weight.data
            out[n] = {}
            for b in MIXED_BIT_CANDIDATES:
                own[n].weight.data = weights[b][n]
                try:
                    out[n][b] = min(psnr(ref, module(*example_inputs)), 200.0)  # inf (exact) → a finite cap for JSON
                finally:
                    own[n].weight.data = w0
    return out, sizes


def pick_bits(sens: dict[str, dict[int, float]], sizes: dict[str, int], target_bits: float) -> tuple[dict[str, int], float]:
    """Apple's recipe selection: for a PSNR threshold T, each layer takes the fewest bits whose
    single-layer PSNR is ≥ T (8 if none); average bits (weighted by weight count) rises with T.
    Returns the choice at the highest T whose average is ≤ ``target_bits`` (and that T)."""
    total = sum(sizes.values())

    def choose(t: float) -> dict[str, int]:
        return {n: next((b for b in sorted(d) if d[b] >= t), max(d)) for n, d in sens.items()}

    def avg(choice: dict[str, int]) -> float:
        return sum(choice[n] * sizes[n] for n in choice) / total

    candidates = sorted({p for d in sens.values() for p in d.values()})
    best_t, best = -1.0, choose(-1.0)  # lowest threshold: every layer at the fewest bits
    for t in candidates:
        c = choose(t)
        if avg(c) <= target_bits + 1e-9:
            best_t, best = t, c
    return best, best_t
