"""``convert --target coreml --layout apple``: packages that Apple's Swift ``StableDiffusionPipeline`` runs.

Apple's pipeline (apple/ml-stable-diffusion, ``swift/StableDiffusion/pipeline/``) is a diffusion sampler.
What it does with our three packages, at ``--scheduler dpmpp --step-count 1 --guidance-scale 0``:

* ``TextEncoder.swift``: BPE ids, padded with ``<|endoftext|>`` to 77, fed as float32 ``input_ids``
  ``(1, 77)``; reads ``last_hidden_state`` (Apple's converter also emits ``pooled_outputs``; we do too).
* ``StableDiffusionPipeline.toHiddenStates``: transposes it to ``(B, C, 1, 77)`` for the Unet.
* ``DPMSolverMultistepScheduler``: one step at timestep 999 (``linspace`` spacing); ``Unet.predictNoise``
  feeds ``sample``, ``timestep`` = 999 and ``encoder_hidden_states``, and the first output is taken as ε.
  The pipeline decodes the scheduler's x0 prediction (``denoisedLatents = modelOutputs.last``),
  ``x0 = (x − σ·ε)/α`` (``convertModelOutput``) with α, σ = √ᾱ₉₉₉, √(1 − ᾱ₉₉₉) of its float32
  scaled-linear schedule (α ≈ 0.0682648, σ ≈ 0.9976673: :func:`dpmpp_one_step` computes them as the
  Swift code does).
* ``Decoder.decode``: divides x0 by ``decoderScaleFactor`` (the CLI fixes 0.18215) and reads ``image``.

So the Unet here answers with ``ε̂ = (x − α·(x + v))/σ``, v = v(x, τ=1000): the scheduler's x0 is then our
one-step latent ``x + v`` to float32 rounding. Dividing by α ≈ 0.068 amplifies every rounding of ε̂
≈ 15×: in an fp16 package the few ops after the UNet's last layer stay fp32 (:func:`fp32_tail`;
the manifest records x0's PSNR both ways). The VAEDecoder multiplies its input by 0.18215/scaling_factor,
so the fixed division gives ``x0 / scaling_factor`` for every model (the digits preset's is ≈ 1.746).

The guidance also carries over: ε̂ is affine in v with the same x, so Apple's ``performGuidance`` on ε̂
is InstaFlow's guidance on v (``generate --guidance G`` ↔ ``--guidance-scale G``, G ≥ 1).
"""

from __future__ import annotations

import numpy as np
import torch

from ..components import ComponentSpec, TensorSpec
from ..generator import VaeEncoderComponent
from ..errors import InputError

# Apple's DPMSolverMultistepScheduler defaults (DPMSolverMultistepScheduler.swift, init) and the
# pipeline's decoder scale (StableDiffusionPipeline.Configuration.swift: decoderScaleFactor; the CLI
# sets the same 0.18215 in StableDiffusionCLI/main.swift for SD 1.x/2.x resources)
SCHEDULER = "dpmpp"  # StableDiffusionCLI --scheduler dpmpp → .dpmSolverMultistepScheduler
STEP_COUNT = 1
TRAIN_STEP_COUNT = 1000
BETA_START, BETA_END = 0.00085, 0.012
DECODER_SCALE_FACTOR = np.float32(0.18215)
ENCODER_SCALE_FACTOR = np.float32(0.18215)  # Configuration.encoderScaleFactor (the CLI sets both to --scale-factor)
LOGVAR_FLOOR = -30.0  # Encoder.swift clamps logvar to [-30, 20]: at the floor its sample is the mean ± 3·10⁻⁷ σ


def _linspace(start, end, count):
    """Scheduler.swift: linspace, Float arithmetic."""
    f = np.float32
    scale = (f(end) - f(start)) / f(count - 1)
    return [f(f(i) * scale) + f(start) for i in range(count)]


