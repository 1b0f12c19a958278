"""Greedy generation against the memory-bandwidth floor: plain fp32 head, the bf16-screened head, and the
screened head with the body's linear layers on oneDNN-packed weights; batch 8 vs 16.

For a real model (default smollm2-135m-instruct; ``--model`` takes any model
spec, e.g. a fine-tuned adapter folder) on real CNN/DailyMail validation
prompts encoded as ``evaluate`` encodes them (192-token budget, 104 kept for
the summary, as the ``cpu`` preset), in one process:

  floor        seconds to read every weight once (a streaming sum over each
               parameter, tied weights once) plus the KV cache of a step
  decode step  (time of N new tokens - time of 1) / (N - 1), EOS off so every
               row runs, the three variants interleaved over rounds
  evaluate     ``generate_summaries`` over the documents as ``evaluate`` runs
               them (EOS on), batch 8 and 16, each variant: wall time
               and how many texts equal the plain batch-8 texts

Usage:

    python benchmarks/generation_speed.py [--model smollm2-135m-instruct] [--docs 16] [--rounds 3] [--threads 2]
                                          [--step-batch 8 16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4" / "val.jsonl.gz"


def weight_read_s(model: torch.nn.Module, rounds: int = 5) -> tuple[float, int]:
    """Fastest of ``rounds`` streaming reads of every distinct parameter, and the bytes read."""
    params = list({id(p): p for p in model.parameters()}.values())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            for p in params:
                p.sum()
            best = min(best, time.perf_counter() - started)
    return best, nbytes


@contextlib.contextmanager
def head_replaced(replacement: Callable[[torch.nn.Module], Any]) -> Iterator[None]:
    """``generate_summaries`` with ``replacement`` in place of ``screened_head``."""
    from sumcircuit.evaluation import generation

    real = generation.screened_head
    generation.screened_head = replacement  # type: ignore[assignment]
    try:
        yield
    finally:
        generation.screened_head = real


def plain_head() -> contextlib.AbstractContextManager[None]:
    """Generation with the plain fp32 head (the screening switched off)."""
    return head_replaced(lambda model: contextlib.nullcontext())


def counted_head(counts: list[tuple[int, int]]) -> contextlib.AbstractContextManager[None]:
    """The screened head, recording (fp32 columns recomputed, calls) of every generation."""
    from sumcircuit.evaluation.screened_head import screened_head

    @contextlib.contextmanager
    def spy(model: torch.nn.Module) -> Iterator[Any]:
        with screened_head(model) as head:
            yield head
        if head is not None:
            counts.append((head.candidates, head.calls))

    return head_replaced(spy)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    from sumcircuit.data import DataConfig, encode, load_examples
    from sumcircuit.evaluation import GenerationConfig, eos_token_ids, generate_summaries
    from sumcircuit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode-step measurement length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step-batch", type=int, nargs="+", default=[8, 16], help="batch sizes of the decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    data = DataConfig(str(DATA), n_docs=args.docs, max_tokens=192)
    prompts = [encode(tok, ex, data.template, data.max_tokens, with_summary=False, summary_budget=104)
               for ex in load_examples(data).examples]
    eos = eos_token_ids(loaded)
    read_s, nbytes = weight_read_s(model)
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    print(f"{args.model}: {nbytes / 1e6:.0f} MB of weights read in {read_s * 1e3:.1f} ms "
          f"({nbytes / read_s / 1e9:.1f} GB/s); {len(prompts)} prompts of "
          f"{min(len(p.input_ids) for p in prompts)}-{max(len(p.input_ids) for p in prompts)} tokens", flush=True)

    variants = {"plain": False, "screened": False, "screened + packed": True}  # name: packed_weights
    for size in args.step_batch:
        batch = prompts[:size]
        steps: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, packed in variants.items():
                with plain_head() if name == "plain" else contextlib.nullcontext():
                    short = GenerationConfig(max_new_tokens=1, packed_weights=packed)
                    long = GenerationConfig(max_new_tokens=args.new_tokens, packed_weights=packed)
                    one, _ = timed(lambda: generate_summaries(model, tok, batch, short, []))  # noqa: B023 (run at once)
                    many, _ = timed(lambda: generate_summaries(model, tok, batch, long, []))  # noqa: B023
                steps[name].append((many - one) / (args.new_tokens - 1))
        width = max(len(p.input_ids) for p in batch) + args.new_tokens // 2
        floor_s = read_s + len(batch) * width * kv_per_token / (nbytes / read_s)
        print(f"\n### decode step, batch {len(batch)}, {args.new_tokens} new tokens, {args.rounds} rounds "
              f"(floor {floor_s * 1e3:.1f} ms: weights + KV cache at the mean length)\n")
        print("| variant | ms per step (median, min-max) | vs floor |\n|---|---|---|")
        for name, xs in steps.items():
            med = statistics.median(xs)
            print(f"| {name} | {med * 1e3:.1f} ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}) | {med / floor_s:.2f}x |",
                  flush=True)

    counts: list[tuple[int, int]] = []
    with counted_head(counts):
        generate_summaries(model, tok, prompts[:8], GenerationConfig(max_new_tokens=104, packed_weights=False), eos)
    print(f"\nscreened head: {sum(c for c, _ in counts) / sum(n for _, n in counts):.1f} fp32 columns recomputed "
          f"per call (batch 8, EOS on, all 8 rows together) of {model.get_output_embeddings().weight.shape[0]}")
    print(f"\n### generate_summaries as evaluate runs it: {len(prompts)} documents, up to 104 new tokens, EOS on\n")
    print("| batch | variant | wall s | texts equal to plain batch 8 |\n|---|---|---|---|")
    reference: list[str] | None = None
    for size in (8, 16):
        for name, packed in variants.items():
            gen = GenerationConfig(max_new_tokens=104, packed_weights=packed)
            with plain_head() if name == "plain" else contextlib.nullcontext():
                def run(size: int = size, gen: GenerationConfig = gen) -> list[str]:
                    out = []
                    for start in range(0, len(prompts), size):
                        out += [g.text for g in generate_summaries(model, tok, prompts[start:start + size], gen, eos)]
                    return out
                wall, texts = timed(run)
            reference = texts if reference is None else reference
            same = sum(a == b for a, b in zip(texts, reference, strict=True))
            print(f"| {size} | {name} | {wall:.1f} | {same}/{len(texts)} |", flush=True)


if __name__ == "__main__":
    main()
