"""Speed and peak memory of `sumcircuit analyze` against its floor, eager attention maps and TransformerLens.

In one process, on the same documents, for a random GPT-2-small-shaped pair
(12 layers, 12 heads, d=768) and for the real smollm2-135m-instruct pair (the
model vs a copy with 1e-3 relative noise), at each length T:

  floor          two plain SDPA forward passes of the model bodies (no LM head), no statistics
  sumcircuit     sumcircuit.analysis.analyze_models (every statistic, CKA included), statistics
                 kernels compiled in C++ (the default on CPU)
  no CKA         the same without linear CKA
  eager kernels  sumcircuit with --kernels eager (the fallback where no C++ compiler is found)
  eager maps     HF eager attention with output_attentions=True for both models, then the
                 per-head entropy, KL (both directions) and residual norms from the returned maps
  TransformerLens  TransformerLens 4: TransformerBridge booted on the same in-memory models,
                 run_with_cache of hook_pattern and hook_resid_post, then the same statistics

Each method runs ``--rounds`` times in interleaved rounds (A B C D E A B C D E
...), so a busy spell on a shared machine hits every method alike. Each ratio is
taken within its round (method / floor of the same round); the table gives the
median ratio and its min-max over rounds, for wall time and for the process's CPU
time (which leaves out the time other tenants of a shared host take the cores).

After each length's rounds, one untimed pair of runs compares the default path with the eager
score tiles (entropy, KL, CKA, neuron SDs): on CUDA this is the fused kernel's exactness at
real shapes.

Peak RSS is sampled every 2 ms by a thread while a method runs. It is reported as
the process's peak with the pair of models resident: the models' own RSS plus the
method's peak above the RSS before its call (so TransformerLens's copies of the
models, made once before the rounds, count against nobody). With ``--device cuda``
the same is done with the GPU's allocated memory (``torch.cuda.max_memory_allocated``)
and every method is timed up to ``torch.cuda.synchronize``; sumcircuit's default
there is the fused path (``--kernels auto`` = fused on CUDA), and "eager kernels"
is the score-tile path. ``--dtype bfloat16`` runs the models in bf16 (statistics stay fp32).
``--shapes-only`` needs neither the GGUF nor ``../shared`` (a bare GPU machine): random
token ids, and a random LLaMA pair of smollm2's shape in place of the real model. Usage:

    python benchmarks/analysis_speed.py [--threads 2] [--docs 2] [--rounds 3] [--lengths 512 1024] [--batch-size 1]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--skip-real | --shapes-only]
        [--methods analyze no-cka eager-kernels eager-maps lens]

On a shared, noisy host, fewer methods and more rounds resolve a ratio better, e.g.
``--skip-real --lengths 1024 --methods analyze --rounds 11`` (the floor always runs).

On a GPU machine, the exactness tests first, then the timings:

    python -m pytest -q tests/test_cuda.py
    python benchmarks/analysis_speed.py --device cuda --threads 16 --shapes-only --docs 8 --rounds 5 \
        --lengths 512 1024 2048

`make bench` runs it in `.venv-tl`, an overlay of `.venv` with TransformerLens installed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import gzip
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4" / "train.jsonl.gz"


# ---------------------------------------------------------------- measuring

DEVICE = torch.device("cpu")  # --device
DTYPE = torch.float32  # --dtype
# smollm2-135m-instruct's shape, for --shapes-only (timings depend on shapes, not on weights)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=True)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident() -> int:
    """Bytes held now: the process's RSS, or the GPU's allocated memory."""
    return torch.cuda.memory_allocated(DEVICE) if DEVICE.type == "cuda" else _rss()


def _measure_cuda(fn: Callable[[], object]) -> tuple[float, float, int]:
    torch.cuda.synchronize(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    torch.cuda.synchronize(DEVICE)
    return (time.perf_counter() - start, time.process_time() - cpu,
            torch.cuda.max_memory_allocated(DEVICE) - before)


def measure(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(seconds, CPU seconds of the process, peak RSS above the RSS before the call in bytes) of one call.

    CPU time leaves out the time a shared host's other tenants take the cores away (steal), which
    wall time does not; OpenMP's spinning threads count in both, for every method alike.
    """
    gc.collect()
    if DEVICE.type == "cuda":
        return _measure_cuda(fn)
    before = _rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        fn()
    finally:
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
        stop.set()
        thread.join()
    return elapsed, cpu_elapsed, max(peak[0], _rss()) - before


