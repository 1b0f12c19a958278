"""Generating summaries: greedy (or beam search), batched with left padding and the KV cache.

Generation stops at the tokenizer's EOS, which fine-tuning appends after every
summary; :class:`GenerationConfig` ``stop`` adds text stop sequences for models
that never emit EOS (zero-shot, e.g. ``"\\n\\n"``). A model folder's own
``generation_config.json`` is hidden while generating, so summaries depend on
:class:`GenerationConfig` alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from sumcircuit.data.encoding import Encoded, collate
from sumcircuit.evaluation.config import GenerationConfig
from sumcircuit.evaluation.packed_weights import packed_linears
from sumcircuit.evaluation.screened_head import screened_head
from sumcircuit.models import LoadedModel


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
    attention mask and position ids from the mask (done by ``generate``), KV cache; greedy
    decoding through the bf16-screened head (the fp32 head's tokens, see ``screened_head``); on the CPU
    the other linear layers through oneDNN-packed weights unless ``cfg.packed_weights`` is off."""
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
    # Greedy decoding needs only the arg-max: the LM head runs in bf16 where that provably picks the
    # fp32 token (screened_head); beam search reads every logit and keeps the plain head.
    # Packing comes first, so that it sees (and skips) the real head rather than the screened one.
    greedy = cfg.num_beams == 1
    with (_only_our_generation_config(model), packed_linears(model, cfg.packed_weights),
          screened_head(model) if greedy else contextlib.nullcontext()):
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=hf_cfg,  # type: ignore[operator]
                             stopping_criteria=criteria)
    new = out[:, width:].tolist()
    return [_decode_row(tokenizer, row, set(eos_ids), pad_id, cfg.stop) for row in new]
