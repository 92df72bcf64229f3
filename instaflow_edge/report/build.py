"""``make_report``: prompts and seeds through the reference and every export → parity, images, verdicts.

The report folder (written atomically, like every artifact) holds ``report.html`` (self-contained: every
image inline), ``report.md``, ``report.json`` (every figure; the page's and the markdown's tables are
made from it), ``grid.png``, ``heatmap-<export>.png`` per export and ``latency.png`` when bench results
were given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path

from .. import runtime
from ..artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    read_manifest,
    sha256_tree,
    write_manifest,
)
from ..errors import InputError
from ..runtime.sampler import edit
from ..validators import boolean, integer, prompt_file, seed
from .bench_input import read_bench
from .runtimes import COMPONENT_ORDER, EDIT_STRENGTH, Runtime, open_exports, reference, used_params

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a red fox in snow", "a lighthouse at night", "a cat wearing a hat", "a castle on a mountain"]


@dataclasses.dataclass
class ReportConfig:
    """Options of ``instaflow-edge report``. ``prompts``: a text file, one prompt per line (default: four
    fixed prompts; six prompts of the digits eval set for a digits model). ``digits_images``: images per runtime for the
    digits judge's accuracy and FID (digits models only; 0 skips it)."""

    model: str
    output: str
    exports: list[str] = dataclasses.field(default_factory=list)
    bench: list[str] = dataclasses.field(default_factory=list)
    prompts: str | None = None
    seed: int = 0
    digits_images: int = 500
    force: bool = False

    def __post_init__(self) -> None:
        self.exports = [self.exports] if isinstance(self.exports, str) else list(self.exports)
        self.bench = [self.bench] if isinstance(self.bench, str) else list(self.bench)
        seed("seed", self.seed, 1000)
        integer("digits_images", self.digits_images, 0)
        if self.digits_images and (self.digits_images % 10 or self.digits_images < 20):
            raise InputError(f"--digits-images must be 0 or a multiple of 10 that is ≥ 20, got {self.digits_images}",
                             "pass e.g. --digits-images 500 (50 per digit)")
        boolean("force", self.force)
        if not (Path(self.model) / "model_index.json").is_file():
            raise InputError(f"{self.model} is not a pipeline folder (no model_index.json)",
                             "pass the pipeline folder the exports were made from (the PyTorch reference)")
        for item in self.exports:  # every export is recognized before any model loads
            label, sep, d = str(item).partition("=")
            folder = Path(d if sep and not Path(item).exists() else item)
            if not folder.is_dir():
                raise InputError(f"export {item}: no such folder", "pass an export folder (or LABEL=DIR)")
            runtime.format_of(folder)
        self._benches = [read_bench(b) for b in self.bench]  # bounded and checked before any model loads


def digits_prompts(n: int = 6) -> list[str]:
    """The first ``n`` prompts of the digits eval set (digits 0, 1, 2…, each in another template)."""
    from ..data import eval_prompts

    return [p for p, _ in eval_prompts(1)[:n]]


def is_digits_model(model: str | Path, hops: int = 12) -> bool:
    """Whether ``model`` descends from the digits preset (its manifests' chain of sources says so)."""
    folder = Path(model)
    for _ in range(hops):
        m = read_manifest(folder) if folder.is_dir() else None
        if not m:
            return False
        if m.get("preset") == "digits" or (m.get("config") or {}).get("preset") == "digits":
            return True
        nxt = m.get("base_model") or (m.get("model") or {}).get("source") or (m.get("config") or {}).get("model")
        if not nxt or not isinstance(nxt, str) or nxt.startswith("preset:"):
            return nxt == "preset:digits"
        folder = Path(nxt)
    return False


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _parity(component: str, ref, out, gate: float | None) -> dict:
    """PSNR, max abs, cosine and the gate's answer; a shape mismatch or NaN/Inf is a failed row (the
    report goes on: it is the finding), with the reason in ``error``."""
    from ..errors import ParityError
    from ..parity import compare

    try:
        p = compare(component, ref, out).as_dict()
    except ParityError as e:
        return {"psnr": None, "max_abs": None, "cosine": None, "shape": list(getattr(out, "shape", [])),
                "gate": gate, "pass": False, "error": e.message}
    p.pop("component")
    p["max_abs"] = float(p["max_abs"])
    p["cosine"] = round(float(p["cosine"]), 6)
    p["gate"] = gate
    psnr = math.inf if p["psnr"] is None else p["psnr"]
    p["pass"] = None if gate is None else bool(psnr >= gate)
    return p


