"""Cost of attribution patching against exact patching and against plain forward+backward passes.

In one process, on the same documents of ``../shared/data/cnndm_gpt4`` (val
split), for ``smollm2-135m-instruct`` against a fine-tune of it (``--tuned``;
by default the model with 1e-3 relative weight noise, a stand-in with the
same cost), at each ``--lengths`` (tokens per document):

  (a) floor        one plain forward+backward of the summary loss through each model
  (b) attribution  sumcircuit attribution of every head, attention/MLP block and MLP neuron, denoise
  (c) layer patch  exact patching of every attention and MLP block (60 sites), denoise
  (d) head patch   exact patching of every head (270 sites), denoise; measured on the heads of
                   ``--head-layers`` layers spread evenly over the depth (first to last) and scaled by
                   30 / that count. Patching a deep head replays the layers below it from the clean
                   cache, so a head's cost depends on its depth: layers sampled across depths (not
                   the first ones, which cost the most) give the average (the clean runs are counted
                   once per measured subset, so the scaled figure slightly overstates it)
  (e) attribute    what ``sumcircuit attribute`` did by default when this was measured: (b) plus (c),
                   the blocks patched exactly; compared with (a) + (c) side by side. Its default
                   ``--confirm 5`` now also patches the top 5 heads and 5 neurons per direction
                   exactly: at most 20 more sites, against (c)'s 60, not included here

Peak RSS is sampled every 2 ms while each method runs (absolute process RSS,
models included). Usage:

    python benchmarks/attribution_speed.py [--threads 2] [--docs 16] [--lengths 256 512] [--tuned SPEC]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from analysis_speed import measure  # the same RSS-sampling timer as the analysis benchmark

from sumcircuit.causal.attribution import AttributionConfig, attribution_losses
from sumcircuit.causal.interventions import batches
from sumcircuit.causal.patching import PatchConfig, patch_losses, patch_sites
from sumcircuit.data import DataConfig, Encoded, encode_all, load_examples
from sumcircuit.models import LoadedModel, load_model
from sumcircuit.training.batches import summary_loss

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cnndm_gpt4"


def noisy_copy(loaded: LoadedModel, scale: float = 1e-3) -> LoadedModel:
    tuned = copy.copy(loaded)
    tuned.model = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-8) * scale)
    return tuned


def floor(base: LoadedModel, tuned: LoadedModel, encoded: list[Encoded], batch_size: int) -> None:
    """A training-style pass (weight gradients) of each model: what one fine-tuning step costs."""
    pad = int(base.tokenizer.pad_token_id)
    for model in (base.model, tuned.model):
        for p in model.parameters():
            p.requires_grad_(True)
        for _, batch in batches(encoded, batch_size, pad, torch.device("cpu")):
            summary_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)


def run_length(base: LoadedModel, tuned: LoadedModel, length: int, args: argparse.Namespace) -> list[dict[str, object]]:
    cfg = DataConfig(str(args.data), split="val", n_docs=args.docs, max_tokens=length)
    encoded = encode_all(base.tokenizer, load_examples(cfg).examples, cfg)
    tokens = sum(len(e.input_ids) for e in encoded)
    n_layers = base.adapter.n_layers
    depths = sorted({round(i * (n_layers - 1) / max(args.head_layers - 1, 1)) for i in range(args.head_layers)})
    head_sites = patch_sites(base.adapter, "head", depths)
    patch_cfg = PatchConfig(directions=("denoise",), include_all=False, batch_size=args.batch_size)
    attr_cfg = AttributionConfig(granularity="all", directions=("denoise",), batch_size=args.batch_size)
    methods: dict[str, tuple[Callable[[], object], float]] = {
        "floor (fwd+bwd, both models)": (partial(floor, base, tuned, encoded, args.batch_size), 1.0),
        "attribution (all components)": (partial(attribution_losses, base, tuned, encoded, attr_cfg), 1.0),
        "exact layer patching (60 sites)": (partial(patch_losses, base, tuned, encoded, patch_cfg), 1.0),
        f"exact head patching ({n_layers * base.adapter.n_heads} sites, scaled from layers {depths})": (
            partial(patch_losses, base, tuned, encoded, patch_cfg, sites=head_sites), n_layers / len(depths)),
        "attribute default (estimates + exact blocks)": (
            partial(_attribute_default, base, tuned, encoded, attr_cfg, patch_cfg), 1.0),
    }
    rows: list[dict[str, object]] = []
    times: list[float] = []
    floor_t = floor_m = 0.0
    for name, (fn, scale) in methods.items():
        with torch.enable_grad():
            seconds, _, peak = measure(fn)
        seconds *= scale
        times.append(seconds)
        if not floor_t:
            floor_t, floor_m = seconds, peak
        rows.append({"T": length, "docs": len(encoded), "tokens": tokens, "method": name, "seconds": seconds,
                     "peak_gb": peak / 1e9, "time_x": seconds / floor_t, "rss_x": peak / floor_m})
        print(f"T={length:5d} {name:45s} {seconds:8.1f} s  peak {peak / 1e9:5.2f} GB  "
              f"time {seconds / floor_t:7.2f}x  RSS {peak / floor_m:5.2f}x of the floor", flush=True)
    print(f"T={length:5d} exact head patching / attribution: {times[3] / times[1]:.1f}x", flush=True)
    print(f"T={length:5d} attribute default / (floor + exact block patching): "
          f"{times[4] / (times[0] + times[2]):.2f}x", flush=True)
    return rows


def _attribute_default(base: LoadedModel, tuned: LoadedModel, encoded: list[Encoded], attr_cfg: AttributionConfig,
                       patch_cfg: PatchConfig) -> None:
    """The estimates of every component, then the exact patching of every block (what `attribute` runs)."""
    attribution_losses(base, tuned, encoded, attr_cfg)
    patch_losses(base, tuned, encoded, patch_cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--head-layers", type=int, default=3,
                        help="layers (spread from first to last) whose heads are patched exactly")
    parser.add_argument("--tuned", help="the fine-tuned model spec (default: a noisy copy of the base)")
    parser.add_argument("--data", default=str(DATA), help="a data folder with a val split")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model("smollm2-135m-instruct")
    tuned = load_model(args.tuned) if args.tuned else noisy_copy(base)
    for p in (*base.model.parameters(), *tuned.model.parameters()):
        p.requires_grad_(False)  # as in attribution: gradients with respect to activations only
    rows = [row for length in args.lengths for row in run_length(base, tuned, length, args)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
