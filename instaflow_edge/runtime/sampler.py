"""The format-neutral sampler and the checks every session-based runtime shares.

A runtime turns its compiled components into the calls of :class:`runtime.base.Export` (``calls``);
:func:`sample` runs the one-step chain or the Euler rule over them. Runtimes whose models answer
onnxruntime's session API (``run(None, feed)``, ``get_inputs()``, ``get_outputs()``: onnxruntime itself,
and OpenVINO's adapter) get their calls from :func:`session_calls`, and their graphs checked against the
component specs by :func:`check_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import InputError, ModelError

# inputs an export may lack: exports made before the one-step UNet took optimum's timestep input
_OPTIONAL_INPUTS = {"unet": {"timestep"}}
# inputs an export may add to its spec: the one-step UNet has optimum's timestep (convert/onnx.py's onnx_spec)
_EXTRA_INPUTS = {"unet": {"timestep"}}


def sample(calls: dict[str, Callable], input_ids, noise, scaling_factor: float, steps: int):
    """Images in [0, 1] (N, 3, H, W) for token ids (N, L) and noise (N, C, h, w): the one-step generator
    at ``steps == 1``, else the velocity UNet with the Euler rule of ``flow.py``."""
    import numpy as np

    from .. import flow

    hidden = calls["text_encoder"](input_ids)
    if steps == 1:
        x = calls["unet"](noise, hidden)
    else:
        x = noise
        for tau in flow.euler_schedule(steps):
            v = calls["velocity"](x, np.full((x.shape[0],), tau, np.float32), hidden)
            x = (x + v / steps).astype(np.float32)
    img = calls["vae_decoder"]((np.asarray(x) / scaling_factor).astype(np.float32))
    return np.clip(np.asarray(img, dtype=np.float32) / 2 + 0.5, 0, 1)


def edit(calls: dict[str, Callable], input_ids, images, noise, scaling_factor: float, steps: int, strength: float):
    """Image-to-image (``generate --image``) over an export's calls: ``vae_encoder`` (image in [-1, 1] →
    posterior mean), then the straight path from s0 = 1 - strength: one step through ``unet_at`` (the
    one-step UNet graph at timestep t = 1000·strength, which takes its sample on the shipped scheduler's
    scale: ÷ r(t)), or N Euler steps of the velocity UNet. Images in [0, 1]."""
    import numpy as np

    from .. import flow

    hidden = calls["text_encoder"](input_ids)
    x1 = np.asarray(calls["vae_encoder"](np.asarray(images, np.float32)), np.float32) * np.float32(scaling_factor)
    noise = np.asarray(noise, np.float32)
    x = noise if strength == 1.0 else ((1.0 - strength) * x1 + strength * noise).astype(np.float32)
    if steps == 1:
        t = 1000.0 * strength
        r = np.sqrt((1000.0 - t) ** 2 + t ** 2) / 1000.0
        x = calls["unet_at"]((x / r).astype(np.float32), t, hidden)
    else:
        for tau, ds in flow.edit_schedule(strength, steps):
            v = calls["velocity"](x, np.full((x.shape[0],), tau, np.float32), hidden)
            x = (x + v * ds).astype(np.float32)
    img = calls["vae_decoder"]((np.asarray(x) / scaling_factor).astype(np.float32))
    return np.clip(np.asarray(img, dtype=np.float32) / 2 + 0.5, 0, 1)


def edit_calls(open_encoder: Callable, unet, unet_timestep: str | None) -> dict[str, Callable]:
    """The calls ``edit`` needs beside an export's text-to-image ones: ``vae_encoder`` (its session made by
    ``open_encoder()`` when first called, so text-to-image never pays for it) and, where the one-step UNet
    graph takes the straight-path timestep (``unet_timestep == "straight-path"``: exports made since
    image-to-image), ``unet_at``. ``unet`` is a session with ``run(None, feed)``."""
    import numpy as np

    opened: dict = {}

    def encode(img):
        if "s" not in opened:
            opened["s"] = open_encoder()
        return opened["s"].run(None, {"sample": np.asarray(img, np.float32)})[0]

    out: dict[str, Callable] = {"vae_encoder": encode}
    if unet_timestep == "straight-path":
        out["unet_at"] = lambda x, t, h: unet.run(None, {"sample": np.asarray(x, np.float32), "encoder_hidden_states": h,
                                                         "timestep": np.full((x.shape[0],), t, np.float32)})[0]
    return out


def unet_feed(sess, sample, encoder_hidden_states) -> dict:
    """Inputs of an exported one-step UNet (exports made before the timestep input have none)."""
    import numpy as np

    feed = {"sample": sample, "encoder_hidden_states": encoder_hidden_states}
    if any(i.name == "timestep" for i in sess.get_inputs()):
        feed["timestep"] = np.full((sample.shape[0],), 1000.0, np.float32)
    return feed


def session_calls(sessions: dict) -> dict[str, Callable]:
    """The component calls over sessions with onnxruntime's API (``unet_velocity`` becomes ``velocity``)."""
    import numpy as np

    calls = {
        "text_encoder": lambda ids: sessions["text_encoder"].run(None, {"input_ids": np.asarray(ids, np.int64)})[0],
        "unet": lambda z, h: sessions["unet"].run(None, unet_feed(sessions["unet"], np.asarray(z, np.float32),
                                                                 np.asarray(h, np.float32)))[0],
        "vae_decoder": lambda x: sessions["vae_decoder"].run(None, {"latent_sample": np.asarray(x, np.float32)})[0],
    }
    if "unet_velocity" in sessions:
        calls["velocity"] = lambda x, t, h: sessions["unet_velocity"].run(
            None, {"sample": x, "timestep": t, "encoder_hidden_states": h})[0]
    if "vae_encoder" in sessions:
        calls["vae_encoder"] = lambda img: sessions["vae_encoder"].run(None, {"sample": np.asarray(img, np.float32)})[0]
    return calls


