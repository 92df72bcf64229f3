"""The engine's random streams: which samples a step trains on, and the noise they get.

Both are pure functions of (seed, step) — or (seed, epoch) for the data order — so a run's randomness
does not depend on how many processes share a batch, how many accumulation micro-steps split it, or
whether the run was resumed from a checkpoint.
"""

from __future__ import annotations

import torch

from ..errors import InputError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, stable across versions)."""
    import numpy as np

    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).tolist()
    return ((a << 32) | b) & ((1 << 63) - 1)


class StepRandom:
    """Random draws of one optimizer step, generated for its whole global batch and sliced to the
    ``local`` samples at ``offset`` (this process's part of this micro-step): so the samples get the
    same noise whatever the split into processes and accumulation micro-steps."""

    def __init__(self, seed: int, step: int, offset: int, local: int, global_size: int):
        self.generator = torch.Generator("cpu").manual_seed(derive_seed(seed, step, 0x5EED))
        self.offset, self.local, self.global_size = offset, local, global_size

    def _slice(self, full: torch.Tensor, device, dtype) -> torch.Tensor:
        return full[self.offset:self.offset + self.local].to(device=device, dtype=dtype)

    def normal(self, tail: tuple | torch.Size, device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) of shape (local, *tail)."""
        return self._slice(torch.randn((self.global_size, *tail), generator=self.generator), device, dtype)

    def uniform(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape (local,)."""
        return self._slice(torch.rand(self.global_size, generator=self.generator), device, dtype)


class EpochSampler:
    """Dataset indices in a fresh seeded permutation per epoch; a batch may straddle two epochs.
    Its state (epoch, cursor) is the data-order state a checkpoint keeps."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise InputError("the training data is empty", "check the dataset or the captions file")
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator("cpu").manual_seed(derive_seed(self.seed, epoch, 0xDA7A)))

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            perm = self._perm(self.epoch)
            chunk = perm[self.cursor:self.cursor + k]
            out.append(chunk)
            k -= len(chunk)
            self.cursor += len(chunk)
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise InputError(f"the checkpoint was trained on {state['n']} samples, this data has {self.n}",
                             "resume with the same data, or start over with --force")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class ShardWindowSampler(EpochSampler):
    """The epoch order of a data set stored in shards, streamed: each epoch visits the shards in a seeded
    order, ``window`` shards at a time, and shuffles the samples within each window. So at any moment
    the indices drawn lie in one window (two where a batch straddles windows or epochs), and a reader
    holds ``window + 1`` shards at most, however large the set.

    With ``window`` ≥ the number of shards there is one window per epoch, and the order is exactly
    :class:`EpochSampler`'s (a full permutation): small sets train as they did before streaming.
    State: (epoch, cursor), as EpochSampler, plus the shard counts and window that fix the order."""

    def __init__(self, counts: list[int], seed: int, window: int):
        super().__init__(sum(counts), seed)
        self.counts, self.window = list(counts), int(window)
        self.starts = torch.tensor([0, *counts]).cumsum(0)[:-1].tolist()
        self._cached: tuple | None = None  # (epoch, window number, its permuted indices)

    def _windows(self, epoch: int) -> list[list[int]]:
        g = torch.Generator("cpu").manual_seed(derive_seed(self.seed, epoch, 0x5A4D))
        order = torch.randperm(len(self.counts), generator=g).tolist()
        return [order[i:i + self.window] for i in range(0, len(order), self.window)]

    def _window_perm(self, epoch: int, w: int, shards: list[int]) -> torch.Tensor:
        if self._cached is None or self._cached[:2] != (epoch, w):
            idx = torch.cat([torch.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in shards])
            g = torch.Generator("cpu").manual_seed(derive_seed(self.seed, epoch, w, 0xDA7A))
            self._cached = (epoch, w, idx[torch.randperm(len(idx), generator=g)])
        return self._cached[2]

    def _slice(self, epoch: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of epoch ``epoch``'s order."""
        if len(self.counts) <= self.window:
            return self._perm(epoch)[start:stop]
        out, pos = [], 0
        for w, shards in enumerate(self._windows(epoch)):
            size = sum(self.counts[s] for s in shards)
            lo, hi = max(start, pos), min(stop, pos + size)
            if lo < hi:
                out.append(self._window_perm(epoch, w, shards)[lo - pos:hi - pos])
            pos += size
            if pos >= stop:
                break
        return torch.cat(out)

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            m = min(k, self.n - self.cursor)
            out.append(self._slice(self.epoch, self.cursor, self.cursor + m))
            k -= m
            self.cursor += m
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return torch.cat(out)

    def state_dict(self) -> dict:
        if len(self.counts) <= self.window:
            return super().state_dict()  # the EpochSampler order: the same state as before streaming
        return {**super().state_dict(), "shards": len(self.counts), "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("window") != mine.get("window") or state.get("shards") != mine.get("shards"):
            raise InputError(
                f"the checkpoint streamed {state.get('shards', 'all')} shards {state.get('window', 'at once')} at a time, "
                f"this run streams {mine.get('shards', 'all')} {mine.get('window', 'at once')} at a time",
                "resume with the same pairs and pair_shards_in_memory, or start over with --force")
        super().load_state_dict(state)
