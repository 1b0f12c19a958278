"""One vocabulary for model components: :class:`Site`.

Every CSV, JSON, plot and API call names a component the same way, so that
a head picked by ``circuit`` is the head ``ablate`` removes and the row that
``patch`` and ``attribute`` write about it. The canonical strings are short
and sortable; TransformerLens hook names are accepted too and produced by
:meth:`Site.to_hook_name`, so results can be compared with tools that use them.

=============  ===============  =====================================  ==============================
kind           canonical        what it is                             TransformerLens hook
=============  ===============  =====================================  ==============================
resid_pre      ``L2.resid_pre`` residual stream entering block 2       ``blocks.2.hook_resid_pre``
attn           ``L2.attn``      what attention adds to the residual    ``blocks.2.hook_attn_out``
attn_head      ``L2.H3``        head 3's slice of the o_proj input     ``blocks.2.attn.hook_z`` [3]
mlp            ``L2.mlp``       what the MLP adds to the residual      ``blocks.2.hook_mlp_out``
mlp_neuron     ``L2.N17``       neuron 17's MLP activation             ``blocks.2.mlp.hook_post`` [17]
resid_post     ``L2.resid_post`` residual stream leaving block 2       ``blocks.2.hook_resid_post``
=============  ===============  =====================================  ==============================

Which module of each family holds a site is stated in the adapter table
(:meth:`sumcircuit.adapters.ArchitectureAdapter.site_module`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sumcircuit.errors import SumcircuitError

SiteKind = Literal["resid_pre", "attn", "attn_head", "mlp", "mlp_neuron", "resid_post"]
SITE_KINDS: tuple[SiteKind, ...] = get_args(SiteKind)
_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}
_INDEXED: dict[str, str] = {"attn_head": "head", "mlp_neuron": "neuron"}

_HOOKS: dict[SiteKind, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn": "blocks.{layer}.hook_attn_out",
    "attn_head": "blocks.{layer}.attn.hook_z",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "mlp_neuron": "blocks.{layer}.mlp.hook_post",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_attn_out|attn\.hook_z|attn\.hook_result|"
                      r"hook_mlp_out|mlp\.hook_post|hook_resid_post)(?:\[(\d+)\])?$")
_HOOK_KIND: dict[str, SiteKind] = {
    "hook_resid_pre": "resid_pre", "hook_attn_out": "attn", "attn.hook_z": "attn_head",
    "attn.hook_result": "attn_head", "hook_mlp_out": "mlp", "mlp.hook_post": "mlp_neuron",
    "hook_resid_post": "resid_post",
}
_CANON_RE = re.compile(r"^L(\d+)\.(?:H(\d+)|N(\d+)|(attn|mlp|resid_pre|resid_post|block|head|neuron))$")
_LEGACY_KIND: dict[str, SiteKind] = {"block": "resid_post", "head": "attn_head", "neuron": "mlp_neuron"}


class SiteError(SumcircuitError):
    """A component name, layer list or head list that cannot be parsed or does not fit the model."""


@functools.total_ordering
@dataclass(frozen=True)
class Site:
    """A component of a decoder: ``layer``, ``kind`` and, for heads and neurons, ``index``.

    Example:
        >>> Site.parse("L2.H3") == Site(2, "attn_head", 3)
        True
        >>> Site(5, "mlp").name
        'L5.mlp'
    """

    layer: int
    kind: SiteKind
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _ORDER:
            raise SiteError(f"unknown site kind {self.kind!r}; one of {', '.join(SITE_KINDS)}")
        if (self.index is not None) != (self.kind in _INDEXED):
            need = "needs" if self.kind in _INDEXED else "takes no"
            raise SiteError(f"site kind {self.kind!r} {need} an index")
        if self.layer < 0 or (self.index is not None and self.index < 0):
            raise SiteError(f"negative layer or index in {self.layer}/{self.index}")

    # -------------------------------------------------------- names
    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        """The canonical string: ``L2.H3``, ``L2.N17``, ``L2.attn``, ``L2.mlp``, ``L2.resid_post``."""
        if self.kind == "attn_head":
            return f"L{self.layer}.H{self.index}"
        if self.kind == "mlp_neuron":
            return f"L{self.layer}.N{self.index}"
        return f"L{self.layer}.{self.kind}"

    @property
    def head(self) -> int | None:
        """The head index of a head site, else None."""
        return self.index if self.kind == "attn_head" else None

    @property
    def neuron(self) -> int | None:
        """The neuron index of a neuron site, else None."""
        return self.index if self.kind == "mlp_neuron" else None

    def to_hook_name(self) -> str:
        """The TransformerLens hook name; a head or neuron adds its index, ``blocks.2.attn.hook_z[3]``.

        The result parses back to this site (:meth:`parse`); :meth:`to_hook` gives the name and the
        index apart, as TransformerLens itself indexes the hook's head or neuron axis.

        Example:
            >>> Site.parse("L2.H3").to_hook_name()
            'blocks.2.attn.hook_z[3]'
        """
        name = _HOOKS[self.kind].format(layer=self.layer)
        return name if self.index is None else f"{name}[{self.index}]"

    def to_hook(self) -> tuple[str, int | None]:
        """(TransformerLens hook name, index along its head or neuron axis or None)."""
        return _HOOKS[self.kind].format(layer=self.layer), self.index

    def to_row(self) -> dict[str, Any]:
        """Columns every table shares: component, layer, kind, head, neuron ('' where not applicable)."""
        return {"component": self.name, "layer": self.layer, "kind": self.kind,
                "head": "" if self.head is None else self.head,
                "neuron": "" if self.neuron is None else self.neuron}

    @property
    def activation(self) -> tuple[str, int]:
        """The whole activation this site reads (heads share their layer's o_proj input)."""
        return (self.kind, self.layer) if self.index is None else (self.kind + "s", self.layer)

    def _key(self) -> tuple[int, int, int]:
        return (self.layer, _ORDER[self.kind], -1 if self.index is None else self.index)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Site):
            return NotImplemented
        return self._key() < other._key()

    # -------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str | Site, index: int | None = None) -> Site:
        """A site from its canonical name, a TransformerLens hook name, or a legacy spelling.

        Accepted: ``L2.H3``, ``L2.N17``, ``L2.attn``, ``L2.mlp``, ``L2.resid_pre``,
        ``L2.resid_post`` (``L2.block`` = resid_post), ``blocks.2.attn.hook_z`` with
        ``index=3`` or as ``blocks.2.attn.hook_z[3]``.
        """
        if isinstance(text, Site):
            return text
        s = str(text).strip()
        if m := _CANON_RE.match(s):
            layer = int(m.group(1))
            if m.group(2) is not None:
                return cls(layer, "attn_head", int(m.group(2)))
            if m.group(3) is not None:
                return cls(layer, "mlp_neuron", int(m.group(3)))
            word = m.group(4)
            kind: SiteKind = _LEGACY_KIND[word] if word in _LEGACY_KIND else word  # type: ignore[assignment]
            return cls(layer, kind, index if kind in _INDEXED else None)
        if m := _HOOK_RE.match(s):
            kind = _HOOK_KIND[m.group(2)]
            idx = int(m.group(3)) if m.group(3) is not None else index
            if kind in _INDEXED and idx is None:
                raise SiteError(f"{s}: hook {m.group(2)} needs a {_INDEXED[kind]} index, e.g. {s}[0]")
            return cls(int(m.group(1)), kind, idx if kind in _INDEXED else None)
        raise SiteError(f"cannot parse component {s!r}: expected e.g. L2.H3, L2.N17, L2.attn, L2.mlp, "
                        "L2.resid_post or a TransformerLens hook name such as blocks.2.hook_mlp_out")

    def check(self, n_layers: int, n_heads: int, n_neurons: int, what: str = "component") -> Site:
        """This site if it exists in a model of these sizes, else a one-line error naming ``what``."""
        if self.layer >= n_layers:
            raise SiteError(f"{what} {self.name}: layer {self.layer} out of range: the model has "
                            f"{n_layers} layers (0..{n_layers - 1})")
        limit = {"attn_head": n_heads, "mlp_neuron": n_neurons}.get(self.kind)
        if limit is not None and self.index is not None and self.index >= limit:
            unit = _INDEXED[self.kind]
            raise SiteError(f"{what} {self.name}: {unit} {self.index} out of range: the model has "
                            f"{limit} {unit}s per layer (0..{limit - 1})")
        return self


