"""``instaflow-edge merge``: LoRA files and fine-tune deltas fused into a pipeline's weights.

The result is an ordinary pipeline folder: every command and every target takes it unchanged, so an app
gets the personalization at no runtime cost (no target runtime has to know what a LoRA is).

- A LoRA (``--lora FILE[:SCALE]``) adds ``SCALE · (alpha / rank) · up @ down`` to each weight it names, in
  the UNet and the text encoder. Two layouts are read: diffusers / peft (``unet.PATH.lora_A.weight`` and
  ``lora_B``, the older ``lora.down``/``lora.up`` and ``processor.to_q_lora`` names, alpha from the file's
  ``lora_adapter_metadata`` or ``PATH.alpha`` keys, else alpha = rank) and kohya / civitai
  (``lora_unet_PATH.lora_down.weight``, ``lora_up``, ``alpha``, module paths with ``_`` for ``.``;
  ``lora_te_`` for the text encoder). Linear and convolution layers (LoCon) are fused.
- A delta (``--delta FINETUNE --base BASE [--alpha A]``) adds ``A · (W_finetune − W_base)`` to every UNet and
  text-encoder tensor, as InstaFlow's own code carries a fine-tune of SD1.5 over to the one-step model.

Every input is checked before anything is written: a key that names no layer of MODEL, a shape that does
not fit, LoRA variants this does not fuse (LoHa, LoKr, DoRA), a base or fine-tune whose architecture
differs from MODEL's: one line, no output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, inherited_prompts, make_manifest, sha256_file, sha256_tree, write_manifest
from .errors import InputError, ModelError
from .model_files import check_plain_tensors, check_safetensors
from .pipeline import load_pipeline
from .validators import boolean, number

COMPONENTS = ("unet", "text_encoder")
_PICKLE = (".bin", ".pt", ".pth", ".ckpt")
# LoRA families whose arithmetic is not a low-rank product of two matrices (LyCORIS, DoRA)
_UNSUPPORTED = {"hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr",
                "lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "oft_blocks": "OFT", "diff": "a full diff"}


@dataclasses.dataclass(kw_only=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE`` or ``FILE:SCALE`` (the scale is what follows the last ``:`` when it is a number, so a
        path with a colon in it still works)."""
        if not isinstance(text, str) or not text:
            raise InputError("--lora needs a file", "pass --lora FILE or --lora FILE:SCALE")
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(path=head, scale=float(tail))
            except ValueError:
                pass
        return cls(path=text)

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise InputError(f"--lora {self.path}: scale {self.scale!r} is not a finite number", "pass FILE:SCALE, e.g. lora.safetensors:0.8")
        self.scale = float(self.scale)


@dataclasses.dataclass(kw_only=True)
class MergeConfig:
    """Options of ``instaflow-edge merge``."""

    model: str
    output: str
    loras: list[LoraSpec] = dataclasses.field(default_factory=list)
    delta: str | None = None  # FINETUNE pipeline
    base: str | None = None  # the model FINETUNE was fine-tuned from
    alpha: float = 1.0
    allow_pickle: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InputError("no model given", "pass a pipeline folder as MODEL")
        if not isinstance(self.output, str) or not self.output:
            raise InputError("no output folder given", "pass -o OUT")
        self.loras = [s if isinstance(s, LoraSpec) else LoraSpec.parse(s) for s in (self.loras or [])]
        if (self.delta is None) != (self.base is None):
            raise InputError("--delta and --base go together (the delta is FINETUNE − BASE)",
                             "pass both --delta FINETUNE and --base BASE")
        self.alpha = number("alpha", self.alpha)
        if self.delta is None and self.alpha != 1.0:
            raise InputError("--alpha scales a --delta", "add --delta FINETUNE --base BASE, or drop --alpha")
        if not self.loras and self.delta is None:
            raise InputError("nothing to merge", "pass --lora FILE[:SCALE] (repeatable) and/or --delta FINETUNE --base BASE")
        for s in self.loras:
            p = Path(s.path)
            if not p.is_file():
                raise InputError(f"--lora {s.path}: no such file", "pass a LoRA .safetensors file")
            if p.suffix.lower() in _PICKLE and not self.allow_pickle:
                raise InputError(f"--lora {s.path} is a pickle file", "use its .safetensors version, or pass --allow-pickle "
                                 "(plain tensors only) for a source you trust")
        boolean("allow_pickle", self.allow_pickle)
        boolean("force", self.force)


