"""FSDP2 in the engine, proven in two CPU processes (gloo, an explicit CPU mesh): it trains the weights
and the EMA one process trains with the same global batch, gradients are averaged (not summed), a rank
killed with SIGKILL mid-step or mid-checkpoint resumes to the weights of an uninterrupted run, and a
checkpoint written by two processes resumes in one
(and one written by one process in two).

The two-process runs start this file as a script under ``torch.distributed.run`` (see ``worker``), so
nothing passes through accelerate's FSDP config, which on CPU silently runs DDP: each run reports that
its weights were DTensor shards and how many FSDP units it had.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS, EVERY = 6, 2


def base_config(out: Path, **kw) -> dict:
    c = dict(output=str(out), max_steps=STEPS, batch_size=8, learning_rate=1e-3, warmup_steps=2,
             checkpoint_every=EVERY, keep_checkpoints=5, log_every=1, progress=False, ema_decay=0.9, threads=1)
    c.update(kw)
    return c


# ---------------------------------------------------------------------------------------------------
# the worker: one process of a two-process run


def worker(spec: dict) -> None:
    """Train the engine's tiny UNet on the synthetic source with ``spec["config"]``; ``spec["kill"]``
    (optional) SIGKILLs rank ``rank`` when objective call ``call`` starts (mid-step) or when checkpoint
    number ``checkpoint`` starts writing its shards (mid-checkpoint)."""
    from safetensors.torch import save_file
    from test_train_engine import SyntheticSource, tiny_unet
    from torch.distributed.tensor import DTensor

    from instaflow_edge.train import sharding
    from instaflow_edge.train.config import TrainConfig
    from instaflow_edge.train.engine import fit, make_accelerator
    from instaflow_edge.train.objectives import RectifiedFlowObjective

    torch.set_num_threads(1)
    config = TrainConfig(**spec["config"])
    acc = make_accelerator(config)
    rank = acc.process_index
    kill = spec.get("kill") or {}
    objective = RectifiedFlowObjective()
    seen = {"calls": 0, "dtensor": None, "local_numel": 0, "numel": 0}

    def wrapped(model, batch, rnd):
        seen["calls"] += 1
        if seen["dtensor"] is None:
            ps = list(model.parameters())
            seen["dtensor"] = all(isinstance(p, DTensor) for p in ps)
            seen["local_numel"] = sum(sharding.local(p).numel() for p in ps)
            seen["numel"] = sum(p.numel() for p in ps)
        if kill.get("rank") == rank and kill.get("call") == seen["calls"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return objective(model, batch, rnd)

    if "checkpoint" in kill and kill["rank"] == rank:
        real, count = sharding.save_dcp, [0]

        def dying_save(folder, *a, **k):
            count[0] += 1
            if count[0] == kill["checkpoint"]:
                (folder / "partial").mkdir(parents=True, exist_ok=True)  # something half-written
                os.kill(os.getpid(), signal.SIGKILL)
            return real(folder, *a, **k)

        sharding.save_dcp = dying_save
    model, result = fit(config, acc, tiny_unet(), SyntheticSource(), wrapped)
    if acc.is_main_process:
        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        (out / "report.json").write_text(json.dumps({
            "sharding": result.sharding, "fsdp_units": result.fsdp_units, "step": result.step,
            "resumed_from": result.resumed_from, "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type).split(".")[-1], "world": torch.distributed.get_world_size(),
            **seen}))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, spec: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Two processes under torch.distributed.run, on CPU (no GPU visible to them)."""
    spec_file = tmp_path / f"spec-{_free_port()}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "test_train_fsdp.py"), str(spec_file)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    else:
        assert p.returncode != 0, "the killed run exited 0"
    return p


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "weights.safetensors"))


def report(out: Path) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def metrics(work: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(work) / "metrics.jsonl").read_text().splitlines()]


def dcp_weights(checkpoint: Path) -> tuple[dict, dict]:
    """The raw weights and the EMA of a sharded checkpoint, read whole in this (one) process."""
    import torch.distributed.checkpoint as dcp
    from test_train_engine import tiny_unet

    model = tiny_unet()
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
             "ema": {k: torch.zeros_like(p) for k, p in model.named_parameters()}}
    dcp.load(state, checkpoint_id=str(checkpoint / "dcp"))
    return state["model"], state["ema"]


