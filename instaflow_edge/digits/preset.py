"""The ``digits`` preset: the base pipeline of the digits demo (``instaflow-edge init digits OUT``).

Stable Diffusion's architecture at digits scale, 32×32 images:

* a small ``CLIPTextModel`` with an offline tokenizer whose vocabulary holds every word of the digit
  prompts, *pretrained here* as the text tower of a tiny CLIP (contrastive image–caption training on the
  digits train split, then frozen in training, as SD's CLIP text encoder is). A random text tower maps
  "a handwritten seven" and "a handwritten three" to hidden states with cosine ≈ 0.99, and a teacher
  trained on it follows its prompts poorly; the manifest records the separation before and after;
* an ``AutoencoderKL`` *trained here* on the digits train split (32×32×3 → 4×8×8 latents, two
  downsamples). ``scaling_factor`` is set so the scaled latents the trainer caches (posterior means ×
  factor) have unit standard deviation on the train split; the validation reconstruction PSNR goes
  into the manifest;
* a ``UNet2DConditionModel`` of about 1.1 M parameters (cross-attention at both levels) on 8×8 latents, random: ``train teacher`` trains it.

It is a rectified-flow *base* (``default_steps`` 32), not a one-step model. Same seed → same weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

from ..errors import InputError, NumericsError
from ..pipeline import ModelInfo
from ..presets import Built, _assemble, _tokenizer, preset
from ..threads import Governor, threads_setting

TEXT_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=64)
UNET_CFG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
    block_out_channels=(16, 32, 32), norm_num_groups=16,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)


@dataclasses.dataclass
class DigitsPresetConfig:
    """How the digits VAE is trained (tests shorten ``vae_steps``)."""

    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5     # on the per-image KL sum, against the per-pixel MSE
    data_seed: int = 0          # the digits split the VAE trains on (validation measures it)
    text_steps: int = 300       # CLIP-style pretraining of the text tower (0: keep it random)
    text_batch_size: int = 128
    text_lr: float = 2e-3
    # CPU threads of both loops: "auto" follows the machine's load (threads.py), N fixes the count; None
    # keeps torch's count, so that a build is bit-identical to another with the same seed (which
    # "auto" cannot promise: the thread count changes the order of float sums)
    threads: str | int | None = None

    def validate(self) -> None:
        if self.threads is not None:
            self.threads = threads_setting("threads", self.threads)

        for name in ("vae_steps", "vae_batch_size", "text_steps", "text_batch_size"):
            v = getattr(self, name)
            low = 0 if name == "text_steps" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an integer ≥ {low}, got {v!r}", f"set {name} to {low} or more")
        if not self.vae_lr > 0 or not self.text_lr > 0 or not self.kl_weight >= 0:
            raise InputError("vae_lr must be > 0 and kl_weight ≥ 0", "use the defaults of DigitsPresetConfig")


def _threads(config: DigitsPresetConfig) -> str | int:
    import torch

    return torch.get_num_threads() if config.threads is None else config.threads


def _own_rng(fn):
    """Run ``fn`` with a private copy of torch's global RNG (it seeds layer initialisation), so the
    caller's random state is left as it was."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return run


@preset("digits", "the digits demo's base model: 32×32, VAE trained here on the bundled digits, random UNet "
                  "(minutes on a CPU)")
def build_digits_preset(seed: int, progress: bool = True, **options):
    return build_digits(seed, DigitsPresetConfig(**options) if options else None, progress=progress)


def build_digits(seed: int, config: DigitsPresetConfig | None = None, progress: bool = True):
    """Build the digits base pipeline; returns ``presets.Built`` (pipeline + the VAE's manifest fields)."""
    from ..data import prompt_vocabulary

    config = config or DigitsPresetConfig()
    config.validate()
    pipe = _assemble(seed, _tokenizer(prompt_vocabulary()), TEXT_CFG, UNET_CFG, VAE_CFG,
                     ModelInfo(flow="rectified_flow", default_steps=32, source="preset:digits"))
    vae_info = train_vae(pipe.vae, config, seed + 3, progress)
    pipe.vae.register_to_config(scaling_factor=vae_info["scaling_factor"])
    text_info = train_text_encoder(pipe, config, seed + 4, progress)
    return Built(pipe.eval(), {"vae_training": vae_info, "text_encoder_training": text_info})


def _images(split: str, seed: int, with_labels: bool = False):
    """All images of a digits split as one (N, 3, 32, 32) tensor [and their labels]."""
    import torch

    from ..data import digits_dataset

    ds = digits_dataset(split, seed)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    return (x, torch.tensor(ds.labels)) if with_labels else x


def psnr(reference, estimate) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole set's mean squared error."""
    from ..parity import psnr as _psnr

    return _psnr(reference, estimate.clamp(-1, 1), peak=2.0)


