"""``convert --target onnx``: export, ONNX Runtime optimization, quantization and parity gates.

Exporter: ``torch.onnx.export(dynamo=False)`` (TorchScript). It is deprecated, but on this stack it is
the one that works best for us: it exports a batch-1 example with dynamic batch/spatial axes (dynamo
needs a batch-2 trace for a dynamic batch axis), exports the tiny UNet in ~1 s instead of ~12 s, and
its graph is the one onnxruntime's transformer optimizer was written against. With it, ``--optimize
cpu`` fuses the SD1.5 UNet's 16 self- and 16 cross-attention blocks (``Attention`` and
``MultiHeadAttention``, which have CPU kernels), 48 LayerNorms and the text encoder's SkipLayerNorms
(measured: see the manifest's ``optimize.fused_ops``); on the tiny preset's 2-block UNet the attention
pattern is not matched and only the norms/GELUs fuse. The dynamo export fused no attention.
On CPU the fused self-attention ``Attention`` nodes are then rewritten as Q/K/V MatMuls +
``MultiHeadAttention`` (:func:`attention_to_mha`), whose CPU kernel is faster.

Folder layout (optimum's ONNX diffusion layout, docs/DESIGN.md)::

    text_encoder/model.onnx  unet/model.onnx  vae_decoder/model.onnx  [generator/model.onnx]
    [unet_velocity/model.onnx]  tokenizer/  scheduler/  model_index.json  manifest.json

each component folder with the source's ``config.json``; weights over 2 GB in ``model.onnx_data``.
``scheduler/`` is not the source's: it is :data:`PIPELINE_SCHEDULER`, under which diffusers'/optimum's
``StableDiffusionPipeline`` reproduces the one-step image (docs/optimum.md).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import shutil
import time
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    check_output,
    inherited_prompts,
    make_manifest,
    read_manifest,
    sha256_tree,
    write_manifest,
)
from ..copying import check_links
from ..errors import MissingDependencyError, ModelError
from ..parity import check_all, check_conditioning, compare
from ..quantize.onnx import apply_scheme, default_gate
from ..quantize.schemes import QuantEngine, get_scheme
from ..runtime import onnx_io
from ..runtime.onnx import KIND, run_one_step, write_partial
from ..validators import prompt_file
from . import reference
from .config import ConvertConfig, Optimize, Target, target
from .onnx_inc import inc_int8_static

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=False)"

# ORT transformer-optimizer model_type per component
_MODEL_TYPE = {"text_encoder": "clip", "unet": "unet", "unet_velocity": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
               "generator": "unet"}
# fusions whose ops have no CPU kernel (GroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, packed QKV/KV)
_CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                      "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


# The scheduler an export ships for diffusers'/optimum's StableDiffusionPipeline (docs/optimum.md), so that
# ``pipe(prompt, num_inference_steps=1, guidance_scale<=1, latents=z)`` gives generate --backend onnx's image.
# What that call does with it (diffusers 0.39 = optimum 2.1's, and 0.42 alike; DDIMScheduler is the same file):
# - latents = z * init_noise_sigma, which DDIM sets to 1.0; scale_model_input returns the sample unchanged;
# - trailing spacing: round(arange(num_train_timesteps, 0, -num_train_timesteps / 1)) - 1 = [1000] with 1001
#   train timesteps (1000 of them would give 999); optimum casts it to the UNet's float32 input: 1000.0;
# - the UNet graph returns z + v(z, 1000), the final latent: prediction_type "sample" takes it as x0, with
#   clip_sample off (DDIM's default clamps x0 to [-1, 1]) and no thresholding;
# - prev_timestep = 1000 - 1001 // 1 < 0, so alpha_prev = final_alpha_cumprod = 1 (set_alpha_to_one) and
#   prev = 1 ** 0.5 * x0 + (1 - 1) ** 0.5 * eps = x0 exactly (eta 0: no noise; eps is finite, so 0 * eps = 0);
# - vae.decode(latents / vae.config.scaling_factor): our vae_decoder/config.json carries the model's factor.
# Image-to-image (``ORTStableDiffusionImg2ImgPipeline``): the pipeline noises the image's latent its own
# way, x_t = sqrt(abar_t)·x1 + sqrt(1 - abar_t)·eps (add_noise). The betas below make that the straight path
# up to a factor: abar_t = u² / (u² + t²) with u = 1000 - t, so sqrt(abar_t) / (sqrt(abar_t) + sqrt(1 - abar_t))
# = 1 - t/1000 = s0 and x_t · r(t), r(t) = sqrt(u² + t²) / 1000, is s0·x1 + (1 - s0)·eps. The UNet graph
# (``_OneStepUnet``) applies r(t) and returns the straight-path x0 of one Euler step, x + (t/1000)·v(x, t);
# "sample" prediction with prev_timestep < 0 hands it on as it is. At t = 1000 (text-to-image): abar = 0
# (beta 1), r = 1 and t/1000 = 1, the graph is z + v(z, 1000) bit for bit and eps = z stays finite.
# steps_offset is unused by trailing spacing; 1 keeps diffusers from rewriting the config with a warning.


def straight_path_betas(num_train_timesteps: int = 1001) -> list[float]:
    """The betas whose cumulative alphas put DDIM's ``add_noise`` on the straight path (see above):
    abar_t = (T - t)² / ((T - t)² + t²), T = num_train_timesteps - 1; beta_0 = 0, beta_T = 1."""
    T = num_train_timesteps - 1
    abar = [(T - t) ** 2 / ((T - t) ** 2 + t ** 2) for t in range(T + 1)]
    return [0.0] + [1.0 - abar[t] / abar[t - 1] for t in range(1, T + 1)]


PIPELINE_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1001,
    "timestep_spacing": "trailing",
    "prediction_type": "sample",
    "set_alpha_to_one": True,
    "clip_sample": False,
    "thresholding": False,
    "steps_offset": 1,
    "beta_schedule": "scaled_linear",  # overridden by trained_betas (kept so older readers find a schedule)
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "trained_betas": straight_path_betas(1001),
}
# what the manifest's onnx block says the UNet graph computes at timestep t (runtime/onnx.py edits with it)
UNET_TIMESTEP = "straight-path"


def pipeline_scheduler_record(one_step: bool) -> dict:
    """What the manifest says about the shipped scheduler: which diffusers/optimum calls reproduce which
    ``generate --backend onnx`` run. The UNet graph is the one-step generator, so only one step does:
    no scheduler turns ``z + v`` into the Euler rule's later steps (docs/optimum.md)."""
    return {
        "class": PIPELINE_SCHEDULER["_class_name"],
        "config": "scheduler/scheduler_config.json",
        "reproduces": {"num_inference_steps": 1, "guidance_scale": "<= 1 (no guidance)",
                       "generate": "--backend onnx --steps 1"},
        "img2img": {"pipeline": "ORTStableDiffusionImg2ImgPipeline", "num_inference_steps": "N with int(N·strength) = 1 "
                    "(one step, at the last trailing timestep t)", "generate": "--backend onnx --image FILE --strength t/1000"},
        "other_steps": None if one_step else
        "not reproduced by the pipeline: generate --backend onnx --steps N runs unet_velocity with the Euler rule",
    }


