"""``convert --target coreml``: ML-program packages for iOS/macOS, compressed, validated without a Mac.

One converter per component (``specs.ONE_STEP``, plus the fused ``generator`` with ``--fused``), as
Apple's ``torch2coreml`` has, written with the resource names its Swift ``StableDiffusion`` package
expects: ``TextEncoder.mlpackage``, ``Unet.mlpackage``, ``VAEDecoder.mlpackage``, ``vocab.json``,
``merges.txt`` (and, for its image to image, ``VAEEncoder.mlpackage``: Apple layout), and ``manifest.json``. Two layouts (``--layout``):

* ``apple`` (default): Apple's names, shapes and dtypes, and a Unet that answers its DPM-Solver++ at
  ``--step-count 1`` with an ε whose x0 is our one-step latent (``coreml_apple.py``), so Apple's Swift
  ``StableDiffusionPipeline`` runs the folder unchanged;
* ``native``: our own chain: the Unet is the one-step denoiser (UNet at τ = 1000 plus the Euler step, so
  its output is the final latent), the VAEDecoder takes latents already ÷ scaling_factor
  (``generate --backend coreml`` runs either).

Per component: (optional) compression on the PyTorch side (``quantize/coreml.py``) → ``torch.jit.trace``
→ ``ct.convert`` (mlprogram, ``--min-target``, ``--precision``) → descriptions and metadata → save →
validation of the saved package (``coreml_check.py``). Quality is measured in PyTorch, because Core ML
cannot predict on Linux: every figure compares against the fp32 PyTorch reference, both per component
(on the reference's own inputs) and end to end (the shipped chain text → latent → image against the
fp32 chain). "Shipped" means the compressed module run in float16 when ``--precision fp16``.

Gate: each component is measured before it is converted. Once one figure misses the gate nothing more is
converted, but the remaining components are still measured, and one PsnrError then lists every miss.
The verb returns the manifest; its ``report`` rows are the table the CLI prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    read_manifest,
    write_manifest,
)
from ..copying import check_links
from ..errors import InputError, require
from ..pipeline import detect_info, load_pipeline, write_slow_tokenizer_files
from ..quantize import coreml as cq
from ..quantize.coreml import compressed_layers
from ..runtime.coreml import KIND
from . import coreml_apple as apple
from .config import ConvertConfig, CoreMLLayout, Precision, Target, parse_sizes, target
from .coreml_check import report_rows
from .coreml_meta import NAMES, describe
from .coreml_quality import QualityChain, as_shipped, fp16_tail_figure, quality_size  # noqa: F401  (as_shipped, quality_size: API)

log = logging.getLogger(__name__)

GATE_FIX = "use a less aggressive --compress, --precision fp32, or lower the gate explicitly with --min-psnr"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything decided before the model loads (so bad options fail in a second)."""

    scheme: object | None
    gate: float
    gate_source: str


def plan(config: ConvertConfig) -> Plan:
    """The scheme and the gate (the config's options were checked when it was made)."""
    from ..parity import DEFAULT_MIN_PSNR

    s = cq.SCHEMES[config.options.compress] if config.options.compress is not None else None
    if config.min_psnr is not None:
        return Plan(s, float(config.min_psnr), "--min-psnr")
    if s is not None:
        return Plan(s, s.min_psnr, f"scheme {s.name.value}")
    return Plan(None, DEFAULT_MIN_PSNR[config.options.precision.value], f"precision {config.options.precision.value}")


def _image_sizes(config: ConvertConfig, pipe) -> list:
    from ..components import Sizes

    hw = [(config.height or pipe.default_size, config.width or pipe.default_size)]
    for s in parse_sizes(config.options.sizes) if config.options.sizes else []:
        if s not in hw:
            hw.append(s)
    hw = [pipe.image_size(h, w) for h, w in hw]
    return [Sizes.of(pipe, batch=1, height=h, width=w) for h, w in hw]


def _check_layout_before_loading(config: ConvertConfig) -> None:
    """``--layout apple`` needs a one-step rectified flow: read from the folder's manifest or
    model_index.json before the weights load (a hub id is checked once loaded)."""
    folder = Path(config.model)
    if config.options.layout is not CoreMLLayout.apple or not (folder / "model_index.json").is_file():
        return
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # load_pipeline says what is wrong with the folder
    apple.check_model(detect_info(config.model, folder, index), config.model)


