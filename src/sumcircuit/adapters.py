"""Architecture adapters: one declarative row per model family.

Everything that differs between GPT-2 (fused ``c_attn`` Conv1D, learned
positions), LLaMA-style models (``q/k/v/o_proj``, RoPE, grouped-query
attention) and Gemma 3 (also sliding-window layers) is stated here as data,
so analysis, fine-tuning and causal code ask the adapter instead of branching
on the model type (the idea of pyvene's per-family component maps).

Module paths are dotted attribute paths. ``layers`` is relative to the
``*ForCausalLM`` model; the others are relative to one decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from sumcircuit.errors import ModelError

Port = Literal["input", "output"]


@dataclass(frozen=True)
class FusedQKV:
    """q, k and v computed by one projection whose output is ``[q | k | v]``."""

    module: str
    weight_layout: Literal["conv1d", "linear"]  # Conv1D stores W as [in, out]


@dataclass(frozen=True)
class SeparateQKV:
    """q, k and v computed by three projections (k and v may have fewer heads)."""

    q: str
    k: str
    v: str


@dataclass(frozen=True)
class ArchitectureSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    attention_output: str  # its input is the concatenation of the per-head outputs
    qkv: FusedQKV | SeparateQKV
    mlp: str
    mlp_output: str  # its input is the per-neuron MLP activation
    positions: Literal["learned", "rope"]
    final_norm: str
    embed_tokens: str
    mlp_act: str  # the MLP's activation-function module (RelP's identity rule)
    mlp_up: str | None = None  # a gated MLP's up projection: act(gate) * up (RelP's half rule); None: not gated
    # Gemma 2/3 normalise each block's output before the residual add: the residual stream
    # receives these modules' outputs, not the attention / MLP outputs themselves.
    attention_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # Config fields holding dropout probabilities that act on the embeddings or inside the blocks: where
    # they are 0, the layers below the lowest trainable one are deterministic in training mode too.
    dropout_fields: tuple[str, ...] = ("attention_dropout",)

    def site_path(self, kind: str) -> tuple[str, Port]:
        """Where a :class:`~sumcircuit.sites.Site` kind lives in a block: (module path, input or output).

        ``""`` is the block itself. Heads and neurons are slices of the whole
        activation (``attn_heads`` / ``mlp_neurons``): the input of the
        attention output projection and of the MLP output projection.
        """
        table: dict[str, tuple[str, Port]] = {
            "resid_pre": ("", "input"),
            "attn": (self.attention_post_norm or self.attention, "output"),
            "attn_head": (self.attention_output, "input"),
            "attn_heads": (self.attention_output, "input"),
            "mlp": (self.mlp_post_norm or self.mlp, "output"),
            "mlp_neuron": (self.mlp_output, "input"),
            "mlp_neurons": (self.mlp_output, "input"),
            "resid_post": ("", "output"),
        }
        if kind not in table:
            raise ModelError(f"unknown site kind {kind!r}")
        return table[kind]


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        family="gpt2", model_types=("gpt2",),
        layers="transformer.h", attention="attn", attention_output="attn.c_proj",
        qkv=FusedQKV("attn.c_attn", weight_layout="conv1d"),
        mlp="mlp", mlp_output="mlp.c_proj", positions="learned",
        final_norm="transformer.ln_f", embed_tokens="transformer.wte", mlp_act="mlp.act",
        dropout_fields=("embd_pdrop", "attn_pdrop", "resid_pdrop"),
    ),
    ArchitectureSpec(
        family="llama", model_types=("llama", "qwen2", "qwen3", "mistral", "olmo2", "gemma"),
        layers="model.layers", attention="self_attn", attention_output="self_attn.o_proj",
        qkv=SeparateQKV("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        mlp="mlp", mlp_output="mlp.down_proj", positions="rope",
        final_norm="model.norm", embed_tokens="model.embed_tokens", mlp_act="mlp.act_fn", mlp_up="mlp.up_proj",
    ),
    ArchitectureSpec(
        family="gemma3", model_types=("gemma3_text", "gemma2"),
        layers="model.layers", attention="self_attn", attention_output="self_attn.o_proj",
        qkv=SeparateQKV("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        mlp="mlp", mlp_output="mlp.down_proj", positions="rope",
        final_norm="model.norm", embed_tokens="model.embed_tokens", mlp_act="mlp.act_fn", mlp_up="mlp.up_proj",
        attention_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm",
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}


def supported_model_types() -> list[str]:
    """The ``model_type`` values the adapter table has a row for."""
    return sorted(_BY_MODEL_TYPE)


def spec_for_config(config: PretrainedConfig) -> ArchitectureSpec:
    """The adapter table's row for a model config; an unsupported family is a one-line ModelError."""
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(str(model_type))
    if spec is None:
        raise ModelError(
            f"unsupported architecture '{model_type}'; supported model types: "
            + ", ".join(supported_model_types()))
    return spec


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    """``root``'s submodule at a dotted path, with a one-line error naming the path when it is missing."""
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module


