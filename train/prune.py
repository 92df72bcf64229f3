"""``instaflow-edge prune``: a smaller UNet, expressed in diffusers' own ``UNet2DConditionModel`` config.

Two methods, both writing an ordinary pipeline folder (safetensors; ``from_pretrained`` loads it; every
other command takes it unchanged), to be recovered with ``train distill`` (docs/prune.md):

* ``blocks`` — BK-SDM's block removal (Kim et al., 2023). Variants: ``small`` removes the mid-block and
  the second ResNet/attention pair of every stage (BK-SDM-Small), ``base`` only the pairs (BK-SDM-Base),
  ``mid`` only the mid-block (the one removal a model with one pair per stage can take). In the config
  this is ``mid_block_type=None`` and a per-stage ``layers_per_block`` list one lower (the up blocks then
  have layers + 1, as diffusers builds them). Down stages keep their first pairs; up stages keep their
  first pairs and their last one (the last takes the skip of the stage above, whose width differs).
* ``channels`` — every stage narrowed by ``ratio`` (kept widths rounded to a multiple of the norm groups
  and attention heads, so ``block_out_channels`` can say it). Which channels survive is decided by
  importance (the L1 norm of the weights that write them), one index set per stage for the residual
  stream and skips, and one per inner space (ResNet hidden, transformer stream, per-head query/key and
  value spaces, feed-forward hidden). The time embedding's sinusoid narrows with stage 0: its input
  columns are taken at the nearest frequency.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    inherited_prompts,
    make_manifest,
    sha256_tree,
    write_manifest,
)
from ..errors import InputError, ModelError
from ..pipeline import check_pipeline_folder, load_pipeline
from ..presets import count_params
from ..threads import Governor, threads_setting
from ..validators import boolean, choice, json_file, number, short
from .macs import unet_macs


class PruneMethod(str, enum.Enum):
    blocks = "blocks"
    channels = "channels"


class BlockVariant(str, enum.Enum):
    """What ``--method blocks`` removes (BK-SDM's names)."""

    small = "small"  # mid-block + the second pair per stage
    base = "base"  # the second pair per stage
    mid = "mid"  # the mid-block only


DEFAULT_RATIO = 0.25


@dataclasses.dataclass(kw_only=True)
class PruneConfig:
    """Options of ``instaflow-edge prune``."""

    model: str
    output: str
    method: PruneMethod = PruneMethod.blocks
    variant: BlockVariant = BlockVariant.small
    ratio: float | None = None  # channels: share of each stage's channels removed, in (0, 1)
    threads: str | int = "auto"  # CPU threads: follow the machine's load (threads.py), or a fixed count
    allow_pickle: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InputError("no model given", "pass a pipeline folder as MODEL")
        if not isinstance(self.output, str) or not self.output:
            raise InputError("no output folder given", "pass -o OUT")
        self.method = choice("method", self.method, PruneMethod)
        self.variant = choice("variant", self.variant, BlockVariant)
        if self.ratio is not None:
            if self.method is PruneMethod.blocks:
                raise InputError("--ratio applies to --method channels only", "drop --ratio, or pass --method channels")
            self.ratio = number("ratio", self.ratio, 0.0, 1.0, open_low=True, open_high=True)
        boolean("allow_pickle", self.allow_pickle)
        boolean("force", self.force)
        self.threads = threads_setting("threads", self.threads)

    @property
    def effective_ratio(self) -> float:
        return DEFAULT_RATIO if self.ratio is None else self.ratio


# ---------------------------------------------------------------------------------------------------
# plans: the new UNet config (pure dict work, no torch)


def _unet_config_of(model: str, allow_pickle: bool) -> dict:
    """The UNet's config.json, after the folder checks; a pipeline whose UNet is not a
    UNet2DConditionModel is refused before anything heavy loads."""
    folder = Path(model)
    if not folder.is_dir():
        raise ModelError(f"model path {model} is not a folder", "pass a local diffusers pipeline folder (prune writes a copy)")
    index = check_pipeline_folder(folder, allow_pickle)
    unet = index.get("unet")
    cls = unet[1] if isinstance(unet, list) and len(unet) == 2 else None
    if cls != "UNet2DConditionModel":
        raise ModelError(f"{folder}'s unet is a {cls or 'unknown class'}, not a UNet2DConditionModel",
                         "prune takes Stable Diffusion-style pipelines (UNet2DConditionModel)")
    path = folder / "unet" / "config.json"
    cfg = json_file(path, "UNet config", "restore the UNet's config", error=ModelError)
    check_unet_config(cfg, path)
    return cfg


def _ints(v, low: int = 1) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v)