# ---------------------------------------------------------------------------------------------------
# reading a LoRA file into (component, module path) -> {down, up, alpha}


@dataclasses.dataclass
class _Pair:
    down: Any = None
    up: Any = None
    alpha: float | None = None
    keys: list[str] = dataclasses.field(default_factory=list)


def _read_tensors(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """The file's tensors and its metadata (safetensors header metadata; none for pickles)."""
    if path.suffix.lower() in _PICKLE:
        import torch

        check_plain_tensors(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"--lora {path} holds no flat dict of tensors", "pass a LoRA state dict file")
        return sd, {}
    try:
        check_safetensors(path)
    except ModelError as e:
        raise InputError(f"--lora {path} is not a sound safetensors file ({e.message.split('(')[-1].rstrip(')')})",
                         "pass a LoRA .safetensors file") from None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                        r"lora\.up\.weight|lora_A\.default\.weight|lora_B\.default\.weight|alpha)$")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_A.default.weight": "down",
         "lora_B.default.weight": "up", "alpha": "alpha"}
# the attention-processor names of diffusers' first LoRA format
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def _peft_alphas(metadata: dict, path: Path) -> dict[str, dict]:
    """Per component, peft's LoraConfig fields (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) from
    diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise InputError(f"--lora {path}: its lora_adapter_metadata is not JSON", "re-save the LoRA with diffusers") from None
    out: dict[str, dict] = {}
    for k, v in flat.items() if isinstance(flat, dict) else ():
        comp, _, field = str(k).partition(".")
        out.setdefault(comp, {})[field] = v
    for comp, cfg in out.items():
        if cfg.get("use_dora"):
            raise InputError(f"--lora {path}: a DoRA adapter ({comp}), which merge does not fuse", "use a plain LoRA")
    return out


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: a pattern applies to a module path it ends (after a dot) or equals."""
    for pat, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return v
    return default


def read_lora(path: Path, allow_pickle: bool = False) -> tuple[str, dict[tuple[str, str], _Pair], dict]:
    """``(layout, {(component, module path): pair}, peft alphas)``; the module path still in the file's
    spelling (kohya: underscores)."""
    sd, metadata = _read_tensors(path, allow_pickle)
    if not sd:
        raise InputError(f"--lora {path} holds no tensors", "pass a LoRA file")
    for k in sd:
        for marker, family in _UNSUPPORTED.items():
            if k.endswith(marker) or f".{marker}." in k or k.endswith(f".{marker}.weight"):
                raise InputError(f"--lora {path} is a {family} adapter (key {k}), which merge does not fuse",
                                 "use a plain LoRA (low-rank up/down pairs)")
    layouts = set()
    pairs: dict[tuple[str, str], _Pair] = {}
    unknown = []
    for k, t in sd.items():
        m = _KOHYA.match(k)
        if m:
            layouts.add("kohya")
            comp, module, role = _KOHYA_COMPONENT[m.group(1)], m.group(2), _ROLE[m.group(3)]
        else:
            m = _DIFFUSERS.match(k)
            if not m:
                unknown.append(k)
                continue
            layouts.add("diffusers")
            comp, module, role = m.group(1), _PROCESSOR.sub(lambda g: "." + g.group(1) + (".0" if g.group(1) == "to_out" else ""),
                                                            m.group(2)), _ROLE[m.group(3)]
        pair = pairs.setdefault((comp, module), _Pair())
        pair.keys.append(k)
        if role == "alpha":
            pair.alpha = float(t.float().reshape(-1)[0]) if t.numel() else None
        else:
            setattr(pair, role, t)
    if unknown:
        raise InputError(f"--lora {path}: {len(unknown)} key(s) in no LoRA layout merge reads (first: {unknown[0]})",
                         "pass a diffusers/peft or kohya LoRA; LDM-style names (input_blocks…) are not mapped")
    if len(layouts) > 1:
        raise InputError(f"--lora {path} mixes kohya and diffusers key names", "pass one LoRA per file")
    for (comp, module), p in pairs.items():
        if p.down is None or p.up is None:
            raise InputError(f"--lora {path}: {comp} {module} has {'no up' if p.up is None else 'no down'} matrix",
                             "the file is incomplete: re-save the LoRA")
    return layouts.pop(), pairs, _peft_alphas(metadata, path)


