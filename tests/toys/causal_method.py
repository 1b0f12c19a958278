"""A toy causal method for the registry test: one module and one registration.

``scale-mlp`` multiplies the MLP contribution of chosen layers by a factor and reports each document's summary
loss change, with its config, result kind, API call and CLI command all coming from the one registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sumcircuit.artifacts import atomic_write_json, read_json
from sumcircuit.causal import CausalMethod, register_causal_method
from sumcircuit.config import POSITIVE, Config, option
from sumcircuit.results import Result, register_result_kind


@dataclass(frozen=True)
class ScaleConfig(Config):
    layers: tuple[int, ...] = option((1,), help="layers whose MLP output is scaled",
                                     normalize=lambda v: tuple(int(x) for x in str(v).split(",")) if isinstance(v, str)
                                     else tuple(v))
    factor: float = option(0.5, help="the scale")
    batch_size: int = option(2, help="documents per forward pass", bound=POSITIVE)


@dataclass(repr=False)
class ScaleResult(Result):
    kind: ClassVar[str] = "scale"
    main_table: ClassVar[str] = "docs"
    files: ClassVar[tuple[str, ...]] = ("scale.json",)
    summary: dict[str, Any]

    def tables(self) -> dict[str, list[Any]]:
        return {"docs": self.summary["docs"]}

    def save(self, out: str | Path) -> Path:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out) / "scale.json", self.summary)
        return Path(out)

    @classmethod
    def read(cls, folder: str | Path) -> ScaleResult:
        return cls(read_json(Path(folder) / "scale.json"))


def scale_mlp(model: Any, data: Any, config: ScaleConfig | None = None, *, runtime: Any = None, out: Any = None,
              resume: bool = True) -> ScaleResult:
    from sumcircuit.causal.inputs import encode_for, load_one
    from sumcircuit.causal.interventions import Interventions, batches, document_losses
    from sumcircuit.runtime import coerce_runtime

    cfg = config or ScaleConfig()
    loaded = load_one(model, coerce_runtime(runtime))
    encoded, _ = encode_for(loaded, data)
    rows = []
    for idx, batch in batches(encoded, cfg.batch_size, int(loaded.tokenizer.pad_token_id), torch.device("cpu")):
        with torch.no_grad():
            clean = document_losses(loaded.model, batch)
            with Interventions(loaded.model, loaded.adapter) as iv:
                for layer in cfg.layers:
                    iv.edit(("mlp", layer), lambda x: x * cfg.factor)
                scaled = document_losses(loaded.model, batch)
        rows += [{"doc_id": encoded[i].doc_id, "delta": float(s - c)} for i, c, s in zip(idx, clean, scaled)]
    result = ScaleResult({"layers": list(cfg.layers), "factor": cfg.factor, "docs": rows})
    if out is not None:
        result.save(out)
    return result


def report(result: ScaleResult) -> list[str]:
    mean = sum(r["delta"] for r in result.summary["docs"]) / len(result.summary["docs"])
    return [f"mean loss change {mean:+.5f}", "wrote scale.json"]


def register() -> CausalMethod:
    register_result_kind("scale", "scale.json", ScaleResult, replace=True)
    return register_causal_method(CausalMethod("scale-mlp", ScaleConfig, scale_mlp, "model",
                                               "scale the MLP output of chosen layers", report=report), replace=True)
