"""Pass registry, options and the Plan that rewrite passes hand to the backends.

A Plan holds a cut. A :class:`Cut` says: before layer ``layer``, score the
tokens (:class:`Score`), select the kept indices [B, M] (:class:`TopK`), and gather
every token-carrying edge that crosses the cut with those indices; shape literals
after the cut that spell the old token count N are rewritten to M.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import PruneError
from ..ir.graph import Node, Value
from .analysis.attention import AttentionSite

REGISTRY: dict[str, type["Pass"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Option:
    name: str
    type: Any
    default: Any
    help: str


class Pass:
    """A named rewrite. Subclasses declare ``options`` and implement :meth:`plan`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[list[Option]] = []

    def __init__(self, **kwargs):
        known = {o.name: o for o in self.options}
        for key in kwargs:
            if key not in known:
                raise PruneError(f"pass '{self.name}' has no option '{key}' (options: {', '.join(known)})")
        for o in self.options:
            setattr(self, o.name, kwargs.get(o.name, o.default))

    def plan(self, model) -> "Plan":
        raise NotImplementedError

    def __call__(self, model):
        return self.apply(model)

    def apply(self, model):
        """Pure: returns a new model; ``model`` is untouched."""
        plan = self.plan(model)
        return model.lower(plan)

    def __repr__(self) -> str:
        opts = ", ".join(f"{o.name}={getattr(self, o.name)!r}" for o in self.options)
        return f"{type(self).__name__}({opts})"


def keep_count(keep: float, span_len: int) -> int:
    """Number of span tokens kept: ``round(keep * span_len)`` (FastV), at least 1."""
    return max(1, min(span_len, int(round(keep * span_len))))


@dataclass
class Score:
    """Attention received by each token from ``query`` (row index or "mean") in ``site``.
    Lowers to [B, N] scores."""

    site: AttentionSite
    query: Any


@dataclass
class TopK:
    """Keep ``k`` span tokens [span_start, span_end) by score plus every token outside."""

    k: int
    span_start: int
    span_end: int


@dataclass
class Crossing:
    value: Value
    token_axes: list[int]
    batch_axis: int


@dataclass
class ShapeFix:
    node: Node
    positions: list[int]  # entries of the node's size operand that spell N


@dataclass
class Cut:
    layer: int
    stream: Value
    score: Score
    select: TopK
    num_tokens: int
    post: set = field(default_factory=set)  # nodes after the cut
    crossings: list[Crossing] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    output_axes: dict = field(default_factory=dict)  # graph output name -> token axes
    tag: str = "prunec"

    @property
    def kept(self) -> int:
        return self.select.k + self.select.span_start + (self.num_tokens - self.select.span_end)


@dataclass
class Plan:
    """Token ops to insert. A plan names nodes of the graph it was planned on, so it holds one
    cut: a schedule of several cuts is several passes (each re-analyses the rewritten graph)."""

    cuts: list[Cut]

    def check_single_cut(self) -> None:
        if len(self.cuts) != 1:
            raise PruneError(f"a plan lowers exactly one cut (got {len(self.cuts)}); apply cuts as separate passes")
