"""Figures for docs/scale.md, COMPUTED (counted, not measured): SD1.5 at 512² on the meta device.

    python -m instaflow_edge.train.scale_figures --json studies/results/scale_figures.json

* FLOPs: ``torch.utils.flop_counter`` counts every matmul/conv/attention kernel of a real forward pass of
  the SD1.5 UNet, text tower and VAE (meta tensors: shapes only, no memory, no time); a training step
  is counted as forward + backward of the student (backward = 2 × forward, the usual rule).
* Activations: the bytes autograd saves for backward in one UNet forward of batch 1 (a
  ``saved_tensors_hooks`` tally), with and without gradient checkpointing, in fp32 and bf16.
* Memory per GPU: fp32 master weights + grads + AdamW's two moments + fp32 EMA (16 + 4 bytes a trained
  parameter), divided by the process count under FSDP2, plus the frozen parts and activations.
* GPU-hours of the InstaFlow recipe (the model cards' stages; reflow-data at the paper's order of 3 M
  pairs) against an A100's and an H100's dense bf16 peak, at 100 % and at a stated MFU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..artifacts import write_json

A100_BF16 = 312e12  # dense bf16 tensor-core peak, FLOP/s (A100 SXM)
H100_BF16 = 989e12  # dense bf16 tensor-core peak, FLOP/s (H100 SXM)
PAPER_A100_DAYS = 199  # InstaFlow-0.9B, the paper's total

# the recipe (DESIGN.md, from the model cards): (stage, global batch, iterations)
RECIPE = [("reflow-1 (2-RF from SD1.5)", 64, 70_000), ("reflow-2", 1024, 25_000),
          ("distill L2 (guidance 1.5 teacher pairs)", 1024, 21_500), ("distill LPIPS", 1024, 18_000)]
REFLOW_PAIRS, TEACHER_STEPS = 3_000_000, 25  # pairs of the paper's order; a 25-step guided teacher (2 UNet calls a step)


def _models():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
    return unet, text, vae


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        fn()
    return int(c.get_total_flops())


def _saved_bytes(unet, dtype, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward during one forward of batch 1 (64×64 latent, 77 tokens)."""
    import torch

    unet = unet.to(dtype)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    total = [0]
    seen: set = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    x = torch.zeros(1, 4, 64, 64, device="meta", dtype=dtype, requires_grad=True)
    c = torch.zeros(1, 77, 768, device="meta", dtype=dtype)
    tau = torch.full((1,), 1000.0, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, tau, encoder_hidden_states=c, return_dict=False)
    return total[0]


def compute(mfu: float = 0.4) -> dict:
    import torch

    unet, text, vae = _models()
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    n_dec = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder", "post_quant")))
    x = torch.zeros(1, 4, 64, 64, device="meta")
    c = torch.zeros(1, 77, 768, device="meta")
    tau = torch.full((1,), 1000.0, device="meta")
    with torch.no_grad():
        f_unet = _flops(lambda: unet(x, tau, encoder_hidden_states=c, return_dict=False))
        f_text = _flops(lambda: text(torch.zeros(1, 77, dtype=torch.long, device="meta")))
        f_dec = _flops(lambda: vae.decode(x, return_dict=False))
    gib = 2 ** 30
    act = {f"{dt}_{'gc' if gc else 'no_gc'}": round(_saved_bytes(unet, getattr(torch, dt), gc) / gib, 3)
           for dt in ("float32", "bfloat16") for gc in (False, True)}
    # memory per GPU, GiB: trained state (fp32 weights, grads, Adam m and v, EMA); frozen parts in fp32,
    # as the stages load them (load_pipeline(..., dtype="float32")), replicated on every GPU
    state = n_unet * (4 + 4 + 8 + 4) / gib
    frozen_text, frozen_dec = n_text * 4 / gib, n_dec * 4 / gib
    per_gpu = {}
    for gpus in (1, 8, 16):
        sharded = state / gpus
        per_gpu[str(gpus)] = {
            "trained_state_ddp": round(state, 2), "trained_state_fsdp2": round(sharded, 2),
            "frozen_text_encoder_fp32": round(frozen_text, 2),
            "frozen_vae_decoder_fp32_lpips_only": round(frozen_dec, 2),
            "frozen_teacher_unet_fp32_recovery_only": round(n_unet * 4 / gib, 2),
        }
    # the recipe's FLOPs: a student step = 3 × forward (forward + backward); text encoding of the batch
    # (frozen, forward only); LPIPS adds a VAE decode with backward through it (3 × decode) — VGG ignored
    stages = []
    for name, batch, iters in RECIPE:
        per_image = 3 * f_unet + f_text + (3 * f_dec if "LPIPS" in name else 0)
        stages.append({"stage": name, "batch": batch, "iterations": iters, "flops": per_image * batch * iters})
    data_flops = REFLOW_PAIRS * (TEACHER_STEPS * 2 * f_unet + f_text)  # guided: 2 UNet calls a step
    stages.append({"stage": f"reflow-data ({REFLOW_PAIRS:,} pairs, {TEACHER_STEPS} guided teacher steps)",
                   "flops": data_flops})
    total = sum(s["flops"] for s in stages)
    hours = {f"{gpu}_{label}": round(total / (peak * m) / 3600, 0)
             for gpu, peak in (("A100", A100_BF16), ("H100", H100_BF16)) for label, m in (("at_peak", 1.0), (f"at_{int(mfu * 100)}pct_mfu", mfu))}
    return {
        "computed": True,
        "note": "counted FLOPs (torch.utils.flop_counter, meta tensors) and counted saved-activation bytes; "
                "not measured on a GPU. Activations are counted on the meta device, where attention runs "
                "PyTorch's math path and its probabilities are saved (an upper bound: flash / memory-efficient "
                "SDPA on a GPU saves far less); distinct views of one tensor may be counted twice",
        "params": {"unet": n_unet, "text_encoder": n_text, "vae": n_vae, "vae_decoder": n_dec},
        "forward_gflop_per_image": {"unet_64x64": round(f_unet / 1e9, 1), "text_encoder": round(f_text / 1e9, 2),
                                    "vae_decoder_512": round(f_dec / 1e9, 1)},
        "unet_activation_gib_per_sample": act,
        "memory_gib_per_gpu": per_gpu,
        "recipe": [{**s, "flops": float(f"{s['flops']:.3e}")} for s in stages],
        "total_flops": float(f"{total:.3e}"),
        "gpu_hours": hours,
        "paper_a100_hours": PAPER_A100_DAYS * 24,
        "peaks_flops": {"A100_bf16": A100_BF16, "H100_bf16": H100_BF16},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    result = compute(a.mfu)
    print(json.dumps(result, indent=2))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
