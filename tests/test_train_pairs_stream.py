"""Streaming pair shards: the reflow/distill trainers read a few shards at a time, in an epoch order
that stays within a window of shards, resumable; small sets train exactly as they did in memory."""

from __future__ import annotations

import copy

import pytest
import torch
from instaflow_edge.train.pairs import PairsDataset, PairShards
from instaflow_edge.train.pairs_memory import PROMPTS, write_tiny_pairs
from instaflow_edge.train.reflow import PairsSource, StreamingPairsSource
from instaflow_edge.train.streams import EpochSampler, ShardWindowSampler, StepRandom

from instaflow_edge.errors import InputError


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, tiny_pipe):
    """6 shards of 20 pairs (the last one 10), digits prompts."""
    return write_tiny_pairs(tmp_path_factory.mktemp("pairs") / "p", 110, tiny_pipe.tokenize(PROMPTS), shard_size=20)


def test_one_window_is_the_in_memory_order():
    a, b = ShardWindowSampler([5, 5, 3], seed=4, window=8), EpochSampler(13, seed=4)
    assert all(torch.equal(a.take(k), b.take(k)) for k in (4, 9, 13, 2))
    assert a.state_dict() == b.state_dict()  # checkpoints of small sets look as they did


def test_windows_cover_each_epoch_and_stay_in_their_shards():
    counts = [7] * 6
    s = ShardWindowSampler(counts, seed=1, window=2)
    epoch = s.take(42)
    assert sorted(epoch.tolist()) == list(range(42))
    for w in range(3):  # each stretch of 14 positions draws from 2 shards only
        assert len({i // 7 for i in epoch[14 * w:14 * (w + 1)].tolist()}) == 2
    assert not torch.equal(s.take(42), epoch)  # the next epoch is another order
    # resumable: a sampler restored mid-window continues the same stream
    t = ShardWindowSampler(counts, seed=1, window=2)
    t.take(23)
    state = t.state_dict()
    u = ShardWindowSampler(counts, seed=1, window=2)
    u.load_state_dict(state)
    assert torch.equal(u.take(50), t.take(50))
    with pytest.raises(InputError, match="3 at a time"):
        ShardWindowSampler(counts, seed=1, window=3).load_state_dict(state)


def test_streamed_batches_equal_the_in_memory_ones(pairs_dir, tiny_pipe):
    mem = PairsSource(PairsDataset(pairs_dir), tiny_pipe, cfg_dropout=0.3)
    for window, max_cached in ((8, 4096), (2, 4096), (2, 3)):  # one window; windows; uncached prompts
        stream = StreamingPairsSource(PairShards(pairs_dir), tiny_pipe, cfg_dropout=0.3, window=window,
                                      max_cached_prompts=max_cached)
        assert len(stream) == len(mem) == 110
        assert (stream.conditioning.embeddings is None) == (max_cached == 3)
        sampler = stream.make_sampler(0)
        for step in range(12):  # 12 × 16 > 110: past an epoch boundary
            idx = sampler.take(16)
            a = stream.get(idx, StepRandom(0, step, 0, 16, 16), "cpu")
            b = mem.get(idx, StepRandom(0, step, 0, 16, 16), "cpu")
            assert torch.equal(a["z"], b["z"]) and torch.equal(a["x1"], b["x1"])
            assert torch.allclose(a["cond"], b["cond"], atol=1e-6)
        assert stream.peak_cached <= window + 1
    assert stream.peak_cached == 3  # it did have to evict


def test_max_pairs_keeps_a_prefix(pairs_dir):
    s = PairShards(pairs_dir, max_pairs=45)
    assert s.counts == [20, 20, 5] and len(s) == 45 and s.latent_shape == (4, 8, 8)
    assert torch.equal(s.load(2)["noise"], PairsDataset(pairs_dir).noise[40:45])
    with pytest.raises(InputError, match="--max-pairs 111"):
        PairShards(pairs_dir, max_pairs=111)


def test_streamed_training_resumes_exactly(tmp_path, pairs_dir, tiny_pipe):
    """The engine on streamed pairs in windows of 2 shards: killed after the step-3 checkpoint, resumed
    with --resume latest, the same weights and data position as an uninterrupted run."""
    from test_train_engine import CrashAt

    from instaflow_edge.train import checkpoint as ckpt
    from instaflow_edge.train.config import TrainConfig
    from instaflow_edge.train.engine import fit, make_accelerator
    from instaflow_edge.train.objectives import RectifiedFlowObjective

    def go(root, objective=None, **kw):
        c = TrainConfig(output=str(root / "out"), max_steps=6, batch_size=16, warmup_steps=1, checkpoint_every=3,
                        log_every=1, progress=False, ema_decay=0.9, threads=1, **kw)
        source = StreamingPairsSource(PairShards(pairs_dir), tiny_pipe, window=2)
        return fit(c, make_accelerator(c), copy.deepcopy(tiny_pipe.unet), source, objective or RectifiedFlowObjective())

    a, _ = go(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "b", CrashAt(4))
    b, res = go(tmp_path / "b", resume="latest")
    assert res.resumed_from.endswith("checkpoint-0000003")
    wa, wb = a.state_dict(), b.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = ckpt.load_checkpoint(tmp_path / "a" / "out.train" / "checkpoint-0000006")["trainer"]["data"]
    sb = ckpt.load_checkpoint(tmp_path / "b" / "out.train" / "checkpoint-0000006")["trainer"]["data"]
    assert sa == sb and sa["window"] == 2 and sa["shards"] == 6


def test_train_reflow_streams_a_set_larger_than_its_window(tmp_path, tiny_dir, pairs_dir, monkeypatch):
    """A set of more shards than pair_shards_in_memory goes through StreamingPairsSource (a smaller one
    is held whole by PairsSource, as before); the output records every pair."""
    import json

    from instaflow_edge.train import reflow

    made = []
    real = reflow.StreamingPairsSource.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(reflow.StreamingPairsSource, "__init__", spy)
    common = dict(model=str(tiny_dir), pairs=str(pairs_dir), max_steps=3, batch_size=16, checkpoint_every=0,
                  progress=False, cpu=True, threads=1)
    reflow.train_reflow(reflow.ReflowConfig(output=str(tmp_path / "rf"), pair_shards_in_memory=2, **common))
    assert len(made) == 1 and made[0].window == 2 and 1 <= made[0].peak_cached <= 3
    assert json.loads((tmp_path / "rf" / "manifest.json").read_text())["data"]["num_pairs"] == 110
    reflow.train_reflow(reflow.ReflowConfig(output=str(tmp_path / "rf6"), pair_shards_in_memory=6, **common))
    assert len(made) == 1  # 6 shards fit a window of 6: held whole
