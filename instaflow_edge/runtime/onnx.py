"""``generate --backend onnx``: run an ONNX export folder with onnxruntime.

One-step models run text encoder → one-step UNet (UNet at τ = 1000 + Euler step) → VAE decoder;
multi-step rectified flows run the exported velocity UNet (``unet_velocity``) with the Euler rule of
``flow.py``. The folder is checked (manifest, external-data paths, every model loads) before the first
image.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, InputError, ModelError, NumericsError
from ..validators import image_size, short, size_multiple
from . import onnx_io


def onnx_backend(config, info: dict):
    import numpy as np

    from ..generator import make_noise

    if config.device.value not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device {config.device.value} is not available with --backend onnx", "use --device cpu or cuda")
    if config.dtype.value not in ("auto", "float32"):
        raise InputError(f"--dtype {config.dtype.value} does not apply to --backend onnx (precision is fixed at export)",
                         "quantize the export instead: instaflow-edge quantize DIR --scheme fp16")
    providers = ["CPUExecutionProvider"]
    if config.device.value == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("--device cuda was asked for but onnxruntime has no CUDAExecutionProvider here",
                              "install onnxruntime-gpu, or use --device cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    folder = Path(config.model)
    meta, steps, sessions, tokenize = open_export(folder, config.steps, config.guidance, providers)
    c, lh, lw = meta["latent_shape"]
    f = meta["height"] // lh
    mult = export_size_multiple(folder, meta)
    h = image_size("height", config.height or meta["height"], mult)
    w = image_size("width", config.width or meta["width"], mult)
    shape = (c, h // f, w // f)
    info.update(steps=steps, height=h, width=w, flow=meta["flow"], device=providers[0].removesuffix("ExecutionProvider").lower(),
                dtype="float32", backend="onnx", export_precision=(read_scheme(folder) or "fp32"))

    def render(job):
        ids = tokenize([job.prompt])
        noise = make_noise([job.seed], shape).numpy()
        image = sample(sessions, ids, noise, meta, steps)
        if not np.isfinite(image).all():
            raise NumericsError(f"NaN/Inf in the image for prompt {job.prompt!r} seed {job.seed} (onnx)",
                                "an fp16 export overflowed: use the fp32 or int8 export")
        return (image[0].transpose(1, 2, 0) * 255).round().astype("uint8")

    return render


def open_export(folder: Path, steps: int | None, guidance: float, providers: list[str] | None = None):
    """Check an ONNX export folder for sampling ``steps`` (None: its default) and open it:
    ``(meta, steps, sessions, tokenize)``. Everything that can be refused is refused before the first
    session loads; the velocity UNet is opened only past one step."""

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder", "pass a folder written by `instaflow-edge convert --target onnx`")
    meta = export_meta(folder)
    steps = steps or meta["default_steps"]
    check_sampling(meta, steps, guidance)
    onnx_io.check_folder(folder)
    names = ["text_encoder", "unet", "vae_decoder"] + (["unet_velocity"] if steps > 1 else [])
    sessions = {n: open_component(folder, n, providers) for n in names}
    return meta, steps, sessions, tokenizer_for(folder)


# inputs an export may lack: exports made before the one-step UNet took optimum's timestep input
_OPTIONAL_INPUTS = {"unet": {"timestep"}}
# inputs an export may add to its spec: the one-step UNet has optimum's timestep (convert/onnx.py's onnx_spec)
_EXTRA_INPUTS = {"unet": {"timestep"}}


def open_component(folder: Path, name: str, providers: list[str] | None = None):
    """An onnxruntime session for component ``name`` of an export folder, after checking that its graph's
    inputs and outputs are the component's spec (``components.COMPONENTS``): names and ranks. A graph in
    the wrong folder (the text encoder's in ``unet/``) fails here, in one line, before any image."""
    path = Path(folder) / name / onnx_io.MODEL_FILE
    sess = onnx_io.session(path, providers=providers)
    check_io(sess, name, path)
    return sess


def check_io(sess, name: str, path: Path) -> None:
    from ..components import COMPONENTS

    spec = COMPONENTS.get(name)
    if spec is None:
        raise ModelError(f"{path}: {name!r} is not a component this tool exports", "re-export the model")
    want_in = {t.name: len(t.dims) for t in spec.inputs}
    want_out = {t.name: len(t.dims) for t in spec.outputs}
    got_in = {i.name: len(i.shape) for i in sess.get_inputs()}
    got_out = {o.name: len(o.shape) for o in sess.get_outputs()}
    if "timestep" in got_in and name in _EXTRA_INPUTS:
        want_in.setdefault("timestep", 1)
    missing_ok = _OPTIONAL_INPUTS.get(name, set())
    bad_in = (set(got_in) != set(want_in) and set(got_in) != set(want_in) - missing_ok) or \
        any(got_in[k] != want_in[k] for k in set(got_in) & set(want_in))
    bad_out = set(got_out) != set(want_out) or any(got_out[k] != want_out[k] for k in got_out)

    def fmt(d):
        return ", ".join(f"{k} (rank {v})" for k, v in d.items())

    if bad_in or bad_out:
        what = "inputs" if bad_in else "outputs"
        got, want = (got_in, want_in) if bad_in else (got_out, want_out)
        raise ModelError(f"{path}: the graph's {what} [{fmt(got)}] are not the {name} component's [{fmt(want)}]",
                         "the folder mixes up components; re-export it with `instaflow-edge convert --target onnx`")


def sample(sessions: dict, input_ids, noise, meta: dict, steps: int):
    """Images in [0, 1] (N, 3, H, W) for token ids (N, L) and noise (N, C, h, w): the one-step
    generator at ``steps == 1``, else the exported velocity UNet with the Euler rule of ``flow.py``."""
    import numpy as np

    from .. import flow

    if steps == 1:
        return run_one_step(None, input_ids, noise, meta, sessions)
    ehs = sessions["text_encoder"].run(None, {"input_ids": input_ids})[0]
    x = noise
    for tau in flow.euler_schedule(steps):
        v = sessions["unet_velocity"].run(None, {"sample": x, "timestep": np.full((x.shape[0],), tau, np.float32),
                                                 "encoder_hidden_states": ehs})[0]
        x = (x + v / steps).astype(np.float32)
    img = sessions["vae_decoder"].run(None, {"latent_sample": (x / meta["scaling_factor"]).astype(np.float32)})[0]
    return np.clip(img / 2 + 0.5, 0, 1)


def unet_feed(sess, sample, encoder_hidden_states) -> dict:
    """Inputs of an exported one-step UNet (exports made before the timestep input have none)."""
    import numpy as np

    feed = {"sample": sample, "encoder_hidden_states": encoder_hidden_states}
    if any(i.name == "timestep" for i in sess.get_inputs()):
        feed["timestep"] = np.full((sample.shape[0],), 1000.0, np.float32)
    return feed


def run_one_step(folder: Path, input_ids, noise, meta: dict, sessions: dict | None = None):
    """Text encoder → one-step UNet → VAE decoder through onnxruntime; image in [0, 1]."""
    import numpy as np

    s = sessions or {n: open_component(folder, n) for n in ("text_encoder", "unet", "vae_decoder")}
    ehs = s["text_encoder"].run(None, {"input_ids": input_ids})[0]
    lat = s["unet"].run(None, unet_feed(s["unet"], noise, ehs))[0]
    img = s["vae_decoder"].run(None, {"latent_sample": (lat / meta["scaling_factor"]).astype(np.float32)})[0]
    return np.clip(img / 2 + 0.5, 0, 1)


def check_sampling(meta: dict, steps: int, guidance: float) -> None:
    """Refuse what an ONNX export cannot sample, before any session is opened."""
    if meta["flow"] != "rectified_flow":
        raise InputError("--backend onnx samples rectified flows only; this export is a diffusion model",
                         "use --backend torch for diffusion models")
    if guidance > 1.0:
        raise InputError("--backend onnx does not do classifier-free guidance", "use --guidance 1 or --backend torch")
    if steps > 1 and "unet_velocity" not in meta["components"]:
        raise InputError(f"this export is one-step only (no velocity UNet), --steps {steps} cannot run",
                         "use --steps 1, or export a multi-step model")


def read_scheme(folder: Path) -> str | None:

    return ((read_manifest(folder) or {}).get("quantize") or {}).get("scheme")


def export_size_multiple(folder: Path, meta: dict) -> int:
    """The image-size multiple of an export: recorded by convert, or (exports made before it was
    recorded) derived from the UNet config the export carries."""
    import json

    if "size_multiple" in meta:
        return int(meta["size_multiple"])
    try:
        levels = len(json.loads((Path(folder) / "unet" / "config.json").read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{folder} records no size multiple and its unet/config.json is unreadable ({e})",
                         "re-export the model with `instaflow-edge convert --target onnx`") from e
    return size_multiple(meta["height"] // meta["latent_shape"][1], levels)


def export_meta(folder: Path) -> dict:
    """Facts about an ONNX export folder that the runtime needs (written by convert into the manifest)."""

    m = read_manifest(folder) or {}
    meta = m.get("onnx")
    if not isinstance(meta, dict) or "latent_shape" not in meta:
        raise ModelError(f"{folder} has no ONNX export manifest", "pass a folder written by `instaflow-edge convert --target onnx`")
    check_meta(meta, Path(folder) / "manifest.json")
    return meta


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_meta(meta: dict, where: Path) -> None:
    """The manifest's ``onnx`` facts have the types the runtime computes with (a hand-edited manifest with
    ``"latent_shape": [4, "8", 8]`` is a one-line error, not a traceback mid-run)."""
    import math

    problems = []
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(d) for d in shape)):
        problems.append(f"latent_shape must be 3 positive integers, got {short(shape, 40)}")
    for key in ("height", "width", "default_steps"):
        if not _positive_int(meta.get(key)):
            problems.append(f"{key} must be a positive integer, got {short(meta.get(key), 40)}")
    if "size_multiple" in meta and not _positive_int(meta["size_multiple"]):
        problems.append(f"size_multiple must be a positive integer, got {short(meta['size_multiple'], 40)}")
    sf = meta.get("scaling_factor")
    if not (isinstance(sf, (int, float)) and not isinstance(sf, bool) and math.isfinite(sf) and sf > 0):
        problems.append(f"scaling_factor must be a positive number, got {short(sf, 40)}")
    if meta.get("flow") not in ("rectified_flow", "diffusion"):
        problems.append(f"flow must be rectified_flow or diffusion, got {short(meta.get('flow'), 40)}")
    comps = meta.get("components")
    if not (isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps)):
        problems.append(f"components must be a list of names, got {short(comps, 40)}")
    if problems:
        raise ModelError(f"{where}: onnx.{problems[0]}", "restore the manifest, or re-export the model")


def tokenizer_for(folder: Path):
    """``prompts -> int64 token ids (N, 77)`` with the export's tokenizer, loaded once (callers that
    tokenize per image or per batch keep this instead of calling ``tokenize``)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
    return lambda prompts: tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="np").input_ids.astype("int64")


def tokenize(folder: Path, prompts: list[str]):
    return tokenizer_for(folder)(prompts)
