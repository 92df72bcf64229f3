"""The training engine on a tiny UNet and synthetic data: the RF loss by hand, exact resume, atomic
checkpoints, the NaN stop, schedules, sampling streams and config files."""

from __future__ import annotations

import math

import pytest
import torch
from instaflow_edge.train import checkpoint as ckpt
from instaflow_edge.train.config import LRSchedule, TrainConfig, read_config_file
from instaflow_edge.train.engine import (
    EpochSampler,
    StepRandom,
    fit,
    lr_factor,
    make_accelerator,
)
from instaflow_edge.train.objectives import OneStepObjective, RectifiedFlowObjective

from instaflow_edge.errors import InputError, NumericsError


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    )


class SyntheticSource:
    """24 fixed latents with 3 fixed 'prompt embeddings'."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(123)
        self.x1 = torch.randn(n, 4, 4, 4, generator=g)
        self.cond = torch.randn(3, 5, 8, generator=g)
        self.label = torch.arange(n) % 3

    def __len__(self):
        return len(self.x1)

    def get(self, indices, rnd, device):
        return {"x1": self.x1[indices].to(device), "cond": self.cond[self.label[indices]].to(device)}


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output=str(tmp_path / "out"), max_steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=2,
                checkpoint_every=3, log_every=1, progress=False, ema_decay=0.9,
                threads=1)  # bit-identical reruns need a fixed thread count
    base.update(kw)
    return TrainConfig(**base)


def run(config, objective=None, seed=0):
    acc = make_accelerator(config)
    return fit(config, acc, tiny_unet(seed), SyntheticSource(), objective or RectifiedFlowObjective())


# ---------------------------------------------------------------------------------------------------
# the loss


class LinearField(torch.nn.Module):
    """v(x, τ, c) = a·x + b·τ/1000 + mean(c): simple enough to compute by hand."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))
        self.seen_tau = None

    def forward(self, x, tau, encoder_hidden_states=None, return_dict=False):
        self.seen_tau = tau.detach().clone()
        c = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (self.a * x + self.b * tau.view(-1, 1, 1, 1) / 1000 + c,)


def test_rf_loss_matches_hand_computation():
    import numpy as np

    src = SyntheticSource()
    idx = torch.tensor([0, 5, 7, 10])
    model = LinearField()
    batch = src.get(idx, None, "cpu")
    loss = RectifiedFlowObjective()(model, batch, StepRandom(7, 3, 0, 4, 4))
    # the same draws, in the same order: noise first, then s
    g = torch.Generator().manual_seed(StepRandom(7, 3, 0, 4, 4).generator.initial_seed())
    z = torch.randn(4, 4, 4, 4, generator=g).numpy()
    s = torch.rand(4, generator=g).numpy()
    x1, c = batch["x1"].numpy(), batch["cond"].numpy()
    total = 0.0
    for i in range(4):
        x_s = s[i] * x1[i] + (1 - s[i]) * z[i]
        tau = 1000 * (1 - s[i])
        v = 0.3 * x_s + (-0.7) * tau / 1000 + c[i].mean()
        total += ((v - (x1[i] - z[i])) ** 2).sum()
    expected = total / x1.size
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(model.seen_tau.numpy(), 1000 * (1 - s), rtol=1e-6)


