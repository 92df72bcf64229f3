"""FSDP2 for the training engine: per-block sharding, a sharded EMA, sharded checkpoints.

The engine shards the model itself with torch's ``fully_shard`` (FSDP2) rather than through
``accelerator.prepare``, for one reason: accelerate turns an FSDP config into plain DDP on CPU without a
word (``use_cpu``), so the only FSDP path a CPU test can prove is one the engine builds. The same code
runs on GPUs; accelerate still launches the processes and owns the process group.

FSDP2 is asked for by ``sharding = "fsdp2"`` in the training config, or by an accelerate config with
``distributed_type: FSDP`` and ``fsdp_version: 2`` (the launcher exports ``ACCELERATE_USE_FSDP`` and
``FSDP_VERSION``; the block classes come from ``fsdp_transformer_layer_cls_to_wrap`` when set).

* Wrapping: every ResNet block and every transformer block of the UNet is its own FSDP unit (its
  weights are gathered just before it runs and freed after), then the root takes the rest.
* Mixed precision: ``bf16`` keeps fp32 master shards, computes in bf16 and reduces gradients in fp32.
* Gradients are averaged over processes. On CPU (gloo) FSDP2's default ``ReduceOp.AVG`` reduce-scatter
  is not trusted: :func:`shard_model` forces SUM collectives with FSDP2's own pre/post division
  (``set_force_sum_reduction_for_comms``); a test compares the gradient norm with one process.
* EMA: the averages are kept as fp32 copies of each rank's local shard and updated with one foreach
  lerp; saved as DTensors with the weights' global shapes, so a checkpoint reshards.
* Checkpoints: ``torch.distributed.checkpoint`` (DCP), every rank writes its shard into the same
  temporary folder, which the main process renames into place (see checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..errors import InputError

# diffusers' UNet blocks that hold the weights: each one an FSDP unit
DEFAULT_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What to shard and how: the block classes wrapped as units, whether blocks free their gathered
    weights after forward (FULL_SHARD) or keep them until backward (SHARD_GRAD_OP), and the shard group:
    ``None`` shards over all processes; N shards within groups of N processes (one node's GPUs) and
    replicates across the groups (HSDP: gradients reduce-scattered inside a node, all-reduced across)."""

    blocks: tuple[str, ...] = DEFAULT_BLOCKS
    reshard_after_forward: bool = True
    shard_group: int | None = None
    source: str = "config"  # where the request came from: "config" (sharding = fsdp2) or "accelerate"


def requested(sharding: str, environ=os.environ, shard_group: int | None = None) -> ShardSpec | None:
    """The FSDP2 request of this run, from the config's ``sharding`` (and ``shard_group``) or accelerate's
    launch environment (``fsdp_sharding_strategy: HYBRID_SHARD`` shards within each node:
    ``LOCAL_WORLD_SIZE`` processes); ``None`` for DDP / one process. An accelerate FSDP1 config is refused
    with its fix."""
    use_fsdp = environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if use_fsdp and environ.get("FSDP_VERSION", "1") != "2":
        raise InputError(f"the accelerate config asks for FSDP version {environ.get('FSDP_VERSION', '1')}; "
                         "the engine shards with FSDP2 only",
                         "set fsdp_version: 2 in the config (train/configs/fsdp-8gpu.yaml)")
    if not use_fsdp and sharding != "fsdp2":
        return None
    blocks = DEFAULT_BLOCKS
    names = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "") if use_fsdp else ""
    if names.strip():
        blocks = tuple(n.strip() for n in names.split(",") if n.strip())
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "shard_grad_op") if use_fsdp else True
    if use_fsdp and environ.get("FSDP_SHARDING_STRATEGY", "").upper() in ("HYBRID_SHARD", "4"):
        shard_group = shard_group or int(environ.get("LOCAL_WORLD_SIZE", "0")) or None
    return ShardSpec(blocks=blocks, reshard_after_forward=reshard, shard_group=shard_group,
                     source="accelerate" if use_fsdp else "config")


