"""``convert --target web``: a static page that runs the one-step generator with onnxruntime-web.

The site is a folder that needs no build step and no network::

    index.html  app.mjs  clip_tokenizer.mjs  torch_randn.mjs     the page (convert/web_assets/)
    ort/        ort.min.mjs + its WASM (WebGPU and WASM backends), copied from the npm package
    model/      the ONNX export (convert --target onnx's folder: tokenizer/, text_encoder/, unet/, vae_decoder/)
    manifest.json                                                  what the page loads, and how it was made

**Same seed, same image.** The page tokenizes with a port of CLIP's BPE (clip_tokenizer.mjs) and draws the
noise with a port of torch's CPU ``torch.randn`` (torch_randn.mjs: mt19937, and its float32 Box-Muller with
avx_mathfun's polynomials for tensors of 16 or more elements), so its image for (prompt, seed) is the one
``generate --backend onnx SITE/model`` gives (tests/test_web.py drives Chromium and compares the pixels).
``MODEL`` is a pipeline (exported to ONNX here, with every ``--target onnx`` option) or an existing ONNX
export folder (copied as it is). Multi-step models are refused: the page runs the one step.

onnxruntime-web comes from ``node_modules/onnxruntime-web`` (``npm ci`` in the repository, pinned by its
package.json/package-lock.json; ``make setup`` runs it), or from ``$INSTAFLOW_EDGE_ORT_WEB``.
``site_server`` serves a site on 127.0.0.1 with the cross-origin isolation headers that WASM threads need
(``instaflow-edge serve``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    read_manifest,
    sha256_tree,
    write_manifest,
)
from ..copying import copy_tree
from ..errors import InputError, MissingDependencyError, ModelError
from ..pipeline import write_slow_tokenizer_files, detect_info
from ..runtime import onnx_io
from ..runtime.onnx import KIND as ONNX_KIND
from ..runtime.onnx import PARTIAL_KIND, export_facts
from ..runtime.web import KIND as SITE_KIND
from ..validators import integer
from .config import ConvertConfig, OnnxOptions, Target, WebOptions, target
from .onnx import export_onnx

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "web_assets"
PAGE_FILES = ("index.html", "app.mjs", "clip_tokenizer.mjs", "torch_randn.mjs")
# onnxruntime-web's default build (WebGPU through JSEP, and WASM): the module and the WASM it loads
ORT_FILES = ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
ORT_ENV = "INSTAFLOW_EDGE_ORT_WEB"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
EDIT_COMPONENTS = ("vae_encoder",)  # image to image, when the ONNX export ships it
# what the page's tokenizer port implements (transformers' CLIPTokenizer, tokenizers backend)
_CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# options that shape an ONNX export: given with an export folder as MODEL they would be silently unused
_EXPORT_SHARED = {"height": None, "width": None, "min_psnr": None, "allow_pickle": False}


def _export_options_given(cfg: ConvertConfig) -> list[str]:
    """The options given that would shape an ONNX export (every WebOptions field off its default)."""
    defaults = WebOptions()
    given = [f.name for f in dataclasses.fields(WebOptions) if getattr(cfg.options, f.name) != getattr(defaults, f.name)]
    return given + [k for k, d in _EXPORT_SHARED.items() if getattr(cfg, k) != d]


# ---------------------------------------------------------------------------------------------------
# onnxruntime-web


def _candidates() -> list[Path]:
    env = os.environ.get(ORT_ENV)
    if env:
        return [Path(env)]
    repo = Path(__file__).resolve().parents[1]  # the repository root of an editable install
    return [Path.cwd() / "node_modules" / "onnxruntime-web", repo / "node_modules" / "onnxruntime-web"]


def find_ort_web() -> tuple[Path, str]:
    """``(dist folder, version)`` of the onnxruntime-web files the site copies; a one-line error saying how
    to install them when they are absent."""
    tried = []
    for c in _candidates():
        for dist in (c / "dist", c):
            if all((dist / f).is_file() for f in ORT_FILES):
                version = None
                for pkg in (dist.parent / "package.json", dist / "package.json"):
                    try:
                        version = json.loads(pkg.read_text()).get("version")
                        break
                    except (OSError, ValueError, AttributeError):
                        continue
                return dist, version or "unknown"
        tried.append(str(c))
    where = f"${ORT_ENV}={tried[0]}" if os.environ.get(ORT_ENV) else " or ".join(tried)
    if shutil.which("npm") is None:
        raise MissingDependencyError(
            f"--target web needs onnxruntime-web's files ({', '.join(ORT_FILES)}), not found in {where}, and npm is not installed",
            "install Node.js and npm (e.g. apt-get install npm), then run `npm ci` in the instaflow-edge repository "
            f"(make setup does), or set {ORT_ENV} to onnxruntime-web's dist folder")
    raise MissingDependencyError(
        f"--target web needs onnxruntime-web's files ({', '.join(ORT_FILES)}), not found in {where}",
        f"run `npm ci` in the instaflow-edge repository (make setup does), or set {ORT_ENV} to onnxruntime-web's dist folder")


# ---------------------------------------------------------------------------------------------------
# checks made before anything is exported


def _is_export(folder: Path) -> bool:
    m = read_manifest(folder) if folder.is_dir() else None
    return bool(m) and isinstance(m.get("onnx"), dict) and m.get("kind") in (ONNX_KIND, PARTIAL_KIND)


def _check_one_step(flow: str, steps: int, model: str) -> None:
    if flow != "rectified_flow":
        raise InputError(f"--target web runs one-step rectified flows; {model} is a {flow} model",
                         "distill it into a one-step student first (instaflow-edge train distill)")
    if steps != 1:
        raise InputError(f"--target web runs one step; {model} samples in {steps} steps",
                         "convert a one-step model (a distilled student, `instaflow-edge train distill`), or use "
                         "--target onnx and `generate --backend onnx --steps N`")


def _check_source(cfg: ConvertConfig) -> bool:
    """Refuse what the page cannot run, before minutes of export. Returns whether MODEL is an ONNX export."""
    src = Path(cfg.model)
    if _is_export(src):
        given = _export_options_given(cfg)
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InputError(f"{flag} shapes an ONNX export, but {cfg.model} is one already (it is copied as it is)",
                             "drop the option, or pass the pipeline folder to export it again")
        facts = export_facts(src)
        _check_one_step(facts.flow, facts.default_steps, cfg.model)
        return True
    if (src / "model_index.json").is_file():
        try:
            index = json.loads((src / "model_index.json").read_text())
        except (OSError, ValueError):
            return False  # load_pipeline says what is wrong with the folder
        info = detect_info(cfg.model, src, index if isinstance(index, dict) else None)
        _check_one_step(info.flow, info.default_steps, cfg.model)
    return False


# ---------------------------------------------------------------------------------------------------
# the site


def tokenizer_facts(folder: Path) -> dict:
    """What the page's tokenizer needs besides vocab.json and merges.txt: the framing ids, the special
    tokens and the length, read from the export's tokenizer with transformers; refuses a tokenizer whose
    pipeline is not CLIP's (the port would tokenize differently)."""
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a bad folder
        raise ModelError(f"{folder}: not a CLIP tokenizer ({type(e).__name__})", "re-export the model") from e
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        write_slow_tokenizer_files(tok, folder)
    backend = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    pre = backend.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    model = backend.get("model") or {}
    if backend and (splits != [_CLIP_SPLIT] or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>"):
        raise ModelError(f"{folder}: the tokenizer is not CLIP's byte-level BPE, which the page's tokenizer ports",
                         "export a model with a CLIP tokenizer")
    specials = {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token)}
    return {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "unk_id": tok.unk_token_id if tok.unk_token_id is not None else tok.eos_token_id,
            "max_length": int(tok.model_max_length), "specials": specials}