def check_unet_config(cfg, path: Path) -> None:
    """Every field prune reads has the type diffusers writes; else one line naming the field."""
    def bad(key: str, want: str):
        raise ModelError(f"{path}: {key} is {short(cfg.get(key), 40)}, not {want}", "restore the UNet's config")

    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object", "restore the UNet's config")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        if key not in cfg:
            raise ModelError(f"{path} has no {key}", "restore the UNet's config")
    n = len(cfg["block_out_channels"]) if isinstance(cfg["block_out_channels"], list) else 0
    if not _ints(cfg["block_out_channels"]):
        bad("block_out_channels", "a list of positive integers")
    for key in ("down_block_types", "up_block_types"):
        v = cfg[key]
        if not (isinstance(v, list) and len(v) == n and all(isinstance(x, str) for x in v)):
            bad(key, f"a list of {n} block class names")
    lpb = cfg["layers_per_block"]
    if not ((isinstance(lpb, int) and not isinstance(lpb, bool) and lpb >= 1) or (_ints(lpb) and len(lpb) == n)):
        bad("layers_per_block", f"a positive integer or a list of {n}")
    heads = cfg.get("attention_head_dim")
    if heads is not None and not ((isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1) or (_ints(heads) and len(heads) == n)):
        bad("attention_head_dim", f"a positive integer or a list of {n}")
    if not isinstance(cfg.get("mid_block_type", ""), (str, type(None))):
        bad("mid_block_type", "a block class name or null")


def _layers(cfg: dict) -> list[int]:
    lpb = cfg["layers_per_block"]
    return [int(lpb)] * len(cfg["down_block_types"]) if isinstance(lpb, int) else [int(v) for v in lpb]


def plan_blocks(cfg: dict, variant: BlockVariant) -> dict:
    """The config of the block-pruned UNet; a removal the model cannot take is a one-line error."""
    new = {k: v for k, v in cfg.items() if not k.startswith("_")}
    layers = _layers(cfg)
    if variant in (BlockVariant.small, BlockVariant.base):
        if min(layers) < 2:
            raise InputError(f"the UNet has layers_per_block {layers}: no stage has a second ResNet/attention pair to "
                             f"remove (--variant {variant.value})",
                             "use --variant mid (the mid-block only) or --method channels")
        new["layers_per_block"] = [n - 1 for n in layers]
    else:
        new["layers_per_block"] = layers
    if variant in (BlockVariant.small, BlockVariant.mid):
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
            raise InputError(f"the UNet has no mid-block to remove (--variant {variant.value})",
                             "use --variant base, or --method channels")
        new["mid_block_type"] = None
    return new