class _OneStepUnet:
    """Built lazily (torch is heavy): the one-step UNet with optimum's inputs, see onnx_spec."""

    @staticmethod
    def build(pipe):
        import torch

        class OneStepUnet(torch.nn.Module):
            """x = r(t)·sample, then x + (t/1000)·v(x, t): the straight-path x0 after one Euler step from
            s0 = 1 - t/1000, for a sample noised by the shipped scheduler (PIPELINE_SCHEDULER's betas). At
            t = 1000: r = 1, so sample + v(sample, 1000), the one-step generator."""

            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states):
                # u = t/1000 and r = √((1 − u)² + u²): the same r(t), with no t² to overflow a float16 graph
                u = timestep.reshape(-1, *([1] * (sample.dim() - 1))).to(sample.dtype) / 1000.0
                r = torch.sqrt((1.0 - u) ** 2 + u ** 2)
                x = sample * r
                v = self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                return x + v * u

        return OneStepUnet(pipe.unet)


def onnx_spec(name: str):
    """The component spec as exported to ONNX. ``unet`` gains optimum's ``timestep`` input (optimum's
    ORTUnet refuses a UNet without one): the graph is ``sample + v(sample, timestep, text)``, i.e. the
    one-step UNet of specs.py when fed timestep = 1000, which is what our runtime feeds."""
    import dataclasses

    from ..components import COMPONENTS, TensorSpec

    spec = COMPONENTS[name]
    if name != "unet":
        return spec
    ts = TensorSpec("timestep", "float32", ("batch",))
    return dataclasses.replace(spec, inputs=(spec.inputs[0], ts, spec.inputs[1]), build=_OneStepUnet.build)


