"""What every operation returns: a result with tables, tensors, ``save``, ``read`` and a short repr.

A result holds the numbers in memory: ``summary`` (what its JSON file holds,
provenance included), named tables (the CSV files) and, where there are any,
tensors. ``to_pandas()`` gives a table as a DataFrame, ``save(dir)`` writes
exactly the files the CLI writes and ``XResult.read(dir)`` reads them back,
so a notebook and the shell produce the same folders. Each kind of result is
registered in :data:`RESULT_KINDS` with the file that marks a finished folder
of that kind; :func:`load_run` reads any output folder through that registry.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from sumcircuit.errors import SumcircuitError
from sumcircuit.registry import Registry, resolve

if TYPE_CHECKING:
    import pandas as pd

R = TypeVar("R", bound="Result")
T = TypeVar("T")


class RunError(SumcircuitError):
    """A folder that is not (or not yet) a finished output of sumcircuit."""


class Result:
    """Base of every result type.

    Subclasses set ``kind`` (their name in :data:`RESULT_KINDS`), ``main_table``,
    ``files`` (every file ``save`` writes, marker first) and implement
    :meth:`tables`, :meth:`save` and :meth:`read`; :meth:`describe` gives the
    headline that the short repr shows.

    Example:
        >>> result = sc.load_run("runs/demo/analysis")  # doctest: +SKIP
        >>> result  # doctest: +SKIP
        <AnalysisResult 30 layers x 9 heads, 16 documents; 61.9% of heads more focused, ...>
        >>> type(result).read("runs/demo/analysis").to_pandas("layers")  # doctest: +SKIP
    """

    kind: ClassVar[str] = "result"
    main_table: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()
    summary: dict[str, Any]

    def tables(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
        """Table name -> rows (each a CSV file of the output folder)."""
        return {}

    def to_pandas(self, table: str | None = None) -> pd.DataFrame:
        """One table as a DataFrame (default: the main one, e.g. the per-head table of an analysis).

        Args:
            table: the table's name (see :meth:`tables`); None for the main table.

        Returns:
            The rows as a DataFrame; columns read back from CSV as text become numbers.

        Example:
            >>> result.to_pandas("layers")  # doctest: +SKIP
        """
        import pandas as pd

        tables = self.tables()
        name = table or self.main_table
        if name not in tables:
            raise KeyError(f"{type(self).__name__} has no table {name!r}; tables: {', '.join(tables)}")
        frame = pd.DataFrame(list(tables[name]))
        for column in frame.columns:  # tables read back from CSV hold strings: numbers become numbers
            if pd.api.types.is_object_dtype(frame[column]) or pd.api.types.is_string_dtype(frame[column]):
                converted = pd.to_numeric(frame[column], errors="coerce")
                present = frame[column].map(lambda v: v is not None and str(v).lower() not in ("", "nan"))
                if bool(present.any()) and bool(converted[present].notna().all()):
                    frame[column] = converted
        return frame

    def save(self, out: str | Path) -> Path:
        """Write the files the CLI writes into ``out``; returns the folder (or file) written."""
        raise NotImplementedError

    @classmethod
    def read(cls: type[R], folder: str | Path) -> R:
        """Read a folder that :meth:`save` (or the CLI) wrote back into this result type."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line: what this result is about (its headline numbers)."""
        return ""

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k} ({len(v)} rows)" for k, v in self.tables().items())
        head = self.describe()
        return f"<{type(self).__name__}{' ' + head if head else ''}; tables: {sizes or 'none'}>"


def _cell(value: Any, hint: Any) -> Any:
    """A CSV cell (text) as the type its row declares; text that does not convert stays text."""
    if not isinstance(value, str) or hint is None:
        return value
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value == "":
        return "" if str in options or type(None) not in options else None
    for option in options:
        if option is int:
            try:
                return int(value)
            except ValueError:
                continue
        if option is float:
            try:
                return float(value)
            except ValueError:
                continue
        if option is bool and value in ("True", "False"):
            return value == "True"
    return value


def typed_rows(rows: Iterable[Mapping[str, Any]], row_type: type[T]) -> list[T]:
    """Rows read back from CSV (all text) with each column converted to the type ``row_type`` declares.

    Args:
        rows: rows as :func:`sumcircuit.artifacts.read_csv` returns them.
        row_type: a ``TypedDict`` naming each column's type (``int``, ``float``, ``int | str`` ...).

    Returns:
        The rows with numbers as numbers (so a result read from disk equals the one in memory).
    """
    hints = get_type_hints(row_type)
    return [cast(T, {k: _cell(v, hints.get(k)) for k, v in row.items()}) for row in rows]


