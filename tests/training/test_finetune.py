"""Fine-tuning: loss mask, optimizer, early stopping, layer choice, kill-and-resume, adapters as specs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sumcircuit as sc
from sumcircuit.data import DataConfig, collate, encode_all, load_examples
from sumcircuit.errors import ModelError
from sumcircuit.lora import inject_lora, merge_lora
from sumcircuit.models import load_adapter, load_model
from sumcircuit.outputs import OutputError
from sumcircuit.training import FinetuneConfig, FinetuneError, choose_layers
from sumcircuit.training.batches import evaluate_loss, summary_loss, summary_loss_terms
from sumcircuit.training.checkpoint import export_model
from sumcircuit.training.methods import random_layers
from sumcircuit.training.optim import make_optimizer

from helpers import CNNDM, REPO, lockstep, make_tiny_model

TRAIN = str(CNNDM / "train.jsonl.gz")


def _data(n: int = 12, max_tokens: int = 96) -> DataConfig:
    return DataConfig(TRAIN, n_docs=n, max_tokens=max_tokens)


def _cfg(**kw: object) -> FinetuneConfig:
    base = dict(method="targeted-lora", layers=(1, 2), batch_size=2, grad_accum=2, max_steps=4, eval_every=2,
                lr=1e-2)
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def run_finetune(model: str, data: DataConfig, cfg: FinetuneConfig, out: Path, val_cfg: DataConfig | None = None,
                 resume: bool = True) -> dict:
    """``sc.finetune`` quietly; the run's summary."""
    return sc.finetune(model, data, cfg, val_data=val_cfg, runtime=sc.Runtime(progress=False), out=out,
                       resume=resume).summary


def _read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- loss and optimizer

