"""Quickstart: the Python API on the real offline model and real data, in about a minute on 2 CPU cores.

    python examples/quickstart.py [--out runs/quickstart] [--docs 4]

Loads SmolLM2-135M-Instruct, fine-tunes it for a few steps on CNN/DailyMail
(GPT-4 summaries), compares base and tuned head by head, shows the per-head
table as a DataFrame and a heatmap, runs one activation patch and scores
every component with attribution patching. Every result is a typed object
with ``to_pandas()`` and ``save()``; ``sc.load_run`` reads any folder back.
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

    base = sc.load_model("smollm2-135m-instruct")
    print(f"model: {base.adapter.describe()}")
    train = sc.DataConfig(str(DATA), split="train", n_docs=32, max_tokens=256)
    probe = sc.DataConfig(str(DATA), split="val", n_docs=args.docs, max_tokens=256)

    # 1. a tiny full fine-tune (a smoke-sized stand-in for a real one; resumable, so reruns are instant)
    tuned = sc.finetune("smollm2-135m-instruct", train, sc.FinetuneConfig(
        method="full", lr=3e-5, batch_size=2, grad_accum=2, max_steps=4, eval_every=4, progress=False),
        out=out / "full", resume=(out / "full" / "checkpoints").is_dir())
    print(f"fine-tuned: {tuned.summary['steps']} steps, best validation loss {tuned.summary['best_val_loss']:.4f}")

    # 2. what changed, head by head (exact streaming statistics; no attention map is stored)
    analysis = sc.analyze(base, str(tuned.final_dir), probe, sc.AnalysisConfig(n_bootstrap=200, progress=False))
    heads = analysis.to_pandas()
    print(heads[["layer", "head", "entropy_delta", "kl_base_tuned"]].sort_values("kl_base_tuned").tail(5)
          .to_string(index=False))
    print(f"heads with lower entropy after tuning: {analysis.summary['share_heads_entropy_decreased']:.1%}")
    analysis.save(out / "analysis")
    _heatmap(heads, out / "kl_per_head.png")

    # 3. one causal test: patch the tuned model's attention output of layer 20 into the base model
    tuned_model = sc.load_model(str(tuned.final_dir))
    patched = sc.patch(base, tuned_model, probe, sc.PatchConfig(layers=(20,), directions=("denoise",),
                                                                n_bootstrap=200))
    print(patched.to_pandas()[["component", "recovery", "recovery_ci_low", "recovery_ci_high"]].to_string(index=False))

    # 4. every head, block and neuron at once (one backward pass per direction), same columns as patching
    attribution = sc.attribute(base, tuned_model, probe, sc.AttributionConfig(directions=("denoise",),
                                                                             n_bootstrap=200), out=out / "attribution")
    table = attribution.to_pandas()
    top = table.reindex(table["effect"].abs().sort_values(ascending=False).index).head(5)
    print(top[["component", "kind", "effect"]].to_string(index=False))
    print(f"site names map to TransformerLens hooks: {sc.Site.parse(top['component'].iloc[0]).to_hook_name()}")
    print(f"outputs in {out}; read back with sc.load_run('{out / 'analysis'}')")


def _heatmap(heads, path: Path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = heads.pivot(index="layer", columns="head", values="kl_base_tuned")
    fig, ax = plt.subplots(figsize=(5, 6))
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="KL(base || tuned), nats")
    ax.set(xlabel="head", ylabel="layer", title="attention change per head")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"heatmap: {path}")


if __name__ == "__main__":
    main()
