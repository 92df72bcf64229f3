"""The GPU reference script (train/gpu_reference.py): on this GPU-less machine its CPU-side parts —
options, refusals, and the FSDP2 reflow loop itself on the tiny UNet on CPU. The CUDA run is not tested
here (no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from instaflow_edge.train.gpu_reference import main


def test_refuses_without_cuda_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["-o", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "cpu"], "tiny UNet only"),
    (["--device", "cpu", "--unet", "tiny", "--steps", "2"], "at least 3"),
    (["--device", "cpu", "--unet", "tiny", "--bench-model", "m"], "GPU bench"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["-o", str(tmp_path / "r.json"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_fsdp2_reflow_part_runs_on_cpu_with_the_tiny_unet(tmp_path, capsys):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "instaflow_edge.train.gpu_reference", "-o", str(out), "--device", "cpu",
                        "--unet", "tiny", "--steps", "4", "--batch-size", "4"], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": str(_port())})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["fsdp2_reflow"]
    assert r["sharding"] == "fsdp2" and r["fsdp_units"] > 2 and r["steps"] == 4 and r["mixed_precision"] == "bf16"
    assert r["seconds_per_step_median"] > 0 and r["unet"] == "tiny" and "bench" not in json.loads(out.read_text())
    assert main(["-o", str(out), "--device", "cpu", "--unet", "tiny"]) == 2  # an existing output needs --force
    assert "pass --force" in capsys.readouterr().err


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