def test_loss_is_mean_ce_over_summary_tokens_only(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_tiny_model("gpt2")
    examples = load_examples(_data(n=3)).examples
    batch = collate(encode_all(tiny_tokenizer, examples, _data()), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = summary_loss(model, batch)
        logp = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    terms = []  # independent of the labels: the collated summary span, predicted one position earlier
    for row in range(batch["input_ids"].shape[0]):
        for pos in torch.nonzero(batch["summary_mask"][row]).flatten().tolist():
            terms.append(-logp[row, pos - 1, batch["input_ids"][row, pos]])
    assert len(terms) == int((batch["labels"] != -100).sum()) > 0
    torch.testing.assert_close(ours, torch.stack(terms).mean(), rtol=1e-6, atol=0)


def test_document_objective_models_the_documents_alone(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The control task: labels are the document's own tokens, no summary token is in the input or the loss."""
    from sumcircuit.training.batches import OBJECTIVES

    data = _data(n=3)
    examples = load_examples(data).examples
    encoded = OBJECTIVES["document"](tiny_tokenizer, examples, data, None)
    for ex, enc in zip(examples, encoded):
        doc = tiny_tokenizer(ex.text, add_special_tokens=False)["input_ids"]  # independent tokenization
        start, end = enc.document_span
        assert enc.input_ids[start:end] == doc[:end - start] and end - start > 0
        assert end == len(enc.input_ids) and enc.summary_span[0] == enc.summary_span[1]  # nothing after it
        assert [i for i, t in enumerate(enc.labels) if t != -100] == list(range(start, end))
        assert enc.labels[start:end] == enc.input_ids[start:end]
    task = OBJECTIVES["summary"](tiny_tokenizer, examples, data, None)
    assert all(t.labels[t.document_span[0]:t.document_span[1]] == [-100] * (t.document_span[1] - t.document_span[0])
               for t in task)


def test_document_objective_trains_on_documents(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A full fine-tune with the control objective lowers the documents' loss, and records its objective."""
    cfg = _cfg(method="full", layers=None, objective="document", max_steps=6, eval_every=3, lr=3e-3)
    summary = run_finetune(str(tiny_model_dirs["gpt2"]), _data(n=16), cfg, tmp_path / "ctrl")
    curve = [r["val_loss"] for r in _read_log(tmp_path / "ctrl") if r.get("val_loss") is not None]
    assert len(curve) >= 2 and curve[-1] < curve[0]
    assert summary["provenance"]["config"]["objective"] == "document"


@pytest.mark.parametrize("world", [2, 4])
def test_validation_loss_is_shared_out_over_processes(tiny_tokenizer, world: int) -> None:  # type: ignore[no-untyped-def]
    """Each of N processes runs ceil(batches / N) forward passes, and all get one process's loss, bit for bit.

    The processes are threads whose ``all_sum`` meets at a barrier; 5 documents
    in batches of 2 are 3 batches, so some rank idles in the last round.
    """
    model = make_tiny_model("gpt2")
    encoded = encode_all(tiny_tokenizer, load_examples(_data(n=5)).examples, _data())
    pad, cpu = tiny_tokenizer.pad_token_id, torch.device("cpu")
    batches = [collate(encoded[s:s + 2], pad)["input_ids"] for s in range(0, 5, 2)]
    with torch.no_grad():  # independent reference: one document at a time
        terms = [summary_loss_terms(model(**{k: v for k, v in collate([e], pad).items()
                                             if k in ("input_ids", "attention_mask")}).logits,
                                    collate([e], pad)["labels"]) for e in encoded]
    reference = sum(float(s) for s, _ in terms) / sum(int(c) for _, c in terms)
    one, n_tokens = evaluate_loss(model, encoded, pad, 2, cpu)
    assert one == pytest.approx(reference, rel=1e-6) and n_tokens == sum(int(c) for _, c in terms)

    ran: dict[int, list[int]] = {rank: [] for rank in range(world)}

    def job(rank: int):  # type: ignore[no-untyped-def]
        def run(all_sum):  # type: ignore[no-untyped-def]
            mine = copy.deepcopy(model)  # its own copy: the hook tells this rank's passes apart
            mine.register_forward_pre_hook(lambda _m, _a, kw: ran[rank].append(
                next(i for i, b in enumerate(batches) if torch.equal(b, kw["input_ids"]))), with_kwargs=True)
            return evaluate_loss(mine, encoded, pad, 2, cpu, rank=rank, world=world, all_sum=all_sum)
        return run

    results = lockstep([job(rank) for rank in range(world)])
    assert results == [(one, n_tokens)] * world  # exact: the same numbers added in the same order
    rounds = -(-3 // world)
    assert ran == {rank: [b if b < 3 else 0 for b in range(rank, rounds * world, world)] for rank in range(world)}


def test_full_finetune_adamw_weight_decay(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(method="full", layers=None, lr=1e-3, max_steps=1, grad_accum=1, final="last").resolved()
    groups = make_optimizer(make_tiny_model("gpt2"), cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.01 * 0]  # matrices decay; biases/norms do not
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    summary = run_finetune(str(tiny_model_dirs["gpt2"]), _data(max_tokens=64), cfg, tmp_path)
    assert summary["trainable_params"] == summary["total_params"]
    before = load_model(str(tiny_model_dirs["gpt2"])).model.transformer.wpe.weight
    after = load_model(str(tmp_path / "final")).model.transformer.wpe.weight
    # positions >= 64 are never used: zero gradient, so AdamW's only change is the decoupled decay
    torch.testing.assert_close(after[100:], before[100:] * (1 - 1e-3 * 0.01), rtol=0, atol=1e-9)
    assert not torch.equal(after[100:], before[100:])
    assert not torch.allclose(after[:10], before[:10], rtol=0, atol=1e-6)  # used positions learned


def test_grad_accumulation_matches_large_batch(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Loss is normalized by the step's summary tokens: 2 x 2 micro-batches == one batch of 4."""
    runs = {}
    for name, bs, acc in (("big", 4, 1), ("accum", 2, 2)):
        cfg = _cfg(batch_size=bs, grad_accum=acc, max_steps=2, eval_every=2, lora_dropout=0.0, final="last")
        run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / name)
        runs[name] = load_file(str(tmp_path / name / "final" / "adapter_model.safetensors"))
    for key in runs["big"]:
        torch.testing.assert_close(runs["accum"][key], runs["big"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.real  # reads the real data sets of ../shared/data
def test_early_stopping_triggers_and_logs(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # lr 5 wrecks the model: no evaluation after step 0 improves, so patience 2 stops at step 2
    cfg = _cfg(lr=5.0, max_steps=50, eval_every=1, patience=2)
    summary = run_finetune(str(tiny_model_dirs["gpt2"]), _data(), cfg, tmp_path)
    assert summary["stopped_early"] and summary["steps"] == 2 and summary["planned_steps"] == 50
    assert summary["best_step"] == 0 and summary["epochs_to_best"] == 0.0
    assert [s for s, _ in summary["val_curve"]] == [0, 1, 2]
    assert summary["best_val_loss"] == summary["val_curve"][0][1] < min(v for _, v in summary["val_curve"][1:])
    for key in ("method", "layers", "trainable_params", "total_params", "steps", "best_step", "epochs_to_best",
                "best_val_loss", "wall_time_s", "provenance"):
        assert key in summary
    assert json.loads((tmp_path / "train_summary.json").read_text())["steps"] == 2
    records = _read_log(tmp_path)
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and r["loss"] > 0 for r in train)
    assert [r["step"] for r in records if r["type"] == "val"] == [0, 1, 2]
    # final/ holds the best weights (step 0 = the base): its logits equal the base model's
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "final")).model(ids).logits,
                                   load_model(str(tiny_model_dirs["gpt2"])).model(ids).logits, rtol=0, atol=1e-6)


def _keras_stop(curve: list[float], patience: int, min_delta: float) -> tuple[int, int]:
    """Independent statement of the rule: (index of the best evaluation, index where patience ran out)."""
    best, best_i, bad = curve[0], 0, 0
    for i, value in enumerate(curve[1:], start=1):
        if value < best - min_delta:
            best, best_i, bad = value, i, 0
        else:
            bad += 1
            if bad >= patience:
                return best_i, i
    return best_i, len(curve) - 1


def test_min_delta_stops_a_run_that_creeps_down(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Improvements smaller than --min-delta count as none: the run stops, its best is the last real gain."""
    base = dict(lr=3e-3, max_steps=12, eval_every=1, patience=2, scheduler="constant", lora_dropout=0.0)
    free = run_finetune(str(tiny_model_dirs["gpt2"]), _data(), _cfg(**base), tmp_path / "free")
    curve = [v for _, v in free["val_curve"]]
    gains = sorted(curve[i - 1] - curve[i] for i in range(1, len(curve)) if curve[i] < curve[i - 1])
    assert not free["stopped_early"] and len(gains) >= 4  # it keeps creeping down without a threshold
    min_delta = gains[len(gains) // 2]  # half the gains are too small to count
    best_i, stop_i = _keras_stop(curve, 2, min_delta)
    assert stop_i < len(curve) - 1  # the rule stops this curve before the cap
    run = run_finetune(str(tiny_model_dirs["gpt2"]), _data(), _cfg(**base, min_delta=min_delta), tmp_path / "delta")
    assert run["stopped_early"] and run["steps"] == stop_i and run["best_step"] == best_i
    assert [v for _, v in run["val_curve"]] == curve[:stop_i + 1]  # same training, only the stop differs
    with pytest.raises(sc.ConfigError, match="min_delta: must be >= 0"):
        _cfg(min_delta=-0.1).resolved()


def test_cli_min_delta(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sumcircuit.cli import main

    argv = ["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", TRAIN, "--n-docs", "8", "--max-tokens", "64",
            "--method", "lora", "--batch-size", "2", "--max-steps", "5", "--eval-every", "1", "--patience", "1",
            "--lr", "1e-2", "--no-progress"]
    assert main([*argv, "--min-delta", "100", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    # no gain can exceed 100 nats: the first evaluation after the start ends the run, the start stays best
    assert (summary["steps"], summary["best_step"], summary["stopped_early"]) == (1, 0, True)
    assert summary["provenance"]["config"]["min_delta"] == 100.0


def test_cli_objective(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``finetune --objective document`` through the CLI: the control task's run records it; a bad choice is one line."""
    from sumcircuit.cli import main

    from helpers import cli_fails

    argv = ["finetune", "--model", str(tiny_model_dirs["gpt2"]), "--data", TRAIN, "--n-docs", "8", "--max-tokens", "64",
            "--method", "full", "--batch-size", "2", "--max-steps", "2", "--eval-every", "1", "--lr", "1e-3",
            "--no-progress"]
    assert main([*argv, "--objective", "document", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["provenance"]["config"]["objective"] == "document"
    cli_fails([*argv, "--objective", "summaries", "--out", str(tmp_path / "bad")], capsys, "--objective")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- layer choice

def test_layer_choice_rules(tmp_path: Path) -> None:
    assert choose_layers(FinetuneConfig(method="lora"), 30).layers == list(range(30))
    assert choose_layers(FinetuneConfig(method="targeted-lora", layers=(5, 2, 3)), 30).layers == [2, 3, 5]
    with pytest.raises(FinetuneError, match=r"layer 40 out of range: the model has 30 layers \(valid: 0..29\)"):
        choose_layers(FinetuneConfig(method="targeted-lora", layers=(2, 40)), 30)
    with pytest.raises(FinetuneError, match="exactly one of"):
        choose_layers(FinetuneConfig(method="targeted-lora"), 30)
    with pytest.raises(FinetuneError, match="trains every layer"):
        choose_layers(FinetuneConfig(method="lora", layers=(1,)), 30)
    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"layers": [5, 2, 3], "heads": [[2, 1], [5, 0]], "score": "kl"}))
    choice = choose_layers(FinetuneConfig(method="targeted-lora", circuit=str(circuit)), 30)
    assert (choice.layers, [h.name for h in choice.heads or []]) == ([2, 3, 5], ["L2.H1", "L5.H0"])
    circuit.write_text(json.dumps({"heads": [[2, 1]]}))
    with pytest.raises(FinetuneError, match="'layers'"):
        choose_layers(FinetuneConfig(method="targeted-lora", circuit=str(circuit)), 30)


def test_head_unit_rules(tmp_path: Path) -> None:
    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"layers": [5, 2, 3], "heads": ["L2.H1", "L5.H0"], "score": "attribution"}))
    choice = choose_layers(FinetuneConfig(method="targeted-lora", circuit=str(circuit), unit="head"), 30)
    assert choice.layers == [2, 5]  # the heads' layers only: layer 3 has no chosen head
    with pytest.raises(FinetuneError, match="`unit` head adapts the heads of a circuit"):
        choose_layers(FinetuneConfig(method="targeted-lora", layers=(2,), unit="head"), 30)
    with pytest.raises(FinetuneError, match="`unit` head is for a method that adapts chosen layers"):
        choose_layers(FinetuneConfig(method="lora", unit="head"), 30)
    circuit.write_text(json.dumps({"layers": [2], "heads": []}))
    with pytest.raises(FinetuneError, match="lists no heads"):
        choose_layers(FinetuneConfig(method="targeted-lora", circuit=str(circuit), unit="head"), 30)


def test_head_unit_cli_end_to_end(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from sumcircuit.cli import main
    from sumcircuit.lora import head_rows

    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"layers": [1, 2], "heads": ["L1.H4", "L2.H0"]}))
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_model_dirs["llama"]), "--data", TRAIN, "--n-docs", "8",
                 "--max-tokens", "96", "--method", "targeted-lora", "--circuit", str(circuit), "--unit", "head",
                 "--rank", "4", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2", "--no-progress", "--final", "last",
                 "--out", str(out)])
    assert code == 0
    # llama tiny: d 48, head_dim 8, 6 query heads on 2 KV heads; per layer 4 x (48 + 48) for A, 4 x 8 per B row set
    expected = 2 * (4 * 96 + 4 * 8 + 4 * 8)
    assert f"heads L1.H4, L2.H0: {expected:,} trainable" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["unit"], summary["trainable_params"], summary["expected_trainable_params"]) == \
        ("head", expected, expected)
    base, tuned = load_model(str(tiny_model_dirs["llama"])), load_model(str(out / "final"))
    for layer, head in ((1, 4), (2, 0)):
        q_rows, v_rows = head_rows(base.adapter, [head])
        for name, rows in (("q_proj", q_rows), ("v_proj", v_rows)):
            w0 = getattr(base.model.model.layers[layer].self_attn, name).weight
            w1 = getattr(tuned.model.model.layers[layer].self_attn, name).weight
            keep = [r for r in range(w0.shape[0]) if r not in rows]
            assert torch.equal(w0[keep], w1[keep]) and not torch.equal(w0[rows], w1[rows])


