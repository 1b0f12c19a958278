"""What every public function returns: a result with tables, tensors and ``save``.

A result holds the numbers in memory: ``summary`` (what its JSON file holds,
provenance included), named tables (lists of rows, the CSV files) and, where
there are any, tensors. ``to_pandas()`` gives a table as a DataFrame and
``save(dir)`` writes exactly the files the CLI writes, so a notebook and the
shell produce the same folders and :func:`sumcircuit.runs.load_run` reads
either back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pandas as pd


class Result:
    """Base of every result type. Subclasses set ``kind``, ``main_table`` and implement ``tables``/``save``."""

    kind: ClassVar[str] = "result"
    main_table: ClassVar[str] = ""
    summary: dict[str, Any]

    def tables(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
        """Table name -> rows (each a CSV file of the output folder)."""
        return {}

    def to_pandas(self, table: str | None = None) -> pd.DataFrame:
        """One table as a DataFrame (default: the main one, e.g. the per-head table of an analysis)."""
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
        raise NotImplementedError

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)} rows" for k, v in self.tables().items())
        return f"<{type(self).__name__} {sizes}>"
