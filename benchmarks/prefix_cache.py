"""The frozen-prefix cache, side by side with running every layer (``prefix_cache_gb`` 0).

For the real smollm2-135m-instruct on real CNN/DailyMail training documents,
in one process, alternating plain and cached runs of ``sumcircuit.finetune``
(targeted LoRA on the ``cpu`` study's KL circuit, layers 21, 22, 28, with the
``cpu`` preset's optimisation settings and bf16 autocast):

  validation  the ``cpu`` preset's shape: fewer steps than one epoch, so only
              validation batches recur; seconds per evaluation after the first
              (which fills the cache), and whether the losses are bitwise equal
  epochs      a small training set over several epochs: training documents
              recur; seconds per step in the epochs after the first, wall
              time, and how far the losses move (float rounding only)

Usage:

    python benchmarks/prefix_cache.py [--rounds 2] [--layers 21,22,28] [--docs 32] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4" / "train.jsonl.gz"
HP: dict[str, Any] = dict(method="targeted-lora", lr=3e-3, batch_size=2, grad_accum=2, scheduler="constant",
                          mixed_precision="bf16", patience=0, keep_checkpoints=1, final="last")


def run(layers: tuple[int, ...], n_docs: int, cached: bool, out: Path, **kw: Any) -> list[dict[str, Any]]:
    import sumcircuit as sc

    cfg = sc.FinetuneConfig(**{**HP, **kw, "layers": layers, "prefix_cache_gb": 2.0 if cached else 0.0})
    sc.finetune("smollm2-135m-instruct", sc.DataConfig(str(DATA), n_docs=n_docs, max_tokens=192), cfg,
                runtime=sc.Runtime(progress=False), out=out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    log.append({"type": "summary", "wall_s": summary["wall_time_s"], "prefix_cache": summary["prefix_cache"]})
    return log


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default="21,22,28")
    parser.add_argument("--docs", type=int, default=32, help="training documents of the epochs scenario")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = tuple(int(x) for x in args.layers.split(","))
    scenarios: dict[str, tuple[int, dict[str, Any]]] = {  # training documents, finetune settings
        "validation": (320, dict(max_steps=15, eval_every=5, save_every=5, val_fraction=0.05)),
        "epochs": (args.docs, dict(epochs=args.epochs, eval_every=4, save_every=4, val_fraction=0.125)),
    }
    logs: dict[tuple[str, bool], list[list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (n_docs, kw) in scenarios.items():
                for cached in (False, True):
                    log = run(layers, n_docs, cached, Path(tmp) / f"{name}-{cached}-{r}", **kw)
                    logs.setdefault((name, cached), []).append(log)
                    print(name, "cached" if cached else "plain", r, log[-1], flush=True)
    print(f"\nlayers {layers}, {args.rounds} rounds, {args.threads} threads; medians over rounds\n")
    print("| scenario | what | plain | cached | cached / plain |")
    print("|---|---|---|---|---|")
    for name in scenarios:
        plain, cached = logs[(name, False)], logs[(name, True)]

        def val_s(runs: list[list[dict[str, Any]]]) -> float:
            return med([med([x["val_time_s"] for x in log if x["type"] == "val"][1:]) for log in runs])

        def later_steps(runs: list[list[dict[str, Any]]]) -> float:
            return med([med([x["step_time_s"] for x in log if x["type"] == "train" and x["epoch"] > 1.0])
                        for log in runs])

        def first_steps(runs: list[list[dict[str, Any]]]) -> float:
            return med([med([x["step_time_s"] for x in log if x["type"] == "train" and x["epoch"] <= 1.0])
                        for log in runs])

        def wall(runs: list[list[dict[str, Any]]]) -> float:
            return med([log[-1]["wall_s"] for log in runs])

        rows = [("s per validation (after the first)", val_s), ("run wall s (steps + validation)", wall),
                ("s per step, first epoch", first_steps)]
        if name == "epochs":
            rows.append(("s per step, later epochs", later_steps))
        for label, fn in rows:
            p, c = fn(plain), fn(cached)
            print(f"| {name} | {label} | {p:.3f} | {c:.3f} | {c / p:.2f}x |")
        a = [x for x in plain[0] if x["type"] in ("train", "val")]
        b = [x for x in cached[0] if x["type"] in ("train", "val")]
        vals_equal = all(x["val_loss"] == y["val_loss"] for x, y in zip(a, b, strict=True) if x["type"] == "val")
        rel = max(abs(x.get("loss", x.get("val_loss")) - y.get("loss", y.get("val_loss")))
                  / abs(x.get("loss", x.get("val_loss"))) for x, y in zip(a, b, strict=True))
        print(f"| {name} | validation losses bitwise equal | | {vals_equal} | |")
        print(f"| {name} | largest relative loss difference | | {rel:.1e} | |")
        print(f"| {name} | cache | | {cached[0][-1]['prefix_cache']} | |")


if __name__ == "__main__":
    main()
