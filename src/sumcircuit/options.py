"""Choices and defaults that the command line shows, importable without torch.

``sumcircuit --help`` must answer at once, so the CLI reads its choices from
here and imports the computing modules only when a command runs. The
modules that compute import the same names, so the two cannot drift apart.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "{document}\nTL;DR: {summary}"
DEFAULT_MAX_TOKENS = 1024
MIN_MAX_TOKENS = 16  # below this a document and its summary cannot both keep tokens
DATA_PRESETS = ("cnn_dailymail", "xsum", "scitldr", "dialogsum", "samsum")

ABLATION_MODES = ("zero", "mean")
LAYER_COMPONENTS = ("attn", "mlp", "both")
CONTROL_POOLS = ("all", "complement")
DIRECTIONS = ("denoise", "noise")
GRANULARITIES = ("layer", "head", "block")
ATTRIBUTION_GRANULARITIES = ("layer", "head", "neuron", "all")
ATTRIBUTION_METHODS = ("linear", "ig")
STUDY_PRESETS = ("quick", "cpu", "gpu", "paper")
FINETUNE_METHODS = ("full", "lora", "targeted-lora")
ADAPT_UNITS = ("layer", "head")
KERNEL_MODES = ("auto", "compiled", "eager", "fused")  # sumcircuit.kernels.KernelMode

GENERATION_MAX_NEW_TOKENS = 128
GENERATION_NUM_BEAMS = 1
GENERATION_NO_REPEAT_NGRAM = 0
GENERATION_BATCH_SIZE = 8
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")

CIRCUIT_SCORES = ("kl", "kl-sym", "entropy", "activation", "weights", "combined", "attribution")
CIRCUIT_SCORE_DEFINITIONS = {
    "kl": "per layer, the mean over its heads of KL(base || tuned) between the two models' attention "
          "distributions (heads.csv kl_base_tuned); per head, that head's value",
    "kl-sym": "as kl, with the symmetric (KL(base||tuned) + KL(tuned||base)) / 2",
    "entropy": "per layer, the mean over its heads of |entropy_tuned - entropy_base| (the absolute "
               "value of each head's mean entropy change, heads.csv entropy_delta); per head, that value",
    "activation": "|actmag_rel_change|: absolute relative change of the layer's mean activation "
                  "magnitude (layers.csv)",
    "weights": "weight_change_attn + weight_change_mlp (layers.csv): how far fine-tuning moved the "
               "layer's weights",
    "combined": "mean over the available scores among kl, entropy, activation, weights of the "
                "normalised rank (L-1-rank)/(L-1), rank 0 = most changed, ties averaged; 1 = ranked "
                "first by every score. Heads: over kl and entropy",
    "attribution": "causal: per layer, |attribution effect| of its attention plus its MLP contribution; per "
                   "head, |effect| of that head (attribution.csv of `sumcircuit attribute`, denoise "
                   "direction unless only noise was computed)",
}