@dataclass
class Timings:
    """Per-round seconds and peak-above-baseline bytes of one method."""

    seconds: list[float] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- statistics from full maps

def _map_stats(patterns_b, patterns_t, hidden_b, hidden_t) -> None:  # type: ignore[no-untyped-def]
    """The per-head statistics sumcircuit computes, from materialized ``[B, H, T, T]`` maps."""
    for pb, pt in zip(patterns_b, patterns_t):
        lpb = torch.where(pb > 0, pb.log(), 0.0)
        lpt = torch.where(pt > 0, pt.log(), 0.0)
        _ = (-(pb * lpb).sum(-1).mean(-1), -(pt * lpt).sum(-1).mean(-1),
             (pb * (lpb - lpt)).sum(-1).mean(-1), (pt * (lpt - lpb)).sum(-1).mean(-1))
    for hb, ht in zip(hidden_b, hidden_t):
        _ = (hb.norm(dim=-1).mean(), ht.norm(dim=-1).mean())


# ---------------------------------------------------------------- methods

def floor(base, tuned, batches) -> None:  # type: ignore[no-untyped-def]
    from sumcircuit.capture import body

    with torch.no_grad():
        for ids in batches:
            body(base)(input_ids=ids, use_cache=False)
            body(tuned)(input_ids=ids, use_cache=False)


def analysis(base, tuned, encoded, cka: bool = True, kernels: str = "auto", batch_size: int = 1):  # type: ignore[no-untyped-def]
    from sumcircuit.adapters import ArchitectureAdapter
    from sumcircuit.analysis import AnalysisConfig, analyze_models

    cfg = AnalysisConfig(batch_size=batch_size, cka=cka, n_bootstrap=200, kernels=kernels)
    return analyze_models(base, tuned, ArchitectureAdapter.for_model(base), encoded, cfg, pad_token_id=0)


AGREEMENT = {"entropy": ("heads.entropy_base", "heads.entropy_tuned"), "KL": ("heads.kl_base_tuned", "heads.kl_tuned_base"),
             "CKA": ("layers.cka",), "neuron SD": ("neurons.std_base", "neurons.std_tuned")}


def agreement(base, tuned, encoded, batch_size: int) -> str:  # type: ignore[no-untyped-def]
    """The default path (fused on CUDA, C++ tiles on CPU) against the eager score tiles: largest differences."""
    a = analysis(base, tuned, encoded, batch_size=batch_size).stats
    b = analysis(base, tuned, encoded, kernels="eager", batch_size=batch_size).stats
    parts = []
    for label, keys in AGREEMENT.items():
        keys = tuple(k for k in keys if k in a)
        if keys:
            diff = max(float((a[k].double() - b[k].double()).abs().nan_to_num().max()) for k in keys)
            scale = max(float(a[k].double().abs().nan_to_num().max()) for k in keys)
            parts.append(f"{label} {diff:.1e} (values up to {scale:.3g})")
    return "largest difference, default vs eager kernels: " + ", ".join(parts)


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
                _map_stats(ob.attentions, ot.attentions, ob.hidden_states[1:], ot.hidden_states[1:])
                del ob, ot
    finally:
        base.config._attn_implementation, tuned.config._attn_implementation = old


def _wanted(name: str) -> bool:
    return name.endswith("hook_pattern") or name.endswith("hook_resid_post")


def lens(bridges, batches) -> None:  # type: ignore[no-untyped-def]
    """TransformerLens 4: cached patterns and residual streams of both bridges, then the same statistics."""
    bridge_b, bridge_t = bridges
    n_layers = bridge_b.cfg.n_layers
    with torch.no_grad():
        for ids in batches:
            _, cb = bridge_b.run_with_cache(ids, names_filter=_wanted)
            _, ct = bridge_t.run_with_cache(ids, names_filter=_wanted)
            pats = [[c[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)] for c in (cb, ct)]
            res = [[c[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)] for c in (cb, ct)]
            _map_stats(pats[0], pats[1], res[0], res[1])
            del cb, ct, pats, res


