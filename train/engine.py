"""The training engine: one loop on ``accelerate`` for every stage (teacher, reflow, distill).

A stage supplies a model (a diffusers UNet), a :class:`BatchSource` (dataset → local batch of tensors)
and an objective (``objective(model, batch, rnd) -> loss``, see objectives.py) and calls
:func:`fit`. The engine owns everything else: AdamW, LR warmup + constant/cosine, gradient
accumulation, clipping, mixed precision, EMA, NaN/Inf stop, progress, scalar logs, atomic checkpoints
and exact resume.

Two multi-process modes: DDP (``accelerator.prepare``) and FSDP2, which the engine builds itself
(sharding.py: ``fully_shard`` per UNet block, EMA kept as local shards, DCP checkpoints that every rank
writes and any process count reads) when the config says ``sharding = fsdp2`` or an accelerate config asks
for FSDP version 2. A stage's source may order its own epochs (``make_sampler``: streamed pair shards).

Determinism across process counts: every step draws the indices of its GLOBAL batch from one
epoch-permutation stream, and every random tensor of a micro-batch (noise, times, prompt dropout) is
drawn for the whole global batch from a generator seeded by (seed, step); each micro-step of each
process then takes its slice. So 1 process and N processes (or N accumulation micro-steps) see identical
samples with identical noise, and their averaged gradients agree to float rounding. Resume is exact for the same reason: nothing
random depends on state that a checkpoint does not hold.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from ..artifacts import claim_output, output_lock
from ..errors import DeviceError, InputError, NumericsError, OutputExistsError
from ..threads import Governor
from . import checkpoint as ckpt
from . import sharding
from .config import AttentionKernel, TrainConfig
from .sharding import EMA  # noqa: F401  (part of the engine's API)
from .streams import EpochSampler, StepRandom, derive_seed  # noqa: F401  (part of the engine's API)
from .tracking import MetricsLog

logger = logging.getLogger(__name__)


class BatchSource(Protocol):
    """The data side of a stage: ``len`` samples; ``get`` builds the local batch for some indices."""

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor, rnd: StepRandom, device) -> dict[str, torch.Tensor]: ...


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warm-up to 1 over ``warmup_steps``
    (step 0 already trains), then constant or a cosine to 0 at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule.value == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))


def configure_unet(unet, config: TrainConfig) -> None:
    """Memory/speed options for big UNets: attention kernel and gradient checkpointing."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if hasattr(unet, "set_attn_processor"):
        unet.set_attn_processor(AttnProcessor2_0() if config.attention is AttentionKernel.sdpa else AttnProcessor())
    if config.gradient_checkpointing:
        if not getattr(unet, "_supports_gradient_checkpointing", False):
            raise InputError(f"{type(unet).__name__} does not support gradient checkpointing",
                             "drop --gradient-checkpointing")
        unet.enable_gradient_checkpointing()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def make_accelerator(config: TrainConfig):
    """An ``Accelerator`` for ``config``: CPU (gloo under ``accelerate launch``) where no GPU is visible
    or ``--cpu`` is given; accelerate's tensorboard tracker when tensorboard is installed."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a fresh state per run in one process (tests, notebooks): accelerate's state is a singleton
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    gpu = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    try:
        return Accelerator(
            cpu=config.cpu or not gpu,
            mixed_precision=config.mixed_precision.value,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if tensorboard_available() else None,
            project_dir=str(config.work_path),
        )
    except ValueError as e:
        raise DeviceError(f"--mixed-precision {config.mixed_precision.value} is not available here ({e})",
                          "use --mixed-precision no (or bf16 on CPUs that support it)") from e


@dataclasses.dataclass
class FitResult:
    step: int  # optimizer steps done in total (resumed ones included)
    final_loss: float | None  # mean loss of the last (up to) 50 steps of this run
    seconds: float
    resumed_from: str | None
    ema: bool  # the returned model holds the EMA weights
    sharding: str = "none"  # fsdp2: the engine sharded the model itself (sharding.py)
    fsdp_units: int = 0


def claimed(config: TrainConfig, accelerator) -> contextlib.AbstractContextManager:
    """The output's lock (``artifacts.claim_output``) for a whole run, held by the main process: the
    other processes write nothing."""
    if accelerator.is_main_process:
        return claim_output(config.output, config.force, config.inputs())
    return contextlib.nullcontext()


def fit(config: TrainConfig, accelerator, model: torch.nn.Module, source: BatchSource, objective,
        describe: str = "training") -> tuple[torch.nn.Module, FitResult]:
    """Train ``model`` on ``source`` with ``objective`` for ``config.max_steps`` optimizer steps.

    Returns the unwrapped model holding the weights to save (EMA when on) and a summary. Checkpoints and
    the metrics log go to ``config.work_path`` (main process only), whose lock the main process holds
    while it trains: a second run in the same work dir is refused.
    """
    config.check_work_dir()
    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:
            held.enter_context(output_lock(config.work_path, what="work dir"))
        return _fit(config, accelerator, model, source, objective, describe)


def _fit(config: TrainConfig, accelerator, model: torch.nn.Module, source: BatchSource, objective,
         describe: str) -> tuple[torch.nn.Module, FitResult]:
    from torch.optim.lr_scheduler import LambdaLR
    from tqdm.auto import tqdm

    world, rank = accelerator.num_processes, accelerator.process_index
    k = config.gradient_accumulation_steps
    micro_global = config.batch_size // k
    if micro_global % world:
        raise InputError(f"batch_size {config.batch_size} does not split over {world} processes × {k} accumulation steps",
                         f"make --batch-size a multiple of {world * k}")
    local = micro_global // world
    offset = rank * local
    work = config.work_path
    resume_path = _prepare_work_dir(config, accelerator, work)

    _refuse_unsupported(accelerator)
    spec = sharding.requested(config.sharding.value, shard_group=config.shard_group)
    configure_unet(model, config)
    model.train().requires_grad_(True)
    template = None
    if spec is not None:
        # the FSDP2 path (sharding.py): the engine shards the model itself; accelerate only launched the
        # processes. The main process keeps an unsharded CPU twin to receive the gathered final weights.
        if accelerator.is_main_process:
            template = copy.deepcopy(model).to("cpu")
        model.to(accelerator.device)
        units = sharding.shard_model(model, spec, accelerator.device, config.mixed_precision.value)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        raw, inner_optimizer = model, optimizer
        if accelerator.is_main_process:
            group = f", sharded in groups of {spec.shard_group} (HSDP)" if spec.shard_group not in (None, world) else ""
            logger.info(f"FSDP2: {units} units ({', '.join(spec.blocks)} + root) over {world} processes{group} "
                         f"on {accelerator.device.type}")
    else:
        units = 0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        raw, inner_optimizer = accelerator.unwrap_model(model), optimizer.optimizer
    scheduler = LambdaLR(inner_optimizer, lambda s: lr_factor(s, config))
    ema = EMA(raw, config.ema_decay) if config.ema_decay > 0 else None
    # a streamed source (pair shards) orders its epochs itself, within the shards it can hold
    sampler = source.make_sampler(config.seed) if hasattr(source, "make_sampler") else EpochSampler(len(source), config.seed)

    step = 0
    if resume_path is not None:
        if ckpt.is_sharded(resume_path):
            tr, rng = _resume_sharded(resume_path, raw, inner_optimizer, ema, config)
        else:  # whole tensors (one process or DDP), into whole weights or into FSDP2's shards
            tr, rng = _resume_full(resume_path, raw, optimizer, ema, config, sharded=spec is not None)
        scheduler.load_state_dict(tr["scheduler"])
        sampler.load_state_dict(tr["data"])
        if ema is not None:
            ema.updates = int(tr.get("ema_updates", 0))
        if len(rng) == world:
            ckpt.restore_rng(rng[rank])
        step = int(tr["step"])

    log = MetricsLog(work, accelerator, resume_step=step)
    bar = tqdm(total=config.max_steps, initial=step, desc=describe, unit="step", dynamic_ncols=True,
               disable=not (config.progress and accelerator.is_main_process))
    losses: list[float] = []
    window: list[float] = []
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    grad_norm = None
    # CPU threads follow the machine's load (--threads auto) or stay fixed; a GPU run leaves them alone.
    # A crash or a NaN stop still closes the bar, flushes the log and gives back torch's thread count.
    with contextlib.ExitStack() as stack:
        governor = stack.enter_context(Governor(config.threads if accelerator.device.type == "cpu" else torch.get_num_threads()))
        stack.callback(log.close)
        stack.callback(bar.close)
        while step < config.max_steps:
            governor.tick()
            indices = sampler.take(config.batch_size)  # every process draws the same global batch
            step_loss = 0.0
            for j in range(k):
                start = j * micro_global + offset  # this micro-batch's place in the global batch
                mine = indices[start:start + local]
                rnd = StepRandom(config.seed, step, start, local, config.batch_size)
                batch = source.get(mine, rnd, accelerator.device)
                if spec is not None:
                    global_loss, norm = _sharded_micro_step(config, model, params, optimizer, objective, batch, rnd,
                                                            accelerator, step, last=j == k - 1)
                    grad_norm = norm if norm is not None else grad_norm
                else:
                    with accelerator.accumulate(model):
                        loss = objective(model, batch, rnd)
                        global_loss = accelerator.reduce(loss.detach().float().reshape(1), "mean")
                        _check_finite(global_loss, step)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                step_loss += global_loss.item() / k
            if spec is not None or not accelerator.optimizer_step_was_skipped:
                scheduler.step()
                if ema is not None:
                    ema.update()
            step += 1
            losses.append(step_loss)
            window.append(step_loss)
            steps_since_log += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if step % config.log_every == 0 or step == config.max_steps:
                now = time.perf_counter()
                log.write(step, {
                    "loss": sum(window) / len(window),
                    "lr": scheduler.get_last_lr()[0],
                    **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                    "samples_per_s": steps_since_log * config.batch_size / max(now - t_log, 1e-9),
                    "threads": governor.current,
                })
                window, steps_since_log, t_log = [], 0, now
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.max_steps):
                _checkpoint(config, accelerator, model, optimizer, scheduler, sampler, ema, step, work,
                            sharded=spec is not None)
    if ema is not None:
        ema.copy_to()
    if spec is not None:
        full = sharding.full_state_dict(model)  # a collective: gathers the shards onto the main process
        if template is not None:
            template.load_state_dict(full)
            raw = template.to(accelerator.device)
    # The optimizer's moments and the last gradients are not needed to save the weights: free them before
    # the caller saves (serializing a model copies it), so the save's memory does not stack on top of them.
    raw.zero_grad(set_to_none=True)
    inner_optimizer.state.clear()
    accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    tail = losses[-50:]
    result = FitResult(step=step, final_loss=sum(tail) / len(tail) if tail else None,
                       seconds=time.perf_counter() - t_start,
                       resumed_from=str(resume_path) if resume_path else None, ema=ema is not None,
                       sharding="fsdp2" if spec is not None else "none", fsdp_units=units)
    return raw, result


def _refuse_unsupported(accelerator) -> None:
    """DeepSpeed and Megatron-LM shard in their own formats, which the engine's EMA and checkpoints do
    not read: refuse them (FSDP2 is the engine's sharded mode)."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise InputError(f"the engine does not train under {kind}",
                         "launch with an FSDP2 config (train/configs/fsdp-8gpu.yaml) or DDP "
                         "(train/configs/ddp-8gpu.yaml)")


