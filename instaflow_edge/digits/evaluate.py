"""``evaluate``: how well a text-to-image model draws the digits, measured by the judge.

Over the fixed prompt set of :func:`instaflow_edge.data.eval_prompts` (``num_images / 10`` prompts per
digit, every template) and fixed seeds (image ``j`` starts from the noise of seed ``seed + j``):

* **prompt accuracy** — the share of images the judge classifies as the digit their prompt names,
  overall and per digit;
* **digits-FID** — the Fréchet distance between the generated images and the real *validation* images
  (the reference set, which neither the judge nor the generator trained on) in the judge's
  penultimate features.

The **ceiling** is the same figures for real images. Its accuracy is the judge's on the validation
split (held out, so honest). Its FID is that of ``num_images`` real images *disjoint from the
reference* vs the same reference, class-balanced like the prompt set: the FID estimator is biased
upward by an amount that shrinks with the sample size, so the ceiling must use the same N and the same
reference as the generated set to be comparable. Those real images come from the train split (the
only real digits left), i.e. the ceiling is what a generator that reproduced its training data
exactly would score (past ~1,480 images the split runs out of some digit: ``real.fid_n`` says the N). The judge has seen those images in training; that does not measurably flatter
them: at equal N = 135, train-split digits vs one validation half scored 7.5–8.7 (three draws) and the
two validation halves 8.4 against each other (seed 0). The latter is reported as
``real.fid_val_halves`` (N = 135 each, hence far above the N = 1000 ceiling: the same bias).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Protocol

from ..artifacts import atomic_write_text, check_overlap, make_manifest
from ..errors import InputError, NumericsError
from .. import runtime
from ..options import Device, DType
from ..pipeline import load_pipeline, resolve_device
from ..runtime import Backend
from ..validators import backend_choice, boolean, choice, image_count, integer, optional_integer, seed

EvalBackend = Backend  # ``eval --backend``: the same choices as generate's


@dataclasses.dataclass
class EvalConfig:
    """Options of ``instaflow-edge eval``; ``steps=None`` means the model's default. Checked and
    normalized (choices become enums) once, when made."""

    model: str | None = None
    steps: int | None = None
    guidance: float = 1.0
    num_images: int = 1000      # multiple of 10: num_images / 10 prompts per digit
    seed: int = 0
    batch_size: int = 250
    real_only: bool = False     # only the real-image ceiling, no model
    json: str | None = None
    data_seed: int = 0          # the digits split (the judge is trained on the same one)
    device: Device = Device.auto
    dtype: DType = DType.float32
    allow_pickle: bool = False
    # torch: ``model`` is a pipeline folder; any other format (runtime.backend_names()): an export of that
    # format, run by its own runtime
    backend: str = Backend.torch.value

    def __post_init__(self) -> None:
        self.device = choice("device", self.device, Device)
        self.dtype = choice("dtype", self.dtype, DType)
        self.backend = backend_choice("backend", self.backend, runtime.backend_names())
        self.real_only = boolean("real", self.real_only)
        self.allow_pickle = boolean("allow_pickle", self.allow_pickle)
        if self.model is None and not self.real_only:
            raise InputError("no model given", "pass a pipeline folder, or --real for the real-image ceiling alone")
        if self.model is not None and self.real_only:
            raise InputError("--real evaluates real digits only, but a model was given too", "drop the model or --real")
        self.steps = optional_integer("steps", self.steps, 1)
        if not (isinstance(self.guidance, (int, float)) and self.guidance >= 0.0):  # also refuses NaN
            raise InputError(f"guidance must be ≥ 0, got {self.guidance}", "use 1.0 for no guidance")
        image_count("num_images", self.num_images)
        if self.num_images % 10 or self.num_images < 20:
            raise InputError(f"num_images must be a multiple of 10 and ≥ 20, got {self.num_images}",
                             "pass --num-images 1000 (100 per digit) for a trustworthy FID")
        seed("seed", self.seed, self.num_images)  # image j uses seed + j
        integer("batch_size", self.batch_size, 1)
        integer("data_seed", self.data_seed, 0)
        if self.json is not None:
            path = Path(self.json)
            if path.is_dir() or not path.parent.is_dir():
                raise InputError(f"cannot write --json {path}", "pass a file path inside an existing folder")
            check_overlap(path, (self.model,), what="--json file")  # never a file of the model
        if self.backend != "torch":
            b = self.backend
            if self.real_only:
                raise InputError(f"--backend {b} scores an {b} export; --real does not apply",
                                 "drop --real, or use --backend torch")
            if self.dtype is not DType.float32 or self.device not in (Device.auto, Device.cpu):
                raise InputError(f"--backend {b} runs the export on the CPU at its exported precision",
                                 "drop --dtype/--device (convert or quantize the export for other precisions)")


def _accuracy(judge, images, labels) -> dict:
    """Share of images classified as their label, overall and per digit."""
    import torch

    labels = torch.as_tensor(labels)
    hit = (judge.predict(images) == labels).double()
    per_digit = [round(float(hit[labels == d].mean()), 4) if (labels == d).any() else None for d in range(10)]
    return {"n": len(labels), "accuracy": round(float(hit.mean()), 4), "per_digit": per_digit}


def _fid(judge, images, ref_stats) -> float:
    from .metrics import feature_stats, frechet_distance

    return round(frechet_distance(*feature_stats(judge.features(images)), *ref_stats), 3)


def score_images(judge, images, labels, ref_stats) -> dict:
    """Prompt accuracy (overall and per digit) and digits-FID of generated ``images`` in [-1, 1]."""
    return {**_accuracy(judge, images, labels), "fid": _fid(judge, images, ref_stats)}


def _balanced_subset(labels: list[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` indices of each digit (fewer if the split has fewer), in a seeded order."""
    import numpy as np

    rng = np.random.default_rng([seed, 0xCE11])
    out = []
    for d in range(10):
        idx = np.flatnonzero(np.asarray(labels) == d)
        out += sorted(rng.permutation(idx)[:per_class].tolist())
    return out


