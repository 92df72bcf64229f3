"""``train reflow`` and ``train distill``: InstaFlow's two stages on the training engine.

* reflow — a 2-rectified flow: the RF loss at ``s ~ U(0, 1)`` on the FIXED (z, x1) pairs of a
  reflow-data folder (the teacher's own couplings), initialised from the teacher. Training on these
  couplings straightens the flow, so few Euler steps (even one) go far.
* distill — the one-step student: ``s = 0``, a distance between ``z + v(z, τ=1000)`` and the
  teacher's ``x1`` (``l2``, ``pseudo-huber`` or ``lpips`` through the VAE decoder), initialised from
  MODEL (InstaFlow distils the 2-RF). Its manifest marks it one-step: `generate`/`eval` use 1 step.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    inherited_prompts,
    make_manifest,
    prompt_sample,
    sha256_tree,
    write_manifest,
)
from ..errors import InputError
from ..hub import HUB_ID
from ..pipeline import ModelInfo, check_pipeline_folder, load_pipeline, quiet_libraries
from ..presets import count_params
from ..validators import boolean, choice, integer, number, optional_integer
from .conditioning import MAX_CACHED_PROMPTS, PromptConditioning
from .config import DistillLoss, TrainConfig
from .pairs import PairsDataset, PairShards
from .teacher import _end_distributed


@dataclasses.dataclass(kw_only=True)
class PairsTrainConfig(TrainConfig):
    """The engine's options plus what both pair-trained stages take: the model, the pairs and how many
    of them to use."""

    model: str
    pairs: str
    max_pairs: int | None = None  # train on the first N pairs only (pair-count studies); None: all
    # a set of more shards than this is streamed: at most this many (+1) in memory per process, each
    # epoch shuffled within windows of this many shards; a smaller set is held and shuffled whole.
    # 8 shards of 500 SD1.5 pairs (64×64 latents, fp32 noise + latent): about 0.5 GB.
    pair_shards_in_memory: int = 8
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, str) or not self.model:
            raise InputError("no model given", "pass a pipeline folder or hub id as MODEL")
        if not isinstance(self.pairs, str) or not Path(self.pairs).is_dir():
            raise InputError(f"pairs folder {self.pairs} does not exist", "make it with `instaflow-edge train reflow-data`")
        optional_integer("max_pairs", self.max_pairs, 1)
        integer("pair_shards_in_memory", self.pair_shards_in_memory, 1)
        boolean("allow_pickle", self.allow_pickle)

    def inputs(self) -> tuple[str, ...]:
        return (self.model, self.pairs)


@dataclasses.dataclass(kw_only=True)
class ReflowConfig(PairsTrainConfig):
    """Options of ``instaflow-edge train reflow``: the engine's plus the model and the pairs."""

    cfg_dropout: float = 0.0  # pairs made with guidance g encode the guided flow: no dropout by default
    default_steps: int = 4  # the 2-RF is usable at 2–8 steps

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cfg_dropout = number("cfg_dropout", self.cfg_dropout, 0.0, 1.0, open_high=True)
        integer("default_steps", self.default_steps, 1)


@dataclasses.dataclass(kw_only=True)
class DistillConfig(PairsTrainConfig):
    """Options of ``instaflow-edge train distill``: the engine's plus the loss."""

    loss: DistillLoss = DistillLoss.l2
    lpips_weights: str | None = None
    teacher: str | None = None  # recovery of a pruned MODEL: the unpruned one-step model (output loss)
    feature_weight: float = 0.0  # BK-SDM's feature loss at the surviving block outputs (needs teacher)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss = choice("loss", self.loss, DistillLoss)
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            raise InputError(f"teacher must be a pipeline folder, got {self.teacher!r}", "pass --teacher MODEL")
        if self.teacher is not None:  # before the student and the pairs load: a typo fails in a second
            if Path(self.teacher).exists():
                check_pipeline_folder(Path(self.teacher), self.allow_pickle)
            elif not HUB_ID.match(self.teacher) or self.teacher.startswith((".", "/", "~")):
                raise InputError(f"--teacher {self.teacher} does not exist",
                                 "pass the pipeline folder MODEL was pruned from (or a hub id like org/name)")
        self.feature_weight = number("feature_weight", self.feature_weight, 0.0)
        if self.feature_weight > 0 and self.teacher is None:
            raise InputError("--feature-weight needs the unpruned model's block outputs",
                             "pass --teacher MODEL (the model you pruned), or --feature-weight 0")
        if self.lpips_weights is not None and not isinstance(self.lpips_weights, str):
            raise InputError(f"lpips_weights must be a path, got {self.lpips_weights!r}", "pass --lpips-weights FILE")
        if self.loss is DistillLoss.lpips and not self.lpips_weights:
            raise InputError("--loss lpips needs LPIPS weights, which cannot be downloaded here",
                             "pass --lpips-weights FILE (lpips.LPIPS(net='vgg').state_dict()), or use --loss l2")

    def inputs(self) -> tuple[str, ...]:
        return (*super().inputs(), *((self.lpips_weights,) if self.lpips_weights else ()),
                *((self.teacher,) if self.teacher else ()))


