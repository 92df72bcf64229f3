"""Counted multiply-accumulates of a forward pass (not estimated from shapes by hand).

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of every matmul, convolution and attention
kernel that a real forward pass dispatches (elementwise work — norms, activations, adds — is not
counted, as in fvcore and the papers' MAC figures); MACs = FLOPs / 2.
"""

from __future__ import annotations


def count_macs(fn, *args, **kwargs) -> int:
    """MACs of ``fn(*args, **kwargs)`` (one call, under no_grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def unet_macs(unet, latent_shape: tuple[int, int, int], text_len: int = 77) -> int:
    """MACs of one UNet call on one image: latent (C, h, w), a text embedding of ``text_len`` tokens."""
    import torch

    p = next(unet.parameters())
    x = torch.zeros(1, *latent_shape, dtype=p.dtype, device=p.device)
    cond = torch.zeros(1, text_len, unet.config.cross_attention_dim, dtype=p.dtype, device=p.device)
    tau = torch.full((1,), 1000.0, device=p.device)
    return count_macs(lambda: unet(x, tau, encoder_hidden_states=cond, return_dict=False))


def decoder_macs(vae, latent_shape: tuple[int, int, int]) -> int:
    """MACs of one VAE decode of one latent (C, h, w) (AutoencoderKL: post_quant_conv + decoder)."""
    import torch

    p = next(vae.parameters())
    x = torch.zeros(1, *latent_shape, dtype=p.dtype, device=p.device)
    return count_macs(lambda: vae.decode(x, return_dict=False))
