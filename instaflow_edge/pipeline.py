"""Loading and saving pipelines: the diffusers ``save_pretrained`` layout, from a folder or a hub id.

A :class:`Pipeline` holds the four SD components plus what kind of model it is (``ModelInfo``): a
rectified flow (InstaFlow, 2-RF, our presets; sampled with the Euler rule of ``flow.py``) or a
diffusion model (epsilon/v-prediction SD; sampled with its own diffusers scheduler).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from .artifacts import read_manifest
from .errors import DeviceError, InputError, InstaflowError, ModelError
from .hub import HUB_ID, hub_index
from .model_files import (  # noqa: F401  (the checks are part of the pipeline API)
    SUBFOLDERS,
    check_pipeline_folder,
    check_plain_tensors,
    check_safetensors,
)
from .validators import image_size, short, size_multiple

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelInfo:
    """What kind of generator a pipeline is, and how to sample it by default."""

    flow: str = "rectified_flow"  # or "diffusion"
    default_steps: int = 1
    source: str = ""

    @property
    def one_step(self) -> bool:
        return self.flow == "rectified_flow" and self.default_steps == 1


@dataclasses.dataclass
class Pipeline:
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any
    info: ModelInfo = dataclasses.field(default_factory=ModelInfo)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def default_size(self) -> int:
        """Image side the UNet was built for (sample_size × VAE factor)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides this pipeline accepts are multiples of this (VAE × UNet downsampling)."""
        return size_multiple(self.vae_scale_factor, len(self.unet.config.block_out_channels))

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)``: the defaults filled in, each checked against :attr:`size_multiple`."""
        h, w = height or self.default_size, width or self.default_size
        return image_size("height", h, self.size_multiple), image_size("width", w, self.size_multiple)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The (C, h, w) of one sample's latent for an image of ``height × width``."""
        f = self.vae_scale_factor
        return (int(self.unet.config.in_channels), height // f, width // f)

    def tokenize(self, prompts: list[str]):
        """Token ids (B, 77), padded and truncated as SD does."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def to(self, device=None, dtype=None) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.vae):
            m.eval().requires_grad_(False)
        return self

    def save(self, folder: str | os.PathLike, info: ModelInfo | None = None) -> None:
        """Write the diffusers layout (safetensors) into ``folder`` (which the caller made atomic)."""
        with quiet_libraries():  # the pipeline class's import advice and the shard-writing bar
            from diffusers import StableDiffusionPipeline

            sd = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=self.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            sd.save_pretrained(folder, safe_serialization=True)
        write_slow_tokenizer_files(self.tokenizer, Path(folder) / "tokenizer")


def write_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """Also keep ``vocab.json``/``merges.txt`` (transformers 5 saves only tokenizer.json): older
    transformers, optimum and Apple's Swift pipeline read these."""
    if (folder / "vocab.json").exists():
        return
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not backend or backend.get("model", {}).get("type") != "BPE":
        return
    model = backend["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# ---------------------------------------------------------------------------------------------------
# devices and dtypes

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto"):
    import torch

    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}", f"use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("--device mps was asked for but MPS is not available", "use --device cpu (or auto)")
    return torch.device(name)


def resolve_dtype(name: str, device) -> "Any":
    import torch

    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return getattr(torch, name)


FLOWS = ("rectified_flow", "diffusion")
DEFAULT_STEPS = {"rectified_flow": 1, "diffusion": 25}
# What the user said a model without our manifest is (`instaflow-edge --flow … --default-steps …`, or
# :func:`assume_model` in Python): (flow or None, default steps or None)
_ASSUMED: contextvars.ContextVar[tuple[str | None, int | None]] = contextvars.ContextVar("assumed_model", default=(None, None))
_TOLD: set[str] = set()  # sources whose guess was printed (once per process)


def _said(flow: str | None, default_steps: int | None) -> tuple[str | None, int | None]:
    if flow is not None:
        flow = str(getattr(flow, "value", flow)).replace("-", "_")
        if flow not in FLOWS:
            raise InputError(f"--flow {short(flow, 40)} is not one of rectified-flow, diffusion", "pass --flow rectified-flow or --flow diffusion")
    if default_steps is not None and (isinstance(default_steps, bool) or not isinstance(default_steps, int) or not 1 <= default_steps <= 1000):
        raise InputError(f"--default-steps must be an integer from 1 to 1000, got {short(default_steps, 40)}", "e.g. --default-steps 1")
    return flow, default_steps


def set_assumed_model(flow: str | None = None, default_steps: int | None = None) -> None:
    """What every model without our manifest is taken to be from now on (the CLI's root options)."""
    _ASSUMED.set(_said(flow, default_steps))


@contextlib.contextmanager
def assumptions_scope() -> Iterator[None]:
    """What :func:`set_assumed_model` sets inside is undone on exit (the CLI runs each command in one)."""
    token = _ASSUMED.set(_ASSUMED.get())
    try:
        yield
    finally:
        _ASSUMED.reset(token)


@contextlib.contextmanager
def assume_model(flow: str | None = None, default_steps: int | None = None) -> Iterator[None]:
    """Inside, a model without our manifest is the given flow / default steps (a Python caller's
    ``--flow`` / ``--default-steps``); a model with our manifest is what its manifest says."""
    token = _ASSUMED.set(_said(flow, default_steps))
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def detect_info(source: str, folder: Path | None, index: dict | None) -> ModelInfo:
    """Rectified flow or diffusion, and default steps: our manifest first, then what the user said
    (``--flow``/``--default-steps``), then a guess from the pipeline's class and name, printed once."""
    said_flow, said_steps = _ASSUMED.get()
    manifest = read_manifest(folder) if folder is not None else None
    if manifest and isinstance(manifest.get("model"), dict):
        m = manifest["model"]
        flow, steps = m.get("flow", "rectified_flow"), m.get("default_steps", 1)
        where = f"{Path(folder) / 'manifest.json'}"
        if flow not in FLOWS:
            raise ModelError(f"{where}: model.flow {short(flow, 40)} is not one of {', '.join(FLOWS)}",
                             "restore the manifest, or re-create the model")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ModelError(f"{where}: model.default_steps must be a positive integer, got {short(steps, 40)}",
                             "restore the manifest, or re-create the model")
        if (said_flow not in (None, flow)) or (said_steps not in (None, steps)):
            raise InputError(f"{where} says the model is {flow.replace('_', '-')} with {steps} default steps; "
                             "--flow/--default-steps are for a model without our manifest", "drop --flow/--default-steps")
        return ModelInfo(flow=flow, default_steps=steps, source=source)
    cls = str((index or {}).get("_class_name", ""))
    name = source.lower()
    if "rectifiedflow" in cls.lower() or "instaflow" in name or "rectified_flow" in name:
        # InstaFlow-0.9B is one step; the 2-RF is sampled with a few Euler steps
        guess, why = ("rectified_flow", 1 if "instaflow" in name else 4), "its class or name"
    else:
        guess, why = ("diffusion", 25), "no rectified-flow class or name"
    flow = said_flow or guess[0]
    steps = said_steps or (guess[1] if flow == guess[0] else DEFAULT_STEPS[flow])
    if said_flow is None and source not in _TOLD:
        _TOLD.add(source)
        log.warning(f"{source} has no instaflow-edge manifest: taken as a {flow.replace('_', '-')} model with {steps} "
                    f"default steps ({why}); if it is not, say so: instaflow-edge --flow rectified-flow|diffusion "
                    "--default-steps N COMMAND …", extra={"tag": "model"})
    return ModelInfo(flow=flow, default_steps=steps, source=source)


def load_pipeline(
    model: str | os.PathLike,
    device: str = "cpu",
    dtype: str = "float32",
    allow_pickle: bool = False,
    local_files_only: bool = False,
) -> Pipeline:
    """Load a pipeline from a diffusers folder or a hub id, validated first, in eval mode. A local folder
    is checked (and its manifest read) before torch, diffusers or transformers are imported, so a bad
    folder fails in a fraction of a second."""
    source = str(model)
    path = Path(model)
    folder: Path | None = None
    index: dict | None = None
    info: ModelInfo | None = None
    if path.exists():
        folder = path
        index = check_pipeline_folder(path, allow_pickle)
        info = detect_info(source, folder, index)
    elif not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise ModelError(f"model path {source} does not exist", "check the path, or pass a hub id like org/name")
    with quiet_libraries():
        return _load_pipeline(source, folder, index, info, device, dtype, allow_pickle, local_files_only)


def _load_pipeline(source: str, folder: Path | None, index: dict | None, info: ModelInfo | None, device: str,
                   dtype: str, allow_pickle: bool, local_files_only: bool) -> Pipeline:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if folder is None:
        index, cached = hub_index(source, local_files_only)
        local_files_only = local_files_only or cached
    common = dict(use_safetensors=None if allow_pickle else True, local_files_only=local_files_only, torch_dtype=dt)
    vae_class = _vae_class(index)
    loaders = {  # the cheap ones first: a bad scheduler or tokenizer fails before the weights load
        "scheduler": lambda: _load_scheduler(source, index, local_files_only),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_files_only),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common),
        "vae": lambda: vae_class.from_pretrained(source, subfolder="vae", **common),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            with warnings.catch_warnings():  # the libraries' deprecation advice is not ours to print
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                parts[name] = load()
        except InstaflowError:
            raise
        except Exception as e:  # a library's error about a malformed config or file: name the component
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = (
                "check the hub id and your network (weights cannot be downloaded on offline machines)"
                if folder is None
                else f"{name}/ looks incomplete or corrupt; restore it or re-create the model"
            )
            raise ModelError(f"could not load the {name} of {source}: {type(e).__name__}: {first[:200]}", hint) from e
    pipe = Pipeline(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                    info or detect_info(source, folder, index))
    return pipe.to(dev).eval()


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # the full VAE, or the tiny one `train decoder` distils


