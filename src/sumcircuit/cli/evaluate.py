"""``sumcircuit evaluate``: generate summaries and score them with ROUGE (F1, 95% bootstrap CIs).

ROUGE is Google's rouge-score with the Porter stemmer; ROUGE-Lsum sees one
sentence per line (a deterministic splitter, applied to predictions and
references alike); with several references each metric takes the best one.
Generation is greedy (or beam search), batched with left padding, and stops at
the tokenizer's EOS, which fine-tuning appends after every summary. Models that
never emit EOS (zero-shot) need a text stop such as --stop '\\n\\n'.
Reruns into the same --out with the same settings resume where they stopped.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sumcircuit.cli.common import NON_NEGATIVE, POSITIVE, add_data_options, add_model_options, add_runtime_options, data_config
from sumcircuit.options import (
    GENERATION_BATCH_SIZE,
    GENERATION_MAX_NEW_TOKENS,
    GENERATION_NO_REPEAT_NGRAM,
    GENERATION_NUM_BEAMS,
    ROUGE_TYPES,
)

if TYPE_CHECKING:
    from sumcircuit.evaluation import GenerationConfig

_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="generate summaries and score them: ROUGE-1/2/L/Lsum with bootstrap CIs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--adapter", help="PEFT adapter folder written by `sumcircuit finetune` "
                                          "(merged into --model)")
    add_data_options(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=POSITIVE, default=GENERATION_MAX_NEW_TOKENS,
                     help="generated tokens per summary at most (default: %(default)s)")
    gen.add_argument("--num-beams", type=POSITIVE, default=GENERATION_NUM_BEAMS,
                     help="1 = greedy (default: %(default)s)")
    gen.add_argument("--no-repeat-ngram", type=NON_NEGATIVE, default=GENERATION_NO_REPEAT_NGRAM,
                     help="forbid repeating n-grams of this size; 0 = off (default: %(default)s)")
    gen.add_argument("--batch-size", type=POSITIVE, default=GENERATION_BATCH_SIZE,
                     help="documents generated together (default: %(default)s)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="also stop at this text (repeatable; \\n and \\t are understood), e.g. "
                          "--stop '\\n\\n' for zero-shot models that never emit EOS")
    score = parser.add_argument_group("scoring")
    score.add_argument("--bootstrap", type=POSITIVE, default=1000,
                       help="bootstrap resamples for the 95%% CIs (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard predictions already in --out instead of resuming")
    parser.add_argument("--out", required=True, help="output folder: predictions.jsonl, rouge.json")
    add_runtime_options(parser)
    parser.set_defaults(handler=run)


def unescape(text: str) -> str:
    """'\\n' typed in a shell is two characters; a stop sequence means the newline."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in _ESCAPES:
            out.append(_ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    from sumcircuit.evaluation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                            no_repeat_ngram_size=args.no_repeat_ngram, batch_size=args.batch_size,
                            stop=tuple(unescape(s) for s in args.stop))


def run(args: argparse.Namespace) -> int:
    from sumcircuit.distributed import is_main_process
    from sumcircuit.evaluation import PREDICTIONS_FILE, ROUGE_FILE, evaluate

    result = evaluate(args.model, data_config(args), generation_config(args), out=args.out,
                      adapter=args.adapter, device=args.device, dtype=args.dtype, seed=args.seed,
                      n_resamples=args.bootstrap, overwrite=args.overwrite,
                      trust_remote_code=args.trust_remote_code, progress=not args.no_progress).summary
    if not is_main_process():  # under N processes rank 0 reports (every rank has the numbers)
        return 0
    gen = result["generation"]
    print(f"ROUGE F1 (rouge-score, Porter stemmer), n = {result['n']}, "
          f"95% bootstrap CI ({args.bootstrap} resamples):")
    for key in ROUGE_TYPES:
        r = result[key]
        print(f"  {key:<10} {r['f1']:.4f}  [{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
    rate = result["summaries_per_s"]
    tokens = gen["tokens_per_s"]
    print(f"generation: {rate:.3f} summaries/s, {tokens:.1f} tokens/s, {gen['mean_new_tokens']:.1f} "
          f"tokens per summary; stopped by {gen['stop_reasons']}" if rate else "generation: no time recorded")
    print(f"wrote {args.out}/{PREDICTIONS_FILE}, {args.out}/{ROUGE_FILE}")
    return 0