def lens_bridges(base, tuned, tokenizer) -> tuple[object, object] | str:  # type: ignore[no-untyped-def]
    """TransformerLens 4 bridges on copies of the pair, or why there are none."""
    try:
        import transformer_lens
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return ("skipped: transformer-lens is not installed here (not a sumcircuit dependency; "
                "`make bench` installs it into .venv-tl)")
    version = getattr(transformer_lens, "__version__", "")
    try:
        bridges = tuple(TransformerBridge.boot_transformers(m.name_or_path or "local", hf_model=copy.deepcopy(m),
                                                            tokenizer=tokenizer, device=str(DEVICE))
                        for m in (base, tuned))
    except Exception as exc:  # noqa: BLE001 - report why, keep the rest of the benchmark
        return f"skipped: TransformerLens {version} could not boot the pair: {type(exc).__name__}: {exc}"[:300]
    return bridges[0], bridges[1]


# ---------------------------------------------------------------- setup

def documents(tokenizer, length: int, n_docs: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The first ``n_docs`` training articles with at least ``length`` tokens, cut to ``length`` (if there are not
    that many, consecutive articles joined).

    Without a tokenizer (``--shapes-only``): random ids below smollm2's vocabulary size (both pairs take them).
    """
    if tokenizer is None:
        gen = torch.Generator().manual_seed(length)
        return torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (n_docs, length), generator=gen).tolist()
    for joined in (False, True):  # few articles reach 2048+ tokens: then consecutive articles, concatenated
        out: list[list[int]] = []
        buffer: list[int] = []
        with gzip.open(DATA, "rt", encoding="utf-8") as fh:
            for line in fh:
                ids = tokenizer(json.loads(line)["article"], add_special_tokens=False)["input_ids"]
                buffer = buffer + ids if joined else ids
                if len(buffer) >= length:
                    out.append(buffer[:length])
                    buffer = []
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
    return base.to(DEVICE, DTYPE), tuned.to(DEVICE, DTYPE)


def _perturbed(model):  # type: ignore[no-untyped-def]
    """A copy with 1e-3 relative noise on every weight: the "tuned" model of a pair."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 1e-3 * p.abs().mean())
    return tuned


def smollm2_pair(shapes_only: bool = False):  # type: ignore[no-untyped-def]
    """The real model and a perturbed copy; with ``shapes_only`` a random LLaMA model of its shape."""
    if shapes_only:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="sdpa")).eval().to(DEVICE, DTYPE)
    else:
        from sumcircuit.models import load_model

        base = load_model("smollm2-135m-instruct").model.to(DEVICE, DTYPE)
    return base, _perturbed(base)


METHODS = {"analyze": "sumcircuit analyze", "no-cka": "sumcircuit, no CKA", "eager-kernels": "sumcircuit, eager kernels",
           "eager-maps": "eager maps + stats", "lens": "TransformerLens 4"}  # --methods keys: row labels (the floor always runs)