def _cpu_capability() -> str | None:
    """torch's CPU kernel level here (the noise kernel the page reproduces is its AVX2/AVX-512 one)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _component_files(site: Path, name: str) -> dict:
    folder = site / "model" / name
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith(onnx_io.MODEL_FILE)
                   and p.name != onnx_io.MODEL_FILE)
    return {"url": f"model/{name}/{onnx_io.MODEL_FILE}",
            "external_data": [{"path": n, "url": f"model/{name}/{n}"} for n in extra],
            "bytes": onnx_io.file_sizes(folder)}


def write_page(site: Path, dist: Path) -> None:
    """The page's files and onnxruntime-web's into ``site``."""
    for name in PAGE_FILES:
        shutil.copyfile(ASSETS / name, site / name)
    (site / "ort").mkdir()
    for name in ORT_FILES:
        shutil.copyfile(dist / name, site / "ort" / name)


@target(Target.web)
def export_web(cfg: ConvertConfig) -> dict:
    """Write the site for ``cfg.model`` at ``cfg.output``; returns its manifest, whose ``parity`` and
    ``gates`` are the ONNX export's (the page runs that export)."""
    t0 = time.perf_counter()
    dist, version = find_ort_web()  # before anything: without it there is no page
    inputs = (cfg.model, cfg.calibration_prompts)
    check_output(cfg.output, cfg.force, inputs)
    is_export = _check_source(cfg)
    src = Path(cfg.model)
    with atomic_dir(cfg.output, cfg.force, inputs) as tmp:
        model_dir = tmp / "model"
        if is_export:
            log.info(f"copying the ONNX export {src}")
            onnx_io.check_folder(src)
            copy_tree(src, model_dir, ignore=shutil.ignore_patterns(".*"))
            onnx_manifest = read_manifest(model_dir)
        else:
            onnx_manifest = export_onnx(dataclasses.replace(
                cfg, output=str(model_dir), force=False,
                options=OnnxOptions(**{f.name: getattr(cfg.options, f.name) for f in dataclasses.fields(OnnxOptions)})))
        facts = export_facts(model_dir)
        _check_one_step(facts.flow, facts.default_steps, cfg.model)
        log.info(f"writing the page and onnxruntime-web {version}")
        write_page(tmp, dist)
        source_manifest = onnx_manifest.get("source") or {}
        prompts = (read_manifest(src) or {}).get("prompts") if not is_export else None
        web = {
            "title": "/".join(Path(str(source_manifest.get("model") or cfg.model)).parts[-2:]),
            "example_prompt": (prompts or ["a red fox in snow"])[0] if isinstance(prompts, list) and prompts else "a red fox in snow",
            "latent_shape": list(facts.latent_shape), "height": facts.height, "width": facts.width,
            "scaling_factor": facts.scaling_factor,
            "components": {n: _component_files(tmp, n) for n in COMPONENTS + EDIT_COMPONENTS if n in facts.components},
            "unet_timestep": (onnx_manifest.get("onnx") or {}).get("unet_timestep"),
            "tokenizer": {"vocab": "model/tokenizer/vocab.json", "merges": "model/tokenizer/merges.txt",
                          **tokenizer_facts(model_dir / "tokenizer")},
            "noise": "torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(seed)), float32, "
                     "ported in torch_randn.mjs: torch's AVX2/AVX-512 CPU kernel (without AVX2 torch uses libm and "
                     "differs in the last bit of some values)",
            "torch_cpu_capability": _cpu_capability(),
            "onnxruntime_web": {"version": version, "files": [f"ort/{f}" for f in ORT_FILES]},
            "same_image_as": "instaflow-edge generate SITE/model PROMPT --seed SEED --backend onnx "
                             "[--image START --strength S: a starting image at the model's size]",
        }
        manifest = make_manifest(
            SITE_KIND, cfg,
            source={"model": str(src), "kind": ONNX_KIND if is_export else "pipeline",
                    "content_sha256": source_manifest.get("content_sha256") or (sha256_tree(src) if not is_export else None)},
            web=web, quantize=onnx_manifest.get("quantize"), gates=onnx_manifest.get("gates") or {},
            parity=onnx_manifest.get("parity") or [],
            sizes={"model": onnx_io.file_sizes(model_dir), "ort": onnx_io.file_sizes(tmp / "ort"),
                   "page": sum((tmp / n).stat().st_size for n in PAGE_FILES)},
            seconds={"total": round(time.perf_counter() - t0, 2)},
        )
        write_manifest(tmp, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------
# serving a site

# WASM threads need SharedArrayBuffer, which browsers give only to cross-origin isolated pages
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
          ".onnx": "application/octet-stream", ".onnx_data": "application/octet-stream", ".txt": "text/plain; charset=utf-8",
          ".html": "text/html; charset=utf-8"}