def check_environment(cfg: ConvertConfig) -> None:
    """What the config cannot check when it is made (it would need onnxruntime, or reads a file), checked
    before minutes of export. Changes nothing."""
    prompt_file(cfg.calibration_prompts, [], "calibration prompts")  # a missing/empty file fails now
    if cfg.options.optimize is Optimize.cuda:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError("--optimize cuda needs onnxruntime's CUDAExecutionProvider, which is not installed "
                                         "here (the cuda fusions cannot be load-tested without it)",
                                         "install onnxruntime-gpu on a CUDA machine, or use --optimize cpu")


def components_for(pipe, fused: bool) -> list[str]:
    names = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    if fused:
        names.append("generator")
    if not pipe.info.one_step:
        names.append("unet_velocity")
    return names


def export_component(spec, module, inputs, path: Path, opset: int) -> None:
    """TorchScript-export ``module`` to ``path``; checker (by path) and shape inference after."""
    import warnings

    import onnx
    import torch

    scratch = path.parent / ".export"
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "model.onnx"
    dyn = {}
    for t in (*spec.inputs, *spec.outputs):
        axes = {i: d for i, d in enumerate(t.dims) if d in spec.dynamic}
        if axes:
            dyn[t.name] = axes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(raw), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=dyn, do_constant_folding=True)
    model = onnx.load(str(raw), load_external_data=True)  # > 2 GB: the exporter wrote one file per tensor
    shutil.rmtree(scratch)
    onnx_io.save(model, path)
    del model
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path))  # in place; by path so > 2 GB works


