"""``run_study``: the whole study as a graph of resumable stages, from a base model to a report.

The graph (:class:`StudyGraph`) declares every stage with the stages it reads
and the config that determines it. Core stages come first: the zero-shot
evaluation, the reference fine-tune (the first seed's ``full`` run) and its
evaluation, the differential analysis (base vs reference), the circuit by
change (KL, the paper's way), attribution patching and the circuit by cause.
Once they are done, the preset's arms expand (their layers come from the
circuits, the random sets are drawn outside both) into one training and one
evaluation stage per variant and seed; ablation and activation patching of
the reference close the study. Whole seeds run first, so an interrupted
study holds complete seeds.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sumcircuit.artifacts import atomic_write_json, read_json
from sumcircuit.config import coerce_config
from sumcircuit.data.config import DataConfig
from sumcircuit.errors import ConfigError
from sumcircuit.outputs import writes_output
from sumcircuit.provenance import provenance
from sumcircuit.runtime import Runtime, coerce_runtime
from sumcircuit.study.arms import ARMS, StudyContext, random_control_sets
from sumcircuit.study.config import StudyConfig
from sumcircuit.study.executors import ExecutorConfig, executor_for
from sumcircuit.study.graph import Stage, StageRunner
from sumcircuit.study.layout import StudyLayout
from sumcircuit.study.presets import StudyPreset
from sumcircuit.study.result import StudyResult

log = logging.getLogger(__name__)

FAITHFULNESS_RANDOM = 5  # random layer sets of each circuit's size behind the faithfulness curves
REFERENCE_ARM = "full"  # the first seed's run of this arm is the model the analysis and causal stages read


def check_disjoint_test_data(cfg: StudyConfig) -> None:
    """Refuse a study whose test documents would be its training documents.

    A folder or preset has separate train and val files; a single file has no
    splits, so without ``eval_data`` ROUGE, analysis and causal tests would
    score the documents the models were trained on.
    """
    from sumcircuit.data.sources import resolve_source

    train = resolve_source(cfg.data, cfg.split)
    test = resolve_source(cfg.eval_data, cfg.eval_split) if cfg.eval_data else resolve_source(cfg.data, "val")

    def identity(source: tuple[str, str | None]) -> tuple[str, str | None]:
        name, split = source
        return (str(Path(name).resolve()), None) if Path(name).is_file() else (name, split)  # a file has no splits

    if identity(train) == identity(test):
        raise ConfigError("data", f"{cfg.data}: training and test documents would both come from {train[0]}; give "
                                  "a folder with train and val files, or `eval_data` with held-out documents")


def check_fits_model(cfg: StudyConfig, preset: StudyPreset, runtime: Runtime) -> None:
    """Options sized by the model (circuit layers and heads), checked before the first stage rather than mid-study."""
    from sumcircuit.models import peek_config

    config = peek_config(cfg.model, trust_remote_code=runtime.trust_remote_code)
    n_layers, n_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    if preset.top_layers > n_layers:
        raise ConfigError("top_layers", f"{preset.top_layers} is more than the {n_layers} layers of {cfg.model}")
    if preset.transfer_from:
        transfer_layers(preset.transfer_from, n_layers)
    if preset.top_heads > n_layers * n_heads:
        raise ConfigError("top_heads", f"{preset.top_heads} is more than the {n_layers * n_heads} heads of "
                                       f"{cfg.model} ({n_layers} layers x {n_heads})")


@dataclass
class StudyGraph:
    """The stages of one study, declared from its config, preset, seeds and runtime."""

    cfg: StudyConfig
    preset: StudyPreset
    seeds: tuple[int, ...]
    runtime: Runtime
    layout: StudyLayout

    def __post_init__(self) -> None:
        cfg, preset = self.cfg, self.preset
        self.train = DataConfig(cfg.data, split=cfg.split, n_docs=preset.train_docs, max_tokens=preset.max_tokens)
        val_split = cfg.val_split or preset.val_split
        self.val = (DataConfig(cfg.data, split=val_split, n_docs=preset.val_docs, max_tokens=preset.max_tokens)
                    if val_split else None)
        self.test = self._eval_data(preset.eval_docs)
        self.probe = self._eval_data(preset.analysis_docs)
        self.causal_data = self._eval_data(preset.causal_docs)
        from sumcircuit.evaluation.config import EvaluationConfig, GenerationConfig

        self.gen = GenerationConfig(max_new_tokens=preset.max_new_tokens, batch_size=preset.eval_batch_size)
        self.evaluation = EvaluationConfig(generation=self.gen)
        self.common = {"model": cfg.model, "device": self.runtime.device, "dtype": self.runtime.dtype}
        self.seed0 = self.seeds[0]
        self.reference = self.layout.run_name(REFERENCE_ARM, self.seed0)

    def _eval_data(self, n_docs: int) -> DataConfig:
        cfg = self.cfg
        return DataConfig(cfg.eval_data or cfg.data, split=cfg.eval_split if cfg.eval_data else "val",
                          n_docs=n_docs, max_tokens=self.preset.max_tokens)

    def _final(self, run: str) -> str:
        return str(self.layout.final(run))

    # ------------------------------------------------------------ stage builders

    def evaluation_stage(self, name: str, spec_of: Callable[[], str], needs: tuple[str, ...]) -> Stage:
        """``<name>/eval``: ROUGE of the model ``spec_of()`` names."""
        from sumcircuit.evaluation.run import evaluate

        return Stage(f"{name}/eval", "evaluate", {**self.common, "data": asdict(self.test), "gen": asdict(self.gen)},
                     needs, lambda out: evaluate(spec_of(), self.test, self.evaluation, runtime=self.runtime, out=out))

    def training_stages(self, name: str, method: str, hyper: Mapping[str, Any], seed: int,
                        extra: Mapping[str, Any] | None = None, needs: tuple[str, ...] = ()) -> list[Stage]:
        """``<name>`` (fine-tune with ``seed``) and ``<name>/eval``."""
        from sumcircuit.training.config import FinetuneConfig
        from sumcircuit.training.run import finetune

        def body(out: Path) -> None:
            ft_cfg = FinetuneConfig(method=method, seed=seed, mixed_precision=self.preset.mixed_precision,
                                    **{**dict(hyper), **dict(extra or {})})
            finetune(self.cfg.model, self.train, ft_cfg, val_data=self.val, runtime=self.runtime, out=out)

        config = {**self.common, "method": method, "hp": dict(hyper), "seed": seed, **dict(extra or {}),
                  "mixed_precision": self.preset.mixed_precision, "train": asdict(self.train),
                  "val": asdict(self.val) if self.val else None}
        return [Stage(name, "train", config, needs, body),
                self.evaluation_stage(name, functools.partial(self._final, name), (name,))]

    def core(self) -> list[Stage]:
        """Zero-shot evaluation, the reference fine-tune, the analysis and both circuits."""
        from sumcircuit.causal.attribution import attribute
        from sumcircuit.causal.config import AttributionConfig
        from sumcircuit.circuit.config import CircuitConfig
        from sumcircuit.circuit.select import select_circuit

        preset, layout, seed0 = self.preset, self.layout, self.seed0
        full = ARMS.get(REFERENCE_ARM)
        reference = functools.partial(self._final, self.reference)
        attribution_cfg = AttributionConfig(granularity="all", directions=preset.patch_directions, seed=seed0,
                                            confirm=2 * preset.top_heads)
        # the attribution stage's key keeps the fields its config had when keys were first written
        legacy = {**{k: v for k, v in asdict(attribution_cfg).items() if k != "ci_level"},
                  "ci": attribution_cfg.ci_level, "device": self.runtime.device, "dtype": self.runtime.dtype,
                  "trust_remote_code": False}
        circuit_cfg: dict[str, Any] = {"top_layers": preset.top_layers, "top_heads": preset.top_heads, "seed": seed0}
        return [
            self.evaluation_stage(layout.ZERO_SHOT, lambda: self.cfg.model, ()),
            *self.training_stages(self.reference, full.method, preset.hyper[full.hyper], seed0),
            Stage("analysis", "analyze", {**self.common, "data": asdict(self.probe)}, (self.reference,),
                  functools.partial(self._analyze_model, self.reference)),
            Stage("circuit", "select", {"score": "kl", **circuit_cfg}, ("analysis",),
                  lambda out: select_circuit(layout.analysis, CircuitConfig(score="kl", **circuit_cfg),
                                             out=layout.circuit_file)),
            Stage("attribution", "causal", {**self.common, "data": asdict(self.causal_data), "config": legacy},
                  (self.reference,),
                  lambda out: attribute(self.cfg.model, reference(), self.causal_data, attribution_cfg,
                                        runtime=self.runtime, out=out)),
            Stage("circuit_attribution", "select", circuit_cfg, ("attribution",),
                  lambda out: select_circuit(layout.attribution, CircuitConfig(score="attribution", **circuit_cfg),
                                             out=layout.attribution_circuit_file)),
        ]

    def context(self) -> tuple[StudyContext, dict[str, Any]]:
        """What the arms choose layers from (read from the finished core stages), and the manifest's record of it."""
        from sumcircuit.circuit.result import read_circuit

        layout = self.layout
        kl_layers = read_circuit(layout.circuit_file).layers
        cause_layers = read_circuit(layout.attribution_circuit_file).layers
        n_layers = int(read_json(layout.analysis / "summary.json")["n_layers"])
        excluded = sorted(set(kl_layers) | set(cause_layers))
        random_sets = random_control_sets(n_layers, len(kl_layers), self.preset.random_sets, excluded, self.seed0)
        controls = {"layers": random_sets, "excluded": excluded, "draw_seed": self.seed0,
                    "outside_circuits": all(not set(s) & set(excluded) for s in random_sets)}
        context = StudyContext(n_layers, kl_layers, cause_layers, random_sets)
        if self.preset.transfer_from:
            context.extra["transfer_layers"] = transfer_layers(self.preset.transfer_from, n_layers)
            controls["transfer_from"] = {"circuit": str(circuit_path(self.preset.transfer_from)),
                                         "layers": context.extra["transfer_layers"]}
        return context, controls

    def arms(self, context: StudyContext) -> list[Stage]:
        """Every arm's variants, trained and evaluated once per seed (whole seeds first)."""
        full_seeds = self.seeds if self.preset.full_seeds == "all" else self.seeds[:1]
        stages: list[Stage] = []
        for seed in self.seeds:
            for arm_name in self.preset.arms:
                arm = ARMS.get(arm_name)
                if (arm.seeds == "preset" and seed not in full_seeds) or (arm.seeds == "first" and seed != self.seed0):
                    continue
                for variant in arm.expand(context):
                    name = self.layout.run_name(variant.name, seed)
                    if name == self.reference:
                        continue  # trained among the core stages
                    stages += self.training_stages(name, arm.method, self.preset.hyper[arm.hyper], seed,
                                                   variant.extra or None, arm.needs)
        return stages

    def tail(self) -> list[Stage]:
        """Ablation of the KL circuit against random sets, activation patching, and the faithfulness curves of
        both circuits against random layer sets, all of the reference."""
        from sumcircuit.causal.ablation import ablate
        from sumcircuit.causal.config import AblationConfig, FaithfulnessConfig, PatchConfig
        from sumcircuit.causal.faithfulness import faithfulness
        from sumcircuit.causal.patching import patch

        preset, layout, seed0 = self.preset, self.layout, self.seed0
        reference = functools.partial(self._final, self.reference)
        stages = [
            Stage("ablate", "causal", {**self.common, "data": asdict(self.causal_data),
                                       "controls": preset.random_controls}, (self.reference, "circuit"),
                  lambda out: ablate(reference(), self.causal_data,
                                     AblationConfig(circuit=str(layout.circuit_file),
                                                    random_controls=preset.random_controls, seed=seed0),
                                     runtime=self.runtime, out=out, resume=False)),
            Stage("patch", "causal", {**self.common, "data": asdict(self.causal_data),
                                      "directions": preset.patch_directions}, (self.reference,),
                  lambda out: patch(self.cfg.model, reference(), self.causal_data,
                                    PatchConfig(seed=seed0, directions=preset.patch_directions),
                                    runtime=self.runtime, out=out, resume=False)),
            Stage("faithfulness", "causal", {**self.common, "data": asdict(self.causal_data),
                                             "random_circuits": FAITHFULNESS_RANDOM},
                  (self.reference, "circuit", "circuit_attribution"),
                  lambda out: faithfulness(self.cfg.model, reference(), self.causal_data, FaithfulnessConfig(
                      circuits=(str(layout.circuit_file), str(layout.attribution_circuit_file)),
                      random_circuits=FAITHFULNESS_RANDOM, seed=seed0), runtime=self.runtime, out=out, resume=False)),
        ]
        return [*self.arm_analyses(), *(s for s in stages if s.name in preset.causal_stages)]

    def arm_analyses(self) -> list[Stage]:
        """``analysis_<arm>``: each analysed arm's first-seed model against the base, on the reference's documents."""
        stages = []
        for arm in (ARMS.get(a) for a in self.preset.arms):
            if not arm.analyze:
                continue
            for variant in arm.expand(StudyContext(0, [], [])):
                run = self.layout.run_name(variant.name, self.seed0)
                stages.append(Stage(self.layout.analysis_of(variant.name).name, "analyze",
                                    {**self.common, "data": asdict(self.probe)}, (run,),
                                    functools.partial(self._analyze_model, run)))
        return stages

    def _analyze_model(self, run: str, out: Path) -> None:
        from sumcircuit.analysis.config import AnalysisConfig
        from sumcircuit.analysis.run import analyze_to_folder

        analyze_to_folder(self.cfg.model, self._final(run), self.probe, AnalysisConfig(seed=self.seed0), out,
                          self.runtime)


