"""The Hugging Face hub, asked only when it can answer: offline, a hub id fails in seconds, not after a minute of retries.

transformers and datasets retry an unreachable hub for 30 to 75 s before their
(clear) error. One short connection attempt tells the same thing at once; a
model already in the local cache is then loaded from there.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def offline_by_setting() -> bool:
    """The user said so: ``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    """The hub's address (``HF_ENDPOINT`` for mirrors)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=1)
def reachable() -> bool:
    """Whether one TCP connection to the hub succeeds within :data:`PROBE_TIMEOUT_S` (asked once per process)."""
    if offline_by_setting():
        return False
    url = urlparse(endpoint())
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def cached_model(repo_id: str) -> bool:
    """Whether ``repo_id``'s config is in the local hub cache (then it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache API rejects is simply not cached
        return False


def offline_reason(what: str, instead: str = "a local folder, a .gguf file or a named model (see `sumcircuit models`)",
                   cache: bool = True) -> str:
    """Why a hub id cannot be loaded here, with what works instead."""
    why = "HF_HUB_OFFLINE is set" if offline_by_setting() else f"{urlparse(endpoint()).hostname} cannot be reached"
    return f"{what} is on the Hugging Face hub, but {why}{' and it is not in the local cache' if cache else ''}; " \
           f"offline, use {instead}"
