"""Loading and saving pipelines: the diffusers ``save_pretrained`` layout, from a folder or a hub id.

A :class:`Pipeline` holds the four SD components plus what kind of model it is (``ModelInfo``): a
rectified flow (InstaFlow, 2-RF, our presets; sampled with the Euler rule of ``flow.py``) or a
diffusion model (epsilon/v-prediction SD; sampled with its own diffusers scheduler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

from .artifacts import read_manifest
from .errors import DeviceError, InputError, InstaflowError, ModelError
from .validators import image_size, short, size_multiple

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
_WEIGHTS = ("unet", "text_encoder", "vae")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CONFIGS = {"text_encoder": "config.json", "unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        _write_slow_tokenizer_files(self.tokenizer, Path(folder) / "tokenizer")


def _write_slow_tokenizer_files(tokenizer, folder: Path) -> None:
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


# ---------------------------------------------------------------------------------------------------
# validation of a local folder, before diffusers sees it


# safetensors dtypes and their bytes per element (sub-byte float formats: None, their size is not checked)
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
              "F4": None, "F6_E2M3": None, "F6_E3M2": None}
_ST_HEADER_MAX = 100_000_000  # the format's own limit on the JSON header


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (None: the header is sound and covers the file).
    Checks what the loader would trip over: the header's type, every tensor's dtype, shape and offsets,
    and that the offsets tile the data exactly (no gap, no overlap, nothing swapped)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "shorter than the 8-byte header length"
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _ST_HEADER_MAX):
            return "header length exceeds the file"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"header is not JSON: {str(e)[:80]}"
    if not isinstance(header, dict):
        return f"header is a JSON {type(header).__name__}, not an object"
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict):
                return "__metadata__ is not an object"
            continue
        what = f"tensor {short(name, 40)}"
        if not isinstance(t, dict):
            return f"{what} is not an object"
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in _ST_DTYPES:
            return f"{what} has unknown dtype {short(dtype, 20)}"
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return f"{what} has a bad shape {short(shape, 40)}"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            return f"{what} has bad data_offsets {short(offsets, 40)}"
        if _ST_DTYPES[dtype] is not None and offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPES[dtype]:
            return f"{what}: its shape {shape} and dtype {dtype} do not match its {offsets[1] - offsets[0]} bytes"
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return "tensor data overlaps or leaves a gap (offsets swapped or corrupt)"
        end = stop
    if 8 + n + end != size:
        return f"file has {size} bytes, header says {8 + n + end}"
    return None


def check_safetensors(path: Path) -> None:
    """Integrity check before any loader sees the file: the header parses, is sound and covers the file."""
    problem = _safetensors_problem(path)
    if problem:
        raise ModelError(f"{path} is truncated or corrupt safetensors ({problem})", "re-download or re-create this model")


def check_plain_tensors(path: Path) -> None:
    """A pickle weights file (``--allow-pickle``) must be a plain tensor checkpoint: what torch's safe
    loader (``weights_only=True``) accepts. Anything else (a pickle that would import or call code) is
    refused here, before a library is handed the file."""
    import pickle
    import zipfile

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError,
            ImportError, UnicodeDecodeError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path} is not a plain tensor checkpoint: torch's safe loader refuses it ({first[:120]})",
                         "use safetensors weights; --allow-pickle loads only plain tensors, never code") from e


def _require_readable(path: Path) -> None:
    """``path`` (a folder: listable and enterable; a file: readable), else PermissionError naming it
    (``Path.is_file``/``glob`` would hide it as "missing")."""
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if path.exists() and not os.access(path, mode):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON ({str(e)[:100]})", f"restore {what}") from e


def check_pipeline_folder(folder: Path, allow_pickle: bool = False) -> dict:
    """Validate a local diffusers pipeline folder; return its ``model_index.json``."""
    try:
        return _check_pipeline_folder(folder, allow_pickle)
    except PermissionError as e:
        raise ModelError(f"cannot read {e.filename or folder}: permission denied",
                         "make the model folder readable for this user (chmod -R u+rX), or run as its owner") from e


def _check_pipeline_folder(folder: Path, allow_pickle: bool) -> dict:
    if not folder.is_dir():
        raise ModelError(f"model path {folder} is not a folder", "pass a diffusers pipeline folder or a hub id")
    _require_readable(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder",
            "pass the folder that holds model_index.json (e.g. one made by `instaflow-edge init`)",
        )
    index = _read_json(index_path, "the file")
    if not isinstance(index, dict):
        raise ModelError(f"{index_path} is not a JSON object (it is a {type(index).__name__})",
                         "restore the file: it maps each component to its [library, class]")
    for comp in COMPONENTS:
        if comp not in index:
            raise ModelError(f"{index_path} lists no {comp!r} component", "this is not a Stable Diffusion-style pipeline")
        if not (folder / comp).is_dir():
            raise ModelError(f"component folder {folder / comp} is missing", "restore it or re-create the pipeline")
        _require_readable(folder / comp)
    for comp, name in _CONFIGS.items():  # a config that is not a JSON object fails here, not deep in a library
        path = folder / comp / name
        if path.is_file() and not isinstance(_read_json(path, f"{comp}/{name}"), dict):
            raise ModelError(f"{path} is not a JSON object", f"restore {comp}/{name}, or re-create the model")
    for comp in _WEIGHTS:
        sub = folder / comp
        safes = sorted(sub.glob("*.safetensors"))
        pickles = sorted(p for p in sub.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not safes and not pickles:
            raise ModelError(f"{sub} holds no weights (*.safetensors)", "restore the weights or re-create the pipeline")
        if not safes and not allow_pickle:
            raise ModelError(
                f"{sub} has only pickle weights ({pickles[0].name}); pickle can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        for p in safes:
            check_safetensors(p)
        if not safes:
            for p in pickles:
                check_plain_tensors(p)
    return index


FLOWS = ("rectified_flow", "diffusion")


def detect_info(source: str, folder: Path | None, index: dict | None) -> ModelInfo:
    """Rectified flow or diffusion, and default steps: our manifest first, then the pipeline's own hints."""
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
        return ModelInfo(flow=flow, default_steps=steps, source=source)
    cls = str((index or {}).get("_class_name", ""))
    name = source.lower()
    if "rectifiedflow" in cls.lower() or "instaflow" in name or "rectified_flow" in name:
        # InstaFlow-0.9B is one step; the 2-RF is sampled with a few Euler steps
        return ModelInfo(flow="rectified_flow", default_steps=1 if "instaflow" in name else 4, source=source)
    return ModelInfo(flow="diffusion", default_steps=25, source=source)


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
    elif not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise ModelError(f"model path {source} does not exist", "check the path, or pass a hub id like org/name")
    with quiet_libraries():
        return _load_pipeline(source, folder, index, info, device, dtype, allow_pickle, local_files_only)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host (or the HTTPS proxy, when one is set) cannot be reached in ``timeout`` seconds;
    None when a TCP connection opens. A quick check, so an offline machine fails in seconds instead of
    after the hub client's retries."""
    import socket
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