def test_random_layers_deterministic() -> None:
    draws = {seed: random_layers(30, 3, seed) for seed in range(20)}
    assert all(random_layers(30, 3, seed) == layers for seed, layers in draws.items())
    assert all(len(set(v)) == 3 and v == sorted(v) and 0 <= min(v) and max(v) < 30 for v in draws.values())
    assert len({tuple(v) for v in draws.values()}) > 15  # seeds give different draws
    assert draws[7] == [4, 10, 12]  # pinned: random.Random(7).sample(range(30), 3), sorted
    cfg = FinetuneConfig(method="targeted-lora", random_layers=3, seed=7)
    assert choose_layers(cfg, 30).layers == draws[7]
    assert choose_layers(replace_seed(cfg, 7), 30).layers == draws[7]
    with pytest.raises(FinetuneError, match="choose 1..30"):
        random_layers(30, 31, 0)


def replace_seed(cfg: FinetuneConfig, layer_seed: int) -> FinetuneConfig:
    from dataclasses import replace

    return replace(cfg, seed=123, layer_seed=layer_seed)


# ---------------------------------------------------------------- adapters as model specs

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_folder_is_a_model_spec(family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dirs[family]))
    loaded.weights_sha256()  # cached before injection: the adapter records the base it was trained on
    peft_model = inject_lora(loaded.model, loaded.adapter, [0, 2], rank=4)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    export_model(peft_model, loaded, tmp_path / "adapter", {"method": "targeted-lora", "layers": [0, 2]})
    test_ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = peft_model(test_ids).logits
        in_memory = merge_lora(copy.deepcopy(peft_model), loaded.adapter)(test_ids).logits
        spec = load_model(str(tmp_path / "adapter"))
        from_spec = spec.model(test_ids).logits
    assert spec.source.kind == "adapter" and not hasattr(spec.model, "peft_config")  # merged, plain
    assert torch.equal(from_spec, in_memory)  # bitwise: same merge arithmetic on the same tensors
    torch.testing.assert_close(from_spec, unmerged, rtol=0, atol=1e-5)  # merged vs unmerged: float order
    base = load_model(str(tiny_model_dirs[family]))
    unmerged_again = load_adapter(base, tmp_path / "adapter", merge=False)
    with torch.no_grad():
        assert torch.equal(unmerged_again.model(test_ids).logits, unmerged)
    other = load_model(str(tiny_model_dirs[family]))
    with torch.no_grad():
        other.model.lm_head.weight.add_(1.0)
    other._weights_sha256 = None
    with pytest.raises(ModelError, match="trained on base weights"):
        load_adapter(other, tmp_path / "adapter")


