"""One self-contained HTML page for a study folder, or for any single output folder.

Figures are inline PNGs (no network needed to view the file; drawn by
:mod:`sumcircuit.plots`) and every string that came from a data set or a file
is HTML-escaped. Sections whose stage did not run say so instead of failing,
so a partial run still gets a report.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sumcircuit.artifacts import atomic_write_text, read_jsonl
from sumcircuit.errors import SumcircuitError
from sumcircuit.outputs import claim_file, incomplete_reason, is_complete, require_complete
from sumcircuit.study import claims
from sumcircuit.study.evidence import finished, read_csv_if_finished, read_json_if_finished
from sumcircuit.study.figures import head_heatmaps, img, layer_bars, neuron_histogram, tracking_plot, training_curves
from sumcircuit.study.layout import StudyLayout

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_finished, _read_json, _read_csv = finished, read_json_if_finished, read_csv_if_finished


# ---------------------------------------------------------------- tables

def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table of escaped, formatted cells (numbers to 4 digits)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _layers_text(layers: Any) -> Any:
    """``all 30`` for every layer of a model, the list itself otherwise."""
    if isinstance(layers, list) and len(layers) > 4 and layers == list(range(len(layers))):
        return f"all {len(layers)}"
    return layers


def _rouge_cell(score: Mapping[str, Any]) -> str:
    return f"{score.get('f1', math.nan):.4f} [{score.get('ci_low', math.nan):.4f}, {score.get('ci_high', math.nan):.4f}]"


def first_predictions(eval_dir: Path, n: int) -> list[list[Any]]:
    """``[document, summary, first reference, stop reason]`` of the first ``n`` evaluation documents."""
    path = eval_dir / "predictions.jsonl"
    if not _finished(path):
        return []
    return [[r.get("index"), r.get("prediction"), (r.get("references") or [""])[0], r.get("stop_reason")]
            for r in sorted(read_jsonl(path), key=lambda r: int(r["index"]))[:n]]


def rouge_rows(run: Path, names: Sequence[str]) -> list[list[Any]]:
    """One row per evaluated model: ROUGE with intervals, layers, parameters, epochs, time."""
    layout = StudyLayout(run)
    rows = []
    for name in names:
        rouge = _read_json(layout.eval_dir(name) / "rouge.json")
        summary = _read_json(layout.train_summary(name)) or {}
        if rouge is None:
            continue
        cells: list[Any] = [name, *(_rouge_cell(rouge.get(key) or {}) for key in ROUGE_KEYS)]
        cut = ((rouge.get("generation") or {}).get("stop_reasons") or {}).get("length")
        cells += [_layers_text(summary.get("layers")), summary.get("trainable_params"), summary.get("epochs_to_best"),
                  summary.get("wall_time_s"), rouge.get("n"), f"{cut} of {rouge.get('n')}" if cut is not None else None]
        rows.append(cells)
    return rows


# ---------------------------------------------------------------- page

PAGE_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}img{max-width:100%}.supported{color:#176d2b;font-weight:bold}
.contradicted{color:#a11;font-weight:bold}.inconclusive{color:#a60;font-weight:bold}.missing{color:#888}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
.banner{background:#fff3cd;border:1px solid #e0c36c;padding:10px 14px;margin:1em 0}"""


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)} did not run in this study.</p>'


def _embed_png(path: Path, alt: str, caption: str = "") -> str:
    return img(base64.b64encode(path.read_bytes()).decode("ascii"), alt, caption) if path.is_file() else ""


