"""Training checkpoints: written atomically, read back exactly.

A checkpoint is a folder ``WORK/checkpoint-0000500`` holding

* ``model.safetensors`` — the weights being trained (fp32 master weights),
* ``ema.safetensors`` — the EMA weights (when EMA is on),
* ``optimizer.pt`` — the optimizer state (tensors and numbers only; read back with ``weights_only=True``),
* ``rng_state.json`` — python/numpy/torch(/cuda) RNG states of EVERY process, gathered to the main one,
* ``trainer_state.json`` — step, LR-scheduler state, data-order state, EMA update count, process count.

A sharded checkpoint (FSDP2, sharding.py) holds ``dcp/`` instead of the first three: a
``torch.distributed.checkpoint`` folder (weights, optimizer state and EMA, every rank's shard of the global
tensors, plus DCP's ``.metadata``), which any number of processes reads back (resharding). Every rank
writes its shard into the same temporary folder; the main process adds the JSON files and renames it.

It is built in a hidden temporary sibling and renamed into place (``artifacts.atomic_dir``), so a crash
mid-write leaves the previous checkpoint as the latest one; ``latest`` ignores hidden folders and
folders without ``trainer_state.json``, and the next run in the work dir removes them
(:func:`remove_stale`, under the work dir's lock). Only the main process writes.

A resumed run must keep the settings that fix the data order and the noise (:data:`ORDER_SETTINGS`,
stored in ``trainer_state.json``): :func:`check_settings` refuses a different value.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from ..artifacts import atomic_dir, atomic_write_text
from ..errors import InputError

PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-[A-Za-z0-9_]+$")  # atomic_dir's temporary folders
# every random draw is a function of (seed, step) and the data order of (seed, batch_size): change one and
# a resumed run no longer continues the one it resumes
ORDER_SETTINGS = ("batch_size", "seed")
STATE = "trainer_state.json"
FILES = ("model.safetensors", "optimizer.pt", "rng_state.json", STATE)
DCP_DIR = "dcp"
SHARDED_FILES = (f"{DCP_DIR}/.metadata", "rng_state.json", STATE)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(work: Path) -> list[Path]:
    """Complete checkpoints in ``work``, oldest first."""
    if not work.is_dir():
        return []
    found = []
    for p in work.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_stale(work: Path) -> list[Path]:
    """Remove the temporary checkpoint folders (``.checkpoint-N.tmp-*``, ``.checkpoint-N.old-*``) a killed
    run left in ``work``. Call it only while holding the work dir's lock (then no live run writes them)."""
    if not work.is_dir():
        return []
    stale = sorted(p for p in work.iterdir() if _STALE.match(p.name) and p.is_dir() and not p.is_symlink())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume from checkpoint ``path`` with other ``settings`` (``{name: value}``, see
    :data:`ORDER_SETTINGS`) than it was made with; a checkpoint that did not record one is not checked."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return  # load_checkpoint reports an unreadable checkpoint, with its fix
    for name, value in settings.items():
        if isinstance(state, dict) and name in state and state[name] != value:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"checkpoint {path} was made with {flag} {state[name]}, this run has {flag} {value}",
                             f"resume with {flag} {state[name]} (it fixes the data order and the noise), "
                             "or drop --resume and pass --force to start over")


def resolve_resume(resume: str | None, work: Path) -> Path | None:
    """``None`` → no resume; ``latest`` → the newest complete checkpoint in ``work`` (None if there is
    none yet); a path → that checkpoint, checked."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(work)
        return found[-1] if found else None
    path = Path(resume)
    missing = [f for f in (SHARDED_FILES if is_sharded(path) else FILES) if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise InputError(f"{path} is not a complete checkpoint (missing {', '.join(missing) or 'the folder'})",
                         f"pass --resume latest, or a {PREFIX}N folder from the work dir")
    return path


# ---------------------------------------------------------------------------------------------------
# RNG states as JSON (no pickle)


def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(b64: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(work: Path, step: int, model_state: dict, ema_state: dict | None, optimizer_state: dict,
                    rng_states: list[dict], trainer_state: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (main process only), then drop all but the newest ``keep``."""
    import torch
    from safetensors.torch import save_file


    target = work / checkpoint_name(step)
    work.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, force=True) as tmp:
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        atomic_write_text(tmp / "rng_state.json", json.dumps(rng_states))
        atomic_write_text(tmp / STATE, json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
    for old in list_checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def is_sharded(path: Path) -> bool:
    """A DCP (sharded) checkpoint rather than safetensors + optimizer.pt."""
    return (Path(path) / DCP_DIR).is_dir()


def save_sharded_checkpoint(work: Path, step: int, write_shards, rng_states: list[dict], trainer_state: dict,
                            keep: int, is_main: bool) -> Path:
    """Write ``checkpoint-<step>`` with every rank's shard (a collective: every rank calls it).

    The main process makes the hidden temporary folder and tells the others its name; all ranks write
    their shards into ``DCP_DIR`` inside it (``write_shards(folder)``, which returns on the main process
    only once every rank has written, DCP's last step gathers their results); then the main process
    writes the JSON files, renames the folder into place and drops all but the newest ``keep``. A rank
    killed anywhere before the rename leaves only a hidden folder, which ``latest`` ignores."""
    import contextlib

    import torch.distributed as dist

    target = work / checkpoint_name(step)
    with contextlib.ExitStack() as stack:
        name = [None]
        if is_main:
            work.mkdir(parents=True, exist_ok=True)
            name = [str(stack.enter_context(atomic_dir(target, force=True)))]
        dist.broadcast_object_list(name, src=0)
        tmp = Path(name[0])
        write_shards(tmp / DCP_DIR)
        if is_main:
            atomic_write_text(tmp / "rng_state.json", json.dumps(rng_states))
            atomic_write_text(tmp / STATE, json.dumps({**trainer_state, "step": step, "format": "dcp"}, indent=2) + "\n")
    if is_main:
        for old in list_checkpoints(work)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank runs ahead (and, say, resumes) before the folder is in place
    return target


def load_sharded_meta(path: Path) -> dict[str, Any]:
    """The JSON half of a sharded checkpoint (the tensors are read by ``sharding.load_dcp``)."""
    try:
        return {"rng": json.loads((path / "rng_state.json").read_text()),
                "trainer": json.loads((path / STATE).read_text())}
    except Exception as e:
        raise InputError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]})",
                         "resume from an earlier checkpoint (pass its folder to --resume)") from e


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything a checkpoint holds, as CPU tensors and plain values."""
    import torch
    from safetensors.torch import load_file

    try:
        out = {
            "model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "rng": json.loads((path / "rng_state.json").read_text()),
            "trainer": json.loads((path / STATE).read_text()),
        }
    except Exception as e:  # truncated safetensors, bad JSON, a pickle that is not plain state
        raise InputError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]})",
                         "resume from an earlier checkpoint (pass its folder to --resume)") from e
    return out
