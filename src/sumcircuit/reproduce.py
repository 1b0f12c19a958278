"""The whole study as resumable stages: one command from a base model to a report.

Stages: zero-shot evaluation, full fine-tune, differential analysis (base vs
full), circuit selection by change (KL, the paper's way), attribution
patching (base vs full) and circuit selection by cause; then, once per
training seed, full fine-tune, LoRA on all layers, targeted LoRA on each
circuit and on each random layer set (the same size, drawn outside both
circuits), each evaluated; ablation and activation patching; the report.

Each stage writes into ``RUN/<stage>/`` and, when it finishes, a
``stage.json`` holding a key: the hash of its config and of the keys of the
stages it reads. A rerun skips stages whose key matches; a stage whose
inputs changed is moved aside to ``RUN/.stale/`` and recomputed, and an
interrupted stage resumes (fine-tuning and analysis resume internally).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from sumcircuit.artifacts import atomic_write_json, read_json
from sumcircuit.data import DataConfig
from sumcircuit.errors import SumcircuitError
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import provenance
from sumcircuit.runs import StudyLayout, StudyResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPreset:
    """Sizes and hyper-parameters of one study. ``paper`` follows arXiv 2505.17073."""

    name: str
    description: str
    train_docs: int | None
    val_docs: int
    eval_docs: int
    analysis_docs: int
    causal_docs: int
    max_tokens: int
    max_new_tokens: int
    full: Mapping[str, Any]
    lora: Mapping[str, Any]
    targeted: Mapping[str, Any]
    top_layers: int = 3
    top_heads: int = 8  # heads listed in both circuits (for comparison and head-level LoRA)
    random_controls: int = 20
    eval_batch_size: int = 8
    # Validation for early stopping: a split of the training data set (e.g. "validation"), or
    # None for a seeded held-out slice of the training documents. Never the evaluation split:
    # selecting checkpoints on the test documents would flatter every method.
    val_split: str | None = None
    patch_directions: tuple[Literal["denoise", "noise"], ...] = ("denoise", "noise")
    seeds: tuple[int, ...] = (1,)  # training seeds when --seeds is not given
    random_sets: int = 5  # random layer sets (outside both circuits), each trained once per seed
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast while fine-tuning
    # Full fine-tunes on every training seed, or on the first only: that one feeds the analysis and
    # causal stages, and no claim compares full fine-tunes, so "first" spends their time elsewhere.
    full_seeds: Literal["all", "first"] = "all"


PRESETS: dict[str, StudyPreset] = {
    "quick": StudyPreset(
        name="quick",
        description="pipeline-scale study for a 2-core CPU (~15 min with smollm2-135m-instruct): few "
                    "optimizer steps, short inputs, higher LoRA learning rate than the paper so that "
                    "adapters move at all within the budget; numbers are a smoke test, not a replication",
        train_docs=256, val_docs=16, eval_docs=24, analysis_docs=16, causal_docs=8, max_tokens=256,
        max_new_tokens=48,
        full=dict(lr=3e-5, batch_size=2, grad_accum=2, max_steps=24, eval_every=8, save_every=24,
                  patience=3, val_fraction=0.0625, keep_checkpoints=1, track_every=8, track_docs=4),
        lora=dict(lr=1e-3, batch_size=2, grad_accum=2, max_steps=16, eval_every=4, save_every=16,
                  patience=3, val_fraction=0.0625, keep_checkpoints=1),
        targeted=dict(lr=1e-3, batch_size=2, grad_accum=2, max_steps=16, eval_every=4, save_every=16,
                      patience=3, val_fraction=0.0625, keep_checkpoints=1),
        random_controls=20, patch_directions=("denoise",), seeds=(1,), random_sets=2),
    "cpu": StudyPreset(
        name="cpu",
        description="the most evidence that fits about 60 minutes on 2 CPU cores with smollm2-135m-instruct: "
                    "3 training seeds, 5 random layer sets, 192-token inputs, 16 evaluation documents with "
                    "summaries of up to 104 tokens, bf16 autocast while fine-tuning, full fine-tune on the first "
                    "seed only; constant learning rates (LoRA 3e-3 for every LoRA method) and early stopping on a "
                    "held-out slice when 2 evaluations (every 5 steps) bring no validation-loss gain over 0.015 "
                    "nats, under a 60-step cap; a small study, not a replication at the paper's scale",
        train_docs=320, val_docs=16, eval_docs=16, analysis_docs=16, causal_docs=8, max_tokens=192,
        max_new_tokens=104,
        full=dict(lr=3e-5, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=10,
                  patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05, keep_checkpoints=1),
        lora=dict(lr=3e-3, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=5,
                  patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05, keep_checkpoints=1),
        targeted=dict(lr=3e-3, batch_size=2, grad_accum=2, max_steps=60, eval_every=5, save_every=5,
                      patience=2, min_delta=0.015, scheduler="constant", val_fraction=0.05, keep_checkpoints=1),
        random_controls=20, eval_batch_size=8, patch_directions=("denoise",), seeds=(1, 2, 3), random_sets=5,
        mixed_precision="bf16", full_seeds="first"),
    "gpu": StudyPreset(
        name="gpu",
        description="the paper's hyper-parameters where one H200-class GPU allows in about 20 minutes: "
                    "3 training seeds, 5 random layer sets, bf16 autocast, 512-token inputs, full fine-tune "
                    "lr 3e-5 and LoRA rank 8 on q/v lr 5e-5 (batch 32 / 16), early stopping with patience 3 "
                    "(gains under 0.01 nats do not count, so a run creeping down under the decaying rate stops) "
                    "on a held-out slice; sized for the 1,000 training documents of ../shared/data/cnndm_gpt4; "
                    "not yet run on a GPU",
        train_docs=None, val_docs=64, eval_docs=100, analysis_docs=100, causal_docs=32, max_tokens=512,
        max_new_tokens=96,
        full=dict(lr=3e-5, batch_size=8, grad_accum=4, epochs=3, eval_every=10, save_every=10, patience=3,
                  min_delta=0.01, val_fraction=0.064, keep_checkpoints=1),
        lora=dict(lr=5e-5, batch_size=16, grad_accum=1, epochs=5, eval_every=20, save_every=20, patience=3,
                  min_delta=0.01, val_fraction=0.064, keep_checkpoints=1),
        targeted=dict(lr=5e-5, batch_size=16, grad_accum=1, epochs=5, eval_every=20, save_every=20, patience=3,
                      min_delta=0.01, val_fraction=0.064, keep_checkpoints=1),
        random_controls=20, eval_batch_size=32, seeds=(1, 2, 3), random_sets=5, mixed_precision="bf16"),
    "paper": StudyPreset(
        name="paper",
        description="the paper's hyper-parameters (full: AdamW wd 0.01, lr 3e-5, batch 32, 10 epochs; "
                    "LoRA rank 8 on q/v; targeted: lr 5e-5, batch 16, early stopping) at 1024 tokens; "
                    "needs a GPU",
        train_docs=None, val_docs=500, eval_docs=1000, analysis_docs=500, causal_docs=200, max_tokens=1024,
        max_new_tokens=128,
        full=dict(lr=3e-5, batch_size=8, grad_accum=4, epochs=10, eval_every=500, patience=3),
        lora=dict(lr=5e-5, batch_size=8, grad_accum=2, epochs=10, eval_every=500, patience=3),
        targeted=dict(lr=5e-5, batch_size=8, grad_accum=2, epochs=10, eval_every=500, patience=3),
        random_controls=20, eval_batch_size=16, val_split="validation", seeds=(1, 2, 3), random_sets=5),
}


@dataclass(frozen=True)
class StudyConfig:
    model: str
    data: str
    eval_data: str | None = None
    split: str | None = "train"
    eval_split: str | None = None
    val_split: str | None = None  # overrides the preset's
    preset: str = "quick"
    seeds: tuple[int, ...] | None = None  # None: the preset's
    device: str = "cpu"
    dtype: str = "float32"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def resolved_preset(self) -> StudyPreset:
        if self.preset not in PRESETS:
            raise SumcircuitError(f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(StudyPreset)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise SumcircuitError(f"unknown preset field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        preset = replace(PRESETS[self.preset], **dict(self.overrides))
        if preset.random_sets < 0 or preset.top_layers < 1:
            raise SumcircuitError("preset fields random_sets must be >= 0 and top_layers >= 1")
        if preset.full_seeds not in ("all", "first"):
            raise SumcircuitError(f"preset field full_seeds must be 'all' or 'first', got {preset.full_seeds!r}")
        return preset

    def resolved_seeds(self) -> tuple[int, ...]:
        seeds = tuple(self.seeds) if self.seeds is not None else tuple(self.resolved_preset().seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise SumcircuitError(f"seeds must be distinct and at least one, got {list(seeds)}")
        return seeds


# ---------------------------------------------------------------- stage machinery

def stage_key(config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    material = json.dumps({"config": config, "upstream": dict(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs named stages once per key; records keys and wall times in ``reproduce.json``."""

    run_dir: Path
    keys: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def retire(self, name: str, why: str) -> None:
        """Move a stage folder to ``.stale/`` so that nothing reads it as part of this study."""
        out = self.run_dir / name
        marker = out / "stage.json"
        key = read_json(marker).get("key") if marker.is_file() else "unfinished"
        stale = self.run_dir / ".stale" / f"{name.replace('/', '_')}-{key}"
        stale.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stale, ignore_errors=True)
        out.rename(stale)
        print(f"[reproduce] stage {name}: {why}; previous result moved to {stale}", flush=True)

    def run(self, name: str, config: Mapping[str, Any], upstream: tuple[str, ...],
            body: Callable[[Path], object]) -> Path:
        key = stage_key(config, {u: self.keys[u] for u in upstream})
        out = self.run_dir / name
        marker = out / "stage.json"
        if marker.is_file():
            done = read_json(marker)
            if done.get("key") == key:
                self.keys[name], self.timings[name] = key, float(done.get("wall_time_s", 0.0))
                self.skipped.append(name)
                log.info("stage %s: up to date (key %s), skipped", name, key)
                return out
            self.retire(name, "inputs changed")
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"[reproduce] stage {name} ...", flush=True)
        body(out)
        wall = time.perf_counter() - start
        atomic_write_json(marker, {"stage": name, "key": key, "config": config,
                                   "upstream": {u: self.keys[u] for u in upstream}, "wall_time_s": wall})
        self.keys[name], self.timings[name] = key, wall
        print(f"[reproduce] stage {name} done in {wall:.1f} s", flush=True)
        return out


