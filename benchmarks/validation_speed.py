"""Validation loss under N processes: each rank evaluating 1/N of the batches against every rank evaluating all.

`finetune` under `accelerate launch` used to compute the whole validation loss
on every rank, so more processes made training steps faster but validation
no faster; now batch ``b`` runs on rank ``b % N`` and the per-batch sums are
all-reduced (:func:`sumcircuit.training.loop.evaluate_loss`). This times both
on the real smollm2-135m-instruct (wrapped by Accelerate, as `finetune` wraps
it) and real CNN/DailyMail validation documents, in interleaved rounds
(shared, all, shared, all, ...) in the same processes, and checks that the
two give the same loss. Usage (N processes on the CPU, one thread each):

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --mixed_precision no \\
        --dynamo_backend no benchmarks/validation_speed.py [--docs 16] [--max-tokens 256] [--batch 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4" / "val.jsonl.gz"


def main() -> None:
    from accelerate import Accelerator

    from sumcircuit import distributed as dist
    from sumcircuit.data import DataConfig, encode_all, load_examples
    from sumcircuit.models import load_model
    from sumcircuit.training.batches import evaluate_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    acc = Accelerator(cpu=True)
    loaded = load_model("smollm2-135m-instruct")
    data = DataConfig(str(DATA), n_docs=args.docs, max_tokens=args.max_tokens)
    encoded = encode_all(loaded.tokenizer, load_examples(data).examples, data, need_summary_tokens=True)
    model = acc.prepare(loaded.model)
    pad = loaded.tokenizer.pad_token_id

    def shared() -> tuple[float, int]:
        return evaluate_loss(model, encoded, pad, args.batch, acc.device, rank=acc.process_index,
                             world=acc.num_processes, all_sum=dist.all_reduce_sum)

    def every_rank_all() -> tuple[float, int]:  # what each rank did before
        return evaluate_loss(model, encoded, pad, args.batch, acc.device)

    methods = {"each rank 1/N of the batches": shared, "every rank all batches (before)": every_rank_all}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    losses: dict[str, tuple[float, int]] = {}
    shared()  # warm-up
    for _ in range(args.rounds):
        for name, fn in methods.items():
            acc.wait_for_everyone()
            start = time.perf_counter()
            losses[name] = fn()
            acc.wait_for_everyone()
            seconds[name].append(time.perf_counter() - start)
    if acc.is_main_process:
        n_batches = -(-len(encoded) // args.batch)
        print(f"torch {torch.__version__}, {acc.num_processes} processes x {torch.get_num_threads()} threads, "
              f"{len(encoded)} documents ({args.max_tokens} tokens at most), {n_batches} batches of {args.batch}, "
              f"{args.rounds} interleaved rounds")
        before = seconds["every rank all batches (before)"]
        for name, s in seconds.items():
            ratio = [a / b for a, b in zip(s, before)]
            print(f"| {name} | {statistics.median(s):.2f} s ({min(s):.2f}-{max(s):.2f}) | "
                  f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) | loss {losses[name][0]!r}, "
                  f"{losses[name][1]} tokens |")
        same = losses["each rank 1/N of the batches"] == losses["every rank all batches (before)"]
        print(f"same loss and token count, bit for bit: {same}")


if __name__ == "__main__":
    main()
