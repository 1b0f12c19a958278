"""Quickstart: the Python API on the real offline model and real data, in about a minute on 2 CPU cores.

    python examples/quickstart.py [--out runs/quickstart] [--docs 4]

Loads SmolLM2-135M-Instruct, fine-tunes it for a few steps on CNN/DailyMail
(GPT-4 summaries), compares base and tuned head by head, shows the per-head
table as a DataFrame and a heatmap, runs one activation patch and scores
every component with attribution patching. Every operation has one shape,
``op(inputs, config, *, runtime, out, resume)``; every result is a typed
object with a short repr, ``to_pandas()``, ``plot()``, ``save()`` and
``XResult.read()``; ``sc.load_run`` reads any folder back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sumcircuit as sc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cnndm_gpt4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--docs", type=int, default=4, help="documents analysed and patched")
    args = parser.parse_args()
    out = Path(args.out)
    quiet = sc.Runtime(progress=False)

    base = sc.load_model("smollm2-135m-instruct")
    print(f"model: {base.adapter.describe()}")
    train = sc.DataConfig(str(DATA), split="train", n_docs=32, max_tokens=256)
    probe = sc.DataConfig(str(DATA), split="val", n_docs=args.docs, max_tokens=256)

    # 1. a tiny full fine-tune (a smoke-sized stand-in for a real one; a rerun resumes from its checkpoints)
    tuned = sc.finetune("smollm2-135m-instruct", train, sc.FinetuneConfig(
        method="full", lr=3e-5, batch_size=2, grad_accum=2, max_steps=4, eval_every=4), runtime=quiet,
        out=out / "full")
    print(tuned)

    # 2. what changed, head by head (exact streaming statistics; no attention map is stored); the fine-tune
    #    result is itself a model argument
    analysis = sc.analyze(base, tuned, probe, sc.AnalysisConfig(n_bootstrap=200), runtime=quiet)
    print(analysis)
    heads = analysis.to_pandas()
    print(heads[["layer", "head", "entropy_delta", "kl_base_tuned"]].sort_values("kl_base_tuned").tail(5)
          .to_string(index=False))
    analysis.save(out / "analysis")
    print(f"heatmap: {sc.save_figure(analysis.plot('heads'), out / 'kl_per_head.png')}")

    # 3. one causal test: patch the tuned model's attention and MLP output of layer 20 into the base model
    tuned_model = sc.load_model(str(tuned.final_dir))
    patched = sc.patch(base, tuned_model, probe, sc.PatchConfig(layers=(20,), directions="denoise", n_bootstrap=200),
                       runtime=quiet, out=out / "patch")
    print(patched.to_pandas()[["component", "recovery", "recovery_ci_low", "recovery_ci_high"]].to_string(index=False))

    # 4. every head, block and neuron at once (one backward pass per direction), same columns as patching
    attribution = sc.attribute(base, tuned_model, probe, sc.AttributionConfig(directions="denoise", n_bootstrap=200),
                               runtime=quiet, out=out / "attribution")
    table = attribution.to_pandas()
    top = table.reindex(table["effect"].abs().sort_values(ascending=False).index).head(5)
    print(top[["component", "kind", "effect"]].to_string(index=False))
    print(f"site names map to TransformerLens hooks: {sc.Site.parse(top['component'].iloc[0]).to_hook_name()}")
    print(f"outputs in {out}; read back with sc.load_run('{out / 'analysis'}')")


if __name__ == "__main__":
    main()
