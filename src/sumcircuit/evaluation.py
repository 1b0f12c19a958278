"""Evaluation: generate summaries and score them with the standard ROUGE.

Numbers from here are cited, so every choice that moves them is fixed and
recorded in ``rouge.json``:

- ROUGE is Google's ``rouge-score`` (the package behind most published
  figures) with the Porter stemmer; F1 is reported as a fraction in [0, 1].
- ROUGE-Lsum needs one sentence per line, otherwise it silently equals
  ROUGE-L. NLTK's punkt model is not available offline, so predictions and
  references go through the same deterministic splitter,
  :func:`split_sentences` (existing newlines, then sentence-final punctuation).
- Several references: each metric takes the best reference for that metric
  (``RougeScorer.score_multi``: the reference with the highest F1 per metric).
- Confidence intervals: percentile bootstrap over documents (the method of
  ``rouge_score.scoring.BootstrapAggregator``), seeded so reruns agree.
- Generation is greedy by default (beam search optional), batched with left
  padding and the KV cache, and stops at the tokenizer's EOS, which training
  appends after every summary. ``GenerationConfig.stop`` adds text stop
  sequences for models that never emit EOS (zero-shot, e.g. ``"\\n\\n"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from sumcircuit import distributed as dist
from sumcircuit.artifacts import append_jsonl, atomic_write_json, atomic_write_text, to_json_line
from sumcircuit.data import DataConfig, Encoded, ExampleSet, check_context, collate, encode, load_examples, template_needs_summary
from sumcircuit.errors import DataError, SumcircuitError
from sumcircuit.models import LoadedModel, ensure_loaded, load_adapter
from sumcircuit.options import (
    GENERATION_BATCH_SIZE,
    GENERATION_MAX_NEW_TOKENS,
    GENERATION_NO_REPEAT_NGRAM,
    GENERATION_NUM_BEAMS,
    ROUGE_TYPES,
)
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import file_sha256, provenance
from sumcircuit.results import Result
from sumcircuit.stats import bootstrap_ci

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
ROUGE_FILE = "rouge.json"


class EvaluationError(SumcircuitError):
    """A bad evaluation setting or an output folder that cannot be resumed."""


@dataclass(frozen=True)
class GenerationConfig:
    """How summaries are generated. Greedy unless ``num_beams`` > 1; never sampled."""

    max_new_tokens: int = GENERATION_MAX_NEW_TOKENS
    num_beams: int = GENERATION_NUM_BEAMS
    no_repeat_ngram_size: int = GENERATION_NO_REPEAT_NGRAM  # 0 = off
    batch_size: int = GENERATION_BATCH_SIZE
    stop: tuple[str, ...] = ()  # text stop sequences, besides EOS

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise EvaluationError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if any(not s for s in self.stop):
            raise EvaluationError("stop sequences must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))


# ---------------------------------------------------------------- sentence splitting

# Words whose trailing period does not end a sentence (compared lowercased, without the period).
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "gen", "col", "lt", "sgt", "capt",
    "gov", "sen", "rep", "rev", "pres", "inc", "ltd", "co", "corp", "no", "vs", "etc", "approx",
    "e.g", "i.e", "fig", "eq", "al", "cf", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec",
})
# Sentence-final punctuation, optional closing quotes/brackets, whitespace, then a sentence start.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)*[A-Za-z]$")  # "J", "U.S", "e.g"


def _ends_with_abbreviation(text: str) -> bool:
    word = text.rsplit(None, 1)[-1] if text.strip() else ""
    word = word.lstrip("\"'(\u201c\u2018[")
    return word.lower() in _ABBREVIATIONS or bool(_INITIALS.match(word))


def split_sentences(text: str) -> list[str]:
    """Deterministic sentence splitter for ROUGE-Lsum (punkt is not available offline).

    Existing newlines always separate sentences (CNN/DailyMail highlights are
    one per line). Within a line, a sentence ends at ``.``, ``!`` or ``?``
    (plus closing quotes/brackets) followed by whitespace and an upper-case
    letter or digit, unless the period follows a known abbreviation
    (``Mr.``, ``e.g.``) or an initial (``J.``, ``U.S.``).
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for match in _BOUNDARY.finditer(line):
            punct = line[match.start()]
            if punct == "." and _ends_with_abbreviation(line[start:match.start()]):
                continue
            sentences.append(line[start:match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def sentence_lines(text: str) -> str:
    """The text with one sentence per line: what rouge-score's Lsum expects."""
    return "\n".join(split_sentences(text))


# ---------------------------------------------------------------- ROUGE and bootstrap

@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    # split_summaries=False: we split ourselves (its own splitter needs punkt data).
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True, split_summaries=False)


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """Per-example ROUGE-1/2/L/Lsum F1; with several references, the best one per metric."""
    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions but {len(references)} reference sets")
    scorer = _scorer()
    out = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs:
            raise EvaluationError(f"example {i}: references must be a non-empty list of strings")
        scores = scorer.score_multi([sentence_lines(r) for r in refs], sentence_lines(pred))
        out.append({k: float(scores[k].fmeasure) for k in ROUGE_TYPES})
    return out


def aggregate(per_example: Sequence[dict[str, float]], n_resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, dict[str, float]]:
    """Mean F1 and its bootstrap CI per metric."""
    out = {}
    for key in ROUGE_TYPES:
        values = [s[key] for s in per_example]
        low, high = bootstrap_ci(values, n_resamples, seed, level)
        out[key] = {"f1": float(np.mean(values)), "ci_low": low, "ci_high": high}
    return out


# ---------------------------------------------------------------- generation

@dataclass(frozen=True)
class Generated:
    text: str
    new_tokens: int  # generated tokens up to and including EOS, or up to the stop point
    stop_reason: str  # "eos", "stop" (a text stop sequence) or "length"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop sequence that follows some content.

    Leading whitespace is skipped first, so a model that opens with a blank
    line is not cut to an empty summary by the stop sequence ``"\\n\\n"``.
    """
    body = text.lstrip()
    hits = [i for i in (body.find(s) for s in stops) if i >= 0]
    return (body[:min(hits)], True) if hits else (body, False)


class _StopOnText(StoppingCriteria):
    """Marks rows done once their new text contains a stop sequence (rows are independent)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, tuple(stops)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [cut_at_stop(t, self.stops)[1] for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """The end-of-summary marker: the tokenizer's EOS (what training appends) and the model's."""
    ids = {loaded.tokenizer.eos_token_id}
    gen_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@contextmanager
def _only_our_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """Hide the model folder's generation_config.json (it may ask for sampling or penalties):
    generation must depend on :class:`GenerationConfig` alone."""
    saved = model.generation_config
    model.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _decode_row(tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos_ids: set[int],
                pad_id: int | None, stops: Sequence[str]) -> Generated:
    eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    body = tokens[:eos_at] if eos_at is not None else tokens
    text, hit = cut_at_stop(str(tokenizer.decode(body, skip_special_tokens=True)), stops)
    if hit:  # count the tokens up to the stop; a row may run on while others are unfinished
        n_new = next(k for k in range(1, len(body) + 1)
                     if cut_at_stop(str(tokenizer.decode(body[:k], skip_special_tokens=True)), stops)[1])
        return Generated(text.strip(), n_new, "stop")
    if eos_at is not None:
        return Generated(text.strip(), eos_at + 1, "eos")
    n_new = len(body)
    while n_new and body[n_new - 1] == pad_id:  # padding after a stop, when pad is not EOS
        n_new -= 1
    return Generated(text.strip(), n_new, "length")


@torch.inference_mode()
def generate_summaries(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[Encoded], cfg: GenerationConfig,
                       eos_ids: Sequence[int]) -> list[Generated]:
    """Generate for one batch: left padding (so every row's next token is at the end),
    attention mask and position ids from the mask (done by ``generate``), KV cache."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(eos_ids) or [0])[0]
    batch = collate(prompts, pad_id, padding_side="left")
    device = next(model.parameters()).device
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    width = input_ids.shape[1]
    hf_cfg = HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=cfg.num_beams,
        num_return_sequences=1, no_repeat_ngram_size=cfg.no_repeat_ngram_size or None,
        repetition_penalty=1.0, length_penalty=1.0, use_cache=True,
        eos_token_id=list(eos_ids) or None, pad_token_id=pad_id)
    criteria = StoppingCriteriaList([_StopOnText(tokenizer, width, cfg.stop)] if cfg.stop else [])
    with _only_our_generation_config(model):
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=hf_cfg,  # type: ignore[operator]
                             stopping_criteria=criteria)
    new = out[:, width:].tolist()
    return [_decode_row(tokenizer, row, set(eos_ids), pad_id, cfg.stop) for row in new]


# ---------------------------------------------------------------- run

def _load_adapter(loaded: LoadedModel, adapter: str | Path) -> LoadedModel:
    if not Path(adapter).is_dir():
        raise EvaluationError(f"adapter folder not found: {adapter}")
    return load_adapter(loaded, adapter, merge=True)


def _adapter_provenance(adapter: str | Path | None) -> dict[str, Any] | None:
    if adapter is None:
        return None
    folder = Path(adapter).resolve()
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")}
    return {"path": str(folder), "files_sha256": files}


def _check_positions(loaded: LoadedModel, encoded: Sequence[Encoded], cfg: GenerationConfig) -> None:
    """The longest prompt plus the generated tokens must fit the model's positions (the rule of ``data``)."""
    longest = max(len(e.input_ids) for e in encoded) + cfg.max_new_tokens
    try:
        check_context(loaded.tokenizer, longest, f"the longest prompt plus --max-new-tokens ({longest} tokens)")
    except DataError as exc:
        raise EvaluationError(f"{exc}; lower --max-tokens or --max-new-tokens") from None


def _run_id(loaded: LoadedModel, adapter: dict[str, Any] | None, examples: ExampleSet,
            data_cfg: DataConfig, gen_cfg: GenerationConfig) -> str:
    """What determines the predictions: contents, not how paths are spelled; n_docs is left out so a longer rerun resumes."""
    model = {k: v for k, v in loaded.provenance().items() if k not in ("spec", "location")}
    data = {k: v for k, v in examples.source.identity().items() if k != "data"}
    key: dict[str, Any] = {"model": model, "adapter": adapter, "data": data,
                           "data_config": {**asdict(data_cfg), "n_docs": None, "data": None}, "generation": asdict(gen_cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records written so far; a line cut by a kill is dropped (and the file repaired)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise EvaluationError(f"{path}:{i + 1}: corrupt line; delete the file or use --overwrite") from None
            logger.warning("%s: dropping a partial last line from an interrupted run", path)
            atomic_write_text(path, "".join(ln + "\n" for ln in lines[:-1]))
    return records


def _resume(out_dir: Path, run_id: str, overwrite: bool) -> dict[int, dict[str, Any]]:
    path = out_dir / PREDICTIONS_FILE
    if overwrite and path.exists():
        path.unlink()
    records = _read_predictions(path)
    other = {r.get("run_id") for r in records} - {run_id}
    if other:
        raise EvaluationError(f"{path} holds predictions from a different model, data or generation "
                              f"config; use another --out or --overwrite")
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


def _generate_missing(loaded: LoadedModel, examples: ExampleSet, encoded: list[Encoded],
                      done: dict[int, Any], gen_cfg: GenerationConfig, eos_ids: list[int],
                      run_id: str, path: Path, progress: bool = True) -> None:
    """Generate what ``done`` lacks, batch by batch.

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
    with bar:
        _generate_rounds(loaded, examples, encoded, todo, done, gen_cfg, eos_ids, run_id, path, bar)


def _generate_rounds(loaded: LoadedModel, examples: ExampleSet, encoded: list[Encoded], todo: list[int],
                     done: dict[int, Any], gen_cfg: GenerationConfig, eos_ids: list[int], run_id: str,
                     path: Path, bar: Any) -> None:
    for batches in dist.rounds(len(todo), gen_cfg.batch_size):
        idx = [todo[i] for i in batches[dist.rank()]]
        t0 = time.perf_counter()
        records = _generate_batch(loaded, examples, encoded, idx, gen_cfg, eos_ids, run_id) if idx else []
        for part in dist.gather_to_main(records) or []:  # rank 0 only: the others get None
            for record in part:  # appended per batch: an interrupted run resumes here
                append_jsonl(path, record)
            done.update({r["index"]: r for r in part})
        bar.update(sum(len(b) for b in batches))
        if dist.is_main_process():
            logger.info("generated %d/%d (%.2f summaries/s)", len(done), len(encoded),
                        sum(len(b) for b in batches) / (time.perf_counter() - t0))


@writes_output("evaluate", "out_dir")
def run_evaluate(model_spec: str | LoadedModel, data_cfg: DataConfig, gen_cfg: GenerationConfig,
                 out_dir: str | Path, adapter: str | Path | None = None, *, device: str = "cpu",
                 dtype: str = "float32", seed: int = 0, n_resamples: int = 1000, level: float = 0.95,
                 overwrite: bool = False, trust_remote_code: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Generate summaries for ``data_cfg``, score them, write ``predictions.jsonl`` and ``rouge.json``.

    Reruns with the same model, data and generation config skip documents
    already in ``predictions.jsonl``. ``model_spec`` may be a loaded model.
    """
    if not template_needs_summary(data_cfg.template):
        raise EvaluationError("evaluate needs a template with {summary}: the text before it is the "
                              "prompt, and the references are read from the summary field")
    out = Path(out_dir)
    examples = load_examples(data_cfg)
    dist.setup(device)
    with dist.main_process_first():  # rank 0 fills the GGUF cache, the others read it
        loaded = ensure_loaded(model_spec, dtype=dtype, device=dist.local_device(device),
                               trust_remote_code=trust_remote_code)
    if adapter is not None:
        loaded = _load_adapter(loaded, adapter)
    adapter_prov = _adapter_provenance(adapter)
    encoded = [encode(loaded.tokenizer, ex, data_cfg.template, data_cfg.max_tokens, with_summary=False,
                      summary_budget=gen_cfg.max_new_tokens)
               for ex in examples.examples]
    _check_positions(loaded, encoded, gen_cfg)
    eos_ids = eos_token_ids(loaded)
    run_id = _run_id(loaded, adapter_prov, examples, data_cfg, gen_cfg)
    # Rank 0 reads (or discards) the predictions file; the others only need to know what is done.
    done: dict[int, Any] = dist.on_main(lambda: _resume(out, run_id, overwrite)) or {}
    finished = dist.broadcast_from_main(sorted(done) if dist.is_main_process() else None)
    if not dist.is_main_process():
        done = dict.fromkeys(finished)
    torch.manual_seed(seed)  # greedy and beam search draw nothing; recorded for completeness
    _generate_missing(loaded, examples, encoded, done, gen_cfg, eos_ids, run_id, out / PREDICTIONS_FILE,
                      progress)

    def finish() -> dict[str, Any]:
        records = [done[i] for i in range(len(encoded))]
        result = _summarize(records, gen_cfg, eos_ids, n_resamples, seed, level)
        result["provenance"] = provenance(
            models=[loaded.provenance()], adapter=adapter_prov, data=examples.source.provenance(), seed=seed,
            config={"data": asdict(data_cfg), "generation": asdict(gen_cfg)}, run_id=run_id,
            invalid_records_skipped=len(examples.invalid), processes=dist.world_size())
        atomic_write_json(out / ROUGE_FILE, result)
        return result

    return dist.broadcast_from_main(dist.on_main(finish))  # the same scores on every rank


def _summarize(records: Sequence[dict[str, Any]], gen_cfg: GenerationConfig, eos_ids: list[int],
               n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    gen_s = sum(r["generation_s"] for r in records)
    new_tokens = sum(r["new_tokens"] for r in records)
    reasons = {k: sum(r["stop_reason"] == k for r in records) for k in ("eos", "stop", "length")}
    result: dict[str, Any] = dict(aggregate([r["scores"] for r in records], n_resamples, seed, level))
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
            "ci": {"method": "percentile bootstrap over documents", "n_resamples": n_resamples,
                   "level": level, "seed": seed}},
    })
    return result


@dataclass
class EvaluationResult(Result):
    """ROUGE of generated summaries: ``summary`` (rouge.json) and one record per document."""

    kind: ClassVar[str] = "evaluation"
    main_table: ClassVar[str] = "predictions"
    summary: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        rows = [{"index": r["index"], "doc_id": r["doc_id"], "prediction": r["prediction"],
                 "references": r["references"], **r["scores"], "stop_reason": r["stop_reason"],
                 "new_tokens": r["new_tokens"]} for r in self.predictions]
        return {"predictions": rows}

    def rouge(self, metric: str = "rouge1") -> float:
        return float(self.summary[metric]["f1"])

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``predictions.jsonl`` and ``rouge.json``."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / PREDICTIONS_FILE, "".join(to_json_line(r) for r in self.predictions))
        atomic_write_json(folder / ROUGE_FILE, self.summary)
        return folder


def evaluate(model: str | LoadedModel, data: DataConfig, config: GenerationConfig | None = None, *,
             out: str | Path, adapter: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
             seed: int = 0, n_resamples: int = 1000, level: float = 0.95, overwrite: bool = False,
             trust_remote_code: bool = False, progress: bool = True) -> EvaluationResult:
    """Generate summaries of ``data`` with ``model`` and score them with ROUGE (resumable in ``out``)."""
    summary = run_evaluate(model, data, config or GenerationConfig(), out, adapter, device=device, dtype=dtype,
                           seed=seed, n_resamples=n_resamples, level=level, overwrite=overwrite,
                           trust_remote_code=trust_remote_code, progress=progress)
    records = sorted(_read_predictions(Path(out) / PREDICTIONS_FILE), key=lambda r: int(r["index"]))
    return EvaluationResult(summary, records)