def apple_schedule() -> tuple[np.ndarray, np.ndarray]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) for t = 0 … 999, in float32 exactly as
    ``DPMSolverMultistepScheduler.init`` builds them (scaledLinear betas; ``alphasCumProd`` in Float)."""
    f = np.float32
    n = TRAIN_STEP_COUNT
    betas = np.array([b * b for b in _linspace(f(BETA_START) ** f(0.5), f(BETA_END) ** f(0.5), n)], dtype=np.float32)
    acp = (f(1) - betas).astype(np.float32)
    for i in range(1, n):  # alphasCumProd[i] *= alphasCumProd[i - 1], in Float
        acp[i] = f(acp[i] * acp[i - 1])
    alpha = np.sqrt(acp).astype(np.float32)  # vForce.sqrt(alphasCumProd)
    sigma = np.sqrt((f(1) - acp).astype(np.float32)).astype(np.float32)
    return alpha, sigma


def apple_timesteps(step_count: int) -> list[int]:
    """The DPM-Solver++ timesteps at ``step_count`` (linspace spacing): ``.dropFirst().reversed()
    .map { Int(round($0)) }``, Foundation's round (halves away from zero)."""
    return [int(np.sign(t) * np.floor(abs(float(t)) + 0.5))
            for t in reversed(_linspace(0, TRAIN_STEP_COUNT - 1, step_count + 1)[1:])]


def dpmpp_one_step(step_count: int = STEP_COUNT) -> dict:
    """The first timestep of Apple's DPM-Solver++ at ``step_count`` and its α, σ (float32, as Swift)."""
    alpha, sigma = apple_schedule()
    t = apple_timesteps(step_count)[0]
    return {"timestep": t, "alpha": np.float32(alpha[t]), "sigma": np.float32(sigma[t])}


def img2img_timesteps(step_count: int, strength: float) -> list[int]:
    """``Scheduler.calculateTimesteps(strength:)``: the last ``Int(Float(N)·strength)`` of the N timesteps."""
    start = max(step_count - int(np.float32(step_count) * np.float32(strength)), 0)
    return apple_timesteps(step_count)[start:]


def straight_strength(timestep: int) -> float:
    """The ``generate --image --strength`` whose edit Apple's image-to-image reproduces when its one step
    runs at ``timestep``: its noised latent √ᾱ·x1 + √(1 − ᾱ)·z is, ÷ (α + σ), the straight-path point
    s0·x1 + (1 − s0)·z with 1 − s0 = σ / (α + σ)."""
    alpha, sigma = apple_schedule()
    return float(sigma[timestep]) / (float(alpha[timestep]) + float(sigma[timestep]))


ONE_STEP = dpmpp_one_step()


def check_model(info, model: str) -> None:
    """``--layout apple`` packs a one-step rectified flow; anything else is refused in one line."""
    if info.flow != "rectified_flow":
        raise InputError(f"--layout apple packs a one-step rectified flow; {model} is a {info.flow} model "
                         f"(it predicts noise itself)",
                         "convert it with Apple's own torch2coreml, or use --layout native")
    if info.default_steps != 1:
        raise InputError(f"--layout apple runs one step (Apple's DPM-Solver++ at --step-count 1); {model} samples in "
                         f"{info.default_steps} steps",
                         "convert a one-step model (a distilled student, `instaflow-edge train distill`), or pass "
                         "--layout native, whose Unet is this model's single Euler step")


# ---------------------------------------------------------------------------------------------------
# the three modules, as traced


class AppleTextEncoder(torch.nn.Module):
    """float32 ids (B, 77) → (last_hidden_state (B, 77, D), pooled_outputs (B, D)), as Apple's
    ``torch2coreml.convert_text_encoder`` emits them (ids cast to int32 inside, as it traces)."""

    keeps_input_dtype = True  # as shipped in fp16, the ids still reach the cast as exact float32

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int32), return_dict=False)
        return out[0], out[1]


