"""Parameters and counted MACs per image of every pruning and tiny decoder, at digits and SD1.5 scale.

The models are built from their diffusers configs with random weights: digits on the CPU (a real forward
pass, as ``prune``'s manifest counts it), sd15 on the ``meta`` device (no weights, no arithmetic):
``torch.utils.flop_counter`` still sees every matmul, convolution and attention kernel the forward pass
dispatches, so the MACs are counted, not estimated, and the sd15 figures cost a second, not minutes.
The configs are the ones ``prune`` writes (``plan_blocks`` / ``plan_channels``) and ``train decoder``
builds (``tiny_vae_config``)::

    python -m studies.prune_macs --digits runs/digits-demo/instaflow --sd15 runs/sd15 \\
        --json studies/results/prune_macs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _unet(cfg: dict, device: str):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(cfg)


def _latent(model: Path) -> tuple[int, int, int]:
    u = json.loads((model / "unet" / "config.json").read_text())
    v = json.loads((model / "vae" / "config.json").read_text())
    s = u["sample_size"]
    s = s[0] if isinstance(s, list) else s
    return (u["in_channels"], s, s), 2 ** (len(v["block_out_channels"]) - 1)


def scale(model: Path, decoder_channels, decoder_blocks, device: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from instaflow_edge.train.decoder import tiny_vae_config
    from instaflow_edge.train.macs import decoder_macs, unet_macs
    from instaflow_edge.train.prune import BlockVariant, plan_blocks, plan_channels

    cfg = json.loads((model / "unet" / "config.json").read_text())
    shape, factor = _latent(model)
    plans = {"unpruned": cfg}
    for v in BlockVariant:
        try:
            plans[f"blocks {v.value}"] = plan_blocks(cfg, v)
        except Exception as e:  # noqa: BLE001  (a variant the model cannot take: recorded, not counted)
            plans[f"blocks {v.value}"] = str(e)
    for r in (0.25, 0.5):
        try:
            plans[f"channels {r:g}"] = plan_channels(cfg, r)
        except Exception as e:  # noqa: BLE001
            plans[f"channels {r:g}"] = str(e)
    mid = plans.get("blocks mid")
    if isinstance(mid, dict):
        try:
            plans["blocks mid + channels 0.5"] = plan_channels({**mid, "mid_block_type": None}, 0.5)
        except Exception as e:  # noqa: BLE001
            plans["blocks mid + channels 0.5"] = str(e)
    small = plans.get("blocks small")
    if isinstance(small, dict):
        plans["blocks small + channels 0.25"] = plan_channels(small, 0.25)
    unets = {}
    for name, p in plans.items():
        if isinstance(p, str):
            unets[name] = {"refused": p}
            continue
        u = _unet(p, device)
        unets[name] = {"params": sum(t.numel() for t in u.parameters()), "macs": unet_macs(u, shape),
                       "layers_per_block": p["layers_per_block"], "mid_block_type": p.get("mid_block_type"),
                       "block_out_channels": list(p["block_out_channels"])}
    base = unets["unpruned"]["macs"]
    for v in unets.values():
        if "macs" in v:
            v["macs_reduction"] = round(1 - v["macs"] / base, 4)

    vcfg = json.loads((model / "vae" / "config.json").read_text())
    with torch.device(device):
        full = AutoencoderKL.from_config(vcfg)
        tcfg = tiny_vae_config(vcfg, factor, decoder_channels, decoder_blocks)
        tiny = AutoencoderTiny(**tcfg)
    dec_full, dec_tiny = decoder_macs(full, shape), decoder_macs(tiny, shape)
    decoders = {
        "AutoencoderKL": {"params": sum(t.numel() for t in full.decoder.parameters()) + sum(t.numel() for t in full.post_quant_conv.parameters()),
                          "macs": dec_full},
        "AutoencoderTiny": {"params": sum(t.numel() for t in tiny.decoder.parameters()), "macs": dec_tiny,
                            "channels": tcfg["decoder_block_out_channels"], "blocks": tcfg["num_decoder_blocks"]},
        "macs_ratio": round(dec_full / dec_tiny, 2),
    }
    best = min((v["macs"] for k, v in unets.items() if k.startswith("blocks") and "macs" in v and "+" not in k), default=base)
    return {"model": str(model), "device": device, "latent_shape": list(shape), "unet": unets, "decoder": decoders,
            "one_step_image_macs": {"unpruned_full_decoder": base + dec_full,
                                    "best_blocks_tiny_decoder": best + dec_tiny,
                                    "ratio": round((base + dec_full) / (best + dec_tiny), 2),
                                    "note": "UNet + VAE decoder; the text encoder is left out of both"}}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", default="runs/digits-demo/instaflow")
    ap.add_argument("--sd15", default="runs/sd15")
    ap.add_argument("--json", default="studies/results/prune_macs.json")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "counting": "torch.utils.flop_counter, MACs = FLOPs / 2; digits on the CPU (a real "
              "forward, as prune's manifest counts), sd15 on the meta device (no arithmetic; attention is dispatched "
              "as its math decomposition there, a few % off the CPU's count on attention-heavy models)",
              "digits": scale(Path(args.digits), [8, 8, 8], [1, 1, 1], "cpu"),
              "sd15": scale(Path(args.sd15), None, None, "meta")}
    save_result(args.json, "prune_macs", result)
    for name in ("digits", "sd15"):
        r = result[name]
        print(f"## {name} (latent {r['latent_shape']})")
        print("| UNet | params | MACs/image | fewer MACs |\n|---|---:|---:|---:|")
        for k, v in r["unet"].items():
            if "macs" in v:
                print(f"| {k} | {v['params']:,} | {v['macs'] / 1e9:.3f} G | {100 * v['macs_reduction']:.1f}% |")
            else:
                print(f"| {k} | refused: {v['refused'][:60]}… | | |")
        d = r["decoder"]
        print(f"decoder: AutoencoderKL {d['AutoencoderKL']['macs'] / 1e9:.3f} G vs AutoencoderTiny "
              f"{d['AutoencoderTiny']['macs'] / 1e9:.3f} G ({d['macs_ratio']}× fewer); one-step image "
              f"{r['one_step_image_macs']['ratio']}× fewer MACs (best blocks + tiny decoder)\n")
    return result


if __name__ == "__main__":
    main()