# ---------------------------------------------------------------- the study

def _data(cfg: StudyConfig, *, eval_: bool, n_docs: int | None, max_tokens: int) -> DataConfig:
    if eval_:
        return DataConfig(cfg.eval_data or cfg.data, split=cfg.eval_split if cfg.eval_data else "val",
                          n_docs=n_docs, max_tokens=max_tokens)
    return DataConfig(cfg.data, split=cfg.split, n_docs=n_docs, max_tokens=max_tokens)


def check_disjoint_test_data(cfg: StudyConfig) -> None:
    """Refuse a study whose test documents would be its training documents.

    A folder or preset has separate train and val files; a single file has no
    splits, so without ``--eval-data`` ROUGE, analysis and causal tests would
    score the documents the models were trained on.
    """
    from sumcircuit.data import resolve_source

    train = resolve_source(cfg.data, cfg.split)
    test = resolve_source(cfg.eval_data, cfg.eval_split) if cfg.eval_data else resolve_source(cfg.data, "val")

    def identity(source: tuple[str, str | None]) -> tuple[str, str | None]:
        name, split = source
        return (str(Path(name).resolve()), None) if Path(name).is_file() else (name, split)  # a file has no splits

    if identity(train) == identity(test):
        raise SumcircuitError(f"--data {cfg.data}: training and test documents would both come from {train[0]}; "
                              "give a folder with train and val files, or --eval-data with held-out documents")