def check_io(sess, name: str, path: Path) -> None:
    """The graph's inputs and outputs are component ``name``'s spec (``components.COMPONENTS``): names and
    ranks. A graph in the wrong folder (the text encoder's in ``unet/``) fails here, in one line."""
    from ..components import COMPONENTS

    spec = COMPONENTS.get(name)
    if spec is None:
        raise ModelError(f"{path}: {name!r} is not a component this tool exports", "re-export the model")
    want_in = {t.name: len(t.dims) for t in spec.inputs}
    want_out = {t.name: len(t.dims) for t in spec.outputs}
    got_in = {i.name: len(i.shape) for i in sess.get_inputs()}
    got_out = {o.name: len(o.shape) for o in sess.get_outputs()}
    if "timestep" in got_in and name in _EXTRA_INPUTS:
        want_in.setdefault("timestep", 1)
    missing_ok = _OPTIONAL_INPUTS.get(name, set())
    bad_in = (set(got_in) != set(want_in) and set(got_in) != set(want_in) - missing_ok) or \
        any(got_in[k] != want_in[k] for k in set(got_in) & set(want_in))
    bad_out = set(got_out) != set(want_out) or any(got_out[k] != want_out[k] for k in got_out)

    def fmt(d):
        return ", ".join(f"{k} (rank {v})" for k, v in d.items())

    if bad_in or bad_out:
        what = "inputs" if bad_in else "outputs"
        got, want = (got_in, want_in) if bad_in else (got_out, want_out)
        raise ModelError(f"{path}: the graph's {what} [{fmt(got)}] are not the {name} component's [{fmt(want)}]",
                         "the folder mixes up components; re-export it with `instaflow-edge convert`")


def check_sampling(facts, steps: int, guidance: float, backend: str) -> None:
    """Refuse what an export cannot sample, before any model is opened."""
    if facts.flow != "rectified_flow":
        raise InputError(f"--backend {backend} samples rectified flows only; this export is a diffusion model",
                         "use --backend torch for diffusion models")
    if guidance > 1.0:
        raise InputError(f"--backend {backend} does not do classifier-free guidance", "use --guidance 1 or --backend torch")
    if steps > 1 and "unet_velocity" not in facts.components:
        raise InputError(f"this export is one-step only (no velocity UNet), --steps {steps} cannot run",
                         "use --steps 1, or export a multi-step model")


def tokenizer_for(folder: Path):
    """``prompts -> int64 token ids (N, 77)`` with the export's ``tokenizer/``, loaded once."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
    return lambda prompts: tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="np").input_ids.astype("int64")