def check_site(site: str | os.PathLike) -> Path:
    """A folder written by ``convert --target web``, or a one-line error."""
    path = Path(site)
    if not path.is_dir():
        raise InputError(f"{site} is not a folder", "pass the folder written by `instaflow-edge convert MODEL --target web -o SITE`")
    m = read_manifest(path)
    if not m or m.get("kind") != SITE_KIND or not (path / "index.html").is_file():
        raise InputError(f"{site} is not a site written by convert --target web (no {SITE_KIND} manifest.json or index.html)",
                         "pass the folder written by `instaflow-edge convert MODEL --target web -o SITE`")
    return path


def site_server(site: str | os.PathLike, port: int = 8000, quiet: bool = False):
    """An HTTP server (not started) for ``site`` on 127.0.0.1:``port`` (0: any free port; the bound one is
    ``server.server_address[1]``), sending the cross-origin isolation headers and the MIME types the page
    needs. Only 127.0.0.1: the page is for this machine."""
    import functools
    import http.server

    folder = check_site(site).resolve()
    port = integer("port", port, 0)
    if port > 65535:
        raise InputError(f"--port {port} is not a TCP port", "pass a port from 1 to 65535, or 0 for any free one")

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **_TYPES}

        def end_headers(self):
            for k, v in ISOLATION_HEADERS.items():
                self.send_header(k, v)
            self.send_header("Cache-Control", "no-cache")
            super().end_headers()

        def send_head(self):
            # Only regular files whose real path is inside the site: a symlink out of it (leak.txt ->
            # /etc/passwd, model/etc -> /etc) is "not found", and so is a folder without index.html (no listings).
            path = Path(self.translate_path(self.path))
            if path.is_dir() and Path(os.path.realpath(path)).is_relative_to(folder):
                if not self.path.split("?", 1)[0].split("#", 1)[0].endswith("/"):
                    return super().send_head()  # a redirect to FOLDER/ (no content)
                path = path / "index.html"
            real = Path(os.path.realpath(path))
            if not real.is_relative_to(folder) or not real.is_file():
                self.send_error(404, "File not found")
                return None
            return super().send_head()

        def list_directory(self, path):
            self.send_error(404, "File not found")
            return None

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            if not quiet:
                super().log_message(format, *args)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    try:
        return Server(("127.0.0.1", port), functools.partial(Handler, directory=str(folder)))
    except OSError as e:
        raise InputError(f"cannot listen on 127.0.0.1:{port} ({e.strerror or e})",
                         "pass another --port (0 picks a free one)") from e