@target(Target.coreml)
def export_coreml(config: ConvertConfig, traced: dict | None = None) -> dict:
    """Convert ``config.model`` into Core ML packages in ``config.output``; returns the manifest (its
    ``report`` is the table to show). Every miss of the gate is raised at once, as one PsnrError.
    ``traced``, when given, receives each component's module exactly as it was traced and converted
    (compression applied, float32: the package's ``--precision`` is applied by Core ML)."""
    from ..parity import Conditioning, check_all, check_conditioning

    p = plan(config)
    check_output(config.output, config.force, (config.model, config.calibration_prompts))  # before minutes of work
    _check_layout_before_loading(config)
    require("coremltools", "coreml")

    t0 = time.perf_counter()
    pipe = load_pipeline(config.model, "cpu", "float32", config.allow_pickle)
    if config.options.layout is CoreMLLayout.apple:
        apple.check_model(pipe.info, config.model)
    shapes = _image_sizes(config, pipe)
    names = ["text_encoder", "unet", "vae_decoder"] + (["generator"] if config.fused else [])
    if config.options.layout is CoreMLLayout.apple:
        names.append("vae_encoder")  # Apple's image to image (VAEEncoder.mlpackage), after the decoder's image
    components: dict[str, dict] = {}
    quality = quality_size(config, pipe, shapes[0])
    with atomic_dir(config.output, config.force, (config.model, config.calibration_prompts)) as tmp:
        chain = QualityChain.start(pipe, quality, config.options.layout)
        for name in names:
            components[name] = _convert_one(config, p, pipe, name, shapes, chain, tmp, traced)
            gc.collect()
        check_all(chain.measured, p.gate, against="fp32", source=p.gate_source, fix=GATE_FIX)
        cond = check_conditioning(Conditioning.from_dict(components["unet"]["conditioning"]))
        end_to_end = chain.parity
        _copy_tokenizer(config.model, pipe, tmp)
        source = read_manifest(config.model) if Path(config.model).is_dir() else None
        rows = report_rows(components, end_to_end, config.options.compress.value if config.options.compress else None)
        manifest = make_manifest(
            KIND, config,
            model={"source": config.model, "content_sha256": (source or {}).get("content_sha256"),
                   "flow": pipe.info.flow, "default_steps": pipe.info.default_steps},
            files={n: NAMES[n] + ".mlpackage" for n in names} | {"vocab": "vocab.json", "merges": "merges.txt"},
            image_sizes=[[s.height, s.width] for s in shapes],
            latent={"channels": shapes[0].latent_channels, "vae_scale_factor": pipe.vae_scale_factor,
                    "scaling_factor": float(pipe.scaling_factor)},
            layout=config.options.layout.value, scheduler=_scheduler(config, pipe),
            quality_batch=chain.batch,
            quality_image_size=[quality.height, quality.width],
            gate={"min_psnr": p.gate, "source": p.gate_source, "applies_to": "every component and the end-to-end image, as shipped vs fp32 PyTorch"},
            components=components, end_to_end=end_to_end, report=rows, conditioning=cond.as_dict(),
            seconds=round(time.perf_counter() - t0, 2),
        )
        write_manifest(tmp, manifest)
    return manifest


def _scheduler(config: ConvertConfig, pipe) -> dict:
    """What the packages were built to be run by."""
    if config.options.layout is CoreMLLayout.apple:
        return apple.manifest_block(pipe.scaling_factor)
    return {"program": "instaflow-edge generate --backend coreml (or an app doing the same)", "scheduler": None,
            "note": "no scheduler: the Unet's out_sample is the final latent; divide by scaling_factor and decode"}


def specs(layout: CoreMLLayout) -> dict:
    """The component specs of a layout (names, dims, dtypes of each package's I/O)."""
    from ..components import COMPONENTS

    return apple.SPECS if CoreMLLayout(layout) is CoreMLLayout.apple else COMPONENTS


