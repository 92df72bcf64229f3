"""The GPU reference run, in one command on a machine with one CUDA GPU:

    python -m instaflow_edge.train.gpu_reference -o gpu_reference.json [--bench-model PIPELINE]

1. (with ``--bench-model``) ``instaflow-edge bench PIPELINE --device cuda`` — the one-step latency of the
   torch reference on the GPU (its own JSON, embedded in ours);
2. ``--steps`` (20) FSDP2 bf16 steps of SD1.5 reflow at 512² — the engine's own loop (``fit``), the SD1.5
   UNet (random weights, 859.5 M parameters), synthetic (z, x1) pairs at 64×64×4 and 77×768 text
   embeddings, one process on a 1-GPU FSDP2 mesh — reporting seconds a step (median of the steps after
   the first two), samples a second and peak GPU memory.

It prints the result as JSON and writes it to ``-o``. Without CUDA it refuses in one line. ``--device cpu
--unet tiny`` runs part 2 on the tiny UNet on a CPU: that is how the tests check everything but CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DeviceError, InputError
from .config import TrainConfig
from .engine import fit, make_accelerator
from .objectives import RectifiedFlowObjective

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.x's UNet
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m instaflow_edge.train.gpu_reference",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="the JSON result to write")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch of a reflow step")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--bench-model", default=None, help="a pipeline folder for `bench --device cuda` (skipped if absent)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--unet", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    if a.steps < 3:
        raise InputError(f"--steps must be at least 3, got {a.steps}", "the first two steps warm up: pass --steps 20")
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {a.batch_size}", "pass --batch-size 8")
    if a.output.exists() and not a.force:
        raise InputError(f"{a.output} exists", "pass --force to overwrite it")
    if a.device == "cpu" and a.unet != "tiny":
        raise InputError("--device cpu runs the tiny UNet only (SD1.5 at 512² is a GPU job)", "pass --unet tiny")
    if a.device == "cpu" and a.bench_model:
        raise InputError("--bench-model is the GPU bench (bench --device cuda)", "drop --bench-model with --device cpu")
    return a


def check_cuda(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("the GPU reference needs a CUDA GPU and torch.cuda.is_available() is False here",
                          "run it on a machine with a CUDA GPU and a CUDA build of torch")


class _Synthetic:
    """Fixed random (z, x1, text embedding) triples: the reflow objective's inputs at SD1.5's shapes."""

    def __init__(self, n: int, latent: tuple, cond: tuple):
        import torch

        g = torch.Generator().manual_seed(0)
        self.z, self.x1 = torch.randn(n, *latent, generator=g), torch.randn(n, *latent, generator=g)
        self.cond = torch.randn(n, *cond, generator=g)

    def __len__(self) -> int:
        return len(self.z)

    def get(self, indices, rnd, device) -> dict:
        return {"z": self.z[indices].to(device), "x1": self.x1[indices].to(device), "cond": self.cond[indices].to(device)}


class _Timed:
    """The RF objective, timing each optimizer step (synchronising the GPU) and noting peak memory."""

    def __init__(self, device):
        self.inner, self.device, self.marks = RectifiedFlowObjective(), device, []

    def __call__(self, model, batch, rnd):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        return self.inner(model, batch, rnd)


def fsdp2_reflow(a: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(output=str(Path(tmp) / "out"), max_steps=a.steps, batch_size=a.batch_size,
                             warmup_steps=1, checkpoint_every=0, log_every=a.steps, ema_decay=0.999,
                             mixed_precision="bf16", sharding="fsdp2", gradient_checkpointing=a.gradient_checkpointing,
                             cpu=a.device == "cpu", progress=False, threads=torch.get_num_threads())
        acc = make_accelerator(config)
        if not dist.is_initialized():  # one process: FSDP2 still needs a process group (a 1-device mesh)
            dist.init_process_group("nccl" if a.device == "cuda" else "gloo", rank=0, world_size=1)
        spec = SD15_UNET if a.unet == "sd15" else TINY_UNET
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec).to(acc.device)
        params = sum(p.numel() for p in unet.parameters())
        side = unet.config.sample_size
        source = _Synthetic(max(a.batch_size * 2, 16), (4, side, side), (77, unet.config.cross_attention_dim))
        timed = _Timed(acc.device)
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, result = fit(config, acc, unet, source, timed, describe="gpu reference")
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        marks = [*timed.marks, end]
        per_step = [b - x for x, b in zip(marks, marks[1:])][2:]  # after two warm-up steps
        out = {"unet": a.unet, "unet_params": params, "latent": [4, side, side], "steps": result.step,
               "global_batch": a.batch_size, "sharding": result.sharding, "fsdp_units": result.fsdp_units,
               "mixed_precision": "bf16", "gradient_checkpointing": a.gradient_checkpointing,
               "seconds_per_step_median": round(statistics.median(per_step), 4),
               "seconds_per_step_p90": round(sorted(per_step)[int(0.9 * (len(per_step) - 1))], 4),
               "samples_per_second": round(a.batch_size / statistics.median(per_step), 2),
               "final_loss": result.final_loss, "device": str(acc.device)}
        if acc.device.type == "cuda":
            out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["gpu"] = torch.cuda.get_device_name()
        dist.destroy_process_group()
        return out


def bench(model: str, tmp: Path) -> dict:
    out = tmp / "bench.json"
    cmd = [sys.executable, "-m", "instaflow_edge.cli", "bench", model, "--device", "cuda", "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else "failed"}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse(argv)
        check_cuda(a.device)
        result: dict = {"kind": "gpu-reference"}
        if a.bench_model:
            with tempfile.TemporaryDirectory() as tmp:
                result["bench"] = bench(a.bench_model, Path(tmp))
        result["fsdp2_reflow"] = fsdp2_reflow(a)
    except (InputError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
