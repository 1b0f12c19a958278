"""Provenance: what a cited number was computed from.

Every output a user might cite carries model ids and weight hashes, the data
file and its hash, the seed, the config and the library versions, so that any
figure can be traced and re-run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_LIBRARIES = ("sumcircuit", "torch", "transformers", "peft", "accelerate", "datasets",
              "safetensors", "gguf", "rouge-score")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """A file's sha256, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of tensor names, dtypes, shapes and values, independent of file format.

    A model loaded from GGUF, a safetensors folder or the hub hashes the same if
    its weights are the same, which a file hash cannot promise.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Python, platform and the versions of the libraries the numbers depend on."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(**fields: Any) -> dict[str, Any]:
    """A provenance block: the caller's fields plus versions and a UTC timestamp."""
    return {**fields, "versions": library_versions(),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
