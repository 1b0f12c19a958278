"""Does bf16 autocast speed up fine-tuning and generation on this CPU, and does it change the summaries?

For the real smollm2-135m-instruct on real CNN/DailyMail documents, in one
process, interleaved rounds (fp32, bf16, fp32, bf16, ...) of

  train     one LoRA-all optimizer step (q/v rank 8, the library's own pieces) at T tokens, batch B
  generate  greedy summaries of the first documents (batched, KV cache), fp32 weights

each in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``. Reported:
median and min-max seconds per round, the bf16/fp32 time ratio, and how many
generated summaries are the same text (a speed-up that changes the
summaries changes ROUGE, so it could change a verdict). Usage:

    python benchmarks/bf16_cpu.py [--rounds 3] [--tokens 192] [--batch 4] [--docs 8] [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnndm_gpt4" / "val.jsonl.gz"


@contextlib.contextmanager
def precision(kind: str) -> Iterator[None]:
    if kind == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def main() -> None:
    from sumcircuit.data import DataConfig, collate, encode, encode_all, load_examples
    from sumcircuit.evaluation import GenerationConfig, eos_token_ids, generate_summaries
    from sumcircuit.models import load_model
    from sumcircuit.training import FinetuneConfig
    from sumcircuit.training.batches import summary_loss_terms
    from sumcircuit.training.methods import prepare_model
    from sumcircuit.training.optim import make_optimizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m-instruct")
    data = DataConfig(str(DATA), n_docs=max(args.batch, args.docs), max_tokens=args.tokens)
    examples = load_examples(data).examples
    encoded = encode_all(loaded.tokenizer, examples, data, need_summary_tokens=True)
    batch = collate(encoded[:args.batch], int(loaded.tokenizer.pad_token_id))
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.docs)
    eos = eos_token_ids(loaded)
    prompts = [encode(loaded.tokenizer, ex, data.template, data.max_tokens, with_summary=False,
                      summary_budget=args.new_tokens) for ex in examples[:args.docs]]

    cfg = FinetuneConfig(method="lora", lora_dropout=0.0).resolved()
    prepared = prepare_model(loaded, cfg)
    model = prepared.model
    optimizer = make_optimizer(model, cfg)

    def train_step(kind: str) -> None:
        model.train()
        with precision(kind):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            total, count = summary_loss_terms(logits.float(), batch["labels"])
        (total / count).backward()
        optimizer.zero_grad(set_to_none=True)  # timing only: the weights stay as loaded

    texts: dict[str, list[str]] = {}

    def generate(kind: str) -> None:
        model.eval()
        with torch.no_grad(), precision(kind):
            out = generate_summaries(model, loaded.tokenizer, prompts, gen_cfg, eos)
        texts[kind] = [o.text for o in out]

    jobs: dict[str, Callable[[str], None]] = {"train": train_step, "generate": generate}
    times: dict[tuple[str, str], list[float]] = {(j, k): [] for j in jobs for k in ("fp32", "bf16")}
    for job, fn in jobs.items():
        fn("fp32")  # warm-up, not timed
        for _ in range(args.rounds):
            for kind in ("fp32", "bf16"):  # interleaved: a busy spell hits both
                start = time.perf_counter()
                fn(kind)
                times[(job, kind)].append(time.perf_counter() - start)
    print(f"smollm2-135m-instruct on {args.threads} threads; train: LoRA-all step at T={args.tokens}, batch "
          f"{args.batch}; generate: {args.docs} documents x {args.new_tokens} new tokens; {args.rounds} rounds")
    for job in jobs:
        fp, bf = times[(job, "fp32")], times[(job, "bf16")]
        print(f"{job:<9} fp32 {statistics.median(fp):7.2f} s [{min(fp):.2f}-{max(fp):.2f}]   bf16 "
              f"{statistics.median(bf):7.2f} s [{min(bf):.2f}-{max(bf):.2f}]   bf16/fp32 "
              f"{statistics.median(bf) / statistics.median(fp):.2f}x")
    same = sum(a == b for a, b in zip(texts["fp32"], texts["bf16"]))
    print(f"generated summaries identical under bf16 autocast: {same} of {len(texts['fp32'])}")


if __name__ == "__main__":
    main()
