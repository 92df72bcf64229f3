"""``instaflow-edge env``: versions and hardware, for bug reports (as ``accelerate env`` does)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .artifacts import package_versions

REPORTED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "coremltools",
            "accelerate", "neural-compressor", "openvino", "nncf", "numpy", "safetensors", "scikit-learn")


# the CPU features that decide which kernels a runtime can use (bf16 and int8 matrix units)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_info() -> dict:
    """The CPU's model name and its matrix-relevant flags, from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name" and "model" not in out:
            out["model"] = val.strip()
        elif key.strip() == "flags" and "flags" not in out:
            have = set(val.split())
            out["flags"] = [f for f in CPU_FLAGS if f in have]
    return out


def collect() -> dict:
    """Versions (from package metadata: nothing heavy is imported but torch) and CPU/GPU info."""
    info: dict = {"versions": package_versions(REPORTED)}
    info["platform"] = platform.platform()
    info["cpu"] = {"machine": platform.machine(), "processor": platform.processor() or None, "logical_cores": os.cpu_count(),
                   **cpu_info()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gib"] = None
    gpus = []
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_version"] = torch.version.cuda
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
        info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except ImportError:
        info["cuda_available"] = False
    info["gpus"] = gpus
    return info


def format_text(info: dict) -> str:
    lines = [f"- {k}: {v if v is not None else 'not installed'}" for k, v in info["versions"].items()]
    lines.append(f"- platform: {info['platform']}")
    cpu = info["cpu"]
    lines.append(f"- cpu: {cpu.get('model') or cpu['machine']}, {cpu['logical_cores']} logical cores"
                 + (f", {cpu['processor']}" if cpu["processor"] else "")
                 + (f"; {' '.join(cpu['flags'])}" if cpu.get("flags") else ""))
    lines.append(f"- memory: {info['memory_gib']} GiB")
    if "torch_threads" in info:
        lines.append(f"- torch threads: {info['torch_threads']}")
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"- gpu {g['index']}: {g['name']} ({g['memory_gib']} GiB), CUDA {info.get('cuda_version')}")
    else:
        lines.append("- gpu: none (CUDA not available)")
    return "\n".join(lines)
