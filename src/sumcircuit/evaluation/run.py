"""``evaluate``: generate summaries and score them with ROUGE, resumably.

Numbers from here are cited, so every choice that moves them is fixed and
recorded in ``rouge.json``: the generation config, the ROUGE package and its
settings, the sentence splitter for ROUGE-Lsum and the interval method.
Reruns into the same folder with the same model, data and generation config
skip documents already in ``predictions.jsonl``; under N processes batches
are dealt round-robin and rank 0 appends each round in batch order, so the
file reads as a single process's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.artifacts import append_jsonl, atomic_write_json
from sumcircuit.data.config import DataConfig, coerce_data, template_needs_summary
from sumcircuit.data.encoding import Encoded, check_context, encode
from sumcircuit.data.records import ExampleSet, load_examples
from sumcircuit.errors import DataError
from sumcircuit.evaluation.config import EvaluationConfig, EvaluationError, GenerationConfig, coerce_evaluation
from sumcircuit.evaluation.generation import eos_token_ids, generate_summaries
from sumcircuit.evaluation.packed_weights import packed_linears
from sumcircuit.evaluation.result import PREDICTIONS_FILE, ROUGE_FILE, EvaluationResult, read_predictions
from sumcircuit.evaluation.rouge import aggregate, rouge_scores
from sumcircuit.models import LoadedModel, ModelLike, ensure_loaded
from sumcircuit.outputs import remove_outputs, writes_output
from sumcircuit.provenance import provenance
from sumcircuit.runtime import Runtime, coerce_runtime

logger = logging.getLogger(__name__)


def _check_positions(loaded: LoadedModel, encoded: Sequence[Encoded], cfg: GenerationConfig) -> None:
    """The longest prompt plus the generated tokens must fit the model's positions (the rule of ``data``)."""
    longest = max(len(e.input_ids) for e in encoded) + cfg.max_new_tokens
    try:
        check_context(loaded.tokenizer, longest, f"the longest prompt plus `max_new_tokens` ({longest} tokens)")
    except DataError as exc:
        raise EvaluationError(f"{exc}; lower `max_tokens` or `max_new_tokens`") from None