def stage_widths(cfg: dict, ratio: float) -> list[int]:
    """Each stage's kept width: ``c × (1 − ratio)`` rounded to the nearest multiple of the norm groups and the
    attention heads (at least one multiple)."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 1
    heads_list = heads if isinstance(heads, (list, tuple)) else [heads] * len(cfg["block_out_channels"])
    groups = int(cfg.get("norm_num_groups") or 1)
    out = []
    for c, h in zip(cfg["block_out_channels"], heads_list):
        m = math.lcm(groups, int(h))
        out.append(max(m, round(c * (1 - ratio) / m) * m))
    return out


def plan_channels(cfg: dict, ratio: float) -> dict:
    new = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key in ("time_embedding_dim", "class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if cfg.get(key) is not None:
            raise InputError(f"--method channels does not handle UNets with {key} set ({cfg[key]})",
                             "use --method blocks")
    if cfg.get("time_embedding_type", "positional") != "positional" or cfg.get("resnet_time_scale_shift", "default") != "default":
        raise InputError("--method channels handles the positional time embedding with default scale-shift only",
                         "use --method blocks")
    widths = stage_widths(cfg, ratio)
    if widths == list(cfg["block_out_channels"]):
        raise InputError(f"--ratio {ratio:g} removes no channels: stage widths {list(cfg['block_out_channels'])} must "
                         f"stay multiples of the norm groups ({cfg.get('norm_num_groups')}) and heads",
                         "pass a larger --ratio, or use --method blocks")
    new["block_out_channels"] = widths
    return new


# ---------------------------------------------------------------------------------------------------
# weights


def _block_key(key: str, old_layers: list[int], new_layers: list[int]) -> str:
    """The old UNet's name of the new UNet's tensor ``key`` (blocks method)."""
    parts = key.split(".")
    if parts[0] == "down_blocks" and parts[2] in ("resnets", "attentions"):
        return key  # down stages keep their first pairs
    if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions"):
        level = len(new_layers) - 1 - int(parts[1])
        j = int(parts[3])
        if j == new_layers[level]:  # the new last pair ← the old last pair (it takes the outer skip)
            parts[3] = str(old_layers[level])
        return ".".join(parts)
    return key


def copy_blocks(old, new, old_cfg: dict, new_cfg: dict) -> dict[str, str]:
    """Copy every tensor of ``new`` from its surviving block in ``old``; returns new → old names."""
    old_sd = old.state_dict()
    mapping, loaded = {}, {}
    for key, t in new.state_dict().items():
        src = _block_key(key, _layers(old_cfg), _layers(new_cfg))
        if src not in old_sd or old_sd[src].shape != t.shape:
            raise ModelError(f"pruned tensor {key} has no same-shaped source ({src})", "report this: the block map is wrong")
        loaded[key] = old_sd[src].clone()
        mapping[key] = src
    new.load_state_dict(loaded, strict=True)
    return mapping


class _Idx:
    """A kept index set of a dimension whose old size is ``size``."""

    def __init__(self, idx, size: int):
        self.idx, self.size = idx, size

    @staticmethod
    def cat(*parts: "_Idx") -> "_Idx":
        import torch

        off, out = 0, []
        for p in parts:
            out.append(p.idx + off)
            off += p.size
        return _Idx(torch.cat(out), off)


def _top(score, k: int):
    import torch

    return torch.sort(torch.topk(score, k).indices).values


def _per_head(score, heads: int, k: int):
    """Top ``k / heads`` dims inside each head (head structure survives)."""
    import torch

    d = score.numel() // heads
    keep = k // heads
    return torch.cat([_top(score[h * d:(h + 1) * d], keep) + h * d for h in range(heads)])


def _rows(w):
    return w.detach().abs().flatten(1).sum(1)


def _cols(w):
    return w.detach().abs().transpose(0, 1).flatten(1).sum(1)


class _Copier:
    """Fills the narrowed UNet's tensors from the old one, dimension by dimension."""

    def __init__(self, new):
        self.new_sd = new.state_dict()
        self.out: dict = {}

    def put(self, name: str, t, out_idx: _Idx | None = None, in_idx: _Idx | None = None) -> None:
        if out_idx is not None:
            t = t.index_select(0, out_idx.idx)
        if in_idx is not None and t.dim() > 1:
            t = t.index_select(1, in_idx.idx)
        want = self.new_sd[name].shape
        if t.shape != want:
            raise ModelError(f"narrowed tensor {name} is {tuple(t.shape)}, the config says {tuple(want)}",
                             "report this: the channel map is wrong")
        self.out[name] = t.clone()

    def linear(self, prefix: str, mod, out_idx=None, in_idx=None) -> None:
        self.put(prefix + ".weight", mod.weight.detach(), out_idx, in_idx)
        if getattr(mod, "bias", None) is not None:
            self.put(prefix + ".bias", mod.bias.detach(), out_idx)

    def norm(self, prefix: str, mod, idx: _Idx) -> None:
        self.put(prefix + ".weight", mod.weight.detach(), idx)
        self.put(prefix + ".bias", mod.bias.detach(), idx)


