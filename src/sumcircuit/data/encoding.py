"""Examples become causal-LM inputs: token ids, the loss mask over the summary, padded batches.

:func:`encode` tokenizes the template's pieces separately so that the
summary's tokens and the loss mask are exact, truncating the *document* so
that the summary always survives; :func:`collate` pads a batch (right for
training and analysis, left for generation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sumcircuit.data.config import DEFAULT_MAX_TOKENS, DEFAULT_TEMPLATE, DataConfig, Template, template_needs_summary
from sumcircuit.data.records import DataSource, Example
from sumcircuit.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example. Spans are [start, end) token positions."""

    doc_id: str
    input_ids: list[int]
    labels: list[int]
    document_span: tuple[int, int]
    summary_span: tuple[int, int]  # the summary tokens and the EOS; empty without {summary}
    document_tokens: int  # before truncation
    truncated: bool
    summary_truncated: bool

    @property
    def prompt_length(self) -> int:
        """Tokens before the summary: the prompt a generator continues."""
        return self.summary_span[0] if self.summary_span[1] > self.summary_span[0] else len(self.input_ids)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # split_special_tokens: a document that contains "<|im_end|>" is text, not a control token.
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS token if this tokenizer adds one by itself (Gemma does, GPT-2 and SmolLM2 do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _move_trailing_spaces(left: str, right: str) -> tuple[str, str]:
    """'TL;DR: ' + 'The' -> 'TL;DR:' + ' The': byte-level BPE attaches spaces to the next word."""
    stripped = left.rstrip(" ")
    return stripped, left[len(stripped):] + right


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, template: str = DEFAULT_TEMPLATE,
           max_tokens: int = DEFAULT_MAX_TOKENS, *, with_summary: bool = True,
           summary_budget: int | None = None) -> Encoded:
    """Tokenize ``example`` with ``template``; truncate the document to fit ``max_tokens``.

    Pieces are tokenized separately so the summary's tokens and the loss mask
    are exact. With ``with_summary=False`` only the prompt is produced (for
    generation). With ``summary_budget`` (the generation length) the document
    is truncated to leave that many tokens, so the prompt does not depend on
    the reference; without it, the document is truncated as in training.
    """
    tpl = Template.parse(template)
    summary_text = example.summary if tpl.has_summary else ""
    if tpl.has_summary and not summary_text and with_summary:
        raise DataError("empty summary", file=example.where, field="summary")
    pre, doc_text = _move_trailing_spaces(tpl.pre, example.text)
    mid, summ_text = _move_trailing_spaces(tpl.mid, summary_text) if tpl.has_summary else (tpl.mid, "")
    bos, pre_ids, mid_ids = _bos(tokenizer), _tokens(tokenizer, pre), _tokens(tokenizer, mid)
    doc_ids = _tokens(tokenizer, doc_text)
    sum_ids, post_ids, eos = [], [], []
    if tpl.has_summary:
        sum_ids, post_ids = _tokens(tokenizer, summ_text), _tokens(tokenizer, tpl.post)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fixed = len(bos) + len(pre_ids) + len(mid_ids)
    if not with_summary and summary_budget is not None:  # the reference's length must not leak
        sum_ids = [0] * max(0, summary_budget - len(post_ids) - len(eos))
    tail = sum_ids + post_ids + eos
    min_doc = min(len(doc_ids), max(1, max_tokens // 8))
    summary_truncated = fixed + min_doc + len(tail) > max_tokens
    if summary_truncated:  # only when the summary alone nearly fills the window
        keep = max(0, max_tokens - fixed - min_doc - len(post_ids) - len(eos))
        sum_ids = sum_ids[:keep]
        tail = sum_ids + post_ids + eos
    budget = max(0, max_tokens - fixed - len(tail))
    kept_doc = doc_ids[:budget]
    if doc_ids and not kept_doc:
        raise DataError(f"`max_tokens` {max_tokens} leaves no room for the document after the template and "
                        f"{len(tail)} summary tokens", file=example.where)
    prompt = bos + pre_ids + kept_doc + mid_ids
    doc_start = len(bos) + len(pre_ids)
    document_span = (doc_start, doc_start + len(kept_doc))
    if not with_summary:
        return Encoded(example.doc_id, prompt, [IGNORE_INDEX] * len(prompt), document_span,
                       (len(prompt), len(prompt)), len(doc_ids), len(kept_doc) < len(doc_ids),
                       summary_truncated)
    input_ids = prompt + tail
    summary_span = (len(prompt), len(input_ids)) if tpl.has_summary else (len(input_ids), len(input_ids))
    labels = [IGNORE_INDEX] * len(prompt) + (list(tail) if tpl.has_summary else [])
    return Encoded(example.doc_id, input_ids, labels, document_span, summary_span, len(doc_ids),
                   len(kept_doc) < len(doc_ids), summary_truncated)


def check_context(tokenizer: PreTrainedTokenizerBase, max_tokens: int, what: str | None = None) -> None:
    """Every sequence must fit the model's positions (``load_model`` records them on the tokenizer).

    One rule for every family and command: past its learned positions GPT-2 fails inside torch, and
    past its trained context a RoPE model still runs but gives numbers nobody should cite.
    ``what`` names the length in the message (default: ``--max-tokens N``).
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_tokens:
        raise DataError(f"{what or f'`max_tokens` {max_tokens}'} exceeds the model's {limit} positions")


def encode_all(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: DataConfig, *,
               need_summary_tokens: bool = False, source: DataSource | None = None) -> list[Encoded]:
    """Encode every example. ``need_summary_tokens``: a loss on summaries must have some to average over.

    ``source``: the examples' source, which then records how many documents and
    summaries were cut, so that every output citing it says so.
    """
    check_context(tokenizer, cfg.max_tokens)
    encoded = [encode(tokenizer, ex, cfg.template, cfg.max_tokens) for ex in examples]
    cut = sum(e.summary_truncated for e in encoded)
    if source is not None:
        source.truncated_documents, source.truncated_summaries = sum(e.truncated for e in encoded), cut
    if cut:  # the loss then covers only part of those summaries: say so
        log.warning("%d of %d summaries were cut to fit --max-tokens %d (%s)", cut, len(encoded), cfg.max_tokens,
                    cfg.data)
    if need_summary_tokens:
        if not template_needs_summary(cfg.template):
            raise DataError(f"`template` {cfg.template!r} has no {{summary}}: a summary loss needs one")
        if encoded and not any(e.summary_span[1] > e.summary_span[0] for e in encoded):
            raise DataError(f"no summary tokens in {len(encoded)} documents at `max_tokens` {cfg.max_tokens}",
                            file=cfg.data)
    return encoded


def collate(batch: Sequence[Encoded], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Right padding for training/analysis, left padding for generation.

    Besides ids, mask and labels, returns ``document_mask`` and ``summary_mask``
    (bool, [B, T]) so statistics can be restricted to a region.
    """
    length = max(len(e.input_ids) for e in batch)
    out = {k: torch.full((len(batch), length), v, dtype=torch.long)
           for k, v in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    out["document_mask"] = torch.zeros((len(batch), length), dtype=torch.bool)
    out["summary_mask"] = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids)
        off = length - n if padding_side == "left" else 0
        out["input_ids"][row, off:off + n] = torch.tensor(enc.input_ids)
        out["attention_mask"][row, off:off + n] = 1
        out["labels"][row, off:off + n] = torch.tensor(enc.labels)
        out["document_mask"][row, off + enc.document_span[0]:off + enc.document_span[1]] = True
        out["summary_mask"][row, off + enc.summary_span[0]:off + enc.summary_span[1]] = True
    return out


