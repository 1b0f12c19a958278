"""Analysis throughput with 1 and with N processes (Accelerate over torch.distributed, gloo on CPU).

Runs the real command, ``sumcircuit analyze``, on smollm2-135m-instruct
against a copy with 1e-3 relative weight noise (a stand-in for a fine-tuned
model: same compute), on the same documents:

  1 process    python -m sumcircuit.cli analyze ...
  N processes  accelerate launch --multi_gpu --num_processes N -m sumcircuit.cli analyze ...

each process with ``--threads`` torch threads (default 1, so that N processes
use N cores). Throughput is counted tokens / seconds of the analysis loop
(``summary.json`` -> ``provenance.timing``: sharding, forward passes, the
cross-process reductions and rank 0's checkpoints; model loading excluded),
and the end-to-end wall time of the command is printed too. The two runs'
statistics are also checked against each other (1e-6 relative).

On a shared machine the numbers are noisy: other jobs take cores. Rerun on a
quiet machine with as many free cores as processes for a clean figure.

    python benchmarks/scaling.py [--docs 8] [--max-tokens 512] [--processes 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4" / "train.jsonl.gz"
MODEL = "smollm2-135m-instruct"


def make_tuned_copy(folder: Path, noise: float = 1e-3, seed: int = 0) -> Path:
    """The model with every weight perturbed by ``noise`` x its std: a 'tuned' model of equal cost."""
    from sumcircuit.models import load_model

    loaded = load_model(MODEL)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.float().std())
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def write_docs(path: Path, n: int) -> Path:
    """The first ``n`` training articles (long enough to fill --max-tokens)."""
    with gzip.open(DATA, "rt", encoding="utf-8") as fh, open(path, "w", encoding="utf-8") as out:
        for _ in range(n):
            out.write(fh.readline())
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(processes: int, args: argparse.Namespace, tuned: Path, docs: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cli = ["-m", "sumcircuit.cli", "analyze", "--base", MODEL, "--tuned", str(tuned), "--data", str(docs),
           "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size),
           "--shard-size", str(args.shard_size), "--n-bootstrap", "100", "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *cli]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    timing = summary["provenance"]["timing"]
    return {"tokens": timing["tokens"], "seconds": timing["accumulate_s"], "tokens_per_s": timing["tokens_per_s"],
            "wall_s": wall, "docs": timing["docs"]}


def same_statistics(a: Path, b: Path) -> float:
    """Largest relative difference over stats.safetensors (relative to each tensor's max |value|)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "stats.safetensors"), load_file(b / "stats.safetensors")
    worst = 0.0
    for key in ta:
        x, y = ta[key].double(), tb[key].double()
        finite = torch.isfinite(x) & torch.isfinite(y)
        if finite.any():
            scale = x[finite].abs().max().clamp_min(1e-300)
            worst = max(worst, float((x - y)[finite].abs().max() / scale))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2, help="documents per shard (per process per round)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tuned = make_tuned_copy(root / "tuned")
        docs = write_docs(root / "docs.jsonl", args.docs)
        one = run(1, args, tuned, docs, root / "one")
        many = run(args.processes, args, tuned, docs, root / "many")
        diff = same_statistics(root / "one", root / "many")
    print(f"model {MODEL}, {args.docs} documents at --max-tokens {args.max_tokens} ({one['tokens']} tokens), "
          f"batch {args.batch_size}, shard {args.shard_size}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} CPUs visible")
    for label, r in (("1 process", one), (f"{args.processes} processes", many)):
        print(f"  {label:<12} {r['tokens_per_s']:8.1f} tokens/s  (analysis {r['seconds']:.1f} s, "
              f"end to end {r['wall_s']:.1f} s incl. start-up and model loading)")
    print(f"scaling ratio ({args.processes} vs 1 process): {many['tokens_per_s'] / one['tokens_per_s']:.2f}x "
          f"(ideal {args.processes:.0f}x); end to end {one['wall_s'] / many['wall_s']:.2f}x")
    print(f"statistics agree: max relative difference {diff:.2e}")
    print("note: shared machine, other jobs were running: the figure is noisy; rerun on a quiet machine")


if __name__ == "__main__":
    main()
