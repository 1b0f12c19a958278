"""Multi-process runs (2 CPU processes, gloo) give the numbers of one process.

Each test starts the real command under ``accelerate launch --multi_gpu
--num_processes 2`` (Accelerate's torch.distributed launcher; on CPU our
``distributed.setup`` asks for its gloo mode) and compares the files with a
single-process run of the same command on the same documents. Statistics may
differ only by summation order: every tensor must agree to 1e-6 relative to its
largest magnitude (``max|a - b| <= 1e-6 * max|a|``), per-document rows must
be in the same document order.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sumcircuit import distributed as dist
from sumcircuit.cli import main

from helpers import CNNDM, lockstep, save_tiny

VAL = str(CNNDM / "val.jsonl.gz")
REL = 1e-6
DATA = ["--data", VAL, "--max-tokens", "96"]


def _free_port() -> int:
    """Other test runs on this host may use accelerate's default port 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch2(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --multi_gpu --num_processes 2 -m sumcircuit.cli ARGS`` on the CPU, 1 thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "sumcircuit.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"2-process run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run1(args: list[str]) -> None:
    assert main(args) == 0


def assert_tensors_close(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), a.name
    for key in ta:
        x, y = ta[key].double(), tb[key].double()
        assert x.shape == y.shape, key
        finite = torch.isfinite(x)
        assert torch.equal(finite, torch.isfinite(y)), f"{a.name} {key}: NaN/inf pattern differs"
        if finite.any():
            scale = x[finite].abs().max().item()
            diff = (x - y)[finite].abs().max().item()
            assert diff <= REL * scale, f"{a.name} {key}: max diff {diff:.3g} vs scale {scale:.3g}"


