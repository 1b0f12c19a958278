"""What every causal method does before it computes: load the model(s), encode the data, check for a finished run.

Shared by ablation, patching and attribution (and any registered method), so
that each takes specs, loaded models or results the same way, names the same
provenance, and treats ``resume`` the same way: a finished result in ``out``
whose run key (model weights, data, config, dtype) matches is read back
instead of being computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sumcircuit import distributed as dist
from sumcircuit.artifacts import read_json
from sumcircuit.causal.interventions import check_pair, encode_examples
from sumcircuit.config import Config
from sumcircuit.data.config import DataConfig, coerce_data
from sumcircuit.data.encoding import Encoded
from sumcircuit.models import LoadedModel, ModelLike, ensure_loaded
from sumcircuit.outputs import is_complete
from sumcircuit.results import Result
from sumcircuit.runtime import Runtime

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Result)


def local_runtime(runtime: Runtime) -> Runtime:
    """Set up the processes of a multi-process run; each then runs on its own device."""
    dist.setup(runtime.device)
    return runtime.with_device(dist.local_device(runtime.device))


def load_one(model: ModelLike, runtime: Runtime) -> LoadedModel:
    """One model (a spec is loaded, a loaded model passes); rank 0 fills caches first."""
    with dist.main_process_first():
        return ensure_loaded(model, runtime=runtime)


def load_pair(base: ModelLike, tuned: ModelLike, runtime: Runtime) -> tuple[LoadedModel, LoadedModel]:
    """Both models, checked to have the same architecture; rank 0 fills caches first."""
    with dist.main_process_first():
        pair = [ensure_loaded(m, runtime=runtime) for m in (base, tuned)]
    check_pair(pair[0], pair[1])
    return pair[0], pair[1]


def encode_for(loaded: LoadedModel, data: DataConfig | Sequence[Encoded] | Any) -> tuple[list[Encoded], dict[str, Any]]:
    """Encoded examples and what to cite about them, from data (a DataConfig, path, Dataset) or encoded examples."""
    if isinstance(data, (list, tuple)) and all(isinstance(e, Encoded) for e in data):
        return list(data), {"data": "in-memory encoded examples"}
    cfg = coerce_data(data)
    encoded, source = encode_examples(loaded.tokenizer, cfg)
    return encoded, {"data": source.provenance(), "data_config": asdict(cfg)}


def run_key(method: str, models: Sequence[LoadedModel], data_prov: dict[str, Any], config: Config,
            runtime: Runtime) -> str:
    """What determines a causal result: the method, weights, data, config and dtype (never paths or devices)."""
    data = {k: v for k, v in (data_prov.get("data") or {}).items() if k != "data"} \
        if isinstance(data_prov.get("data"), dict) else data_prov.get("data")
    cfg = {k: v for k, v in (data_prov.get("data_config") or {}).items() if k != "data"}
    material = {"method": method, "models": [m.weights_sha256() for m in models], "data": data, "data_config": cfg,
                "config": asdict(config), "dtype": runtime.dtype}  # type: ignore[call-overload]
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(cls: type[R], out: str | Path | None, key: str, resume: bool) -> R | None:
    """The result already in ``out`` when ``resume`` and it was computed with the same run key, else None."""
    if out is None or not resume:
        return None
    folder = Path(out)
    marker = folder / cls.files[0]
    if not marker.is_file() or not is_complete(folder):
        return None
    try:
        if read_json(marker).get("run_key") != key:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    log.info("%s: a finished %s of the same models, data and config; read back", folder, cls.kind)
    return cls.read(folder)
