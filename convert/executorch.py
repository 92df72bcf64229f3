"""``convert --target executorch``: one ``.pte`` per component, fully delegated to XNNPACK, parity-gated.

Route per component: ``torch.export.export`` → our decompositions (below) → constant propagation →
optional PT2E quantization (``quantize/executorch.py``: XNNPACK's quantizer, calibrated on the model's
own prompts) → ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` → ``.to_executorch()``.

Why the decompositions: XNNPACK has no kernel for GroupNorm, LayerNorm, nearest upsampling, ``split``,
nor for the masking ops of PyTorch's ``scaled_dot_product_attention`` decomposition; left alone they run
on ExecuTorch's portable kernels and cut the graph into dozens of delegate islands (55 for the ``tiny``
UNet). Each is rewritten here into ops XNNPACK takes, with the same arithmetic:

- GroupNorm / LayerNorm: ``view`` to 4-D, two ``mean`` over the two innermost dims (XNNPACK's global
  average pooling), ``rsqrt``, ``mul``/``add`` (the same two-pass mean/variance as PyTorch's kernel);
- nearest upsampling by integer factors: a broadcast multiply by ones on a 6-D view (exact);
- ``split``: slices; division by a Python number: a multiply by its inverse;
- attention: an explicit ``bmm`` → ``softmax`` → ``bmm`` processor for diffusers' ``Attention`` (the
  UNet's and the VAE's), the eager implementation for CLIP's.

What stays outside XNNPACK is counted: the manifest records, per component, the ops delegated and the
ops left on portable kernels and the share of FLOPs that runs in XNNPACK (``flop_share``; matrix ops
count 2·MACs, every other op one per output element). The text encoder's token and position embeddings
(gathers) have no XNNPACK kernel and stay portable.

Layout: one program per component, each with one method ``forward`` — an app loads each
(``Module.load`` in Kotlin, ``Module(filePath:)`` in Swift), calls it and can free it before the next,
so peak memory is one component's, and a tiny decoder swaps in by file.

Parity: every component and the whole one-step image through ExecuTorch's own runtime
(``executorch.runtime``) against the PyTorch fp32 reference; a missed gate raises before the folder is
renamed into place, so nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import ClassVar

from ..artifacts import atomic_dir, make_manifest, read_manifest, sha256_tree, write_manifest
from ..errors import InputError, MissingDependencyError
from ..pipeline import quiet_libraries
from ..quantize.schemes import QUANTIZABLE_COMPONENTS, EtScheme, get_scheme
from ..runtime import executorch as etrt
from ..runtime.base import ONE_STEP
from ..runtime.executorch import EtPrecision
from ..runtime.sampler import sample
from ..validators import choice, optional_choice, prompt_file
from . import reference
from .config import _CAL_HELP, _QC_HELP, ConvertConfig, _components, opt, target
from .onnx import UNET_TIMESTEP, _OneStepUnet, components_for, copy_pipeline_files

log = logging.getLogger(__name__)

ROUTE = "torch.export -> XNNPACK decompositions -> [PT2E] -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte"
PRECISION_MIN_PSNR = {"fp32": 60.0, "fp16": 35.0}  # as parity.DEFAULT_MIN_PSNR
_MATRIX_OPS = ("convolution", "linear", "addmm", "mm", "bmm")


@dataclasses.dataclass
class ExecuTorchOptions:
    """ExecuTorch programs (one ``model.pte`` per component) for Android and iOS apps, XNNPACK on the CPU.

    The float precision of the graphs and an optional PT2E scheme of ``quantize/schemes.py`` (XNNPACK's
    quantizer; calibrated ones take ``calibration_prompts``)."""

    target: ClassVar[str] = "executorch"
    module: ClassVar[str] = "instaflow_edge.convert.executorch"
    precision: EtPrecision = opt(EtPrecision.fp32, "Float precision of the graphs: fp32, or fp16 (weights and "
                                 "activations in half; XNNPACK runs it natively on ARM phones).")
    quantize: EtScheme | None = opt(None, "A PT2E scheme for XNNPACK (quantize/schemes.py).")
    calibration_prompts: str | None = opt(None, _CAL_HELP)
    quantize_components: list[str] | None = opt(None, _QC_HELP, "--quantize-component")

    def __post_init__(self) -> None:
        self.precision = choice("precision", self.precision, EtPrecision)
        self.quantize = optional_choice("quantize", self.quantize, EtScheme)
        self.quantize_components = _components("quantize_components", self.quantize_components)
        if self.quantize is not None and self.precision is not EtPrecision.fp32:
            raise InputError(f"--quantize {self.quantize.value} quantizes an fp32 graph", "drop --precision fp16")
        if self.calibration_prompts and (self.quantize is None or not get_scheme("executorch", self.quantize).calibrated):
            raise InputError("--calibration-prompts applies only to a calibrated --quantize (int8)", "drop it or add --quantize int8")
        if self.quantize_components and self.quantize is None:
            raise InputError("--quantize-component needs --quantize", "add --quantize int8, or drop --quantize-component")

    def check(self, cfg: ConvertConfig) -> None:
        if cfg.fused:
            raise InputError("--fused does not apply to --target executorch (an app runs the three programs)", "drop --fused")


@contextlib.contextmanager
def root_logging_kept():
    """Inside, the root logger keeps its handlers: ExecuTorch's XNNPACK partitioner calls
    ``logging.basicConfig`` at import and logs through ``logging.debug``, either of which installs a root
    handler that would print every line of ours twice. A NullHandler holds the place; on exit the root's
    handlers and level are put back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if not handlers:
        root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextlib.contextmanager