def test_reflow_pairs_use_the_batch_noise_and_distill_is_at_s0():
    src = SyntheticSource()
    idx = torch.tensor([1, 2])
    batch = src.get(idx, None, "cpu")
    batch["z"] = torch.randn_like(batch["x1"])
    model = LinearField()
    rnd = StepRandom(0, 0, 0, 2, 2)
    loss = RectifiedFlowObjective()(model, batch, rnd)
    s = StepRandom(0, 0, 0, 2, 2).uniform()  # with z given, s is the first draw
    x_s = s.view(-1, 1, 1, 1) * batch["x1"] + (1 - s.view(-1, 1, 1, 1)) * batch["z"]
    v = model(x_s, 1000 * (1 - s), batch["cond"])[0]
    assert loss.item() == pytest.approx(torch.mean((v - (batch["x1"] - batch["z"])) ** 2).item(), rel=1e-6)

    loss0 = OneStepObjective()(model, batch, rnd)
    assert torch.all(model.seen_tau == 1000.0)
    v0 = model(batch["z"], torch.full((2,), 1000.0), batch["cond"])[0]
    assert loss0.item() == pytest.approx(torch.mean((batch["z"] + v0 - batch["x1"]) ** 2).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# schedules and streams


def test_lr_warmup_then_cosine_or_constant(tmp_path):
    c = cfg(tmp_path, max_steps=110, warmup_steps=10)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.5)
    assert lr_factor(109, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    c.lr_schedule = LRSchedule.constant
    assert lr_factor(109, c) == 1.0


def test_step_random_is_the_same_global_draw_for_any_process_count():
    whole = StepRandom(3, 5, 0, 8, 8)
    halves = [StepRandom(3, 5, off, 4, 8) for off in (0, 4)]
    assert torch.equal(torch.cat([h.normal((2, 3)) for h in halves]), whole.normal((2, 3)))
    assert torch.equal(torch.cat([h.uniform() for h in halves]), whole.uniform())
    assert not torch.equal(StepRandom(3, 6, 0, 8, 8).uniform(), StepRandom(3, 5, 0, 8, 8).uniform())


def test_epoch_sampler_covers_each_epoch_and_resumes():
    s = EpochSampler(10, seed=1)
    first = s.take(7).tolist() + s.take(3).tolist()
    assert sorted(first) == list(range(10))
    straddle = s.take(14)  # epoch 1 whole + 4 of epoch 2
    assert sorted(straddle[:10].tolist()) == list(range(10))
    state = s.state_dict()
    t = EpochSampler(10, seed=1)
    t.load_state_dict(state)
    assert torch.equal(t.take(9), s.take(9))
    with pytest.raises(InputError, match="has 11"):
        EpochSampler(11, 1).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# resume, checkpoints, NaN


class CrashAt:
    """The RF objective, but the process 'dies' when step ``n`` starts (after the checkpoint before it)."""

    def __init__(self, n: int):
        self.n, self.calls, self.inner = n, 0, RectifiedFlowObjective()

    def __call__(self, model, batch, rnd):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("simulated crash")
        return self.inner(model, batch, rnd)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_crash_gives_identical_weights(tmp_path):
    straight, res_a = run(cfg(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "b"), CrashAt(4))  # checkpoint at step 3, dies in step 4
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "out.train")] == ["checkpoint-0000003"]
    resumed, res_b = run(cfg(tmp_path / "b", resume="latest"))
    assert res_b.resumed_from.endswith("checkpoint-0000003") and res_b.step == 6
    wa, wb = _weights(straight), _weights(resumed)  # EMA weights
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    raw_a = ckpt.load_checkpoint(tmp_path / "a" / "out.train" / "checkpoint-0000006")
    raw_b = ckpt.load_checkpoint(tmp_path / "b" / "out.train" / "checkpoint-0000006")
    assert all(torch.equal(raw_a["model"][k], raw_b["model"][k]) for k in raw_a["model"])
    assert raw_a["trainer"] == {**raw_b["trainer"]}
    # the metrics log of the resumed run holds each step once, with the same losses
    import json

    log = lambda d: [json.loads(x) for x in (d / "out.train" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    la, lb = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # and training moved the weights at all
    assert not all(torch.equal(wa[k], _weights(tiny_unet())[k]) for k in wa)


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    import safetensors.torch as st

    run(cfg(tmp_path, max_steps=3))
    work = tmp_path / "out.train"
    real = st.save_file

    def dying_save(tensors, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(OSError, match="No space"):
        run(cfg(tmp_path, max_steps=6, resume="latest"))
    monkeypatch.setattr(st, "save_file", real)
    assert {p.name for p in work.iterdir()} == {"checkpoint-0000003", "metrics.jsonl"}  # temp folder removed
    # a kill -9 mid-write leaves a hidden temp folder behind: it must be ignored too
    junk = work / ".checkpoint-0000006.tmp-abc"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"junk")
    latest = ckpt.resolve_resume("latest", work)
    assert latest.name == "checkpoint-0000003"
    state = ckpt.load_checkpoint(latest)
    assert state["trainer"]["step"] == 3 and state["model"]
    _, res = run(cfg(tmp_path, max_steps=6, resume="latest"))
    assert res.step == 6 and res.resumed_from.endswith("checkpoint-0000003")


class NaNAt(CrashAt):
    def __call__(self, model, batch, rnd):
        loss = self.inner(model, batch, rnd)
        self.calls += 1
        return loss * float("nan") if self.calls == self.n else loss


def test_nan_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(NumericsError, match=r"training loss is nan at step 3 ") as e:
        run(cfg(tmp_path, checkpoint_every=0), NaNAt(3))
    assert "\n" not in str(e.value)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a, _ = run(cfg(tmp_path / "a", max_steps=3, checkpoint_every=0, ema_decay=0.0, batch_size=8))
    b, _ = run(cfg(tmp_path / "b", max_steps=3, checkpoint_every=0, ema_decay=0.0, batch_size=8,
                   gradient_accumulation_steps=2))
    wa, wb = _weights(a), _weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    model, res = run(cfg(tmp_path, max_steps=2, checkpoint_every=0, mixed_precision=precision))
    assert math.isfinite(res.final_loss) and next(model.parameters()).dtype == torch.float32


def test_gradient_checkpointing_and_eager_attention_train_the_same_weights(tmp_path):
    base = dict(max_steps=2, checkpoint_every=0, ema_decay=0.0)
    a, _ = run(cfg(tmp_path / "a", **base))
    b, _ = run(cfg(tmp_path / "b", gradient_checkpointing=True, attention="eager", **base))
    assert b.is_gradient_checkpointing
    wa, wb = _weights(a), _weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_token_id_path_matches_cached_embeddings(tiny_pipe):
    """Datasets with more unique prompts than the cache holds encode token ids per batch instead."""
    from instaflow_edge.train.teacher import TeacherSource

    prompts = ["a red fox", "a blue whale", "a cat"]
    latents, index = torch.randn(6, 4, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    cached = TeacherSource(latents, index, prompts, tiny_pipe, cfg_dropout=0.5)
    on_the_fly = TeacherSource(latents, index, prompts, tiny_pipe, cfg_dropout=0.5, max_cached_prompts=2)
    assert cached.conditioning.embeddings is not None and on_the_fly.conditioning.embeddings is None
    idx = torch.tensor([0, 1, 2, 3, 4, 5])
    a = cached.get(idx, StepRandom(1, 0, 0, 6, 6), "cpu")
    b = on_the_fly.get(idx, StepRandom(1, 0, 0, 6, 6), "cpu")
    assert torch.equal(a["x1"], b["x1"]) and torch.allclose(a["cond"], b["cond"], atol=1e-6)
    dropped = StepRandom(1, 0, 0, 6, 6).uniform() < 0.5
    assert 0 < dropped.sum() < 6  # both kinds of rows are checked
    assert torch.allclose(a["cond"][dropped], cached.conditioning.empty.expand(int(dropped.sum()), -1, -1))


def test_pairs_source_token_id_path_matches_cached_embeddings(tiny_pipe):
    """Reflow/distill on a pair set with more unique prompts than the cache holds: the same conditioning."""
    from types import SimpleNamespace

    from instaflow_edge.train.reflow import PairsSource

    ids = tiny_pipe.tokenize(["a red fox", "a blue whale", "a cat", "a red fox"])
    pairs = SimpleNamespace(noise=torch.randn(4, 4, 8, 8), latents=torch.randn(4, 4, 8, 8), input_ids=ids)
    cached = PairsSource(pairs, tiny_pipe, cfg_dropout=0.5)
    on_the_fly = PairsSource(pairs, tiny_pipe, cfg_dropout=0.5, max_cached_prompts=2)
    assert cached.conditioning.embeddings.shape[0] == 3 and on_the_fly.conditioning.embeddings is None
    idx = torch.tensor([0, 1, 2, 3])
    a = cached.get(idx, StepRandom(2, 0, 0, 4, 4), "cpu")
    b = on_the_fly.get(idx, StepRandom(2, 0, 0, 4, 4), "cpu")
    assert torch.equal(a["z"], b["z"]) and torch.allclose(a["cond"], b["cond"], atol=1e-6)
    keep = ~(StepRandom(2, 0, 0, 4, 4).uniform() < 0.5)
    assert torch.equal(a["cond"][0], a["cond"][3]) or not (keep[0] and keep[3])  # same prompt, same row


def test_work_dir_with_checkpoints_needs_resume_or_force(tmp_path):
    from instaflow_edge.errors import OutputExistsError

    run(cfg(tmp_path, max_steps=3))
    with pytest.raises(OutputExistsError, match="--resume latest"):
        run(cfg(tmp_path, max_steps=3))
    _, res = run(cfg(tmp_path, max_steps=3, force=True))
    assert res.resumed_from is None and res.step == 3


def test_resume_without_ema_weights_is_refused(tmp_path):
    run(cfg(tmp_path, max_steps=3, ema_decay=0.0))
    with pytest.raises(InputError, match="holds no EMA weights"):
        run(cfg(tmp_path, max_steps=6, resume="latest"))


def test_batch_size_must_split(tmp_path):
    with pytest.raises(InputError, match="gradient_accumulation_steps"):
        cfg(tmp_path, batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(InputError, match="ema_decay"):
        cfg(tmp_path, ema_decay=1.0)


def test_config_is_normalized_when_made():
    from instaflow_edge.train.config import AttentionKernel, MixedPrecision

    c = TrainConfig(output="o", lr_schedule="constant", attention="eager", mixed_precision="bf16", learning_rate=1)
    assert c.lr_schedule is LRSchedule.constant and c.attention is AttentionKernel.eager
    assert c.mixed_precision is MixedPrecision.bf16 and c.learning_rate == 1.0 and type(c.learning_rate) is float
    with pytest.raises(InputError, match="unknown --attention 'flash'") as e:
        TrainConfig(output="o", attention="flash")
    assert "sdpa, eager" in str(e.value)
    for name in ("cpu", "force", "progress", "gradient_checkpointing"):
        with pytest.raises(InputError, match=f"{name} must be true or false"):
            TrainConfig(output="o", **{name: "false"})


# ---------------------------------------------------------------------------------------------------
# config files


def test_config_files_toml_and_yaml(tmp_path):
    (tmp_path / "a.toml").write_text('max-steps = 7\nlearning_rate = 0.01\nlr-schedule = "constant"\n')
    (tmp_path / "a.yaml").write_text("max-steps: 7\nlearning_rate: 0.01\n")
    for name in ("a.toml", "a.yaml"):
        vals = read_config_file(tmp_path / name, TrainConfig)
        assert vals["max_steps"] == 7 and vals["learning_rate"] == 0.01
    (tmp_path / "bad.toml").write_text("max_stepz = 7\n")
    with pytest.raises(InputError, match="unknown key 'max_stepz'") as e:
        read_config_file(tmp_path / "bad.toml", TrainConfig)
    assert "max-steps" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "broken.toml").write_text("max_steps = = 7\n")
    with pytest.raises(InputError, match="cannot parse"):
        read_config_file(tmp_path / "broken.toml", TrainConfig)
    with pytest.raises(InputError, match="max_steps must be a positive integer"):
        TrainConfig(output="o", max_steps="7")
