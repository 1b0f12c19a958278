"""Time of one CKA accumulation step (`CrossMoments.add`) with C_xx and C_yy as panel products, against full GEMMs.

`CrossMoments.add` adds a batch's centered products C_xx, C_yy (symmetric) and C_xy to a layer's
accumulators. Only the upper triangles of C_xx and C_yy are needed; `add_gram_upper` computes them
as column panels of `GRAM_PANEL` columns, ~(1 + panel/d)/2 of a full product's work. Here both
ways run in interleaved rounds (A B A B ...) on the same rows, at the shapes `analyze` sees
(rows = tokens of a batch, d = the model width), and each round's ratio panel / full is reported:
median (min-max). `full` sets the panel to d, which is one GEMM per matrix, the code before panels.

    python benchmarks/cka_speed.py [--threads 2] [--rounds 15] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sumcircuit import metrics
from sumcircuit.metrics import CrossMoments


def seconds(acc: CrossMoments, x: torch.Tensor, y: torch.Tensor, panel: int, repeats: int) -> float:
    metrics.GRAM_PANEL = panel
    start = time.perf_counter()
    for _ in range(repeats):
        acc.add(0, x, y)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10, help="add() calls per timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = metrics.GRAM_PANEL
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, panel {default} columns, "
          f"{args.rounds} interleaved rounds of {args.repeats} calls")
    print("| shape | rows | full: ms per add | panels: ms per add | panels / full |\n|---|---|---|---|---|")
    for name, d in (("gpt2-small", 768), ("smollm2-135m", 576)):
        for rows in (512, 1024, 2048):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, d, generator=g) * 3 + 1
            y = x + torch.randn(rows, d, generator=g) * 0.1
            acc = CrossMoments.zeros(1, d)
            seconds(acc, x, y, d, 2)  # warm: allocator, BLAS buffers
            seconds(acc, x, y, default, 2)
            full, panel = [], []
            for _ in range(args.rounds):
                full.append(seconds(acc, x, y, d, args.repeats))
                panel.append(seconds(acc, x, y, default, args.repeats))
            ratios = [p / f for p, f in zip(panel, full)]
            print(f"| {name} (d = {d}) | {rows} | {statistics.median(full) * 1e3:.2f} | "
                  f"{statistics.median(panel) * 1e3:.2f} | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)
    metrics.GRAM_PANEL = default


if __name__ == "__main__":
    main()
