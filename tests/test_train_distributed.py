"""Two processes (`accelerate launch`, gloo on CPU) train the same weights as one process with the same
global batch, and only the main process writes files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_teacher import make_image_folder, run

# Loaded into every launched process (PYTHONPATH): records each file-system write under AUDIT_ROOT,
# per rank, so the test can tell which process wrote what (safetensors writes from Rust, but into a
# folder made by tempfile.mkdtemp and renamed with os.replace, both recorded here).
SITECUSTOMIZE = r'''
import builtins, os, shutil, tempfile
_root = os.environ.get("AUDIT_ROOT")
if _root:
    _open, _rank = builtins.open, os.environ.get("RANK", "0")
    _log = os.path.join(os.environ["AUDIT_LOG_DIR"], "rank%s.txt" % _rank)
    def _note(what, path):
        p = os.path.abspath(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if isinstance(p, str) and p.startswith(_root):
            with _open(_log, "a") as f:
                f.write("%s %s\n" % (what, p))
    def _wrap(mod, name, what, write_if=None):
        real = getattr(mod, name)
        def w(*a, **k):
            if a and (write_if is None or write_if(a, k)):
                _note(what, a[0])
            return real(*a, **k)
        setattr(mod, name, w)
    _writes = lambda a, k: any(c in (a[1] if len(a) > 1 else k.get("mode", "r")) for c in "wax+")
    _wrap(builtins, "open", "open", _writes)
    _wrap(os, "replace", "replace"); _wrap(os, "rename", "rename"); _wrap(os, "mkdir", "mkdir")
    _wrap(os, "unlink", "unlink"); _wrap(os, "remove", "remove"); _wrap(shutil, "rmtree", "rmtree")
    _real_mkdtemp = tempfile.mkdtemp
    def _mkdtemp(*a, **k):
        d = _real_mkdtemp(*a, **k); _note("mkdtemp", d); return d
    tempfile.mkdtemp = _mkdtemp
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unet(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(one: dict, two: dict, init: dict) -> None:
    """Equal to float rounding. The exception is biases whose true gradient is 0 (a conv bias right
    before a one-channel-per-group GroupNorm): their gradient is pure rounding noise, which Adam
    normalises to steps of up to ±lr, so there two runs may differ by up to lr per step (lr = 1e-3
    here). They are < 1% of the weights and do not change the function (see _assert_same_function)."""
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 1e-3, moved  # training did change the weights
    assert (diff > 1e-5).float().mean().item() < 0.01, (diff > 1e-5).float().mean().item()
    assert diff.max().item() < 3e-3, diff.max().item()


def _assert_same_function(a: Path, b: Path) -> None:
    from instaflow_edge.pipeline import load_pipeline

    ua, ub = load_pipeline(a).unet, load_pipeline(b).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1000.0, 700.0, 300.0, 10.0])
    c = torch.randn(4, 77, ua.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        va, vb = ua(x, t, encoder_hidden_states=c).sample, ub(x, t, encoder_hidden_states=c).sample
    rel = ((va - vb).abs().max() / va.abs().max()).item()
    assert rel < 1e-4, rel  # Adam turns rounding-level gradient differences into ~1e-5 relative ones


def test_two_processes_match_one_and_only_main_writes(tmp_path, tiny_dir):
    images = make_image_folder(tmp_path / "imgs", n=12)
    train = ["--data", images, "--max-steps", 3, "--batch-size", 8, "--warmup-steps", 1, "--checkpoint-every", 2,
             "--ema-decay", 0.5, "--no-progress", "--cpu"]

    r = run("train", "teacher", tiny_dir, "-o", tmp_path / "one", *train)
    assert r.exit_code == 0, r.output

    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")]),
           "AUDIT_ROOT": str(runs), "AUDIT_LOG_DIR": str(audit), "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "instaflow_edge.cli", "train", "teacher", str(tiny_dir), "-o", str(runs / "two"), *map(str, train)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    m = json.loads((runs / "two" / "manifest.json").read_text())
    assert m["training"]["num_processes"] == 2 and m["training"]["distributed_type"] == "MULTI_CPU"
    _assert_same_weights(_unet(tmp_path / "one"), _unet(runs / "two"), _unet(tiny_dir))
    _assert_same_function(tmp_path / "one", runs / "two")
    # the raw weights and the data order in the last checkpoint agree too; every rank's RNG was kept
    from instaflow_edge.train.checkpoint import load_checkpoint

    c1 = load_checkpoint(tmp_path / "one.train" / "checkpoint-0000003")
    c2 = load_checkpoint(runs / "two.train" / "checkpoint-0000003")
    _assert_same_weights(c1["model"], c2["model"], _unet(tiny_dir))
    assert c1["trainer"]["data"] == c2["trainer"]["data"] and len(c2["rng"]) == 2 and len(c1["rng"]) == 1
    lines = (runs / "two.train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3]  # written once, not once per process

    main_writes = (audit / "rank0.txt").read_text() if (audit / "rank0.txt").exists() else ""
    other_writes = (audit / "rank1.txt").read_text() if (audit / "rank1.txt").exists() else ""
    assert "model.safetensors" in main_writes or "checkpoint-0000002" in main_writes, main_writes[:2000]
    assert other_writes == "", other_writes[:2000]


@pytest.mark.parametrize("name,kind,nodes", [("ddp-8gpu.yaml", "MULTI_GPU", 1), ("fsdp-8gpu.yaml", "FSDP", 1),
                                             ("ddp-2x8gpu.yaml", "MULTI_GPU", 2), ("fsdp-2x8gpu.yaml", "FSDP", 2)])
def test_shipped_accelerate_configs_parse(name, kind, nodes, monkeypatch):
    """The shipped multi-GPU configs (1 node × 8 GPUs, 2 nodes × 8 GPUs; DDP and FSDP2) are valid accelerate
    configs and launch 8 processes per node (running them needs the GPUs; here accelerate's own launcher
    turns them into the environment it would start with, and the FSDP ones into the FSDP2 request the
    engine reads)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env

    from instaflow_edge.train.sharding import DEFAULT_BLOCKS, requested

    path = Path(__file__).resolve().parents[1] / "train" / "configs" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 * nodes and args.num_machines == nodes
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (env.get("ACCELERATE_USE_FSDP") == "true") == (kind == "FSDP")
    spec = requested("none", {**env, "LOCAL_WORLD_SIZE": "8"})  # what torchrun sets on each node
    if kind == "FSDP":
        assert spec.shard_group == (8 if nodes > 1 else None)  # 2 nodes: HSDP, sharded within a node
        assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
        assert spec.blocks == DEFAULT_BLOCKS and spec.reshard_after_forward and spec.source == "accelerate"
        # and accelerate's own FSDP plugin (what Accelerator() builds on the GPUs) accepts that environment
        from accelerate.utils import FullyShardedDataParallelPlugin

        for k, v in env.items():
            if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
                monkeypatch.setenv(k, v)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == list(DEFAULT_BLOCKS)
    else:
        assert spec is None
    if nodes > 1:
        assert args.main_process_ip and args.machine_rank == 0