def run_pair(name: str, base, tuned, tokenizer, lengths: list[int], n_docs: int, rounds: int,  # type: ignore[no-untyped-def]
             rows: list[dict], batch_size: int = 1, methods: Sequence[str] = tuple(METHODS)) -> None:
    from sumcircuit.data import Encoded

    warm_ids = documents(tokenizer, 64, 1)[0]
    floor(base, tuned, [torch.tensor([warm_ids], device=DEVICE)])
    warm = [Encoded("w", warm_ids, [-100] * 64, (0, 64), (64, 64), 64, False, False)]
    analysis(base, tuned, warm)  # builds (or loads) the compiled statistics kernels
    analysis(base, tuned, warm, kernels="eager")
    gc.collect()
    models_rss = _resident()  # the pair resident, before any TransformerLens copy
    bridges = lens_bridges(base, tuned, tokenizer) if "lens" in methods else "not asked for (--methods)"
    if not isinstance(bridges, str):
        lens(bridges, [torch.tensor([warm_ids], device=DEVICE)])
    for length in lengths:
        docs = documents(tokenizer, length, n_docs)
        batches = [torch.tensor(docs[i:i + batch_size], device=DEVICE) for i in range(0, len(docs), batch_size)]
        encoded = [Encoded(f"d{i}", d, [-100] * len(d), (0, len(d)), (len(d), len(d)), len(d), False, False)
                   for i, d in enumerate(docs)]
        timed: dict[str, Callable[[], object]] = {
            "floor: 2x SDPA body": partial(floor, base, tuned, batches),
            "sumcircuit analyze": partial(analysis, base, tuned, encoded, batch_size=batch_size),
            "sumcircuit, no CKA": partial(analysis, base, tuned, encoded, cka=False, batch_size=batch_size),
            "sumcircuit, eager kernels": partial(analysis, base, tuned, encoded, kernels="eager",
                                                 batch_size=batch_size),
            "eager maps + stats": partial(eager, base, tuned, batches),
        }
        if not isinstance(bridges, str):
            timed["TransformerLens 4"] = partial(lens, bridges, batches)
        wanted = {METHODS[m] for m in methods} | {"floor: 2x SDPA body"}
        timed = {label: fn for label, fn in timed.items() if label in wanted}
        timings = {label: Timings() for label in timed}
        for _ in range(rounds):
            for label, fn in timed.items():
                seconds, cpu, extra = measure(fn)
                timings[label].cpu.append(cpu)
                timings[label].seconds.append(seconds)
                timings[label].extra.append(extra)
        floor_t = timings["floor: 2x SDPA body"]
        for label, t in timings.items():
            time_x = [s / f for s, f in zip(t.seconds, floor_t.seconds)]
            rss_x = [(models_rss + e) / (models_rss + f) for e, f in zip(t.extra, floor_t.extra)]
            cpu_x = [c / f for c, f in zip(t.cpu, floor_t.cpu)]
            rows.append({"model": name, "T": length, "method": label, "rounds": rounds,
                         "s_per_doc": statistics.median(t.seconds) / n_docs,
                         "peak_gb": (models_rss + statistics.median(t.extra)) / 1e9,
                         "time_x": statistics.median(time_x), "time_min": min(time_x), "time_max": max(time_x),
                         "cpu_x": statistics.median(cpu_x), "cpu_min": min(cpu_x), "cpu_max": max(cpu_x),
                         "rss_x": statistics.median(rss_x), "rss_min": min(rss_x), "rss_max": max(rss_x)})
            print(_fmt(rows[-1]), flush=True)
        if isinstance(bridges, str) and "lens" in methods:
            rows.append({"model": name, "T": length, "method": "TransformerLens 4", "skip": bridges})
            print(_fmt(rows[-1]), flush=True)
        rows.append({"model": name, "T": length, "method": "exactness (not timed)",
                     "skip": agreement(base, tuned, encoded, batch_size)})
        print(_fmt(rows[-1]), flush=True)


def _fmt(row: dict) -> str:
    head = f"| {row['model']} | {row['T']} | {row['method']} |"
    if "skip" in row:
        return f"{head} {row['skip']} | | | |"
    return (f"{head} {row['s_per_doc']:.2f} | {row['time_x']:.2f}x ({row['time_min']:.2f}-{row['time_max']:.2f}) "
            f"| {row['cpu_x']:.2f}x ({row['cpu_min']:.2f}-{row['cpu_max']:.2f}) "
            f"| {row['peak_gb']:.2f} GB, {row['rss_x']:.2f}x ({row['rss_min']:.2f}-{row['rss_max']:.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="documents per forward pass, for every method")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--skip-real", action="store_true", help="only the GPT-2-shaped pair")
    parser.add_argument("--shapes-only", action="store_true",
                        help="needs neither the GGUF nor ../shared: random token ids, and a random LLaMA pair of "
                             "smollm2's shape in place of the real model (for a bare GPU machine)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="which methods to time beside the floor (fewer methods: more rounds in the same time)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (memory then is the GPU's allocated memory)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the models' dtype (statistics are fp32 whatever it is)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = None
    if not args.shapes_only:
        from sumcircuit.models import load_model

        tokenizer = load_model("smollm2-135m-instruct").tokenizer  # real token ids for both pairs
    device = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else str(DEVICE)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, {args.docs} "
          f"documents per length ({'random ids' if tokenizer is None else 'CNN/DailyMail articles'}), batch size "
          f"{args.batch_size}, {args.rounds} interleaved rounds; ratios to the floor: median (min-max)")
    print("| pair | T | method | s/doc (median) | time vs floor | CPU time vs floor | peak RSS vs floor |\n"
          "|---|---|---|---|---|---|---|",
          flush=True)
    rows: list[dict] = []
    base, tuned = gpt2_pair(max(args.lengths))
    run_pair("gpt2-small-shaped", base, tuned, tokenizer, args.lengths, args.docs, args.rounds, rows, args.batch_size,
             args.methods)
    del base, tuned
    gc.collect()
    if not args.skip_real:
        base, tuned = smollm2_pair(args.shapes_only)
        name = "smollm2-135m-shaped (random)" if args.shapes_only else "smollm2-135m-instruct"
        run_pair(name, base, tuned, tokenizer, args.lengths, args.docs, args.rounds, rows, args.batch_size, args.methods)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
