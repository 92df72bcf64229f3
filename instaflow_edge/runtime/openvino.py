"""``generate --backend openvino``: run an OpenVINO export folder (``convert --target openvino``).

The folder has the ONNX export's layout with OpenVINO IR in place of ``model.onnx``::

    text_encoder/model.xml+.bin  unet/model.xml+.bin  vae_decoder/model.xml+.bin  [unet_velocity/]
    tokenizer/  scheduler/  model_index.json  manifest.json   (manifest["openvino"]: the runtime facts)

Each component is compiled for the CPU with the export's precision (``manifest["openvino"]["precision"]``:
``auto`` leaves OpenVINO's device default, which is bf16 on CPUs with avx512_bf16/AMX; ``f32``/``bf16``/
``f16`` set ``INFERENCE_PRECISION_HINT``) and wrapped as an object with onnxruntime's session API
(``run(None, feed)``, ``get_inputs()``, ``get_outputs()``), so the sampling code of ``runtime/onnx.py``
(one step, the Euler rule, the spec checks) runs it unchanged. This module stays light at import:
openvino loads inside the functions.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, InputError, MissingDependencyError, ModelError, NumericsError
from ..validators import image_size
from . import onnx as ort_runtime

IR_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
COMPONENTS_ONE_STEP = ("text_encoder", "unet", "vae_decoder")


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
    core = core or ov.Core()
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", compile_config(precision, threads))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{path} is not a model OpenVINO can load ({first})", "re-export the model") from e
    return Session(compiled, path)


def export_meta(folder: Path) -> dict:
    """The manifest's ``openvino`` facts (the ONNX export's runtime facts plus ``precision``), checked."""
    m = read_manifest(folder) or {}
    meta = m.get("openvino")
    if not isinstance(meta, dict) or "latent_shape" not in meta:
        raise ModelError(f"{folder} has no OpenVINO export manifest", "pass a folder written by `instaflow-edge convert --target openvino`")
    ort_runtime.check_meta(meta, Path(folder) / "manifest.json")
    if meta.get("precision") not in [p.value for p in OvPrecision]:
        raise ModelError(f"{Path(folder) / 'manifest.json'}: openvino.precision must be one of "
                         f"{', '.join(p.value for p in OvPrecision)}, got {meta.get('precision')!r}",
                         "restore the manifest, or re-export the model")
    return meta


def open_export(folder: Path, steps: int | None, guidance: float, threads: int | None = None,
                precision: OvPrecision | str | None = None):
    """Check an OpenVINO export folder and compile it: ``(meta, steps, sessions, tokenize)`` as
    ``runtime.onnx.open_export`` returns. ``precision`` None: the export's own."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder", "pass a folder written by `instaflow-edge convert --target openvino`")
    meta = export_meta(folder)
    steps = steps or meta["default_steps"]
    ort_runtime.check_sampling(meta, steps, guidance)
    ov = require_openvino()
    core = ov.Core()
    names = list(COMPONENTS_ONE_STEP) + (["unet_velocity"] if steps > 1 else [])
    sessions = {}
    for n in names:
        path = folder / n / IR_FILE
        sessions[n] = compile_model(path, precision or meta["precision"], threads, core)
        ort_runtime.check_io(sessions[n], n, path)
    return meta, steps, sessions, ort_runtime.tokenizer_for(folder)


def run_one_step(folder: Path | None, input_ids, noise, meta: dict, sessions: dict | None = None, threads: int | None = None):
    """Text encoder → one-step UNet → VAE decoder through OpenVINO; image in [0, 1]."""
    s = sessions or {n: compile_model(Path(folder) / n / IR_FILE, meta["precision"], threads) for n in COMPONENTS_ONE_STEP}
    return ort_runtime.run_one_step(None, input_ids, noise, meta, s)


def openvino_backend(config, info: dict):
    """``generate --backend openvino``: the render function over a compiled export."""
    import numpy as np

    from ..generator import make_noise

    if config.device.value not in ("auto", "cpu"):
        raise DeviceError(f"--device {config.device.value} is not available with --backend openvino", "use --device cpu")
    if config.dtype.value not in ("auto", "float32"):
        raise InputError(f"--dtype {config.dtype.value} does not apply to --backend openvino (precision is set at export)",
                         "convert again with --target openvino --precision f32|bf16|f16")
    folder = Path(config.model)
    meta, steps, sessions, tokenize = open_export(folder, config.steps, config.guidance)
    c, lh, lw = meta["latent_shape"]
    f = meta["height"] // lh
    mult = int(meta.get("size_multiple", 8))
    h = image_size("height", config.height or meta["height"], mult)
    w = image_size("width", config.width or meta["width"], mult)
    if (h, w) != (meta["height"], meta["width"]):
        raise InputError(f"this OpenVINO export is compiled for {meta['height']}x{meta['width']} images",
                         "drop --height/--width, or convert again with them")
    shape = (c, h // f, w // f)
    ran = sorted({s.precision for s in sessions.values()})
    info.update(steps=steps, height=h, width=w, flow=meta["flow"], device="cpu", dtype="float32", backend="openvino",
                export_precision=meta["precision"], ran_precision="/".join(ran), quantize=meta.get("quantize"))

    def render(job):
        ids = tokenize([job.prompt])
        noise = make_noise([job.seed], shape).numpy()
        image = ort_runtime.sample(sessions, ids, noise, meta, steps)
        if not np.isfinite(image).all():
            raise NumericsError(f"NaN/Inf in the image for prompt {job.prompt!r} seed {job.seed} (openvino)",
                                "a low-precision export overflowed: convert with --precision f32")
        return (image[0].transpose(1, 2, 0) * 255).round().astype("uint8")

    return render
