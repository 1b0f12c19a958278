"""Your own hooks on the pair (or on one model), named by :class:`~sumcircuit.sites.Site`, and a cache of chosen sites.

The fixed pipelines (analysis, patching, attribution) cover the paper's
questions; this is the door for the next ones, in the spirit of
TransformerLens' ``run_with_hooks`` / ``run_with_cache`` and nnsight's
``trace``. Sites are named the one way the package names them (``L2.H3``,
``L5.mlp``, ``blocks.2.attn.hook_z[3]``) and reach the module the adapter
table gives for every family, so one hook works on GPT-2, LLaMA-style and
Gemma 3 alike. A hook sees the site's activation (a head's or a neuron's
slice for those sites) and a :class:`HookContext`; a tensor it returns
replaces that activation. Both models read the same batches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import torch
from torch import Tensor

from sumcircuit.artifacts import atomic_save_safetensors, atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.config import POSITIVE, Config, coerce_config, option
from sumcircuit.data.config import DataConfig, coerce_data
from sumcircuit.data.encoding import IGNORE_INDEX, Encoded, encode_all
from sumcircuit.data.records import load_examples
from sumcircuit.errors import ConfigError, SumcircuitError
from sumcircuit.models import LoadedModel, ModelLike, ensure_loaded
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.placement import execution_device
from sumcircuit.provenance import provenance
from sumcircuit.results import Result, typed_rows
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.sites import Site


@dataclass(frozen=True)
class HookContext:
    """Where a hook is called: which model, which site, which batch (and its documents and mask).

    Args:
        model: ``"base"``, ``"tuned"``, ``"model"`` or the name you gave the model.
        site: the site the hook is attached to.
        batch: the batch's number (batches are the same for every model).
        doc_ids: the batch's documents, one per row.
        attention_mask: ``[B, T]``, 1 at real tokens (batches are right-padded).

    Example:
        >>> def only_tuned(x, ctx):
        ...     return x * 0 if ctx.model == "tuned" else None
    """

    model: str
    site: Site
    batch: int
    doc_ids: tuple[str, ...]
    attention_mask: Tensor


Hook = Callable[[Tensor, HookContext], "Tensor | None"]


@dataclass(frozen=True)
class TraceConfig(Config):
    """How a trace batches its documents.

    Example:
        >>> import sumcircuit as sc
        >>> sc.TraceConfig(batch_size=2).batch_size
        2
    """

    batch_size: int = option(4, help="documents per forward pass", bound=POSITIVE)


class TraceRow(TypedDict):
    """One row of ``trace.csv``: a document's summary loss under one model (NaN without a summary)."""

    doc_id: str
    model: str
    loss: float