def _stage_sets(old, cfg_old: dict, widths: list[int]) -> list[_Idx]:
    """One kept set per stage: the channels the stage's writers (ResNet conv2/shortcut, attention proj_out,
    resamplers, conv_in) write most strongly."""
    import torch

    n = len(widths)
    scores = [torch.zeros(c) for c in cfg_old["block_out_channels"]]
    scores[0] += _rows(old.conv_in.weight)
    for lvl, block in [(i, b) for i, b in enumerate(old.down_blocks)] + [(n - 1 - u, b) for u, b in enumerate(old.up_blocks)]:
        for r in block.resnets:
            scores[lvl] += _rows(r.conv2.weight)
        for a in getattr(block, "attentions", None) or []:
            scores[lvl] += _rows(a.proj_out.weight)
        for s in [*(getattr(block, "downsamplers", None) or []), *(getattr(block, "upsamplers", None) or [])]:
            scores[lvl] += _rows(s.conv.weight)
    return [_Idx(_top(s, k), len(s)) for s, k in zip(scores, widths)]


def copy_channels(old, new, cfg_old: dict, widths: list[int]) -> dict[str, list[int]]:
    """Fill ``new`` (the narrowed UNet) from ``old``; returns each stage's kept channel indices."""
    import torch

    cp = _Copier(new)
    S = _stage_sets(old, cfg_old, widths)
    full = lambda n: _Idx(torch.arange(n), n)  # noqa: E731

    # time embedding: the sinusoid has stage 0's width; its columns are taken at the nearest frequency
    c0_old, c0_new = cfg_old["block_out_channels"][0], widths[0]
    shift = float(cfg_old.get("freq_shift", 0))
    h_old, h_new = c0_old // 2, c0_new // 2
    kmap = torch.tensor([min(h_old - 1, round(k * (h_old - shift) / max(h_new - shift, 1e-9))) for k in range(h_new)])
    T = _Idx(torch.cat([kmap, kmap + h_old]), c0_old)
    te = old.time_embedding
    E = _Idx(_top(_rows(te.linear_1.weight), new.time_embedding.linear_1.out_features), te.linear_1.out_features)
    cp.linear("time_embedding.linear_1", te.linear_1, E, T)
    cp.linear("time_embedding.linear_2", te.linear_2, E, E)

    cp.linear("conv_in", old.conv_in, S[0], full(old.conv_in.in_channels))

    def resnet(prefix, r_old, r_new, x: _Idx, out: _Idx) -> None:
        R = _Idx(_top(_rows(r_old.conv1.weight), r_new.conv1.out_channels), r_old.conv1.out_channels)
        cp.norm(prefix + ".norm1", r_old.norm1, x)
        cp.linear(prefix + ".conv1", r_old.conv1, R, x)
        cp.linear(prefix + ".time_emb_proj", r_old.time_emb_proj, R, E)
        cp.norm(prefix + ".norm2", r_old.norm2, R)
        cp.linear(prefix + ".conv2", r_old.conv2, out, R)
        # a stage narrowed to its neighbour's width loses its 1×1 shortcut (diffusers adds one only when the
        # widths differ): the residual becomes the identity there, which recovery absorbs
        if r_old.conv_shortcut is not None and r_new.conv_shortcut is not None:
            cp.linear(prefix + ".conv_shortcut", r_old.conv_shortcut, out, x)

    def attention(prefix, a_old, a_new, stream: _Idx, kv_in: _Idx) -> None:
        heads = a_old.heads
        if a_new.heads != heads:
            raise ModelError(f"{prefix} has {a_new.heads} heads after narrowing, {heads} before", "report this")
        q_score = _rows(a_old.to_q.weight) + _rows(a_old.to_k.weight)
        v_score = _rows(a_old.to_v.weight) + _cols(a_old.to_out[0].weight)
        Q = _Idx(_per_head(q_score, heads, a_new.to_q.out_features), a_old.to_q.out_features)
        V = _Idx(_per_head(v_score, heads, a_new.to_v.out_features), a_old.to_v.out_features)
        cp.linear(prefix + ".to_q", a_old.to_q, Q, stream)
        cp.linear(prefix + ".to_k", a_old.to_k, Q, kv_in)
        cp.linear(prefix + ".to_v", a_old.to_v, V, kv_in)
        cp.linear(prefix + ".to_out.0", a_old.to_out[0], stream, V)

    def transformer(prefix, t_old, t_new, s: _Idx) -> None:
        A = _Idx(_top(_rows(t_old.proj_in.weight), t_new.proj_in.weight.shape[0]), t_old.proj_in.weight.shape[0])
        cp.norm(prefix + ".norm", t_old.norm, s)
        cp.linear(prefix + ".proj_in", t_old.proj_in, A, s)
        for k, (b_old, b_new) in enumerate(zip(t_old.transformer_blocks, t_new.transformer_blocks)):
            p = f"{prefix}.transformer_blocks.{k}"
            for nm in ("norm1", "norm2", "norm3"):
                if getattr(b_old, nm, None) is not None:
                    cp.norm(f"{p}.{nm}", getattr(b_old, nm), A)
            attention(p + ".attn1", b_old.attn1, b_new.attn1, A, A)
            if b_old.attn2 is not None:
                attention(p + ".attn2", b_old.attn2, b_new.attn2, A, full(b_old.attn2.to_k.in_features))
            proj, out = b_old.ff.net[0].proj, b_old.ff.net[2]
            f_old, f_new = out.in_features, b_new.ff.net[2].in_features
            gated = proj.out_features == 2 * f_old
            score = _cols(out.weight) + _rows(proj.weight)[:f_old]
            H = _Idx(_top(score, f_new), f_old)
            Hp = _Idx(torch.cat([H.idx, H.idx + f_old]), proj.out_features) if gated else H
            cp.linear(p + ".ff.net.0.proj", proj, Hp, A)
            cp.linear(p + ".ff.net.2", out, A, H)
        cp.linear(prefix + ".proj_out", t_old.proj_out, s, A)

    n = len(widths)
    skips: list[_Idx] = [S[0]]
    h = S[0]
    for i, (b_old, b_new) in enumerate(zip(old.down_blocks, new.down_blocks)):
        for j, (r_old, r_new) in enumerate(zip(b_old.resnets, b_new.resnets)):
            resnet(f"down_blocks.{i}.resnets.{j}", r_old, r_new, h, S[i])
            h = S[i]
            if getattr(b_old, "attentions", None):
                transformer(f"down_blocks.{i}.attentions.{j}", b_old.attentions[j], b_new.attentions[j], S[i])
            skips.append(S[i])
        if getattr(b_old, "downsamplers", None):
            cp.linear(f"down_blocks.{i}.downsamplers.0.conv", b_old.downsamplers[0].conv, S[i], S[i])
            skips.append(S[i])
    if old.mid_block is not None:
        m_old, m_new = old.mid_block, new.mid_block
        for j, (r_old, r_new) in enumerate(zip(m_old.resnets, m_new.resnets)):
            resnet(f"mid_block.resnets.{j}", r_old, r_new, h, h)
        for j, (a_old, a_new) in enumerate(zip(getattr(m_old, "attentions", []), getattr(m_new, "attentions", []))):
            transformer(f"mid_block.attentions.{j}", a_old, a_new, h)
    for u, (b_old, b_new) in enumerate(zip(old.up_blocks, new.up_blocks)):
        lvl = n - 1 - u
        for j, (r_old, r_new) in enumerate(zip(b_old.resnets, b_new.resnets)):
            x = _Idx.cat(h, skips.pop())
            resnet(f"up_blocks.{u}.resnets.{j}", r_old, r_new, x, S[lvl])
            h = S[lvl]
            if getattr(b_old, "attentions", None):
                transformer(f"up_blocks.{u}.attentions.{j}", b_old.attentions[j], b_new.attentions[j], S[lvl])
        if getattr(b_old, "upsamplers", None):
            cp.linear(f"up_blocks.{u}.upsamplers.0.conv", b_old.upsamplers[0].conv, S[lvl], S[lvl])
    cp.norm("conv_norm_out", old.conv_norm_out, S[0])
    cp.linear("conv_out", old.conv_out, full(old.conv_out.out_channels), S[0])

    missing = sorted(set(cp.new_sd) - set(cp.out))
    if missing:
        raise ModelError(f"narrowing left {len(missing)} tensors unfilled (e.g. {missing[0]})",
                         "this UNet has a block type --method channels does not know; use --method blocks")
    new.load_state_dict(cp.out, strict=True)
    return {f"stage{i}": s.idx.tolist() for i, s in enumerate(S)}


