"""Checkpoints and exported models: atomic folders, optimizer and RNG state, bitwise resume."""


from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from sumcircuit.artifacts import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    make_public,
    read_json,
)
from sumcircuit.lora import ADAPTER_META, ADAPTER_WEIGHTS
from sumcircuit.lora_export import make_portable, unfuse_lora
from sumcircuit.models import LoadedModel
from sumcircuit.training.config import FinetuneError

# ---------------------------------------------------------------- saving

FINETUNE_META = "sumcircuit_finetune.json"


def base_spec(loaded: LoadedModel) -> str:
    """A spec that finds the base model again: a named model or hub id as is, paths absolute."""
    source = loaded.source
    return source.location if source.kind == "local" or Path(source.spec).suffix == ".gguf" else source.spec


def export_model(model: Any, loaded: LoadedModel, folder: Path, meta: dict[str, Any]) -> None:
    """The user-facing format: a PEFT adapter folder (LoRA) or an HF model folder (full).

    Either is a valid model spec. Written into ``folder``, which the caller renames into place.
    The base weights' hash is ``loaded.weights_sha256()``, which is cached on first call:
    call it before training or LoRA injection changes the model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"base_weights_sha256": loaded.weights_sha256(), "base_dtype": str(loaded.model.dtype), **meta}
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(folder), safe_serialization=True)
        make_portable(folder, loaded.adapter, base_spec(loaded))  # what plain PEFT loads
        atomic_write_json(folder / ADAPTER_META, {"base_model": base_spec(loaded), **meta})
    else:
        model.save_pretrained(str(folder), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(folder))
        atomic_write_json(folder / FINETUNE_META, {"base_model": base_spec(loaded), **meta})
    make_public(folder)  # transformers writes weights 0600; colleagues read results on shared servers


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place: readers see the old folder or the new one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def tmp_dir(target: Path) -> Path:
    """An empty temporary folder beside ``target``, renamed into place when complete."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer state as safetensors (tensors) and JSON (scalars, groups)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{pid}/{key}"] = value
    atomic_save_safetensors(tensors, folder / "optimizer.safetensors")
    atomic_write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore an optimizer saved by :func:`save_optimizer`."""
    from safetensors.torch import load_file

    meta = read_json(folder / "optimizer.json")
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(folder / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(folder: Path) -> None:
    """Python, numpy and torch RNG states, so a resumed run draws what an uninterrupted one would."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    atomic_save_safetensors(tensors, folder / "rng.safetensors")
    atomic_write_json(folder / "rng.json", {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]})


def load_rng(folder: Path) -> None:
    """Restore the RNG states saved by :func:`save_rng`."""
    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    meta = read_json(folder / "rng.json")
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def load_weights(model: Any, folder: Path) -> None:
    """Restore trained weights exported by :func:`export_model` into the live model."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        saved = unfuse_lora(load_file(str(folder / ADAPTER_WEIGHTS)), get_peft_model_state_dict(model))
        result: Any = set_peft_model_state_dict(model, saved)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise FinetuneError(f"checkpoint {folder} does not fit the model: missing {missing[:3]}, "
                                f"unexpected {list(result.unexpected_keys)[:3]}")
        return
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied |= {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise FinetuneError(f"checkpoint {folder} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {list(result.unexpected_keys)[:3]}")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest finished checkpoint folder of a run (None when there is none)."""
    done = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines from steps after the checkpoint: they will be run again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


