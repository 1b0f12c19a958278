"""ROUGE under ablation: greedy summaries with and without the circuit, paired over documents.

Uses :mod:`sumcircuit.evaluation` (generation, ROUGE, bootstrap) so the
numbers match ``sumcircuit evaluate``; the ablation hooks stay on during
generation (values broadcast over the one-token decoding steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sumcircuit import distributed as dist
from sumcircuit.causal.ablation import ablation_values
from sumcircuit.causal.config import AblationConfig
from sumcircuit.causal.interventions import Interventions
from sumcircuit.data.config import DataConfig
from sumcircuit.data.records import load_examples
from sumcircuit.models import LoadedModel
from sumcircuit.placement import execution_device
from sumcircuit.sites import Site
from sumcircuit.stats import mean_ci, resample_counts


def rouge_under_ablation(loaded: LoadedModel, data_cfg: DataConfig, cfg: AblationConfig,
                          targets: Sequence[Site], means: Mapping[Site, torch.Tensor],
                          progress: bool = True) -> dict[str, Any]:
    """ROUGE of greedy summaries with and without the ablation, paired over documents.

    Uses ``sumcircuit.evaluation`` (generation, ROUGE, bootstrap) so the numbers
    match ``sumcircuit evaluate``; the ablation hooks stay on during generation
    (values broadcast over the one-token decoding steps).
    """
    from sumcircuit.data.encoding import encode
    from sumcircuit.evaluation.config import GenerationConfig
    from sumcircuit.evaluation.generation import eos_token_ids, generate_summaries
    from sumcircuit.evaluation.rouge import rouge_scores

    examples = load_examples(data_cfg).examples
    prompts = [encode(loaded.tokenizer, e, data_cfg.template, data_cfg.max_tokens, with_summary=False,
                      summary_budget=cfg.rouge_max_new_tokens) for e in examples]
    refs = [list(e.references) for e in examples]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.rouge_max_new_tokens, batch_size=cfg.batch_size)
    eos = eos_token_ids(loaded)
    device = execution_device(loaded.model)
    per_doc: dict[str, list[dict[str, float]]] = {}
    for label, values in (("clean", {}), ("ablated", ablation_values(targets, cfg.mode, means, device))):
        mine: list[tuple[int, list[str]]] = []  # (batch number, texts); batch b runs on rank b % N
        with Interventions(loaded.model, loaded.adapter) as iv:
            iv.replace({c: v.to(device) for c, v in values.items()})
            starts = range(0, len(prompts), gen_cfg.batch_size)
            for b in tqdm(dist.my_blocks(len(starts)), desc=f"generate ({label})",
                          disable=not progress or not dist.is_main_process()):
                outs = generate_summaries(loaded.model, loaded.tokenizer,
                                          prompts[starts[b]:starts[b] + gen_cfg.batch_size], gen_cfg, eos)
                mine.append((b, [o.text for o in outs]))
        texts = [t for _, batch_texts in sorted(p for part in dist.all_gather_objects(mine) for p in part)
                 for t in batch_texts]
        per_doc[label] = rouge_scores(texts, refs)
    counts = resample_counts(len(examples), cfg.n_bootstrap, cfg.seed)
    out: dict[str, Any] = {"n": len(examples), "max_new_tokens": cfg.rouge_max_new_tokens,
                           "definition": "F1, greedy decoding; delta = ablated - clean, paired "
                                         "percentile bootstrap over documents"}
    for key in per_doc["clean"][0]:
        clean = np.array([d[key] for d in per_doc["clean"]])
        ablated = np.array([d[key] for d in per_doc["ablated"]])
        out[key] = {"clean": float(clean.mean()), "ablated": float(ablated.mean()),
                    "delta": mean_ci(ablated - clean, counts, cfg.ci_level)}
    return out
