"""The runtimes ``instaflow-edge bench`` times, each as ``() -> {stage: seconds}`` over the one-step image
(text encoder → one-step UNet → VAE decoder, a clock between the stages), and the FLOPs of each stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def _three_stages(s: dict, scale: float, inputs: dict):
    """One timed call of text encoder → UNet → VAE decoder over sessions with ORT's ``run`` (ORT, OpenVINO)."""
    from ..runtime.onnx import unet_feed

    def once():
        t = {}
        t0 = time.perf_counter()
        ehs = s["text_encoder"].run(None, {"input_ids": inputs["input_ids"]})[0]
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = s["unet"].run(None, unet_feed(s["unet"], inputs["noise"], ehs))[0]
        t["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        s["vae_decoder"].run(None, {"latent_sample": lat / scale})
        t["vae_decoder"] = time.perf_counter() - t0
        return t

    return once


def ort_runner(folder: Path, inputs: dict, threads: int, providers: list[str]):
    from ..runtime import onnx_io

    s = {n: onnx_io.session(folder / n / onnx_io.MODEL_FILE, threads=threads, providers=providers) for n in STAGES}
    return _three_stages(s, json.loads((folder / "manifest.json").read_text())["onnx"]["scaling_factor"], inputs)


def openvino_runner(folder: Path, inputs: dict, threads: int):
    """An OpenVINO export compiled as ``generate --backend openvino`` compiles it (its precision, ``threads``)."""
    from ..runtime import openvino as ov

    meta = ov.export_meta(folder)
    s = {n: ov.compile_model(folder / n / ov.IR_FILE, meta["precision"], threads) for n in STAGES}
    return _three_stages(s, meta["scaling_factor"], inputs)


def ort_fused_runner(folder: Path, inputs: dict, threads: int, providers: list[str]):
    from ..runtime import onnx_io

    s = onnx_io.session(folder / "generator" / onnx_io.MODEL_FILE, threads=threads, providers=providers)

    def once():
        t0 = time.perf_counter()
        s.run(None, {"input_ids": inputs["input_ids"], "noise": inputs["noise"]})
        return {"generator": time.perf_counter() - t0}

    return once


def coreml_runner(folder: Path, inputs: dict):  # pragma: no cover - macOS only
    """The packages through ``MLModel.predict`` (macOS), as ``generate --backend coreml`` runs them."""
    import numpy as np

    from ..errors import require
    from ..runtime.coreml import PACKAGES, check_platform, load_folder

    check_platform()
    ct = require("coremltools", "coreml")
    manifest = load_folder(folder)
    te, unet, vae = (ct.models.MLModel(str(folder / f"{n}.mlpackage"), compute_units=ct.ComputeUnit.ALL) for n in PACKAGES)
    ids = inputs["input_ids"].astype(np.float32)
    noise = inputs["noise"]
    apple = manifest.get("layout") == "apple"
    if apple:
        sch = manifest["scheduler"]
        t_, alpha, sigma = int(sch["timestep"]), np.float32(sch["alpha"]), np.float32(sch["sigma"])
        sf = np.float32(sch["decoder_scale_factor"])
    else:
        sf = float(vae.user_defined_metadata["scaling_factor"])

    def once():
        t = {}
        t0 = time.perf_counter()
        hidden = te.predict({"input_ids": ids})["last_hidden_state"]
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if apple:
            states = np.ascontiguousarray(hidden.transpose(0, 2, 1)[:, :, None, :], dtype=np.float32)
            eps = unet.predict({"sample": noise, "timestep": np.array([t_], dtype=np.float32),
                                "encoder_hidden_states": states})["noise_pred"].astype(np.float32)
            lat = (noise - eps * sigma) / alpha
            t["unet"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            vae.predict({"z": (lat / sf).astype(np.float32)})
        else:
            lat = unet.predict({"sample": noise, "encoder_hidden_states": hidden})["out_sample"]
            t["unet"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            vae.predict({"latent_sample": lat / sf})
        t["vae_decoder"] = time.perf_counter() - t0
        return t

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