def shared_provenance():
    """Inside, torch.fx's node provenance (``meta["from_node"]``) is shared, not deep-copied, as each pass
    makes new nodes: every pass of the lowering deep-copies the whole chain of earlier passes for every
    node, which grows with the pass count and took ~16% of a tiny export's time. The chain is read-only
    provenance (its records are never mutated), so sharing it gives byte-identical programs (checked:
    the four .pte files of ``tiny``). Outside torch versions whose NodeSource has this shape, a no-op."""
    import torch.fx.traceback as fxtb

    cls = getattr(fxtb, "NodeSource", None)
    original = getattr(cls, "__init__", None)
    if original is None or "from_node" not in getattr(cls, "__annotations__", {}):
        yield
        return

    def init(self, node, pass_name="", action=None):
        chain = node.meta.get("from_node") if node is not None else None
        if chain is None:
            return original(self, node, pass_name, action)
        node.meta["from_node"] = []  # nothing to deep-copy; the chain is put back and shared below
        try:
            original(self, node, pass_name, action)
        finally:
            node.meta["from_node"] = chain
        self.from_node = list(chain)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


def require_executorch_export():
    """Import ExecuTorch's exporter (quietly: torchao's optional kernels, its partitioner's logging)."""
    try:
        with quiet_libraries(), root_logging_kept():
            import executorch.exir  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("ExecuTorch is not installed", "pip install -c constraints.txt -e '.[executorch]'") from e


# ----------------------------------------------------------------------------------------------------------
# the rewrites: every op of the three components in a form XNNPACK lowers


def _norm4(xs, eps):
    """(x - mean) · rsqrt(var + eps) over dims 2, 3 of a 4-D view, with the mean and rstd."""
    import torch

    m = xs.mean(dim=(2, 3), keepdim=True)
    d = xs - m
    r = torch.rsqrt((d * d).mean(dim=(2, 3), keepdim=True) + eps)
    return d * r, m, r