@dataclass(repr=False)
class TraceResult(Result):
    """What :func:`trace` returns: per-document losses per model and the cached activations.

    ``cache[model][site name]`` is one ``[tokens, width]`` tensor per document (padding removed).

    Example:
        >>> result = sc.run_with_cache((base, tuned), data, ["L2.H3", "L5.mlp"])  # doctest: +SKIP
        >>> result.activations("L2.H3", "tuned")[0].shape  # doctest: +SKIP
    """

    kind: ClassVar[str] = "trace"
    main_table: ClassVar[str] = "losses"
    files: ClassVar[tuple[str, ...]] = ("trace.json", "trace.csv", "trace_cache.safetensors")
    summary: dict[str, Any]
    losses: list[TraceRow]
    cache: dict[str, dict[str, list[Tensor]]] = field(default_factory=dict)

    def describe(self) -> str:
        models = ", ".join(self.summary.get("models") or [])
        sites = ", ".join(self.summary.get("cached_sites") or []) or "none"
        return f"{self.summary.get('n_docs')} documents through {models}; hooks at " \
               f"{', '.join(self.summary.get('hooked_sites') or []) or 'none'}; cached {sites}"

    def tables(self) -> dict[str, list[Any]]:
        return {"losses": list(self.losses)}

    def activations(self, site: str | Site, model: str | None = None) -> list[Tensor]:
        """The cached activation of ``site`` for every document (``model``: which one, when several ran)."""
        name = Site.parse(site).name
        names = list(self.cache)
        chosen = model if model is not None else (names[0] if len(names) == 1 else None)
        if chosen is None:
            raise ConfigError("model", f"several models ran ({', '.join(names)}): name one")
        if chosen not in self.cache or name not in self.cache[chosen]:
            raise ConfigError("site", f"{name} of {chosen} was not cached (cached: "
                                      f"{', '.join(self.summary.get('cached_sites') or []) or 'none'})")
        return self.cache[chosen][name]

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``trace.json``, ``trace.csv`` (losses) and ``trace_cache.safetensors`` (every cached activation)."""
        folder = Path(out)
        atomic_write_csv(folder / "trace.csv", self.losses, ["doc_id", "model", "loss"])
        tensors = {f"{model}/{site}/{i}": t for model, sites in self.cache.items() for site, docs in sites.items()
                   for i, t in enumerate(docs)}
        if tensors:
            atomic_save_safetensors(tensors, folder / "trace_cache.safetensors")
        atomic_write_json(folder / "trace.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> TraceResult:
        """A trace folder back as a result."""
        p = require_complete(folder)
        cache: dict[str, dict[str, list[Tensor]]] = defaultdict(dict)
        if (p / "trace_cache.safetensors").is_file():
            from safetensors.torch import load_file

            flat = load_file(str(p / "trace_cache.safetensors"))
            for key in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
                model, site, _ = key.split("/")
                cache[model].setdefault(site, []).append(flat[key])
        return cls(read_json(p / "trace.json"), typed_rows(read_csv(p / "trace.csv"), TraceRow), dict(cache))


def _named_models(models: Any) -> dict[str, ModelLike]:
    if isinstance(models, Mapping):
        return {str(k): v for k, v in models.items()}
    if isinstance(models, (tuple, list)):
        if len(models) != 2:
            raise ConfigError("models", f"a sequence of models is (base, tuned), got {len(models)} models")
        return {"base": models[0], "tuned": models[1]}
    return {"model": models}


def _sites(items: Any, param: str) -> list[Site]:
    try:
        return [Site.parse(s) for s in items]
    except ConfigError:
        raise
    except Exception as exc:  # SiteError and friends
        raise ConfigError(param, str(exc)) from None


def _replace_slice(whole: Tensor, site: Site, new: Tensor, width: int) -> Tensor:
    if site.index is None:
        return new
    out = whole.clone()
    out[..., site.index * width:(site.index + 1) * width] = new
    return out


def _run_one(name: str, loaded: LoadedModel, encoded: Sequence[Encoded], hooks: Mapping[Site, Hook],
             cached: Sequence[Site], batch_size: int) -> tuple[list[float], dict[str, list[Tensor]]]:
    from sumcircuit.causal.interventions import Interventions, batches, document_losses, site_value

    adapter = loaded.adapter
    device = execution_device(loaded.model)
    pad = int(loaded.tokenizer.pad_token_id)
    with_labels = all(any(t != IGNORE_INDEX for t in e.labels[1:]) for e in encoded)
    losses = [math.nan] * len(encoded)
    cache: dict[str, list[Tensor | None]] = {s.name: [None] * len(encoded) for s in cached}
    by_activation: dict[tuple[str, int], list[Site]] = defaultdict(list)
    for site in hooks:
        by_activation[site.activation].append(site)
    for number, (idx, batch) in enumerate(batches(encoded, batch_size, pad, device)):
        ctx_base = {"model": name, "batch": number, "doc_ids": tuple(encoded[i].doc_id for i in idx),
                    "attention_mask": batch["attention_mask"]}
        store: dict[tuple[str, int], Tensor] = {}
        with Interventions(loaded.model, adapter) as iv, torch.no_grad():
            for activation, sites in by_activation.items():
                def edit(x: Tensor, sites: list[Site] = sites, ctx_base: dict[str, Any] = ctx_base) -> Tensor | None:
                    changed = None
                    for site in sites:
                        current = changed if changed is not None else x
                        new = hooks[site](site_value(site, current, adapter), HookContext(site=site, **ctx_base))
                        if new is not None:
                            width = adapter.head_dim if site.kind == "attn_head" else 1
                            changed = _replace_slice(current, site, new.to(current.dtype), width)
                    return changed
                iv.edit(activation, edit)
            for activation in sorted({s.activation for s in cached}):
                iv.capture(activation, store)
            if with_labels:
                batch_losses = document_losses(loaded.model, batch).tolist()
            else:
                loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                batch_losses = [math.nan] * len(idx)
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, doc in enumerate(idx):
            losses[doc] = float(batch_losses[row])
            for site in cached:
                value = site_value(site, store[site.activation], adapter)
                cache[site.name][doc] = value[row, :int(lengths[row])].detach().float().cpu().clone()
    return losses, {k: [t for t in v if t is not None] for k, v in cache.items()}


def trace(models: Any, data: DataConfig | Any, *, hooks: Mapping[str | Site, Hook] | None = None,
          cache: Sequence[str | Site] = (), config: TraceConfig | None = None, runtime: Runtime | None = None,
          out: str | Path | None = None) -> TraceResult:
    """Run one model, or base and tuned, over ``data`` with ``hooks`` at sites and ``cache`` of chosen sites.

    Args:
        models: one model (spec, loaded, or a result holding one), ``(base, tuned)``, or ``{name: model}``.
        data: the documents (a :class:`~sumcircuit.data.DataConfig`, a path or a ``datasets.Dataset``).
        hooks: site -> ``fn(activation, context) -> new activation or None``, in every model that runs.
        cache: sites whose activations are kept, per model and document.
        config: batching.
        runtime: device, dtype.
        out: also write the result here.

    Returns:
        Per-document summary losses per model (NaN where a document has no summary) and the cache.

    Example:
        >>> import sumcircuit as sc
        >>> zero_head = lambda x, ctx: x * 0 if ctx.model == "tuned" else None
        >>> result = sc.trace(("smollm2-135m-instruct", "runs/full/final"), data,
        ...                   hooks={"L20.H3": zero_head}, cache=["L20.mlp"])  # doctest: +SKIP
        >>> result.to_pandas().groupby("model")["loss"].mean()  # doctest: +SKIP
    """
    cfg = coerce_config(TraceConfig, config)
    rt = coerce_runtime(runtime)
    named = _named_models(models)
    hook_map = dict(zip(_sites(list((hooks or {}).keys()), "hooks"), (hooks or {}).values()))
    cached = sorted(set(_sites(cache, "cache")))
    data_cfg = coerce_data(data)
    loaded = {name: ensure_loaded(m, runtime=rt) for name, m in named.items()}
    for name, model in loaded.items():
        a = model.adapter
        for param, sites in (("hooks", list(hook_map)), ("cache", cached)):
            for site in sites:
                try:
                    site.check(a.n_layers, a.n_heads, a.n_neurons, "site")
                except SumcircuitError as exc:
                    raise ConfigError(param, f"{exc} ({name})") from None
    first = next(iter(loaded.values()))
    examples = load_examples(data_cfg)
    encoded = encode_all(first.tokenizer, examples.examples, data_cfg, source=examples.source)
    rows: list[TraceRow] = []
    caches: dict[str, dict[str, list[Tensor]]] = {}
    for name, model in loaded.items():
        losses, caches[name] = _run_one(name, model, encoded, hook_map, cached, cfg.batch_size)
        rows += [TraceRow(doc_id=e.doc_id, model=name, loss=loss) for e, loss in zip(encoded, losses)]
    summary = {"n_docs": len(encoded), "models": list(loaded), "hooked_sites": [s.name for s in hook_map],
               "cached_sites": [s.name for s in cached],
               "hook_names": {s.name: s.to_hook_name() for s in [*hook_map, *cached]},
               "provenance": provenance(models=[m.provenance() for m in loaded.values()],
                                        data=examples.source.provenance(), data_config=asdict(data_cfg),
                                        config=cfg.to_dict(), dtype=rt.dtype)}
    result = TraceResult(summary, rows, caches)
    if out is not None:
        result.save(out)
    return result


def run_with_cache(models: Any, data: DataConfig | Any, sites: Sequence[str | Site], **kwargs: Any) -> TraceResult:
    """:func:`trace` with a cache of ``sites`` and no hooks (TransformerLens' ``run_with_cache``).

    Args:
        models: one model, ``(base, tuned)`` or ``{name: model}`` (specs, loaded models or results).
        data: the documents.
        sites: the sites whose activations are kept.
        kwargs: :func:`trace`'s other keywords (``config``, ``runtime``, ``out``).

    Returns:
        The trace: losses per model and document, and the cached activations.

    Example:
        >>> sc.run_with_cache("smollm2-135m-instruct", data, ["L3.attn"]).activations("L3.attn")[0].shape  # doctest: +SKIP
    """
    return trace(models, data, cache=sites, **kwargs)