def head(layer: int, index: int) -> Site:
    """The site of head ``index`` in ``layer``."""
    return Site(layer, "attn_head", index)


def parse_sites(items: str | Iterable[Any]) -> list[Site]:
    """Sites from a comma-separated string or a list of names, ``[layer, head]`` pairs or Sites (sorted, unique).

    ``[2, 3]`` and the shorthand ``2.3`` mean head 3 of layer 2 (what old circuit files hold).

    Args:
        items: ``"L2.H3,L5.mlp"``, or a list of names, pairs and Sites.

    Returns:
        The sites, sorted by layer, kind and index, without repeats.

    Example:
        >>> [s.name for s in parse_sites("L5.mlp,2.3")]
        ['L2.H3', 'L5.mlp']
    """
    raw = [t for t in items.split(",")] if isinstance(items, str) else list(items)
    out: set[Site] = set()
    for item in raw:
        if isinstance(item, Site):
            out.add(item)
        elif isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item):
                raise SiteError(f"head entry {item!r}: expected [layer, head] with two integers")
            out.add(head(int(item[0]), int(item[1])))
        elif isinstance(item, str):
            text = item.strip()
            if not text:
                continue
            if re.fullmatch(r"\d+\.\d+", text):
                layer, idx = text.split(".")
                out.add(head(int(layer), int(idx)))
            else:
                out.add(Site.parse(text))
        else:
            raise SiteError(f"component entry {item!r}: expected a name such as L2.H3 or [layer, head]")
    return sorted(out)


