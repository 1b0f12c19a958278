"""A training step of sumcircuit, before and after its fast paths, against the plain PyTorch / PEFT loop.

On the real smollm2-135m-instruct and real CNN/DailyMail training documents
(the summary task at ``--tokens`` tokens, batch 1), for full fine-tuning,
LoRA on q/v of every layer and targeted LoRA on layers 2, 3, 5, three steps
are compared, interleaved in one process (round r runs one step of each):

  plain   the field's loop: ``model(..., labels=labels).loss`` (logits at every
          position), ``torch.optim.AdamW`` with torch's defaults; LoRA through
          ``peft.get_peft_model`` (r 8, alpha 16, q/v, ``layers_to_transform``)
  before  sumcircuit's pieces as they were: full logits + ``summary_loss_terms``,
          AdamW without fusing (``make_optimizer(..., fused=False)``)
  after   sumcircuit's step now: ``lm_loss_terms`` (LM head at labelled positions
          only) and ``make_optimizer`` (fused AdamW where torch has it)

Reported: median CPU time per step (``time.process_time``, robust to a
loaded machine; with one thread it is the compute time) and the ratios.

    python benchmarks/train_step.py [--tokens 512] [--rounds 3] [--threads 1] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4"
METHODS = {"full": ("full", None), "lora-all": ("lora", None), "targeted": ("targeted-lora", [2, 3, 5])}


def _batch(loaded: Any, tokens: int, n: int) -> list[dict[str, torch.Tensor]]:
    from sumcircuit.data import DataConfig, collate, encode_all, load_examples

    data = DataConfig(str(DATA), split="train", n_docs=n, max_tokens=tokens)
    encoded = encode_all(loaded.tokenizer, load_examples(data).examples, data, need_summary_tokens=True)
    return [{k: v for k, v in collate([e], loaded.tokenizer.pad_token_id).items()
             if k in ("input_ids", "attention_mask", "labels")} for e in encoded]


def _plain(loaded: Any, method: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(loaded.model).train()
    kind, layers = METHODS[method]
    torch.manual_seed(0)  # the same LoRA initialisation in every variant, so that their losses compare
    if kind != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], layers_to_transform=layers))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _ours(loaded: Any, method: str, fused: bool | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from sumcircuit.training import FinetuneConfig
    from sumcircuit.training.methods import prepare_model
    from sumcircuit.training.optim import make_optimizer

    kind, layers = METHODS[method]
    chosen = layers or list(range(loaded.adapter.n_layers))
    cfg = FinetuneConfig(method=kind, layers=tuple(chosen) if kind == "targeted-lora" else None,
                         lora_dropout=0.0).resolved()
    copy_ = copy.copy(loaded)
    copy_.model = copy.deepcopy(loaded.model)
    torch.manual_seed(0)
    model = prepare_model(copy_, cfg, list(chosen)).model.train()
    return model, make_optimizer(model, cfg, fused=fused)


def _casts(model: torch.nn.Module) -> Any:
    """The weight casts a bf16 ``finetune`` keeps for ``model``."""
    from sumcircuit.adapters import ArchitectureAdapter
    from sumcircuit.training.casting import training_casts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return training_casts(model, ArchitectureAdapter.for_model(base).layers(base), torch.bfloat16)


def main() -> None:
    from sumcircuit.models import load_model
    from sumcircuit.training.batches import lm_loss_terms, summary_loss_terms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--bf16", action="store_true",
                        help="every variant under bf16 autocast, as the cpu preset trains; 'after' also keeps "
                             "its weight casts (sumcircuit.training.casting), 'before' lets autocast cast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct")
    batches = _batch(loaded, args.tokens, args.rounds + 1)

    def plain_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  labels=b["labels"], use_cache=False).loss
        return out

    def before_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        total, count = summary_loss_terms(logits, b["labels"])
        return total / count

    def after_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = lm_loss_terms(model, b)
        return total / count

    print(f"smollm2-135m-instruct, {args.tokens} tokens x batch 1 (real CNN/DailyMail, summary labelled: "
          f"{sum(int((b['labels'] != -100).sum()) for b in batches) / sum(b['labels'].numel() for b in batches):.0%}"
          f" of tokens), {args.threads} thread(s){', bf16 autocast' if args.bf16 else ''}, median CPU s per step over "
          f"{args.rounds} interleaved rounds")
    print("| method | plain loop | before | after | before / plain | after / plain | after / before |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        variants: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer,
                                  Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]]] = {
            "plain": (*_plain(loaded, method), plain_loss),
            "before": (*_ours(loaded, method, fused=False), before_loss),
            "after": (*_ours(loaded, method, fused=None), after_loss)}
        times: dict[str, list[float]] = {v: [] for v in variants}
        losses: dict[str, list[float]] = {v: [] for v in variants}
        casts = _casts(variants["after"][0]) if args.bf16 else None
        for r, batch in enumerate(batches):  # round 0 warms up
            for name, (model, opt, loss_of) in variants.items():
                start = time.process_time()
                autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
                with autocast, casts.applied() if casts and name == "after" else contextlib.nullcontext():
                    loss = loss_of(model, batch)
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:
                    times[name].append(time.process_time() - start)
                losses[name].append(float(loss))
        med = {v: statistics.median(t) for v, t in times.items()}
        print(f"| {method} | {med['plain']:.2f} | {med['before']:.2f} | {med['after']:.2f} | "
              f"{med['before'] / med['plain']:.2f}x | {med['after'] / med['plain']:.2f}x | "
              f"{med['after'] / med['before']:.2f}x |")
        print(f"<!-- {method} losses: " + "; ".join(f"{v}: {', '.join(f'{x:.5f}' for x in ls)}"
                                                    for v, ls in losses.items()) + " -->")
        del variants


if __name__ == "__main__":
    main()