# ---------------------------------------------------------------- resume

# Slows every optimizer step from outside the library, so that a kill lands mid-run.
_SLOW_CLI = ("import sys, time; import sumcircuit.training.loop as loop; step = loop.train_step; "
             "delay = float(sys.argv.pop(1)); loop.train_step = lambda *a: (time.sleep(delay), step(*a))[1]; "
             "from sumcircuit.cli import main; sys.exit(main(sys.argv[1:]))")


def _cli(args: list[str], step_sleep: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    head = ["-m", "sumcircuit.cli"] if step_sleep is None else ["-c", _SLOW_CLI, str(step_sleep)]
    return subprocess.Popen([sys.executable, *head, "finetune", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_and_resume_equals_uninterrupted(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL mid-run, --resume: final weights and optimizer state bitwise equal to an uninterrupted run.

    LoRA dropout (0.05) and grad accumulation make this check RNG, data order and optimizer restore.
    """
    args = ["--model", str(tiny_model_dirs["gpt2"]), "--data", TRAIN, "--n-docs", "12", "--max-tokens", "96",
            "--method", "targeted-lora", "--layers", "1,2", "--batch-size", "2", "--grad-accum", "2",
            "--max-steps", "10", "--eval-every", "2", "--lr", "1e-2", "--final", "last", "--keep-checkpoints",
            "10", "--no-progress", "--seed", "3"]
    full = _cli([*args, "--out", str(tmp_path / "a")])
    killed = _cli([*args, "--out", str(tmp_path / "b")], step_sleep=0.3)
    marker = tmp_path / "b" / "checkpoints" / "step-00000004" / "state.json"
    deadline = time.time() + 120
    while not marker.exists():
        assert killed.poll() is None and time.time() < deadline, killed.stdout.read() if killed.stdout else ""
        time.sleep(0.02)
    time.sleep(0.45)  # into step 5 or 6: some log lines beyond the checkpoint
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "final").exists()
    resumed = _cli([*args, "--out", str(tmp_path / "b"), "--resume"])
    out_full, out_resumed = full.communicate(timeout=1200)[0], resumed.communicate(timeout=1200)[0]
    assert full.returncode == 0, out_full
    assert resumed.returncode == 0, out_resumed
    a, b = tmp_path / "a", tmp_path / "b"
    for rel in ("final/adapter_model.safetensors", "checkpoints/step-00000010/optimizer.safetensors",
                "checkpoints/best/adapter_model.safetensors"):
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel  # bitwise
    sa, sb = (json.loads((p / "train_summary.json").read_text()) for p in (a, b))
    assert sb["resumed_from_steps"] and sb["resumed_from_steps"][0] >= 4
    assert sa["val_curve"] == sb["val_curve"] and sa["steps"] == sb["steps"] == 10
    log_a = [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in _read_log(a)]
    log_b = [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in _read_log(b)]
    assert log_a == log_b  # lines from the killed steps were dropped and re-run identically


def test_full_finetune_resume_in_process(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Resume a full fine-tune from a mid-run checkpoint: same final weights (bitwise)."""
    cfg = _cfg(method="full", layers=None, lr=1e-3, max_steps=6, eval_every=2, keep_checkpoints=5, final="last")
    run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / "a")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    shutil.copy(tmp_path / "a" / ".sumcircuit.json", tmp_path / "b")  # the record that the checkpoints are ours
    summary = run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / "b")  # resumes by default
    assert summary["resumed_from_steps"] == [2]
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    again = run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / "b")  # a finished run: nothing to do
    assert again["steps"] == 6 and again["resumed_from_steps"] == [2, 6]
    assert all(torch.equal(wa[k], v) for k, v in load_file(str(tmp_path / "b" / "final" / "model.safetensors")).items())
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write .notes.txt"):  # never replaced or deleted: refused
        run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / "b", resume=False)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine" and (tmp_path / "b" / "final").is_dir()
    (tmp_path / "b" / "notes.txt").unlink()
    fresh = run_finetune(str(tiny_model_dirs["llama"]), _data(), cfg, tmp_path / "b", resume=False)  # starts over
    assert fresh["resumed_from_steps"] == []
    with pytest.raises(FinetuneError, match=r"differs in: config\.lr"):
        run_finetune(str(tiny_model_dirs["llama"]), _data(), _cfg(method="full", layers=None, lr=2e-3,
                                                                  max_steps=6, eval_every=2, final="last"),
                     tmp_path / "b",
                     resume=True)


