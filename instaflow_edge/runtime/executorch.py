"""``generate --backend executorch``: run an ExecuTorch export folder (``convert --target executorch``).

One program per component, each with the one method ``forward``, as an app loads them::

    text_encoder/model.pte  unet/model.pte  vae_decoder/model.pte  vae_encoder/model.pte  [unet_velocity/model.pte]
    tokenizer/  scheduler/  model_index.json  torch_randn.mjs  manifest.json  (manifest["executorch"])

The programs are run with ExecuTorch's own runtime (``executorch.runtime``: the C++ runtime an Android or
iOS app links, with the XNNPACK delegate), batch 1 at the export's image size. Every program is checked
before the first image: it loads, has ``forward``, and its inputs are the component's (count, dtypes and
shapes); a call with an input of another shape is refused in one line, never handed to the runtime.
The UNet program takes (sample, timestep, text) (``convert/onnx.py: _OneStepUnet``): t = 1000 is text to
image, t = 1000·strength with ``vae_encoder`` (loaded on the first edit) image to image (``--image``).
This module stays light at import: executorch loads inside the functions.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, InputError, MissingDependencyError, ModelError
from ..pipeline import quiet_libraries
from .base import ONE_STEP, Export, ExportFacts, RuntimeFormat
from .sampler import check_sampling, edit_calls, tokenizer_for

KIND = "executorch-export"
PROGRAM_FILE = "model.pte"
METHOD = "forward"
_FIX = "re-export the model (instaflow-edge convert --target executorch)"
# ExecuTorch's ScalarType codes (runtime/core/portable_type/scalar_type.h) of the dtypes we feed
_SCALAR_TYPES = {4: "int64", 5: "float16", 6: "float32"}


class EtPrecision(str, enum.Enum):
    """``convert --target executorch --precision``: the arithmetic of the float graphs."""

    fp32 = "fp32"
    fp16 = "fp16"


def require_executorch():
    """``executorch.runtime.Runtime`` (its runtime loaded once per process)."""
    try:
        with quiet_libraries():  # torchao's optional CUDA kernels failing to load, at import
            from executorch.runtime import Runtime
    except ImportError as e:
        raise MissingDependencyError("ExecuTorch is not installed",
                                     "pip install -c constraints.txt -e '.[executorch]'") from e
    return Runtime.get()


@contextlib.contextmanager
def quiet_stderr():
    """Inside, the process's stderr (fd 2) goes to /dev/null: ExecuTorch's C++ runtime prints cpuinfo
    probing lines when its threadpool starts. Python exceptions still carry what failed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_threads(threads: int | None) -> None:
    """Size the XNNPACK threadpool (one pool per process; ``None`` keeps it)."""
    if threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        with quiet_stderr():
            _unsafe_reset_threadpool(int(threads))


def _reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


