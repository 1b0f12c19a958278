"""How summaries are generated and scored: :class:`GenerationConfig`, :class:`EvaluationConfig` (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sumcircuit.config import NON_NEGATIVE, POSITIVE, PROBABILITY_OPEN, Config, option
from sumcircuit.errors import ConfigError, SumcircuitError

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


class EvaluationError(SumcircuitError):
    """A bad evaluation setting or an output folder that cannot be resumed."""


def unescape(text: str) -> str:
    """``'\\n'`` typed in a shell is two characters; a stop sequence means the newline."""
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in _ESCAPES:
            out.append(_ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class GenerationConfig(Config):
    """How summaries are generated. Greedy unless ``num_beams`` > 1; never sampled.

    Example:
        >>> import sumcircuit as sc
        >>> sc.GenerationConfig(max_new_tokens=64, stop=("\\n\\n",)).stop
        ('\\n\\n',)
    """

    max_new_tokens: int = option(128, help="generated tokens per summary at most", bound=POSITIVE,
                                 group="generation")
    num_beams: int = option(1, help="1 = greedy", bound=POSITIVE, group="generation")
    no_repeat_ngram_size: int = option(0, help="forbid repeating n-grams of this size; 0 = off", bound=NON_NEGATIVE,
                                       flag="--no-repeat-ngram", group="generation")
    batch_size: int = option(8, help="documents generated together", bound=POSITIVE, group="generation")
    stop: tuple[str, ...] = option((), help="also stop at this text (repeatable; \\n and \\t are understood), e.g. "
                                            "--stop '\\n\\n' for zero-shot models that never emit EOS",
                                   repeat=True, cli_type=unescape, metavar="TEXT", group="generation")
    packed_weights: bool = option(True, help="on the CPU, decode fp32 linear layers through oneDNN-packed weights "
                                             "(a decode step 0.5-0.8x; sums in another order, so a near-tie can "
                                             "pick another token)", group="generation")

    def check(self) -> None:
        if any(not s for s in self.stop):
            raise ConfigError("stop", "stop sequences must not be empty")


@dataclass(frozen=True)
class EvaluationConfig(Config):
    """Generation plus how ROUGE's intervals are computed.

    Example:
        >>> import sumcircuit as sc
        >>> sc.EvaluationConfig(generation=sc.GenerationConfig(max_new_tokens=48), n_bootstrap=2000).n_bootstrap
        2000
    """

    generation: GenerationConfig = option(help="how summaries are generated", default_factory=GenerationConfig)
    n_bootstrap: int = option(1000, help="bootstrap resamples for the 95% CIs", bound=POSITIVE,
                              aliases=("--bootstrap",), group="scoring")
    ci_level: float = option(0.95, help="confidence level of the intervals", bound=PROBABILITY_OPEN, group="scoring")
    seed: int = option(0, help="resampling seed", bound=NON_NEGATIVE, group="scoring")


def coerce_evaluation(config: EvaluationConfig | GenerationConfig | dict[str, Any] | None) -> EvaluationConfig:
    """What ``evaluate`` accepts as config: an EvaluationConfig, a GenerationConfig alone, a dict, or None."""
    from sumcircuit.config import coerce_config

    if isinstance(config, GenerationConfig):
        return EvaluationConfig(generation=config)
    return coerce_config(EvaluationConfig, config)