def parse_heads(items: str | Iterable[Any]) -> list[Site]:
    """Heads only (``2.3``, ``L2.H3``, ``[2, 3]`` or ``blocks.2.attn.hook_z[3]``)."""
    sites = parse_sites(items)
    bad = [s.name for s in sites if s.kind != "attn_head"]
    if bad:
        raise SiteError(f"not attention heads: {', '.join(bad)}")
    if not sites:
        raise SiteError("the head list is empty")
    return sites


def parse_layers(spec: str | int | Sequence[int], n_layers: int | None = None, what: str = "layers") -> list[int]:
    """``"2,3,5"``, ``"2-5"``, ``[2, 3]`` -> sorted unique layer indices, checked against ``n_layers``.

    The one layer-list parser of the package: every command and API function uses it.
    A range is checked before it is expanded, so ``0-999999999`` fails at once.

    Args:
        spec: the layers as text, one index, or a sequence of indices.
        n_layers: the model's layer count, to check against (None: unchecked).
        what: the name used in error messages.

    Returns:
        Sorted, unique layer indices.

    Example:
        >>> parse_layers("2-4,7")
        [2, 3, 4, 7]
    """
    items: list[str]
    if isinstance(spec, bool):
        raise SiteError(f"{what}: expected layer indices, got {spec!r}")
    if isinstance(spec, int):
        items = [str(spec)]
    elif isinstance(spec, str):
        items = [t.strip() for t in spec.split(",") if t.strip()]
    else:
        items = []
        for v in spec:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SiteError(f"{what}: layer {v!r} is not an integer")
            items.append(str(v))
    layers: set[int] = set()
    for item in items:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if m is None:
            raise SiteError(f"{what} {item}: expected a layer index or a range like 2-5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SiteError(f"{what} {item}: empty range ({hi} < {lo})")
        if n_layers is not None and hi >= n_layers:
            raise SiteError(f"{what} {item}: layer {hi} out of range: the model has {n_layers} layers "
                            f"(0..{n_layers - 1})")
        if n_layers is None and hi - lo > 100_000:
            raise SiteError(f"{what} {item}: range too large")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise SiteError(f"{what}: the layer list is empty")
    return sorted(layers)
