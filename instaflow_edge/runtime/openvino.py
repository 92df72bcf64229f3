"""``generate --backend openvino``: run an OpenVINO export folder (``convert --target openvino``).

The folder has the ONNX export's layout with OpenVINO IR in place of ``model.onnx``::

    text_encoder/model.xml+.bin  unet/model.xml+.bin  vae_decoder/model.xml+.bin  [unet_velocity/]
    tokenizer/  scheduler/  model_index.json  manifest.json   (manifest["openvino"]: the runtime facts)

Each component is compiled for the CPU with the export's precision (``manifest["openvino"]["precision"]``:
``auto`` leaves OpenVINO's device default, which is bf16 on CPUs with avx512_bf16/AMX; ``f32``/``bf16``/
``f16`` set ``INFERENCE_PRECISION_HINT``) and wrapped as an object with onnxruntime's session API
(``run(None, feed)``, ``get_inputs()``, ``get_outputs()``), so the neutral sampler and the spec checks
of ``runtime/sampler.py`` run it unchanged. This module stays light at import:
openvino loads inside the functions.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, MissingDependencyError, ModelError
from .base import ONE_STEP, Export, ExportFacts, RuntimeFormat
from .sampler import check_io, check_sampling, edit_calls, session_calls, tokenizer_for

KIND = "openvino-export"
IR_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"


class OvPrecision(str, enum.Enum):
    """``convert --target openvino --precision``: the CPU plugin's inference precision."""

    auto = "auto"  # the device default (bf16 where the CPU has bf16 units, else f32); recorded as run
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"  # weights stored f16; computes f16 where the CPU can (else the plugin picks, recorded)


@dataclasses.dataclass(frozen=True)
class _Port:
    name: str
    shape: tuple  # only its length (the rank) is read


class Session:
    """One compiled OpenVINO model with the slice of onnxruntime's ``InferenceSession`` API we use."""

    def __init__(self, compiled, path: Path):
        self.compiled = compiled
        self.path = path
        self._request = compiled.create_infer_request()
        self._inputs = [_Port(port_name(p), (None,) * p.get_partial_shape().rank.get_length()) for p in compiled.inputs]
        self._outputs = [_Port(port_name(p), (None,) * p.get_partial_shape().rank.get_length()) for p in compiled.outputs]

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    @property
    def precision(self) -> str:
        """The precision the plugin runs this model in (``f32``, ``bf16``, ``f16``)."""
        return type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, output_names, feed: dict) -> list:
        import numpy as np

        res = self._request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()}, share_inputs=False)
        return [np.array(res[o]) for o in self.compiled.outputs]


def port_name(port) -> str:
    """The graph's own name of a port (a converted ONNX graph's port also carries internal tensor names
    such as ``/text_encoder/Reshape_output_0``)."""
    return min(port.get_names(), key=lambda n: (n.startswith("/"), len(n), n))


def type_name(t) -> str:
    """``<Type: 'bfloat16'>`` → ``bf16`` (the names of the precision hint)."""
    import openvino as ov

    return {ov.Type.f32: "f32", ov.Type.bf16: "bf16", ov.Type.f16: "f16"}.get(t, str(t))


def require_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingDependencyError("OpenVINO is not installed", "pip install -c constraints.txt -e '.[openvino]'") from e
    return ov


def compile_config(precision: OvPrecision | str, threads: int | None = None) -> dict:
    """The CPU plugin properties of ``precision``; ``threads`` pins ``INFERENCE_NUM_THREADS`` (one stream)."""
    precision = OvPrecision(precision)
    cfg: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not OvPrecision.auto:
        cfg["INFERENCE_PRECISION_HINT"] = precision.value
    if threads:
        cfg.update(INFERENCE_NUM_THREADS=int(threads), NUM_STREAMS=1)
    return cfg


def compile_model(path: Path, precision: OvPrecision | str = OvPrecision.auto, threads: int | None = None,
                  core=None) -> Session:
    """Read and compile an IR (or ONNX) file for the CPU; a corrupt or missing file is a ModelError."""
    ov = require_openvino()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} is missing", "re-export the model (instaflow-edge convert --target openvino)")
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise ModelError(f"{path.with_suffix('.bin')} is missing", "re-export the model (instaflow-edge convert --target openvino)")
    if path.suffix == ".xml":
        check_weights_file(path)
    core = core or ov.Core()
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", compile_config(precision, threads))
    except RuntimeError as e:
        raise ModelError(f"{path} is not a model OpenVINO can load ({openvino_reason(e)})", "re-export the model") from e
    return Session(compiled, path)


_WEIGHTS_RANGE = re.compile(rb'offset="(\d+)"\s+size="(\d+)"')
_IR_NET = re.compile(rb'<net\b[^>]*\bversion="\d+"')


def check_weights_file(xml: Path) -> None:
    """The ``.bin`` beside ``xml`` holds every byte range the IR's constants name; a truncated one is a
    one-line error naming the ``.bin`` (OpenVINO itself says "Incorrect weights in bin file!")."""
    text = xml.read_bytes()
    if not _IR_NET.search(text[:4096]):  # not IR: OpenVINO would try its other frontends, which log in C++
        raise ModelError(f"{xml} is not a model OpenVINO can load (no <net … version=…> IR header)",
                         "re-export the model (instaflow-edge convert --target openvino)")
    need = max((int(o) + int(n) for o, n in _WEIGHTS_RANGE.findall(text)), default=0)
    have = xml.with_suffix(".bin").stat().st_size
    if have < need:
        raise ModelError(f"{xml.with_suffix('.bin')} is truncated ({have:,} bytes; {xml.name} needs {need:,})",
                         "re-export the model (instaflow-edge convert --target openvino)")