def _convert_one(config, p: Plan, pipe, name: str, shapes: list, chain: QualityChain, tmp: Path,
                 traced: dict | None = None) -> dict:
    """Measure component ``name`` as shipped (its figures join ``chain.measured``), then convert, save and
    validate it, unless a figure measured so far misses the gate: then it is only measured."""
    import torch

    from ..components import COMPONENTS
    from ..parity import compare, conditioning
    from .coreml_attention import attention_implementation

    layout = config.options.layout
    spec = COMPONENTS[name] if name == "generator" else specs(layout)[name]
    info: dict = {"file": NAMES[name] + ".mlpackage"}
    timing: dict = {}
    with attention_implementation(pipe.unet, config.options.attention):
        module = spec.module(pipe)
        ref_in = chain.inputs(name, "ref")
        with torch.no_grad():
            ref_out = chain.observed(name, module(*ref_in), ref_in)
        shipped_fp32 = module
        if p.scheme is not None:
            log.info(f"{NAMES[name]}: compressing ({p.scheme.name.value})")
            t = time.perf_counter()
            shipped_fp32, rep = cq.compress(module, p.scheme.name, tuple(x[:1] for x in ref_in), config.options.target_bits)
            timing["compress_s"] = round(time.perf_counter() - t, 2)
            info["compression"] = {"scheme": p.scheme.name.value, **rep}
            with torch.no_grad():
                info["parity_compression_fp32"] = compare(
                    name, ref_out, chain.observed(name, shipped_fp32(*ref_in), ref_in)).as_dict()
        shipped, cast = as_shipped(shipped_fp32, config.options.precision)
        tail: dict = {}
        apple_unet = layout is CoreMLLayout.apple and name == "unet"
        with torch.no_grad():
            with (fp16_tail_figure(shipped, ref_in, ref_out, tail) if apple_unet and config.options.precision is Precision.fp16
                  else contextlib.nullcontext()):
                par = compare(name, ref_out, chain.observed(name, shipped(*cast(ref_in)), ref_in).float())
            info["parity"] = par.as_dict()
            if apple_unet:
                info["parity"]["measured_on"] = "x0 = (sample − σ·noise_pred)/α, the latent Apple's DPM-Solver++ decodes"
            if tail:
                info["fp16_tail"] = {"x0_psnr_tail_fp32": par.psnr, **tail,
                                     "shipped": "fp32 (the ops after the UNet's last layer)"}
            chain.measured.append(par)
            if name == "unet":  # the conditioning check, on the module as shipped (Core ML cannot predict here)
                empty = chain.inputs(name, chain.empty_prompt_state(pipe, specs(layout)["text_encoder"].module(pipe)))
                info["conditioning"] = conditioning(
                    ref_out, chain.observed(name, module(*empty), empty),
                    chain.observed(name, shipped(*cast(ref_in)), ref_in).float(),
                    chain.observed(name, shipped(*cast(empty)), empty).float()).as_dict()
            if name != "generator":
                chain.store(name, "ref", ref_out)
                ship_in = chain.inputs(name, "ship")
                chain.store(name, "ship", chain.observed(name, shipped(*cast(ship_in)), ship_in))
        del shipped
        if name == "vae_decoder":
            chain.close()
        # a miss: convert nothing more (minutes each), measure the rest, and let the caller list every miss
        if chain.misses(p.gate):
            log.info(f"{NAMES[name]}: measured; a figure misses the {p.gate:.1f} dB gate, so nothing more is converted")
            return info
        log.info(f"{NAMES[name]}: tracing and converting")
        if traced is not None:
            traced[name] = _traceable(spec, shipped_fp32)
        t = time.perf_counter()
        ml = _to_coreml(config, spec, shipped_fp32, shapes)
        timing["convert_s"] = round(time.perf_counter() - t, 2)
    describe(ml, config, name, spec, pipe)
    path = tmp / info["file"]
    ml.save(str(path))
    del ml
    gc.collect()
    log.info(f"{NAMES[name]}: validating the saved package")
    t = time.perf_counter()
    info.update(_validate(name, path, spec, shapes, shipped_fp32, used_parameters(shipped_fp32, ref_in)))
    timing["validate_s"] = round(time.perf_counter() - t, 2)
    info["seconds"] = timing
    return info


# ---------------------------------------------------------------------------------------------------
# conversion


def _wrap_float_ids(module):
    """Core ML I/O is float32 (Apple's Swift TextEncoder feeds float ids): cast ids back inside."""
    import torch

    class FloatIds(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, *rest):
            return self.inner(input_ids.to(torch.int32), *rest)

    return FloatIds(module)