# ---------------------------------------------------------------------------------------------------
# the verb


def prune_unet(unet, method: PruneMethod, variant: BlockVariant = BlockVariant.small, ratio: float = DEFAULT_RATIO):
    """(pruned UNet, its config dict, what was kept) for a loaded ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    if method is PruneMethod.blocks:
        new_cfg = plan_blocks(cfg, variant)
    else:
        new_cfg = plan_channels(cfg, ratio)
    new = UNet2DConditionModel.from_config(new_cfg).to(unet.device)
    if new.dtype != unet.dtype:
        new = new.to(dtype=unet.dtype)
    if method is PruneMethod.blocks:
        kept = {"tensors_from": "surviving blocks", "removed": _removed(cfg, new_cfg)}
        copy_blocks(unet, new, cfg, new_cfg)
    else:
        kept = {"stage_channels": copy_channels(unet, new, cfg, new_cfg["block_out_channels"])}
    return new.eval().requires_grad_(False), new_cfg, kept


def _removed(cfg: dict, new_cfg: dict) -> list[str]:
    out = []
    if cfg.get("mid_block_type") is not None and new_cfg.get("mid_block_type") is None:
        out.append("mid_block")
    old_l, new_l = _layers(cfg), _layers(new_cfg)
    n = len(old_l)
    for i, (a, b) in enumerate(zip(old_l, new_l)):
        out += [f"down_blocks.{i}.(resnets|attentions).{j}" for j in range(b, a)]
        out += [f"up_blocks.{n - 1 - i}.(resnets|attentions).{j}" for j in range(b, a)]
    return out


def prune(config: PruneConfig) -> dict:
    """Prune MODEL's UNet and write the pipeline to OUTPUT; returns the manifest."""
    cfg = _unet_config_of(config.model, config.allow_pickle)
    # the cheap refusals (bad method for this model) before the weights load
    if config.method is PruneMethod.blocks:
        plan_blocks(cfg, config.variant)
    else:
        plan_channels(cfg, config.effective_ratio)
    # no loop here: the governor re-measures between the phases (load, count, prune, count, save)
    with atomic_dir(config.output, config.force, (config.model,)) as tmp, Governor(config.threads) as governor:
        pipe = load_pipeline(config.model, device="cpu", dtype="float32", allow_pickle=config.allow_pickle)
        shape = pipe.latent_shape(pipe.default_size, pipe.default_size)
        text_len = pipe.tokenizer.model_max_length
        governor.tick()
        before = {"params": count_params(pipe.unet), "macs_per_image": unet_macs(pipe.unet, shape, text_len)}
        governor.tick()
        new, new_cfg, kept = prune_unet(pipe.unet, config.method, config.variant, config.effective_ratio)
        governor.tick()
        after = {"params": count_params(new), "macs_per_image": unet_macs(new, shape, text_len)}
        governor.tick()
        pipe.unet = new
        info = dataclasses.replace(pipe.info, source=config.model)
        pipe.save(tmp, info)
        manifest = make_manifest(
            "pipeline", config, model=dataclasses.asdict(info), stage="prune", base_model=config.model,
            prune={"method": config.method.value,
                   **({"variant": config.variant.value} if config.method is PruneMethod.blocks else
                      {"ratio": config.effective_ratio}),
                   "before": before, "after": after,
                   "macs_reduction": round(1 - after["macs_per_image"] / before["macs_per_image"], 4),
                   "params_reduction": round(1 - after["params"] / before["params"], 4),
                   "latent_shape": list(shape),
                   "layers_per_block": new_cfg["layers_per_block"],
                   "mid_block_type": new_cfg.get("mid_block_type"),
                   "block_out_channels": list(new_cfg["block_out_channels"]), **kept},
            one_step=info.one_step, **inherited_prompts(config.model),
            params={k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")},
            content_sha256=sha256_tree(tmp),
        )
        write_manifest(tmp, manifest)
    return manifest
