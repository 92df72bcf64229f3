"""The Hugging Face hub side of ``load_pipeline``: a hub id's ``model_index.json`` from the local cache
first, then (unless offline) the hub after a quick reachability check, so an offline machine fails in
seconds with one line instead of after the hub client's retries."""

from __future__ import annotations

import os
import re
import warnings

from .errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host (or the HTTPS proxy, when one is set) cannot be reached in ``timeout`` seconds;
    None when a TCP connection opens. A quick check, so an offline machine fails in seconds instead of
    after the hub client's retries."""
    import socket
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


def hub_index(source: str, local_files_only: bool) -> tuple[dict, bool]:
    """``model_index.json`` of hub id ``source`` and whether to load the rest from the local cache only:
    the cache first; then, unless offline (``HF_HUB_OFFLINE`` or ``local_files_only``), the hub after a
    quick reachability check."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    fix = "check the hub id and your network, or pass a local pipeline folder"

    def load_config(**kw):
        with warnings.catch_warnings():  # diffusers passes hf_hub_download an argument it deprecated
            warnings.simplefilter("ignore")
            return dict(DiffusionPipeline.load_config(source, **kw))

    try:
        return load_config(local_files_only=True), True
    except (OSError, ValueError):
        pass
    if local_files_only or _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        raise ModelError(f"could not fetch {source}: it is not in the local Hugging Face cache, and HF_HUB_OFFLINE "
                         "(or local files only) is set", "download it on a machine with network, or pass a local pipeline folder")
    reason = _unreachable(constants.ENDPOINT)
    if reason:
        raise ModelError(f"could not fetch {source}: the hub is unreachable ({reason})", fix)
    try:
        return load_config(), False
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"could not fetch {source}/model_index.json ({type(e).__name__}: {first[:150]})", fix) from e