def _run_id(loaded: LoadedModel, examples: ExampleSet, data_cfg: DataConfig, gen_cfg: GenerationConfig) -> str:
    """What determines the predictions: contents, not how paths are spelled; n_docs is left out so a longer rerun resumes."""
    model = {k: v for k, v in loaded.provenance().items() if k not in ("spec", "location")}
    data = {k: v for k, v in examples.source.identity().items() if k != "data"}
    key: dict[str, Any] = {"model": model, "adapter": None, "data": data,
                           "data_config": {**asdict(data_cfg), "n_docs": None, "data": None},
                           "generation": asdict(gen_cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume(out: Path, run_id: str) -> dict[int, dict[str, Any]]:
    path = out / PREDICTIONS_FILE
    records = read_predictions(path)
    other = {r.get("run_id") for r in records} - {run_id}
    if other:
        raise EvaluationError(f"{path} holds predictions from a different model, data or generation "
                              "config; use another output folder, or resume=False (--overwrite) to replace them")
    return {int(r["index"]): r for r in records}


def _generate_batch(loaded: LoadedModel, examples: ExampleSet, encoded: list[Encoded], idx: list[int],
                    gen_cfg: GenerationConfig, eos_ids: list[int], run_id: str) -> list[dict[str, Any]]:
    """Generate and score one batch: the records that go to ``predictions.jsonl``."""
    t0 = time.perf_counter()
    outs = generate_summaries(loaded.model, loaded.tokenizer, [encoded[i] for i in idx], gen_cfg, eos_ids)
    seconds = time.perf_counter() - t0
    refs = [list(examples.examples[i].references) for i in idx]
    scores = rouge_scores([o.text for o in outs], refs)
    return [{"index": i, "doc_id": examples.examples[i].doc_id, "prediction": o.text,
             "references": r, "scores": s, "stop_reason": o.stop_reason, "new_tokens": o.new_tokens,
             "prompt_tokens": len(encoded[i].input_ids), "document_truncated": encoded[i].truncated,
             "generation_s": seconds / len(idx), "run_id": run_id}
            for i, o, r, s in zip(idx, outs, refs, scores)]


def _generate_missing(loaded: LoadedModel, examples: ExampleSet, encoded: list[Encoded], done: dict[int, Any],
                      gen_cfg: GenerationConfig, eos_ids: list[int], run_id: str, path: Path | None,
                      progress: bool = True) -> None:
    """Generate what ``done`` lacks, batch by batch, appending each round to ``path`` (if any).

    Under N processes the batches (the same ones one process would form) are
    dealt round-robin; each round's records are gathered to rank 0, which
    appends them in batch order, so ``predictions.jsonl`` reads as a
    single-process run's and an interrupted run resumes at a round boundary.
    """
    todo = [i for i in range(len(encoded)) if i not in done]
    if len(todo) < len(encoded) and dist.is_main_process():
        logger.info("resuming: %d of %d documents already done", len(encoded) - len(todo), len(encoded))
    bar = tqdm(total=len(encoded), initial=len(encoded) - len(todo), desc="generate", unit="doc",
               disable=not progress or not dist.is_main_process(), dynamic_ncols=True)
    # packed once for every batch (generate_summaries alone packs per call); generation needs no gradients
    with bar, torch.no_grad(), packed_linears(loaded.model, gen_cfg.packed_weights):
        for batches in dist.rounds(len(todo), gen_cfg.batch_size):
            idx = [todo[i] for i in batches[dist.rank()]]
            t0 = time.perf_counter()
            records = _generate_batch(loaded, examples, encoded, idx, gen_cfg, eos_ids, run_id) if idx else []
            for part in dist.gather_to_main(records) or []:  # rank 0 only: the others get None
                if path is not None:
                    for record in part:  # appended per batch: an interrupted run resumes here
                        append_jsonl(path, record)
                done.update({r["index"]: r for r in part})
            bar.update(sum(len(b) for b in batches))
            if dist.is_main_process():
                logger.info("generated %d/%d (%.2f summaries/s)", len(done), len(encoded),
                            sum(len(b) for b in batches) / (time.perf_counter() - t0))


def _summarize(records: Sequence[dict[str, Any]], cfg: EvaluationConfig, eos_ids: list[int]) -> dict[str, Any]:
    gen_cfg = cfg.generation
    gen_s = sum(r["generation_s"] for r in records)
    new_tokens = sum(r["new_tokens"] for r in records)
    reasons = {k: sum(r["stop_reason"] == k for r in records) for k in ("eos", "stop", "length")}
    result: dict[str, Any] = dict(aggregate([r["scores"] for r in records], cfg.n_bootstrap, cfg.seed, cfg.ci_level))
    result.update({
        "n": len(records),
        "summaries_per_s": len(records) / gen_s if gen_s > 0 else None,
        "generation": {
            **asdict(gen_cfg), "decoding": "greedy" if gen_cfg.num_beams == 1 else "beam search",
            "eos_token_ids": eos_ids, "stop_reasons": reasons, "wall_s": gen_s,
            "new_tokens": new_tokens, "tokens_per_s": new_tokens / gen_s if gen_s > 0 else None,
            "mean_new_tokens": new_tokens / len(records), "torch_threads": torch.get_num_threads()},
        "scoring": {
            "package": "rouge-score", "use_stemmer": True, "measure": "F1, fraction in [0, 1]",
            "lsum_sentences": "sumcircuit.evaluation.split_sentences (newlines, then .!? before a "
                              "capital or digit, except abbreviations), same for predictions and references",
            "multi_reference": "best reference per metric (RougeScorer.score_multi: max F1)",
            "ci": {"method": "studentized (bootstrap-t) over documents, as the claims", "n_bootstrap": cfg.n_bootstrap,
                   "ci_level": cfg.ci_level, "seed": cfg.seed}},
    })
    return result


def _evaluate(model: ModelLike, data_cfg: DataConfig, cfg: EvaluationConfig, out: Path | None, rt: Runtime,
              resume: bool) -> EvaluationResult:
    if not template_needs_summary(data_cfg.template):
        raise EvaluationError("evaluate needs a template with {summary}: the text before it is the "
                              "prompt, and the references are read from the summary field")
    gen_cfg = cfg.generation
    examples = load_examples(data_cfg)
    dist.setup(rt.device)
    with dist.main_process_first():  # rank 0 fills the GGUF cache, the others read it
        loaded = ensure_loaded(model, runtime=rt.with_device(dist.local_device(rt.device)))
    encoded = [encode(loaded.tokenizer, ex, data_cfg.template, data_cfg.max_tokens, with_summary=False,
                      summary_budget=gen_cfg.max_new_tokens)
               for ex in examples.examples]
    _check_positions(loaded, encoded, gen_cfg)
    eos_ids = eos_token_ids(loaded)
    run_id = _run_id(loaded, examples, data_cfg, gen_cfg)
    if out is not None and not resume and dist.is_main_process():
        remove_outputs(out, EvaluationResult.files)
    # Rank 0 reads the predictions file; the others only need to know what is done.
    done: dict[int, Any] = (dist.on_main(lambda: _resume(out, run_id)) or {}) if out is not None else {}
    finished = dist.broadcast_from_main(sorted(done) if dist.is_main_process() else None)
    if not dist.is_main_process():
        done = dict.fromkeys(finished)
    torch.manual_seed(cfg.seed)  # greedy and beam search draw nothing; recorded for completeness
    _generate_missing(loaded, examples, encoded, done, gen_cfg, eos_ids, run_id,
                      out / PREDICTIONS_FILE if out is not None else None, rt.progress)

    def finish() -> EvaluationResult:
        records = [done[i] for i in range(len(encoded))]
        summary = _summarize(records, cfg, eos_ids)
        summary["provenance"] = provenance(
            models=[loaded.provenance()], adapter=None, data=examples.source.provenance(), seed=cfg.seed,
            config={"data": asdict(data_cfg), "generation": asdict(gen_cfg)}, run_id=run_id,
            invalid_records_skipped=len(examples.invalid), processes=dist.world_size(), dtype=rt.dtype)
        if out is not None:
            atomic_write_json(out / ROUGE_FILE, summary)
        return EvaluationResult(summary, records)

    return dist.broadcast_from_main(dist.on_main(finish))  # the same scores on every rank


@writes_output("evaluate", "out")
def _evaluate_into(model: ModelLike, data: DataConfig, cfg: EvaluationConfig, out: str | Path, rt: Runtime,
                   resume: bool) -> EvaluationResult:
    return _evaluate(model, data, cfg, Path(out), rt, resume)


def evaluate(model: ModelLike, data: DataConfig | Any, config: EvaluationConfig | GenerationConfig | None = None, *,
             runtime: Runtime | None = None, out: str | Path | None = None, resume: bool = True) -> EvaluationResult:
    """Generate summaries of ``data`` with ``model`` and score them with ROUGE.

    Args:
        model: a model spec (an adapter folder too), a loaded model, or a result holding one.
        data: a :class:`~sumcircuit.data.DataConfig` with a ``{summary}`` template (the references).
        config: generation and interval settings (a :class:`GenerationConfig` alone is accepted).
        runtime: device, dtype, progress.
        out: write ``predictions.jsonl`` (batch by batch) and ``rouge.json`` here.
        resume: skip documents already in ``out``'s predictions (same model, data and generation
            config); False starts over.

    Returns:
        Mean ROUGE-1/2/L/Lsum F1 with bootstrap intervals, generation statistics, one record per document.

    Example:
        >>> import sumcircuit as sc
        >>> data = sc.DataConfig("../shared/data/cnndm_gpt4", split="val", n_docs=16, max_tokens=256)
        >>> sc.evaluate("runs/full/final", data, sc.GenerationConfig(max_new_tokens=64)).rouge()  # doctest: +SKIP
    """
    cfg = coerce_evaluation(config)
    rt = coerce_runtime(runtime)
    rt.require_whole_models("generation")
    data_cfg = coerce_data(data)
    if out is None:
        return _evaluate(model, data_cfg, cfg, None, rt, resume)
    return _evaluate_into(model, data_cfg, cfg, out, rt, resume)


def report_lines(result: EvaluationResult) -> list[str]:
    """What ``sumcircuit evaluate`` prints: ROUGE with intervals, generation speed and stop reasons."""
    from sumcircuit.evaluation.config import ROUGE_TYPES

    s = result.summary
    ci = s["scoring"]["ci"]
    lines = [f"ROUGE F1 (rouge-score, Porter stemmer), n = {s['n']}, 95% bootstrap CI ({ci['n_bootstrap']} "
             "resamples):"]
    lines += [f"  {key:<10} {s[key]['f1']:.4f}  [{s[key]['ci_low']:.4f}, {s[key]['ci_high']:.4f}]"
              for key in ROUGE_TYPES]
    gen, rate = s["generation"], s["summaries_per_s"]
    lines.append(f"generation: {rate:.3f} summaries/s, {gen['tokens_per_s']:.1f} tokens/s, "
                 f"{gen['mean_new_tokens']:.1f} tokens per summary; stopped by {gen['stop_reasons']}"
                 if rate else "generation: no time recorded")
    lines.append(f"wrote {PREDICTIONS_FILE}, {ROUGE_FILE}")
    return lines
