"""Weights cast once under bf16 autocast, side by side with autocast casting them at every forward.

For the real smollm2-135m-instruct on real CNN/DailyMail training documents,
``sumcircuit.finetune`` with the ``cpu`` preset's settings (bf16 autocast,
batch 2 x 2 micro-batches of 192 tokens, validation of 16 documents every 5
steps, the frozen-prefix cache on) for the preset's kinds of arm, with and
without the casts (``make_weight_casts`` replaced by ``None``), alternating,
each run in its own process (so that its peak memory is its own):

  lora-all    LoRA on q/v of every layer: the whole base model is frozen
  targeted    LoRA on the ``cpu`` study's KL circuit (layers 21, 22, 28)
  full        every weight trains: only validation can use casts

Reported: median s per optimizer step and per validation (after the first),
run wall time, peak RSS, and whether every training and validation loss is
bitwise equal.

    python benchmarks/weight_casts.py [--rounds 2] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4" / "train.jsonl.gz"
HP: dict[str, Any] = dict(lr=3e-3, batch_size=2, grad_accum=2, scheduler="constant", mixed_precision="bf16",
                          patience=0, keep_checkpoints=1, final="last", eval_every=5, save_every=5,
                          val_fraction=0.05)
ARMS: dict[str, dict[str, Any]] = {"lora-all": dict(method="lora"),
                                   "targeted": dict(method="targeted-lora", layers=(21, 22, 28)),
                                   "full": dict(method="full", lr=3e-5)}


def one(arm: str, casts: bool, steps: int, threads: int, out: Path) -> dict[str, Any]:
    """One run in this process; returns its log, summary figures and peak RSS."""
    import torch

    import sumcircuit as sc
    from sumcircuit.training import loop

    torch.set_num_threads(threads)
    if not casts:
        loop.make_weight_casts = lambda *a: None  # type: ignore[assignment]
    cfg = sc.FinetuneConfig(**{**HP, **ARMS[arm], "max_steps": steps})
    sc.finetune("smollm2-135m-instruct", sc.DataConfig(str(DATA), n_docs=320, max_tokens=192), cfg,
                runtime=sc.Runtime(progress=False), out=out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    return {"log": log, "wall_s": summary["wall_time_s"], "weight_casts": summary["weight_casts"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("ARM", "CASTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        arm, casts, out = args.one
        print(json.dumps(one(arm, casts == "1", args.steps, args.threads, Path(out))))
        return
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in ARMS:
                for casts in (False, True):
                    out = Path(tmp) / f"{arm}-{int(casts)}-{r}"
                    proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads",
                                           str(args.threads), "--one", arm, str(int(casts)), str(out)],
                                          capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{arm} run failed:\n{proc.stderr[-3000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    shutil.rmtree(out)  # a full fine-tune's checkpoints take GBs
                    runs.setdefault((arm, casts), []).append(result)
                    print(arm, "casts" if casts else "plain", r, round(result["wall_s"], 1), "s",
                          round(result["peak_rss_mb"]), "MB", flush=True)
    print(f"\n{args.steps} steps per run, {args.rounds} rounds, {args.threads} threads; medians over rounds\n")
    print("| arm | what | autocast casts | cast once | once / autocast |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        plain, cast = runs[(arm, False)], runs[(arm, True)]

        def step_s(rs: list[dict[str, Any]]) -> float:
            return med([med([x["step_time_s"] for x in r["log"] if x["type"] == "train"]) for r in rs])

        def val_s(rs: list[dict[str, Any]]) -> float:
            return med([med([x["val_time_s"] for x in r["log"] if x["type"] == "val"][1:]) for r in rs])

        for label, fn in (("s per step", step_s), ("s per validation (after the first)", val_s),
                          ("run wall s", lambda rs: med([r["wall_s"] for r in rs])),
                          ("peak RSS MB", lambda rs: med([r["peak_rss_mb"] for r in rs]))):
            p, c = fn(plain), fn(cast)
            print(f"| {arm} | {label} | {p:.3f} | {c:.3f} | {c / p:.2f}x |")
        equal = all(x.get("loss", x.get("val_loss")) == y.get("loss", y.get("val_loss"))
                    for a, b in zip(plain, cast, strict=True)
                    for x, y in zip(a["log"], b["log"], strict=True))
        print(f"| {arm} | every loss bitwise equal | | {equal} | |")
        print(f"| {arm} | kept | | {cast[0]['weight_casts']} | |")


if __name__ == "__main__":
    main()