def _check_finite(global_loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(global_loss).all():
        raise NumericsError(
            f"training loss is {global_loss.item()} at step {step + 1}",
            "lower --learning-rate or --max-grad-norm, or use --mixed-precision no/bf16; "
            "--resume latest restarts from the last checkpoint")


def _sharded_micro_step(config, model, params, optimizer, objective, batch, rnd, accelerator, step: int,
                        last: bool):
    """One micro-step under FSDP2: gradients are reduce-scattered only on the last micro-step of an
    optimizer step (``set_requires_gradient_sync``), which then clips and steps. Returns the global mean
    loss and the gradient norm before clipping (None when not clipping or not the last micro-step)."""
    k = config.gradient_accumulation_steps
    sharding.set_gradient_sync(model, last)
    loss = objective(model, batch, rnd)
    global_loss = accelerator.reduce(loss.detach().float().reshape(1), "mean")
    _check_finite(global_loss, step)
    (loss / k).backward()
    if not last:
        return global_loss, None
    norm = None
    if config.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        norm = sharding.local(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return global_loss, norm


def _resume_full(path: Path, raw, optimizer, ema, config, sharded: bool = False):
    """Read a one-process/DDP checkpoint (safetensors + optimizer.pt) into the model, optimizer and EMA;
    under FSDP2 every rank reads it and keeps its shards (sharding.load_full_into_sharded)."""
    state = ckpt.load_checkpoint(path)
    if ema is not None and state["ema"] is None:  # a fresh EMA would silently restart the average
        raise InputError(f"checkpoint {path} holds no EMA weights but --ema-decay is {config.ema_decay}",
                         "resume with --ema-decay 0 (as the run was started), or start over with --force")
    try:
        if sharded:
            sharding.load_full_into_sharded(raw, optimizer, ema, state["model"], state["optimizer"], state["ema"])
            return state["trainer"], state["rng"]
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except InputError:
        raise
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:120]})",
                         "resume with the same model and options, or start over with --force") from e
    if ema is not None:
        ema.load_local(state["ema"])
    return state["trainer"], state["rng"]