def _hub_index(source: str, local_files_only: bool) -> tuple[dict, bool]:
    """``model_index.json`` of hub id ``source`` and whether to load the rest from the local cache only:
    the cache first; then, unless offline (``HF_HUB_OFFLINE`` or ``local_files_only``), the hub after a
    quick reachability check."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    fix = "check the hub id and your network, or pass a local pipeline folder"

    def load_config(**kw):
        with warnings.catch_warnings():  # diffusers passes hf_hub_download an argument it deprecated
            warnings.simplefilter("ignore")
            return dict(DiffusionPipeline.load_config(source, **kw))

    try:
        return load_config(local_files_only=True), True
    except (OSError, ValueError):
        pass
    if local_files_only or _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        raise ModelError(f"could not fetch {source}: it is not in the local Hugging Face cache, and HF_HUB_OFFLINE "
                         "(or local files only) is set", "download it on a machine with network, or pass a local pipeline folder")
    reason = _unreachable(constants.ENDPOINT)
    if reason:
        raise ModelError(f"could not fetch {source}: the hub is unreachable ({reason})", fix)
    try:
        return load_config(), False
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"could not fetch {source}/model_index.json ({type(e).__name__}: {first[:150]})", fix) from e


def _load_pipeline(source: str, folder: Path | None, index: dict | None, info: ModelInfo | None, device: str,
                   dtype: str, allow_pickle: bool, local_files_only: bool) -> Pipeline:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if folder is None:
        index, cached = _hub_index(source, local_files_only)
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