# ---------------------------------------------------------------------------------------------------
# fusing


def _module_index(model, component: str, kohya: bool) -> dict[str, str]:
    """The names a LoRA may use for each of MODEL's layers -> the layer's path. Text encoders answer to the
    ``text_model.`` prefix of older transformers as well."""
    import torch

    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        spellings = [name]
        if component.startswith("text_encoder"):
            spellings.append(name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name)
        for s in spellings:
            out[s.replace(".", "_") if kohya else s] = name
    return out


def lora_delta(up, down, weight_shape) -> Any:
    """``up @ down`` shaped as the layer's weight (Linear: out × in; Conv2d: out × in × kh × kw, the down
    matrix holding the kernel), or None when the shapes do not fit."""
    import torch

    out, rank = up.shape[0], down.shape[0]
    if up.numel() != out * rank or (up.dim() > 2 and tuple(up.shape[2:]) != (1,) * (up.dim() - 2)):
        return None
    u = up.reshape(out, rank).float()
    d = down.reshape(rank, -1).float()
    if out != weight_shape[0] or d.shape[1] * out != math.prod(weight_shape):
        return None
    if len(weight_shape) == 4 and down.dim() == 4 and tuple(down.shape[2:]) != tuple(weight_shape[2:]):
        return None
    return (u @ d).reshape(weight_shape).to(torch.float32)


def fuse_lora(modules: dict, spec: LoraSpec, allow_pickle: bool = False) -> dict:
    """Add one LoRA into ``modules`` ({component: torch module}) in place; returns its record."""
    path = Path(spec.path)
    layout, pairs, peft = read_lora(path, allow_pickle)
    kohya = layout == "kohya"
    index = {c: _module_index(m, c, kohya) for c, m in modules.items()}
    fused: dict[str, int] = {c: 0 for c in modules}
    plans = []
    for (comp, module), pair in sorted(pairs.items()):
        if comp not in modules:
            raise InputError(f"--lora {path} has layers for {comp}, which MODEL does not have (a LoRA for another architecture, "
                             "e.g. SDXL)", "pass a LoRA made for MODEL's base model")
        target = index[comp].get(module)
        if target is None:
            raise InputError(f"--lora {path}: {comp} layer {module} matches no layer of MODEL ({pair.keys[0]})",
                             "pass a LoRA made for MODEL's base model")
        weight = modules[comp].get_submodule(target).weight
        delta = lora_delta(pair.up, pair.down, tuple(weight.shape))
        if delta is None:
            raise InputError(f"--lora {path}: {comp} {target} is {tuple(weight.shape)} in MODEL but the LoRA's up/down are "
                             f"{tuple(pair.up.shape)}/{tuple(pair.down.shape)} (a LoRA for another architecture)",
                             "pass a LoRA made for MODEL's base model")
        rank = int(pair.down.shape[0])
        cfg = peft.get(comp, {})
        alpha = pair.alpha if pair.alpha is not None else _pattern_value(cfg.get("alpha_pattern"), target, cfg.get("lora_alpha"))
        if alpha is None:
            scale = 1.0  # no alpha anywhere: alpha = rank, as diffusers assumes
        else:
            scale = float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        plans.append((weight, delta, scale))
        fused[comp] += 1
    import torch

    with torch.no_grad():  # every pair checked first: nothing is changed by a file that fails half-way
        for weight, delta, scale in plans:
            weight.add_((spec.scale * scale) * delta.to(weight.dtype))
    return {"lora": path.name, "sha256": sha256_file(path), "scale": spec.scale, "layout": layout,
            "layers_fused": fused, "ranks": sorted({int(p.down.shape[0]) for p in pairs.values()})}