@dataclass(frozen=True)
class ArchitectureAdapter:
    """An :class:`ArchitectureSpec` bound to one model's config: sizes and module lookup."""

    spec: ArchitectureSpec
    config: PretrainedConfig

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> ArchitectureAdapter:
        return cls(spec_for_config(model.config), model.config)

    @property
    def family(self) -> str:
        """The row's family name (``gpt2``, ``llama``, ``gemma3``)."""
        return self.spec.family

    @property
    def n_layers(self) -> int:
        """Decoder blocks."""
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        """Query heads per layer."""
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than query heads under grouped-query attention)."""
        kv = getattr(self.config, "num_key_value_heads", None)
        return int(kv) if kv else self.n_heads

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        """Width of one head."""
        explicit = getattr(self.config, "head_dim", None)
        return int(explicit) if explicit else self.hidden_size // self.n_heads

    @property
    def n_neurons(self) -> int:
        """MLP neurons per layer (the input width of the MLP's output projection)."""
        inner = getattr(self.config, "intermediate_size", None) or getattr(self.config, "n_inner", None)
        return int(inner) if inner else 4 * self.hidden_size

    def sliding_window(self, layer: int) -> int | None:
        """Window size if ``layer`` uses sliding-window attention, else None."""
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is None:
            return int(window)  # e.g. Mistral: one window for every layer
        return int(window) if layer_types[layer] == "sliding_attention" else None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder blocks."""
        return get_submodule(model, self.spec.layers)  # type: ignore[return-value]

    def _in_layer(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        self._check_layer(layer)
        return get_submodule(self.layers(model)[layer], path)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        """The attention module of ``layer``."""
        return self._in_layer(model, layer, self.spec.attention)

    def attention_output(self, model: nn.Module, layer: int) -> nn.Module:
        """The attention's output projection of ``layer`` (its input holds the heads)."""
        return self._in_layer(model, layer, self.spec.attention_output)

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP module of ``layer``."""
        return self._in_layer(model, layer, self.spec.mlp)

    def mlp_output(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP's output projection of ``layer`` (its input holds the neurons)."""
        return self._in_layer(model, layer, self.spec.mlp_output)

    def attention_contribution(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output the residual stream receives from attention (post-norm if any)."""
        return self._in_layer(model, layer, self.spec.attention_post_norm or self.spec.attention)

    def mlp_contribution(self, model: nn.Module, layer: int) -> nn.Module:
        """The module whose output the residual stream receives from the MLP (post-norm if any)."""
        return self._in_layer(model, layer, self.spec.mlp_post_norm or self.spec.mlp)

    def site_module(self, model: nn.Module, kind: str, layer: int) -> tuple[nn.Module, Port]:
        """The module that holds a site kind at ``layer``, and whether the site is its input or output."""
        path, port = self.spec.site_path(kind)
        return (self.block(model, layer) if not path else self._in_layer(model, layer, path)), port

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder block ``layer``."""
        self._check_layer(layer)
        return self.layers(model)[layer]

    def qkv_modules(self, model: nn.Module, layer: int) -> dict[str, nn.Module]:
        """``{'qkv': m}`` for fused projections, ``{'q': .., 'k': .., 'v': ..}`` otherwise."""
        qkv = self.spec.qkv
        if isinstance(qkv, FusedQKV):
            return {"qkv": self._in_layer(model, layer, qkv.module)}
        return {name: self._in_layer(model, layer, getattr(qkv, name)) for name in ("q", "k", "v")}

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ModelError(f"layer {layer} out of range: the model has {self.n_layers} layers "
                             f"(0..{self.n_layers - 1})")

    def describe(self) -> dict[str, object]:
        """The sizes that must match for two models to be compared (and for provenance)."""
        return {"family": self.family, "model_type": self.config.model_type,
                "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "hidden_size": self.hidden_size, "n_neurons": self.n_neurons,
                "positions": self.spec.positions,
                "sliding_window_layers": [i for i in range(self.n_layers)
                                          if self.sliding_window(i) is not None]}