def _final_spec(layout: StudyLayout, run: str) -> str:
    return str(layout.final(run))


def random_control_sets(n_layers: int, size: int, n_sets: int, exclude: Sequence[int], seed: int) -> list[list[int]]:
    """``n_sets`` distinct random layer sets of ``size`` layers, drawn outside ``exclude`` when enough layers remain.

    The controls must not contain the circuit's own layers: a set overlapping
    the circuit would share part of the effect it is compared with. On a
    model too small for that, sets are drawn from every layer (the manifest
    says so). Sets have the circuit's layer count, so on a model whose layers
    all have one shape they train exactly as many LoRA parameters.
    """
    pool = [layer for layer in range(n_layers) if layer not in set(exclude)]
    if len(pool) < size:
        pool = list(range(n_layers))
    possible = math.comb(len(pool), size)
    rng = random.Random(seed)
    sets: list[list[int]] = []
    while len(sets) < min(n_sets, possible):
        draw = sorted(rng.sample(pool, size))
        if draw not in sets:
            sets.append(draw)
    return sets


@writes_output("reproduce", "run_dir")
def run_study(cfg: StudyConfig, run_dir: str | Path) -> StudyResult:
    """Run (or resume) every stage of the study and write the report.

    Every fine-tuning method, and each random layer set, is trained once per
    training seed; the analysis, both circuits and the causal tests use the
    first seed's full fine-tune. Stages loop over seeds outermost, so an
    interrupted study holds whole seeds.
    """
    from sumcircuit import analysis, causal, circuit, evaluation, training
    from sumcircuit.report import build_report, claim_rows
    from sumcircuit.training.checkpoint import latest_checkpoint

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    layout = StudyLayout(run)
    preset = cfg.resolved_preset()
    seeds = cfg.resolved_seeds()
    check_disjoint_test_data(cfg)
    runner = StageRunner(run)
    train = _data(cfg, eval_=False, n_docs=preset.train_docs, max_tokens=preset.max_tokens)
    val_split = cfg.val_split or preset.val_split
    val = (DataConfig(cfg.data, split=val_split, n_docs=preset.val_docs, max_tokens=preset.max_tokens)
           if val_split else None)
    test = _data(cfg, eval_=True, n_docs=preset.eval_docs, max_tokens=preset.max_tokens)
    probe = _data(cfg, eval_=True, n_docs=preset.analysis_docs, max_tokens=preset.max_tokens)
    causal_data = _data(cfg, eval_=True, n_docs=preset.causal_docs, max_tokens=preset.max_tokens)
    gen = evaluation.GenerationConfig(max_new_tokens=preset.max_new_tokens, batch_size=preset.eval_batch_size)
    common = {"model": cfg.model, "device": cfg.device, "dtype": cfg.dtype}

    def evaluate_stage(name: str, spec_of: Callable[[], str], upstream: tuple[str, ...]) -> None:
        runner.run(f"{name}/eval", {**common, "data": asdict(test), "gen": asdict(gen)}, upstream,
                   lambda out: evaluation.run_evaluate(spec_of(), test, gen, out, device=cfg.device,
                                                     dtype=cfg.dtype))

    def train_and_evaluate(name: str, method: str, hp: Mapping[str, Any], seed: int,
                           extra: Mapping[str, Any] | None = None, upstream: tuple[str, ...] = ()) -> None:
        def body(out: Path) -> None:
            ft_cfg = training.FinetuneConfig(method=method, seed=seed, device=cfg.device, dtype=cfg.dtype,
                                             mixed_precision=preset.mixed_precision, **{**dict(hp), **dict(extra or {})})
            resume = latest_checkpoint(out) is not None  # an interrupted stage continues
            training.run_finetune(cfg.model, train, ft_cfg, out, val_cfg=val, resume=resume)
        runner.run(name, {**common, "method": method, "hp": dict(hp), "seed": seed, **dict(extra or {}),
                          "mixed_precision": preset.mixed_precision,
                          "train": asdict(train), "val": asdict(val) if val else None}, upstream, body)
        evaluate_stage(name, functools.partial(_final_spec, layout, name), (name,))

    seed0 = seeds[0]
    full0 = layout.run_name("full", seed0)
    full_spec = functools.partial(_final_spec, layout, full0)
    evaluate_stage(layout.ZERO_SHOT, lambda: cfg.model, ())
    train_and_evaluate(full0, "full", preset.full, seed0)
    runner.run("analysis", {**common, "data": asdict(probe)}, (full0,),
               lambda out: analysis.run_analysis(cfg.model, full_spec(), probe, analysis.AnalysisConfig(seed=seed0),
                                                 out, device=cfg.device, dtype=cfg.dtype))
    runner.run("circuit", {"score": "kl", "top_layers": preset.top_layers, "top_heads": preset.top_heads,
                           "seed": seed0}, ("analysis",),
               lambda out: circuit.select_circuit(layout.analysis, score="kl", top_layers=preset.top_layers,
                                                  top_heads=preset.top_heads, seed=seed0, out=layout.circuit_file))
    attribution_cfg = causal.AttributionConfig(granularity="all", directions=preset.patch_directions, seed=seed0,
                                               device=cfg.device, dtype=cfg.dtype)
    runner.run("attribution", {**common, "data": asdict(causal_data), "config": asdict(attribution_cfg)}, (full0,),
               lambda out: causal.attribute(cfg.model, full_spec(), causal_data, attribution_cfg, out=out))
    runner.run("circuit_attribution", {"top_layers": preset.top_layers, "top_heads": preset.top_heads,
                                       "seed": seed0}, ("attribution",),
               lambda out: circuit.select_circuit_by_attribution(
                   layout.attribution, top_layers=preset.top_layers, top_heads=preset.top_heads, seed=seed0,
                   out=layout.attribution_circuit_file))
    kl_layers = circuit.read_circuit(layout.circuit_file).layers
    cause_layers = circuit.read_circuit(layout.attribution_circuit_file).layers
    n_layers = int(read_json(layout.analysis / "summary.json")["n_layers"])
    excluded = sorted(set(kl_layers) | set(cause_layers))
    random_sets = random_control_sets(n_layers, len(kl_layers), preset.random_sets, excluded, seed0)
    controls = {"layers": random_sets, "excluded": excluded, "draw_seed": seed0,
                "outside_circuits": all(not set(s) & set(excluded) for s in random_sets)}

    full_seeds = seeds if preset.full_seeds == "all" else seeds[:1]
    wanted = {layout.ZERO_SHOT, "analysis", "circuit", "attribution", "circuit_attribution", "ablate", "patch"}
    for seed in seeds:
        wanted |= {layout.run_name(m, seed) for m in layout.METHODS if m != "full" or seed in full_seeds}
        wanted |= {layout.run_name(layout.random_method(k + 1), seed) for k in range(len(random_sets))}
    for stale in sorted(p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if stale not in wanted:  # e.g. fewer --seeds or random sets than last time
            runner.retire(stale, "not part of this study")

    for seed in seeds:  # whole seeds first: an interrupted study holds complete seeds
        if seed != seed0 and seed in full_seeds:  # the first seed's full fine-tune ran above
            train_and_evaluate(layout.run_name("full", seed), "full", preset.full, seed)
        train_and_evaluate(layout.run_name("lora_all", seed), "lora", preset.lora, seed)
        train_and_evaluate(layout.run_name("targeted", seed), "targeted-lora", preset.targeted, seed,
                           {"layers": tuple(kl_layers)}, ("circuit",))
        train_and_evaluate(layout.run_name("targeted_attribution", seed), "targeted-lora", preset.targeted, seed,
                           {"layers": tuple(cause_layers)}, ("circuit_attribution",))
        for k, layers in enumerate(random_sets, start=1):  # differ from `targeted` only in the layers
            train_and_evaluate(layout.run_name(layout.random_method(k), seed), "targeted-lora", preset.targeted,
                               seed, {"layers": tuple(layers)})
    runner.run("ablate", {**common, "data": asdict(causal_data), "controls": preset.random_controls},
               (full0, "circuit"),
               lambda out: causal.ablate(full_spec(), causal_data, causal.AblationConfig(
                   circuit=str(layout.circuit_file), random_controls=preset.random_controls,
                   seed=seed0, device=cfg.device, dtype=cfg.dtype), out=out))
    runner.run("patch", {**common, "data": asdict(causal_data), "directions": preset.patch_directions},
               (full0,),
               lambda out: causal.patch(cfg.model, full_spec(), causal_data,
                                        causal.PatchConfig(seed=seed0, directions=preset.patch_directions,
                                                           device=cfg.device, dtype=cfg.dtype), out=out))
    manifest = {"study": {**asdict(cfg), "seeds": list(seeds)}, "preset": asdict(preset), "stages": runner.keys,
                "wall_time_s": runner.timings, "skipped": runner.skipped, "random_controls": controls,
                "provenance": provenance(seed=seed0)}
    atomic_write_json(layout.manifest, manifest)
    report = build_report(run)
    print(f"[reproduce] report: {report}", flush=True)
    return StudyResult(manifest, run, claim_rows(run))
