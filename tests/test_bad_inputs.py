"""Every bad input and fault a user can cause is one line, in a real subprocess.

A table of rows: (command args, setup, expected fragment of the one error line, paths that must still
exist afterwards). Each row runs ``python -m instaflow_edge.cli ARGS`` in a fresh process and checks:

* the exit code is not 0 and nothing printed "Traceback";
* stderr holds exactly one ``error:`` line (the last one; only stage lines may precede it), short, with
  the expected fragment(s);
* every file that existed before the run (the shared tiny model, ONNX export and pairs, and what the
  row's setup made) is byte-identical afterwards, the ``keep`` paths exist, the ``absent`` paths do not;
* nothing new appeared in the row's folder: no output, no ``.*.tmp-*`` temp folder, no empty parent.

Rows run in parallel threads (each its own subprocess) once per module; each test asserts one row.
Rows that train or export are ``slow``. Disk-full rows mount a small tmpfs in a user+mount namespace
(``unshare -rm``) when the machine allows it, else they are skipped; ``enospc`` rows simulate a full
disk in-process (a ``sitecustomize``) and always run. Permission rows run as ``nobody`` when the suite
runs as root (root ignores file modes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
ERROR_LINE_MAX = 600  # characters: one readable line, not an expanded YAML bomb
# what may precede the error line on stderr: stage lines ("[onnx  3s] unet: exporting") and progress bars
STAGE_LINE = re.compile(r"^\[(onnx|quantize|coreml|train|demo|model|bench|web)\b[^\]]*\] |^[\w ()-]+:\s+\d+%\|")


# ---------------------------------------------------------------------------------------------------
# the row type and its context


@dataclasses.dataclass
class Row:
    id: str
    args: list[str]
    expect: tuple[str, ...]
    setup: Callable[["Ctx"], None] | None = None
    keep: tuple[str, ...] = ()  # paths (placeholders allowed) that must exist afterwards
    absent: tuple[str, ...] = ()  # paths that must not exist afterwards (payload markers, parents)
    slow: bool = False
    needs: tuple[str, ...] = ()  # shared fixtures: "onnx", "pairs"; capabilities: "coremltools", "not-darwin", "no-gpu"
    runner: str = "plain"  # plain | nobody | tmpfs:SIZE:DIR | rofs:DIR | enospc:DIR
    env: dict | None = None
    cwd: str | None = None
    code: int | None = None  # exact exit code when it matters (3: a parity gate)
    allow_new: tuple[str, ...] = ()  # glob patterns (relative to the row folder) that may appear
    allow_left: tuple[str, ...] = ()  # glob patterns of what may stay on a row's tmpfs (a resumable output)
    timeout: int = 300
    max_seconds: float | None = None  # must fail within this (fail-fast rows)

    def param(self):
        marks = [pytest.mark.slow] if self.slow else []
        return pytest.param(self, id=self.id, marks=marks)


class Ctx:
    """What a setup function gets: the row's folder and the shared fixtures (never modify those)."""

    def __init__(self, tmp: Path, shared: dict):
        self.tmp = tmp
        self.tiny: Path = shared["tiny"]
        self.onnx: Path | None = shared.get("onnx")
        self.pairs: Path | None = shared.get("pairs")
        self.openvino: Path | None = shared.get("openvino")
        self.chmods: list[tuple[Path, int]] = []

    def fmt(self, s: str) -> str:
        return s.format(tmp=self.tmp, tiny=self.tiny, onnx=self.onnx, pairs=self.pairs, m=self.tmp / "m")

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def model(self) -> Path:
        """A row-local copy of the tiny model at {m}, free to corrupt."""
        return self.copy(self.tiny, "m")

    def write(self, rel: str, data: str | bytes) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
        return p

    def chmod(self, rel: str, mode: int) -> None:
        """Applied after the before-snapshot, undone before the after-snapshot."""
        self.chmods.append((self.tmp / rel, mode))


def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _set(key_path: list, value):
    def fn(d):
        cur = d
        for k in key_path[:-1]:
            cur = cur[k]
        cur[key_path[-1]] = value
        return d

    return fn


def _safetensors(path: Path, header_fn=None, raw_header: bytes | None = None) -> None:
    """Rewrite a safetensors file's JSON header (keeping the file's length consistent)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    new = raw_header if raw_header is not None else json.dumps(header_fn(header)).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + body)


def _first_tensor(h: dict) -> str:
    return next(k for k in sorted(h) if k != "__metadata__")


def _swap_offsets(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return h


def _unknown_dtype(h):
    h[_first_tensor(h)]["dtype"] = "F7"
    return h


def _evil_pickle(path: Path, marker: Path) -> None:
    """A torch checkpoint whose unpickling would run ``touch marker`` (torch's safe loader refuses it)."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Evil()}, path)


def _png(path: Path, size=(64, 64)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def _bomb_png(path: Path) -> None:
    """A small PNG whose header claims ~400 M pixels (PIL's DecompressionBombError at open)."""
    import zlib

    w = h = 20000

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\0" + b"\0" * ((w + 7) // 8)
    idat = zlib.compress(row * 64)  # a few rows; the header is what PIL checks
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _images(ctx: Ctx, n: int = 2, captions: str | None = None) -> Path:
    d = ctx.tmp / "imgs"
    for i in range(n):
        _png(d / f"im{i}.png")
    ctx.write("imgs/captions.jsonl", captions if captions is not None else
              "".join(json.dumps({"file": f"im{i}.png", "text": "a red fox"}) + "\n" for i in range(n)))
    return d


BINARY = bytes(range(256)) * 4  # not UTF-8
YAML_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
    for p, c in zip("abcdefgh", "bcdefghi")]) + "\nmax-steps: *i\n"
FAST_TRAIN = ["--max-steps", "1", "--batch-size", "2", "--checkpoint-every", "0", "--cpu", "--no-progress"]


# ---------------------------------------------------------------------------------------------------
# setups


def s_model(ctx):
    ctx.model()


def s_model_then(fn):
    def setup(ctx):
        fn(ctx.model(), ctx)

    return setup


def s_existing_out(ctx):
    ctx.write("o/keep.txt", "mine")


def s_index(value):
    return s_model_then(lambda m, ctx: (m / "model_index.json").write_text(json.dumps(value)))


def s_index_edit(fn):
    return s_model_then(lambda m, ctx: _edit_json(m / "model_index.json", fn))


def s_manifest_edit(fn):
    return s_model_then(lambda m, ctx: _edit_json(m / "manifest.json", fn))


def s_unet_config(key, value):
    return s_model_then(lambda m, ctx: _edit_json(m / "unet" / "config.json", _set([key], value)))


def s_header(component: str, header_fn=None, raw: bytes | None = None):
    def fn(m, ctx):
        _safetensors(next((m / component).glob("*.safetensors")), header_fn, raw)

    return s_model_then(fn)


def s_truncate_weights(m, ctx):
    f = next((m / "unet").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])


def s_garble_header(m, ctx):
    f = next((m / "text_encoder").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))


def s_pickle_only(component: str, evil: bool):
    def fn(m, ctx):
        import torch
        from safetensors.torch import load_file

        sub = m / component
        sd = {}
        for f in sub.glob("*.safetensors"):
            sd.update(load_file(f))
            f.unlink()
        name = "pytorch_model.bin" if component == "text_encoder" else "diffusion_pytorch_model.bin"
        if evil:
            _evil_pickle(sub / name, ctx.tmp / "PWNED")
        else:
            torch.save(sd, sub / name)

    return s_model_then(fn)


def s_onnx_copy(fn=None):
    def setup(ctx):
        d = ctx.copy(ctx.onnx, "x")
        if fn:
            fn(d, ctx)

    return setup


def s_onnx_external(how):
    def fn(d, ctx):
        import onnx

        secret = ctx.write("secret.bin", b"\0" * 4096)
        model = onnx.load(str(d / "unet" / "model.onnx"))
        t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        if how == "absolute":
            loc = str(secret)
        elif how == "dotdot":
            loc = "../../secret.bin"
        else:
            (d / "unet" / "weights.bin").symlink_to(secret)
            loc = "weights.bin"
        t.external_data.add(key="location", value=loc)
        onnx.save(model, str(d / "unet" / "model.onnx"))

    return s_onnx_copy(fn)


def s_onnx_truncate(d, ctx):
    p = d / "unet" / "model.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def s_onnx_swap_graph(d, ctx):
    shutil.copy(d / "text_encoder" / "model.onnx", d / "unet" / "model.onnx")


def s_onnx_manifest(key, value):
    return s_onnx_copy(lambda d, ctx: _edit_json(d / "manifest.json", _set(["onnx", key], value)))


def s_images(n=2, captions=None, extra=None):
    def setup(ctx):
        d = _images(ctx, n, captions)
        if extra:
            extra(d, ctx)

    return setup


def s_pairs_copy(fn=None):
    def setup(ctx):
        d = ctx.copy(ctx.pairs, "p")
        if fn:
            fn(d, ctx)

    return setup


def s_write(rel, data, then=None):
    def setup(ctx):
        ctx.write(rel, data)
        if then:
            then(ctx)

    return setup


def s_chmod(rel, mode=0, model=True):
    def setup(ctx):
        if model:
            ctx.model()
        ctx.chmod(rel, mode)

    return setup


def s_block_module(name):
    return s_write(f"block/{name}/__init__.py", "raise ImportError('blocked by the test')\n")


def s_cwd(ctx):
    ctx.write("cwd/keep.txt", "mine")


