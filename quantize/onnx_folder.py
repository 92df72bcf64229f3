"""``instaflow-edge quantize ONNX_DIR --scheme S -o OUT``: quantize an fp32 ONNX export folder.

The reference here is the fp32 ONNX source folder (which passed its fp32 gate against PyTorch when it
was exported): each quantized component and the end-to-end image are compared with it on fixed prompts
and seeds, and gated at the scheme's default (or ``--min-psnr``). The verb returns the manifest (its
``parity`` rows and ``gates`` are the table the CLI prints); a miss raises one error listing every miss.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from ..artifacts import (
    MANIFEST,
    atomic_dir,
    check_output,
    check_overlap,
    inherited_prompts,
    make_manifest,
    read_manifest,
    write_manifest,
)
from ..copying import copy_tree
from ..errors import InputError, ModelError
from .. import runtime
from ..runtime import onnx_io
from ..runtime.onnx import KIND as onnx_kind
from ..runtime.sampler import unet_feed
from ..runtime.onnx import (
    export_facts,
    open_component,
    run_one_step,
    tokenize,
    write_partial,
)
from ..validators import boolean, choice, number, prompt_file
from .calibration import Calibration
from .schemes import CHOICES, OnnxScheme, get_scheme, listing

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizeConfig:
    """Options of ``instaflow-edge quantize``, checked and normalized (``scheme`` an :class:`OnnxScheme`)
    once, when made."""

    source: str
    output: str
    scheme: OnnxScheme = OnnxScheme.int8_static
    components: list[str] | None = None  # None: the scheme's defaults (text encoder and UNet)
    calibration_prompts: str | None = None
    min_psnr: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.scheme is None:
            raise InputError("no --scheme given", f"pass --scheme {listing(OnnxScheme, ', ')}")
        self.scheme = choice("scheme", self.scheme, OnnxScheme)
        if self.min_psnr is not None:  # a negative gate would switch every gate off
            self.min_psnr = number("min_psnr", self.min_psnr, low=0.0)
        self.force = boolean("force", self.force)


def _refuse_other_formats(src: Path) -> None:
    """An export of another format is quantized by its own converter: say which option does it."""
    if not runtime.is_export(src) or runtime.format_of(src) == "onnx":
        return
    name = runtime.format_of(src)
    fmt = runtime.get(name)
    how = (f"`instaflow-edge convert MODEL --target {name} --{'compress' if name == 'coreml' else 'quantize'} "
           f"{listing(CHOICES[name], '|')}`" if name in CHOICES else "`instaflow-edge convert MODEL --target onnx`, then quantize that")
    title = fmt.title or name
    raise InputError(f"{src} is {'an' if title[0] in 'AEIOU' else 'a'} {title} export: `quantize` takes ONNX exports "
                     "(the other formats are quantized when converted)", f"run {how}")


def folder_conditioning(ref: Path, out: Path, facts):
    """The conditioning check of the UNet in export folder ``out`` against the one in ``ref`` (its fp32
    source): both run on the same sample with the embeddings of an example prompt and of the empty prompt
    (from ``ref``'s text encoder)."""
    from ..components import EXAMPLE_PROMPTS
    from ..generator import make_noise
    from ..parity import conditioning

    ids = tokenize(ref, [EXAMPLE_PROMPTS[0], ""])
    te = onnx_io.session(ref / "text_encoder" / onnx_io.MODEL_FILE)
    hidden = [te.run(None, {"input_ids": ids[i: i + 1]})[0] for i in range(2)]
    noise = make_noise([0], facts.latent_shape).numpy()
    r, o = (onnx_io.session(f / "unet" / onnx_io.MODEL_FILE) for f in (ref, out))
    (rt, re), (ot, oe) = ([s.run(None, unet_feed(s, noise, h))[0] for h in hidden] for s in (r, o))
    return conditioning(rt, re, ot, oe)


def quantize(cfg: QuantizeConfig) -> dict:
    """Quantize ``cfg.source`` into ``cfg.output``; returns the manifest."""
    import numpy as np

    from ..components import EXAMPLE_PROMPTS
    from ..generator import make_noise
    from ..parity import check_all, check_conditioning, compare
    from .onnx import CALIBRATION_PROMPTS, apply_scheme, default_gate

    check_overlap(cfg.output, (cfg.source, cfg.calibration_prompts))  # --force never replaces an input
    src = Path(cfg.source)
    if not src.is_dir():
        raise ModelError(f"{src} is not a folder", "pass a folder written by `instaflow-edge convert --target onnx`")
    _refuse_other_formats(src)
    facts = export_facts(src)
    source_manifest_block = (read_manifest(src) or {})["onnx"]
    onnx_io.check_folder(src)  # external data stays inside; every model parses
    source_manifest = read_manifest(src) or {}
    already = (source_manifest.get("quantize") or {}).get("components") or []
    names = list(cfg.components) if cfg.components else [n for n in facts.components if n in get_scheme("onnx", cfg.scheme).default_components]
    for n in names:
        if n not in facts.components:
            raise InputError(f"component {n!r} is not in {src}", f"choose from: {', '.join(facts.components)}")
        if n in already:
            raise InputError(f"{n} in {src} is already quantized ({source_manifest['quantize']['scheme']})",
                             "quantize the fp32 export instead")
    for n in facts.components:
        open_component(src, n)  # a corrupt model, or a graph not its component's, fails here, before any work
    check_output(cfg.output, cfg.force, (cfg.source, cfg.calibration_prompts))
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    gate = cfg.min_psnr if cfg.min_psnr is not None else default_gate(cfg.scheme)
    with atomic_dir(cfg.output, cfg.force, (cfg.source, cfg.calibration_prompts)) as tmp:
        copy_tree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST, ".*"))
        write_partial(tmp, source_manifest_block)  # calibration reads it
        apply_scheme(tmp, cfg.scheme, names, prompts)
        rows = []
        log.info(f"parity vs the fp32 source: {', '.join(names)}, end to end")
        for n in names:
            feeds = Calibration(src, EXAMPLE_PROMPTS[:2], seed=1000).feeds(n)
            ref_s, out_s = onnx_io.session(src / n / onnx_io.MODEL_FILE), onnx_io.session(tmp / n / onnx_io.MODEL_FILE)
            ref = np.concatenate([ref_s.run(None, f)[0] for f in feeds])
            out = np.concatenate([out_s.run(None, f)[0] for f in feeds])
            rows.append(compare(n, ref, out))
        ids = tokenize(src, EXAMPLE_PROMPTS[:1])
        noise = make_noise([0], facts.latent_shape).numpy()
        rows.append(compare("end_to_end", run_one_step(src, ids, noise, facts), run_one_step(tmp, ids, noise, facts)))
        gates = {p.component: gate for p in rows}
        check_all(rows, gates)
        cond = check_conditioning(folder_conditioning(src, tmp, facts)) if "unet" in facts.components else None
        manifest = make_manifest(
            onnx_kind, cfg, source={"model": str(src), "content_sha256": source_manifest.get("content_sha256")},
            onnx=source_manifest_block, quantize={"scheme": cfg.scheme.value, "engine": "ort", "components": names,
                                 "reference": "the fp32 ONNX source folder",
                                 "calibration_prompts": len(prompts) if get_scheme("onnx", cfg.scheme).calibrated else 0},
            gates=gates, parity=[p.as_dict() for p in rows], conditioning=cond.as_dict() if cond else None,
            sizes={n: onnx_io.file_sizes(tmp / n) for n in facts.components},
            upstream=source_manifest.get("config"), **inherited_prompts(src),
        )
        write_manifest(tmp, manifest)
    return manifest