def _vae_class(index: dict | None):
    """The diffusers class of the pipeline's vae, from model_index.json (AutoencoderKL when unnamed)."""
    import diffusers

    entry = (index or {}).get("vae")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise ModelError(f"the pipeline's vae is a {short(name, 40)}, not one of {', '.join(VAE_CLASSES)}",
                         "use a Stable Diffusion-style pipeline (or one made by `instaflow-edge train decoder`)")
    return getattr(diffusers, name)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside: diffusers' and transformers' chatter (per-shard progress bars, cast advice, torchao's
    optional kernels failing to load on CPU) is silenced; on exit every level is restored."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        libs = (diffusers.utils.logging, transformers.utils.logging)
        saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
        for lib in libs:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, (verbosity, bars) in zip(libs, saved):
                lib.set_verbosity(verbosity)
                if bars:
                    lib.enable_progress_bar()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def scheduler_class(name: Any):
    """The diffusers scheduler class called ``name``. Only diffusers' own schedulers are accepted: the
    name comes from ``model_index.json``, and any other attribute of ``diffusers`` (a pipeline, say)
    would start loading something else."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelError(f"model_index.json names scheduler {str(name)[:60]!r}, which is not a diffusers scheduler",
                         "name one of diffusers' schedulers there, e.g. EulerDiscreteScheduler")
    return cls


def _load_scheduler(source: str, index: dict | None, local_files_only: bool):
    entry = (index or {}).get("scheduler")
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise ModelError(f"{source}: model_index.json has no scheduler entry",
                         'add "scheduler": ["diffusers", "<SchedulerClass>"] with a scheduler/ folder')
    return scheduler_class(entry[1]).from_pretrained(source, subfolder="scheduler", local_files_only=local_files_only)
