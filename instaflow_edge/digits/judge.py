"""The judge: a small CNN digit classifier trained on the real digits, used to measure generators.

It gives ``logits(images)`` (prompt accuracy: is the image the digit the prompt names) and
``features(images)``, its penultimate layer, where the digits-FID is computed. It is trained on the
*train* split of :func:`instaflow_edge.data.digits_dataset` only (validation stays held out for the
accuracy figure and as the FID reference), deterministically from :class:`JudgeConfig`, and cached as
``judge-<config hash>.safetensors`` under ``$INSTAFLOW_EDGE_CACHE`` (default
``~/.cache/instaflow-edge``), written atomically: every ``eval`` on every machine with the same
config uses the same weights, so figures are comparable across runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError

log = logging.getLogger(__name__)

JUDGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Everything the judge's weights depend on; its hash names the cache file."""

    seed: int = 0           # weight init and batch order
    data_seed: int = 0      # the digits train/validation split
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16         # channels of the first conv block (then 2×, 2×)
    feature_dim: int = 64   # the penultimate layer: the FID's feature space
    shift: int = 2          # augmentation: random translation by up to this many pixels
    version: int = 2        # bump when the architecture or the training loop changes

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class DigitsCNN(nn.Module):
    """Three conv blocks (32→16→8→4 px) → linear (the features) → ReLU → linear (10 logits)."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.conv = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w * 4 * 4, feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # before the ReLU: no dead (always-zero) dimensions, so the covariance has full rank
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.features(x))))


class Judge:
    """A trained :class:`DigitsCNN` in eval mode; inputs are images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, model: DigitsCNN, config: JudgeConfig, val_accuracy: float, path: Path | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.val_accuracy = val_accuracy
        self.path = path

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """float32, 3 channels, 32×32 (other sizes are resized with antialiasing)."""
        x = images.detach().float().cpu()
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"judge expects images (B, 1|3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (JUDGE_SIZE, JUDGE_SIZE):
            x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = self.prepare(images)
        return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0)

    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return self._batched(self.model, images, batch_size)

    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate activations (B, feature_dim), float64 for the Fréchet statistics."""
        return self._batched(self.model.features, images, batch_size).double()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(1)


# ---------------------------------------------------------------------------------------------------
# training and the cache


def cache_dir() -> Path:
    """``$INSTAFLOW_EDGE_CACHE``, else ``$XDG_CACHE_HOME/instaflow-edge``, else ``~/.cache/instaflow-edge``."""
    if os.environ.get("INSTAFLOW_EDGE_CACHE"):
        return Path(os.environ["INSTAFLOW_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "instaflow-edge"


@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels and a private global RNG for the duration (both restored afterwards: no
    global state leaks)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(was)


def _shift(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``k`` pixels (background fill -1, as the digits' border is)."""
    if k == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (k, k, k, k), value=-1.0)
    dx, dy = torch.randint(0, 2 * k + 1, (2, n), generator=g).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_judge(config: JudgeConfig = JudgeConfig(), progress: bool = True) -> Judge:
    """Train the judge on the digits train split; report accuracy on the validation split."""
    from tqdm.auto import tqdm

    from ..data import digits_dataset

    train, val = digits_dataset("train", config.data_seed), digits_dataset("validation", config.data_seed)
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    y = torch.tensor(train.labels)
    with _deterministic():
        torch.manual_seed(config.seed)
        g = torch.Generator().manual_seed(config.seed)
        model = DigitsCNN(config.width, config.feature_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * -(-len(x) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        model.train()
        bar = tqdm(total=steps, desc="training the digits judge", unit="step", disable=not progress)
        for _ in range(config.epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), config.batch_size):
                idx = perm[i:i + config.batch_size]
                loss = F.cross_entropy(model(_shift(x[idx], config.shift, g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    judge = Judge(model, config, 0.0)
    xv = torch.stack([val[i]["image"] for i in range(len(val))])
    judge.val_accuracy = float((judge.predict(xv) == torch.tensor(val.labels)).double().mean())
    return judge


def judge_path(config: JudgeConfig = JudgeConfig()) -> Path:
    return cache_dir() / f"judge-{config.key()}.safetensors"


def load_judge(config: JudgeConfig = JudgeConfig(), progress: bool = True) -> Judge:
    """The cached judge for ``config``, trained (about 20 s on 2 CPU cores) and cached on first use."""
    from safetensors.torch import load_file, save_file

    path = judge_path(config)
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            model = DigitsCNN(config.width, config.feature_dim)
            model.load_state_dict(load_file(str(path)))
            if json.loads(meta.get("config", "{}")) != dataclasses.asdict(config):
                raise ValueError("its config differs from the one it is named for")
            return Judge(model, config, float(meta["val_accuracy"]), path)
        except Exception as e:  # a corrupt cache entry is rebuilt, not trusted
            if progress:
                log.info(f"cache {path} unusable ({type(e).__name__}: {e}); rebuilding it")
    t0 = time.perf_counter()
    judge = train_judge(config, progress)
    seconds = time.perf_counter() - t0
    if judge.val_accuracy < 0.97:
        raise ModelError(f"the digits judge reached only {judge.val_accuracy:.3f} validation accuracy (< 0.97)",
                         "this should not happen with the default JudgeConfig; report it with `instaflow-edge env`")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        meta = {"config": json.dumps(dataclasses.asdict(config)), "val_accuracy": repr(judge.val_accuracy),
                "train_seconds": f"{seconds:.1f}"}
        save_file({k: v.contiguous() for k, v in judge.model.state_dict().items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    judge.path = path
    return judge