def assert_close(a: dict, b: dict, init: dict | None = None, *, exact: bool = False) -> None:
    """Equal bit for bit (``exact``), or to float rounding: the test_train_distributed criterion (Adam
    turns rounding-level gradient differences of biases whose true gradient is 0 into steps of up to lr;
    < 1% of the weights may differ by more than 1e-5, none by more than 3e-3)."""
    assert a.keys() == b.keys()
    if exact:
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, (len(bad), bad[:3], max((a[k] - b[k]).abs().max().item() for k in bad))
        return
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    if init is not None:
        assert max((a[k] - init[k]).abs().max().item() for k in init if k in a) > 1e-3  # training moved them
    assert (diff > 1e-5).float().mean().item() < 0.01, (diff > 1e-5).float().mean().item()
    assert diff.max().item() < 3e-3, diff.max().item()


def one_process(out: Path, **kw):
    from test_train_engine import SyntheticSource, tiny_unet

    from instaflow_edge.train.config import TrainConfig
    from instaflow_edge.train.engine import fit, make_accelerator
    from instaflow_edge.train.objectives import RectifiedFlowObjective

    config = TrainConfig(**base_config(out, **kw))
    return fit(config, make_accelerator(config), tiny_unet(), SyntheticSource(), RectifiedFlowObjective())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-process FSDP2 run: 6 steps, checkpoints at 2, 4, 6."""
    root = tmp_path_factory.mktemp("fsdp-straight")
    launch(root, {"config": base_config(root / "out", sharding="fsdp2")})
    return root / "out"


# ---------------------------------------------------------------------------------------------------
# the tests


def test_fsdp2_two_processes_train_what_one_process_trains(tmp_path, straight):
    from test_train_engine import tiny_unet

    r = report(straight)
    # FSDP really ran: the engine's own fully_shard (accelerate itself says MULTI_CPU), DTensor weights
    # of which each rank holds about half, one unit per ResNet/transformer block plus the root
    assert r["sharding"] == "fsdp2" and r["world"] == 2 and r["distributed_type"] == "MULTI_CPU"
    assert r["dtensor"] is True and r["local_numel"] < 0.6 * r["numel"], r
    n_blocks = sum(type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock") for m in tiny_unet().modules())
    assert r["fsdp_units"] == n_blocks + 1 and n_blocks >= 4

    model, res = one_process(tmp_path / "one")
    assert res.sharding == "none"
    init = tiny_unet().state_dict()
    one = {k: v.detach() for k, v in model.state_dict().items()}
    assert_close(one, weights(straight), init)  # the EMA weights (what the recipe saves)
    # raw weights and EMA in the last checkpoint, read whole from the two ranks' shards
    from instaflow_edge.train import checkpoint as ckpt

    raw2, ema2 = dcp_weights(straight.with_name("out.train") / "checkpoint-0000006")
    c1 = ckpt.load_checkpoint(tmp_path / "one.train" / "checkpoint-0000006")
    assert_close(c1["model"], raw2, init)
    assert_close(c1["ema"], ema2)
    # gradients are averaged over the ranks, not summed: the pre-clip norms agree step by step (a sum
    # would double them; Adam alone would hide it, being invariant to the gradient's scale)
    g1 = [m["grad_norm"] for m in metrics(tmp_path / "one.train")]
    g2 = [m["grad_norm"] for m in metrics(straight.with_name("out.train"))]
    assert len(g1) == len(g2) == STEPS
    assert all(abs(a - b) <= 1e-4 * a for a, b in zip(g1, g2)), (g1, g2)
    assert [m["loss"] for m in metrics(tmp_path / "one.train")] == pytest.approx(
        [m["loss"] for m in metrics(straight.with_name("out.train"))], rel=1e-5)


def test_fsdp2_sigkill_mid_checkpoint_and_mid_step_resume_exactly(tmp_path, straight):
    out, work = tmp_path / "out", tmp_path / "out.train"
    from instaflow_edge.train import checkpoint as ckpt

    # rank 1 dies while writing its shard of checkpoint 2 (step 4): checkpoint 1 (step 2) stays the latest
    launch(tmp_path, {"config": base_config(out, sharding="fsdp2"), "kill": {"rank": 1, "checkpoint": 2}},
           expect_ok=False)
    assert [p.name for p in ckpt.list_checkpoints(work)] == ["checkpoint-0000002"]
    # the half-written folder is there if rank 0 was killed first, gone if it saw gloo's error first and
    # cleaned up (atomic_dir): both are fine; it is never a checkpoint-0000004
    assert not (work / "checkpoint-0000004").exists()
    # resumed, rank 1 dies in the forward pass of step 5 (objective call 3 of this run: steps 3, 4, 5)
    launch(tmp_path, {"config": base_config(out, sharding="fsdp2", resume="latest"),
                      "kill": {"rank": 1, "call": 3}}, expect_ok=False)
    assert [p.name for p in ckpt.list_checkpoints(work)] == ["checkpoint-0000002", "checkpoint-0000004"]
    assert not any(p.name.startswith(".checkpoint-") for p in work.iterdir())  # the stale one was removed
    launch(tmp_path, {"config": base_config(out, sharding="fsdp2", resume="latest")})
    r = report(out)
    assert r["resumed_from"].endswith("checkpoint-0000004") and r["step"] == STEPS and r["sharding"] == "fsdp2"
    assert_close(weights(out), weights(straight), exact=True)
    raw_a, ema_a = dcp_weights(straight.with_name("out.train") / "checkpoint-0000006")
    raw_b, ema_b = dcp_weights(work / "checkpoint-0000006")
    assert_close(raw_a, raw_b, exact=True)
    assert_close(ema_a, ema_b, exact=True)
    assert [m["loss"] for m in metrics(work)] == [m["loss"] for m in metrics(straight.with_name("out.train"))]


def test_two_process_checkpoint_resumes_in_one_process(tmp_path, straight):
    """Resharding: the FSDP2 checkpoint of step 4 (2 ranks' shards) continues in one plain process."""
    work = tmp_path / "one.train"
    work.mkdir()
    shutil.copytree(straight.with_name("out.train") / "checkpoint-0000004", work / "checkpoint-0000004")
    model, res = one_process(tmp_path / "one", resume="latest")
    assert res.resumed_from.endswith("checkpoint-0000004") and res.step == STEPS and res.sharding == "none"
    one = {k: v.detach() for k, v in model.state_dict().items()}
    assert_close(one, weights(straight))


@pytest.mark.slow  # the default suite keeps FSDP2 = 1 process, kill-and-resume and 2 -> 1 resharding
def test_one_process_checkpoint_resumes_in_two_fsdp2_processes(tmp_path, straight):
    """The other direction: a one-process (safetensors) checkpoint of step 4 continues under FSDP2 on 2
    processes, each keeping its shards of the weights, AdamW state and EMA."""
    model, _ = one_process(tmp_path / "one")
    work = tmp_path / "two.train"
    work.mkdir()
    shutil.copytree(tmp_path / "one.train" / "checkpoint-0000004", work / "checkpoint-0000004")
    launch(tmp_path, {"config": base_config(tmp_path / "two", sharding="fsdp2", resume="latest")})
    r = report(tmp_path / "two")
    assert r["resumed_from"].endswith("checkpoint-0000004") and r["sharding"] == "fsdp2" and r["step"] == STEPS
    one = {k: v.detach() for k, v in model.state_dict().items()}
    assert_close(one, weights(tmp_path / "two"))
    assert_close(weights(straight), weights(tmp_path / "two"))


@pytest.mark.slow  # the default suite keeps FSDP2 = 1 process, kill-and-resume and 2 -> 1 resharding
def test_shipped_fsdp2_config_runs_on_two_cpu_processes(tmp_path, tiny_dir):
    """`accelerate launch --config_file train/configs/fsdp-8gpu.yaml --num_processes 2` on this GPU-less
    machine: the CLI's `train teacher` shards with FSDP2 (accelerate itself reports MULTI_CPU), writes
    sharded checkpoints, and saves the weights one process trains. (`accelerate launch --cpu` would start
    ONE process: leave it out and pass the engine's --cpu.)"""
    from test_train_distributed import _assert_same_weights, _unet
    from test_train_teacher import make_image_folder, run

    images = make_image_folder(tmp_path / "imgs", n=12)
    train = ["--data", images, "--max-steps", 3, "--batch-size", 8, "--warmup-steps", 1, "--checkpoint-every", 1,
             "--keep-checkpoints", 2, "--ema-decay", 0.5, "--no-progress", "--cpu", "--threads", 1]
    r = run("train", "teacher", tiny_dir, "-o", tmp_path / "one", *train)
    assert r.exit_code == 0, r.output
    config = HERE.parent / "train" / "configs" / "fsdp-8gpu.yaml"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "instaflow_edge.cli", "train", "teacher", str(tiny_dir), "-o", str(tmp_path / "two"), *map(str, train)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    t = json.loads((tmp_path / "two" / "manifest.json").read_text())["training"]
    assert t["num_processes"] == 2 and t["sharding"] == "fsdp2" and t["fsdp_units"] > 2, t
    from instaflow_edge.train import checkpoint as ckpt

    kept = ckpt.list_checkpoints(tmp_path / "two.train")  # 3 written, --keep-checkpoints 2 kept
    assert [c.name for c in kept] == ["checkpoint-0000002", "checkpoint-0000003"] and all(map(ckpt.is_sharded, kept))
    assert not [p for p in (tmp_path / "two.train").iterdir() if p.name.startswith(".")]
    _assert_same_weights(_unet(tmp_path / "one"), _unet(tmp_path / "two"), _unet(tiny_dir))


def _accelerate_fsdp2(tmp_path: Path, args: list) -> dict:
    """``accelerate launch --config_file train/configs/fsdp-8gpu.yaml --num_processes 2 -m instaflow_edge.cli
    ARGS`` on CPU; returns the output's manifest."""
    config = HERE.parent / "train" / "configs" / "fsdp-8gpu.yaml"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "instaflow_edge.cli", *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = Path(args[args.index("-o") + 1])
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow  # ~1 min each on 2 busy cores: 1 + 2 processes of the CLI
@pytest.mark.parametrize("stage", ["reflow", "distill-recovery"])
def test_reflow_and_recovery_distill_under_fsdp2_match_one_process(tmp_path, tiny_dir, tiny_pipe, stage):
    """`train reflow` on streamed pairs (more shards than pair_shards_in_memory, set in a --config file)
    and `train distill --teacher` (a frozen teacher, replicated on every rank; BK-SDM's feature loss
    through hooks on the sharded student's blocks) under the FSDP2 config on 2 CPU processes: the weights
    of one process."""
    from test_train_distributed import _assert_same_weights, _unet
    from test_train_teacher import run

    from instaflow_edge.train.pairs_memory import PROMPTS, write_tiny_pairs

    pairs = write_tiny_pairs(tmp_path / "pairs", 60, tiny_pipe.tokenize(PROMPTS), shard_size=20)
    (tmp_path / "c.yaml").write_text("pair-shards-in-memory: 2\n")
    common = ["--pairs", pairs, "--max-steps", 3, "--batch-size", 8, "--warmup-steps", 1, "--checkpoint-every", 2,
              "--ema-decay", 0.5, "--no-progress", "--cpu", "--threads", 1, "--config", tmp_path / "c.yaml"]
    if stage == "reflow":
        args = ["train", "reflow", tiny_dir, *common]
    else:
        args = ["train", "distill", tiny_dir, "--teacher", tiny_dir, "--feature-weight", 0.5, *common]
    r = run(*args, "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    m = _accelerate_fsdp2(tmp_path, [*args, "-o", tmp_path / "two"])
    assert m["training"]["sharding"] == "fsdp2" and m["training"]["num_processes"] == 2
    assert m["data"]["num_pairs"] == 60
    _assert_same_weights(_unet(tmp_path / "one"), _unet(tmp_path / "two"), _unet(tiny_dir))


@pytest.mark.slow  # the default suite keeps FSDP2 = 1 process, kill-and-resume and 2 -> 1 resharding
def test_fsdp2_gradient_accumulation_checkpointing_and_bf16(tmp_path, straight):
    """Accumulating 2 micro-steps (gradients reduce-scattered on the last one only) with gradient
    checkpointing inside the sharded blocks trains the weights of one plain micro-step of the same global
    batch; bf16 (fp32 master shards, bf16 compute, fp32 reduction) trains."""
    launch(tmp_path, {"config": base_config(tmp_path / "acc", sharding="fsdp2", gradient_accumulation_steps=2,
                                            gradient_checkpointing=True, checkpoint_every=0)})
    assert_close(weights(tmp_path / "acc"), weights(straight))
    launch(tmp_path, {"config": base_config(tmp_path / "bf16", sharding="fsdp2", mixed_precision="bf16",
                                            checkpoint_every=0, max_steps=2)})
    r = report(tmp_path / "bf16")
    assert r["sharding"] == "fsdp2" and r["step"] == 2
    losses = [m["loss"] for m in metrics(tmp_path / "bf16.train")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16").values())  # fp32 master weights


@pytest.mark.slow  # the default suite keeps FSDP2 = 1 process, kill-and-resume and 2 -> 1 resharding
def test_hsdp_replicate_across_groups_trains_the_same_weights(tmp_path, straight):
    """HSDP (shard_group 1 on 2 processes: a (replicate 2, shard 1) mesh, the 2-node layout in miniature):
    the weights, EMA and checkpoint of plain FSDP2; its DCP checkpoint reads back whole."""
    launch(tmp_path, {"config": base_config(tmp_path / "h", sharding="fsdp2", shard_group=1)})
    r = report(tmp_path / "h")
    assert r["sharding"] == "fsdp2" and r["dtensor"] is True and r["local_numel"] == r["numel"]  # replicated
    assert_close(weights(tmp_path / "h"), weights(straight))
    g_h = [m["grad_norm"] for m in metrics(tmp_path / "h.train")]  # averaged across replicas, not summed
    g_a = [m["grad_norm"] for m in metrics(straight.with_name("out.train"))]
    assert all(abs(a - b) <= 1e-4 * a for a, b in zip(g_a, g_h)), (g_a, g_h)
    raw_a, ema_a = dcp_weights(straight.with_name("out.train") / "checkpoint-0000006")
    raw_h, ema_h = dcp_weights(tmp_path / "h.train" / "checkpoint-0000006")
    assert_close(raw_a, raw_h)
    assert_close(ema_a, ema_h)


def test_deepspeed_and_megatron_are_refused_in_one_line():
    from types import SimpleNamespace

    from instaflow_edge.errors import InputError
    from instaflow_edge.train.engine import _refuse_unsupported

    for kind in ("DEEPSPEED", "MEGATRON_LM"):
        with pytest.raises(InputError, match=f"does not train under {kind}") as e:
            _refuse_unsupported(SimpleNamespace(distributed_type=f"DistributedType.{kind}"))
        assert "fsdp-8gpu.yaml" in str(e.value) and "\n" not in str(e.value)
    _refuse_unsupported(SimpleNamespace(distributed_type="DistributedType.FSDP"))  # FSDP2: the engine's own


def test_requested_reads_the_accelerate_launch_environment():
    from instaflow_edge.errors import InputError
    from instaflow_edge.train.sharding import DEFAULT_BLOCKS, requested

    assert requested("none", {}) is None
    assert requested("fsdp2", {}).blocks == DEFAULT_BLOCKS
    spec = requested("none", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                              "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D, Transformer2DModel",
                              "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert spec.blocks == ("ResnetBlock2D", "Transformer2DModel") and not spec.reshard_after_forward
    assert spec.source == "accelerate" and spec.shard_group is None
    hybrid = requested("none", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD",
                                "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"})
    assert hybrid.shard_group == 8  # shard within a node, replicate across nodes
    assert requested("fsdp2", {}, shard_group=4).shard_group == 4
    with pytest.raises(InputError, match="FSDP version 1"):
        requested("none", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
