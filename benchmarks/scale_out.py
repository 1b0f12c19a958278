"""Scale-out on one machine: a study's stages on Ray vs one after another, and a device-mapped pair vs in memory.

``study``: the tiny study of the test suite (tiny LLaMA-style model, real
CNN/DailyMail documents, 2 seeds, 28 stages) run three ways in fresh folders,
interleaved over rounds: sequentially with torch's default threads (the whole
machine for one stage), sequentially with one thread (what each Ray stage
gets; bitwise the same results as Ray), and with ``--executor ray`` on a local
instance of ``--workers`` CPUs (Ray's start-up included, as a user pays it).

``offload``: ``analyze`` of the real smollm2-135m-instruct against a copy
with perturbed weights on real documents, in memory vs with every other
decoder layer (and the LM head) offloaded to disk by a device map. Each mode
runs in its own process (so its peak RSS is its own), rounds interleaved,
and the tables are checked equal.

    python benchmarks/scale_out.py study [--rounds 2] [--workers 2] [--steps 2]
    python benchmarks/scale_out.py offload [--docs 16] [--max-tokens 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4"


def _study_once(mode: str, root: Path, workers: int, steps: int) -> float:
    """One tiny study in a fresh folder, in a fresh process; its wall time."""
    code = f"""
import sys, json, time, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from helpers import save_tiny, train_tiny_tokenizer, CNNDM, TINY_STUDY as TINY
from sumcircuit.study import StudyConfig, run_study
mode, root = {mode!r}, Path({str(root)!r})
model = root / "model"
if not model.exists():
    save_tiny("llama", model, train_tiny_tokenizer())
if mode == "sequential, 1 thread":
    torch.set_num_threads(1)
hp = {{**TINY["full"], "max_steps": {steps}, "eval_every": {steps}, "patience": {steps}}}
cfg = StudyConfig(model=str(model), data=str(CNNDM), seeds=(1, 2),
                  overrides={{**TINY, "full": hp, "lora": hp, "targeted": hp}})
executor = {{"executor": "ray", "workers": {workers}}} if mode == "ray" else None
out = root / ("run-" + str(time.time_ns()))
start = time.perf_counter()
run_study(cfg, out, executor=executor)
print(json.dumps({{"wall": time.perf_counter() - start}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode}: the study failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["wall"])


def bench_study(args: argparse.Namespace) -> None:
    modes = ["sequential, default threads", "sequential, 1 thread", "ray"]
    walls: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in modes:
                walls[mode].append(_study_once(mode, Path(tmp), args.workers, args.steps))
    base = statistics.median(walls[modes[0]])
    print(f"tiny study, 28 stages, {args.steps} training steps per fine-tune, {os.cpu_count()} CPUs, torch "
          f"{_torch_threads()} threads by default; "
          f"median of {args.rounds} interleaved rounds")
    print("| how | wall (s) | ratio to sequential, default threads |\n|---|---|---|")
    for mode in modes:
        med = statistics.median(walls[mode])
        label = f"ray, {args.workers} workers x 1 thread" if mode == "ray" else mode
        print(f"| {label} | {med:.1f} ({', '.join(f'{w:.1f}' for w in walls[mode])}) | {med / base:.2f}x |")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _offload_once(mode: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "offload-one", mode, "--docs", str(args.docs), "--max-tokens",
                           str(args.max_tokens), "--root", str(root)], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def offload_one(args: argparse.Namespace) -> None:
    """In this process: load (and place) the pair, analyze, report wall time, peak RSS and the tables' path."""
    import sumcircuit as sc
    from sumcircuit.models import load_model

    root = Path(args.root)
    base_dir, tuned_dir = root / "base", root / "tuned"
    rt = None
    if args.mode == "disk":
        model = load_model(str(base_dir)).model
        inner = model.model
        mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
        mapping |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(len(inner.layers))}
        (root / "map.json").write_text(json.dumps(mapping))
        del model, inner
        rt = sc.Runtime(device_map=str(root / "map.json"), offload_folder=str(root / "offload"), progress=False)
    data = sc.DataConfig(str(DATA), split="val", n_docs=args.docs, max_tokens=args.max_tokens)
    start = time.perf_counter()
    result = sc.analyze(str(base_dir), str(tuned_dir), data, runtime=rt or sc.Runtime(progress=False))
    wall = time.perf_counter() - start
    table = root / f"heads-{args.mode}.csv"
    result.to_pandas().to_csv(table, index=False)
    print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_offload(args: argparse.Namespace) -> None:
    import pandas as pd
    import torch

    from sumcircuit.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loaded = load_model("smollm2-135m-instruct")
        loaded.model.save_pretrained(root / "base")
        loaded.tokenizer.save_pretrained(root / "base")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std())
        loaded.model.save_pretrained(root / "tuned")
        loaded.tokenizer.save_pretrained(root / "tuned")
        del loaded
        runs: dict[str, list[dict[str, float]]] = {"memory": [], "disk": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(_offload_once(mode, args, root))
        same = pd.read_csv(root / "heads-memory.csv").equals(pd.read_csv(root / "heads-disk.csv"))
    base = statistics.median(r["wall"] for r in runs["memory"])
    print(f"analyze smollm2-135m-instruct vs a perturbed copy, {args.docs} docs x {args.max_tokens} tokens, "
          f"median of {args.rounds} interleaved rounds; heads tables identical: {same}")
    print("| placement | wall (s) | ratio | peak RSS (MB) |\n|---|---|---|---|")
    for mode, label in (("memory", "in memory"), ("disk", "15 of 30 layers + LM head offloaded to disk")):
        med = statistics.median(r["wall"] for r in runs[mode])
        rss = statistics.median(r["peak_rss_mb"] for r in runs[mode])
        print(f"| {label} | {med:.1f} | {med / base:.2f}x | {rss:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["study", "offload", "offload-one"])
    parser.add_argument("mode", nargs="?", default="memory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="study: training steps per fine-tune (the tests' 2)")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    {"study": bench_study, "offload": bench_offload, "offload-one": offload_one}[args.what](args)


if __name__ == "__main__":
    main()