# ---------------------------------------------------------------- tracking

def test_tracking_csv(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(layers=(1, 2), max_steps=2, eval_every=1, track_every=1, track_docs=2, lr=5e-2)
    run_finetune(str(tiny_model_dirs["gpt2"]), _data(), cfg, tmp_path)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "tracking.csv")))
    assert sorted({int(r["step"]) for r in rows}) == [0, 1, 2]
    assert len(rows) == 3 * 3 * 4  # steps x layers x heads
    step0 = [r for r in rows if r["step"] == "0"]
    assert all(float(r["kl_base_tuned"]) == 0 for r in step0)  # the start model against itself
    later = [r for r in rows if r["step"] == "2"]
    assert all(float(r["kl_base_tuned"]) == 0 for r in later if r["layer"] == "0")  # below the adapted layers
    assert any(float(r["kl_base_tuned"]) > 0 for r in later if r["layer"] == "2")


# ---------------------------------------------------------------- real model

@pytest.mark.real
def test_real_smollm2_two_steps(tmp_path: Path) -> None:
    from sumcircuit.models import NAMED_MODELS

    if not NAMED_MODELS["smollm2-135m-instruct"].installed():
        pytest.fail("smollm2-135m-instruct is not installed")
    cfg = FinetuneConfig(method="targeted-lora", layers=(2, 3, 5), batch_size=1, grad_accum=1, max_steps=2,
                         eval_every=2)
    summary = run_finetune("smollm2-135m-instruct", DataConfig(TRAIN, n_docs=4, max_tokens=128), cfg, tmp_path,
                           val_cfg=DataConfig(str(CNNDM / "val.jsonl.gz"), n_docs=1, max_tokens=128))
    # q_proj 576 -> 576, v_proj 576 -> 192 (3 kv heads x 64): 8 x (1152 + 768) per layer
    assert summary["trainable_params"] == 3 * 8 * ((576 + 576) + (576 + 192)) == 46_080
    assert summary["steps"] == 2 and summary["best_val_loss"] > 0
    meta = json.loads((tmp_path / "final" / "sumcircuit_adapter.json").read_text())
    assert meta["base_model"] == "smollm2-135m-instruct" and meta["layers"] == [2, 3, 5]