def study_header(manifest: Mapping[str, Any]) -> str:
    """What this folder is, before any number: model, data, sizes, seeds, preset and what the preset means."""
    study, preset = manifest.get("study") or {}, manifest.get("preset") or {}
    if not study:
        return _section("This run", '<p class="missing">No reproduce.json: the study has not finished (or this '
                                    "folder holds stages copied by hand); the sections below show the stages found."
                                    "</p>")
    seeds = study.get("seeds") or []
    controls = manifest.get("random_controls") or {}
    n_sets = len(controls.get("layers") or [])
    full_every_seed = preset.get("full_seeds", "all") == "all"
    rows = [("model", study.get("model")), ("data", f"{study.get('data')} (split {study.get('split')})"),
            ("evaluation data", study.get("eval_data") or f"{study.get('data')} (split val)"),
            ("preset", f"{preset.get('name')}: {preset.get('description')}"),
            ("training seeds", f"{', '.join(map(str, seeds))}: {_arms_text(preset, n_sets, full_every_seed)} trained "
                               "once per seed" + _first_seed_text(preset, seeds[0] if seeds else "-", full_every_seed)),
            ("documents per stage", f"training {preset.get('train_docs') or 'all'} (validation: "
                                    f"{preset.get('val_docs')} held out), ROUGE evaluation {preset.get('eval_docs')} "
                                    f"x {len(seeds)} seeds per method, analysis {preset.get('analysis_docs')}, "
                                    f"attribution / ablation / patching {preset.get('causal_docs')} (first seed's "
                                    f"full fine-tune); {preset.get('max_tokens')} tokens each, generated summaries up to "
                                    f"{preset.get('max_new_tokens')} tokens"),
            ("random layer sets", f"{n_sets}: {controls.get('layers')}, drawn outside the circuits' layers "
                                  f"{controls.get('excluded')}" if controls else "-"),
            ("wall time", f"{sum((manifest.get('wall_time_s') or {}).values()):.0f} s over "
                          f"{len(manifest.get('stages') or {})} stages")]
    kind = "a smoke test, not a replication" if preset.get("name") == "quick" else \
        ("a replication at the paper's scale" if preset.get("name") == "paper" else "a small study, not a replication")
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return _section(f"This run ({kind})", f"<table>{body}</table>")


def _first_seed_text(preset: Mapping[str, Any], seed: Any, full_every_seed: bool) -> str:
    """The arms trained on the first seed only: ``; the full fine-tune and the control task on seed 1 only``."""
    from sumcircuit.study.arms import ARMS

    arms = list(preset.get("arms") or ARMS.names())
    first = ([] if full_every_seed or "full" not in arms else ["the full fine-tune"]) + \
        [ARMS.get(a).label for a in arms if a in ARMS and ARMS.get(a).seeds == "first"]
    return f"; {' and '.join(first)} on seed {seed} only" if first else ""


def _arms_text(preset: Mapping[str, Any], n_sets: int, full_every_seed: bool) -> str:
    """The preset's arms in words: ``full, LoRA-all, both targeted runs and each of the 5 random layer sets``."""
    from sumcircuit.study.arms import ARMS

    arms = list(preset.get("arms") or ARMS.names())
    parts = ["full"] if "full" in arms and full_every_seed else []
    parts += ["LoRA-all"] if "lora_all" in arms else []
    targeted = [a for a in ("targeted", "targeted_attribution") if a in arms]
    parts += ["both targeted runs"] if len(targeted) == 2 else (["the targeted run"] if targeted else [])
    builtin = {"full", "lora_all", "targeted", "targeted_attribution", "random"}
    parts += [ARMS.get(a).label if a in ARMS else a for a in arms
              if a not in builtin and not (a in ARMS and ARMS.get(a).seeds == "first")]
    parts += [f"each of the {n_sets} random layer sets"] if "random" in arms else []
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "no arm")


def truncation_note(run: Path, names: Sequence[str]) -> str:
    """A warning when most generated summaries ran into max_new_tokens: ROUGE then scores their beginnings."""
    layout = StudyLayout(run)
    cut = total = 0
    limit = None
    for name in names:
        generation = (_read_json(layout.eval_dir(name) / "rouge.json") or {}).get("generation") or {}
        reasons = generation.get("stop_reasons") or {}
        cut += int(reasons.get("length", 0))
        total += sum(int(v) for v in reasons.values())
        limit = generation.get("max_new_tokens", limit)
    if not total or cut <= total / 2:
        return ""
    return (f'<p class="inconclusive">{cut} of {total} generated summaries stopped at max_new_tokens = {limit}, not at '
            "their end of sequence: these ROUGE scores compare the first tokens of each summary with the whole "
            "reference, and differences between methods partly reflect whether a model learned to stop.</p>")


def stopping_rows(run: Path, names: Sequence[str]) -> list[list[Any]]:
    """Where each fine-tuning run stopped, and whether it converged or hit its step cap."""
    layout = StudyLayout(run)
    rows = []
    for name in names:
        summary = _read_json(layout.train_summary(name))
        if not summary:
            continue
        best, steps = summary.get("best_step"), summary.get("steps")
        if summary.get("stopped_early"):
            how = f"stopped on its own ({claims.stopping_rule(summary)})"
        elif not best:
            how = "never improved on its start"
        elif best == steps:
            how = "hit the step cap while still improving"
        else:
            how = "hit the step cap after its best checkpoint"
        rows.append([name, steps, best, summary.get("epochs_to_best"), summary.get("best_val_loss"), how])
    return rows


