"""Training speed and peak memory of full fine-tuning, LoRA on all layers and targeted LoRA.

For a random GPT-2-small-shaped model (12 layers, d 768, 12 heads, vocab 50257)
and the real smollm2-135m-instruct, at T tokens per sequence, each of

  full      every parameter, AdamW
  lora-all  rank-8 q/v LoRA on every layer
  targeted  rank-8 q/v LoRA on layers 2,3,5

runs warmup + N optimizer steps of the library's own pieces
(``prepare_model``, ``make_optimizer``, ``summary_loss_terms``) on random
token ids (the last quarter counts as the summary). Each configuration runs
in its own subprocess so that peak memory (``ru_maxrss`` on CPU,
``max_memory_allocated`` on CUDA) is its own. Reported: tokens/s, seconds per
step split into forward and backward+update, the number of decoder blocks
whose output needs a gradient (targeted LoRA on 2,3,5 must skip blocks 0-1),
and targeted's speed-up over lora-all. Usage:

    python benchmarks/finetune_speed.py [--steps 3] [--tokens 512] [--batch 1] [--threads 2]
                                        [--models gpt2-small-shape smollm2-135m-instruct]
                                        [--gradient-checkpointing] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

METHODS = {"full": ("full", None), "lora-all": ("lora", None), "targeted": ("targeted-lora", [2, 3, 5])}


def _load(name: str, device: str) -> Any:
    from sumcircuit.adapters import ArchitectureAdapter
    from sumcircuit.models import LoadedModel, ModelSource, load_model

    if name == "gpt2-small-shape":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).to(device)
        return LoadedModel(model, None, ArchitectureAdapter.for_model(model),  # type: ignore[arg-type]
                           ModelSource(name, "random", ""), "")
    return load_model(name, device=device)


def run_one(model_name: str, method: str, steps: int, tokens: int, batch: int, threads: int,
            checkpointing: bool) -> dict[str, Any]:
    from sumcircuit.training import FinetuneConfig
    from sumcircuit.training.batches import summary_loss_terms
    from sumcircuit.training.methods import prepare_model
    from sumcircuit.training.optim import make_optimizer

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = _load(model_name, device)
    kind, layers = METHODS[method]
    adapter = loaded.adapter
    layers = layers or list(range(adapter.n_layers))
    cfg = FinetuneConfig(method=kind, layers=tuple(layers) if kind == "targeted-lora" else None,
                         gradient_checkpointing=checkpointing, lora_dropout=0.0).resolved()
    prepared = prepare_model(loaded, cfg, list(layers))
    model = prepared.model.train()
    optimizer = make_optimizer(model, cfg)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    needs_grad: list[bool] = []
    hooks = [adapter.block(inner, i).register_forward_hook(
        lambda m, a, out: needs_grad.append((out[0] if isinstance(out, tuple) else out).requires_grad))
        for i in range(adapter.n_layers)]
    generator = torch.Generator().manual_seed(0)
    vocab = int(inner.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)
    labels = ids.clone()
    labels[:, : tokens - tokens // 4] = -100
    fwd_times, bwd_times = [], []
    for step in range(steps + 1):  # step 0 is warmup
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        total, count = summary_loss_terms(logits, labels)
        loss = total / count
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step == 0:
            for hook in hooks:
                hook.remove()
        else:
            fwd_times.append(t1 - t0)
            bwd_times.append(t2 - t1)
    step_s = (sum(fwd_times) + sum(bwd_times)) / steps
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": model_name, "method": method, "device": device, "tokens": tokens, "batch": batch,
            "steps": steps, "trainable_params": prepared.trainable_params, "total_params": prepared.total_params,
            "tokens_per_s": batch * tokens / step_s, "step_s": step_s, "forward_s": sum(fwd_times) / steps,
            "backward_update_s": sum(bwd_times) / steps, "blocks_needing_grad": sum(needs_grad[:adapter.n_layers]),
            "n_layers": adapter.n_layers, "peak_memory_mb": peak / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process ru_maxrss",
            "gradient_checkpointing": checkpointing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small-shape", "smollm2-135m-instruct"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.tokens, args.batch, args.threads,
                                 args.gradient_checkpointing)))
        return
    rows = []
    for model in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", model, method, "--steps", str(args.steps), "--tokens",
                   str(args.tokens), "--batch", str(args.batch), "--threads", str(args.threads)]
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{model} {method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  done {model:<22} {method:<9} {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr, flush=True)
    _print_table(rows, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    device = rows[0]["device"] if rows else "?"
    print(f"\nfine-tuning speed: T={args.tokens}, batch {args.batch}, {args.steps} timed steps after 1 warmup, "
          f"device {device}, threads {args.threads}, gradient checkpointing {args.gradient_checkpointing}")
    head = (f"{'model':<22} {'method':<9} {'trainable':>11} {'tok/s':>8} {'s/step':>7} {'fwd s':>7} "
            f"{'bwd+upd s':>9} {'blocks w/ grad':>14} {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<22} {r['method']:<9} {r['trainable_params']:>11,} {r['tokens_per_s']:>8.1f} "
              f"{r['step_s']:>7.3f} {r['forward_s']:>7.3f} {r['backward_update_s']:>9.3f} "
              f"{str(r['blocks_needing_grad']) + '/' + str(r['n_layers']):>14} {r['peak_memory_mb']:>8.0f}")
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        if "targeted" in by and "lora-all" in by:
            t, a = by["targeted"], by["lora-all"]
            print(f"{model}: targeted vs lora-all: {t['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens/s, "
                  f"backward+update {a['backward_update_s'] / t['backward_update_s']:.2f}x faster, "
                  f"{t['trainable_params'] / a['trainable_params']:.1%} of the trainable parameters")
    print("peak memory: " + (rows[0]["peak_memory_kind"] if rows else "") + " (on CPU: whole process, model "
          "loading included)")


if __name__ == "__main__":
    main()