class Program:
    """One component's ``.pte`` loaded by ExecuTorch's runtime: its ``forward`` method, with the inputs it
    was compiled for (``inputs``: (shape, dtype) each) checked on every call."""

    def __init__(self, path: Path, name: str, runtime=None):
        self.path, self.name = Path(path), name
        if not self.path.is_file():
            raise ModelError(f"{self.path} is missing", _FIX)
        if self.path.stat().st_size < 16:
            raise ModelError(f"{self.path} is not an ExecuTorch program ({self.path.stat().st_size} bytes)", _FIX)
        head = self.path.read_bytes()[:8]
        if head[4:8] != b"ET12":  # the flatbuffer file identifier of every .pte this runtime reads
            raise ModelError(f"{self.path} is not an ExecuTorch program (no ET12 header)", _FIX)
        rt = runtime or require_executorch()
        try:
            self.program = rt.load_program(str(self.path))
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{self.path} is not an ExecuTorch program this runtime can load ({_reason(e)})", _FIX) from e
        if METHOD not in self.program.method_names:
            raise ModelError(f"{self.path} has no method {METHOD!r} (it has: {', '.join(sorted(self.program.method_names)) or 'none'})",
                             _FIX)
        meta = self.program.metadata(METHOD)
        self.inputs = [_info(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
        self.outputs = [_info(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]
        try:
            with quiet_stderr():
                self.method = self.program.load_method(METHOD)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{self.path}: method {METHOD!r} does not load ({_reason(e)})", _FIX) from e

    def check(self, want: list[tuple[tuple[int, ...], str]]) -> None:
        """The program's inputs are ``want`` ((shape, dtype) each): a program of another component or of
        another model (other sizes) is a one-line error here, before any image."""
        if [(tuple(s), d) for s, d in self.inputs] != [(tuple(s), d) for s, d in want]:
            got = ", ".join(f"{d}{list(s)}" for s, d in self.inputs) or "none"
            need = ", ".join(f"{d}{list(s)}" for s, d in want)
            raise ModelError(f"{self.path}: its inputs [{got}] are not this export's {self.name} inputs [{need}]",
                             "the folder mixes up components or models; " + _FIX)

    def __call__(self, *arrays):
        import numpy as np
        import torch

        if len(arrays) != len(self.inputs):
            raise InputError(f"{self.name}: {len(arrays)} inputs given, the program takes {len(self.inputs)}",
                             "pass the component's inputs")
        feed = []
        for a, (shape, dtype) in zip(arrays, self.inputs):
            a = np.ascontiguousarray(a, dtype=dtype)
            if tuple(a.shape) != tuple(shape):
                raise InputError(f"{self.name}: input of shape {list(a.shape)}, the program was compiled for {list(shape)}",
                                 "an ExecuTorch export runs batch 1 at its export size; re-export for another size")
            feed.append(torch.from_numpy(a))
        out = self.method.execute(feed)
        return np.asarray(out[0].detach().numpy(), dtype=np.float32)


def _info(t) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in t.sizes()), _SCALAR_TYPES.get(int(t.dtype()), f"scalar type {int(t.dtype())}")


def export_facts(folder: Path, manifest: dict | None = None) -> tuple[ExportFacts, dict]:
    """The manifest's ``executorch`` block, checked: the typed runtime facts (one fixed size) and the block."""
    folder = Path(folder)
    m = manifest if manifest is not None else (read_manifest(folder) or {})
    block = m.get("executorch")
    if not isinstance(block, dict) or "latent_shape" not in block:
        raise ModelError(f"{folder} has no ExecuTorch export manifest",
                         "pass a folder written by `instaflow-edge convert --target executorch`")
    facts = ExportFacts.from_block(block, folder / "manifest.json", fixed_size=True)
    if block.get("precision") not in [p.value for p in EtPrecision]:
        raise ModelError(f"{folder / 'manifest.json'}: executorch.precision must be one of "
                         f"{', '.join(p.value for p in EtPrecision)}, got {block.get('precision')!r}",
                         "restore the manifest, or re-export the model")
    return facts, block


def expected_inputs(facts: ExportFacts, name: str, hidden_shape: tuple[int, ...] | None, timestep: bool = False) -> list | None:
    """(shape, dtype) of each input of component ``name`` at the export's size (batch 1); the UNets'
    text input is checked against the text encoder's output (``hidden_shape``)."""
    latent = (1, *facts.latent_shape)
    if name == "text_encoder":
        return None  # its token length is the tokenizer's; checked through its output below
    if name == "unet":  # with the timestep input: exports made since image to image
        return [(latent, "float32"), ((1,), "float32"), (hidden_shape, "float32")] if timestep else \
            [(latent, "float32"), (hidden_shape, "float32")]
    if name == "unet_velocity":
        return [(latent, "float32"), ((1,), "float32"), (hidden_shape, "float32")]
    if name == "vae_decoder":
        return [(latent, "float32")]
    if name == "vae_encoder":
        return [((1, 3, facts.height, facts.width), "float32")]
    return None


def load_programs(folder: Path, names, facts: ExportFacts) -> dict[str, Program]:
    """Every component of ``names`` loaded and checked against the export's facts."""
    rt = require_executorch()
    progs = {n: Program(Path(folder) / n / PROGRAM_FILE, n, rt) for n in names}
    te = progs["text_encoder"]
    if len(te.inputs) != 1 or te.inputs[0][1] != "int64" or len(te.inputs[0][0]) != 2 or len(te.outputs) < 1:
        raise ModelError(f"{te.path}: its inputs are not a text encoder's (int64 token ids)",
                         "the folder mixes up components or models; " + _FIX)
    hidden = te.outputs[0][0]
    for n in names:
        want = expected_inputs(facts, n, hidden, timestep=n == "unet" and len(progs[n].inputs) == 3)
        if want is not None:
            progs[n].check(want)
    dec = progs["vae_decoder"].outputs[0][0]
    if tuple(dec) != (1, 3, facts.height, facts.width):
        raise ModelError(f"{progs['vae_decoder'].path}: it decodes to {list(dec)}, this export is {facts.height}×{facts.width}",
                         "the folder mixes up models; " + _FIX)
    return progs


def program_calls(progs: dict[str, Program]) -> dict:
    import numpy as np

    unet = progs["unet"]
    calls = {"text_encoder": lambda ids: progs["text_encoder"](ids),
             "vae_decoder": lambda x: progs["vae_decoder"](x)}
    if len(unet.inputs) == 3:  # the straight-path graph (exports since image to image): t = 1000 is text to image
        calls["unet"] = lambda z, h: unet(z, np.full((1,), 1000.0, np.float32), h)
    else:
        calls["unet"] = lambda z, h: unet(z, h)
    if "unet_velocity" in progs:
        calls["velocity"] = lambda x, t, h: progs["unet_velocity"](x, t, h)
    return calls


def _open_encoder(folder: Path, facts: ExportFacts) -> "_Session":
    """The VAE encoder program (image to image), checked, as a session."""
    prog = Program(Path(folder) / "vae_encoder" / PROGRAM_FILE, "vae_encoder", require_executorch())
    prog.check(expected_inputs(facts, "vae_encoder", None))
    return _Session(prog, ("sample",))


class _Session:
    """A program behind the ``run(None, feed)`` face of a session (what ``sampler.edit_calls`` takes)."""

    def __init__(self, program: "Program", names: tuple[str, ...]):
        self.program, self.names = program, names

    def run(self, _outputs, feed: dict) -> list:
        return [self.program(*(feed[n] for n in self.names))]


def open_executorch(folder: Path, manifest: dict, *, steps: int | None = None, guidance: float = 1.0,
                    threads: int | None = None, device: str = "cpu") -> Export:
    """Open an ExecuTorch export folder with ExecuTorch's runtime (XNNPACK on the CPU), ``threads`` threads."""
    if device not in ("auto", "cpu"):
        raise DeviceError(f"--device {device} is not available with --backend executorch", "use --device cpu")
    facts, block = export_facts(folder, manifest)
    steps = steps or facts.default_steps
    check_sampling(facts, steps, guidance, "executorch")
    names = list(ONE_STEP) + (["unet_velocity"] if steps > 1 else [])
    set_threads(threads)
    progs = load_programs(folder, names, facts)
    calls = program_calls(progs)
    if "vae_encoder" in facts.components and block.get("unet_timestep") == "straight-path":  # image to image
        calls.update(edit_calls(lambda: _open_encoder(folder, facts),
                                _Session(progs["unet"], ("sample", "timestep", "encoder_hidden_states")), "straight-path"))
    q = manifest.get("quantize") or {}
    scheme, comps = q.get("scheme"), list(q.get("components") or [])
    computes_int8 = bool(scheme) and not str(scheme).endswith("-weights")
    stages = {n: ("int8" if computes_int8 and n in comps else block["precision"]) for n in ONE_STEP}
    stages["end_to_end"] = stages["generator"] = stages["unet"]
    from importlib.metadata import version

    how = (f"ExecuTorch {version('executorch')} runtime, XNNPACK delegate, {block['precision']}"
           + (f"; {scheme} (PT2E, XNNPACK quantizer) on {', '.join(comps)}" if scheme else ""))
    sizes = {n: {"bytes": (manifest.get("sizes") or {}).get(n), "basis": ".pte bytes"} for n in ONE_STEP}
    return Export(folder=folder, format="executorch", label=label(manifest), facts=facts, steps=steps,
                  tokenize=tokenizer_for(folder), calls=calls,
                  precision=block["precision"] + (f"+{scheme}" if scheme else ""), ran=how, scheme=scheme,
                  gates={k: float(v) for k, v in (manifest.get("gates") or {}).items()}, sizes=sizes,
                  stage_precisions=stages, max_batch=1, runtime="ExecuTorch",
                  details={"quantize": scheme, "delegated_flops": {n: (block.get("delegation") or {}).get(n, {}).get("flop_share")
                                                                   for n in ONE_STEP}})


def label(manifest: dict) -> str:
    block = manifest.get("executorch") or {}
    q = (manifest.get("quantize") or {}).get("scheme")
    return f"executorch {q or block.get('precision') or 'fp32'}"


FORMAT = RuntimeFormat(
    name="executorch", kind=KIND, open=open_executorch, title="ExecuTorch", label=label,
    unavailable=lambda device: None if device in ("auto", "cpu") else "an ExecuTorch export runs on the CPU here (XNNPACK)",
    description="ExecuTorch programs (model.pte per component, XNNPACK delegate), as Android and iOS apps load them",
)