class AppleUnet(torch.nn.Module):
    """(sample x, timestep t, encoder_hidden_states (B, C, 1, 77)) → the ε̂ whose DPM-Solver++ x0,
    (x − σ_t·ε̂)/α_t, is our latent after one Euler step, for both of Apple's modes:

    * text to image, t = 999 (the one step of ``--step-count 1``): x is the noise z, and the answer is
      ε̂ = (x − α·(x + v))/σ, v = v(x, τ=1000), so x0 = z + v;
    * image to image, any other t (``--image``, ``--strength`` < 1, one step left): Apple noised the
      image's latent as x = α_t·x1 + σ_t·z (``addNoise``), which ÷ (α_t + σ_t) is the straight-path point
      s0·x1 + (1 − s0)·z with S = 1 − s0 = σ_t/(α_t + σ_t); the answer lands x0 on x' + S·v(x', 1000·S),
      ``generate --image --strength S``'s one step (:func:`straight_strength`).

    α_t, σ_t are Apple's float32 tables, looked up by the timestep; at 999 the arithmetic is the
    text-to-image formula bit for bit."""

    keeps_input_dtype = True  # the tail reads the float32 sample, as the package's fp32 ops do

    def __init__(self, unet, alpha: float = float(ONE_STEP["alpha"]), sigma: float = float(ONE_STEP["sigma"])):
        super().__init__()
        self.unet = unet
        self.alpha, self.sigma = float(alpha), float(sigma)
        a, s = apple_schedule()
        # plain attributes, not buffers: they stay float32 when the module is cast to fp16
        self.alphas, self.sigmas = torch.from_numpy(a), torch.from_numpy(s)
        self.text_to_image_step = int(ONE_STEP["timestep"])

    def forward(self, sample, timestep, encoder_hidden_states):
        dtype = next(self.unet.parameters()).dtype
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)  # (B, C, 1, S) → (B, S, C)
        idx = timestep.float().round().long().clamp(0, TRAIN_STEP_COUNT - 1)
        a = self.alphas[idx].reshape(-1, 1, 1, 1)
        s = self.sigmas[idx].reshape(-1, 1, 1, 1)
        edit = (idx != self.text_to_image_step).reshape(-1, 1, 1, 1)
        pa, ps = torch.where(edit, a, torch.zeros_like(a)), torch.where(edit, s, torch.ones_like(s))
        x = sample.float() / (pa + ps)  # the straight-path point (t = 999: the noise itself)
        strength = ps / (pa + ps)  # 1 − s0 (t = 999: 1)
        v = self.unet(x.to(dtype), (1000.0 * strength).reshape(-1).to(dtype), encoder_hidden_states=hidden.to(dtype),
                      return_dict=False)[0]
        return (sample.float() - a * (x + strength * v.float())) / s


def eps_hat(x, v, alpha: float, sigma: float):
    """The ε that makes ``(x − σ·ε)/α`` equal ``x + v`` (the one Euler step of ``flow.one_step``)."""
    return (x - alpha * (x + v)) / sigma