def optimize_component(name: str, path: Path, mode: Optimize) -> dict:
    """ORT graph optimization + the transformer fusions this provider can run; load-tested before it
    replaces ``path``. Returns what it did (fused op counts) for the manifest."""
    import collections

    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = Path(path).resolve()  # the optimizer runs in a scratch working directory
    fo = FusionOptions(_MODEL_TYPE[name])
    fo.enable_shape_inference = False  # at SD1.5 scale shape inference copies the model: 16 GiB peak
    if mode is Optimize.cpu:
        for flag in _CUDA_ONLY_FUSIONS:
            setattr(fo, flag, False)
    # "symbolic shape inference disabled" and the like: silenced inside, the level restored after
    # the UNet fusion draws a tqdm bar of its own on stderr whenever tqdm is installed; our stage lines
    # say the same, so it is captured for the duration of the call (stderr restored after)
    with onnx_io.scratch_cwd(), _logger_level("onnxruntime.transformers", logging.ERROR):
        with contextlib.redirect_stderr(io.StringIO()):
            om = optimize_model(str(path), model_type=_MODEL_TYPE[name], opt_level=0, optimization_options=fo,
                                use_gpu=mode is Optimize.cuda)
        if mode is Optimize.cuda:
            om.convert_float_to_float16(keep_io_types=True, op_block_list=["RandomNormalLike"])
        domains = {n.domain for n in om.model.graph.node if n.domain} - {o.domain for o in om.model.opset_import}
        for d in sorted(domains):  # the fusions emit com.microsoft ops without declaring the domain
            om.model.opset_import.append(onnx.helper.make_opsetid(d, 1))
        if mode is Optimize.cpu:
            rewritten = attention_to_mha(om.model)
        candidate = path.parent / ".optimized" / onnx_io.MODEL_FILE
        onnx_io.save(om.model, candidate)
        ops = collections.Counter(n.op_type for n in om.model.graph.node)
        del om
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if mode is Optimize.cuda else None
    onnx_io.session(candidate, providers=providers)  # load test: raises ModelError naming the file
    for p in list(path.parent.iterdir()):
        if p.is_file() and p.name.startswith(onnx_io.MODEL_FILE):
            p.unlink()
    for p in candidate.parent.iterdir():
        p.rename(path.parent / p.name)
    candidate.parent.rmdir()
    fused = {k: v for k, v in ops.items() if k in ("Attention", "MultiHeadAttention", "SkipLayerNormalization",
                                                  "LayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu",
                                                  "GroupNorm", "NhwcConv", "BiasSplitGelu")}
    out = {"provider": mode.value, "fused_ops": fused}
    if mode is Optimize.cpu:
        out["attention_rewritten_to_mha"] = rewritten
    return out


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def attention_to_mha(model) -> int:
    """Rewrite each bidirectional, unmasked ``com.microsoft.Attention`` (packed QKV weights: ORT's UNet
    self-attention fusion when packed-QKV MultiHeadAttention is unavailable, as on CPU) as three MatMuls
    feeding ``com.microsoft.MultiHeadAttention``: the same math, and ORT's CPU MultiHeadAttention kernel
    is 1.43× faster than its Attention kernel at SD1.5's 4,096-token self-attention (1.25× at 1,024;
    ``bench/attention_kernels.py``). The separate Q/K/V MatMuls are also what int8 quantization can
    quantize. Attention nodes with a mask, past state or ``unidirectional`` (CLIP's causal attention)
    are left alone. Returns the number rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Attention" or node.domain != "com.microsoft" or len(node.input) != 3
                or node.input[1] not in inits or node.input[2] not in inits or attrs.get("unidirectional", 0)
                or set(attrs) - {"num_heads", "scale"}):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        b = numpy_helper.to_array(inits[node.input[2]])
        c_in, three_out = w.shape
        out = three_out // 3
        w3 = w.reshape(c_in, 3, out)
        base = node.name or f"attention_{count}"
        names = []
        for k, part in enumerate("qkv"):
            wn = f"{base}_{part}_weight"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w3[:, k, :]), wn))
            names.append(f"{base}_{part}")
            new_nodes.append(helper.make_node("MatMul", [node.input[0], wn], [names[-1]], name=f"{base}_{part}_matmul"))
        inputs = list(names)
        uses[node.input[1]] -= 1
        if np.any(b != 0):
            inputs.append(node.input[2])  # the same (3·hidden) [q | k | v] layout
        else:
            uses[node.input[2]] -= 1
        new_nodes.append(helper.make_node("MultiHeadAttention", inputs, list(node.output), name=f"{base}_mha",
                                          domain="com.microsoft", **attrs))
        count += 1
    if count:
        dead = {name for name, n in uses.items() if n == 0 and name in inits}
        for i in reversed(range(len(graph.initializer))):  # in place: a rebuilt list copies every weight (GBs)
            if graph.initializer[i].name in dead:
                del graph.initializer[i]
        del graph.node[:]
        graph.node.extend(new_nodes)
    return count


def copy_pipeline_files(src: Path, dst: Path, names: list[str]) -> None:
    """The non-graph files of optimum's layout: tokenizer/, scheduler/ (PIPELINE_SCHEDULER), model_index.json
    and each component's config.json; a symlink out of ``src`` is refused, never copied."""
    check_links(src)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    (dst / "scheduler").mkdir()
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(PIPELINE_SCHEDULER, indent=2) + "\n")
    index = json.loads((src / "model_index.json").read_text())
    index.pop("vae", None)
    index["scheduler"] = ["diffusers", PIPELINE_SCHEDULER["_class_name"]]
    for name in names:
        index.setdefault(name, ["diffusers" if name != "text_encoder" else "transformers", "OnnxRuntimeModel"])
    (dst / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg_src = {"text_encoder": "text_encoder", "unet": "unet", "unet_velocity": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
               "generator": "unet"}
    for name in names:
        shutil.copy(src / cfg_src[name] / "config.json", dst / name / "config.json")


@target(Target.onnx)
def export_onnx(cfg: ConvertConfig) -> dict:
    """Export ``cfg.model`` to an ONNX folder at ``cfg.output``; returns the manifest, whose ``parity``
    and ``gates`` are the table to show. Every miss of a gate is raised at once, as one PsnrError."""
    from ..quantize.onnx import CALIBRATION_PROMPTS, DEFAULT_COMPONENTS

    check_environment(cfg)
    check_output(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts))  # --force never replaces an input
    src = Path(cfg.model)
    if not src.is_dir():
        raise ModelError(f"model path {src} is not a folder", "pass a local pipeline folder (instaflow-edge init / train output)")
    t0 = time.perf_counter()
    pipe, sizes = reference.load_source(src, cfg.allow_pickle, cfg.height, cfg.width)
    names = components_for(pipe, cfg.fused)
    source_manifest = read_manifest(src) or {}
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    timings: dict[str, float] = {}
    with atomic_dir(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts)) as tmp:
        ref = reference.compute(pipe, sizes, names, onnx_spec)
        inc_done = []
        for name in names:
            spec = onnx_spec(name)
            module = spec.module(pipe)
            inputs = ref.components[name][0]
            t = time.perf_counter()
            inc = cfg.options.engine is QuantEngine.inc and name in DEFAULT_COMPONENTS
            log.info(f"{name}: exporting (opset {cfg.options.opset}{', INC int8' if inc else ''})")
            if inc:

                calib = [spec.example_inputs(pipe, sizes, seed=i, prompts=[p]) for i, p in enumerate(prompts)]
                inc_int8_static(spec, module, inputs, calib, tmp / name / onnx_io.MODEL_FILE, cfg.options.opset)
                inc_done.append(name)
            else:
                export_component(spec, module, inputs, tmp / name / onnx_io.MODEL_FILE, cfg.options.opset)
            timings[f"export_{name}"] = round(time.perf_counter() - t, 2)
        block = {**ref.facts.block(), "exporter": EXPORTER, "opset": cfg.options.opset, "unet_timestep": UNET_TIMESTEP,
                 "pipeline_scheduler": pipeline_scheduler_record(pipe.info.one_step)}
        copy_pipeline_files(src, tmp, names)
        del pipe
        gc.collect()  # the torch model is not needed past here (SD1.5: 4.3 GB)
        optimized = {}
        if cfg.options.optimize is not Optimize.none:
            for name in [n for n in names if n not in inc_done]:  # INC's QDQ graphs are left as exported
                t = time.perf_counter()
                log.info(f"{name}: optimizing for {cfg.options.optimize.value} and load-testing")
                optimized[name] = optimize_component(name, tmp / name / onnx_io.MODEL_FILE, cfg.options.optimize)
                timings[f"optimize_{name}"] = round(time.perf_counter() - t, 2)
        # the manifest's runtime facts are needed by calibration (it runs the fp32 pipeline)
        write_partial(tmp, block)
        quantized = []
        if cfg.options.engine is QuantEngine.inc:
            quantized = inc_done
        elif cfg.options.quantize:
            record = get_scheme("onnx", cfg.options.quantize)
            wanted = cfg.options.quantize_components or record.default_components
            quantized = [n for n in names if n in wanted or (n == "unet_velocity" and "unet" in wanted)]
            t = time.perf_counter()
            apply_scheme(tmp, cfg.options.quantize, quantized, prompts, record.make_params(cfg.options.quantize_params))
            timings["quantize"] = round(time.perf_counter() - t, 2)
        gates = {n: (cfg.min_psnr if cfg.min_psnr is not None else default_gate(cfg.options.quantize if n in quantized else None))
                 for n in names}
        gates["end_to_end"] = cfg.min_psnr if cfg.min_psnr is not None else default_gate(cfg.options.quantize if quantized else None)
        rows = []
        log.info(f"parity vs PyTorch: {', '.join(names)}, end to end, conditioning")
        for name in names:
            sess = onnx_io.session(tmp / name / onnx_io.MODEL_FILE)
            rows.append(compare(name, ref.output(name), sess.run(None, ref.feed(name))[0]))
            if name == "unet":
                cond = ref.conditioning(lambda x, s=sess: s.run(None, ref.feed("unet", x))[0])
            del sess
        rows.append(compare("end_to_end", ref.image, run_one_step(tmp, ref.ids, ref.noise, ref.facts)))
        check_all(rows, gates)
        check_conditioning(cond)
        manifest = make_manifest(
            KIND, cfg,
            source={"model": str(src), "content_sha256": source_manifest.get("content_sha256") or sha256_tree(src)},
            onnx=block, optimize=optimized,
            quantize={"scheme": cfg.options.quantize.value if cfg.options.quantize else None, "engine": cfg.options.engine.value, "components": quantized,
                      "calibration_prompts": len(prompts) if cfg.options.quantize and get_scheme("onnx", cfg.options.quantize).calibrated else 0},
            gates=gates, parity=[p.as_dict() for p in rows], conditioning=cond.as_dict(),
            sizes={n: onnx_io.file_sizes(tmp / n) for n in names}, seconds={**timings, "total": round(time.perf_counter() - t0, 2)},
            **inherited_prompts(src),  # `quantize` of this export calibrates on the model's own prompts
        )
        write_manifest(tmp, manifest)
    return manifest