def make_mesh(device_type: str, world: int, shard_group: int | None):
    """A 1-D mesh over all processes, or HSDP's 2-D (replicate, shard) mesh of groups of ``shard_group``."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_group is None or shard_group == world:
        return init_device_mesh(device_type, (world,))
    if shard_group < 1 or world % shard_group:
        raise InputError(f"shard_group {shard_group} does not divide the {world} processes",
                         "use the processes per node (or leave it unset: shard over all)")
    return init_device_mesh(device_type, (world // shard_group, shard_group), mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, spec: ShardSpec, device: torch.device, mixed_precision: str) -> int:
    """Shard ``model`` in place (a mesh on ``device``'s type: an explicit CPU mesh on CPU, so a visible GPU
    is never picked by accident; 2-D for HSDP). Returns the number of FSDP units."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise InputError("FSDP2 needs a process group", "launch with `accelerate launch` (or torchrun)")
    if mixed_precision == "fp16":
        raise InputError("--mixed-precision fp16 is not supported with FSDP2 (it needs a sharded grad scaler)",
                         "use --mixed-precision bf16 (or no)")
    mesh = make_mesh(device.type, torch.distributed.get_world_size(), spec.shard_group)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=spec.reshard_after_forward)
    wanted = set(spec.blocks)
    blocks = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if not blocks:
        raise InputError(f"{type(model).__name__} has no {', '.join(spec.blocks)} blocks to shard",
                         "set fsdp_transformer_layer_cls_to_wrap to the model's block classes")
    for m in blocks:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if device.type == "cpu":
        # trackers report gloo's ReduceOp.AVG reduce-scatter returning sums; on torch 2.13 it averaged in
        # a direct check, but SUM plus FSDP2's own division is the documented workaround: use it on CPU
        for m in units:
            m.set_force_sum_reduction_for_comms(True)
    return len(units)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def set_gradient_sync(model: torch.nn.Module, on: bool) -> None:
    """Gradient accumulation without communication: only the last micro-step reduce-scatters."""
    if is_sharded(model):
        model.set_requires_gradient_sync(on)


class EMA:
    """Exponential moving average of the trainable weights, with the usual warm-up
    ``decay_n = min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the init.

    The average of a sharded weight is kept for this rank's shard only (fp32), and all of them are
    updated with one ``torch._foreach_lerp_``; :meth:`state_dict` gives them back as DTensors with the
    weights' global shape and placement (what DCP saves and reshards)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.shadow = {k: local(p).detach().clone().float() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module | None = None) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in names],
                             [local(self.params[k]).detach().float() for k in names], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module | None = None) -> None:
        for k, p in self.params.items():
            local(p).copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for k, p in self.params.items():
            if isinstance(p, DTensor):
                out[k] = DTensor.from_local(self.shadow[k], p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
            else:
                out[k] = self.shadow[k]
        return out

    def load_local(self, state: dict[str, torch.Tensor]) -> None:
        """Take the averages back from tensors shaped like :meth:`state_dict`'s (DTensors or plain)."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise InputError(f"the checkpoint's EMA lacks {len(missing)} weights (first: {missing[0]})",
                             "resume with the same model, or start over with --force")
        self.shadow = {k: local(state[k]).detach().clone().float() for k in self.shadow}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered one tensor at a time onto the main process's CPU (a
    collective: every rank calls it; the others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict:
    """What DCP saves and loads: weights, optimizer state (keyed by weight names, so it reshards) and
    EMA, all as this rank's shards of global tensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> None:
    """Every rank writes its shard into ``folder`` (a collective; the folder must be shared by all ranks:
    one file system for every node)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dcp_state(model, optimizer, ema), checkpoint_id=str(folder))


def load_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> None:
    """Read a DCP checkpoint into ``model``/``optimizer``/``ema`` whatever the number of processes that
    wrote it (DCP reads the parts of the global tensors this rank holds); one process works too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = dcp_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        ema.load_local(state["ema"])


def load_full_into_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
                           model_sd: dict, optim_sd: dict, ema_sd: dict | None) -> None:
    """A one-process/DDP checkpoint (whole tensors; every rank has read it) into this run's shards:
    weights and AdamW state through DCP's state-dict API (``full_state_dict``: each rank keeps its part),
    the optimizer's index-keyed state renamed to weight names first; the EMA cut like its weight."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor, distribute_tensor

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    groups = optim_sd["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(names):
        raise InputError(f"the checkpoint's optimizer holds {sum(len(g['params']) for g in groups)} weights, "
                         f"this model trains {len(names)}", "resume with the same model, or start over with --force")
    by_name = {"state": {names[int(i)]: v for i, v in optim_sd["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_name, options=opts)
    if ema is not None:
        shadow = {}
        for k, p in ema.params.items():
            full = ema_sd[k].to(local(p).device, torch.float32)
            shadow[k] = (distribute_tensor(full, p.device_mesh, p.placements).to_local().clone()
                         if isinstance(p, DTensor) else full.clone())
        ema.shadow = shadow