def _state(pipe, comp: str) -> dict:
    return getattr(pipe, comp).state_dict()


def add_delta(modules: dict, finetune, base, alpha: float, names: tuple[str, str]) -> dict:
    """``W += alpha · (W_finetune − W_base)`` for every tensor of each component; the three must hold the
    same tensors with the same shapes."""
    import torch

    changed: dict[str, int] = {}
    plans = []
    for comp, mod in modules.items():
        own, ft, b = mod.state_dict(), _state(finetune, comp), _state(base, comp)
        for other, sd, what in ((names[0], ft, "--delta"), (names[1], b, "--base")):
            missing = sorted(set(own) ^ set(sd))
            bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
            if missing or bad:
                k = (missing or bad)[0]
                detail = (f"{len(missing)} tensor name(s) differ (first: {k})" if missing else
                          f"{k} is {tuple(sd[k].shape)} there, {tuple(own[k].shape)} in MODEL")
                raise InputError(f"{what} {other}: its {comp} is another architecture than MODEL's ({detail})",
                                 "pass a fine-tune and base of MODEL's base model (same config)")
        n = 0
        for k, w in own.items():
            if not torch.is_floating_point(w):
                continue
            d = ft[k].float() - b[k].float()
            if torch.count_nonzero(d):
                plans.append((w, d))
                n += 1
        changed[comp] = n
    with torch.no_grad():
        for w, d in plans:
            w.add_((alpha * d).to(w.dtype))
    return changed


def merge(config: MergeConfig) -> dict:
    """Fuse the LoRAs and the delta into MODEL and write the pipeline to OUTPUT; returns the manifest."""
    for spec in config.loras:  # every LoRA file read and checked before the model loads
        read_lora(Path(spec.path), config.allow_pickle)
    inputs = (config.model, config.delta, config.base, *(s.path for s in config.loras))
    with atomic_dir(config.output, config.force, inputs) as tmp:
        pipe = load_pipeline(config.model, device="cpu", dtype="float32", allow_pickle=config.allow_pickle)
        modules = {c: getattr(pipe, c) for c in COMPONENTS}
        merged = []
        if config.delta is not None:
            ft = load_pipeline(config.delta, device="cpu", dtype="float32", allow_pickle=config.allow_pickle)
            base = load_pipeline(config.base, device="cpu", dtype="float32", allow_pickle=config.allow_pickle)
            changed = add_delta(modules, ft, base, config.alpha, (config.delta, config.base))
            merged.append({"delta": Path(config.delta).name, "base": Path(config.base).name, "alpha": config.alpha,
                           "tensors_changed": changed, "delta_sha256": _tree_hash(config.delta),
                           "base_sha256": _tree_hash(config.base)})
            del ft, base
        for spec in config.loras:
            merged.append(fuse_lora(modules, spec, config.allow_pickle))
        info = dataclasses.replace(pipe.info, source=config.model)
        pipe.save(tmp, info)
        manifest = make_manifest("pipeline", config, model=dataclasses.asdict(info), stage="merge", base_model=config.model,
                                 merge=merged, one_step=info.one_step, **inherited_prompts(config.model),
                                 content_sha256=sha256_tree(tmp))
        write_manifest(tmp, manifest)
    return manifest


def _tree_hash(source: str) -> str | None:
    """The content hash of a local pipeline folder (None for a hub id)."""
    p = Path(source)
    return sha256_tree(p) if p.is_dir() else None
