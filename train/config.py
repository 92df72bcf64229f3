"""The training engine's options, shared by every training stage (teacher, reflow, distill).

A stage's config is a keyword-only dataclass that extends :class:`TrainConfig` with its own fields;
its field names are the CLI option names (``max_steps`` ↔ ``--max-steps``) and the keys of a
``--config`` file (TOML or YAML; ``max-steps`` and ``max_steps`` both accepted). This module is imported
by ``--help``: keep it free of heavy imports.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from ..artifacts import check_output, check_overlap
from ..errors import InputError
from ..threads import threads_setting
from ..validators import boolean, choice, integer, number, optional_integer, seed, short, text_file


class MixedPrecision(str, enum.Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class LRSchedule(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


class AttentionKernel(str, enum.Enum):
    """UNet attention kernel: PyTorch's scaled_dot_product_attention (flash/memory-efficient where the
    device has them) or diffusers' plain matmul-softmax-matmul."""

    sdpa = "sdpa"
    eager = "eager"


class Sharding(str, enum.Enum):
    """How the weights are spread over processes: ``none`` (each process holds them all: one process or
    DDP) or ``fsdp2`` (torch's fully_shard per UNet block; weights, gradients, optimizer state and EMA
    sharded). An accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2`` asks for
    ``fsdp2`` too."""

    none = "none"
    fsdp2 = "fsdp2"


class DistillLoss(str, enum.Enum):
    """The distances of ``train distill`` (losses.py implements them)."""

    l2 = "l2"
    pseudo_huber = "pseudo-huber"
    lpips = "lpips"


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """The engine's options. ``batch_size`` is the GLOBAL batch of one optimizer step: summed over
    processes and gradient-accumulation micro-steps (so a 1-process and an 8-process run with the same
    ``batch_size`` see the same samples per step); each process runs micro-batches of
    ``batch_size / (num_processes × gradient_accumulation_steps)``, which must divide evenly.

    Made configs are valid: ``__post_init__`` checks types and ranges once and turns choice strings (from
    a config file) into their enums."""

    output: str
    work_dir: str | None = None  # checkpoints + logs; default: OUTPUT.train beside the output
    max_steps: int = 1100  # the digits teacher: 1,100 steps × 128 on its 0.8 M-parameter UNet
    batch_size: int = 128
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    ema_decay: float = 0.999  # 0 turns EMA off (then the raw weights are saved)
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_checkpointing: bool = False
    attention: AttentionKernel = AttentionKernel.sdpa
    sharding: Sharding = Sharding.none
    shard_group: int | None = None  # fsdp2: shard within groups of N processes, replicate across (HSDP)
    checkpoint_every: int = 500  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    seed: int = 0
    log_every: int = 10
    cpu: bool = False
    threads: str | int = "auto"  # CPU threads: follow the machine's load, or a fixed count (bit-exact reruns)
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output:
            raise InputError("no output folder given", "pass -o OUT (or set output in the config file)")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every"):
            integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "checkpoint_every"):
            integer(name, getattr(self, name), 0)
        seed("seed", self.seed)
        self.learning_rate = number("learning_rate", self.learning_rate, 0.0, open_low=True)
        self.weight_decay = number("weight_decay", self.weight_decay, 0.0)
        self.max_grad_norm = number("max_grad_norm", self.max_grad_norm, 0.0)
        self.ema_decay = number("ema_decay", self.ema_decay, 0.0, 1.0, open_high=True)
        for name in ("gradient_checkpointing", "cpu", "force", "progress"):
            boolean(name, getattr(self, name))
        self.mixed_precision = choice("mixed_precision", self.mixed_precision, MixedPrecision)
        self.lr_schedule = choice("lr_schedule", self.lr_schedule, LRSchedule)
        self.attention = choice("attention", self.attention, AttentionKernel)
        self.sharding = choice("sharding", self.sharding, Sharding)
        optional_integer("shard_group", self.shard_group, 1)
        self.threads = threads_setting("threads", self.threads)
        if self.batch_size % self.gradient_accumulation_steps:
            raise InputError(
                f"batch_size {self.batch_size} is not a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}", "batch_size is the global batch: make it divisible")
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise InputError(f"resume must be 'latest' or a checkpoint folder, got {short(self.resume)}", "pass --resume latest")
        if self.work_dir is not None and not isinstance(self.work_dir, str):
            raise InputError(f"work_dir must be a path, got {short(self.work_dir)}", "pass --work-dir DIR")

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output + ".train")

    def inputs(self) -> tuple[str, ...]:
        """The paths this run reads (a stage adds its model, data, pairs…): neither the output nor the
        work dir may be, contain or lie inside one of them."""
        return ()

    def check_paths(self) -> None:
        """Refuse, before any work, an output that overlaps an input or the work dir, an existing output
        without ``force``, and a work dir that overlaps an input."""
        resume = (self.resume,) if self.resume not in (None, "latest") else ()
        check_output(self.output, self.force, (*self.inputs(), *resume))
        self.check_work_dir()

    def check_work_dir(self) -> None:
        """The work dir overlaps no input, and is not (or holds, or sits in) the output, which need not
        exist yet."""
        check_overlap(self.work_path, self.inputs(), what="work dir")
        check_overlap(self.work_path, (self.output,), what="work dir", existing_only=False, other="output")


# ---------------------------------------------------------------------------------------------------
# config files


def config_keys(cls: type) -> list[str]:
    """Keys a config file may set for ``cls``: every field except those only the CLI sets."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("progress",)]


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; anything this big is a mistake


def _refuse_yaml_aliases(text: str, path: Path) -> None:
    """YAML anchors and aliases (``&a`` / ``*a``) are refused: a few hundred bytes of nested aliases expand
    to gigabytes (the "billion laughs"), and a config file has no use for them."""
    import yaml

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise InputError(f"config file {path} uses a YAML anchor or alias (line {event.start_mark.line + 1}), "
                             "which config files may not", "write each value out in full")


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """A TOML (tomllib) or YAML file of ``{option: value}``; keys are option names (``max-steps`` or
    ``max_steps``). An unknown key is a one-line error that lists the valid ones. The file must be UTF-8,
    at most MAX_CONFIG_BYTES, and (YAML) free of anchors and aliases; errors quote at most a short
    excerpt of a bad key or value."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist", "pass a TOML or YAML file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InputError(f"config file {path} is neither .toml nor .yaml", "use a .toml or .yaml file")
    text = text_file(path, "config file", "save it as UTF-8 TOML or YAML", limit=MAX_CONFIG_BYTES)
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            _refuse_yaml_aliases(text, path)
            data = yaml.safe_load(text) or {}
    except InputError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot parse config file {path}: {first[:150]}", "fix its syntax") from e
    if not isinstance(data, dict):
        raise InputError(f"config file {path} is not a table of option = value", "write one option per line")
    valid = config_keys(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise InputError(f"unknown key {short(key, 40)} in {path}",
                             "valid keys: " + ", ".join(k.replace("_", "-") for k in valid))
        out[name] = value
    return out


def merge_config(cls: type, defaults: dict[str, Any], file_values: dict[str, Any], explicit: dict[str, Any]):
    """``cls(**defaults ← file ← explicit)``: command-line flags override the file, the file the defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in {**defaults, **file_values, **explicit}.items() if k in names}
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return cls(**values)


def field_default(cls: type, name: str) -> Any:
    """A dataclass field's default (the CLI shows the library's defaults, one source of truth)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name}")
