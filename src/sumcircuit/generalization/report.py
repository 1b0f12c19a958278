"""``compare.html``: overlap heatmaps with their nulls, depth profiles, the control task and transfer, captioned.

Each figure says its n, what its interval is and what it does not show;
the page is self-contained (inline PNGs) and every string from a file is
HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sumcircuit import plots
from sumcircuit.artifacts import atomic_write_text
from sumcircuit.study.claims import ClaimResult
from sumcircuit.study.figures import img
from sumcircuit.study.report import PAGE_CSS, claims_table, html_table

if TYPE_CHECKING:
    from sumcircuit.generalization.result import CompareResult


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _num(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _rows(rows: list[dict[str, Any]], columns: list[str]) -> list[list[Any]]:
    return [[_num(r.get(c)) for c in columns] for r in rows]


def page_parts(result: CompareResult) -> list[str]:
    """The page's sections, in order."""
    s, rows = result.summary, result.rows
    runs = rows["runs"]
    n_docs = ", ".join(f"{r['run']}: {r['n_docs']}" for r in runs)
    parts = [f"<h1>sumcircuit compare: {html.escape(', '.join(s['runs']))}</h1>",
             _section("Runs", html_table(
                 ["run", "model", "data", "layers", "docs", "heads more focused [95%]", "KL circuit (depth)",
                  "cause circuit (depth)", "control", "transfer from"],
                 [[r["run"], r["model"], r["data"], r["n_layers"], r["n_docs"],
                   f"{float(r['share_heads_entropy_decreased']):.1%} [{float(r['share_ci_low']):.1%}, "
                   f"{float(r['share_ci_high']):.1%}]", f"{r['kl_layers']} ({r['kl_layers_depth']})",
                   f"{r['cause_layers']} ({r['cause_layers_depth']})", r["control"], r["transfer_from"] or "-"]
                  for r in runs]))]
    caption = (f"Jaccard of the circuits' picks between runs (n documents per run: {n_docs}); each cell also "
               f"gives the 95th percentile of {s['config']['n_permutations']} random circuits of the same sizes. "
               "A cell above its null95 is overlap beyond chance. Not shown: how much the overlap depends on "
               "the training seed (one fine-tune per study is analysed).")
    parts.append(_section("Circuit overlap", img(plots.figure_base64(result.plot()), "overlap heatmaps", caption)
                          + html_table(["A", "B", "circuit", "level", "basis", "Jaccard [95% docs]", "null mean",
                                        "p", "Spearman [95% docs]", "p (Spearman)", "note"],
                                       [[r["run_a"], r["run_b"], r["circuit"], r["level"], r["basis"],
                                         f"{float(r['jaccard']):.2f} [{float(r['jaccard_ci_low']):.2f}, "
                                         f"{float(r['jaccard_ci_high']):.2f}]", _num(r["null_mean"]),
                                         _num(r["p_value"]),
                                         f"{float(r['spearman']):.2f} [{float(r['spearman_ci_low']):.2f}, "
                                         f"{float(r['spearman_ci_high']):.2f}]", _num(r["spearman_p"]), r["note"]]
                                        for r in rows["overlap"]])
                          + _p(s["definitions"]["null"] + ". " + s["definitions"]["interval"] + ".")))
    parts.append(_section("Profiles at relative depth", img(
        plots.figure_base64(result.profile_plot()), "depth profiles",
        "Per-layer KL(base || tuned) (mean over heads), mean entropy change, and, for runs with the control task, "
        "the KL specific to summarization with its 95% band over documents; x: layer / (layers - 1). Not shown: "
        "per-head detail (see each study's report).")))
    if rows["control"] or rows["claims"]:
        claims = [ClaimResult(**{k: str(v) for k, v in c.items()}) for c in rows["claims"]]
        parts.append(_section("Control task: what is specific to summarization", claims_table(claims) + _p(
            s["definitions"]["control"] + ". The control task is a full fine-tune with the same documents, steps "
            "and budget on plain language modelling of the documents (no summaries). Per layer: control.csv and the "
            "right panel above; per head: control_heads.csv.")))
    else:
        parts.append(_section("Control task", _p("No run has a control task (preset arm `control`).")))
    if rows["transfer"]:
        cols = ["run", "source", "source_layers", "own_layers", "comparison", "mean_a", "mean_b", "difference",
                "ci_low", "ci_high", "n_seeds", "n_docs", "verdict", "limited_by"]
        parts.append(_section("Transfer: another domain's circuit, trained and evaluated here", html_table(
            cols, _rows(rows["transfer"], cols)) + _p(s["definitions"]["transfer"] + ". ROUGE-1 F1; mean_a is "
                                                      "the transferred circuit's.")))
    else:
        parts.append(_section("Transfer", _p("No run has a transfer arm (preset field `transfer_from`).")))
    return parts


def write_page(result: CompareResult, path: Path) -> Path:
    """Write ``compare.html``."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>sumcircuit compare</title>"
            f"<style>{PAGE_CSS}</style></head><body>{''.join(page_parts(result))}</body></html>")
    atomic_write_text(path, page)
    return path
