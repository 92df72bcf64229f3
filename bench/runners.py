"""The runtimes ``instaflow-edge bench`` times, each as ``() -> {stage: seconds}`` over the one-step image
(text encoder → one-step UNet → VAE decoder, a clock between the stages), and the FLOPs of each stage."""

from __future__ import annotations

import time

STAGES = ("text_encoder", "unet", "vae_decoder")


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_peak(threads: int, device: str, n: int = 2048, reps: int = 5) -> float:
    """Best fp32 (fp16 on cuda) GEMM GFLOP/s of an n×n×n matmul through torch."""
    import torch

    torch.set_num_threads(threads)
    dt = torch.float16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def torch_runner(pipe, inputs: dict, device: str, dtype, compile_: bool = False):
    import torch

    from ..components import COMPONENTS

    mods = {n: COMPONENTS[n].module(pipe).to(device, dtype) for n in STAGES}
    if compile_:
        mods = {n: torch.compile(m) for n, m in mods.items()}
    ids = torch.from_numpy(inputs["input_ids"]).to(device)
    noise = torch.from_numpy(inputs["noise"]).to(device, dtype)

    @torch.no_grad()
    def once():
        t = {}
        t0 = time.perf_counter()
        ehs = mods["text_encoder"](ids)
        _sync(device)
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = mods["unet"](noise, ehs)
        _sync(device)
        t["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mods["vae_decoder"](lat / pipe.scaling_factor)
        _sync(device)
        t["vae_decoder"] = time.perf_counter() - t0
        return t

    return once


def export_runner(export, inputs: dict):
    """One timed call of text encoder → UNet → VAE decoder of an export opened by ``runtime.open_export``
    (its own runtime: onnxruntime, OpenVINO, Core ML …), a clock between the stages."""
    calls, scale = export.calls, export.facts.scaling_factor

    def once():
        t = {}
        t0 = time.perf_counter()
        ehs = calls["text_encoder"](inputs["input_ids"])
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = calls["unet"](inputs["noise"], ehs)
        t["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        calls["vae_decoder"](lat / scale)
        t["vae_decoder"] = time.perf_counter() - t0
        return t

    return once


def whole_runner(run, inputs: dict):
    """One timed call of a whole-image run (``Export.extra_runs``: ONNX's fused generator)."""

    def once():
        t0 = time.perf_counter()
        run(inputs["input_ids"], inputs["noise"])
        return {"generator": time.perf_counter() - t0}

    return once


def count_flops(pipe, inputs: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..components import COMPONENTS

    ids, noise = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["noise"])
    flops = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            ehs = COMPONENTS["text_encoder"].module(pipe)(ids)
        flops["text_encoder"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            lat = COMPONENTS["unet"].module(pipe)(noise, ehs)
        flops["unet"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            COMPONENTS["vae_decoder"].module(pipe)(lat / pipe.scaling_factor)
        flops["vae_decoder"] = fc.get_total_flops()
    flops["end_to_end"] = sum(flops.values())
    flops["generator"] = flops["end_to_end"]
    return flops