def assert_weights_close(a: Path, b: Path) -> None:
    """Weights relative to the file's largest weight: LoRA's B starts at 0, so per tensor it is all update,
    and Adam (an update of about lr per element, whatever the gradient's size) turns fp32 summation-order
    noise in tiny gradients into ~1e-6 of that update."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), a.name
    scale = max(t.double().abs().max().item() for t in ta.values())
    for key in ta:
        diff = (ta[key].double() - tb[key].double()).abs().max().item()
        assert diff <= REL * scale, f"{a.name} {key}: max diff {diff:.3g} vs largest weight {scale:.3g}"


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata() or {}


def assert_csv_close(a: Path, b: Path) -> None:
    rows_a, rows_b = list(csv.DictReader(a.open())), list(csv.DictReader(b.open()))
    assert len(rows_a) == len(rows_b) and rows_a and rows_a[0].keys() == rows_b[0].keys(), a.name
    for ra, rb in zip(rows_a, rows_b):
        for key, va in ra.items():
            vb = rb[key]
            try:
                fa, fb = float(va), float(vb)
            except ValueError:
                assert va == vb, f"{a.name} {key}: {va!r} vs {vb!r}"
                continue
            assert fa == pytest.approx(fb, rel=REL, abs=1e-12, nan_ok=True), f"{a.name} {key}: {va} vs {vb}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("dist_models")
    return (str(save_tiny("llama", root / "base", tiny_tokenizer, seed=0)),
            str(save_tiny("llama", root / "tuned", tiny_tokenizer, seed=1)))


# ---------------------------------------------------------------- helpers, in one process

def test_rounds_deal_blocks_round_robin_and_pad_idle_ranks() -> None:
    r = dist.rounds(7, 3, world=2)
    assert r == [[range(0, 3), range(3, 6)], [range(6, 7), range(7, 7)]]
    assert dist.rounds(0, 3, world=2) == []
    assert dist.rounds(5, 2, world=1) == [[range(0, 2)], [range(2, 4)], [range(4, 5)]]
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1
    assert dist.on_main(lambda: 5) == 5 and dist.gather_to_main("x") == ["x"]


def test_pooled_cka_moments_equal_pairwise_merge() -> None:
    """The all-reduce form of CKA's centered moments equals the pairwise (Chan) merge.

    Three "processes" are threads whose ``all_sum`` meets at a barrier and
    returns the sum of everyone's tensor, as an all-reduce does; one of them
    holds no rows (an idle rank).
    """
    from sumcircuit.metrics import CrossMoments

    gen = torch.Generator().manual_seed(0)
    parts = []
    for n in (5, 0, 9):
        m = CrossMoments.zeros(2, 4)
        for layer in range(2):
            x = torch.randn(n, 4, generator=gen) * 2.0 + 3.0
            m.add(layer, x, 0.5 * x + torch.randn(n, 4, generator=gen))
        parts.append(m)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    pooled = lockstep([lambda all_sum, p=p: p.pooled(all_sum) for p in parts])
    for result in pooled:
        for name in ("n", "mean_x", "mean_y", "cxx", "cyy", "cxy"):
            torch.testing.assert_close(getattr(result, name).double(), getattr(merged, name).double(),
                                       rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(result.cka(), merged.cka(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- analysis

def _analyze_args(pair: tuple[str, str], out: Path, n_docs: int) -> list[str]:
    return ["analyze", "--base", pair[0], "--tuned", pair[1], *DATA, "--n-docs", str(n_docs),
            "--shard-size", "3", "--batch-size", "2", "--n-bootstrap", "200", "--out", str(out)]


def test_analysis_two_processes_equal_one(tmp_path: Path, pair: tuple[str, str]) -> None:
    # 7 documents, shards of 3: rounds (0-3 | 3-6), (6-7 | idle): rank 1 idles in the last round
    run1(_analyze_args(pair, tmp_path / "one", 7))
    launch2(_analyze_args(pair, tmp_path / "two", 7), tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("stats.safetensors", "per_doc.safetensors", "accumulators.safetensors"):
        assert_tensors_close(one / name, two / name)
    assert metadata(one / "per_doc.safetensors")["doc_ids"] == metadata(two / "per_doc.safetensors")["doc_ids"]
    assert len(json.loads(metadata(two / "per_doc.safetensors")["doc_ids"])) == 7
    for name in ("heads.csv", "layers.csv", "neurons.csv"):
        assert_csv_close(one / name, two / name)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["provenance"]["processes"] == 2 and s2["n_docs"] == s1["n_docs"] == 7
    assert s2["share_heads_entropy_decreased_ci"] == pytest.approx(s1["share_heads_entropy_decreased_ci"])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 1 wrote nothing else


def test_analysis_resumes_under_two_processes(tmp_path: Path, pair: tuple[str, str]) -> None:
    """Rank 0 writes the checkpoint; a later 2-process run resumes from it (rank 0 reads, all start there)."""
    out = tmp_path / "resumed"
    launch2(_analyze_args(pair, out, 3), tmp_path)  # stands for a run stopped after its first round
    state_meta = metadata(out / "accumulators.safetensors")
    assert state_meta["docs_done"] == "3"
    proc = launch2(["-v", *_analyze_args(pair, out, 7)], tmp_path)
    assert "resuming after 3 documents" in proc.stderr
    run1(_analyze_args(pair, tmp_path / "one", 7))
    for name in ("stats.safetensors", "per_doc.safetensors"):
        assert_tensors_close(tmp_path / "one" / name, out / name)
    assert metadata(out / "per_doc.safetensors")["doc_ids"] == metadata(tmp_path / "one" / "per_doc.safetensors")["doc_ids"]


# ---------------------------------------------------------------- evaluate, ablate, patch

def test_evaluate_two_processes_equal_one(tmp_path: Path, pair: tuple[str, str]) -> None:
    args = ["evaluate", "--model", pair[1], *DATA, "--n-docs", "5", "--batch-size", "2", "--max-new-tokens", "6",
            "--bootstrap", "100"]
    run1([*args, "--out", str(tmp_path / "one")])
    launch2([*args, "--out", str(tmp_path / "two")], tmp_path)
    recs = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [r["index"] for r in recs[1]] == list(range(5))  # rank 0 appended in document order
    drop = lambda r: {k: v for k, v in r.items() if k != "generation_s"}  # noqa: E731 - timing only
    assert [drop(r) for r in recs[0]] == [drop(r) for r in recs[1]]
    r1, r2 = (json.loads((tmp_path / d / "rouge.json").read_text()) for d in ("one", "two"))
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "n"):
        assert r1[key] == r2[key]


def test_mean_ablation_two_processes_equal_one(tmp_path: Path, pair: tuple[str, str]) -> None:
    """Mean-ablation means are reduced over processes before the ablation pass."""
    args = ["ablate", "--model", pair[1], *DATA, "--n-docs", "5", "--batch-size", "2", "--heads", "0.1,2.3",
            "--mode", "mean", "--random-controls", "3", "--n-bootstrap", "100"]
    run1([*args, "--out", str(tmp_path / "one")])
    launch2([*args, "--out", str(tmp_path / "two")], tmp_path)
    for name in ("ablation.csv", "ablation_per_doc.csv"):
        assert_csv_close(tmp_path / "one" / name, tmp_path / "two" / name)
    s1, s2 = (json.loads((tmp_path / d / "ablation.json").read_text()) for d in ("one", "two"))
    assert s1["p_value"] == s2["p_value"] and s1["effect"] == pytest.approx(s2["effect"], rel=REL)
    assert {k: v for k, v in s1["cost"].items() if k != "wall_s"} == {k: v for k, v in s2["cost"].items() if k != "wall_s"}


def test_patching_two_processes_equal_one(tmp_path: Path, pair: tuple[str, str]) -> None:
    args = ["patch", "--base", pair[0], "--tuned", pair[1], *DATA, "--n-docs", "5", "--batch-size", "2",
            "--n-bootstrap", "100"]
    run1([*args, "--out", str(tmp_path / "one")])
    launch2([*args, "--out", str(tmp_path / "two")], tmp_path)
    for name in ("patching.csv", "patching_per_doc.csv"):
        assert_csv_close(tmp_path / "one" / name, tmp_path / "two" / name)


# ---------------------------------------------------------------- fine-tuning

def _finetune_args(model: str, out: Path, *extra: str) -> list[str]:
    # 12 records -> 9 train / 3 val; batch 2 -> 5 micro-batches per epoch; --grad-accum 4 -> steps of
    # 4 and 1 micro-batches: under 2 processes 2 + 2, then 1 + none (rank 1 idles in that step).
    # Validation: 2 batches, one per rank. LoRA dropout (0.05) stays on: masks are seeded per
    # micro-batch, not per process.
    return ["finetune", "--model", model, "--data", str(CNNDM / "train.jsonl.gz"), "--n-docs", "12",
            "--val-fraction", "0.25", "--max-tokens", "64", "--method", "lora", "--batch-size", "2", "--grad-accum", "4",
            "--max-steps", "4", "--eval-every", "2", "--save-every", "1", "--keep-checkpoints", "10",
            "--lr", "1e-3", "--final", "last", "--no-progress", "--seed", "3", "--out", str(out), *extra]


def _train_log(out: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_finetune_two_processes_equal_one_with_the_same_effective_batch(tmp_path: Path, pair: tuple[str, str]) -> None:
    """Same command, 1 vs 2 processes: --grad-accum 4 is split 2 + 2, the effective batch stays 8."""
    run1(_finetune_args(pair[0], tmp_path / "one"))
    launch2(_finetune_args(pair[0], tmp_path / "two"), tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_weights_close(one / "final" / "adapter_model.safetensors", two / "final" / "adapter_model.safetensors")
    log1, log2 = _train_log(one), _train_log(two)
    assert [(r["type"], r["step"]) for r in log1] == [(r["type"], r["step"]) for r in log2]  # rank 0 logs, once
    for r1, r2 in zip(log1, log2):
        # the loss and the gradient norm check the normalization (Adam's update would hide a wrong scale)
        for key in ("loss", "grad_norm", "val_loss", "tokens", "summary_tokens"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=REL), (r1["step"], key)
    s1, s2 = (json.loads((d / "train_summary.json").read_text()) for d in (one, two))
    assert s1["effective_batch_size"] == s2["effective_batch_size"] == 8
    assert s2["processes"] == 2 and s1["steps"] == s2["steps"] == 4


def test_finetune_resumes_under_two_processes(tmp_path: Path, pair: tuple[str, str]) -> None:
    """A 2-process run resumed from its step-2 checkpoint ends with the uninterrupted run's weights."""
    full = tmp_path / "full"
    launch2(_finetune_args(pair[0], full), tmp_path)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(full / ".sumcircuit.json", resumed)  # the record that the checkpoints are sumcircuit's
    launch2(_finetune_args(pair[0], resumed, "--resume"), tmp_path)
    for rel in ("final/adapter_model.safetensors", "checkpoints/step-00000004/optimizer.safetensors"):
        ta, tb = load_file(full / rel), load_file(resumed / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel  # bitwise
    assert json.loads((resumed / "train_summary.json").read_text())["resumed_from_steps"] == [2]


def test_finetune_bf16_two_processes_use_the_casts_and_equal_one(tmp_path: Path, pair: tuple[str, str]) -> None:
    """bf16 autocast under DDP with the weight casts swapped in and out around each micro-batch."""
    bf16 = ("--mixed-precision", "bf16")
    run1(_finetune_args(pair[0], tmp_path / "one", *bf16))
    launch2(_finetune_args(pair[0], tmp_path / "two", *bf16), tmp_path)
    s1, s2 = (json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("one", "two"))
    assert s2["processes"] == 2 and s1["weight_casts"] == s2["weight_casts"]
    assert s2["weight_casts"]["dtype"] == "bfloat16" and s2["weight_casts"]["frozen_tensors"] > 0
    for r1, r2 in zip(_train_log(tmp_path / "one"), _train_log(tmp_path / "two"), strict=True):
        for key in ("loss", "val_loss"):
            if key in r1:  # each micro-batch runs whole on one rank: as close as in fp32
                assert r2[key] == pytest.approx(r1[key], rel=REL), (r1["step"], key)