def real_ceiling(judge, num_images: int, data_seed: int = 0) -> tuple[dict, tuple]:
    """The real-image figures and the reference statistics (validation features)."""
    import torch

    from ..data import digits_dataset
    from .metrics import feature_stats, fid

    val, train = digits_dataset("validation", data_seed), digits_dataset("train", data_seed)
    xv = torch.stack([val[i]["image"] for i in range(len(val))])
    fv = judge.features(xv)
    ref_stats = feature_stats(fv)
    real = _accuracy(judge, xv, val.labels)  # on held-out images
    pick = _balanced_subset(train.labels, num_images // 10, data_seed)
    real["fid"] = _fid(judge, torch.stack([train[i]["image"] for i in pick]), ref_stats)
    real["fid_n"] = len(pick)
    halves = _balanced_subset(val.labels, len(val), data_seed)
    real["fid_val_halves"] = round(fid(fv[halves[0::2]].numpy(), fv[halves[1::2]].numpy()), 3)
    real["accuracy_source"], real["fid_source"] = "validation split", "train split (disjoint from the reference)"
    return real, ref_stats


def generate_eval_images(pipe, config: EvalConfig, progress: bool = True):
    """The images of the fixed prompt set (float32 in [-1, 1] on CPU), their labels, sampling info."""
    import torch
    from tqdm.auto import tqdm

    from ..data import eval_prompts
    from ..generator import decode_latents, generate_latents, make_noise

    steps = config.steps or pipe.info.default_steps
    prompts = eval_prompts(config.num_images // 10)
    shape = (pipe.unet.config.in_channels, pipe.default_size // pipe.vae_scale_factor,
             pipe.default_size // pipe.vae_scale_factor)
    out = []
    bar = tqdm(total=len(prompts), desc=f"generating ({steps} step{'s' * (steps != 1)})", unit="img",
               disable=not progress)
    for i in range(0, len(prompts), config.batch_size):
        chunk = prompts[i:i + config.batch_size]
        noise = make_noise([config.seed + i + k for k in range(len(chunk))], shape)
        latents = generate_latents(pipe, [p for p, _ in chunk], noise, steps, config.guidance)
        images = decode_latents(pipe, latents)
        if not torch.isfinite(images).all():
            raise NumericsError(f"NaN/Inf in generated images (batch starting at prompt {i}, {config.dtype.value})",
                                "fp16 overflow is the usual cause: retry with --dtype float32")
        out.append(images.cpu() * 2 - 1)
        bar.update(len(chunk))
    bar.close()
    info = {"steps": steps, "guidance": config.guidance, "flow": pipe.info.flow, "size": pipe.default_size,
            "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch.")}
    return torch.cat(out), [d for _, d in prompts], info


def generate_eval_images_export(export, config: EvalConfig, progress: bool = True):
    """``generate_eval_images`` for an export opened by ``runtime.open_export``, run by its own runtime in
    batches (one image at a time where it is compiled for batch 1): same prompts, same seeds, same noise,
    so the figures compare with the PyTorch model's."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..data import eval_prompts
    from ..generator import make_noise

    prompts = eval_prompts(config.num_images // 10)
    shape = export.facts.latent_shape
    out = []
    steps = export.steps
    bar = tqdm(total=len(prompts), desc=f"generating with {export.format} ({steps} step{'s' * (steps != 1)})", unit="img",
               disable=not progress)
    batch = min(config.batch_size, export.max_batch or config.batch_size)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        noise = make_noise([config.seed + i + k for k in range(len(chunk))], shape).numpy()
        images = export.sample(export.tokenize([p for p, _ in chunk]), noise)
        if not np.isfinite(images).all():
            raise NumericsError(f"NaN/Inf in generated images (batch starting at prompt {i}, {export.label})",
                                "a low-precision export overflowed: use the fp32 or int8 export")
        out.append(torch.from_numpy(images) * 2 - 1)
        bar.update(len(chunk))
    bar.close()
    info = {"steps": steps, "guidance": config.guidance, "flow": export.facts.flow, "size": export.facts.height,
            "device": export.device, "dtype": "float32", **export.info()}
    return torch.cat(out), [d for _, d in prompts], info


class PipelineTransform(Protocol):
    """Changes a loaded pipeline before it is scored, e.g. ``quantize.coreml.PyTorchCompression``: a
    Core ML compression applied in PyTorch exactly as the converter ships it. ``result_key`` names the
    report in the result."""

    result_key: str

    def __call__(self, pipe, steps: int) -> tuple[object, dict]: ...


def evaluate(config: EvalConfig, progress: bool = True, transform: PipelineTransform | None = None) -> dict:
    """Prompt accuracy, per-digit accuracy and digits-FID of ``config.model``, with the real ceiling;
    ``transform`` (optional) changes the loaded pipeline first and its report joins the result.

    Returns the result dict (also written to ``config.json`` when set, atomically)."""
    from .judge import JudgeConfig, load_judge

    pipe = export = None
    if config.backend != "torch":  # a bad export fails before the judge is built
        export = runtime.open_export(config.model, expect=config.backend, steps=config.steps, guidance=config.guidance)
    elif not config.real_only:  # a bad model path fails before the judge is built

        resolve_device(config.device.value)
        pipe = load_pipeline(config.model, config.device.value, config.dtype.value, config.allow_pickle)
    report = None
    if transform is not None:
        if pipe is None:
            raise InputError(f"{transform.result_key.replace('_', ' ')} needs a PyTorch model, "
                             f"but --real or --backend {config.backend} was given", "drop one of them")
        pipe, report = transform(pipe, config.steps or pipe.info.default_steps)
    t0 = time.perf_counter()
    judge = load_judge(JudgeConfig(data_seed=config.data_seed), progress=progress)
    t_judge = time.perf_counter() - t0
    real, ref_stats = real_ceiling(judge, config.num_images, config.data_seed)
    result: dict = {"model": config.model, "num_images": config.num_images, "seed": config.seed,
                    "reference": {"split": "validation", "n": real["n"]},
                    "judge": {"key": judge.config.key(), "val_accuracy": round(judge.val_accuracy, 4),
                              "feature_dim": judge.config.feature_dim}}
    t_gen = 0.0
    if pipe is not None or export is not None:
        t1 = time.perf_counter()
        images, labels, info = (generate_eval_images_export(export, config, progress) if export is not None
                                else generate_eval_images(pipe, config, progress))
        t_gen = time.perf_counter() - t1
        result["sampling"] = info
        if report is not None:
            result[transform.result_key] = report
        result["generated"] = score_images(judge, images, labels, ref_stats)
    result["real"] = real
    result["seconds"] = {"judge": round(t_judge, 2), "generate": round(t_gen, 2),
                         "total": round(time.perf_counter() - t0, 2)}
    if config.json:
        _write_json(config, result)
    return result


def _write_json(config: EvalConfig, result: dict) -> None:

    atomic_write_text(config.json, json.dumps(make_manifest("eval", config, **result), indent=2) + "\n")