def run_all(rt: Runtime, ids_list, noise_list, ref: dict, sf: float) -> tuple[dict, list]:
    """Per-component parity on the reference's inputs and the end-to-end chain; returns
    ``(parity rows, images in [0, 1] HWC per prompt)``."""
    import numpy as np

    comp = {"text_encoder": [], "unet": [], "vae_decoder": [], "end_to_end": []}
    images = []
    for i, (ids, z) in enumerate(zip(ids_list, noise_list)):
        comp["text_encoder"].append(rt.calls["text_encoder"](ids))
        comp["unet"].append(rt.calls["unet"](z, ref["hidden"][i]))
        comp["vae_decoder"].append(rt.calls["vae_decoder"](ref["latents"][i] / sf))
        h = comp["text_encoder"][-1]
        lat = rt.calls["unet"](z, h)
        img = rt.calls["vae_decoder"](np.asarray(lat) / sf)
        comp["end_to_end"].append(img)
        images.append(np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)[0]) / 2 + 0.5, 0, 1).transpose(1, 2, 0))
    refs = {"text_encoder": ref["hidden"], "unet": ref["latents"], "vae_decoder": ref["image"], "end_to_end": ref["image"]}
    rows = {}
    for c in COMPONENT_ORDER:
        rows[c] = _parity(c, np.concatenate(refs[c]), np.concatenate([np.asarray(x) for x in comp[c]]), rt.gates.get(c))
    if can_edit(rt) and "edit_image" in ref:
        rows.update(edit_rows(rt, ids_list, noise_list, ref, sf))
    return rows, images


def can_edit(rt: Runtime) -> bool:
    """The runtime edits images with its own calls (a stand-in computed in PyTorch does not count)."""
    return "vae_encoder" in rt.calls and "unet_at" in rt.calls and not rt.emulated


def edit_images(rt: Runtime, ids_list, noise_list, starts, sf: float) -> tuple[list, list]:
    """Each prompt's edit of its starting image at EDIT_STRENGTH through ``rt``'s own calls (the
    runtimes' ``edit``), as images in [-1, 1]; and the encoder's latents of the starting images."""
    import numpy as np

    out, enc = [], []
    for ids, z, start in zip(ids_list, noise_list, starts):
        enc.append(np.asarray(rt.calls["vae_encoder"](start), dtype=np.float32))
        out.append(edit(rt.calls, ids, start, z, sf, 1, EDIT_STRENGTH) * 2 - 1)
    return out, enc


def edit_rows(rt: Runtime, ids_list, noise_list, ref: dict, sf: float) -> dict:
    """The image-to-image rows: the encoder on the reference's starting images, and the edit end to end."""
    import numpy as np

    got, enc = edit_images(rt, ids_list, noise_list, ref["edit_start"], sf)
    return {"vae_encoder": _parity("vae_encoder", np.concatenate(ref["edit_latent"]), np.concatenate(enc), rt.gates.get("vae_encoder")),
            "image_to_image": _parity("image_to_image", np.concatenate(ref["edit_image"]), np.concatenate(got),
                                      rt.gates.get("end_to_end"))}


def verdict(label: str, rows: dict) -> dict:
    gated = {c: r for c, r in rows.items() if r["gate"] is not None}
    failed = [c for c, r in gated.items() if not r["pass"]]

    def f(c, r):
        if r.get("error"):
            return f"{c} {r['error']}"
        return f"{c} {'inf' if r['psnr'] is None else format(r['psnr'], '.1f')} {'≥' if r['pass'] else '<'} {r['gate']:g} dB"

    if not gated:
        return {"pass": None, "line": f"{label}: no gates recorded in its manifest"}
    parts = "; ".join(f(c, r) for c, r in gated.items())
    return {"pass": not failed, "failed": failed,
            "line": f"{label}: {'PASS' if not failed else 'FAIL'} — {parts}"}


def _digits(config: ReportConfig, runtimes: list[Runtime], progress: bool) -> dict:
    from ..digits.evaluate import EvalConfig, evaluate

    out: dict = {"num_images": config.digits_images, "seed": config.seed, "runtimes": {}}
    for rt in runtimes:
        if progress:
            log.info(f"digits judge: {rt.label} ({config.digits_images} images)")
        transform = None
        if rt.kind != "torch" and not rt.emulated:  # the export, by its own runtime
            cfg = EvalConfig(model=str(rt.folder), num_images=config.digits_images, seed=config.seed, backend=rt.kind)
        else:
            cfg = EvalConfig(model=config.model, num_images=config.digits_images, seed=config.seed, steps=1)
            if rt.emulated and rt.scheme:  # Core ML's stand-in: the compression applied in PyTorch
                from ..quantize.coreml import PyTorchCompression

                transform = PyTorchCompression(rt.scheme, rt.target_bits)
        r = evaluate(cfg, progress=False, transform=transform)
        g = r["generated"]
        out["runtimes"][rt.label] = {"accuracy": g["accuracy"], "fid": g["fid"], "per_digit": g["per_digit"],
                                     "how": "the PyTorch modules compressed as converted" if transform else rt.how}
        out["real"] = {"accuracy": r["real"]["accuracy"], "fid": r["real"]["fid"], "fid_n": r["real"]["fid_n"]}
        out["judge_val_accuracy"] = r["judge"]["val_accuracy"]
    return out


