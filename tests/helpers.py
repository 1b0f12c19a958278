"""Builders and paths the tests share: tiny random models of the three families, real data paths.

Tiny models are built from configs (no network) and saved as HF folders so
that they go through the same ``load_model`` path as real ones. Their
tokenizer is a byte-level BPE trained on real CNN/DailyMail text.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile
import threading
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

from sumcircuit.capture import AttentionInputs, PairRows, RowMask, row_mask

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SUMCIRCUIT_SHARED_DATA", REPO.parent / "shared" / "data"))
HAVE_SHARED = (SHARED_DATA / "cnndm_gpt4" / "train.jsonl.gz").is_file()
TINY_VOCAB = 384

_WORDS = ("the council said new rules would cut costs for families across the region after a long debate "
          "officials warned that prices rose faster than wages while schools and hospitals waited for funds "
          "a spokesman for the company confirmed the plan on monday and said talks would continue this week "
          "police arrested two men near the station and the investigation is still open according to reports").split()


def _synthetic_cnndm() -> Path:
    """A folder like ../shared/data/cnndm_gpt4 (article/abstract, train and val), made of fixed synthetic text.

    Unit tests run on it when ../shared is not beside the checkout; with it, they read the real data.
    """
    root = Path(tempfile.mkdtemp(prefix="sumcircuit-synthetic-")) / "cnndm_gpt4"
    root.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 240), ("val", 100)):
        with gzip.open(root / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for _ in range(n):
                sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(8, 16))).capitalize() + "."
                             for _ in range(rng.randint(6, 14))]
                abstract = " ".join(s for s in rng.sample(sentences, 2))
                fh.write(json.dumps({"article": " ".join(sentences), "abstract": abstract}) + "\n")
    return root


CNNDM = SHARED_DATA / "cnndm_gpt4" if HAVE_SHARED else _synthetic_cnndm()


def _corpus(n: int = 200) -> list[str]:
    with gzip.open(CNNDM / "train.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    return [r["article"] + "\nTL;DR: " + r["abstract"] for r in rows]


def train_tiny_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE of :data:`TINY_VOCAB` tokens, trained on real CNN/DailyMail text unless ``corpus`` is given."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus or _corpus(), vocab_size=TINY_VOCAB, min_frequency=2,
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



# A whole study in seconds on a tiny model (the study tests and benchmarks/scale_out.py): every stage runs.
TINY_HP = dict(lr=1e-3, batch_size=2, grad_accum=1, max_steps=2, eval_every=1, patience=3, val_fraction=0.3)
TINY_STUDY = dict(train_docs=6, val_docs=3, eval_docs=3, analysis_docs=3, causal_docs=3, max_tokens=64,
                  max_new_tokens=6, full=TINY_HP, lora=TINY_HP, targeted=TINY_HP, top_layers=1, top_heads=2,
                  random_controls=3, random_sets=2, eval_batch_size=3)


def save_tiny(family: str, folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
              **overrides: object) -> Path:
    model = make_tiny_model(family, seed, **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- attention references

def random_attention_inputs(g: torch.Generator, B: int, Hq: int, Hkv: int, T: int, Tk: int, D: int,
                            scale: float) -> AttentionInputs:
    """Queries, keys and values of one attention call (CPU); queries doubled so the rows are peaked."""
    return AttentionInputs(torch.randn(B, Hq, T, D, generator=g) * 2, torch.randn(B, Hkv, Tk, D, generator=g),
                           torch.randn(B, Hkv, Tk, D, generator=g), scale)


def explicit_attention(x: AttentionInputs, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, T, Hq, D], probabilities [B, Hq, T, Tk]) in float64 on the CPU, key heads repeated."""
    n_rep = x.query.shape[1] // x.key.shape[1]
    k, v = (t.cpu().double().repeat_interleave(n_rep, dim=1) for t in (x.key, x.value))
    scores = (x.query.cpu().double() @ k.transpose(-1, -2)) * x.scale
    probs = scores.masked_fill(~allowed.cpu(), float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2), probs


def log0(p: torch.Tensor) -> torch.Tensor:
    """log p with 0 where p = 0 (so 0 log 0 = 0)."""
    return torch.where(p > 0, p.log(), 0.0)


ATTENTION_CASES = ["padding+window", "causal", "causal, cached keys"]


def attention_case(kind: str, device: torch.device, head_dim: int = 8
                   ) -> tuple[AttentionInputs, AttentionInputs, torch.Tensor, RowMask, slice]:
    """Two models' inputs (6 query, 2 key heads), the keys each row may see, the mask, the rows that count.

    ``padding+window``: document 1 right-padded from 15, a window of 6;
    ``causal, cached keys``: 4 keys before the first query.
    """
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T = 2, 6, 2, 21
    Tk = T + 4 if kind == "causal, cached keys" else T
    base, tuned = (random_attention_inputs(g, B, Hq, Hkv, T, Tk, head_dim, s / head_dim ** 0.5) for s in (1.1, 0.85))
    allowed = (torch.arange(Tk)[None, :] <= torch.arange(T)[:, None] + (Tk - T))[None, None].repeat(B, 1, 1, 1)
    rows, mask = slice(0, T), RowMask(None, causal=True)
    if kind == "padding+window":
        allowed[1, :, :, 15:] = False  # right padding in document 1
        allowed &= (torch.arange(T)[None, :] > torch.arange(T)[:, None] - 6)  # window 6
        mask = row_mask(allowed, T, T, None, device)
        rows = slice(0, 15)  # rows of document 1 past 15 are padding
    on = [AttentionInputs(x.query.to(device), x.key.to(device), x.value.to(device), x.scale) for x in (base, tuned)]
    return on[0], on[1], allowed, mask, rows