class AppleVaeDecoder(torch.nn.Module):
    """z = x0 / 0.18215 (Apple's fixed division) → image in [-1, 1]: z is rescaled to x0 / scaling_factor
    first (nothing to do when the model's factor is 0.18215, as SD 1.x's is)."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae = vae
        self.rescale = float(DECODER_SCALE_FACTOR / np.float32(scaling_factor))

    def forward(self, z):
        if self.rescale != 1.0:
            z = z * self.rescale
        return self.vae.decode(z, return_dict=False)[0]


class AppleVaeEncoder(torch.nn.Module):
    """x (B, 3, H, W) in [-1, 1] → latent (B, 2C, h, w): the posterior mean, rescaled so that Apple's
    fixed ``× encoderScaleFactor`` (0.18215) gives mean × the model's scaling_factor, then logvar at
    Apple's floor (−30), so ``Encoder.encode``'s DiagonalGaussianDistribution sample is the mean (to
    3·10⁻⁷ of a standard normal): ``generate --image`` encodes with the mean."""

    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.encoder = VaeEncoderComponent(vae)  # the posterior mean (a tiny VAE's latents as they are)
        self.rescale = float(np.float32(scaling_factor) / ENCODER_SCALE_FACTOR)

    def forward(self, x):
        mean = self.encoder(x)
        if self.rescale != 1.0:
            mean = mean * self.rescale
        return torch.cat([mean, torch.full_like(mean, LOGVAR_FLOOR)], dim=1)


# Apple's I/O (torch2coreml.py: convert_text_encoder, convert_unet, convert_vae_decoder, convert_vae_encoder). Dtypes are
# what crosses the boundary here: float32 everywhere (the Swift code hands and reads Float32 arrays).
_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder", (TensorSpec("input_ids", "float32", ("batch", "sequence")),),
        (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),
         TensorSpec("pooled_outputs", "float32", ("batch", "hidden"))),
        lambda pipe: AppleTextEncoder(pipe.text_encoder),
    ),
    "unet": ComponentSpec(
        "unet", (TensorSpec("sample", "float32", _LATENT), TensorSpec("timestep", "float32", ("batch",)),
                 TensorSpec("encoder_hidden_states", "float32", ("batch", "hidden", "one", "sequence"))),
        (TensorSpec("noise_pred", "float32", _LATENT),),
        lambda pipe: AppleUnet(pipe.unet), dynamic=("latent_height", "latent_width"),
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder", (TensorSpec("z", "float32", _LATENT),),
        (TensorSpec("image", "float32", ("batch", "image_channels", "height", "width")),),
        lambda pipe: AppleVaeDecoder(pipe.vae, pipe.scaling_factor), dynamic=("latent_height", "latent_width", "height", "width"),
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder", (TensorSpec("x", "float32", ("batch", "image_channels", "height", "width")),),
        (TensorSpec("latent", "float32", ("batch", "moments", "latent_height", "latent_width")),),
        lambda pipe: AppleVaeEncoder(pipe.vae, pipe.scaling_factor), dynamic=("latent_height", "latent_width", "height", "width"),
    ),
}

DESCRIPTIONS = {
    "text_encoder": {
        "input_ids": "CLIP token ids (1, 77) as float32: <|startoftext|>, the prompt's tokens, <|endoftext|>, padded with <|endoftext|>",
        "last_hidden_state": "CLIP text encoder last hidden states (1, 77, hidden); the Swift pipeline transposes them to (1, hidden, 1, 77)",
        "pooled_outputs": "the last hidden state at the <|endoftext|> token (as Apple's converter emits; the pipeline does not use it)",
    },
    "unet": {
        "sample": "latents x (batch, 4, H/8, W/8): the N(0, 1) noise at timestep 999, or the noised image latent (image to image)",
        "timestep": "the scheduler's timestep: 999 is text to image (DPM-Solver++ at stepCount 1); any other, image to image with one step left",
        "encoder_hidden_states": "text embeddings (batch, hidden, 1, 77): last_hidden_state transposed (toHiddenStates)",
        "noise_pred": "ε̂ whose DPM-Solver++ x0 = (x − σ_t·ε̂)/α_t is one straight-path Euler step: x + v(x, τ=1000) at t = 999",
    },
    "vae_decoder": {
        "z": "x0 / 0.18215 (the Swift pipeline's decoderScaleFactor); rescaled inside to x0 / the model's scaling_factor",
        "image": "RGB image in [-1, 1], (1, 3, H, W)",
    },
    "vae_encoder": {
        "x": "the starting image, RGB in [-1, 1] (1, 3, H, W) (planarRGBShapedArray(minValue: -1, maxValue: 1))",
        "latent": "mean × scaling_factor / 0.18215 (channels 0-3) and logvar −30 (4-7): the Swift sample × encoderScaleFactor is the image's latent",
    },
}
SHORT = {
    "text_encoder": "CLIP text encoder of a one-step InstaFlow generator (Apple StableDiffusion layout)",
    "unet": "One-step rectified flow as an ε-prediction for Apple's DPM-Solver++ at stepCount 1 (timestep 999)",
    "vae_decoder": "VAE decoder of a one-step InstaFlow generator: z = x0 / 0.18215 → image",
    "vae_encoder": "VAE encoder for image to image: image → mean (× scaling_factor / 0.18215), logvar at the floor",
}


# ---------------------------------------------------------------------------------------------------
# the chain of measurements, as the Swift pipeline runs it (float32 between the packages)


def to_hidden_states(hidden):
    """(B, 77, C) → (B, C, 1, 77), StableDiffusionPipeline.toHiddenStates."""
    return hidden.transpose(1, 2).unsqueeze(2).contiguous()


def x0_from_eps(sample, eps, alpha=ONE_STEP["alpha"], sigma=ONE_STEP["sigma"]):
    """DPMSolverMultistepScheduler.convertModelOutput in float32: (sample − ε·σ)/α."""
    a, s = torch.tensor(alpha, dtype=torch.float32), torch.tensor(sigma, dtype=torch.float32)
    return (sample.float() - eps.float() * s) / a


def inputs(name: str, state: dict) -> tuple:
    """What the Swift pipeline hands component ``name``, from the chain ``state``."""
    if name == "text_encoder":
        return (state["input_ids"],)
    if name == "unet":
        t = torch.full((state["noise"].shape[0],), float(ONE_STEP["timestep"]))
        return (state["noise"], t, to_hidden_states(state["hidden"]))
    if name == "vae_decoder":
        return (state["latents"].float() / torch.tensor(DECODER_SCALE_FACTOR),)
    if name == "vae_encoder":  # the chain's own decoded image, as a starting image
        return (state["image"].float().clamp(-1, 1),)
    raise KeyError(name)


def observed(name: str, out, ins: tuple):
    """The figure the pipeline goes on with: the hidden states, the scheduler's x0, the image."""
    if name == "text_encoder":
        return out[0]
    if name == "unet":
        return x0_from_eps(ins[0], out)
    if name == "vae_encoder":  # Encoder.encode: the mean channels × encoderScaleFactor (the sample, to 3e-7 σ)
        return out[:, : out.shape[1] // 2].float() * torch.tensor(ENCODER_SCALE_FACTOR)
    return out


# the ε̂ arithmetic and the timestep's table lookup (α_t, σ_t, the straight-path strength)
_TAIL_OPS = ("add", "sub", "mul", "real_div", "gather", "select", "cast", "round", "clip", "not_equal", "reshape",
             "expand_dims", "squeeze", "fill", "fill_like")


def fp32_tail():
    """An ``op_selector`` for ``ct.transform.FP16ComputePrecision``: every op in fp16 except the
    elementwise arithmetic between the graph's output and the UNet's last non-elementwise op (the
    ε̂ formula, whose rounding the scheduler's division by α amplifies ≈ 15×)."""
    tails: dict[int, set] = {}

    def select(op) -> bool:
        block = op.enclosing_block
        if id(block) not in tails:
            tail: set = set()
            stack = [v.op for v in block.outputs if v.op is not None]
            while stack:
                o = stack.pop()
                if o.name in tail or o.op_type not in _TAIL_OPS:
                    continue
                tail.add(o.name)
                for v in o.inputs.values():
                    stack.extend(x.op for x in (v if isinstance(v, (list, tuple)) else [v]) if x.op is not None)
            tails[id(block)] = tail
        return op.name not in tails[id(block)]

    return select


def manifest_block(scaling_factor: float) -> dict:
    """What the manifest says the packages were built for."""
    return {
        "program": "apple/ml-stable-diffusion swift StableDiffusionPipeline",
        "scheduler": SCHEDULER, "swift_scheduler": "DPMSolverMultistepScheduler", "step_count": STEP_COUNT,
        "timestep": ONE_STEP["timestep"], "alpha": float(ONE_STEP["alpha"]), "sigma": float(ONE_STEP["sigma"]),
        "guidance_scale": "< 1 for one Unet call (pass 0); G ≥ 1 is InstaFlow's guidance G",
        "decoder_scale_factor": float(DECODER_SCALE_FACTOR), "model_scaling_factor": float(scaling_factor),
        "encoder_scale_factor": float(ENCODER_SCALE_FACTOR),
        "image_to_image": {"resource": "VAEEncoder.mlpackage", "step_count": "N with Int(N·strength) = 1 (one step left, at "
                           "timestep t = the last of N)", "generate": "--image FILE --strength σ_t/(α_t + σ_t) of Apple's "
                           "table at t (2 steps, strength 0.5: t = 500)",
                           "cli": "... --image START.png --strength 0.5 --step-count 2 (the image at the export's size)"},
        "rng": "torch (the Swift CLI's --rng torch draws generate's noise for the same seed)",
        "cli": ("swift run StableDiffusionSample PROMPT --resource-path RESOURCES --scheduler dpmpp "
                "--step-count 1 --guidance-scale 0 --rng torch --seed SEED"),
    }