def openvino_reason(e: BaseException) -> str:
    """The informative line of an OpenVINO exception: not its "Exception from src/…cpp:84:" header nor
    its "Check '…' failed at …" source location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ") and not re.match(r"^Check '.*' failed at ", ln)]
    return ((useful or lines or [type(e).__name__])[-1])[:200]


def export_facts(folder: Path, manifest: dict | None = None) -> tuple[ExportFacts, dict]:
    """The manifest's ``openvino`` block, checked: the typed runtime facts and the block (its ``precision``
    and ``quantize``). The graphs are compiled for one size (static shapes)."""
    folder = Path(folder)
    m = manifest if manifest is not None else (read_manifest(folder) or {})
    block = m.get("openvino")
    if not isinstance(block, dict) or "latent_shape" not in block:
        raise ModelError(f"{folder} has no OpenVINO export manifest", "pass a folder written by `instaflow-edge convert --target openvino`")
    facts = ExportFacts.from_block(block, folder / "manifest.json", fixed_size=True)
    if block.get("precision") not in [p.value for p in OvPrecision]:
        raise ModelError(f"{folder / 'manifest.json'}: openvino.precision must be one of "
                         f"{', '.join(p.value for p in OvPrecision)}, got {block.get('precision')!r}",
                         "restore the manifest, or re-export the model")
    return facts, block


def compile_components(folder: Path, names, precision: OvPrecision | str, threads: int | None = None) -> dict:
    """Every component of ``names`` compiled (one ``ov.Core``) and checked against its spec."""
    ov = require_openvino()
    core = ov.Core()
    sessions = {}
    for n in names:
        path = Path(folder) / n / IR_FILE
        sessions[n] = compile_model(path, precision, threads, core)
        check_io(sessions[n], n, path)
    return sessions


def _precision_name(p: str) -> str:
    return {"f32": "fp32", "f16": "fp16"}.get(p, p)


def open_openvino(folder: Path, manifest: dict, *, steps: int | None = None, guidance: float = 1.0,
                  threads: int | None = None, device: str = "cpu", precision: OvPrecision | str | None = None) -> Export:
    """Open an OpenVINO export folder: every component compiled for the CPU in the export's precision
    (``precision`` overrides it), with ``threads``."""
    if device not in ("auto", "cpu"):
        raise DeviceError(f"--device {device} is not available with --backend openvino", "use --device cpu")
    facts, block = export_facts(folder, manifest)
    steps = steps or facts.default_steps
    check_sampling(facts, steps, guidance, "openvino")
    names = list(ONE_STEP) + (["unet_velocity"] if steps > 1 else [])
    precision = precision or block["precision"]
    sessions = compile_components(folder, names, precision, threads)
    calls = session_calls(sessions)
    if "vae_encoder" in facts.components:  # image-to-image: compiled on the first edit
        calls.update(edit_calls(lambda: compile_components(folder, ["vae_encoder"], precision, threads)["vae_encoder"],
                                sessions["unet"], block.get("unet_timestep")))
    ran = {n: sessions[n].precision for n in ONE_STEP}
    q = manifest.get("quantize") or {}
    scheme, comps = q.get("scheme"), list(q.get("components") or [])
    # weight-only schemes (int8-weights, int4-weights) still compute in the precision the plugin runs
    computes_int8 = bool(scheme) and scheme.startswith("int8") and not scheme.endswith("-weights")
    stages = {n: ("int8" if computes_int8 and n in comps else _precision_name(ran[n])) for n in ONE_STEP}
    stages["end_to_end"] = stages["generator"] = stages["unet"]
    ov = require_openvino()
    how = (f"OpenVINO {ov.get_version()} CPU, computed in {'/'.join(sorted(set(ran.values())))}"
           + (f"; NNCF {scheme} on {', '.join(comps)}" if scheme else ""))
    sizes = {n: {"bytes": (manifest.get("sizes") or {}).get(n), "basis": "IR .xml + .bin bytes"} for n in ONE_STEP}
    return Export(folder=folder, format="openvino", label=label(manifest), facts=facts,
                  steps=steps, tokenize=tokenizer_for(folder), calls=calls,
                  precision=block["precision"] + (f"+{scheme}" if scheme else ""), ran=how, scheme=scheme,
                  gates={k: float(v) for k, v in (manifest.get("gates") or {}).items()}, sizes=sizes,
                  stage_precisions=stages, max_batch=1, runtime="OpenVINO",
                  details={"ran_precision": "/".join(sorted(set(ran.values()))), "quantize": scheme})


def label(manifest: dict) -> str:
    block = manifest.get("openvino") or {}
    return f"openvino {block.get('quantize') or block.get('precision') or 'auto'}"


FORMAT = RuntimeFormat(
    name="openvino", kind=KIND, open=open_openvino, title="OpenVINO", label=label,
    unavailable=lambda device: None if device in ("auto", "cpu") else "an OpenVINO export runs on the CPU (bench it without --device cuda)",
    description="OpenVINO IR (model.xml + model.bin per component), compiled for the CPU",
)