@_own_rng
def train_vae(vae, config: DigitsPresetConfig, seed: int, progress: bool = True) -> dict:
    """Train ``vae`` on the digits train split (MSE + ``kl_weight``·KL, reparameterized samples, AdamW with
    cosine decay); set nothing on it but its weights. Returns what the manifest keeps."""
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    x, xv = _images("train", config.data_seed), _images("validation", config.data_seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.vae_lr, total_steps=config.vae_steps,
                                                pct_start=0.05)
    vae.train().requires_grad_(True)
    bar = tqdm(range(config.vae_steps), desc="training the digits VAE", unit="step", disable=not progress)
    perm, pos = torch.randperm(len(x), generator=g), 0
    with Governor(_threads(config)) as governor:  # threads follow the machine's load (threads.py)
        for _ in bar:
            governor.tick()
            if pos + config.vae_batch_size > len(x):
                perm, pos = torch.randperm(len(x), generator=g), 0
            batch = x[perm[pos:pos + config.vae_batch_size]]
            pos += config.vae_batch_size
            post = vae.encode(batch).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, batch)
            loss = mse + config.kl_weight * post.kl().mean()
            if not torch.isfinite(loss):

                raise NumericsError(f"digits VAE loss is {loss.item()} at step {bar.n}", "report it with `instaflow-edge env`")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        rec_v = torch.cat([vae.decode(vae.encode(xv[i:i + 256]).latent_dist.mean).sample for i in range(0, len(xv), 256)])
    return {
        "steps": config.vae_steps,
        "batch_size": config.vae_batch_size,
        "kl_weight": config.kl_weight,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_psnr_db": round(psnr(xv, rec_v), 2),
        "latent_std_unscaled": round(float(means.std()), 4),
        "scaling_factor": float(1.0 / means.std()),
    }


def prompt_separation(pipe) -> dict:
    """How well the text encoder tells the digits apart, on the UNet's view (the whole hidden-state
    sequence, flattened): mean cosine between prompts naming the same digit in different templates, and
    between prompts naming different digits in the same template. A useful encoder has ``different``
    clearly below ``same``."""
    import torch

    from ..data import DIGIT_WORDS, PROMPT_TEMPLATES, digit_prompt

    n_t = len(PROMPT_TEMPLATES)
    prompts = [digit_prompt(d, k) for d in range(len(DIGIT_WORDS)) for k in range(n_t)]
    with torch.no_grad():
        h = pipe.text_encoder(pipe.tokenize(prompts))[0].flatten(1).double()
    h = torch.nn.functional.normalize(h - h.mean(0), dim=1)  # centred: the shared part says nothing
    cos = (h @ h.T).view(10, n_t, 10, n_t)
    eye_d, eye_t = torch.eye(10, dtype=torch.bool), torch.eye(n_t, dtype=torch.bool)
    same = cos[eye_d[:, None, :, None] & ~eye_t[None, :, None, :]].mean()
    different = cos[~eye_d[:, None, :, None] & eye_t[None, :, None, :]].mean()
    return {"same_digit_cosine": round(float(same), 4), "different_digit_cosine": round(float(different), 4)}


@_own_rng
def train_text_encoder(pipe, config: DigitsPresetConfig, seed: int, progress: bool = True) -> dict:
    """Pretrain ``pipe.text_encoder`` as the text tower of a tiny CLIP: a symmetric InfoNCE loss between
    its pooled output (the end token, projected) and a small CNN's embedding of the captioned image,
    with every same-digit pair in the batch counted as a positive (ten classes: most batches hold
    repeats). The image tower and both projections are thrown away; the text tower keeps its weights.
    Captions are drawn at random from the prompt templates each step. """
    import torch
    from torch import nn
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    from ..data import digit_prompt

    before = prompt_separation(pipe)
    if config.text_steps == 0:
        return {"steps": 0, "separation_before": before, "separation_after": before}
    t0 = time.perf_counter()
    x, y = _images("train", config.data_seed, with_labels=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    width = pipe.text_encoder.config.hidden_size
    image_tower = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * (x.shape[-1] // 8) ** 2, width),
    )
    text_proj = nn.Linear(width, width, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    te = pipe.text_encoder.train().requires_grad_(True)
    params = [*te.parameters(), *image_tower.parameters(), *text_proj.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=config.text_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.text_lr, total_steps=config.text_steps,
                                                pct_start=0.1)
    bar = tqdm(range(config.text_steps), desc="pretraining the digits text encoder (tiny CLIP)", unit="step",
               disable=not progress)
    with Governor(_threads(config)) as governor:  # threads follow the machine's load (threads.py)
        for _ in bar:
            governor.tick()
            idx = torch.randint(len(x), (config.text_batch_size,), generator=g)
            labels = y[idx]
            prompts = [digit_prompt(int(d), g) for d in labels]
            ids = pipe.tokenize(prompts)
            t = F.normalize(text_proj(te(ids).pooler_output), dim=-1)
            v = F.normalize(image_tower(x[idx]), dim=-1)
            logits = log_scale.exp().clamp(max=100) * t @ v.T
            pos = (labels[:, None] == labels[None, :]).float()
            target = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                          + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
            if not torch.isfinite(loss):

                raise NumericsError(f"digits text-encoder loss is {loss.item()} at step {bar.n}",
                                    "report it with `instaflow-edge env`")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    te.eval().requires_grad_(False)
    return {
        "steps": config.text_steps,
        "batch_size": config.text_batch_size,
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(loss.item(), 4),
        "separation_before": before,
        "separation_after": prompt_separation(pipe),
    }