def circuit_path(source: str | Path) -> Path:
    """A study folder's KL circuit, or the circuit.json given."""
    path = Path(source)
    return StudyLayout(path).circuit_file if path.is_dir() else path


def transfer_layers(source: str | Path, n_layers: int) -> list[int]:
    """The layers of another study's circuit, for the ``transfer`` arm; a circuit of another depth is refused."""
    from sumcircuit.circuit.result import read_circuit

    path = circuit_path(source)
    if not path.is_file():
        raise ConfigError("transfer_from", f"{source}: no circuit there (a study folder whose circuit stage "
                                           "finished, or a circuit.json)")
    circuit = read_circuit(path)
    depth = circuit.summary.get("n_layers")
    if depth is not None and depth != n_layers:
        raise ConfigError("transfer_from", f"{path}: a circuit of a {depth}-layer model; this study's "
                                           f"model has {n_layers} layers (transfer needs the same model)")
    return list(circuit.layers)


@writes_output("reproduce", "out")
def _run_study_into(cfg: StudyConfig, out: str | Path, runtime: Runtime, resume: bool,
                    executor: ExecutorConfig) -> StudyResult:
    from sumcircuit.study.claims import claim_rows
    from sumcircuit.study.report import build_report

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    preset, seeds = cfg.resolved_preset(), cfg.resolved_seeds()
    for arm in preset.arms:
        if arm not in ARMS:
            raise ConfigError("arms", f"unknown arm {arm!r}; registered: {', '.join(ARMS.names())}")
        if ARMS.get(arm).hyper not in preset.hyper:
            raise ConfigError("arms", f"arm {arm} uses hyper-parameter group {ARMS.get(arm).hyper!r}, which the "
                                      f"preset does not have ({', '.join(preset.hyper)})")
    runtime.require_whole_models("a study (it fine-tunes and generates)")
    check_disjoint_test_data(cfg)
    check_fits_model(cfg, preset, runtime)
    graph = StudyGraph(cfg, preset, seeds, runtime, StudyLayout(run))
    with executor_for(executor, runtime.device) as run_stages:
        runner = StageRunner(run, run_stages)
        if not resume:
            runner.retire_all_but([], "restarting the study (resume=False)")
        core = graph.core()
        runner.run_all(core)
        context, controls = graph.context()
        rest = [*graph.arms(context), *graph.tail()]
        runner.retire_all_but([*core, *rest])
        runner.run_all(rest)
    manifest = {"study": {**asdict(cfg), "device": runtime.device, "dtype": runtime.dtype, "seeds": list(seeds)},
                "preset": asdict(preset), "stages": runner.keys, "wall_time_s": runner.timings,
                "skipped": runner.skipped, "random_controls": controls, "executor": asdict(executor),
                "provenance": provenance(seed=seeds[0])}
    atomic_write_json(graph.layout.manifest, manifest)
    report = build_report(run)
    print(f"[reproduce] report: {report}", flush=True)
    return StudyResult(manifest, run, claim_rows(run))


