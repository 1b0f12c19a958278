"""``analyze``: compare a base and a tuned model head by head, layer by layer and neuron by neuron.

With ``out`` the run goes shard by shard, checkpointing its mergeable sums
after each shard so an interrupted run resumes; under N processes
(``accelerate launch``) each round gives rank ``r`` the ``r``-th of ``N``
consecutive shards, the round's sums are all-reduced, per-document rows
gathered to rank 0 in document order, and rank 0 alone merges, checkpoints
and writes (see :mod:`sumcircuit.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.adapters import ArchitectureAdapter
from sumcircuit.analysis.config import AnalysisConfig, AnalysisError
from sumcircuit.analysis.result import AnalysisResult, write_outputs
from sumcircuit.analysis.state import (
    STATE_FILE,
    AnalysisState,
    accumulate,
    check_compatible,
    check_same_tokenizer,
    device_of,
    load_state,
    save_state,
)
from sumcircuit.analysis.summarize import finalize
from sumcircuit.analysis.weights import weight_changes
from sumcircuit.config import coerce_config
from sumcircuit.data.config import DataConfig, coerce_data, template_needs_summary
from sumcircuit.data.encoding import Encoded, encode_all
from sumcircuit.data.records import load_examples
from sumcircuit.metrics import CrossMoments
from sumcircuit.models import ModelLike, ensure_loaded
from sumcircuit.outputs import remove_outputs, writes_output
from sumcircuit.provenance import provenance
from sumcircuit.runtime import Runtime, coerce_runtime

log = logging.getLogger(__name__)


def analyze_models(base: nn.Module, tuned: nn.Module, adapter: ArchitectureAdapter | None, encoded: Sequence[Encoded],
                   config: AnalysisConfig | None = None, pad_token_id: int = 0, *,
                   progress: bool = False) -> AnalysisResult:
    """Compare two models on ``encoded`` in memory (no files).

    The models are left as they were (attention implementation, hooks and
    train/eval mode are restored), so this can run between training steps.

    Args:
        base: the model before fine-tuning.
        tuned: the fine-tuned model (same architecture).
        adapter: their architecture adapter (None: looked up).
        encoded: the documents, encoded.
        config: how statistics are collected.
        pad_token_id: the padding id of the shared tokenizer.
        progress: show a progress bar.

    Returns:
        The analysis, without provenance (the caller knows what the models are).
    """
    config = config or AnalysisConfig()
    checked = check_compatible(base, tuned)
    adapter = adapter if adapter is not None else checked
    if not encoded:
        raise AnalysisError("no documents to analyze")
    state = AnalysisState.empty(adapter, config.cka, device_of(base))
    bar = tqdm(total=len(encoded), desc="analyze", unit="doc", disable=not progress)
    with bar:
        accumulate(base, tuned, adapter, encoded, config, pad_token_id, state, bar)
    return finalize(state, config, weight_changes(base, tuned, adapter, config.kernels))


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@writes_output("analyze", "out")
def _analyze_into(base: ModelLike, tuned: ModelLike, data: DataConfig, config: AnalysisConfig,
                  out: str | Path, runtime: Runtime, resume: bool) -> AnalysisResult | None:
    """Load, analyze shard by shard (resumable), and write every output file to ``out``.

    Everything that can refuse the run (models, data) comes before the first
    change to ``out``. Returns the result on rank 0 and None on the other ranks.
    """
    data_cfg = data
    dist.setup(runtime.device)
    device = dist.local_device(runtime.device)
    folder = Path(out)
    with dist.main_process_first():  # rank 0 fills the GGUF cache, the others read it
        base_m, tuned_m = (ensure_loaded(m, runtime=runtime.with_device(device)) for m in (base, tuned))
    check_same_tokenizer(base_m.tokenizer, tuned_m.tokenizer)
    adapter = check_compatible(base_m.model, tuned_m.model)
    examples = load_examples(data_cfg)
    encoded = encode_all(base_m.tokenizer, examples.examples, data_cfg, source=examples.source)
    if not resume and dist.is_main_process():  # the old set goes first: nothing of it can be read as current
        remove_outputs(folder, AnalysisResult.files)
    base, tuned = base_m, tuned_m
    pad_id = int(base.tokenizer.pad_token_id)

    def fingerprint() -> str:  # hashes every weight: rank 0 only
        return _fingerprint({
            "base": base.weights_sha256(), "tuned": tuned.weights_sha256(),
            "data": {**examples.source.identity(), "skipped_invalid_records": examples.source.skipped_invalid},
            "data_cfg": {k: v for k, v in asdict(data_cfg).items() if k != "n_docs"},
            "config": config.fingerprint_fields(), "dtype": str(runtime.dtype)})

    def load() -> tuple[str, AnalysisState]:
        fp = fingerprint()
        saved = _resume(folder / STATE_FILE, fp, [e.doc_id for e in encoded])
        return fp, saved if saved is not None else AnalysisState.empty(adapter, config.cka)

    # Only rank 0 holds the merged state (and reads / writes the checkpoint); the others learn how
    # many documents it covers, so every rank starts at the same document.
    fp, state = dist.on_main(load) or ("", None)
    done = int(dist.broadcast_from_main(state.n_docs if state is not None else None))
    cross_device = device_of(base.model)
    single = not dist.is_distributed()
    bar = tqdm(total=len(encoded), initial=done, desc="analyze", unit="doc",
               disable=not runtime.progress or not dist.is_main_process())
    started = time.perf_counter()
    with bar:
        for shards in dist.rounds(len(encoded) - done, config.shard_size):
            mine = shards[dist.rank()]
            shard = AnalysisState.empty(adapter, config.cka, cross_device)
            accumulate(base.model, tuned.model, adapter, encoded[done + mine.start:done + mine.stop], config,
                       pad_id, shard, bar if single else None)
            pooled = _to_cpu(shard) if single else _pool_round(shard)
            if state is not None and pooled is not None:  # rank 0: merge and checkpoint
                state = state.merge(pooled)
                save_state(state, folder / STATE_FILE, {"fingerprint": fp, "docs_done": str(state.n_docs)})
            if not single:
                bar.update(sum(len(s) for s in shards))
    seconds = time.perf_counter() - started  # this run's documents only (a resumed run skips the rest)

    def finish() -> AnalysisResult:
        assert state is not None  # rank 0
        result = finalize(state, config, weight_changes(base.model, tuned.model, adapter, config.kernels))
        prov = provenance(models=[base.provenance(), tuned.provenance()], data=examples.source.provenance(),
                          seed=config.seed, config=asdict(config), data_config=asdict(data_cfg),
                          template=data_cfg.template, n_docs=state.n_docs,
                          n_tokens=result.summary["n_tokens"], device=str(device), dtype=str(runtime.dtype),
                          invalid_records=len(examples.invalid), processes=dist.world_size(),
                          timing={"accumulate_s": seconds, "docs": len(encoded) - done,
                                  "tokens": int(state.tokens()[done:].sum()),
                                  "tokens_per_s": float(state.tokens()[done:].sum()) / seconds if seconds else None})
        result.summary["provenance"] = prov
        write_outputs(result, folder, prov)
        return result

    return dist.on_main(finish)


def _pool_round(shard: AnalysisState) -> AnalysisState | None:
    """Every rank's shard of one round as one state on rank 0 (None on the other ranks).

    Counts, sums and sums of squares are all-reduced (fp64); CKA moments are
    re-centred on the pooled mean and all-reduced (:meth:`CrossMoments.pooled`);
    per-document rows are gathered, and rank order is document order because
    rank ``r`` holds the round's ``r``-th consecutive shard.
    """
    summed = dist.all_reduce_sum_dict(shard.additive_tensors())
    cross = shard.cross.pooled(dist.all_reduce_sum) if shard.cross is not None else None
    rows: list[dict[str, Any]] | None = dist.gather_to_main({"doc_ids": shard.doc_ids, "doc_tokens": shard.tokens(),
                                                             **{f"per_doc.{k}": shard.doc_sums(k)
                                                                for k in shard.per_doc}})
    if rows is None:
        return None
    merged: dict[str, Tensor] = {**summed, "doc_tokens": torch.cat([r["doc_tokens"] for r in rows])}
    for key in (k for k in rows[0] if k.startswith("per_doc.")):
        merged[key] = torch.cat([r[key] for r in rows])
    if cross is not None:
        merged.update({k: v.cpu() for k, v in cross.state("cross").items()})
    meta = {**shard.metadata(), "doc_ids": json.dumps(dist.ordered_concat([r["doc_ids"] for r in rows]))}
    return AnalysisState.from_tensors(merged, meta)


def _to_cpu(state: AnalysisState) -> AnalysisState:
    if state.cross is not None:
        state.cross = CrossMoments(*(getattr(state.cross, f.name).cpu() for f in fields(state.cross)))
    return state


def _resume(path: Path, fingerprint: str, doc_ids: list[str]) -> AnalysisState | None:
    """The saved state if it belongs to this run and covers a prefix of its documents."""
    if not path.is_file():
        return None
    try:
        state, meta = load_state(path)
    except Exception as exc:  # a damaged file (safetensors raises its own types)
        raise AnalysisError(f"{path}: the resume file is damaged ({type(exc).__name__}); "
                            "start over with resume=False (--restart)") from None
    if meta.get("fingerprint") != fingerprint:
        raise AnalysisError(f"{path.parent} holds an analysis of other models, data or settings; "
                            "use another output folder, or resume=False (--restart) to replace it")
    if state.doc_ids != doc_ids[:len(state.doc_ids)]:
        raise AnalysisError(f"{path.parent} was computed on other documents; "
                            "start over with resume=False (--restart)")
    log.info("resuming after %d documents from %s", state.n_docs, path)
    return state


def analyze(base: ModelLike, tuned: ModelLike, data: DataConfig | Any, config: AnalysisConfig | None = None, *,
            runtime: Runtime | None = None, out: str | Path | None = None, resume: bool = True) -> AnalysisResult:
    """Compare ``base`` and ``tuned`` head by head and neuron by neuron on ``data``.

    Args:
        base: the model before fine-tuning: a model spec, a loaded model, or a result that holds one.
        tuned: the fine-tuned model (same architecture and tokenizer), in any of those forms.
        data: a :class:`~sumcircuit.data.DataConfig` (or a path, or a ``datasets.Dataset``).
        config: how statistics are collected (default :class:`AnalysisConfig`).
        runtime: device, dtype, progress bars.
        out: write the outputs here, shard by shard; None computes in memory.
        resume: continue from the finished shards of the same run in ``out``; False starts over
            (sumcircuit's earlier analysis files there are replaced).

    Returns:
        The per-head, per-layer and per-neuron tables, tensors and summary (with provenance).
        Under N processes only rank 0 gets it; the other ranks raise.

    Example:
        >>> import sumcircuit as sc
        >>> data = sc.DataConfig("../shared/data/cnndm_gpt4", split="val", n_docs=8, max_tokens=256)
        >>> result = sc.analyze("smollm2-135m-instruct", "runs/full/final", data)  # doctest: +SKIP
        >>> result.summary["share_heads_entropy_decreased"]  # doctest: +SKIP
    """
    cfg = coerce_config(AnalysisConfig, config)
    rt = coerce_runtime(runtime)
    data_cfg = coerce_data(data)
    if cfg.region == "summary" and not template_needs_summary(data_cfg.template):
        raise AnalysisError(f"region 'summary' needs a template with {{summary}}; got {data_cfg.template!r}")
    if out is not None:
        result = _analyze_into(base, tuned, data_cfg, cfg, out, rt, resume)
        if result is None:
            raise AnalysisError("this process is not rank 0: rank 0 holds the result")
        return result
    base_m, tuned_m = (ensure_loaded(m, runtime=rt) for m in (base, tuned))
    check_same_tokenizer(base_m.tokenizer, tuned_m.tokenizer)
    examples = load_examples(data_cfg)
    encoded = encode_all(base_m.tokenizer, examples.examples, data_cfg, source=examples.source)
    result = analyze_models(base_m.model, tuned_m.model, base_m.adapter, encoded, cfg,
                            int(base_m.tokenizer.pad_token_id), progress=rt.progress)
    result.summary["provenance"] = provenance(
        models=[base_m.provenance(), tuned_m.provenance()], data=examples.source.provenance(), seed=cfg.seed,
        config=asdict(cfg), data_config=asdict(data_cfg), n_docs=len(encoded),
        invalid_records=len(examples.invalid))
    return result


def analyze_to_folder(base: ModelLike, tuned: ModelLike, data: DataConfig, config: AnalysisConfig | None, out: str | Path,
                      runtime: Runtime | None = None, resume: bool = True) -> AnalysisResult | None:
    """:func:`analyze` into ``out`` under any number of processes: the result on rank 0, None elsewhere (the CLI)."""
    cfg = coerce_config(AnalysisConfig, config)
    data_cfg = coerce_data(data)
    if cfg.region == "summary" and not template_needs_summary(data_cfg.template):
        raise AnalysisError(f"region 'summary' needs a template with {{summary}}; got {data_cfg.template!r}")
    return _analyze_into(base, tuned, data_cfg, cfg, out, coerce_runtime(runtime), resume)
