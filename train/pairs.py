"""Reading reflow data back: a Dataset over verified shards of (noise, latents, input_ids, seed)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import read_manifest
from ..errors import InputError


class PairsDataset:
    """All pairs of a reflow-data folder, in index order. Every shard is verified (sha256) on open:
    training on a corrupt or half-made set is refused with a one-line error."""

    def __init__(self, folder: str | Path, verify: bool = True):
        import torch
        from safetensors.torch import load_file

        from .reflow_data import shard_paths, verify_shard

        folder = Path(folder)
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None or manifest.get("kind") != "reflow-data":
            raise InputError(f"{folder} is not a reflow-data folder (no reflow-data manifest.json)",
                             "make one with `instaflow-edge train reflow-data`")
        self.manifest = manifest
        parts: dict[str, list] = {"noise": [], "latents": [], "input_ids": [], "seeds": []}
        self.prompts: list[str] = []
        for k, name in enumerate(manifest["shards"]):
            meta = verify_shard(folder, k) if verify else {"prompts": None}
            if meta is None:
                raise InputError(f"shard {name} in {folder} is missing or corrupt",
                                 "rerun `instaflow-edge train reflow-data` with the same options to repair it")
            t = load_file(shard_paths(folder, k)[0])
            for key in parts:
                parts[key].append(t[key])
            self.prompts += meta.get("prompts") or []
        self.noise = torch.cat(parts["noise"])
        self.latents = torch.cat(parts["latents"])
        self.input_ids = torch.cat(parts["input_ids"])
        self.seeds = torch.cat(parts["seeds"])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` pairs (pair-count studies: a prefix of a set is a smaller set from the same
        teacher and seeds)."""
        self.noise, self.latents, self.input_ids, self.seeds = (t[:n] for t in (self.noise, self.latents, self.input_ids, self.seeds))
        self.prompts = self.prompts[:n]

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, i: int) -> dict:
        return {"noise": self.noise[i], "latents": self.latents[i], "input_ids": self.input_ids[i], "seed": self.seeds[i]}


class PairShards:
    """A reflow-data folder as an index of its shards, without their tensors in memory: every shard is
    verified (sha256, read in chunks) and counted on open, and :meth:`load` reads one shard when asked.
    ``max_pairs`` keeps the first N pairs (as :meth:`PairsDataset.truncate`)."""

    def __init__(self, folder: str | Path, verify: bool = True, max_pairs: int | None = None):
        import json

        from safetensors import safe_open

        from .reflow_data import shard_paths, verify_shard

        self.folder = Path(folder)
        manifest = read_manifest(self.folder) if self.folder.is_dir() else None
        if manifest is None or manifest.get("kind") != "reflow-data":
            raise InputError(f"{self.folder} is not a reflow-data folder (no reflow-data manifest.json)",
                             "make one with `instaflow-edge train reflow-data`")
        self.manifest = manifest
        self.counts: list[int] = []
        self.prompts: list[str] = []  # a sample (the first shard's), for the output's manifest
        for k, name in enumerate(manifest["shards"]):
            meta = verify_shard(self.folder, k) if verify else None
            if meta is None and not verify:
                side = shard_paths(self.folder, k)[1]
                meta = json.loads(side.read_text()) if side.is_file() else None
            if meta is None:
                raise InputError(f"shard {name} in {self.folder} is missing or corrupt",
                                 "rerun `instaflow-edge train reflow-data` with the same options to repair it")
            self.counts.append(int(meta["count"]))
            if k == 0:
                self.prompts = list(meta.get("prompts") or [])
        total = sum(self.counts)
        if max_pairs is not None:
            if max_pairs > total:
                raise InputError(f"--max-pairs {max_pairs} but {self.folder} holds {total} pairs",
                                 f"pass --max-pairs {total} or less, or make more pairs")
            kept, left = [], max_pairs
            for c in self.counts:
                if left <= 0:
                    break
                kept.append(min(c, left))
                left -= kept[-1]
            self.counts = kept
        with safe_open(shard_paths(self.folder, 0)[0], "pt") as f:
            self.latent_shape = tuple(f.get_slice("noise").get_shape()[1:])

    def __len__(self) -> int:
        return sum(self.counts)

    def load(self, k: int) -> dict:
        """Shard ``k``'s tensors (noise, latents, input_ids), cut to the pairs kept."""
        from safetensors.torch import load_file

        from .reflow_data import shard_paths

        t = load_file(shard_paths(self.folder, k)[0])
        n = self.counts[k]
        return {key: t[key][:n] for key in ("noise", "latents", "input_ids")}

    def token_rows(self, k: int):
        """Shard ``k``'s input_ids only (safetensors reads just that tensor)."""
        from safetensors import safe_open

        from .reflow_data import shard_paths

        with safe_open(shard_paths(self.folder, k)[0], "pt") as f:
            return f.get_tensor("input_ids")[:self.counts[k]]