def example_rows(run: Path, names: Sequence[str], n: int = 3) -> list[list[Any]]:
    """The first ``n`` evaluation documents' summaries per model, beside their reference (escaped on output)."""
    layout = StudyLayout(run)
    return [[name, *row] for name in names for row in first_predictions(layout.eval_dir(name), n)]


def claims_table(results: Sequence[claims.ClaimResult]) -> str:
    """The claims as an HTML table, verdicts coloured; verdicts held back by seeds or documents listed above it."""
    rows = "".join(
        f"<tr><td>{html.escape(r.claim)}</td><td>{html.escape(r.paper)}</td><td>{html.escape(r.this_run)}</td>"
        f'<td class="{r.verdict.replace(" ", "-")}">{html.escape(r.verdict)}'
        + (f" ({html.escape(r.limited_by)})" if r.limited_by else "") + "</td>"
        f"<td>{html.escape(r.evidence)}</td></tr>" for r in results)
    limited = [r for r in results if r.limited_by]
    note = ("<p class='banner'><b>Verdicts limited by the sample:</b> " + "; ".join(
        f"{html.escape(r.claim)}: {html.escape(r.limited_by)}" for r in limited)
        + f". Seed-level verdicts need at least {claims.MIN_SEEDS} training seeds.</p>") if limited else ""
    return (note + "<table><thead><tr><th>paper claim</th><th>paper</th><th>this run</th><th>verdict</th>"
            f"<th>evidence</th></tr></thead><tbody>{rows}</tbody></table>")


def _models_label(summary: Mapping[str, Any]) -> str:
    """'A vs B' from an output's provenance, so that a page never guesses what it compares."""
    models = (summary.get("provenance") or {}).get("models") or []
    specs = [str(m.get("spec")) for m in models if isinstance(m, Mapping)]
    return " vs ".join(specs) if specs else "models not recorded"


def analysis_section(folder: Path, title: str) -> str:
    """The analysis's figures and headline numbers, labelled with the models it compares."""
    heads = _read_csv(folder / "heads.csv", ("layer", "head", "entropy_delta", "kl_base_tuned"))
    layers = _read_csv(folder / "layers.csv", ("layer",))
    summary = _read_json(folder / "summary.json") or {}
    body = ""
    if heads:
        body += head_heatmaps(heads)
    if layers:
        body += layer_bars(layers)
    if (folder / "stats.safetensors").is_file():
        threshold = (summary.get("definitions") or {}).get("neuron_threshold")
        body += neuron_histogram(folder / "stats.safetensors", threshold)
        ci = summary.get("share_heads_entropy_decreased_ci") or [None, None]
        body += (f"<p>Neurons with |standardized change| &gt; {html.escape(str(threshold))}: "
                 f"{_fmt(summary.get('neuron_frac_changed'))} of all; sign flips: "
                 f"{_fmt(summary.get('neuron_sign_flips'))}. Heads with lower entropy after fine-tuning: "
                 f"{_fmt(summary.get('share_heads_entropy_decreased'))} (95% bounds {_fmt(ci[0])} to {_fmt(ci[1])} "
                 f"from a simultaneous band over heads: {_fmt(summary.get('heads_entropy_surely_lower'))} heads "
                 f"surely lower, {_fmt(summary.get('heads_entropy_surely_not_lower'))} surely not); "
                 f"{_fmt(summary.get('n_docs'))} documents, {_fmt(summary.get('n_tokens'))} tokens.</p>")
    return _section(f"{title}: {_models_label(summary)}", body or _missing("Analysis"))