def make_report(config: ReportConfig, progress: bool = True) -> dict:
    """Write the report folder ``config.output``; returns ``report.json``'s content."""
    import numpy as np
    import torch

    from ..generator import make_noise
    from ..pipeline import load_pipeline
    from . import figures, render

    t0 = time.perf_counter()
    inputs = (config.model, *[e.partition("=")[2] if "=" in e and not Path(e).exists() else e for e in config.exports],
              *config.bench, config.prompts)
    check_output(config.output, config.force, inputs)
    digits = is_digits_model(config.model)
    prompts = prompt_file(config.prompts, digits_prompts() if digits else DEFAULT_PROMPTS)
    model_hash = None
    for item in config.exports:  # an export made from another model is refused (where its manifest says)
        folder = Path(item.partition("=")[2] if "=" in item and not Path(item).exists() else item)
        want = runtime.source_hash(folder)
        if want:
            model_hash = model_hash or sha256_tree(config.model)
            if want != model_hash:
                raise InputError(f"{folder} was converted from another model than {config.model} (content hashes differ)",
                                 "pass the pipeline folder the export was converted from")
    pipe = load_pipeline(config.model, "cpu", "float32", local_files_only=True)
    params = used_params(pipe)
    ref_rt = reference(config.model, pipe, params)
    exports = open_exports(config.exports, pipe, params)
    sf = pipe.scaling_factor
    c, lh, lw = pipe.latent_shape(*pipe.image_size())
    ids_list = [pipe.tokenize([p]).numpy() for p in prompts]
    noise_list = [make_noise([config.seed + i], (c, lh, lw)).numpy() for i in range(len(prompts))]
    ref = {"hidden": [], "latents": [], "image": []}
    with torch.no_grad():
        for ids, z in zip(ids_list, noise_list):
            h = ref_rt.calls["text_encoder"](ids)
            lat = ref_rt.calls["unet"](z, h)
            ref["hidden"].append(h)
            ref["latents"].append(lat)
            ref["image"].append(ref_rt.calls["vae_decoder"](lat / sf))
    ref_images = [np.clip(x[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) for x in ref["image"]]
    if pipe.info.flow == "rectified_flow" and any(can_edit(rt) for rt in exports):
        ref["edit_start"] = [np.clip(ref["image"][(i + 1) % len(prompts)], -1, 1) for i in range(len(prompts))]
        ref["edit_image"], ref["edit_latent"] = edit_images(ref_rt, ids_list, noise_list, ref["edit_start"], sf)
    parity, verdicts, images = {}, {}, {ref_rt.label: ref_images}
    for rt in exports:
        if progress:
            log.info(f"{rt.label}: parity and images ({len(prompts)} prompts)")
        parity[rt.label], images[rt.label] = run_all(rt, ids_list, noise_list, ref, sf)
        verdicts[rt.label] = verdict(rt.label, parity[rt.label])
    digits_block = _digits(config, [ref_rt, *exports], progress) if digits and config.digits_images else None
    benches = config._benches
    latency = figures.latency_rows(benches, [ref_rt.label] + [rt.label for rt in exports])
    report = make_manifest("report", config, model=config.model, prompts=prompts,
                           seeds=[config.seed + i for i in range(len(prompts))],
                           image_size=list(pipe.image_size()),
                           runtimes={rt.label: rt.info() for rt in [ref_rt, *exports]},
                           parity=parity, verdicts=verdicts, digits=digits_block, latency=latency,
                           image_to_image={"strength": EDIT_STRENGTH, "start": "the reference's image of the next prompt",
                                           "exports": {rt.label: "image_to_image" in parity[rt.label] for rt in exports}},
                           bench_files=[str(b) for b in config.bench])
    with atomic_dir(config.output, config.force, inputs) as tmp:
        files = {"grid": "grid.png"}
        figures.grid(images, prompts, tmp / "grid.png")
        files["heatmaps"] = {}
        for rt in exports:
            name = f"heatmap-{_slug(rt.label)}.png"
            figures.heatmap(ref_images, images[rt.label], prompts, rt.label, tmp / name)
            files["heatmaps"][rt.label] = name
        if latency["rows"]:
            figures.chart(latency, tmp / "latency.png")
            files["chart"] = "latency.png"
        report["files"] = files
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        # the folder's manifest (what made it; --force replaces only folders that carry one of ours)
        write_manifest(tmp, make_manifest("report", config, model=config.model, files={**files, "report": "report.json"}))
        (tmp / "report.md").write_text(render.markdown(report))
        (tmp / "report.html").write_text(render.html(report, tmp))
    return report


def sys_platform() -> str:
    import sys

    return sys.platform