def s_trained_work_dir(ctx):
    """A work dir ``w`` holding a real checkpoint (one training step, in a subprocess)."""
    r = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", *[ctx.fmt(a) for a in TEACHER], "--data", str(ctx.tmp / "imgs"),
                        *FAST_TRAIN, "--checkpoint-every", "1", "-o", str(ctx.tmp / "T"), "--work-dir", str(ctx.tmp / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(ctx.tmp / "T")


def s_all(*fns):
    def setup(ctx):
        for f in fns:
            f(ctx)

    return setup


def s_bench(edit=None, raw: str | None = None):
    """A bench result at {tmp}/b.json: a valid one (optionally edited), or ``raw`` text."""
    def setup(ctx):
        if raw is not None:
            ctx.write("b.json", raw)
            return
        data = {"kind": "bench", "device": "cpu", "threads": 1, "repeats": 2, "interleaved": True, "note": None,
                "results": {"torch eager fp32": {"end_to_end": {"median_s": 0.1, "p90_s": 0.12}}},
                "memory": {}, "skipped": {}, "machine": {"cpu": {"logical_cores": 2}}}
        ctx.write("b.json", json.dumps(edit(data) if edit else data))

    return setup


def s_link_out(rel: str, folder: str = "m"):
    """``{tmp}/<folder>/<rel>`` → ``{tmp}/secret.txt`` (outside the folder a command copies)."""
    def setup(ctx):
        secret = ctx.write("secret.txt", "the converter's own private key\n")
        link = ctx.tmp / folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(secret)

    return setup


def s_onnx_sparse(d, ctx):
    """One initializer of the UNet moved into ``sparse_initializer``, its values pointing outside the folder."""
    import onnx
    from onnx import helper, numpy_helper

    secret = ctx.write("secret.bin", b"\0" * 4096)
    model = onnx.load(str(d / "unet" / "model.onnx"))
    t = next(t for t in model.graph.initializer if len(t.dims) == 1 and t.dims[0] >= 4)
    values = numpy_helper.from_array(numpy_helper.to_array(t)[:1].copy(), t.name)
    values.ClearField("raw_data")
    values.data_location = onnx.TensorProto.EXTERNAL
    values.external_data.add(key="location", value=str(secret))
    indices = numpy_helper.from_array(__import__("numpy").array([0], dtype="int64"), t.name + "_indices")
    sparse = helper.make_sparse_tensor(values, indices, list(t.dims))
    model.graph.initializer.remove(t)
    model.graph.sparse_initializer.append(sparse)
    onnx.save(model, str(d / "unet" / "model.onnx"))


# ---------------------------------------------------------------------------------------------------
# the table

O = "{tmp}/o"  # the output of a row (must never appear)
GEN = ["generate", "{tiny}", "a red fox"]
GEN_M = ["generate", "{m}", "a red fox"]
CONV = ["convert", "{tiny}", "--target", "onnx"]
CONV_ML = ["convert", "{tiny}", "--target", "coreml"]
TEACHER = ["train", "teacher", "{tiny}"]
RDATA = ["train", "reflow-data", "{tiny}", "--num-pairs", "2", "--steps", "2", "--device", "cpu", "--no-progress"]
REFLOW = ["train", "reflow", "{tiny}"]
DISTILL = ["train", "distill", "{tiny}"]
GEN_ONNX = ["generate", "{tmp}/x", "a red fox", "--backend", "onnx"]


def R(id, args, expect, **kw):
    return Row(id, list(args), (expect,) if isinstance(expect, str) else tuple(expect), **kw)


ROWS: list[Row] = [
    # --- generate: arguments (test_cli.py) ---
    R("gen-missing-model", ["generate", "{tmp}/nope", "a fox", "-o", O], "does not exist"),
    R("gen-empty-prompt", [*GEN[:2], "", "-o", O], "empty prompt"),
    R("gen-blank-prompt", [*GEN[:2], "   ", "-o", O], "empty prompt"),
    R("gen-seed-negative", [*GEN, "--seed", "-3", "-o", O], ("seed", "non-negative")),
    R("gen-seed-float", [*GEN, "--seed", "1.5", "-o", O], ("--seed", "--help")),
    R("gen-steps-0", [*GEN, "--steps", "0", "-o", O], ("steps", "positive")),
    R("gen-height-60", [*GEN, "--height", "60", "-o", O], "multiple of"),
    R("gen-device-tpu", [*GEN, "--device", "tpu", "-o", O], "--device"),
    R("gen-device-cuda", [*GEN, "--device", "cuda", "-o", O], ("cuda", "--device cpu"), needs=("no-gpu",)),
    R("gen-guidance-negative", [*GEN, "--guidance", "-1", "-o", O], "guidance"),
    R("gen-no-prompt", ["generate", "{tiny}", "-o", O], "Missing argument"),
    R("gen-existing-output", [*GEN, "-o", O], ("already exists", "--force"), setup=s_existing_out, keep=("{tmp}/o/keep.txt",)),
    R("gen-output-parent-is-file", [*GEN, "-o", "{tmp}/f/out"], "is a file", setup=s_write("f", "x")),
    R("gen-onnx-backend-on-torch-folder", [*GEN, "--backend", "onnx", "-o", O], "manifest"),
    R("gen-onnx-dtype", ["generate", "{onnx}", "a fox", "--backend", "onnx", "--dtype", "float16", "-o", O], "--dtype", needs=("onnx",)),
    R("gen-onnx-guidance", ["generate", "{onnx}", "a fox", "--backend", "onnx", "--guidance", "2", "-o", O], "guidance", needs=("onnx",)),
    R("gen-onnx-steps", ["generate", "{onnx}", "a fox", "--backend", "onnx", "--steps", "2", "-o", O], "one-step only", needs=("onnx",)),
    R("gen-coreml-on-linux", [*GEN, "--backend", "coreml", "-o", O], "Core ML prediction needs macOS", needs=("not-darwin",)),
    # --- numbers ---
    R("gen-seed-2**70", [*GEN, "--seed", str(2**70), "-o", O], "2**63"),
    R("gen-seed-overflow-second-image", [*GEN, "--seed", str(2**64 - 1), "-n", "2", "-o", O], "2**63"),
    R("gen-seed-last-fits-first-image-only", [*GEN, "--seed", str(2**63 - 1), "-n", "2", "-o", O], ("2**63", "--seed")),
    R("gen-num-images-billion", [*GEN, "--num-images", "1000000000", "-o", O], ("--num-images", "at most"), max_seconds=60),
    R("gen-num-images-zero", [*GEN, "--num-images", "0", "-o", O], "num_images"),
    R("gen-height-100000", [*GEN, "--height", "100000", "-o", O], ("height", "4096"), max_seconds=60),
    R("gen-width-huge", [*GEN, "--width", "65536", "-o", O], ("width", "4096"), max_seconds=60),
    R("gen-height-negative", [*GEN, "--height", "-64", "-o", O], ("height", "positive")),
    R("convert-height-negative", [*CONV, "--height", "-64", "-o", O], ("height", "positive")),
    R("convert-width-huge", [*CONV, "--width", "100000", "-o", O], ("width", "4096")),
    R("convert-min-psnr-negative", [*CONV, "--min-psnr", "-5", "-o", O], ("min_psnr", "≥ 0")),
    R("convert-min-psnr-nan", [*CONV, "--min-psnr", "nan", "-o", O], "min_psnr"),
    R("quantize-min-psnr-negative", ["quantize", "{onnx}", "--scheme", "fp16", "--min-psnr", "-5", "-o", O], ("min_psnr", "≥ 0"), needs=("onnx",)),
    R("eval-seed-2**70", ["eval", "{tiny}", "--seed", str(2**70), "-n", "20"], "2**63"),
    R("eval-num-images-billion", ["eval", "{tiny}", "-n", "1000000000"], ("--num-images", "at most"), max_seconds=60),
    R("init-seed-2**70", ["init", "tiny", O, "--seed", str(2**70)], "2**63"),
    R("teacher-seed-2**70", [*TEACHER, "--seed", str(2**70), "-o", O], "2**63"),
    R("rdata-seed-2**70", [*RDATA, "--prompts", "{tmp}/p.txt", "--seed", str(2**70), "-o", O], "2**63",
      setup=s_write("p.txt", "a red fox\n")),
    R("rdata-height-huge", [*RDATA, "--prompts", "{tmp}/p.txt", "--height", "100000", "-o", O], ("height", "4096"),
      setup=s_write("p.txt", "a red fox\n")),
    R("demo-seed-2**70", ["demo", "--quick", "--seed", str(2**70), "-o", O], "2**63"),
    R("gen-onnx-latent-shape-string", [*GEN_ONNX, "-o", O], "latent_shape", needs=("onnx",),
      setup=s_onnx_manifest("latent_shape", [4, "8", 8])),
    R("gen-onnx-height-string", [*GEN_ONNX, "-o", O], "height", needs=("onnx",), setup=s_onnx_manifest("height", "64")),
    R("gen-onnx-default-steps-bad", [*GEN_ONNX, "-o", O], "default_steps", needs=("onnx",),
      setup=s_onnx_manifest("default_steps", -5)),
    # --- init ---
    R("init-unknown-preset", ["init", "nope", O], ("unknown preset", "sd15", "tiny")),
    R("init-seed-negative", ["init", "tiny", O, "--seed", "-1"], "seed"),
    R("init-existing-output", ["init", "tiny", O], ("already exists", "--force"), setup=s_existing_out, keep=("{tmp}/o/keep.txt",)),
    # --- pipeline folders (test_pipeline_io.py) ---
    R("model-no-index", [*GEN_M, "-o", O], "model_index.json", setup=s_model_then(lambda m, c: (m / "model_index.json").unlink())),
    R("model-not-a-folder", ["generate", "{tmp}/f", "a fox", "-o", O], "not a folder", setup=s_write("f", "x")),
    R("model-missing-component", [*GEN_M, "-o", O], ("vae", "missing"), setup=s_model_then(lambda m, c: shutil.rmtree(m / "vae"))),
    R("model-no-weights", [*GEN_M, "-o", O], ("unet", "no weights"),
      setup=s_model_then(lambda m, c: [f.unlink() for f in (m / "unet").glob("*.safetensors")])),
    R("model-truncated-safetensors", [*GEN_M, "-o", O], "truncated or corrupt", setup=s_model_then(s_truncate_weights)),
    R("model-garbled-header-length", [*GEN_M, "-o", O], "truncated or corrupt", setup=s_model_then(s_garble_header)),
    R("model-header-list", [*GEN_M, "-o", O], ("unet", "safetensors", "corrupt"), setup=s_header("unet", raw=b"[1, 2, 3]")),
    R("model-header-string", [*GEN_M, "-o", O], ("vae", "safetensors", "corrupt"), setup=s_header("vae", raw=b'"hello"  ')),
    R("model-header-not-json", [*GEN_M, "-o", O], ("safetensors", "corrupt"), setup=s_header("unet", raw=b"{not json")),
    R("model-header-swapped-offsets", [*GEN_M, "-o", O], ("unet", "safetensors", "corrupt"), setup=s_header("unet", _swap_offsets)),
    R("model-header-unknown-dtype", [*GEN_M, "-o", O], ("text_encoder", "safetensors", "dtype"),
      setup=s_header("text_encoder", _unknown_dtype)),
    R("model-header-bad-shape", [*GEN_M, "-o", O], ("unet", "safetensors", "corrupt"),
      setup=s_header("unet", lambda h: _set([_first_tensor(h), "shape"], [3, 1000000])(h))),
    R("model-pickle-only-needs-flag", [*GEN_M, "-o", O], "--allow-pickle", setup=s_pickle_only("unet", evil=False)),
    R("model-evil-pickle-text-encoder", [*GEN_M, "--allow-pickle", "-o", O], ("text_encoder", "not a plain tensor checkpoint"),
      setup=s_pickle_only("text_encoder", evil=True), absent=("{tmp}/PWNED",)),
    R("model-evil-pickle-unet-convert", ["convert", "{m}", "--allow-pickle", "-o", O], ("unet", "not a plain tensor checkpoint"),
      setup=s_pickle_only("unet", evil=True), absent=("{tmp}/PWNED",)),
    R("model-index-list", [*GEN_M, "-o", O], ("model_index.json", "not a JSON object"), setup=s_index(["diffusers", "x"])),
    R("model-index-not-json", [*GEN_M, "-o", O], ("model_index.json", "not valid JSON"),
      setup=s_model_then(lambda m, c: (m / "model_index.json").write_text("{oops"))),
    R("model-index-binary", [*GEN_M, "-o", O], "model_index.json", setup=s_model_then(lambda m, c: (m / "model_index.json").write_bytes(BINARY))),
    R("model-scheduler-null", [*GEN_M, "-o", O], "scheduler", setup=s_index_edit(_set(["scheduler"], None))),
    R("model-scheduler-module", [*GEN_M, "-o", O], "not a diffusers scheduler", setup=s_index_edit(_set(["scheduler"], ["diffusers", "utils"]))),
    R("model-scheduler-pipeline", [*GEN_M, "-o", O], "not a diffusers scheduler",
      setup=s_index_edit(_set(["scheduler"], ["diffusers", "DiffusionPipeline"]))),
    R("model-scheduler-sd-pipeline", [*GEN_M, "-o", O], "not a diffusers scheduler",
      setup=s_index_edit(_set(["scheduler"], ["diffusers", "StableDiffusionPipeline"]))),
    R("model-scheduler-unknown", [*GEN_M, "-o", O], "not a diffusers scheduler",
      setup=s_index_edit(_set(["scheduler"], ["diffusers", "NoSuchScheduler"]))),
    R("model-scheduler-os", [*GEN_M, "-o", O], "not a diffusers scheduler", setup=s_index_edit(_set(["scheduler"], ["os", "system"]))),
    R("model-scheduler-missing", [*GEN_M, "-o", O], "scheduler",
      setup=s_index_edit(lambda d: {k: v for k, v in d.items() if k != "scheduler"})),
    R("model-unet-config-types", [*GEN_M, "-o", O], "unet", setup=s_unet_config("block_out_channels", "abc")),
    R("model-unet-config-in-channels", [*GEN_M, "-o", O], "unet", setup=s_unet_config("in_channels", "four")),
    R("model-unet-config-list", [*GEN_M, "-o", O], "unet",
      setup=s_model_then(lambda m, c: (m / "unet" / "config.json").write_text("[1, 2]"))),
    R("model-manifest-default-steps-abc", [*GEN_M, "-o", O], ("manifest.json", "default_steps"),
      setup=s_manifest_edit(_set(["model", "default_steps"], "abc"))),
    R("model-manifest-default-steps-negative", [*GEN_M, "-o", O], ("manifest.json", "default_steps"),
      setup=s_manifest_edit(_set(["model", "default_steps"], -5))),
    R("model-manifest-flow-unknown", [*GEN_M, "-o", O], ("manifest.json", "flow"), setup=s_manifest_edit(_set(["model", "flow"], "magic"))),
    R("model-manifest-list", [*GEN_M, "-o", O], ("manifest.json", "not a JSON object"),
      setup=s_model_then(lambda m, c: (m / "manifest.json").write_text("[]"))),
    R("model-manifest-binary", [*GEN_M, "-o", O], "manifest.json", setup=s_model_then(lambda m, c: (m / "manifest.json").write_bytes(BINARY))),
    R("model-bad-path-makes-no-parents", ["generate", "{tmp}/nope", "a fox", "-o", "{tmp}/p/q/o"], "does not exist", absent=("{tmp}/p",)),
    R("model-corrupt-makes-no-parents", [*GEN_M, "-o", "{tmp}/p/q/o"], "corrupt", setup=s_header("unet", raw=b"[]"), absent=("{tmp}/p",)),
    R("hub-id-offline-fails-fast", ["generate", "nonexistent-org-x/no-model", "a fox", "-o", "{tmp}/p/o"], "could not fetch",
      env={"HF_HUB_OFFLINE": None}, absent=("{tmp}/p",), max_seconds=30),
    R("hub-id-offline-env", ["generate", "nonexistent-org-x/no-model", "a fox", "-o", "{tmp}/p/o"], ("could not fetch", "HF_HUB_OFFLINE"),
      env={"HF_HUB_OFFLINE": "1"}, absent=("{tmp}/p",), max_seconds=30),
    # --- permissions (as nobody when root) ---
    R("perm-model-folder", [*GEN_M, "-o", O], ("permission denied", "m"), setup=s_chmod("m"), runner="nobody"),
    R("perm-unet-folder", [*GEN_M, "-o", O], ("permission denied", "unet"), setup=s_chmod("m/unet"), runner="nobody"),
    R("perm-weights-file", [*GEN_M, "-o", O], ("permission denied", "safetensors"),
      setup=s_all(s_model, lambda c: c.chmod(next((c.tmp / "m" / "unet").glob("*.safetensors")).relative_to(c.tmp).as_posix(), 0)),
      runner="nobody"),
    R("perm-output-parent", [*GEN_M, "-o", "{tmp}/ro/o"], ("permission denied", "ro"),
      setup=s_all(s_model, s_write("ro/keep.txt", "x"), lambda c: c.chmod("ro", 0o555)), runner="nobody"),
    R("perm-prompts-file", [*RDATA[:2], "{m}", *RDATA[3:], "--prompts", "{tmp}/p.txt", "-o", O], ("p.txt", "not readable"),
      setup=s_all(s_model, s_write("p.txt", "a fox\n"), lambda c: c.chmod("p.txt", 0)), runner="nobody"),
    R("perm-config-file", [*TEACHER[:2], "{m}", "--config", "{tmp}/c.toml", "-o", O], ("c.toml", "not readable"),
      setup=s_all(s_model, s_write("c.toml", "max-steps = 1\n"), lambda c: c.chmod("c.toml", 0)), runner="nobody"),
    R("rofs-generate", [*GEN, "-o", "{tmp}/ro/o"], ("read-only file system", "ro"), runner="rofs:ro", setup=s_write("ro/.mnt", "")),
    R("rofs-init", ["init", "tiny", "{tmp}/ro/o"], ("read-only file system", "ro"), runner="rofs:ro", setup=s_write("ro/.mnt", ""), slow=True),
    R("cwd-output-force", ["generate", "{tiny}", "a fox", "-o", ".", "--force"], "current folder", setup=s_cwd, cwd="{tmp}/cwd",
      keep=("{tmp}/cwd/keep.txt",)),
    R("cwd-parent-output-force", ["generate", "{tiny}", "a fox", "-o", "..", "--force"], "current folder", setup=s_cwd,
      cwd="{tmp}/cwd", keep=("{tmp}/cwd/keep.txt",)),
    # --- disk full: a small tmpfs where the machine allows it, else a simulated ENOSPC ---
    R("full-generate", [*GEN, "-n", "40", "-o", "{tmp}/full/o"], ("no space left", "full"), runner="tmpfs:96k:full", setup=s_write("full/.mnt", "")),
    R("full-generate-simulated", [*GEN, "-n", "3", "-o", "{tmp}/full/o"], ("no space left", "full"), runner="enospc:full", setup=s_write("full/.keep", "")),
    R("full-init", ["init", "tiny", "{tmp}/full/o"], ("no space left", "full"), runner="tmpfs:1m:full", setup=s_write("full/.mnt", ""), slow=True),
    R("full-convert", [*CONV, "-o", "{tmp}/full/o"], ("no space left", "full"), runner="tmpfs:1m:full", setup=s_write("full/.mnt", ""), slow=True),
    R("full-quantize", ["quantize", "{onnx}", "--scheme", "fp16", "-o", "{tmp}/full/o"], ("no space left", "full"), runner="tmpfs:512k:full",
      setup=s_write("full/.mnt", ""), needs=("onnx",), slow=True),
    R("full-reflow-data", [*RDATA[:3], "--num-pairs", "64", "--shard-size", "32", "--steps", "1", *RDATA[7:], "--prompts", "{tmp}/p.txt",
                           "-o", "{tmp}/full/o"], ("no space left", "full"), runner="tmpfs:64k:full",
      setup=s_all(s_write("p.txt", "a red fox\n"), s_write("full/.mnt", "")), slow=True,
      allow_left=("o", "o/shard-[0-9]*.safetensors", "o/shard-[0-9]*.json")),  # resumable: whole shards only
    R("full-checkpoint", [*TEACHER, "--data", "{tmp}/imgs", "-o", "{tmp}/T", "--work-dir", "{tmp}/full/w", "--max-steps", "2",
                          "--batch-size", "2", "--checkpoint-every", "1", "--cpu", "--no-progress"], ("no space left", "full"),
      runner="tmpfs:256k:full", setup=s_all(s_images(), s_write("full/.mnt", "")), slow=True,
      allow_left=("w", "w/metrics.jsonl")),  # the work dir keeps its log; no half checkpoint
    # --- config files (test_train_teacher.py) ---
    R("config-unknown-key", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], ("unknown key 'max-stepz'", "valid keys:", "max-steps"),
      setup=s_write("c.toml", "max-stepz = 3\n")),
    R("config-yaml-wrong-type", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "learning_rate must be a finite number",
      setup=s_write("c.yaml", "learning-rate: [1, 2]\n")),
    R("config-allow-pickle-string-toml", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], "allow_pickle must be true or false",
      setup=s_write("c.toml", 'allow-pickle = "false"\n')),
    R("config-allow-pickle-string-yaml", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "allow_pickle must be true or false",
      setup=s_write("c.yaml", 'allow-pickle: "false"\n')),
    R("config-yaml-alias-bomb", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], ("c.yaml", "alias"), setup=s_write("c.yaml", YAML_BOMB),
      max_seconds=30),
    R("config-yaml-anchor", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], ("c.yaml", "alias"),
      setup=s_write("c.yaml", "max-steps: &n 3\nwarmup-steps: *n\n")),
    R("config-huge-file", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], ("c.toml", "too large"),
      setup=s_write("c.toml", "# " + "x" * 2_000_000 + "\n")),
    R("config-binary", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], ("c.toml", "not UTF-8"), setup=s_write("c.toml", BINARY)),
    R("config-binary-yaml", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], ("c.yaml", "not UTF-8"), setup=s_write("c.yaml", BINARY)),
    R("config-syntax", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], "cannot parse", setup=s_write("c.toml", "max_steps = = 7\n")),
    R("config-long-value", [*TEACHER, "--config", "{tmp}/c.toml", "-o", O], "max_steps must be",
      setup=s_write("c.toml", f'max-steps = "{"9" * 5000}"\n')),
    R("config-yaml-captions-int", [*TEACHER, "--data", "{tmp}/imgs", "--config", "{tmp}/c.yaml", "-o", O], "captions",
      setup=s_all(s_images(), s_write("c.yaml", "captions: 5\n"))),
    R("config-yaml-data-int", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "data", setup=s_write("c.yaml", "data: 5\n")),
    R("config-yaml-work-dir-list", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "work_dir", setup=s_write("c.yaml", "work-dir: [a]\n")),
    R("config-yaml-not-table", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "not a table", setup=s_write("c.yaml", "- 1\n- 2\n")),
    R("config-yaml-key-not-string", [*TEACHER, "--config", "{tmp}/c.yaml", "-o", O], "unknown key", setup=s_write("c.yaml", "1: 3\n")),
    R("config-suffix", [*TEACHER, "--config", "{tmp}/c.ini", "-o", O], "neither .toml nor .yaml", setup=s_write("c.ini", "x=1\n")),
    R("config-missing", [*TEACHER, "--config", "{tmp}/none.toml", "-o", O], "does not exist"),
    R("config-is-a-folder", [*TEACHER, "--config", "{tmp}/d.toml", "-o", O], "d.toml", setup=s_write("d.toml/x", "")),
    # --- train teacher options (test_train_teacher.py) ---
    R("teacher-data-missing", [*TEACHER, "--data", "{tmp}/missing", "-o", O], ("data folder", "does not exist")),
    R("teacher-captions-missing", [*TEACHER, "--data", "{tmp}/imgs", "--captions", "{tmp}/none.jsonl", "-o", O],
      ("captions file", "does not exist"), setup=s_images()),
    R("teacher-digits-with-captions", [*TEACHER, "--data", "digits", "--captions", "{tmp}/c.jsonl", "-o", O], "--captions"),
    R("teacher-no-output", [*TEACHER, "--data", "digits"], "no output folder"),
    R("teacher-batch-not-multiple", [*TEACHER, "-o", O, "--batch-size", "6", "--gradient-accumulation-steps", "4"], "not a multiple"),
    R("teacher-resume-missing", [*TEACHER, "-o", O, "--resume", "{tmp}/nockpt"], "not a complete checkpoint", allow_new=("o.train",)),
    R("teacher-lr-schedule", [*TEACHER, "-o", O, "--lr-schedule", "linear"], "--lr-schedule"),
    R("teacher-ema-one", [*TEACHER, "-o", O, "--ema-decay", "1"], "ema_decay"),
    R("teacher-lr-zero", [*TEACHER, "-o", O, "--learning-rate", "0"], "learning_rate"),
    R("teacher-cfg-dropout", [*TEACHER, "-o", O, "--cfg-dropout", "1.5"], "cfg_dropout"),
    R("teacher-existing-output", [*TEACHER, "-o", O], ("already exists", "--force"), setup=s_existing_out, keep=("{tmp}/o/keep.txt",)),
    R("teacher-holds-checkpoints", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", "{tmp}/T2", "--work-dir", "{tmp}/w"],
      ("holds checkpoints", "--resume latest"), setup=s_all(s_images(), s_trained_work_dir), slow=True),
    R("teacher-nan", [*TEACHER, "--data", "{tmp}/imgs", "-o", O, "--max-steps", "5", "--batch-size", "2", "--learning-rate", "1e30",
                      "--max-grad-norm", "0", "--warmup-steps", "0", "--checkpoint-every", "0", "--cpu", "--no-progress"],
      ("training loss is", "at step"), setup=s_images(), allow_new=("o.train", "o.train/*"), slow=True),
    # --- data folders (test_data.py) ---
    R("data-no-captions", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "no captions file",
      setup=s_images(extra=lambda d, c: (d / "captions.jsonl").unlink())),
    R("data-missing-image", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "'gone.png'",
      setup=s_images(captions='{"file": "im0.png", "text": "a"}\n{"file": "gone.png", "text": "b"}\n')),
    R("data-unreadable-image", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "cannot read image",
      setup=s_images(extra=lambda d, c: (d / "im1.png").write_bytes(b"not a png at all"))),
    R("data-bad-json", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "line 2",
      setup=s_images(captions='{"file": "im0.png", "text": "a"}\n{"file": \n')),
    R("data-json-not-object", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "line 1", setup=s_images(captions='["im0.png", "a"]\n')),
    R("data-csv-without-columns", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "'file' and 'text'",
      setup=s_images(extra=lambda d, c: ((d / "captions.jsonl").unlink(), (d / "captions.csv").write_text("name,caption\nim0.png,a\n")))),
    R("data-empty-captions", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "lists no images", setup=s_images(captions="\n")),
    R("data-captions-binary", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "not UTF-8", setup=s_images(captions="x", extra=lambda d, c: (d / "captions.jsonl").write_bytes(BINARY))),
    R("data-decompression-bomb", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], ("big.png", "too large"),
      setup=s_images(captions='{"file": "big.png", "text": "a"}\n', extra=lambda d, c: _bomb_png(d / "big.png")), max_seconds=60),
    R("data-truncated-image", [*TEACHER, "--data", "{tmp}/imgs", *FAST_TRAIN, "-o", O], "cannot read image",
      setup=s_images(n=1, extra=lambda d, c: (d / "im0.png").write_bytes((d / "im0.png").read_bytes()[:40]))),
    # --- reflow-data (test_reflow_data.py) ---
    R("rdata-no-prompt-source", [*RDATA, "-o", O], "prompt source"),
    R("rdata-two-prompt-sources", [*RDATA, "--prompts", "{tmp}/p.txt", "--data", "digits", "-o", O], "prompt source",
      setup=s_write("p.txt", "a\n")),
    R("rdata-num-pairs-0", [*RDATA[:3], "--num-pairs", "0", "--prompts", "{tmp}/p.txt", "-o", O], "num_pairs", setup=s_write("p.txt", "a\n")),
    R("rdata-scheduler", [*RDATA, "--prompts", "{tmp}/p.txt", "--scheduler", "heun", "-o", O], "scheduler", setup=s_write("p.txt", "a\n")),
    R("rdata-prompts-missing", [*RDATA, "--prompts", "{tmp}/none.txt", "-o", O], "does not exist"),
    R("rdata-prompts-empty", [*RDATA, "--prompts", "{tmp}/p.txt", "-o", O], "no prompts", setup=s_write("p.txt", "\n\n")),
    R("rdata-prompts-binary", [*RDATA, "--prompts", "{tmp}/p.txt", "-o", O], ("p.txt", "not UTF-8"), setup=s_write("p.txt", BINARY)),
    R("rdata-output-is-file", [*RDATA, "--prompts", "{tmp}/p.txt", "-o", "{tmp}/f"], "is a file",
      setup=s_all(s_write("p.txt", "a\n"), s_write("f", "x"))),
    R("rdata-output-not-pairs", [*RDATA, "--prompts", "{tmp}/p.txt", "-o", O], "not reflow data",
      setup=s_all(s_write("p.txt", "a\n"), s_existing_out), keep=("{tmp}/o/keep.txt",)),
    R("rdata-other-settings", [*RDATA[:3], "--num-pairs", "4", "--steps", "3", *RDATA[7:], "--shard-size", "2", "--prompts",
                               "{tmp}/p.txt", "-o", "{tmp}/p"], ("sampler", "--force"),
      setup=s_all(s_pairs_copy(), s_write("p.txt", "a red fox\n")), needs=("pairs",)),
    # --- reflow / distill (test_reflow_distill.py, test_losses.py) ---
    R("reflow-pairs-missing", [*REFLOW, "--pairs", "{tmp}/nope", "-o", O], "pairs folder"),
    R("reflow-not-pairs", [*REFLOW, "--pairs", "{tmp}/np", "-o", O, *FAST_TRAIN], "not a reflow-data folder", setup=s_write("np/x", "")),
    R("reflow-max-pairs-0", [*REFLOW, "--pairs", "{pairs}", "--max-pairs", "0", "-o", O], "max_pairs", needs=("pairs",)),
    R("reflow-max-pairs-too-many", [*REFLOW, "--pairs", "{pairs}", "--max-pairs", "99", "-o", O, *FAST_TRAIN], "holds 4 pairs", needs=("pairs",)),
    R("reflow-sidecar-binary", [*REFLOW, "--pairs", "{tmp}/p", "-o", O, *FAST_TRAIN], ("shard-00000", "corrupt"), needs=("pairs",),
      setup=s_pairs_copy(lambda d, c: (d / "shard-00000.json").write_bytes(BINARY))),
    R("reflow-sidecar-list", [*REFLOW, "--pairs", "{tmp}/p", "-o", O, *FAST_TRAIN], ("shard-00001", "corrupt"), needs=("pairs",),
      setup=s_pairs_copy(lambda d, c: (d / "shard-00001.json").write_text("[1, 2]"))),
    R("reflow-shard-corrupt", [*REFLOW, "--pairs", "{tmp}/p", "-o", O, *FAST_TRAIN], ("shard-00001", "corrupt"), needs=("pairs",),
      setup=s_pairs_copy(lambda d, c: (d / "shard-00001.safetensors").write_bytes(b"\0" * 64))),
    R("reflow-pairs-manifest-list", [*REFLOW, "--pairs", "{tmp}/p", "-o", O, *FAST_TRAIN], ("manifest.json", "not a JSON object"),
      needs=("pairs",), setup=s_pairs_copy(lambda d, c: (d / "manifest.json").write_text("[]"))),
    R("distill-lpips-no-weights", [*DISTILL, "--pairs", "{pairs}", "--loss", "lpips", "-o", O], "--lpips-weights", needs=("pairs",)),
    R("distill-unknown-loss", [*DISTILL, "--pairs", "{pairs}", "--loss", "l1", "-o", O], "unknown --loss", needs=("pairs",)),
    R("distill-lpips-missing-file", [*DISTILL, "--pairs", "{pairs}", "--loss", "lpips", "--lpips-weights", "{tmp}/none.safetensors",
                                     "-o", O, *FAST_TRAIN], "not found", needs=("pairs",)),
    R("distill-lpips-pickle-needs-flag", [*DISTILL, "--pairs", "{pairs}", "--loss", "lpips", "--lpips-weights", "{tmp}/w.bin",
                                          "-o", O, *FAST_TRAIN], "--allow-pickle", needs=("pairs",), setup=s_write("w.bin", b"PK")),
    R("distill-lpips-evil-pickle", [*DISTILL, "--pairs", "{pairs}", "--loss", "lpips", "--lpips-weights", "{tmp}/evil.bin",
                                    "--allow-pickle", "-o", O, *FAST_TRAIN], ("evil.bin", "not a plain tensor checkpoint"),
      needs=("pairs",), setup=lambda c: _evil_pickle(c.tmp / "evil.bin", c.tmp / "PWNED"), absent=("{tmp}/PWNED",)),
    R("distill-lpips-bad-safetensors", [*DISTILL, "--pairs", "{pairs}", "--loss", "lpips", "--lpips-weights", "{tmp}/w.safetensors",
                                        "-o", O, *FAST_TRAIN], ("w.safetensors", "corrupt"), needs=("pairs",),
      setup=s_write("w.safetensors", struct.pack("<Q", 2) + b"[]")),
    # --- convert (test_onnx.py, test_coreml.py) ---
    R("convert-not-a-pipeline", ["convert", "{tmp}/empty", "--target", "onnx", "-o", O], "model_index.json", setup=s_write("empty/.x", "")),
    R("convert-unknown-target", ["convert", "{tiny}", "--target", "tflite", "-o", O], ("coreml", "onnx")),
    R("convert-quantize-int4", [*CONV, "--quantize", "int4", "-o", O], ("int4", "fp16, int8-dynamic, int8-static")),
    R("convert-opset-9", [*CONV, "--opset", "9", "-o", O], "opset"),
    R("convert-height-40", [*CONV, "--height", "40", "-o", O], ("height 40", "--height 32")),
    R("convert-engine-inc", [*CONV, "--engine", "inc", "-o", O], "int8-static"),
    R("convert-inc-opset-17", [*CONV, "--quantize", "int8-static", "--engine", "inc", "--opset", "17", "-o", O], "--opset"),
    R("convert-calibration-missing", [*CONV, "--quantize", "int8-static", "--calibration-prompts", "{tmp}/nope.txt", "-o", O], "nope.txt"),
    R("convert-calibration-binary", [*CONV, "--quantize", "int8-static", "--calibration-prompts", "{tmp}/c.txt", "-o", O],
      ("c.txt", "not UTF-8"), setup=s_write("c.txt", BINARY)),
    R("convert-existing-export", [*CONV, "-o", "{onnx}"], "--force", needs=("onnx",)),
    R("convert-quantize-component-alone", [*CONV, "--quantize-component", "vae_decoder", "-o", O], "--quantize"),
    R("convert-quantize-component-unknown", [*CONV, "--quantize", "fp16", "--quantize-component", "vae", "-o", O], ("'vae'", "vae_decoder")),
    R("convert-coreml-option-on-onnx", [*CONV, "--compress", "int8", "-o", O], "--compress"),
    R("convert-missing-model", ["convert", "{tmp}/nope", "--target", "onnx", "-o", O], ("nope", "not a folder")),
    R("convert-qnn-unknown-arch", ["convert", "qnn", "{tiny}", "--htp-arch", "71", "-o", O], ("'71'", "73")),
    R("convert-qnn-arch-and-no-compile", ["convert", "qnn", "{tiny}", "--htp-arch", "75", "--no-compile", "-o", O],
      "contradict"),
    R("convert-qnn-onnx-scheme", ["convert", "qnn", "{tiny}", "--quantize", "int8-static", "-o", O], ("int8-static", "w8a16")),
    R("convert-corrupt-model", ["convert", "{m}", "--target", "onnx", "-o", O], ("unet", "corrupt"), setup=s_header("unet", raw=b"[]")),
    R("convert-gate-missed", [*CONV, "--optimize", "none", "--min-psnr", "1000", "-o", O], ("outputs miss their gate", "1000.0 dB"),
      code=3, slow=True),
    R("coreml-compress-unknown", [*CONV_ML, "-o", O, "--compress", "palettize-3"], ("unknown --compress", "palettize-4", "mixed-bit")),
    R("coreml-joint-needs-ios18", [*CONV_ML, "-o", O, "--compress", "prune-50+palettize-4"], ("iOS18", "--min-target")),
    R("coreml-joint-macos14", [*CONV_ML, "-o", O, "--compress", "prune-50+palettize-4", "--min-target", "macOS14"], ("iOS18", "macOS14")),
    R("coreml-mixed-bit-needs-bits", [*CONV_ML, "-o", O, "--compress", "mixed-bit"], "--target-bits"),
    R("coreml-bits-without-mixed", [*CONV_ML, "-o", O, "--compress", "palettize-4", "--target-bits", "4"], ("--target-bits", "mixed-bit")),
    R("coreml-min-target-old", [*CONV_ML, "-o", O, "--min-target", "iOS15"], ("--min-target", "iOS16")),
    R("coreml-sizes-syntax", [*CONV_ML, "-o", O, "--sizes", "64by64"], "--sizes"),
    R("coreml-sizes-multiple", [*CONV_ML, "-o", O, "--sizes", "60x64"], "multiple of 16"),
    R("coreml-onnx-option", [*CONV_ML, "-o", O, "--quantize", "int8-dynamic"], ("--quantize", "coreml")),
    R("coreml-existing-output", [*CONV_ML, "-o", O], ("already exists", "--force"), setup=s_existing_out, keep=("{tmp}/o/keep.txt",)),
    R("coreml-missing-model", ["convert", "{tmp}/nope", "--target", "coreml", "-o", O], "does not exist", needs=("coremltools",)),
    R("coreml-not-installed", [*CONV_ML, "-o", O], ("coremltools is not installed", "instaflow-edge[coreml]"),
      setup=s_block_module("coremltools"), env={"PYTHONPATH": "{tmp}/block"}),
    R("coreml-gate-before-converting", [*CONV_ML, "-o", O, "--compress", "prune-50", "--min-psnr", "99"], ("text_encoder: PSNR", "99.0 dB"),
      code=3, needs=("coremltools",), slow=True),
    # --- quantize (test_onnx.py) ---
    R("quantize-scheme-unknown", ["quantize", "{onnx}", "--scheme", "int3", "-o", O], ("int3", "int8-static"), needs=("onnx",)),
    R("quantize-not-an-export", ["quantize", "{tiny}", "--scheme", "fp16", "-o", O], "manifest"),
    R("quantize-openvino-export", ["quantize", "{tmp}/v", "--scheme", "fp16", "-o", O],
      ("openvino export", "takes onnx exports", "--target openvino --quantize int8|"),
      setup=s_write("v/manifest.json", '{"kind": "openvino-export"}')),
    R("quantize-coreml-export", ["quantize", "{tmp}/c", "--scheme", "fp16", "-o", O],
      ("core ml export", "--target coreml --compress palettize-4|"), setup=s_write("c/manifest.json", '{"kind": "coreml"}')),
    R("quantize-missing-source", ["quantize", "{tmp}/nope", "--scheme", "fp16", "-o", O], "not a folder"),
    R("quantize-unknown-component", ["quantize", "{onnx}", "--scheme", "fp16", "-c", "vae", "-o", O], "'vae'", needs=("onnx",)),
    R("quantize-calibration-binary", ["quantize", "{onnx}", "--scheme", "int8-static", "--calibration-prompts", "{tmp}/c.txt", "-o", O],
      ("c.txt", "not UTF-8"), needs=("onnx",), setup=s_write("c.txt", BINARY)),
    R("quantize-existing-output", ["quantize", "{onnx}", "--scheme", "fp16", "-o", O], ("already exists", "--force"), needs=("onnx",),
      setup=s_existing_out, keep=("{tmp}/o/keep.txt",)),
    R("quantize-gate-missed", ["quantize", "{onnx}", "--scheme", "int8-dynamic", "--min-psnr", "200", "-o", O],
      ("outputs miss their gate", "200.0 dB"), code=3, needs=("onnx",), slow=True),
    # --- ONNX export folders (test_onnx.py) ---
    *[R(f"onnx-external-{how}-{verb}", ([*GEN_ONNX, "-o", O] if verb == "generate" else ["quantize", "{tmp}/x", "--scheme", "fp16", "-o", O]),
        "outside the model folder", needs=("onnx",), setup=s_onnx_external(how))
      for how in ("absolute", "dotdot", "symlink") for verb in ("generate", "quantize")],
    R("onnx-corrupt-generate", [*GEN_ONNX, "-o", O], "unet", needs=("onnx",), setup=s_onnx_copy(s_onnx_truncate)),
    R("onnx-corrupt-quantize", ["quantize", "{tmp}/x", "--scheme", "int8-static", "-o", O], "unet", needs=("onnx",), setup=s_onnx_copy(s_onnx_truncate)),
    R("onnx-wrong-graph-generate", [*GEN_ONNX, "-o", O], ("unet", "inputs"), needs=("onnx",), setup=s_onnx_copy(s_onnx_swap_graph)),
    R("onnx-wrong-graph-quantize", ["quantize", "{tmp}/x", "--scheme", "fp16", "-o", O], ("unet", "inputs"), needs=("onnx",),
      setup=s_onnx_copy(s_onnx_swap_graph)),
    R("onnx-wrong-graph-eval", ["eval", "{tmp}/x", "--backend", "onnx", "-n", "20"], ("unet", "inputs"), needs=("onnx",),
      setup=s_onnx_copy(s_onnx_swap_graph)),
    R("onnx-missing-component", [*GEN_ONNX, "-o", O], "vae_decoder", needs=("onnx",),
      setup=s_onnx_copy(lambda d, c: shutil.rmtree(d / "vae_decoder"))),
    R("onnx-manifest-not-json", [*GEN_ONNX, "-o", O], ("manifest.json", "not valid JSON"), needs=("onnx",),
      setup=s_onnx_copy(lambda d, c: (d / "manifest.json").write_text("{"))),
    # --- eval (test_judge_eval.py) ---
    R("eval-no-model", ["eval"], "no model given"),
    R("eval-model-and-real", ["eval", "{tiny}", "--real"], "--real"),
    R("eval-missing-model", ["eval", "{tmp}/nope"], "does not exist"),
    R("eval-n-15", ["eval", "{tiny}", "-n", "15"], "multiple of 10"),
    R("eval-steps-0", ["eval", "{tiny}", "--steps", "0"], "steps"),
    R("eval-guidance-negative", ["eval", "{tiny}", "--guidance", "-1"], "guidance"),
    R("eval-json-missing-dir", ["eval", "{tiny}", "--json", "{tmp}/no/such/dir/e.json"], "--json"),
    R("eval-onnx-on-torch-folder", ["eval", "{tiny}", "--backend", "onnx"], "no ONNX export manifest"),
    R("eval-onnx-dtype", ["eval", "{tiny}", "--backend", "onnx", "--dtype", "float16"], "--backend onnx"),
    R("eval-backend-unknown", ["eval", "{tiny}", "--backend", "tflite"], "--backend"),
    R("eval-onnx-steps", ["eval", "{onnx}", "--backend", "onnx", "--steps", "2", "-n", "20"], "one-step only", needs=("onnx",)),
    R("eval-coreml-compress-unknown", ["eval", "{tiny}", "--coreml-compress", "palettize-3"], "unknown --coreml-compress", needs=("coremltools",)),
    R("eval-coreml-compress-steps", ["eval", "{tiny}", "--coreml-compress", "int8", "--steps", "2"], "--steps 1", needs=("coremltools",)),
    R("eval-coreml-mixed-bit", ["eval", "{tiny}", "--coreml-compress", "mixed-bit"], "--target-bits", needs=("coremltools",)),
    R("eval-coreml-real", ["eval", "--real", "--coreml-compress", "int8"], "needs a model", needs=("coremltools",)),
    R("eval-coreml-missing-model", ["eval", "{tmp}/nope", "--coreml-compress", "int8"], "does not exist", needs=("coremltools",)),
    # --- demo ---
    R("demo-output-under-file", ["demo", "--quick", "-o", "{tmp}/f/out"], ("f", "is a file"), setup=s_write("f", "x")),
    R("demo-output-is-file", ["demo", "--quick", "-o", "{tmp}/f"], ("f", "not a folder"), setup=s_write("f", "x")),
    R("demo-seed-negative", ["demo", "--quick", "--seed", "-1", "-o", O], "seed"),
    # --- robustness, second round: inputs from someone else (issue "Robustness, second round") ---
    R("report-bench-script-in-number", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("'repeats'", "non-negative integer"),
      setup=s_bench(lambda d: {**d, "repeats": "<script>alert(1)</script>"})),
    R("report-bench-deep", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("b.json", "nested too deeply"),
      setup=s_bench(raw="[" * 100_000 + "]" * 100_000)),
    R("report-bench-results-not-objects", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("results[", "an object"),
      setup=s_bench(lambda d: {**d, "results": {"ort fp32": 1}})),
    R("report-bench-string-number", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("median_s", "finite number"),
      setup=s_bench(lambda d: {**d, "results": {"ort fp32": {"end_to_end": {"median_s": "fast"}}}})),
    R("report-bench-huge", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("b.json", "too large"),
      setup=s_bench(lambda d: {**d, "note": "x" * (9 * 2**20)})),
    R("report-bench-stage-not-object", ["report", "{tiny}", "-o", O, "--bench", "{tmp}/b.json"], ("end_to_end", "an object"),
      setup=s_bench(lambda d: {**d, "results": {"ort fp32": {"end_to_end": [1, 2]}}})),
    R("convert-onnx-tokenizer-link-out", ["convert", "{m}", "--target", "onnx", "-o", O], ("symlink out of", "secret.txt"),
      setup=s_all(s_model, s_link_out("tokenizer/special_tokens_map.json.extra"))),
    R("quantize-export-link-out", ["quantize", "{tmp}/x", "--scheme", "fp16", "-o", O], ("symlink out of", "secret.txt"),
      needs=("onnx",), setup=s_all(s_onnx_copy(), s_link_out("tokenizer/leak.txt", "x"))),
    R("web-export-link-out", ["convert", "{tmp}/x", "--target", "web", "-o", O], ("symlink out of", "secret.txt"),
      needs=("onnx", "ort-web"), setup=s_all(s_onnx_copy(), s_link_out("tokenizer/leak.txt", "x"))),
    R("web-export-folder-link-out", ["convert", "{tmp}/x", "--target", "web", "-o", O], ("symlink out of",),
      needs=("onnx", "ort-web"), setup=s_all(s_onnx_copy(), lambda c: (c.tmp / "x" / "etc").symlink_to(c.tmp.parent))),
    *[R(f"onnx-external-sparse-{verb}", cmd, "outside the model folder", needs=need, setup=s_onnx_copy(s_onnx_sparse))
      for verb, cmd, need in (("generate", [*GEN_ONNX, "-o", O], ("onnx",)),
                              ("quantize", ["quantize", "{tmp}/x", "--scheme", "fp16", "-o", O], ("onnx",)),
                              ("web", ["convert", "{tmp}/x", "--target", "web", "-o", O], ("onnx", "ort-web")))],
    R("decoder-channels-huge", ["train", "decoder", "{tiny}", "-o", O, "--channels", "100000,100000,100000"],
      ("--channels 100000", "at most 1024")),
    R("decoder-batch-huge", ["train", "decoder", "{tiny}", "-o", O, "--batch-size", "100000000"], ("--batch-size", "1024")),
    R("init-threads-word", ["init", "digits", O, "--threads", "two"], ("threads", "'two'", "--threads auto"), max_seconds=30),
    R("init-threads-untrained-preset", ["init", "tiny", O, "--threads", "2"], ("preset tiny", "threads", "drop them")),
    R("reflow-data-threads-zero", ["train", "reflow-data", "{tiny}", "-o", O, "--data", "digits", "--threads", "0"],
      ("threads", "got 0", "--threads auto")),
    R("prune-threads-word", ["prune", "{tiny}", "-o", O, "--threads", "many"], ("threads", "'many'")),
    R("decoder-threads-negative", ["train", "decoder", "{tiny}", "-o", O, "--threads", "-1"], ("threads", "'-1'")),
    R("prune-layers-per-block-string", ["prune", "{m}", "-o", O], ("layers_per_block", "'two'", "positive integer"),
      setup=s_unet_config("layers_per_block", "two")),
    R("prune-block-out-channels-strings", ["prune", "{m}", "-o", O], ("block_out_channels", "positive integers"),
      setup=s_unet_config("block_out_channels", ["32", "64"])),
    R("prune-unet-config-deep", ["prune", "{m}", "-o", O], ("config.json", "nested too deeply"),
      setup=s_all(s_model, lambda c: (c.tmp / "m" / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000))),
    R("model-flow-unknown", ["--flow", "consistency", "generate", "{tiny}", "a fox", "-o", O], ("--flow", "rectified-flow")),
    R("model-default-steps-0", ["--default-steps", "0", "generate", "{tiny}", "a fox", "-o", O], ("--default-steps", "1 to 1000")),
    R("model-flow-against-manifest", ["--flow", "diffusion", "generate", "{tiny}", "a fox", "-o", O], ("says the model is rectified-flow", "--flow")),
    R("bench-same-folder-twice", ["bench", "{tiny}", "{onnx}", "{onnx}", "-o", "{tmp}/b.json"], ("given twice",), needs=("onnx",)),
    R("openvino-truncated-bin", ["generate", "{tmp}/v", "a fox", "--backend", "openvino", "-o", O],
      ("unet/model.bin is truncated", "model.xml needs"), needs=("openvino",), slow=True,
      setup=lambda c: (shutil.copytree(c.openvino, c.tmp / "v"),
                       os.truncate(c.tmp / "v" / "unet" / "model.bin", (c.tmp / "v" / "unet" / "model.bin").stat().st_size // 2))),
    R("openvino-corrupt-xml", ["generate", "{tmp}/v", "a fox", "--backend", "openvino", "-o", O],
      ("model.xml is not a model OpenVINO can load",), needs=("openvino",), slow=True,
      setup=lambda c: (shutil.copytree(c.openvino, c.tmp / "v"), (c.tmp / "v" / "unet" / "model.xml").write_text("<net>not ir"))),
    R("full-bench", ["bench", "{tiny}", "--repeats", "1", "--warmup", "0", "-o", "{tmp}/full/b.json"], ("no space left",),
      runner="tmpfs:4k:full", setup=s_write("full/.mnt", ""), slow=True),
    R("distill-teacher-missing", [*DISTILL, "--pairs", "{pairs}", "--teacher", "{tmp}/nope", "-o", O, *FAST_TRAIN],
      ("--teacher", "nope", "does not exist"), needs=("pairs",), max_seconds=30),
    # --- the command line itself ---
    R("cli-unknown-command", ["frobnicate"], "No such command"),
    R("cli-unknown-option", [*GEN, "--frob", "-o", O], "No such option"),
]


# Rows that load a whole pipeline (5–7 s each on two cores) and re-express a case an in-process test
# already checks in the default suite (test_cli, test_data, test_pipeline_io, test_train_teacher,
# test_reflow_*, test_losses, test_coreml, test_judge_eval): slow, so the default table stays ~2 minutes.
SLOW_DUPLICATES = {
    "gen-height-60", "gen-device-cuda", "model-scheduler-sd-pipeline", "model-scheduler-unknown", "model-scheduler-os",
    "teacher-captions-missing", "teacher-resume-missing", "data-no-captions", "data-missing-image", "data-unreadable-image",
    "data-bad-json", "data-json-not-object", "data-csv-without-columns", "data-empty-captions", "data-truncated-image",
    "rdata-other-settings", "reflow-not-pairs", "reflow-max-pairs-too-many", "reflow-shard-corrupt",
    "distill-lpips-missing-file", "distill-lpips-pickle-needs-flag", "convert-height-40", "coreml-sizes-multiple",
    "coreml-missing-model", "eval-coreml-compress-unknown", "eval-coreml-compress-steps", "eval-coreml-mixed-bit",
    "eval-coreml-missing-model", "rdata-output-not-pairs", "rdata-output-is-file",
    # new cases whose check an in-process test below also runs (the CLI row loads a pipeline first)
    "data-captions-binary", "data-decompression-bomb", "distill-lpips-evil-pickle", "distill-lpips-bad-safetensors",
    "model-scheduler-null", "model-scheduler-module", "model-unet-config-in-channels",
}
for _row in ROWS:
    _row.slow = _row.slow or _row.id in SLOW_DUPLICATES
assert SLOW_DUPLICATES <= {r.id for r in ROWS}


# ---------------------------------------------------------------------------------------------------
# running the rows


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (and a marker for every folder/symlink) under ``root``, hidden ones included."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames:
            p = d / name
            out[p.relative_to(root).as_posix() + "/"] = "link" if p.is_symlink() else "dir"
        for name in filenames:
            p = d / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _can_unshare_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {d}"], capture_output=True)
    return r.returncode == 0


def _nobody_prefix() -> list[str] | None:
    """How to run as an unprivileged user: nothing when we are one, setpriv to nobody when root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        # nobody must reach this checkout and its venv (a clone inside a 0700 folder, as `mktemp -d`
        # makes, is out of its reach): else those rows cannot run as nobody and are skipped
        probe = subprocess.run([*prefix, sys.executable, "-c", "import instaflow_edge.cli"], capture_output=True,
                               cwd="/", timeout=120)
        return prefix if probe.returncode == 0 else None
    return None


_ENOSPC_SITE = '''
import builtins, errno, io, os
_DIR = os.environ["INSTAFLOW_TEST_ENOSPC_DIR"]
_real_open = builtins.open


class _Full:
    def __init__(self, f, path):
        self._f, self._path, self._n = f, path, 0

    def write(self, b):
        self._n += len(b)
        if self._n > 2048:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def _open(file, mode="r", *a, **k):
    f = _real_open(file, mode, *a, **k)
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax") and \\
            os.path.abspath(os.fsdecode(file)).startswith(_DIR):
        return _Full(f, os.fsdecode(file))
    return f


builtins.open = _open
io.open = _open
'''


def _command(row: Row, ctx: Ctx, caps: dict) -> tuple[list[str], dict, str | None]:
    """(argv, env, skip reason)."""
    args = [ctx.fmt(a) for a in row.args]
    cli = [sys.executable, "-m", "instaflow_edge.cli", *args]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["HOME"] = str(ctx.tmp.parent / "home")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for k, v in (row.env or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = ctx.fmt(v)
    kind, _, rest = row.runner.partition(":")
    if kind == "plain":
        return cli, env, None
    if kind == "nobody":
        prefix = caps["nobody"]
        if prefix is None:
            return cli, env, "cannot run as an unprivileged user (no setpriv, or nobody cannot reach this checkout and its venv)"
        return [*prefix, *cli], env, None
    if kind in ("tmpfs", "rofs"):
        if not caps["unshare"]:
            return cli, env, "this machine cannot mount a tmpfs in a user namespace (unshare -rm)"
        size, _, rel = rest.partition(":") if kind == "tmpfs" else ("64k", "", rest)
        opts = f"size={size}" + (",ro" if kind == "rofs" else "")
        mnt = str(ctx.tmp / rel)
        script = ('mount -t tmpfs -o "$1" none "$2" || exit 97; m="$2"; shift 2; "$@"; rc=$?; '
                  'printf "\\n@@LEFT[%s]@@\\n" "$(cd "$m" && find . -mindepth 1 | cut -c3- | tr "\\n" " ")"; exit $rc')
        return ["unshare", "-rm", "sh", "-c", script, "sh", opts, mnt, *cli], env, None
    if kind == "enospc":
        site = ctx.tmp.parent / "enospc-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_ENOSPC_SITE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["INSTAFLOW_TEST_ENOSPC_DIR"] = str(ctx.tmp / rest)
        return cli, env, None
    raise AssertionError(row.runner)


@dataclasses.dataclass
class Outcome:
    row: Row
    skip: str | None = None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    before: dict | None = None
    after: dict | None = None
    ctx: Ctx | None = None
    left: str | None = None


def _run(row: Row, base: Path, shared: dict, caps: dict) -> Outcome:
    for need in row.needs:
        if need in ("onnx", "pairs", "openvino") and shared.get(need) is None:
            return Outcome(row, skip=f"the shared {need} fixture could not be built")
        if need == "coremltools" and not caps["coremltools"]:
            return Outcome(row, skip="coremltools is not installed")
        if need == "not-darwin" and sys.platform == "darwin":
            return Outcome(row, skip="on macOS Core ML can predict")
        if need == "no-gpu" and caps["gpu"]:
            return Outcome(row, skip="a GPU is present")
        if need == "ort-web" and not caps["ort-web"]:
            return Outcome(row, skip="onnxruntime-web's files are not installed (npm ci)")
    tmp = base / row.id
    tmp.mkdir(parents=True)
    ctx = Ctx(tmp, shared)
    if row.setup:
        row.setup(ctx)
    cwd = Path(ctx.fmt(row.cwd)) if row.cwd else tmp
    argv, env, skip = _command(row, ctx, caps)
    if skip:
        return Outcome(row, skip=skip)
    if row.runner == "nobody" and os.geteuid() == 0:
        for dirpath, dirnames, _ in os.walk(tmp):  # nobody must reach (and may write) the row's folder
            os.chmod(dirpath, 0o777)
        os.chmod(tmp.parent, 0o755)
        (tmp.parent / "home").mkdir(exist_ok=True)
        os.chmod(tmp.parent / "home", 0o777)
    before = _hashes(tmp)
    modes = []
    for path, mode in ctx.chmods:
        modes.append((path, stat.S_IMODE(path.stat().st_mode)))
        os.chmod(path, mode)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, errors="replace", timeout=row.timeout)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, str(e.stdout or ""), str(e.stderr or "") + f"\n[timed out after {row.timeout} s]"
    seconds = time.perf_counter() - t0
    for path, mode in reversed(modes):
        os.chmod(path, mode)
    left = None
    m = re.search(r"@@LEFT\[(.*?)\]@@", out)
    if m:
        left, out = m.group(1).strip(), out[: m.start()] + out[m.end():]
    return Outcome(row, rc=rc, stdout=out, stderr=err, seconds=seconds, before=before, after=_hashes(tmp), ctx=ctx, left=left)


def _build_shared(tiny: Path, base: Path, needs: set[str]) -> dict:
    shared: dict = {"tiny": tiny}
    if "onnx" in needs:
        try:
            from instaflow_edge.convert import ConvertConfig, export

            export(ConvertConfig.of("onnx", model=str(tiny), output=str(base / "shared-onnx")))
            shared["onnx"] = base / "shared-onnx"
        except Exception as e:  # e.g. onnxruntime missing: those rows are skipped
            print(f"shared onnx export failed: {e}", file=sys.stderr)
    if "openvino" in needs:
        try:
            from instaflow_edge.convert import ConvertConfig, export

            export(ConvertConfig.of("openvino", model=str(tiny), output=str(base / "shared-openvino"), precision="f32"))
            shared["openvino"] = base / "shared-openvino"
        except Exception as e:  # openvino missing: those rows are skipped
            print(f"shared openvino export failed: {e}", file=sys.stderr)
    if "pairs" in needs:
        from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

        (base / "pairs-prompts.txt").write_text("a red fox\na blue whale\n")
        make_reflow_data(ReflowDataConfig(teacher=str(tiny), output=str(base / "shared-pairs"), prompts=str(base / "pairs-prompts.txt"),
                                          num_pairs=4, shard_size=2, steps=2, batch_size=2, device="cpu"), progress=False)
        shared["pairs"] = base / "shared-pairs"
    return shared


@pytest.fixture(scope="module")
def outcomes(request, tiny_dir):
    """Run every selected row once, in parallel threads (each row is its own subprocess)."""
    import importlib.util

    selected = [item.callspec.params["row"] for item in request.session.items
                if getattr(item, "module", None) is sys.modules[__name__] and hasattr(item, "callspec")
                and "row" in item.callspec.params]
    base = Path(tempfile.mkdtemp(prefix="instaflow-bad-inputs-"))
    os.chmod(base, 0o755)
    caps = {"unshare": _can_unshare_mount(), "nobody": _nobody_prefix(),
            "coremltools": importlib.util.find_spec("coremltools") is not None,
            "gpu": _has_gpu(), "ort-web": _has_ort_web()}
    needs = {n for row in selected for n in row.needs}
    shared = _build_shared(tiny_dir, base, needs)
    shared_before = {k: _hashes(v) for k, v in shared.items()}
    jobs = int(os.environ.get("INSTAFLOW_TEST_JOBS", "0")) or max(2, min(4, os.cpu_count() or 2))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = dict(zip([r.id for r in selected], pool.map(lambda r: _run(r, base, shared, caps), selected)))
    print(f"\n{len(selected)} bad-input rows in {time.perf_counter() - t0:.0f} s with {jobs} workers", file=sys.stderr)
    if os.environ.get("INSTAFLOW_TEST_TIMES"):  # where the time goes, slowest first
        times = sorted(((o.seconds, i) for i, o in results.items()), reverse=True)
        Path(os.environ["INSTAFLOW_TEST_TIMES"]).write_text("".join(f"{t:6.1f}  {i}\n" for t, i in times))
    yield {"rows": results, "shared": shared, "shared_before": shared_before}
    shutil.rmtree(base, ignore_errors=True)


def _has_ort_web() -> bool:
    from instaflow_edge.errors import MissingDependencyError

    try:
        from instaflow_edge.convert.web import find_ort_web

        find_ort_web()
        return True
    except MissingDependencyError:
        return False


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _fnmatch_any(rel: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(rel.rstrip("/"), p) for p in patterns)


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_bad_input(outcomes, row: Row):
    o: Outcome = outcomes["rows"][row.id]
    if o.skip:
        pytest.skip(o.skip)
    where = f"\n--- stdout ---\n{o.stdout[-3000:]}\n--- stderr ---\n{o.stderr[-3000:]}"
    assert o.rc is not None, "timed out" + where
    assert o.rc != 0, "exit code 0" + where
    if row.code is not None:
        assert o.rc == row.code, where
    assert "Traceback" not in o.stdout + o.stderr, where
    lines = [ln.strip() for ln in o.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"{len(errors)} error lines" + where
    assert lines[-1] == errors[0], "the error line is not the last line of stderr" + where
    others = [ln for ln in lines[:-1] if not STAGE_LINE.match(ln)]
    assert not others, f"other lines on stderr: {others}" + where
    line = errors[0]
    assert len(line) <= ERROR_LINE_MAX, f"error line of {len(line)} characters" + where
    for frag in row.expect:
        assert o.ctx.fmt(frag).lower() in line.lower(), (frag, line)
    if row.max_seconds is not None:
        assert o.seconds <= row.max_seconds, f"took {o.seconds:.0f} s" + where
    # inputs untouched: every file that was there is there, byte-identical
    changed = sorted(k for k, v in o.before.items() if o.after.get(k) != v)
    assert not changed, f"changed or removed: {changed}"
    new = sorted(k for k in o.after if k not in o.before and not _fnmatch_any(k, row.allow_new))
    assert not new, f"left behind: {new}"
    if o.left is not None:  # what the command left on its tmpfs (gone with the mount)
        left = [n for n in o.left.split() if not _fnmatch_any(n, row.allow_left)]
        assert not left, f"left on the full disk: {left}"
    for p in row.keep:
        assert Path(o.ctx.fmt(p)).exists(), p
    for p in row.absent:
        assert not Path(o.ctx.fmt(p)).exists(), p


def test_shared_inputs_untouched(outcomes):
    """The tiny model, ONNX export and pairs every row reads are byte-identical after all rows."""
    for name, root in outcomes["shared"].items():
        assert _hashes(root) == outcomes["shared_before"][name], name


def test_table_is_big_enough():
    assert len(ROWS) >= 100
    assert len({r.id for r in ROWS}) == len(ROWS)


# ---------------------------------------------------------------------------------------------------
# the checks behind the rows, in-process (fast, and they pin the limits)


def test_seed_image_side_and_count_limits():
    from instaflow_edge import validators as v
    from instaflow_edge.errors import InputError

    assert v.seed("seed", 2**63 - 1) == 2**63 - 1
    assert v.seed("seed", 2**63 - 2, 2) == 2**63 - 2
    for args, needle in [((2**63,), "below 2**63"), ((2**64 - 1, 2), "seed + 1"), ((-1,), "non-negative"),
                         ((True,), "non-negative"), ((2**63 - 1, 2), "--seed 9223372036854775806")]:
        with pytest.raises(InputError, match=re.escape(needle)):
            v.seed("seed", *args)
    assert v.image_side("height", None) is None and v.image_side("height", 4096) == 4096
    with pytest.raises(InputError, match="larger than 4096"):
        v.image_side("height", 4097)
    with pytest.raises(InputError, match="larger than 4096"):
        v.image_size("width", 100000, 16)
    assert v.image_count("num_images", 1_000_000) == 1_000_000
    with pytest.raises(InputError, match=r"× 2 prompts = 2,000,000 images.*at most 1,000,000"):
        v.image_count("num_images", 1_000_000, 2)
    assert len(v.short("x" * 10_000)) == 60


def test_generate_plans_lazily():
    """A million images are planned one at a time (the old list of a billion jobs ran out of memory)."""
    import types

    from instaflow_edge.generate import GenerateConfig, plan

    cfg = GenerateConfig(model="m", prompts=["a", "b"], output="o", seed=7, num_images=500_000)
    jobs = plan(cfg)
    assert isinstance(jobs, types.GeneratorType)
    first = [next(jobs) for _ in range(3)]
    assert [(j.index, j.prompt, j.seed) for j in first] == [(0, "a", 7), (1, "a", 8), (2, "a", 9)]


def test_text_file_refuses_binary_and_huge(tmp_path):
    from instaflow_edge.errors import InputError
    from instaflow_edge.validators import prompt_file, text_file

    (tmp_path / "b.txt").write_bytes(BINARY)
    with pytest.raises(InputError, match="not UTF-8"):
        prompt_file(tmp_path / "b.txt", [])
    (tmp_path / "big.txt").write_text("a\n" * 1000)
    with pytest.raises(InputError, match="too large"):
        text_file(tmp_path / "big.txt", "prompts file", "fix", limit=100)


def test_yaml_anchors_and_aliases_are_refused_fast(tmp_path):
    from instaflow_edge.errors import InputError
    from instaflow_edge.train.config import TrainConfig, read_config_file

    (tmp_path / "bomb.yaml").write_text(YAML_BOMB)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="anchor or alias") as e:
        read_config_file(tmp_path / "bomb.yaml", TrainConfig)
    assert time.perf_counter() - t0 < 5 and len(str(e.value)) < 300
    (tmp_path / "ok.yaml").write_text("max-steps: 3  # a comment, no anchors\nlearning-rate: 0.01\n")
    assert read_config_file(tmp_path / "ok.yaml", TrainConfig) == {"max_steps": 3, "learning_rate": 0.01}


@pytest.mark.parametrize("kind", ["list", "string", "swapped", "dtype", "shape", "gap", "metadata"])
def test_safetensors_header_checks(tmp_path, kind):
    import torch
    from safetensors.torch import save_file

    from instaflow_edge.errors import ModelError
    from instaflow_edge.pipeline import check_safetensors

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, f, metadata={"format": "pt"})
    check_safetensors(f)  # sound
    edit = {
        "list": dict(raw_header=b"[1, 2, 3]"),
        "string": dict(raw_header=b'"hello"'),
        "swapped": dict(header_fn=_swap_offsets),
        "dtype": dict(header_fn=_unknown_dtype),
        "shape": dict(header_fn=lambda h: _set(["a", "shape"], [2, 4])(h)),
        "gap": dict(header_fn=lambda h: _set(["b", "data_offsets"], [h["b"]["data_offsets"][0] + 1, h["b"]["data_offsets"][1] + 1])(h)),
        "metadata": dict(header_fn=lambda h: _set(["__metadata__"], [1])(h)),
    }[kind]
    _safetensors(f, **edit)
    with pytest.raises(ModelError, match="truncated or corrupt safetensors") as e:
        check_safetensors(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_os_errors_become_one_line():
    import errno

    from instaflow_edge.cli import os_error_line
    from instaflow_edge.errors import writing_to

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/data/out"))
    assert line.startswith("no space left on the device: /data/out — ")
    assert "permission denied: /m/unet" in os_error_line(PermissionError(errno.EACCES, "Permission denied", "/m/unet"))
    assert "read-only file system" in os_error_line(OSError(errno.EROFS, "Read-only file system", "/ro/x"))
    assert os_error_line(OSError(errno.ENOENT, "No such file", "/x")) is None  # a bug: keep its traceback
    assert os_error_line(ValueError("boom")) is None
    # a library that flattens the full disk into its own error (safetensors, torch.save), inside an output
    with pytest.raises(OSError) as e:
        with writing_to("/data/out"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/data/out"
    assert os_error_line(e.value).startswith("no space left on the device: /data/out")
    with pytest.raises(OSError) as e:  # PIL/onnx: an OSError without a file name
        with writing_to("/data/out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == "/data/out"


def test_reflow_data_rerun_remakes_a_corrupt_sidecar(tmp_path, tiny_dir):
    """A sidecar that is not UTF-8, or JSON that is not an object, is a corrupt shard: a rerun makes it
    again (it used to fail every rerun until the file was deleted by hand)."""
    from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

    (tmp_path / "p.txt").write_text("a red fox\n")
    cfg = ReflowDataConfig(teacher=str(tiny_dir), output=str(tmp_path / "d"), prompts=str(tmp_path / "p.txt"),
                           num_pairs=4, shard_size=2, steps=1, batch_size=2, device="cpu")
    make_reflow_data(cfg, progress=False)
    side = tmp_path / "d" / "shard-00001.json"
    good = json.loads(side.read_text())["sha256"]
    for bad in (BINARY, b"[1, 2]", b'"x"'):
        side.write_bytes(bad)
        assert make_reflow_data(cfg, progress=False)["generated_pairs"] == 2, bad
        assert json.loads(side.read_text())["sha256"] == good


@pytest.mark.parametrize("entry", [None, ["diffusers", "utils"], ["diffusers"], "EulerDiscreteScheduler"])
def test_malformed_scheduler_entries(entry):
    from instaflow_edge.errors import ModelError
    from instaflow_edge.pipeline import _load_scheduler

    with pytest.raises(ModelError, match="scheduler"):
        _load_scheduler("m", {"scheduler": entry}, local_files_only=True)


def test_data_folder_bomb_and_binary_captions(tmp_path):
    from instaflow_edge.data import folder_dataset
    from instaflow_edge.errors import InputError

    d = tmp_path / "d"
    d.mkdir()
    _bomb_png(d / "big.png")
    (d / "captions.jsonl").write_text('{"file": "big.png", "text": "a"}\n')
    with pytest.raises(InputError, match="big.png is too large to decode safely"):
        folder_dataset(d)
    (d / "captions.jsonl").write_bytes(BINARY)
    with pytest.raises(InputError, match="not UTF-8"):
        folder_dataset(d)


def test_lpips_weights_evil_pickle_and_corrupt_safetensors(tmp_path):
    from instaflow_edge.errors import ModelError
    from instaflow_edge.train.losses import LPIPS

    _evil_pickle(tmp_path / "evil.bin", tmp_path / "PWNED")
    with pytest.raises(ModelError, match="evil.bin is not a plain tensor checkpoint"):
        LPIPS.from_file(tmp_path / "evil.bin", allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ModelError, match="corrupt safetensors"):
        LPIPS.from_file(tmp_path / "w.safetensors")


@pytest.mark.parametrize("args", [[], ["train"]])
def test_no_arguments_prints_help_without_an_error_line(args):
    r = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", *args], capture_output=True, text=True)
    assert "Usage" in r.stdout + r.stderr and "error:" not in r.stdout + r.stderr and "Traceback" not in r.stderr
