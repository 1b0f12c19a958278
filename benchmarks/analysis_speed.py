"""Speed and peak memory of `sumcircuit analyze` against its floor and against eager attention maps.

In one process, on the same documents, for a random GPT-2-small-shaped pair
(12 layers, 12 heads, d=768) at T=512 and T=1024 and for the real
smollm2-135m-instruct pair (the model vs a copy with 1e-3 relative noise):

  (a) floor    two plain SDPA forward passes of the model bodies (no LM head), no statistics
  (b) analysis sumcircuit.analysis.analyze_models (all statistics, CKA included)
  (b') no-CKA  the same without linear CKA
  (c) eager    HF eager with output_attentions=True for both models, then the per-head entropy and
               KL (both directions) and residual norms computed from the returned maps
  (d) TransformerLens 4 (TransformerBridge + run_with_cache), when it can run offline

Peak RSS is sampled every 2 ms by a thread while each method runs (absolute
process RSS, models included). Usage:

    python benchmarks/analysis_speed.py [--threads 2] [--docs 3] [--lengths 512 1024]
"""

from __future__ import annotations

import argparse
import copy
import gc
import gzip
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4" / "train.jsonl.gz"


# ---------------------------------------------------------------- measuring

def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one call."""
    gc.collect()
    peak = [_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        thread.join()
    return elapsed, max(peak[0], _rss())


# ---------------------------------------------------------------- methods

def floor(base, tuned, batches) -> None:  # type: ignore[no-untyped-def]
    from sumcircuit.capture import body

    with torch.no_grad():
        for ids in batches:
            body(base)(input_ids=ids, use_cache=False)
            body(tuned)(input_ids=ids, use_cache=False)


def analysis(base, tuned, encoded, cka: bool = True) -> None:  # type: ignore[no-untyped-def]
    from sumcircuit.adapters import ArchitectureAdapter
    from sumcircuit.analysis import AnalysisConfig, analyze_models

    cfg = AnalysisConfig(batch_size=1, progress=False, cka=cka, n_bootstrap=200)
    analyze_models(base, tuned, ArchitectureAdapter.for_model(base), encoded, cfg, pad_token_id=0)


def eager(base, tuned, batches) -> None:  # type: ignore[no-untyped-def]
    """Eager attention maps of both models, then the same per-head statistics from them."""
    from sumcircuit.capture import body

    old = (base.config._attn_implementation, tuned.config._attn_implementation)
    base.config._attn_implementation = tuned.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            for ids in batches:
                ob = body(base)(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
                ot = body(tuned)(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
                for pb, pt in zip(ob.attentions, ot.attentions):
                    lpb = torch.where(pb > 0, pb.log(), 0.0)
                    lpt = torch.where(pt > 0, pt.log(), 0.0)
                    _ = (-(pb * lpb).sum(-1).mean(-1), -(pt * lpt).sum(-1).mean(-1),
                         (pb * (lpb - lpt)).sum(-1).mean(-1), (pt * (lpt - lpb)).sum(-1).mean(-1))
                for hb, ht in zip(ob.hidden_states[1:], ot.hidden_states[1:]):
                    _ = (hb.norm(dim=-1).mean(), ht.norm(dim=-1).mean())
                del ob, ot
    finally:
        base.config._attn_implementation, tuned.config._attn_implementation = old


def transformer_lens_status() -> str | None:
    """None if TransformerLens 4 can run here, else why not."""
    try:
        import transformer_lens  # noqa: F401
    except ImportError:
        return ("skipped: transformer-lens is not installed (not a sumcircuit dependency; "
                "`pip install transformer-lens` to include it)")
    return ("skipped: TransformerBridge.boot_transformers needs a hub model name and downloads weights; "
            "random/local pairs cannot be booted offline")


# ---------------------------------------------------------------- setup

def documents(tokenizer, length: int, n_docs: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The first ``n_docs`` training articles with at least ``length`` tokens, cut to ``length``."""
    out = []
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        for line in fh:
            ids = tokenizer(json.loads(line)["article"], add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                out.append(ids[:length])
            if len(out) == n_docs:
                return out
    raise SystemExit(f"not enough articles with {length} tokens")


def gpt2_pair(max_len: int):  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=max_len, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    torch.manual_seed(1)
    tuned = GPT2LMHeadModel(cfg).eval()
    return base, tuned


def smollm2_pair():  # type: ignore[no-untyped-def]
    from sumcircuit.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    tuned = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * p.abs().mean())
    return loaded.model, tuned


def run_pair(name: str, base, tuned, docs: list[list[int]], rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    from sumcircuit.data import Encoded

    length = len(docs[0])
    batches = [torch.tensor([d]) for d in docs]
    encoded = [Encoded(f"d{i}", d, [-100] * len(d), (0, len(d)), (len(d), len(d)), len(d), False, False)
               for i, d in enumerate(docs)]
    warm = [torch.tensor([docs[0][:64]])]
    floor(base, tuned, warm)
    analysis(base, tuned, [Encoded("w", docs[0][:64], [-100] * 64, (0, 64), (64, 64), 64, False, False)])
    tokens = len(docs) * length
    methods: list[tuple[str, Callable[[], object]]] = [
        ("(a) floor: 2x SDPA body", lambda: floor(base, tuned, batches)),
        ("(b) sumcircuit analyze", lambda: analysis(base, tuned, encoded)),
        ("(b') sumcircuit, no CKA", lambda: analysis(base, tuned, encoded, cka=False)),
        ("(c) eager maps + stats", lambda: eager(base, tuned, batches)),
    ]
    floor_t = floor_m = None
    for label, fn in methods:
        seconds, peak = measure(fn)
        if floor_t is None:
            floor_t, floor_m = seconds, peak
        rows.append({"model": name, "T": length, "method": label, "tok_s": tokens / seconds,
                     "s_per_doc": seconds / len(docs), "peak_gb": peak / 1e9,
                     "time_x": seconds / floor_t, "rss_x": peak / floor_m})
        print(_fmt(rows[-1]), flush=True)
    rows.append({"model": name, "T": length, "method": "(d) TransformerLens 4", "skip": transformer_lens_status()})
    print(_fmt(rows[-1]), flush=True)


def _fmt(row: dict) -> str:
    head = f"{row['model']:<22} T={row['T']:<5} {row['method']:<26}"
    if "skip" in row:
        return f"{head} {row['skip']}"
    return (f"{head} {row['tok_s']:8.0f} tok/s  {row['s_per_doc']:7.2f} s/doc  peak RSS {row['peak_gb']:5.2f} GB"
            f"  time {row['time_x']:5.2f}x  RSS {row['rss_x']:5.2f}x of (a)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--skip-real", action="store_true", help="only the GPT-2-shaped pair")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sumcircuit.models import load_model

    tokenizer = load_model("smollm2-135m-instruct").tokenizer  # real token ids for both pairs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32, "
          f"{args.docs} documents per setting, batch size 1", flush=True)
    rows: list[dict] = []
    base, tuned = gpt2_pair(max(args.lengths))
    for length in args.lengths:
        run_pair("gpt2-small-shaped", base, tuned, documents(tokenizer, length, args.docs), rows)
    del base, tuned
    gc.collect()
    if not args.skip_real:
        base, tuned = smollm2_pair()
        for length in args.lengths:
            run_pair("smollm2-135m-instruct", base, tuned, documents(tokenizer, length, args.docs), rows)
    print("\nsummary")
    for row in rows:
        print(_fmt(row))


if __name__ == "__main__":
    main()