def run_study(cfg: StudyConfig | Mapping[str, Any], out: str | Path, *, runtime: Runtime | None = None,
              resume: bool = True, executor: ExecutorConfig | Mapping[str, Any] | None = None) -> StudyResult:
    """Run (or resume) every stage of the study and write the report.

    Every arm of the preset is trained once per training seed; the analysis,
    both circuits and the causal tests use the first seed's full fine-tune.

    Args:
        cfg: model, data, preset, seeds and preset overrides.
        out: the run folder (one folder per stage, ``reproduce.json``, ``report.html``).
        runtime: device and dtype of every stage.
        resume: skip stages whose key matches and resume interrupted ones; False moves every
            finished stage to ``.stale/`` and runs them all again.
        executor: how the stages run: one after another here (default), or as Ray tasks side by
            side (``{"executor": "ray", "workers": 8}``); the results are the same.

    Returns:
        The manifest, the claims table and each stage's result on demand.

    Example:
        >>> import sumcircuit as sc
        >>> cfg = sc.StudyConfig(model="smollm2-135m-instruct", data="../shared/data/cnndm_gpt4", preset="quick")
        >>> sc.run_study(cfg, "runs/demo").to_pandas()  # doctest: +SKIP
    """
    return _run_study_into(coerce_config(StudyConfig, cfg, "cfg"), out, coerce_runtime(runtime), resume,
                           coerce_config(ExecutorConfig, executor, "executor"))
