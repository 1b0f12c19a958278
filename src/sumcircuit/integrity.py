"""Weights that are whole and finite, or a one-line refusal: no result is ever computed on garbage.

transformers fills tensors missing from a checkpoint with random values (and
says so only in a load report), instantiates whatever size a ``config.json``
claims (a billion layers hangs the machine), and loads NaN weights silently.
Every one of those would give a "successful" analysis of noise, so each is
refused here, naming the model and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sumcircuit.errors import ModelError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte)\.weight$")


def weight_shapes(folder: str | Path) -> dict[str, list[int]] | None:
    """Every tensor's shape in a local folder's safetensors files, read from their headers (no weights loaded).

    None when the folder has no safetensors files sumcircuit can read this way (a hub id: nothing local yet).
    """
    path = Path(folder)
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        shapes: dict[str, list[int]] = {}
        for name in files:
            shapes.update(_header_shapes(path / name))
        return shapes
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # a damaged file: from_pretrained's own error names it


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """The JSON header of one safetensors file: 8 bytes of length, then name -> dtype, shape, offsets."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100_000_000:
            raise ValueError(f"{file}: implausible safetensors header size {size}")
        header = json.loads(fh.read(size))
    return {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}


def check_config_fits_weights(config: Any, folder: str | Path, spec: str) -> None:
    """Refuse a ``config.json`` whose sizes the weight files do not have, before a model of that size is built."""
    shapes = weight_shapes(folder)
    if not shapes:
        return
    layers = {int(m.group(1)) for k in shapes for m in [_LAYER.search(k)] if m}
    claimed = getattr(config, "num_hidden_layers", None)
    if isinstance(claimed, int) and layers and claimed > max(layers) + 1:
        raise ModelError(f"model '{spec}': config.json says {claimed} layers but the weight files in {folder} hold "
                         f"{max(layers) + 1}; the rest would be random: config and weights do not match")
    embedding = next((shape for k, shape in shapes.items() if _EMBEDDING.search(k)), None)
    hidden = getattr(config, "hidden_size", None)
    vocab = getattr(config, "vocab_size", None)
    if embedding is not None and len(embedding) == 2:
        if isinstance(hidden, int) and hidden != embedding[1]:
            raise ModelError(f"model '{spec}': config.json says hidden size {hidden} but the embedding in {folder} "
                             f"has {embedding[1]} columns: config and weights do not match")
        if isinstance(vocab, int) and vocab != embedding[0]:
            raise ModelError(f"model '{spec}': config.json says {vocab} tokens but the embedding in {folder} "
                             f"has {embedding[0]} rows: config and weights do not match")


def check_loading_info(info: Mapping[str, Any], spec: str, folder: str) -> None:
    """Refuse tensors transformers would have initialised at random (missing) or skipped (wrong shape)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"model '{spec}': {len(missing)} weight(s) missing from the files in {folder} "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); transformers would "
                         "initialise them at random: refusing an incomplete checkpoint")
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise ModelError(f"model '{spec}': weight(s) of the wrong shape in {folder} ({', '.join(mismatched[:3])})")


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """The first tensor holding NaN or Inf, with its count of such values (None when all are finite)."""
    for name, tensor in named:
        if tensor.is_meta:  # offloaded by a device map: checked before it was placed
            continue
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                return name, bad
    return None


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse a model with a NaN or Inf weight: every statistic of it would be NaN, or worse, look plausible."""
    found = first_non_finite(model.named_parameters())
    if found is not None:
        name, bad = found
        raise ModelError(f"{what}: weight {name} has {bad} NaN/Inf value(s); refusing to compute on a broken model")