def _single_output(folder: Path, kind: str) -> list[str]:
    """Sections for one command's output folder (not a study): labelled from its own provenance."""
    if kind == "analysis":
        return [analysis_section(folder, "Differential analysis")]
    if kind == "evaluation":
        rouge = _read_json(folder / "rouge.json") or {}
        rows = [[key, _rouge_cell(rouge.get(key) or {})] for key in ROUGE_KEYS]
        examples = first_predictions(folder, 5)
        return [_section(f"ROUGE of {_models_label(rouge)} (F1, 95% CI, n = {rouge.get('n')})",
                         html_table(["metric", "F1 [95% CI]"], rows)),
                _section("Example summaries", html_table(["document", "summary", "reference", "stopped by"], examples))]
    if kind in ("patching", "ablation", "attribution", "faithfulness"):
        summary = _read_json(folder / f"{kind}.json") or {}
        per_head = summary.get("granularity") == "head"
        captions = {"patching": "Recovery of the tuned model's loss when each component is patched (1 = fully "
                                + ("recovered), per attention head of the patched layers (one heatmap row per "
                                   "layer); the 95% CIs over documents of every head are in patching.csv."
                                   if per_head else "recovered), per layer, with 95% CIs over documents."),
                    "ablation": "Loss change when the circuit is ablated, against random component sets of the same "
                                "size.",
                    "attribution": "Attribution-patching estimate of each component's effect on the loss gap between "
                                   "the two models (first-order, one backward pass per direction).",
                    "faithfulness": "Effect of patching each circuit's first k layers together (its ranking order), "
                                    "with 95% bands over documents; grey: random layer sets of the same size."}
        return [_section(f"{kind.capitalize()}: {_models_label(summary)}",
                         _embed_png(folder / f"{kind}.png", kind, captions[kind]) or _missing(kind.capitalize()))]
    if kind == "finetune":
        log = read_jsonl(folder / "train_log.jsonl")
        return [_section("Fine-tuning", training_curves({folder.name: log}) if log else _missing("Fine-tuning"))]
    return [_section(kind.capitalize(), "<pre>" + html.escape(json.dumps(
        _read_json(folder / f"{kind}.json") or {}, indent=2, default=str)) + "</pre>")]


def _study_sections(run: Path, manifest: Mapping[str, Any]) -> list[str]:
    layout = StudyLayout(run)
    seeds = (manifest.get("study") or {}).get("seeds") or []
    parts = [study_header(manifest), _section("Paper claims vs this run", claims_table(claims.evaluate_claims(run)))]
    names = layout.model_runs()
    rouge = rouge_rows(run, names)
    parts.append(_section("ROUGE (F1, bootstrap 95% CI over documents, per model and training seed)", html_table(
        ["model", *ROUGE_KEYS, "layers", "trainable params", "epochs to best", "wall time (s)", "n",
         "cut at max_new_tokens"], rouge) + truncation_note(run, names) if rouge else _missing("Evaluation")))
    stops = stopping_rows(run, names)
    parts.append(_section("Where each fine-tuning run stopped", html_table(
        ["run", "steps", "best step", "epochs to best", "best validation loss", "outcome"], stops)
        if stops else _missing("Fine-tuning")))
    first = [n for n in names if n == layout.ZERO_SHOT or n.endswith(f"_s{seeds[0]}")] if seeds else names
    examples = example_rows(run, first)
    parts.append(_section("Example summaries (first training seed, first evaluation documents)", html_table(
        ["model", "document", "summary", "reference", "stopped by"], examples) if examples else _missing("Evaluation")))
    parts.append(analysis_section(layout.analysis, "Differential analysis"))

    logs = {n: read_jsonl(layout.stage(n) / "train_log.jsonl") for n in first}
    logs = {n: log for n, log in logs.items() if log}
    full_runs = list(layout.runs_of("full").values())
    tracking = _read_csv(layout.stage(full_runs[0]) / "tracking.csv") if full_runs else []
    body = (training_curves(logs) if logs else "") + (tracking_plot(tracking) if tracking else "")
    parts.append(_section("Training", body or _missing("Fine-tuning")))

    circuit = _read_json(layout.circuit_file)
    body = ""
    if circuit:
        body += (f"<p>Circuit ({html.escape(str(circuit.get('score')))} score): layers "
                 f"{html.escape(str(circuit.get('layers')))}; bootstrap stability "
                 f"{html.escape(json.dumps(circuit.get('stability')))}</p>")
    else:
        body += _missing("Circuit selection")
    by_cause = _read_json(layout.attribution_circuit_file)
    if by_cause:
        body += (f"<p>Circuit by cause (attribution patching, {html.escape(str(by_cause.get('direction')))}): "
                 f"layers {html.escape(str(by_cause.get('layers')))}, heads "
                 f"{html.escape(', '.join(map(str, by_cause.get('heads') or [])) or '-')}; KL circuit heads "
                 f"{html.escape(', '.join(map(str, (circuit or {}).get('heads') or [])) or '-')}</p>")
    body += _embed_png(layout.attribution / "attribution.png", "attribution per layer and head",
                       "Attribution patching (base vs the first seed's full fine-tune): estimated effect of each "
                       "layer's attention and MLP output and of each head on the loss gap.")
    body += _embed_png(layout.patch / "patching.png", "patching recovery per layer",
                       "Exact activation patching per layer: share of the loss gap recovered, 95% CIs over documents."
                       ) or _missing("Activation patching")
    body += _embed_png(layout.ablate / "ablation.png", "ablation effect vs random controls",
                       "Loss change when the KL circuit is ablated (red) against random layer sets of the same size."
                       ) or _missing("Ablation with random controls")
    faith = _read_json(layout.faithfulness / "faithfulness.json") or {}
    areas = "; ".join(f"{name}: area {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
                      for name, a in (faith.get("auc") or {}).items() if name in (faith.get("circuits") or {}))
    body += _embed_png(layout.faithfulness / "faithfulness.png", "faithfulness curves",
                       "Faithfulness (the MIB style of judging a circuit by a curve): share of the loss gap recovered "
                       "when each circuit's first k layers (its own ranking order) are patched together from the "
                       f"fine-tuned model, 95% bands over documents; grey: random layer sets of the same size. {areas}"
                       ) or _missing("Faithfulness curves")
    parts.append(_section("Circuit and causal tests", body))
    summary = _read_json(layout.analysis / "summary.json") or {}
    parts.append(_section("Provenance", "<pre>" + html.escape(json.dumps(
        {"reproduce": manifest, "analysis": summary.get("provenance")}, indent=2, default=str)) + "</pre>"))
    return parts


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a ``reproduce`` run or any single output folder, and return its path.

    An unfinished study is rendered with a banner and its finished stages; a damaged file is a one-line error.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise SumcircuitError(f"run directory not found: {run}")
    layout = StudyLayout(run)
    study = (layout.manifest.is_file() or layout.analysis.is_dir() or bool(layout.model_runs()))
    if not study:
        require_complete(run)  # a single output has nothing finished to show until it finished
    parts = [f"<h1>sumcircuit report: {html.escape(run.name)}</h1>",
             "<p>Paper under test: <i>Mechanistic Interpretability of GPT-like Models on Summarization "
             "Tasks</i> (arXiv 2505.17073). Every figure below was computed from this folder; intervals are 95%.</p>"]
    try:
        parts += _study_page(run, layout) if study else _single_page(run)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:  # a file edited or damaged
        raise SumcircuitError(f"{run}: cannot build the report, a file there is damaged or from another version "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:150]})") from None
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>sumcircuit report</title>"
            f"<style>{PAGE_CSS}</style></head><body>{''.join(parts)}</body></html>")
    target = Path(out) if out else layout.report
    with claim_file(target, "--out", names=("report.html",)):  # marks report.html as sumcircuit's, never replaces someone's file
        atomic_write_text(target, page)
    return target