def _native_group_norm(x, weight, bias, n, c, hxw, groups, eps):
    y, m, r = _norm4(x.reshape(n, groups, c // groups, -1), eps)
    y = y.reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y, m.reshape(n, groups), r.reshape(n, groups)


def _group_norm(x, groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return _native_group_norm(x, weight, bias, x.shape[0], x.shape[1], 0, groups, eps)[0]


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    k = 1
    for d in normalized_shape:
        k *= int(d)
    lead = x.shape[: x.dim() - len(normalized_shape)]
    y, m, r = _norm4(x.reshape(1, -1, 1, k), eps)
    y = y.reshape(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    stat = (*lead, *([1] * len(normalized_shape)))
    return y, m.reshape(stat), r.reshape(stat)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return _native_layer_norm(x, normalized_shape, weight, bias, eps)[0]


def _upsample_nearest2d(x, output_size, scale_factors):
    import torch

    n, c, h, w = x.shape
    if output_size is not None:
        sh, sw = int(output_size[0]) // h, int(output_size[1]) // w
        if sh * h != int(output_size[0]) or sw * w != int(output_size[1]):
            raise NotImplementedError("nearest upsampling by a non-integer factor")
    else:
        sh, sw = int(scale_factors[0]), int(scale_factors[1])
        if sh != scale_factors[0] or sw != scale_factors[1]:
            raise NotImplementedError("nearest upsampling by a non-integer factor")
    ones = torch.ones(1, 1, 1, sh, 1, sw, dtype=x.dtype)
    return (x.reshape(n, c, h, 1, w, 1) * ones).reshape(n, c, h * sh, w * sw)


def _split_with_sizes(x, sizes, dim=0):
    out, start = [], 0
    for s in sizes:
        out.append(x.narrow(dim, start, int(s)))
        start += int(s)
    return out


def _split(x, size, dim=0):
    n = x.shape[dim]
    return _split_with_sizes(x, [min(size, n - i) for i in range(0, n, size)], dim)


def _div(x, other):
    import torch

    if isinstance(other, (int, float)) and not isinstance(other, bool) and other != 0:
        return x * (1.0 / other)
    return torch.mul(x, torch.reciprocal(other)) if not isinstance(other, (int, float)) else x / other


def decompositions() -> dict:
    """The decomposition table run after ``torch.export``: the ops above in XNNPACK's terms."""
    import torch

    aten = torch.ops.aten
    return {aten.native_group_norm.default: _native_group_norm, aten.group_norm.default: _group_norm,
            aten.native_layer_norm.default: _native_layer_norm, aten.layer_norm.default: _layer_norm,
            aten.upsample_nearest2d.vec: _upsample_nearest2d, aten.split_with_sizes.default: _split_with_sizes,
            aten.split.Tensor: _split, aten.div.Tensor: _div}


class ExportAttention:
    """diffusers ``Attention`` as ``bmm`` → ``softmax`` → ``bmm`` (no SDPA, no masks): what XNNPACK runs.
    Self- and cross-attention of the UNet's transformers and the VAE's mid-block attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch

        if attention_mask is not None:
            raise NotImplementedError("attention masks are not exported to ExecuTorch")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = torch.bmm(q * attn.scale, k.transpose(1, 2)).softmax(dim=-1)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def prepare_for_export(pipe) -> None:
    """Swap the attention implementations of ``pipe``'s modules for the exportable ones (same math)."""
    for m in (pipe.unet, pipe.vae):
        if hasattr(m, "set_attn_processor") and getattr(m, "attn_processors", None):
            m.set_attn_processor(ExportAttention())
    te = pipe.text_encoder
    if hasattr(te, "set_attn_implementation"):
        te.set_attn_implementation("eager")
    else:
        te.config._attn_implementation = "eager"


def exported(module, inputs, for_quantizer: bool = False):
    """``torch.export`` of ``module`` on ``inputs`` with the decompositions and constants folded; with
    ``for_quantizer``, only ``split`` becomes slices (what a PT2E quantizer then annotates: the norms stay
    whole, so their arithmetic stays float, and each slice keeps its input's quantization)."""
    import torch
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    table = decompositions()
    if for_quantizer:
        aten = torch.ops.aten
        table = {k: v for k, v in table.items() if k in (aten.split.Tensor, aten.split_with_sizes.default)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(module, tuple(inputs), strict=False).run_decompositions(table)
    if for_quantizer:
        return ep
    # quantize/dequantize nodes stay (folding a weight's dequantize would store it in float again)
    from executorch.exir.passes.constant_prop_pass import get_default_skip_targets_no_quant

    quant = {n.target for n in ep.graph.nodes if n.op == "call_function"
             and str(getattr(n.target, "namespace", "")) in ("quantized_decomposed", "torchao")}
    return distinct_cat_inputs(constant_prop_pass(ep, custom_skip_targets=set(get_default_skip_targets_no_quant()) | quant))


def distinct_cat_inputs(ep):
    """``ep`` with every ``cat`` that repeats a tensor given ``x·1`` in place of each repeat: XNNPACK
    concatenates two or more *distinct* tensors, and a UNet pruned of its mid-block concatenates the last
    down block's output with itself (it is its own skip connection). Left as is, that ``cat`` runs outside
    XNNPACK and splits the UNet into two delegates, and with int8 the split is where XNNPACK's
    channels-last pass fails (a partition output that is a dequantize). The multiply is exact."""
    import torch

    cat, mul = torch.ops.aten.cat.default, torch.ops.aten.mul.Tensor
    graph = ep.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not cat or not isinstance(node.args[0], (list, tuple)):
            continue
        tensors, seen = list(node.args[0]), set()
        for i, t in enumerate(tensors):
            if isinstance(t, torch.fx.Node) and t in seen:
                with graph.inserting_before(node):
                    copy = graph.call_function(mul, (t, 1.0))
                copy.meta.update({k: t.meta[k] for k in ("val", "tensor_meta") if k in t.meta})
                tensors[i] = copy
                changed = True
            seen.add(t)
        node.args = (tensors, *node.args[1:])
    if changed:
        graph.lint()
        ep.graph_module.recompile()
    return ep


# ----------------------------------------------------------------------------------------------------------
# lowering and what it delegated


def _op_name(node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split("::")[-1]


def node_flops(node) -> int:
    """FLOPs of one graph node: 2·MACs for convolutions and matrix products, one per output element for
    every other op (reductions: per input element)."""
    import math

    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    shapes = [tuple(v.shape) for v in vals if hasattr(v, "shape")]
    if not shapes:
        return 0
    out = math.prod(shapes[0])
    op = _op_name(node).split(".")[0]
    args = [a for a in node.args if hasattr(a, "meta")]
    if op == "convolution" and len(args) >= 2:
        wshape = tuple(args[1].meta["val"].shape)  # (Cout, Cin/groups, kh, kw)
        return 2 * out * math.prod(wshape[1:])
    if op in ("linear", "addmm", "mm", "bmm") and args:
        a = args[0] if op != "addmm" else args[1]
        return 2 * out * int(a.meta["val"].shape[-1])
    if op in ("mean", "sum", "amax", "var") and args:
        return math.prod(tuple(args[0].meta["val"].shape))
    return out


def delegation(edge) -> dict:
    """Per lowered program: the ops inside XNNPACK delegates and those left on portable kernels, and the
    share of FLOPs that runs in XNNPACK."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = edge.exported_program().graph_module
    inside, outside = Counter(), Counter()
    fin = fout = 0
    skip = {"getitem", "executorch_call_delegate", "alias", "alias_copy"}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name in skip or name.startswith("sym_") or name == "_assert_tensor_metadata":
            if name == "executorch_call_delegate":
                lowered = getattr(gm, node.args[0].target)
                assert isinstance(lowered, LoweredBackendModule)
                for inner in lowered.original_module.graph_module.graph.nodes:
                    if inner.op == "call_function" and _op_name(inner) not in skip:
                        inside[_op_name(inner)] += 1
                        fin += node_flops(inner)
            continue
        outside[name] += 1
        fout += node_flops(node)
    delegates = sum(1 for n in gm.graph.nodes if n.op == "call_function" and _op_name(n) == "executorch_call_delegate")
    total = fin + fout
    return {"delegates": delegates, "flops": total, "flop_share": round(fin / total, 6) if total else 1.0,
            "delegated_ops": dict(sorted(inside.items())), "portable_ops": dict(sorted(outside.items()))}


def lower(ep):
    """An exported program lowered to XNNPACK: ``(ExecuTorch program manager, delegation record)``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with root_logging_kept(), warnings.catch_warnings(), shared_provenance():  # the LeafSpec deprecation, once per pass
        warnings.simplefilter("ignore", FutureWarning)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        record = delegation(edge)
        return edge.to_executorch(), record


def _one_step_unet(pipe):
    """The one-step UNet graph the ONNX export ships (``convert/onnx.py: _OneStepUnet``): (sample,
    timestep, text) → x + (t/1000)·v(x, t), x = r(t)·sample; text to image feeds t = 1000 (``z + v(z,
    1000)``), image to image t = 1000·strength. The timestep embedding's few ops run inside XNNPACK too
    (measured on tiny: 99.9999% of FLOPs delegated, one delegate; an expand and a dim-order copy portable)."""
    return _OneStepUnet.build(pipe).eval()


def _unet_inputs(xs: tuple) -> tuple:
    """The reference's (noise, hidden) for the one-step UNet with the text-to-image timestep between."""
    import torch

    noise, hidden = xs
    return (noise, torch.full((noise.shape[0],), 1000.0), hidden)


def component_module(pipe, name: str):
    """Component ``name`` of ``pipe`` as exported to ExecuTorch (batch 1)."""
    from ..components import COMPONENTS

    return _one_step_unet(pipe) if name == "unet" else COMPONENTS[name].module(pipe)


class _Half:
    """A component computed in float16 with the fp32 inputs and outputs of the others (ids stay int64)."""

    def __new__(cls, module):
        import torch

        class Half(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner.half()

            def forward(self, *xs):
                xs = [x.half() if x.is_floating_point() else x for x in xs]
                return self.inner(*xs).float()

        return Half(module)


def calibration_inputs(pipe, name: str, prompts: list[str], latent_shape) -> list[tuple]:
    """One input tuple per prompt for component ``name``: the fp32 PyTorch pipeline run upstream of it
    (seeded noise, seed i for prompt i), as ``generate`` would feed the program."""
    import torch

    from ..generator import OneStepGenerator, make_noise

    gen = OneStepGenerator.from_pipeline(pipe)
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = pipe.tokenize([p])
            if name == "text_encoder":
                out.append((ids,))
                continue
            hidden = gen.encode(ids)
            noise = make_noise([i], latent_shape)
            if name in ("unet", "unet_velocity"):
                out.append((noise, torch.full((1,), 1000.0), hidden))
            else:
                out.append(((gen.denoise(noise, hidden) / pipe.scaling_factor).float(),))
    return out


def gate_for(precision: str, scheme: str | None) -> float:
    g = PRECISION_MIN_PSNR[precision]
    return min(g, get_scheme("executorch", scheme).gate_db) if scheme else g


@target("executorch")
def export_executorch(cfg: ConvertConfig) -> dict:
    """Export ``cfg.model`` to an ExecuTorch folder at ``cfg.output``; returns the manifest (``parity``,
    ``gates`` and ``executorch.delegation`` are the tables to show). Every missed gate is raised at once."""
    with root_logging_kept():
        return _export(cfg)


def _export(cfg: ConvertConfig) -> dict:

    from ..components import COMPONENTS
    from ..parity import check_all, check_conditioning, compare
    from ..quantize.onnx import CALIBRATION_PROMPTS

    require_executorch_export()
    etrt.require_executorch()
    src = reference.check_source(cfg)  # prompts file, output vs inputs, model folder: before any load
    from importlib.metadata import version

    t0 = time.perf_counter()
    opts = cfg.options
    precision = EtPrecision(opts.precision)
    scheme = opts.quantize.value if opts.quantize else None
    record = get_scheme("executorch", scheme) if scheme else None
    pipe, sizes = reference.load_source(src, cfg.allow_pickle, cfg.height, cfg.width)
    names = components_for(pipe, False)
    wanted = opts.quantize_components or (record.default_components if record else ())
    quantized = [n for n in names if scheme and (n in wanted or (n == "unet_velocity" and "unet" in wanted))]
    source_manifest = read_manifest(src) or {}
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    timings: dict[str, float] = {}
    with atomic_dir(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts)) as tmp:
        ref = reference.compute(pipe, sizes, names, COMPONENTS.__getitem__, fixed_size=True)
        prepare_for_export(pipe)  # after the reference: parity then checks the rewrites too
        for name in names:
            (tmp / name).mkdir()
        copy_pipeline_files(src, tmp, names)
        shutil.copy(Path(__file__).parent / "web_assets" / "torch_randn.mjs", tmp / "torch_randn.mjs")
        records: dict[str, dict] = {}
        for name in names:
            t = time.perf_counter()
            module = component_module(pipe, name)
            inputs = _unet_inputs(ref.components[name][0]) if name == "unet" else ref.components[name][0]
            if precision is EtPrecision.fp16:
                module = _Half(module)
            log.info(f"{name}: torch.export and decompositions")
            if name in quantized:  # quantized as traced (the norms whole, so their arithmetic stays float)
                feeds = calibration_inputs(pipe, name, prompts, ref.facts.latent_shape) if record.calibrated else []
                log.info(f"{name}: PT2E {scheme}" + (f", calibrated on {len(feeds)} prompts" if feeds else ""))
                module = record.apply(exported(module, inputs, for_quantizer=True).module(), tuple(inputs), feeds)
            ep = exported(module, inputs)
            log.info(f"{name}: lowering to XNNPACK")
            program, records[name] = lower(ep)
            path = tmp / name / etrt.PROGRAM_FILE
            with open(path, "wb") as f:
                program.write_to_file(f)
            del program, ep, module
            gc.collect()
            timings[f"export_{name}"] = round(time.perf_counter() - t, 2)
            share = records[name]["flop_share"]
            log.info(f"{name}: {records[name]['delegates']} XNNPACK delegate(s), {share:.2%} of FLOPs delegated")
        del pipe
        gc.collect()
        block = {**ref.facts.block(), "route": ROUTE, "precision": precision.value, "quantize": scheme,
                 "executorch_version": version("executorch"), "method": etrt.METHOD, "file": etrt.PROGRAM_FILE,
                 "unet_timestep": UNET_TIMESTEP,
                 "batch": 1, "delegation": records,
                 "noise": "torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(seed)), float32 "
                          "(torch_randn.mjs: the same stream, mt19937 and torch's Box-Muller, in 150 lines to port)",
                 "same_image_as": "instaflow-edge generate EXPORT PROMPT --seed SEED --backend executorch"}
        log.info(f"parity vs PyTorch ({precision.value}{'+' + scheme if scheme else ''}): {', '.join(names)}, end to end")
        progs = etrt.load_programs(tmp, names, ref.facts)
        rows = [compare(name, ref.output(name), progs[name](*[x.numpy() for x in (
            _unet_inputs(ref.components[name][0]) if name == "unet" else ref.components[name][0])])) for name in names]
        cond = ref.conditioning(lambda x, unet=progs["unet"]: unet(*[t.numpy() for t in _unet_inputs(x)]))
        calls = etrt.program_calls({n: progs[n] for n in ONE_STEP})
        rows.append(compare("end_to_end", ref.image, sample(calls, ref.ids, ref.noise, ref.facts.scaling_factor, 1)))
        del progs, calls
        gates = {n: cfg.min_psnr if cfg.min_psnr is not None else gate_for(precision.value, scheme if n in quantized else None)
                 for n in names}
        gates["end_to_end"] = cfg.min_psnr if cfg.min_psnr is not None else min(gates.values())
        check_all(rows, gates, fix="use --precision fp32, no --quantize, or lower the gate explicitly with --min-psnr")
        check_conditioning(cond)
        manifest = make_manifest(
            etrt.KIND, cfg,
            source={"model": str(src), "content_sha256": source_manifest.get("content_sha256") or sha256_tree(src)},
            executorch=block,
            quantize={"scheme": scheme, "engine": "pt2e-xnnpack" if scheme else None, "components": quantized,
                      "calibration_prompts": len(prompts) if record and record.calibrated else 0},
            gates=gates, parity=[p.as_dict() for p in rows], conditioning=cond.as_dict(),
            sizes={n: (tmp / n / etrt.PROGRAM_FILE).stat().st_size for n in names},
            seconds={**timings, "total": round(time.perf_counter() - t0, 2)},
        )
        write_manifest(tmp, manifest)
    return manifest


__all__ = ["ExecuTorchOptions", "export_executorch", "QUANTIZABLE_COMPONENTS"]
