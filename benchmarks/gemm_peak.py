"""How close a bf16 LoRA training micro-step's matmuls run to this machine's GEMM peak.

Two measurements in one process (2 threads by default):

  peak        GFLOP/s of a plain ``a @ b`` in bf16 and fp32 at the shapes of a
              smollm2 micro-step (384 rows: 2 x 192 tokens) and at 2048^3
  micro-step  one LoRA-all micro-step of the ``cpu`` preset (bf16 autocast, the
              weight casts of ``sumcircuit.training.casting``, the loss at
              labelled positions), profiled: the share of ``aten::mm`` and of
              attention, and the matmuls' achieved GFLOP/s from their FLOPs
              (forward and input gradient of every body weight, the head at
              the labelled positions)

If the matmuls already run near the peak, a LoRA step can only get much
cheaper by doing less arithmetic or doing it in fewer bits, not by a
better loop.

    python benchmarks/gemm_peak.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9


def main() -> None:
    import train_step as ts
    from torch.profiler import profile

    from sumcircuit.models import load_model
    from sumcircuit.training.batches import lm_loss_terms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| a @ b shape (m x k x n) | bf16 GFLOP/s | fp32 GFLOP/s |\n|---|---|---|")
    for m, k, n in [(384, 576, 576), (384, 576, 192), (384, 576, 1536), (384, 1536, 576), (2048, 2048, 2048)]:
        print(f"| {m} x {k} x {n} | {gemm_gflops(m, k, n, torch.bfloat16):.0f} | "
              f"{gemm_gflops(m, k, n, torch.float32):.0f} |", flush=True)

    loaded = load_model("smollm2-135m-instruct")
    docs = ts._batch(loaded, 192, 2)
    batch = {k: torch.cat([d[k] for d in docs]) for k in docs[0]}
    model, _ = ts._ours(loaded, "lora-all", None)
    casts = ts._casts(model)

    def micro_step() -> None:
        with casts.applied(), torch.autocast("cpu", torch.bfloat16):
            total, count = lm_loss_terms(model, batch)
            (total / count).backward()

    for _ in range(2):
        micro_step()
    steps = 3
    with profile() as prof:
        for _ in range(steps):
            micro_step()
    events = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    total_s = sum(events.values())
    mm_s = events.get("aten::mm", 0.0)
    attention_s = sum(v for k, v in events.items() if "scaled_dot_product" in k)
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "lora_" not in n and "embed" not in n and "lm_head" not in n)
    tokens = batch["input_ids"].numel()
    labelled = int((batch["labels"][:, 1:] != -100).any(0).sum()) * batch["labels"].shape[0]
    head = model.get_output_embeddings().weight.numel()
    flops = 2 * 2 * body * tokens + 2 * 2 * head * labelled  # forward + input gradient
    print(f"\nLoRA-all micro-step, {tokens} tokens, bf16 autocast, {args.threads} threads (profiled, {steps} steps): "
          f"{total_s:.3f} s of op time; aten::mm {mm_s:.3f} s ({mm_s / total_s:.0%}), attention {attention_s:.3f} s "
          f"({attention_s / total_s:.0%}); the matmuls do {flops / 1e9:.0f} GFLOP, i.e. {flops / mm_s / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
