"""Big-model placement: a model's layers across GPUs, CPU and disk, so a pair larger than one device can be analysed.

Accelerate does the work (``infer_auto_device_map`` and ``dispatch_model``):
each decoder layer runs on the device it was given, and a layer offloaded to
CPU or disk has its weights brought to the execution device by Accelerate's
hooks only while it runs. The analyses drive both models of a pair layer by
layer (``capture.run_pair``), so at any time only the matching layer of each
model needs to be resident. Models are loaded and checked on the CPU first
(NaN weights, missing tensors, the weights' hash for provenance), then placed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sumcircuit.errors import ConfigError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=8GiB"`` -> ``{0: "20GiB", "cpu": "8GiB"}`` (Accelerate's ``max_memory``)."""
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for item in str(text).split(","):
        device, sep, amount = item.strip().partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not amount:
            raise ConfigError("max_memory", f"{item.strip()!r}: expected DEVICE=AMOUNT, e.g. 0=20GiB,cpu=8GiB")
        try:
            from accelerate.utils import convert_file_size_to_int

            convert_file_size_to_int(amount)
        except (ValueError, TypeError):
            raise ConfigError("max_memory", f"{item.strip()!r}: {amount!r} is not an amount such as 20GiB or "
                                            "500MB") from None
        if device not in ("cpu", "disk", "mps") and not device.isdigit():
            raise ConfigError("max_memory", f"{item.strip()!r}: the device is a GPU index, cpu or disk")
        out[int(device) if device.isdigit() else device] = amount
    return out


def read_device_map(spec: str) -> str | dict[str, Any]:
    """A strategy name, or a JSON file mapping module names to devices (checked when it is read)."""
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("device_map", f"{spec}: expected {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                                        "mapping module names to devices")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("device_map", f"{spec}: not a JSON file ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError("device_map", f"{spec}: expected a JSON object {{module name: device}}")
    return mapping


def _device_map(model: nn.Module, spec: str, max_memory: dict[int | str, str] | None) -> dict[str, Any]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    chosen = read_device_map(spec)
    if isinstance(chosen, dict):
        names = {n for n, _ in model.named_modules()}
        unknown = sorted(k for k in chosen if k and k not in names)
        if unknown:
            raise ConfigError("device_map", f"{spec}: no module {unknown[0]!r} in this model")
        return chosen
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if chosen != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=chosen == "balanced_low_0")
    placed: dict[str, Any] = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if placed.get("") == "disk":
        raise ConfigError("max_memory", "leaves no room for any layer: the whole model would be on disk")
    return placed


def place(model: nn.Module, device_map: str, max_memory: str | None = None,
          offload_folder: str | Path | None = None) -> nn.Module:
    """Dispatch ``model`` (loaded on the CPU and checked) across devices as ``device_map`` says.

    Args:
        model: a ``transformers`` model on the CPU.
        device_map: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a JSON file
            {module name: device} (devices: a GPU index, ``cpu`` or ``disk``).
        max_memory: memory per device for this model, e.g. ``"0=20GiB,cpu=8GiB"``; what does not
            fit goes to disk.
        offload_folder: where disk-offloaded weights go; default: a temporary folder removed when
            the model is freed (a folder given is used for a new subfolder, removed the same way).

    Returns:
        The model, with Accelerate's hooks (``model.hf_device_map`` says where each module is).
    """
    from accelerate import dispatch_model

    mapping = _device_map(model, device_map, parse_max_memory(max_memory))
    offload_dir = None
    if "disk" in mapping.values():
        root = Path(offload_folder) if offload_folder else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        offload_dir = tempfile.mkdtemp(prefix="sumcircuit-offload-", dir=root)
        weakref.finalize(model, shutil.rmtree, offload_dir, True)  # only the folder this call made
    gpus = sorted(d for d in mapping.values() if isinstance(d, int))
    main = gpus[0] if gpus else "cpu"
    dispatched: nn.Module = dispatch_model(model, device_map=mapping, main_device=main, offload_dir=offload_dir)
    return dispatched


def execution_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first GPU when placed by a device map, else where its weights are."""
    mapping: Mapping[str, Any] | None = getattr(model, "hf_device_map", None)
    if mapping:
        on_gpu = [d for d in mapping.values() if d not in ("cpu", "disk")]
        if not on_gpu:
            return torch.device("cpu")
        return torch.device(f"cuda:{on_gpu[0]}" if isinstance(on_gpu[0], int) else on_gpu[0])
    return next(model.parameters()).device


@contextmanager
def onloaded(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Inside, ``module`` (a part of ``model``) has its real weights, also where a device map offloaded them.

    Code that reads weights rather than running the module (the weight-change
    table) needs this; Accelerate's hooks bring them in only around a forward.
    """
    if not getattr(model, "hf_device_map", None):
        yield
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    name = next(n for n, m in model.named_modules() if m is module)
    with ExitStack() as stack:
        for other, sub in model.named_modules():
            related = other in ("", name) or name.startswith(other + ".") or other.startswith(name + ".")
            if related and has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub))
        yield
