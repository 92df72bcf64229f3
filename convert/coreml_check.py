"""Validation of a Core ML package without a Mac: everything that can be read without predicting.

The spec loads; inputs/outputs have the names, shapes and dtypes ``specs.py`` declares; the op census;
size and effective bits per weight; and the package's weights, decompressed by coremltools, equal the
compressed PyTorch module's weights (so the PSNR measured in PyTorch is the package's PSNR, up to the
fp16 compute that ``--precision fp16`` adds and that is measured separately).
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

from ..errors import ParityError
from ..parity import ShapeError

# Core ML feature types we declare: every tensor crosses the boundary as float32. Token ids too: Apple's
# Swift ``TextEncoder`` feeds ``MLShapedArray<Float32>`` ids (exact below 2^24, CLIP has 49,408).
COREML_DTYPE = {"int64": "FLOAT32", "float32": "FLOAT32"}
_SPATIAL = ("latent_height", "latent_width", "height", "width")
_SUFFIX = re.compile(r"(_to_fp16|_cast_fp16|_to_fp32|_cast_fp32|_palettized|_quantized|_sparsified|_decompressed)+$")


def load(path: str | Path):
    """The package as an MLModel, spec only (nothing is compiled, so this works on Linux)."""
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True)


def _feature(f) -> dict:
    from coremltools.proto import FeatureTypes_pb2 as ft

    t = f.type.multiArrayType
    return {
        "name": f.name,
        "shape": [int(s) for s in t.shape],
        "dtype": ft.ArrayFeatureType.ArrayDataType.Name(t.dataType),
        "enumerated": [[int(s) for s in e.shape] for e in t.enumeratedShapes.shapes],
        "description": f.shortDescription,
    }


def io(ml) -> dict:
    d = ml.get_spec().description
    return {"inputs": [_feature(f) for f in d.input], "outputs": [_feature(f) for f in d.output]}


def check_io(component: str, ml, spec, shapes: list) -> dict:
    """Raise ShapeError unless the package's I/O match ``spec`` (a ``ComponentSpec``) at ``shapes``
    (one ``Sizes`` per accepted image size, the default first)."""
    got = io(ml)
    for side, declared in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        names = [f["name"] for f in got[side]]
        want = [t.name for t in declared]
        if names != want:
            raise ShapeError(f"{component}: Core ML {side} {names} ≠ declared {want}", "the export is broken; re-export")
        for f, t in zip(got[side], declared):
            if f["dtype"] != COREML_DTYPE[t.dtype]:
                raise ShapeError(f"{component}: {f['name']} is {f['dtype']}, declared {COREML_DTYPE[t.dtype]}",
                                 "the export is broken; re-export")
            default = list(shapes[0].shape(t))
            if f["shape"] and f["shape"] != default:
                raise ShapeError(f"{component}: {f['name']} has shape {f['shape']}, declared {default}",
                                 "the export is broken; re-export")
            if side == "inputs" and len(shapes) > 1 and any(d in _SPATIAL for d in t.dims):
                allowed = {tuple(s.shape(t)) for s in shapes}
                enum = {tuple(e) for e in f["enumerated"]}
                if enum != allowed:
                    raise ShapeError(f"{component}: {f['name']} accepts {sorted(enum)}, expected {sorted(allowed)}",
                                     "the export is broken; re-export")
    return got


def op_census(ml) -> dict[str, int]:
    spec = ml.get_spec()
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    c = collections.Counter(op.type for op in block.operations)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def output_tail(ml, output: str | None = None) -> list[dict]:
    """The elementwise ops (and casts) that compute ``output`` (default: the first output), walked back
    from it to the first other op, each with its result dtype: shows where an fp16 program returns to
    fp32 (the Apple Unet keeps its ε̂ arithmetic fp32)."""
    from coremltools.proto import MIL_pb2

    spec = ml.get_spec()
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    producer = {o.name: op for op in ops for o in op.outputs}
    name = output or spec.description.output[0].name
    out, stack, seen = [], [name], set()
    while stack:
        op = producer.get(stack.pop())
        if op is None or id(op) in seen or op.type not in ("add", "sub", "mul", "real_div", "cast"):
            continue
        seen.add(id(op))
        out.append({"op": op.type, "dtype": MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)})
        stack.extend(a.name for arg in op.inputs.values() for a in arg.arguments if a.name)
    return out


def sizes(path: str | Path, params: int) -> dict:
    """Package bytes, weight-file bytes, and effective bits per weight (weight file bits ÷ the
    component's parameter count: LUTs, masks, scales and uncompressed tensors included)."""
    path = Path(path)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    wfile = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    wbytes = wfile.stat().st_size if wfile.is_file() else 0
    return {"size_bytes": total, "weight_bytes": wbytes, "params": params,
            "bits_per_weight": round(8 * wbytes / params, 3) if params else None}


def package_weights(ml) -> dict[str, "object"]:
    """Every const weight of the package, decompressed by coremltools, by Core ML name."""
    import coremltools as ct
    import numpy as np

    dense = ct.optimize.coreml.decompress_weights(ml)
    out = {}
    # walk the program ourselves: get_weights_metadata trips over list-valued consts that enumerated
    # input shapes bring (coremltools 9.0)
    for fn in dense._mil_program.functions.values():
        for op in fn.operations:
            if op.op_type == "const":
                val = op.outputs[0].val
                if isinstance(val, np.ndarray) and val.size > 0:
                    out[op.name] = val
    return out


def check_weights(component: str, ml, module, compressed: list[str], rtol: float = 2e-3) -> dict:
    """Match the package's decompressed weights with ``module``'s parameters (by the name coremltools
    derives from the PyTorch path). Every compressed layer (``compressed``: module names) must be
    found, with max |Δ| ≤ ``rtol``·max|w| (fp16 storage rounds the PyTorch values). Weights the
    converter's sparse encoding drops (|w| ≤ fp16 eps in a pruned layer) are counted, not failed."""
    import numpy as np

    params = {re.sub(r"[^0-9A-Za-z]", "_", n): p for n, p in module.named_parameters()}
    want = {re.sub(r"[^0-9A-Za-z]", "_", n + ".weight") for n in compressed}
    found: dict[str, float] = {}
    zeroed = 0
    for name, val in package_weights(ml).items():
        key = _SUFFIX.sub("", name)
        key = key[len("inner_"):] if key.startswith("inner_") and key not in params else key  # the float-ids wrapper
        p = params.get(key)
        if p is None or tuple(p.shape) != tuple(val.shape):
            continue
        w = p.detach().float().cpu().numpy()
        v = val.astype(np.float32)
        # coremltools stores a pruned layer with threshold fp16-eps: a surviving |w| < 9.8e-4 becomes a zero
        dropped = (v == 0) & (w != 0) & (np.abs(w) <= np.finfo(np.float16).eps)
        zeroed += int(dropped.sum())
        err = float(np.where(dropped, 0.0, np.abs(w - v)).max()) / max(float(np.abs(w).max()), 1e-12)
        found[key] = max(err, found.get(key, 0.0))
    missing = sorted(want - set(found))
    if missing:
        raise ParityError(f"{component}: {len(missing)} compressed layer(s) not found in the package (e.g. {missing[0]})",
                          "the export is broken; re-export")
    bad = {k: e for k, e in found.items() if e > rtol}
    if bad:
        k = max(bad, key=bad.get)
        raise ParityError(f"{component}: package weight {k} differs from the PyTorch weight by {bad[k]:.3g}·max|w|",
                          "the export is broken; re-export")
    worst = max(found.values(), default=0.0)
    return {"matched": len(found), "compressed_layers": len(want), "max_rel_error": None if math.isnan(worst) else round(worst, 6),
            "zeroed_by_converter": zeroed}


# ---------------------------------------------------------------------------------------------------
# the report


def report_rows(components: dict, end_to_end: dict | None, scheme: str | None) -> list[dict]:
    rows = []
    for name, c in components.items():
        rows.append({
            "component": name, "scheme": scheme or "none", "size_mb": round(c["size_bytes"] / 1e6, 3),
            "bits_per_weight": c["bits_per_weight"], "psnr_vs_fp32": c["parity"]["psnr"],
            "psnr_compression_only": (c.get("parity_compression_fp32") or {}).get("psnr"),
        })
    if end_to_end is not None:
        size = sum(c["size_bytes"] for n, c in components.items() if n not in ("generator", "vae_encoder"))
        bits = sum(c["weight_bytes"] * 8 for n, c in components.items() if n not in ("generator", "vae_encoder"))
        params = sum(c["params"] for n, c in components.items() if n not in ("generator", "vae_encoder"))
        rows.append({"component": "image (end to end)", "scheme": scheme or "none", "size_mb": round(size / 1e6, 3),
                     "bits_per_weight": round(bits / params, 3), "psnr_vs_fp32": end_to_end["psnr"],
                     "psnr_compression_only": None})
    return rows


def format_report(rows: list[dict], gate: float | None = None) -> str:
    def f(v, spec=".2f"):
        return "inf" if v is None and spec == "psnr" else ("-" if v is None else format(v, ".2f" if spec == "psnr" else spec))

    head = f"{'component':<20} {'scheme':<22} {'size MB':>9} {'bits/w':>7} {'PSNR vs fp32':>13} {'(compression only)':>19}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['component']:<20} {r['scheme']:<22} {r['size_mb']:>9.3f} {f(r['bits_per_weight']):>7} "
                     f"{f(r['psnr_vs_fp32'], 'psnr'):>13} {f(r['psnr_compression_only']):>19}")
    if gate is not None:
        lines.append(f"gate: PSNR ≥ {gate:.1f} dB (shipped vs fp32 PyTorch; inf = identical)")
    return "\n".join(lines)