class PairsSource:
    """Fixed (z, x1) pairs and their prompt conditioning (frozen text encoder, one embedding per unique
    prompt: ``conditioning.PromptConditioning``); ``cfg_dropout`` replaces prompts by "" as for the teacher."""

    def __init__(self, pairs, pipe, cfg_dropout: float = 0.0, max_cached_prompts: int = MAX_CACHED_PROMPTS):
        import torch

        self.z, self.x1 = pairs.noise, pairs.latents
        uniq, self.prompt_index = torch.unique(pairs.input_ids, dim=0, return_inverse=True)
        self.conditioning = PromptConditioning(pipe, uniq, max_cached_prompts)
        self.cfg_dropout = cfg_dropout

    def __len__(self) -> int:
        return len(self.z)

    def get(self, indices, rnd, device) -> dict:
        drop = rnd.uniform() < self.cfg_dropout  # drawn even at 0 so the random stream never shifts
        return {"z": self.z[indices].to(device), "x1": self.x1[indices].to(device),
                "cond": self.conditioning.cond(self.prompt_index[indices], drop, device)}


class StreamingPairsSource:
    """The pairs of a reflow-data folder, streamed from its shards: :meth:`make_sampler` gives the engine
    an epoch order that stays within ``window`` shards at a time (streams.ShardWindowSampler), and
    :meth:`get` reads the shards it needs into a cache of ``window + 1`` shards, so memory is bounded by
    a few shards, not the set (3 M pairs need what 3 k need). Conditioning as :class:`PairsSource`: one
    cached embedding per unique prompt when the set has few (found by scanning the shards' token ids,
    one shard at a time), else the frozen encoder per batch."""

    def __init__(self, shards: PairShards, pipe, cfg_dropout: float = 0.0, window: int = 8,
                 max_cached_prompts: int = MAX_CACHED_PROMPTS):
        import torch

        self.shards, self.window, self.cfg_dropout = shards, window, cfg_dropout
        self.ends = torch.tensor(shards.counts).cumsum(0)
        self.starts = (self.ends - torch.tensor(shards.counts)).tolist()
        self.cache: dict = {}  # shard number → tensors, oldest first (dicts keep insertion order)
        self.peak_cached = 0
        self.lookup: dict[bytes, int] = {}
        rows = []
        for k in range(len(shards.counts)):
            for row in torch.unique(shards.token_rows(k), dim=0):
                key = row.numpy().tobytes()
                if key not in self.lookup:
                    self.lookup[key] = len(rows)
                    rows.append(row)
            if len(rows) > max_cached_prompts:
                break  # too many to cache: encode per batch
        self.conditioning = PromptConditioning(pipe, torch.stack(rows), max_cached_prompts)

    def __len__(self) -> int:
        return len(self.shards)

    def make_sampler(self, seed: int):
        from .streams import ShardWindowSampler  # torch: not at the top of a module --help imports

        return ShardWindowSampler(self.shards.counts, seed, self.window)

    def _shard(self, k: int) -> dict:
        if k in self.cache:
            self.cache[k] = self.cache.pop(k)  # most recently used last
        else:
            while len(self.cache) >= self.window + 1:
                self.cache.pop(next(iter(self.cache)))
            self.cache[k] = self.shards.load(k)
        self.peak_cached = max(self.peak_cached, len(self.cache))
        return self.cache[k]

    def get(self, indices, rnd, device) -> dict:
        import torch

        drop = rnd.uniform() < self.cfg_dropout  # drawn even at 0 so the random stream never shifts
        which = torch.searchsorted(self.ends, indices, right=True)
        parts: dict[str, list] = {"noise": [], "latents": [], "input_ids": []}
        order = []
        for k in torch.unique(which).tolist():
            sel = (which == k).nonzero().flatten()
            t = self._shard(k)
            local = indices[sel] - self.starts[k]
            for key in parts:
                parts[key].append(t[key][local])
            order.append(sel)
        back = torch.argsort(torch.cat(order))  # rows back in the order of ``indices``
        z, x1, ids = (torch.cat(parts[key])[back] for key in ("noise", "latents", "input_ids"))
        if self.conditioning.embeddings is not None:
            index = torch.tensor([self.lookup[row.numpy().tobytes()] for row in ids])
            cond = self.conditioning.cond(index, drop, device)
        else:
            cond = self.conditioning.cond_ids(ids, drop, device)
        return {"z": z.to(device), "x1": x1.to(device), "cond": cond}


