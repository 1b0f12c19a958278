"""Shared fixtures: tiny random models of the three families, the real model, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from helpers import _CLASSES, save_tiny, train_tiny_tokenizer

# One thread: tiny-model ops are dominated by threading overhead, and results stay deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "llama", "gemma3"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory,
                    tiny_tokenizer: PreTrainedTokenizerFast) -> dict[str, Path]:
    """A saved tiny model folder per family (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny(fam, root / fam, tiny_tokenizer) for fam in _CLASSES}


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache dir for the real model: the user's cache if set, so CI converts the GGUF once."""
    from sumcircuit.models import default_cache_dir

    return Path(os.environ.get("SUMCIRCUIT_CACHE", default_cache_dir()))


@pytest.fixture(scope="session")
def smollm2(real_model_cache: Path):  # type: ignore[no-untyped-def]
    from sumcircuit.models import NAMED_MODELS, load_model

    if not NAMED_MODELS["smollm2-135m-instruct"].installed():
        pytest.fail("smollm2-135m-instruct is not installed: run `make test`, which installs it")
    return load_model("smollm2-135m-instruct", cache_dir=real_model_cache)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that load the real model are `real` (so `-m "not real"` runs without it or ../shared)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()) or "real_model_cache" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)
