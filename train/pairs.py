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
