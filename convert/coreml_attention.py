"""Apple's split-einsum attention (ml-stable-diffusion ``ATTENTION_IMPLEMENTATION_IN_EFFECT = SPLIT_EINSUM``)
as a diffusers attention processor, for the Neural Engine.

The ANE prefers 4-D channels-first tensors ``(B, C, 1, S)`` and small per-head einsums over one big
batched matmul with heads folded into the batch (the reshape/transpose dance of the standard
processors costs memory copies on the ANE). So, per head ``h`` with ``d = C / heads`` channels:

    q_h: (B, d, 1, Sq)   k_h: (B, Sk, 1, d)   v_h: (B, d, 1, Sk)
    w_h = softmax_k(einsum("bchq,bkhc->bkhq", q_h, k_h) · d^-½)      (B, Sk, 1, Sq)
    o_h = einsum("bkhq,bchk->bchq", w_h, v_h)                        (B, d, 1, Sq)
    out = concat_h(o_h) over channels                                 (B, C, 1, Sq)

which is the same function as ``softmax(QKᵀ/√d)V``, computed in the order Apple's converter emits
(equal to the original to fp32 rounding; tests check it). The q/k/v/out projections stay ``nn.Linear``
so compression (palettization, pruning) applies to them unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ModelError
from .config import CoreMLAttention

_ORIGINAL = "use --attention original"


class SplitEinsumAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` on the UNet's transformer attention (self and cross)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise ModelError("split-einsum attention: this UNet passes an attention mask, which the SD UNet does not", _ORIGINAL)
        if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise ModelError("split-einsum attention: this UNet has spatial/q/k norms, which the SD UNet does not", _ORIGINAL)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        # (B, S, C) → channels-first (B, C, 1, S), the ANE's layout
        q = attn.to_q(hidden_states).transpose(1, 2).unsqueeze(2)
        k = attn.to_k(context).transpose(1, 2).unsqueeze(2)
        v = attn.to_v(context).transpose(1, 2).unsqueeze(2)
        out = split_einsum_attention(q, k, v, attn.heads, attn.scale)  # (B, C, 1, Sq)
        hidden_states = out.squeeze(2).transpose(1, 2)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def split_einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """``q`` (B, C, 1, Sq), ``k``/``v`` (B, C, 1, Sk) → (B, C, 1, Sq), one einsum pair per head."""
    d = q.shape[1] // heads
    kt = k.transpose(1, 3)  # (B, Sk, 1, C)
    outs = []
    for i in range(heads):
        qh = q[:, i * d:(i + 1) * d]  # (B, d, 1, Sq)
        kh = kt[:, :, :, i * d:(i + 1) * d]  # (B, Sk, 1, d)
        vh = v[:, i * d:(i + 1) * d]  # (B, d, 1, Sk)
        w = torch.einsum("bchq,bkhc->bkhq", qh, kh) * scale  # (B, Sk, 1, Sq)
        w = w.softmax(dim=1)
        outs.append(torch.einsum("bkhq,bchk->bchq", w, vh))  # (B, d, 1, Sq)
    return torch.cat(outs, dim=1)


@contextlib.contextmanager
def attention_implementation(unet, name: CoreMLAttention | str):
    """Within the block, ``unet``'s attention uses ``name`` (``original`` | ``split-einsum``); the
    processors it had are restored afterwards, so the caller's model is left as it was. A UNet without
    diffusers' attention processors cannot take split-einsum: that is an error, not a silent original."""
    name = CoreMLAttention(name)
    if name is CoreMLAttention.original:
        yield unet
        return
    if not hasattr(unet, "set_attn_processor"):
        raise ModelError(f"--attention split-einsum needs a diffusers UNet with attention processors; this one is a "
                         f"{type(unet).__name__}", _ORIGINAL)
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(SplitEinsumAttnProcessor())
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)