def _resume_sharded(path: Path, raw, optimizer, ema, config):
    """Read a DCP checkpoint written by any number of processes into this run's shards (or whole
    weights, in one process or DDP)."""
    meta = ckpt.load_sharded_meta(path)
    tr = meta["trainer"]
    if ema is not None and not tr.get("ema", False):
        raise InputError(f"checkpoint {path} holds no EMA weights but --ema-decay is {config.ema_decay}",
                         "resume with --ema-decay 0 (as the run was started), or start over with --force")
    try:
        sharding.load_dcp(path / ckpt.DCP_DIR, raw, optimizer, ema)
    except InputError:
        raise
    except Exception as e:  # DCP: missing keys, wrong shapes, a truncated shard file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"checkpoint {path} cannot be loaded into this model ({type(e).__name__}: {first[:120]})",
                         "resume with the same model and options, or from an earlier checkpoint") from e
    return tr, meta["rng"]


def _prepare_work_dir(config: TrainConfig, accelerator, work: Path) -> Path | None:
    """Resolve ``--resume``; refuse to silently overwrite an earlier run's checkpoints."""
    import shutil

    resume_path = ckpt.resolve_resume(config.resume, work)
    if resume_path is not None:
        ckpt.check_settings(resume_path, {name: getattr(config, name) for name in ckpt.ORDER_SETTINGS})
    existing = ckpt.list_checkpoints(work)
    if config.resume is None and existing and not config.force:
        raise OutputExistsError(f"work dir {work} holds checkpoints of an earlier run",
                                "pass --resume latest to continue it, or --force to start over")
    if config.resume == "latest" and resume_path is None and accelerator.is_main_process:
        logger.info(f"no checkpoint in {work} yet: starting from step 0")
    accelerator.wait_for_everyone()  # every process has read the folder before the main one edits it
    if accelerator.is_main_process:
        ckpt.remove_stale(work)  # temporary checkpoint folders of a killed run (we hold the work dir's lock)
        if config.resume is None and config.force:
            for old in existing:
                shutil.rmtree(old, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return resume_path


def _checkpoint(config, accelerator, model, optimizer, scheduler, sampler, ema, step: int, work: Path,
                sharded: bool = False) -> None:
    from accelerate.utils import gather_object

    rng_states = gather_object([ckpt.capture_rng()])  # every process's RNG, in rank order
    trainer_state = json.loads(json.dumps({
        "scheduler": scheduler.state_dict(),
        "data": sampler.state_dict(),
        "ema_updates": ema.updates if ema is not None else 0,
        "ema": ema is not None,
        "num_processes": accelerator.num_processes,
        "batch_size": config.batch_size,
        "max_steps": config.max_steps,
        "seed": config.seed,
    }))
    if sharded:  # every rank writes its shard (a collective); the main process renames the folder
        ckpt.save_sharded_checkpoint(work, step, lambda folder: sharding.save_dcp(folder, model, optimizer, ema),
                                     rng_states, trainer_state, config.keep_checkpoints, accelerator.is_main_process)
        return
    model_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        ckpt.save_checkpoint(work, step, model_state, ema.shadow if ema is not None else None,
                             optimizer.state_dict(), rng_states, trainer_state, config.keep_checkpoints)
    accelerator.wait_for_everyone()


def training_summary(config: TrainConfig, result: FitResult, accelerator) -> dict[str, Any]:
    """What a trained artifact's manifest records about its training."""
    return {
        "steps": result.step,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "resumed_from": result.resumed_from,
        "weights": "ema" if result.ema else "raw",
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "sharding": result.sharding,  # fsdp2: the engine sharded the model itself
        "fsdp_units": result.fsdp_units,
        "device": str(accelerator.device),
        "global_batch_size": config.batch_size,
        "metrics_log": str(Path(config.work_path) / "metrics.jsonl"),
    }