def finite_or_none(value: float | None) -> float | None:
    """``value``, or None when it is missing or not finite (what JSON files store for 'not computed')."""
    return None if value is None or not math.isfinite(value) else value


@dataclass(frozen=True)
class ResultKind:
    """One kind of output folder: its marker file and the result class that reads it.

    Args:
        name: the kind's name (``"analysis"``).
        marker: the file whose presence marks a finished folder of this kind.
        cls: the :class:`Result` subclass, or ``"module:Class"`` (imported when a folder is read).
    """

    name: str
    marker: str
    cls: str | type[Result]

    def result_class(self) -> type[Result]:
        """The result class (imported on first use)."""
        cls: type[Result] = resolve(self.cls)
        return cls


RESULT_KINDS: Registry[ResultKind] = Registry("output kind")


def register_result_kind(name: str, marker: str, cls: str | type[Result], *, replace: bool = False) -> ResultKind:
    """Make :func:`load_run` (and ``sumcircuit report``) recognise folders holding ``marker``.

    Args:
        name: the kind's name.
        marker: the file that marks a finished folder of this kind.
        cls: its result class, or ``"module:Class"``.
        replace: replace an existing kind of that name.

    Returns:
        The registered :class:`ResultKind`.

    Example:
        >>> register_result_kind("toy", "toy.json", "mypkg.toy:ToyResult")  # doctest: +SKIP
    """
    return RESULT_KINDS.register(name, ResultKind(name, marker, cls), replace=replace)


# Checked in this order: a study folder holds stage folders, never the other way round.
for _name, _marker, _cls in (
        ("study", "reproduce.json", "sumcircuit.study.result:StudyResult"),
        ("analysis", "heads.csv", "sumcircuit.analysis.result:AnalysisResult"),
        ("finetune", "train_summary.json", "sumcircuit.training.result:FinetuneResult"),
        ("evaluation", "rouge.json", "sumcircuit.evaluation.result:EvaluationResult"),
        ("ablation", "ablation.json", "sumcircuit.causal.ablation:AblationResult"),
        ("patching", "patching.json", "sumcircuit.causal.patching:PatchResult"),
        ("attribution", "attribution.json", "sumcircuit.causal.attribution:AttributionResult"),
        ("faithfulness", "faithfulness.json", "sumcircuit.causal.faithfulness:FaithfulnessResult"),
        ("trace", "trace.json", "sumcircuit.hooks:TraceResult"),
        ("compare", "compare.json", "sumcircuit.generalization.result:CompareResult"),
        ("circuit", "circuit.json", "sumcircuit.circuit.result:Circuit")):
    register_result_kind(_name, _marker, _cls)


def detect_kind(path: str | Path) -> str:
    """Which kind of output ``path`` is (a folder, or a circuit.json file).

    Args:
        path: an output folder, or a circuit ``.json`` file.

    Returns:
        The kind's name in :data:`RESULT_KINDS`.
    """
    from sumcircuit.artifacts import read_json
    from sumcircuit.outputs import require_complete

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        try:
            data = read_json(p)
        except (OSError, ValueError) as exc:
            raise RunError(f"{p}: not readable JSON ({exc})") from None
        if isinstance(data, dict) and "layers" in data:
            return "circuit"
    if not p.is_dir():
        raise RunError(f"{p}: no such output folder")
    require_complete(p)
    for name, kind in RESULT_KINDS.items():
        if (p / kind.marker).is_file():
            return name
    markers = ", ".join(k.marker for _, k in RESULT_KINDS.items())
    raise RunError(f"{p}: not a finished sumcircuit output (none of {markers} found)")


def load_run(path: str | Path) -> Result:
    """Read any output folder (or circuit.json) back into the result object the API returns.

    Args:
        path: a folder written by any command or ``save()``, a study folder, or a circuit file.

    Returns:
        The result, of the type its kind registered (``AnalysisResult``, ``StudyResult``, ...).

    Example:
        >>> import sumcircuit as sc
        >>> sc.load_run("runs/demo/analysis").to_pandas()  # doctest: +SKIP
    """
    kind = RESULT_KINDS.get(detect_kind(path))
    return kind.result_class().read(path)
