"""Reflow data: (noise z, teacher latent x1) pairs from the teacher's own ODE, in verified shards.

For pair ``i`` the seed is derived from ``(seed, i)`` (numpy ``SeedSequence``), the noise ``z`` is N(0, 1)
in latent space, and ``x1`` is where the teacher's sampler takes ``z``: the Euler rule of ``flow.py``
for a rectified-flow teacher, the model's diffusers scheduler (DPM-Solver, Euler, …) for an
epsilon/v-prediction teacher — both with classifier-free guidance. This is InstaFlow's reflow data
(the 2-RF is trained on these fixed couplings, which straightens the flow).

On disk, ``DIR/shard-00000.safetensors`` (``noise``, ``latents``, ``seeds``, ``input_ids``) + a JSON
sidecar (count, indices, seeds, prompts, sha256, teacher hash, sampler settings). A shard is written to
a temp name and renamed, its sidecar last: a crash never leaves half a shard, a rerun skips the shards
whose sidecar verifies and regenerates corrupt ones. Under ``accelerate launch``, process r makes the
shards k with k % world_size == r.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..artifacts import (
    atomic_write_text,
    check_output,
    make_manifest,
    output_lock,
    read_manifest,
    sha256_file,
    write_manifest,
)
from ..errors import InputError, NumericsError, OutputExistsError, writing_to
from ..options import Device, DType
from ..pipeline import load_pipeline, resolve_device
from ..threads import Governor, threads_setting
from ..validators import boolean, choice, image_side, integer, number, prompt_file, seed

FORMAT = "instaflow-edge/reflow-data/1"


class Scheduler(str, enum.Enum):
    """The sampler that integrates a diffusion teacher's ODE: its own (``model``) or one of diffusers'."""

    model = "model"
    dpm_solver = "dpm-solver"
    euler = "euler"
    ddim = "ddim"


@dataclasses.dataclass
class ReflowDataConfig:
    """Options of ``instaflow-edge train reflow-data``. Give ``prompts`` (a text file, one per line) or
    ``data`` ("digits" or a folder with captions) as the prompt source."""

    teacher: str
    output: str
    prompts: str | None = None
    data: str | None = None
    captions: str | None = None
    num_pairs: int = 4000
    shard_size: int = 500
    steps: int = 32
    guidance: float = 1.0
    negative_prompt: str = ""
    scheduler: Scheduler = Scheduler.model  # diffusion teachers only: the sampler that integrates their ODE
    seed: int = 0
    batch_size: int = 64
    height: int | None = None
    width: int | None = None
    device: Device = Device.auto
    dtype: DType = DType.float32
    allow_pickle: bool = False
    force: bool = False
    # CPU threads: "auto" follows the machine's load (threads.py), N fixes the count; None keeps torch's
    # count, so a regenerated shard is bit-identical to the one it replaces ("auto" cannot promise it)
    threads: str | int | None = None

    def __post_init__(self) -> None:
        """Check the options once and turn choice strings into their enums: a made config is valid."""
        if self.threads is not None:
            self.threads = threads_setting("threads", self.threads)
        for name in ("teacher", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"no {name} given", "pass the teacher pipeline and -o OUT")
        if (self.prompts is None) == (self.data is None):
            raise InputError("give exactly one prompt source", "pass --prompts FILE or --data digits|FOLDER")
        for name in ("num_pairs", "shard_size", "steps", "batch_size"):
            integer(name, getattr(self, name), 1)
        seed("seed", self.seed)
        image_side("height", self.height)
        image_side("width", self.width)
        self.guidance = number("guidance", self.guidance, 0.0)
        if not isinstance(self.negative_prompt, str):
            raise InputError(f"negative_prompt must be text, got {self.negative_prompt!r}", "fix --negative-prompt")
        self.scheduler = choice("scheduler", self.scheduler, Scheduler)
        self.device = choice("device", self.device, Device)
        self.dtype = choice("dtype", self.dtype, DType)
        boolean("allow_pickle", self.allow_pickle)
        boolean("force", self.force)

    def inputs(self) -> tuple[str, ...]:
        """The paths this run reads: the output may not be, contain or lie inside one of them."""
        data = (self.data,) if self.data not in (None, "digits") else ()
        return (self.teacher, *data, *(p for p in (self.prompts, self.captions) if p))


def pair_seed(seed: int, index: int) -> int:
    """The noise seed of pair ``index``: a well-mixed function of (global seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_prompts(config: ReflowDataConfig) -> list[str]:
    """The prompt source as a list; pair i uses prompt i mod len."""
    if config.prompts is not None:
        return prompt_file(config.prompts, [], what="prompt")
    from ..data import digits_dataset, folder_dataset

    ds = digits_dataset("train", seed=0) if config.data == "digits" else folder_dataset(config.data, config.captions)
    return list(ds.prompts)


def sampler_settings(config: ReflowDataConfig, pipe) -> dict:
    s = {"flow": pipe.info.flow, "steps": config.steps, "guidance": config.guidance,
         "negative_prompt": config.negative_prompt, "dtype": config.dtype.value}
    if pipe.info.flow != "rectified_flow":
        s["scheduler"] = (type(pipe.scheduler).__name__ if config.scheduler is Scheduler.model
                          else config.scheduler.value)
    return s


def _use_scheduler(pipe, scheduler: Scheduler) -> None:
    """Replace the model's scheduler by ``scheduler`` (``model`` keeps it)."""
    import diffusers

    if scheduler is Scheduler.model:
        return
    cls = {Scheduler.dpm_solver: diffusers.DPMSolverMultistepScheduler, Scheduler.euler: diffusers.EulerDiscreteScheduler,
           Scheduler.ddim: diffusers.DDIMScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def shard_paths(folder: Path, k: int) -> tuple[Path, Path]:
    return folder / f"shard-{k:05d}.safetensors", folder / f"shard-{k:05d}.json"


def verify_shard(folder: Path, k: int, expect: dict | None = None) -> dict | None:
    """The shard's sidecar if the shard exists, hashes right and (given ``expect``) was made with the same
    settings; else None (it must be made again)."""
    data, side = shard_paths(folder, k)
    if not (data.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):  # not UTF-8, not JSON: a corrupt shard, made again
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != sha256_file(data):
        return None
    if expect is not None and any(meta.get(key) != value for key, value in expect.items()):
        return None
    return meta


def _write_shard(folder: Path, k: int, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    data, side = shard_paths(folder, k)
    fd, tmp = tempfile.mkstemp(prefix=f".{data.name}.", dir=folder)
    os.close(fd)
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)
        meta = {**meta, "sha256": sha256_file(tmp)}
        os.replace(tmp, data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(side, json.dumps(meta, indent=1) + "\n")  # the sidecar commits the shard


# temporary files of _write_shard and atomic_write_text (tempfile's random 8-character suffix)
_STALE = re.compile(r"^\.(shard-\d+\.(safetensors|json)|manifest\.json)\.[A-Za-z0-9_]+$")


def _prepare_output(config: ReflowDataConfig, identity: dict) -> Path:
    """Run by rank 0 while it holds the output's lock."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file", "choose a folder")
    if out.exists() and config.force:
        shutil.rmtree(out)
    if out.is_dir():  # temporary files a killed run left (no live run writes here: we hold the lock)
        for p in out.iterdir():
            if _STALE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
    if out.exists():
        m = read_manifest(out)
        known = (m or {}).get("identity")
        if any(out.iterdir()) and known is None and not any(out.glob("shard-*.json")):
            raise OutputExistsError(f"output {out} exists and is not reflow data", "choose another folder or pass --force")
        if known is not None and known != identity:
            diff = sorted(k for k in identity if known.get(k) != identity[k])
            raise OutputExistsError(f"{out} holds reflow data made with other settings ({', '.join(diff)})",
                                    "pass --force to regenerate it, or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_reflow_data(config: ReflowDataConfig, progress: bool = True) -> dict:
    """Generate (or finish) the reflow data of ``config``; returns the dataset manifest. Rank 0 holds
    the output's lock throughout (one run per output; a second is refused)."""
    check_output(config.output, config.force, config.inputs(), exists_ok=True)  # it resumes; never an input
    state = _dist_state(cpu=config.device is Device.cpu)
    with output_lock(config.output) if state["rank"] == 0 else contextlib.nullcontext():
        return _make_reflow_data(config, state, progress)


def _make_reflow_data(config: ReflowDataConfig, state: dict, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    prompts = load_prompts(config)
    device = state["device"] if state["world"] > 1 else resolve_device(config.device.value)
    pipe = load_pipeline(config.teacher, str(device) if device.type == "cuda" else device.type, config.dtype.value,
                         config.allow_pickle)
    if pipe.info.flow != "rectified_flow":
        _use_scheduler(pipe, config.scheduler)
    shape = pipe.latent_shape(*pipe.image_size(config.height, config.width))
    teacher_manifest = read_manifest(config.teacher) if Path(config.teacher).is_dir() else None
    teacher = {"source": config.teacher, "content_sha256": (teacher_manifest or {}).get("content_sha256")}
    sampler = sampler_settings(config, pipe)
    identity = {"teacher": teacher, "sampler": sampler, "seed": config.seed, "shard_size": config.shard_size,
                "latent_shape": list(shape), "format": FORMAT}
    out = _prepare_output(config, identity) if state["rank"] == 0 else Path(config.output)
    state["barrier"]()

    n_shards = -(-config.num_pairs // config.shard_size)
    mine = [k for k in range(n_shards) if k % state["world"] == state["rank"]]
    todo = []
    for k in mine:
        start, end = k * config.shard_size, min((k + 1) * config.shard_size, config.num_pairs)
        if verify_shard(out, k, {"identity": identity, "indices": [start, end]}) is None:
            todo.append((k, start, end))
    total = sum(e - s for _, s, e in todo)
    bar = tqdm(total=total, desc=f"reflow pairs (rank {state['rank']})" if state["world"] > 1 else "reflow pairs",
               unit="pair", disable=not progress or total == 0)
    t0 = time.perf_counter()
    # CPU threads follow the machine's load per batch (a GPU run leaves them alone)
    on_cpu = pipe.device.type == "cpu" and config.threads is not None
    with Governor(config.threads if on_cpu else torch.get_num_threads()) as governor:
        _generate(config, pipe, out, todo, prompts, shape, identity, state, bar, governor)
    bar.close()
    elapsed = time.perf_counter() - t0
    state["barrier"]()
    manifest = make_manifest("reflow-data", config, identity=identity, num_pairs=config.num_pairs,
                             shards=[shard_paths(out, k)[0].name for k in range(n_shards)],
                             generated_pairs=total, seconds=round(elapsed, 2),
                             pairs_per_second=round(total / elapsed, 2) if total and elapsed > 0 else None)
    if state["rank"] == 0:
        write_manifest(out, manifest)
    return manifest


def _generate(config, pipe, out: Path, todo, prompts, shape, identity, state, bar, governor) -> None:
    import torch

    from ..generator import generate_latents, make_noise

    for k, start, end in todo:
        idx = list(range(start, end))
        seeds = [pair_seed(config.seed, i) for i in idx]
        texts = [prompts[i % len(prompts)] for i in idx]
        z_all, x_all = [], []
        for b in range(0, len(idx), config.batch_size):
            governor.tick()
            z = make_noise(seeds[b:b + config.batch_size], shape)
            x1 = generate_latents(pipe, texts[b:b + config.batch_size], z, config.steps, config.guidance,
                                  config.negative_prompt).float().cpu()
            if not torch.isfinite(x1).all():
                raise NumericsError(f"teacher produced NaN/Inf latents in shard {k}", "use --dtype float32")
            z_all.append(z)
            x_all.append(x1)
            bar.update(len(z))
        tensors = {"noise": torch.cat(z_all), "latents": torch.cat(x_all),
                   "seeds": torch.tensor(seeds, dtype=torch.int64), "input_ids": pipe.tokenize(texts)}
        meta = {"format": FORMAT, "count": len(idx), "indices": [start, end], "seeds": seeds, "prompts": texts,
                "identity": identity, "made_by_rank": state["rank"]}
        with writing_to(out):  # a full disk names the output folder
            _write_shard(out, k, tensors, meta)


def _dist_state(cpu: bool = False) -> dict:
    """Rank, world size, device and a barrier under ``accelerate launch``; a single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        # without cpu=True accelerate falls back to ONE process when no GPU is visible (MULTI_CPU needs it)
        s = PartialState(cpu=cpu or not torch.cuda.is_available())
        return {"rank": s.process_index, "world": s.num_processes, "device": s.device, "barrier": s.wait_for_everyone}
    return {"rank": 0, "world": 1, "device": None, "barrier": lambda: None}