def _study_page(run: Path, layout: StudyLayout) -> list[str]:
    """A study's sections; an unfinished study gets a banner and shows only the stages that finished."""
    manifest = _read_json(layout.manifest)
    check_manifest(manifest or {}, layout.manifest)
    reason = incomplete_reason(run)
    banner = [] if reason is None or is_complete(run) else [
        f"<div class='banner'><b>This study has not finished.</b> {html.escape(reason)}. Only the stages that "
        "finished are shown below; claims whose evidence is missing say so.</div>"]
    return banner + _study_sections(run, manifest or {})


def check_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    """reproduce.json's fields have the types the report reads (a hand edit is named, not a traceback)."""
    for key, kind in (("study", dict), ("preset", dict), ("stages", dict), ("wall_time_s", dict),
                      ("skipped", list), ("random_controls", dict)):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], kind):
            raise SumcircuitError(f"{path}: field '{key}' should be {'an object' if kind is dict else 'a list'}, "
                                  f"found {type(manifest[key]).__name__}; rerun `sumcircuit reproduce`")


def _single_page(run: Path) -> list[str]:
    """One command's output folder: its own results, no claims."""
    from sumcircuit.results import RunError, detect_kind

    try:
        kind = detect_kind(run)
    except RunError:
        raise SumcircuitError(f"{run}: neither a reproduce study nor a finished sumcircuit output folder") from None
    return [f"<p>A single <code>{html.escape(kind)}</code> output, not a study: only its own results are shown "
            "and no paper claim is judged.</p>", *_single_output(run, kind)]