@contextlib.contextmanager
def _lean_lut_indices():
    """coremltools 9.0 finds palette indices with a dense (weights × 2^bits) distance matrix: 20 GB for
    SD1.5's 38 M-entry token embedding at 6 bits (it was OOM-killed here). For a scalar LUT shared by the
    whole tensor (our per-tensor palettization) the nearest entry is found by binary search over the
    midpoints of the sorted LUT instead: the same indices, O(weights) memory."""
    import numpy as np
    from coremltools.optimize import _utils as ou

    original = ou.find_indices_for_lut

    def lean(data, lut, vector_axis=None):
        if lut.shape[-1] != 1 or any(d != 1 for d in lut.shape[:-2]) or len(lut.shape) != data.ndim + 2:
            return original(data, lut, vector_axis)
        table = lut.reshape(-1).astype(np.float64)
        order = np.argsort(table, kind="stable")
        sorted_t = table[order]
        mids = (sorted_t[1:] + sorted_t[:-1]) / 2
        pos = np.searchsorted(mids, data.astype(np.float64).ravel(), side="left")
        nbits = int(np.log2(lut.shape[-2]))
        return order[pos].reshape(data.shape).astype(ou.types.nptype_from_builtin(ou.types.string_to_builtin(f"uint{nbits}")))

    ou.find_indices_for_lut = lean
    try:
        yield
    finally:
        ou.find_indices_for_lut = original


def _traceable(spec, module):
    """The module as traced: int64 token ids (the native layout's modules) behind the float32 boundary."""
    return _wrap_float_ids(module) if spec.inputs[0].name == "input_ids" and spec.inputs[0].dtype == "int64" else module


def _to_coreml(config, spec, module, shapes: list):
    import coremltools as ct
    import numpy as np
    import torch

    ex = []
    for t in spec.inputs:
        shape = shapes[0].shape(t)
        ex.append(torch.zeros(shape, dtype=torch.float32) if t.name == "input_ids" else torch.randn(shape))
    m = _traceable(spec, module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts frozen at the traced size: intended
        traced = torch.jit.trace(m.eval(), tuple(ex), check_trace=False)
    inputs = []
    for t in spec.inputs:
        variants = sorted({s.shape(t) for s in shapes}, key=lambda s: s != shapes[0].shape(t))
        shape = ct.EnumeratedShapes(shapes=variants, default=variants[0]) if len(variants) > 1 else variants[0]
        inputs.append(ct.TensorType(name=t.name, shape=shape, dtype=np.float32))
    target = getattr(ct.target, config.options.min_target.value)
    precision = ct.precision.FLOAT16 if config.options.precision is Precision.fp16 else ct.precision.FLOAT32
    if config.options.precision is Precision.fp16 and spec is apple.SPECS["unet"]:
        precision = ct.transform.FP16ComputePrecision(op_selector=apple.fp32_tail())  # ε̂ stays fp32
    with _lean_lut_indices():
        return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=o.name, dtype=np.float32) for o in spec.outputs],
                          convert_to="mlprogram", minimum_deployment_target=target, compute_precision=precision,
                          skip_model_load=True)


def _copy_tokenizer(model: str, pipe, tmp: Path) -> None:

    src = Path(model) / "tokenizer"
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        check_links(src, root=model)
        shutil.copyfile(src / "vocab.json", tmp / "vocab.json")
        shutil.copyfile(src / "merges.txt", tmp / "merges.txt")
        return
    write_slow_tokenizer_files(pipe.tokenizer, tmp)
    if not (tmp / "vocab.json").is_file():
        raise InputError("the model's tokenizer is not a CLIP BPE tokenizer with vocab.json/merges.txt",
                         "Apple's Swift pipeline needs those two files; use a CLIP-tokenizer pipeline")


def used_parameters(module, inputs) -> int:
    """Parameters a forward pass touches (a VAE decoder component holds the whole VAE; its encoder's
    weights are not in the package and must not dilute bits per weight)."""
    import torch

    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod))) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*(x[:1] for x in inputs))
    finally:
        for h in hooks:
            h.remove()
    seen: dict[int, int] = {}
    for m in module.modules():
        if id(m) in called:
            for p in m.parameters(recurse=False):
                seen[id(p)] = p.numel()
    return sum(seen.values())


def _validate(name: str, path: Path, spec, shapes: list, module, params: int) -> dict:
    from . import coreml_check as cc

    ml = cc.load(path)
    out = {"io": cc.check_io(name, ml, spec, shapes), "ops": cc.op_census(ml)}
    if spec is apple.SPECS["unet"]:
        out["output_tail"] = cc.output_tail(ml)
    out.update(cc.sizes(path, params))
    out["weights_match"] = cc.check_weights(name, ml, module, sorted(compressed_layers(module)))
    return out
