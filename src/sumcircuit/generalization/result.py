"""What ``compare`` returns: :class:`CompareResult` (runs, overlaps, depth profiles, control, transfer, claims)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from sumcircuit.artifacts import atomic_write_csv, atomic_write_json, read_csv, read_json
from sumcircuit.generalization.stats import OverlapRow
from sumcircuit.outputs import require_complete, writes_output
from sumcircuit.results import Result, typed_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

class RunRow(TypedDict):
    """One study of ``runs.csv``: model, data, the entropy-shift share and both circuits at relative depth."""

    run: str
    folder: str
    model: str
    model_type: str
    base_weights: str
    data: str
    eval_data: str
    n_layers: int
    n_heads: int
    n_docs: int | None
    share_heads_entropy_decreased: float | None
    share_ci_low: float | None
    share_ci_high: float | None
    mean_kl_base_tuned: float | None
    kl_layers: str
    kl_layers_depth: str
    cause_layers: str
    cause_layers_depth: str
    control: bool
    transfer_from: str


class ProfileRow(TypedDict):
    """One layer of one run at relative depth (``profiles.csv``)."""

    run: str
    layer: int
    relative_depth: float
    kl: float
    attribution: float
    entropy_delta: float


class _SpecificChange(TypedDict):
    """The change specific to summarization at one component, with its intervals."""

    kl_specific: float
    kl_specific_ci_low: float
    kl_specific_ci_high: float
    entropy_specific: float
    entropy_specific_ci_low: float
    entropy_specific_ci_high: float


class ControlRow(_SpecificChange):
    """One layer's change specific to summarization (``control.csv``)."""

    run: str
    layer: int
    relative_depth: float
    kl_summary: float
    kl_control: float


class ControlHeadRow(_SpecificChange):
    """One head's change specific to summarization (``control_heads.csv``)."""

    run: str
    layer: int
    head: int
    component: str


class TransferRow(TypedDict):
    """One comparison of the transferred circuit on a run's data (``transfer.csv``)."""

    run: str
    source: str
    source_layers: str
    own_layers: str
    comparison: str
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    n_seeds: int
    n_docs: int
    verdict: str
    limited_by: str


class ClaimRow(TypedDict):
    """One verdict (``claims.csv``)."""

    claim: str
    paper: str
    this_run: str
    verdict: str
    evidence: str
    limited_by: str


ROW_TYPES: dict[str, type[Any]] = {"runs": RunRow, "overlap": OverlapRow, "profiles": ProfileRow, "control": ControlRow,
                              "control_heads": ControlHeadRow, "transfer": TransferRow, "claims": ClaimRow}
TABLES = tuple(ROW_TYPES)


def columns(table: str) -> tuple[str, ...]:
    """A table's CSV columns: what identifies the row first, then the shared interval fields."""
    names = tuple(ROW_TYPES[table].__annotations__)
    shared = tuple(_SpecificChange.__annotations__)
    return tuple(n for n in names if n not in shared) + tuple(n for n in names if n in shared)


@dataclass(repr=False)
class CompareResult(Result):
    """Circuits of several studies side by side: overlaps against nulls, depth profiles, control task, transfer.

    Example:
        >>> cmp = sc.compare(["runs/cnndm", "runs/dialogsum"])  # doctest: +SKIP
        >>> cmp.to_pandas("overlap")[["run_a", "run_b", "circuit", "level", "jaccard", "p_value"]]  # doctest: +SKIP
    """

    kind: ClassVar[str] = "compare"
    main_table: ClassVar[str] = "overlap"
    files: ClassVar[tuple[str, ...]] = ("compare.json", *(f"{t}.csv" for t in TABLES), "compare.html",
                                        "overlap.png", "profiles.png")
    summary: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]]

    def describe(self) -> str:
        runs = [r["run"] for r in self.rows.get("runs", [])]
        kl = [r for r in self.rows.get("overlap", []) if r["circuit"] == "kl" and r["level"] == "layers"]
        pairs = "; ".join(f"{r['run_a']}~{r['run_b']} J={float(r['jaccard']):.2f} (p={float(r['p_value']):.3f})"
                          for r in kl[:3])
        return f"{len(runs)} runs ({', '.join(runs)}); KL circuit layers: {pairs or '-'}"

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {t: list(self.rows.get(t, [])) for t in TABLES}

    def plot(self) -> Figure:
        """The overlap matrices (Jaccard, with the null's 95th percentile in each cell's label)."""
        from sumcircuit import plots

        return plots.overlap_figure(self.summary["matrices"], [r["run"] for r in self.rows["runs"]])

    def profile_plot(self) -> Figure:
        """Per-layer KL and attribution profiles of every run at relative depth."""
        from sumcircuit import plots

        return plots.depth_profiles_figure(self.rows["profiles"], self.rows.get("control", []))

    @writes_output("save")
    def save(self, out: str | Path) -> Path:
        """``compare.json``, one CSV per table, ``overlap.png``, ``profiles.png`` and ``compare.html``."""
        from sumcircuit.generalization.report import write_page
        from sumcircuit.plots import save_figure

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            atomic_write_csv(folder / f"{name}.csv", self.rows.get(name, []), columns(name))
        save_figure(self.plot(), folder / "overlap.png")
        save_figure(self.profile_plot(), folder / "profiles.png")
        write_page(self, folder / "compare.html")
        atomic_write_json(folder / "compare.json", self.summary)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> CompareResult:
        """A compare folder back as a result."""
        p = require_complete(folder)
        return cls(read_json(p / "compare.json"),
                   {t: [dict(r) for r in typed_rows(read_csv(p / f"{t}.csv"), ROW_TYPES[t])] for t in TABLES})
