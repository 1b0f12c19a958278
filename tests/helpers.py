"""Builders and paths the tests share: tiny random models of the three families, real data paths.

Tiny models are built from configs (no network) and saved as HF folders so
that they go through the same ``load_model`` path as real ones. Their
tokenizer is a byte-level BPE trained on real CNN/DailyMail text.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CNNDM = SHARED_DATA / "cnndm_gpt4"
TINY_VOCAB = 384


def _corpus(n: int = 200) -> list[str]:
    with gzip.open(CNNDM / "train.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    return [r["article"] + "\nTL;DR: " + r["abstract"] for r in rows]


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=TINY_VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def tiny_config(family: str, **overrides: object) -> object:
    """Small configs of each family; sizes chosen so tests run in milliseconds."""
    if family == "gpt2":
        base = dict(vocab_size=TINY_VOCAB, n_positions=256, n_embd=32, n_layer=3, n_head=4,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2Config(**{**base, **overrides})
    if family == "llama":
        base = dict(vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=True)
        return LlamaConfig(**{**base, **overrides})
    if family == "gemma3":
        base = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                    max_position_embeddings=1024,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        return Gemma3TextConfig(**{**base, **overrides})
    raise ValueError(family)


_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM}


def make_tiny_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _CLASSES[family](tiny_config(family, **overrides))
    return model.eval()


def save_tiny(family: str, folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
              **overrides: object) -> Path:
    model = make_tiny_model(family, seed, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