def _pairs_source(cfg, pairs: PairShards, pipe, cfg_dropout: float = 0.0):
    """A set of at most ``pair_shards_in_memory`` shards is held whole (PairsSource, as before streaming:
    the same memory the streamed reader may use, the same epoch order); a larger one is streamed."""
    if len(pairs.counts) <= cfg.pair_shards_in_memory:
        data = PairsDataset(cfg.pairs, verify=False)  # PairShards has just verified every shard
        if cfg.max_pairs is not None:
            data.truncate(cfg.max_pairs)
        return PairsSource(data, pipe, cfg_dropout)
    return StreamingPairsSource(pairs, pipe, cfg_dropout, cfg.pair_shards_in_memory)


def _load(cfg, accelerator):
    pairs = PairShards(cfg.pairs, max_pairs=cfg.max_pairs)  # verified first: a corrupt shard fails before the model loads
    dev = accelerator.device
    pipe = load_pipeline(cfg.model, device=dev.type if dev.type in ("cpu", "mps") else str(dev), dtype="float32",
                         allow_pickle=cfg.allow_pickle)
    shape = pairs.latent_shape
    want = (pipe.unet.config.in_channels, pipe.default_size // pipe.vae_scale_factor,
            pipe.default_size // pipe.vae_scale_factor)
    if shape[0] != want[0]:
        raise InputError(f"pairs in {cfg.pairs} have {shape[0]} latent channels, {cfg.model}'s UNet takes {want[0]}",
                         "make the pairs with a teacher of the same architecture")
    return pipe, pairs


def _park_unused(cfg, pipe, source) -> list[str]:
    """Drop from memory, for the length of the run, the components training does not run: the text encoder
    once every prompt's embedding is cached, the VAE when the loss does not decode (every loss but lpips).
    Their weights stay on disk in MODEL; :func:`_save` reloads them. At SD1.5 size this is 0.8 GB, what
    keeps recovery distillation within 12 GiB. Returns the names parked."""
    parked = []
    if getattr(source.conditioning, "text_encoder", True) is None:
        parked.append("text_encoder")
    if getattr(cfg, "loss", None) is not DistillLoss.lpips:
        parked.append("vae")
    for name in parked:
        getattr(pipe, name).to("meta")  # the module and its config stay; its tensors are freed
    return parked


def _unpark(cfg, pipe, parked: list[str]) -> None:
    """Reload the parked components from MODEL (unchanged: inputs are never written)."""
    import torch

    with quiet_libraries():
        for name in parked:
            cls = type(getattr(pipe, name))
            setattr(pipe, name, cls.from_pretrained(cfg.model, subfolder=name, torch_dtype=torch.float32,
                                                    use_safetensors=None if cfg.allow_pickle else True,
                                                    local_files_only=Path(cfg.model).is_dir()).eval())


def _save(cfg, accelerator, pipe, unet, result, info, stage: str, pairs, extra: dict, parked: list[str] = ()) -> None:
    from .engine import training_summary

    if accelerator.is_main_process:
        _unpark(cfg, pipe, list(parked))
        pipe.unet = unet.eval().requires_grad_(False)
        with atomic_dir(cfg.output, cfg.force, cfg.inputs()) as tmp:
            pipe.save(tmp, info)
            write_manifest(tmp, make_manifest(
                "pipeline", cfg, model=dataclasses.asdict(info), stage=stage, base_model=cfg.model,
                data={"pairs": cfg.pairs, "num_pairs": len(pairs), "pairs_identity": pairs.manifest.get("identity")},
                prompts=prompt_sample(pairs.prompts) or inherited_prompts(cfg.model).get("prompts"),
                training=training_summary(cfg, result, accelerator),
                params={k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")},
                content_sha256=sha256_tree(tmp), **extra,
            ))
    accelerator.wait_for_everyone()


def _teacher_unet(config: DistillConfig, pipe):
    """The unpruned teacher's UNet, checked against the student: same latent and text spaces, and for the
    feature loss the same stage widths (block pruning keeps them; channel pruning does not)."""
    t = load_pipeline(config.teacher, device=str(pipe.device), dtype="float32", allow_pickle=config.allow_pickle).unet
    s = pipe.unet
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if t.config[key] != s.config[key]:
            raise InputError(f"teacher {config.teacher} has {key} {t.config[key]}, {config.model} has {s.config[key]}",
                             "pass the model that MODEL was pruned from as --teacher")
    if config.feature_weight > 0 and list(t.config.block_out_channels) != list(s.config.block_out_channels):
        raise InputError(f"the feature loss compares block outputs, but {config.model}'s stage widths "
                         f"{list(s.config.block_out_channels)} differ from the teacher's {list(t.config.block_out_channels)}",
                         "use --feature-weight 0 for channel-pruned models")
    return t


def train_reflow(config: ReflowConfig) -> str:
    """Train a 2-rectified flow on fixed teacher pairs; returns the output folder."""
    from .engine import claimed, fit, make_accelerator
    from .objectives import RectifiedFlowObjective

    config.check_paths()  # before minutes of training: no overlap with an input, no existing output
    accelerator = make_accelerator(config)
    with claimed(config, accelerator):  # the main process holds the output's lock for the whole run
        pipe, pairs = _load(config, accelerator)
        source = _pairs_source(config, pairs, pipe, config.cfg_dropout)
        unet, result = fit(config, accelerator, pipe.unet, source, RectifiedFlowObjective(), describe="train reflow")
        info = ModelInfo(flow="rectified_flow", default_steps=config.default_steps, source=config.model)
        _save(config, accelerator, pipe, unet, result, info, "reflow", pairs, {})
    _end_distributed()
    return os.fspath(config.output)


def train_distill(config: DistillConfig) -> str:
    """Distil MODEL into a one-step generator on fixed teacher pairs; returns the output folder."""
    from .engine import claimed, fit, make_accelerator
    from .losses import make_distance
    from .objectives import OneStepObjective, TeacherDistillObjective

    config.check_paths()  # before minutes of training: no overlap with an input, no existing output
    accelerator = make_accelerator(config)
    with claimed(config, accelerator):  # the main process holds the output's lock for the whole run
        pipe, pairs = _load(config, accelerator)
        distance = make_distance(config.loss, pipe, config.lpips_weights, config.allow_pickle)
        source = _pairs_source(config, pairs, pipe)
        if config.teacher:
            objective = TeacherDistillObjective(_teacher_unet(config, pipe), distance, config.feature_weight)
        else:
            objective = OneStepObjective(distance)
        parked = _park_unused(config, pipe, source)
        unet, result = fit(config, accelerator, pipe.unet, source, objective, describe="train distill")
        del objective  # the teacher's UNet (3.4 GB at SD1.5) is not needed to save the student
        info = ModelInfo(flow="rectified_flow", default_steps=1, source=config.model)
        extra = {"teacher": config.teacher, "feature_weight": config.feature_weight} if config.teacher else {}
        _save(config, accelerator, pipe, unet, result, info, "distill", pairs,
              {"one_step": True, "loss": config.loss.value, **extra}, parked)
    _end_distributed()
    return os.fspath(config.output)