def assert_matches_explicit(base: AttentionInputs, tuned: AttentionInputs, allowed: torch.Tensor, rows: slice,
                            out_b: torch.Tensor, out_t: torch.Tensor, got: PairRows, atol: float = 1e-5) -> None:
    """Both outputs and all four row statistics against float64 softmax, on the rows that count."""
    (ref_b, p_b), (ref_t, p_t) = explicit_attention(base, allowed), explicit_attention(tuned, allowed)
    expected = {"entropy_base": -(p_b * log0(p_b)).sum(-1), "entropy_tuned": -(p_t * log0(p_t)).sum(-1),
                "kl_base_tuned": (p_b * (log0(p_b) - log0(p_t))).sum(-1),
                "kl_tuned_base": (p_t * (log0(p_t) - log0(p_b))).sum(-1)}
    torch.testing.assert_close(out_b[:, rows].cpu().double(), ref_b[:, rows], atol=atol, rtol=0)
    torch.testing.assert_close(out_t[:, rows].cpu().double(), ref_t[:, rows], atol=atol, rtol=0)
    for name, ref in expected.items():
        assert getattr(got, name).dtype == torch.float32
        torch.testing.assert_close(getattr(got, name)[..., rows].cpu().double(), ref[..., rows], atol=1e-5, rtol=0)
    assert float(expected["kl_base_tuned"][..., rows].mean()) > 0.1  # the two rows really differ


def lockstep(jobs):  # type: ignore[no-untyped-def]
    """Run ``job(all_sum)`` in one thread per job; ``all_sum`` sums a tensor over the jobs, as an all-reduce does."""
    barrier = threading.Barrier(len(jobs))
    slots: list[torch.Tensor | None] = [None] * len(jobs)
    results: list[object] = [None] * len(jobs)

    def run(i: int, job) -> None:  # type: ignore[no-untyped-def]
        def all_sum(t: torch.Tensor) -> torch.Tensor:
            slots[i] = t.double().clone()
            barrier.wait()
            total = sum(slots)  # type: ignore[arg-type]
            barrier.wait()
            return total.to(t.dtype)  # type: ignore[union-attr]
        results[i] = job(all_sum)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


# ---------------------------------------------------------------- running the CLI the way a user does

def run_cli(argv: list[str]) -> int:
    """``sumcircuit ARGV`` in this process; argparse's usage errors come back as their exit code."""
    from sumcircuit.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 before any work
        return int(exc.code or 0)


def cli_fails(argv: list[str], capsys, *needles: str, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    """Run the CLI; assert the exit code, no traceback, and every needle in the one-line error (returned)."""
    got = run_cli(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` with its mode and content hash: what "nothing changed" is checked against."""
    import hashlib

    found: dict[str, tuple[int, str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = (path.stat().st_mode & 0o777,
                                                    hashlib.sha256(path.read_bytes()).hexdigest())
        elif path.is_dir():
            found[str(path.relative_to(folder)) + "/"] = (path.stat().st_mode & 0o777, "")
    return found


def perturbed(base, scale: float, seed: int = 1):  # type: ignore[no-untyped-def]
    """A stand-in for a fine-tune of a LoadedModel: decoder-layer weights moved by ``scale`` x a random direction."""
    import copy

    tuned = copy.copy(base)
    tuned.model = copy.deepcopy(base.model)
    tuned._weights_sha256 = None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.adapter.layers(tuned.model).parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.detach().abs().mean().clamp_min(1e-3))
    return tuned


def synthetic_run(label: str, hot_layers: list[int], seed: int, n_layers: int = 16, n_heads: int = 4,
                  n_docs: int = 24, model: str = "m"):  # type: ignore[no-untyped-def]
    """A study (its compare profile) whose KL is high on ``hot_layers`` (every head) above per-document noise."""
    import numpy as np

    from sumcircuit.generalization.profile import CircuitScores, RunProfile

    rng = np.random.default_rng(seed)
    kl = rng.gamma(2.0, 0.01, size=(n_docs, n_layers, n_heads))
    kl[:, hot_layers] += 0.05 + rng.gamma(2.0, 0.01, size=(n_docs, len(hot_layers), n_heads))
    tokens = rng.integers(100, 200, n_docs).astype(float)
    per_doc = {"kl_base_tuned": kl, "tokens": tokens, "entropy_tuned": rng.normal(2, 0.1, kl.shape),
               "entropy_base": rng.normal(2, 0.1, kl.shape)}
    heads = np.average(kl, axis=0, weights=tokens).reshape(-1)
    layers = heads.reshape(n_layers, n_heads).mean(-1)
    k = len(hot_layers)
    picks = sorted(np.argsort(-layers, kind="stable")[:k].tolist())
    head_picks = [f"L{i // n_heads}.H{i % n_heads}" for i in np.argsort(-heads, kind="stable")[:2 * k]]
    circuit = CircuitScores(picks, head_picks, layers, heads)
    analysis = {"n_layers": n_layers, "n_heads": n_heads, "n_docs": n_docs, "share_heads_entropy_decreased": 0.5,
                "share_heads_entropy_decreased_ci": [0.4, 0.6], "mean_kl_base_tuned": float(kl.mean())}
    return RunProfile(label, Path(f"/nonexistent/{label}"), {"model": model, "data": label},
                      {"spec": model, "weights_sha256": model}, analysis, per_doc, [f"d{i}" for i in range(n_docs)],
                      {"kl": circuit, "attribution": circuit})
