"""Pass registry, options and the Plan that rewrite passes hand to the backends.

Reductions: selections (``Select`` subclasses: kept indices), ``GridPool``, and merges
(``Merge`` subclasses: every token goes to an output slot, weighted).

A Plan holds every cut of a pass, in graph order, all planned on one analysis of one
graph. A :class:`Cut` says: before layer ``layer``, score the tokens (:class:`Score`),
select the kept indices [B, M] (:class:`TopK`), and gather every token-carrying edge that
crosses the cut with those indices; shape literals after the cut that spell the graph's
token count N are rewritten to M. A cut after another one in the same plan names it as
``parent``: its tokens are the parent's kept tokens (``num_tokens`` = the parent's M), its
token sizes the parent's, and where both cuts fix the same node the later one wins.
"""
from __future__ import annotations

import copy
import math

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..errors import PruneError
from ..ir.graph import Node, Value
from .analysis.attention import AttentionSite
from .analysis.blocks import LOGSIZE_TAG

REGISTRY: dict[str, type["Pass"]] = {}
RECOVER_MODES = ("auto", "none", "copy", "unmerge", "attn")


def register(cls):
    """Register a reduction pass; every one also takes the recovery options."""
    names = {o.name for o in cls.options}
    extra = [o for o in RECOVER_OPTIONS if o.name not in names]
    cls.options = list(cls.options) + extra
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Option:
    name: str
    type: Any
    default: Any
    help: str


RECOVER_OPTIONS = [
    Option("recover", str, "auto", "restore the full token count where the graph needs it: auto (before a grid "
                                   "reshape or token mixing), none, or copy|unmerge|attn (also for token outputs)"),
    Option("recover_at", int, None, "restore the full token count before this layer instead of at the output"),
]


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

    def plan(self, model, facts: "PlannedFacts | None" = None) -> "Plan":
        """The pass's cuts on ``model``; with ``facts`` (the analysis as the cuts of passes before
        this one in a pipeline leave it), after those cuts."""
        raise NotImplementedError

    def planned_facts(self, model, facts: "PlannedFacts | None") -> "PlannedFacts":
        return facts if facts is not None else PlannedFacts(model.facts())

    def __call__(self, model):
        return self.apply(model)

    def apply(self, model):
        """Pure: returns a new model (one lowering of every cut the pass plans, checked once);
        ``model`` is untouched. A plan without cuts gives an unchanged copy."""
        model._check_not_exposed()
        plan = self.plan(model)
        return model.lower(plan) if plan.cuts else model.copy()

    def __repr__(self) -> str:
        opts = ", ".join(f"{o.name}={getattr(self, o.name)!r}" for o in self.options)
        return f"{type(self).__name__}({opts})"


def flag(value) -> bool:
    """A boolean option: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


flag.__name__ = "bool"


def keep_count(keep: float, span_len: int) -> int:
    """Number of span tokens kept: ``round(keep * span_len)`` (FastV), at least 1."""
    return max(1, min(span_len, int(round(keep * span_len))))


@dataclass
class Score:
    """Attention received by each token from ``query`` (row index or "mean") in ``site``.
    Lowers to [B, N] scores."""

    site: AttentionSite
    query: Any


@dataclass(frozen=True)
class CountRule:
    """How a selection's counts follow the token count N at run time, in a graph whose sequence
    is dynamic: the span is [start, end) with each end counted from the first token, or from N
    when ``*_from_end`` (``end=1, end_from_end=True`` is N - 1), clipped to [0, N]; the span
    length L = end - start; k = ``count`` capped at L, or max(1, min(L, round(keep · L)))."""

    start: int
    start_from_end: bool
    end: int
    end_from_end: bool
    keep: float | None = None
    count: int | None = None
    token_id: int | None = None  # span=token:ID: each sample's span is where its input ids equal ID, within the ends

    def resolve(self, n: int) -> tuple[int, int, int]:
        """(start, end, k) at ``n`` tokens (what the graph computes at run time)."""
        start = min(max(n - self.start if self.start_from_end else self.start, 0), n)
        end = min(max(n - self.end if self.end_from_end else self.end, start), n)
        span = end - start
        k = min(self.count, span) if self.count is not None else keep_count(self.keep, span) if span else 0
        return start, end, k


@dataclass
class Select:
    """Keep ``k`` tokens of the span [span_start, span_end) plus every token outside it,
    in original order: kept indices [B, M]. ``rule``: a :class:`CountRule` when the graph's
    token count is dynamic (these numbers are then those at the probe's length)."""

    k: int
    span_start: int
    span_end: int
    rule: CountRule | None = None

    def kept(self, n: int) -> int:
        """Tokens kept out of ``n``: the planned counts, or (a dynamic token count) what the
        :class:`CountRule` resolves to at ``n``."""
        if self.rule is not None:
            start, end, k = self.rule.resolve(n)
            return start + k + (n - end)
        return self.k + self.span_start + (n - self.span_end)


@dataclass
class TopK(Select):
    """The top-k span tokens by an attention score."""

    score: Score | None = None


@dataclass
class Diverse(Select):
    """DivPrune's greedy max-min cosine-distance selection over ``features`` [B, N, C]."""

    features: Value | None = None


@dataclass
class PageRank(Select):
    """Zero-TPrune: weighted PageRank over ``site``'s attention graph, similarity pruning on its
    keys (``drop_similar`` tokens), then the top-k by importance."""

    site: AttentionSite | None = None
    iters: int = 5
    drop_similar: int = 0
    cls: int | None = None
    similar: float = 0.0  # the share of the pruned tokens the S-stage drops (``drop_similar`` at run time)


@dataclass
class Random(Select):
    """A seeded pseudo-random choice (the same for every sample)."""

    seed: int = 0


@dataclass
class GridPool:
    """Average-pool the [height × width] patch grid that starts at token ``prefix`` by
    ``factor``; the tokens before and after the grid are kept."""

    prefix: int
    height: int
    width: int
    factor: int
    num_tokens: int = 0

    @property
    def fh(self) -> int:
        """Window height (1 for a 1-D grid of one row)."""
        return self.factor if self.height > 1 else 1

    @property
    def fw(self) -> int:
        return self.factor if self.width > 1 else 1

    def kept(self, n: int) -> int:
        return n - self.height * self.width + (self.height // self.fh) * (self.width // self.fw)

    def dest(self) -> list[int]:
        """Per input token, its output slot (the window it was pooled into)."""
        fh, fw, w, end = self.fh, self.fw, self.width, self.prefix + self.height * self.width
        grid = [self.prefix + (i // fh) * (w // fw) + j // fw for i in range(self.height) for j in range(w)]
        m = self.prefix + (self.height // fh) * (w // fw)
        return list(range(self.prefix)) + grid + list(range(m, m + self.num_tokens - end))

    def representatives(self) -> list[int]:
        """Per output token, the token whose side inputs (masks, positions) it takes: tokens
        outside the grid themselves, each pooled token its window's first (top-left) token."""
        fh, fw, w, end = self.fh, self.fw, self.width, self.prefix + self.height * self.width
        firsts = [self.prefix + (i * fh) * w + j * fw for i in range(self.height // fh) for j in range(w // fw)]
        return list(range(self.prefix)) + firsts + list(range(end, self.num_tokens))


@dataclass(kw_only=True)
class Merge:
    """A merging reduction. Each of the N input tokens goes to one of M output slots
    (``dest`` [B, N]; slot M means dropped) with a weight [B, N]; slot j becomes
    Σ w·x / Σ w over its sources (``normalize``) or Σ w·x. ``rep`` [B, M] names, per slot,
    the source token whose side inputs (masks, positions) it takes. Token sizes (how many
    input tokens a slot stands for) are summed the same way when ``track_size`` or when an
    earlier merge left sizes; ``prop_attn`` adds log(size) to later attention logits."""

    site: AttentionSite
    prefix: int
    track_size: bool = False
    prop_attn: bool = False
    normalize: bool = True
    dynamic: bool = False  # the token count is dynamic: the lowering computes N, the counts and M at run time


@dataclass(kw_only=True)
class Bipartite(Merge):
    """ToMe's bipartite soft matching on ``site``'s keys averaged over heads: the ``r`` most
    similar (even -> odd) token pairs merge by size-weighted average; the first ``prefix``
    tokens never merge. Output in ToMe's order. ``r`` is capped at half the mergeable tokens,
    (N − prefix) // 2 (at run time on a dynamic token count)."""

    r: int

    def kept(self, n: int) -> int:
        return n - min(self.r, (n - self.prefix) // 2)


@dataclass(kw_only=True)
class Fuse(Merge):
    """EViT: keep the ``k`` non-prefix tokens the CLS token attends to most in ``site``; fuse the
    rest into one token, weighted by that attention."""

    k: int
    fuse: bool = True  # False: the rest is dropped (EViT without --fuse_token)
    keep: float | None = None  # a dynamic token count: k follows N at run time (:meth:`count`)

    def count(self, n: int) -> int:
        """k at ``n`` tokens: the planned k, or (dynamic) max(1, ceil(keep · (N − prefix))), at most
        N − prefix."""
        if self.keep is None:
            return self.k
        return min(max(1, math.ceil(self.keep * (n - self.prefix))), n - self.prefix)

    def kept(self, n: int) -> int:
        k = self.count(n)
        return self.prefix + k + (1 if self.fuse and n - self.prefix > k else 0)


@dataclass(kw_only=True)
class Contextual(Merge):
    """VisionZip: ``dominant`` tokens (prefix included) by CLS attention in ``site``, plus
    ``contextual`` tokens made by merging the rest into uniformly spaced anchors by key
    similarity."""

    dominant: int
    contextual: int

    def counts(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) tokens made from ``n`` tokens: the dominant capped at N, and as
        many contextual targets as the stride max(1, R // contextual) finds among the R rest."""
        d = min(self.dominant, n)
        rest = n - d
        if not (self.contextual and rest):
            return d, 0
        return d, len(range(0, rest, max(1, rest // self.contextual))[:self.contextual])

    def kept(self, n: int) -> int:
        return sum(self.counts(n))


@dataclass(kw_only=True)
class Adaptive(Merge):
    """PPT: per sample, prune ``r`` tokens by importance (CLS attention) when the variance of the
    importance scores exceeds ``threshold``, else merge ``r`` pairs as ToMe does."""

    r: int
    threshold: float

    def kept(self, n: int) -> int:
        return n - min(self.r, (n - self.prefix) // 2)  # r capped as ToMe's (at run time when dynamic)


@dataclass
class Crossing:
    value: Value
    token_axes: list[int]
    batch_axis: int
    role: str | None = None  # a token-size tensor (prunec_size/logsize/meanw): recomputed, not gathered
    key_axes: list[int] = field(default_factory=list)  # token axes over a KV cache and the new tokens


@dataclass
class Recovery:
    """Restore the tokens' length and order at ``point`` (a token tensor after the cut whose
    consumers need every token): ``copy`` (kept tokens back to their positions, the others keep
    their value at the cut), ``unmerge`` (every token takes its merged token's value) or
    ``attn`` (each token at the cut attends over the reduced tokens)."""

    point: Value
    mode: str


@dataclass
class Reweigh:
    """A mean or sum over the token axis after the cut: its input is multiplied by size (sum) or
    size / mean(size) (mean) so it counts every token a merged token stands for."""

    node: Node
    role: str  # SIZE_TAG or MEANW_TAG


@dataclass
class ShapeFix:
    node: Node
    positions: list[int]  # entries of the node's size operand that spell N
    key_positions: list[int] = field(default_factory=list)  # those spelling past + N in a decoder with a KV cache


@dataclass
class CountFix:
    """A number equal to the token count N that scales a reduction over the tokens after the cut
    (``x.sum(1) / x.shape[1]`` exported as ``/ N``): operand ``slot`` of ``node`` (an fx argument
    position, an ONNX input index) becomes ``value`` (M, or 1/M for a multiplication by 1/N)."""

    node: Node
    slot: int
    value: float


@dataclass
class LengthMask:
    """A sequence-lengths mask read after the cut by an ORT contrib attention (``mask_index`` /
    ``key_padding_mask`` [B]: valid keys are [0, len); or [2B]: [start, end)). It counts positions
    of the uncut sequence, so the lowering replaces it with the 0/1 mask [B, M] of the kept
    tokens (a kept token is valid when its original position is)."""

    node: Node
    input_index: int
    value: Value
    kind: str = "mask"  # "mask": a 0/1 mask [B, M]; "seqlens": GroupQueryAttention's valid lengths − 1 [B]; "total": M


@dataclass
class Cut:
    layer: int
    stream: Value
    reduce: Any  # a Select subclass or GridPool
    num_tokens: int
    post: set = field(default_factory=set)  # nodes after the cut
    crossings: list[Crossing] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    output_axes: dict = field(default_factory=dict)  # graph output name -> token axes
    tag: str = "prunec"
    size_in: Value | None = None  # token sizes [B, N, 1] entering the cut, left by an earlier merge
    bias_sites: list = field(default_factory=list)  # later sites that get log(size) added to their logits
    reweigh: list = field(default_factory=list)  # Reweigh: token means/sums after the cut
    count_fixes: list = field(default_factory=list)  # CountFix: numbers spelling N that scale token sums
    recovery: Recovery | None = None
    length_masks: list = field(default_factory=list)  # LengthMask: rewritten to 0/1 masks of the kept tokens
    parent: "Cut | None" = None  # the earlier cut of the same plan whose kept tokens enter this one
    graph_tokens: int = 0  # the token count the analysed graph spells at the cut (literals that read N)
    past: str | None = None  # a decoder's KV-cache input read after the cut: its length is the layers' past
    padding: str | None = None  # the attention mask input [B, past + S]: a decoder's cache keeps padding
    pad_last: bool = False  # an encoder's padding: ranked last, k counted per row on its real tokens
    ids: str | None = None  # span=token:ID: the input ids [B, S] whose ID tokens make each sample's span

    def __post_init__(self):
        if not self.graph_tokens:
            self.graph_tokens = self.num_tokens

    @property
    def sizes_in(self) -> bool:
        """Whether token sizes enter the cut: left by a merge of an earlier pass (``size_in``, a
        graph value) or by the parent cut of this plan."""
        return self.size_in is not None or (self.parent is not None and self.parent.sizes_out)

    @property
    def sizes_out(self) -> bool:
        """Whether the cut produces token sizes (a merge that tracks them, or sizes entering)."""
        return self.sizes_in or getattr(self.reduce, "track_size", False)

    def ancestors(self) -> list["Cut"]:
        """The chain of parent cuts, nearest first."""
        out, c = [], self.parent
        while c is not None:
            out.append(c)
            c = c.parent
        return out

    def size_roles(self) -> set[str]:
        """The size tensors the lowering must build after the cut: those crossing it, the
        log-size bias of ``bias_sites`` and the weights of ``reweigh`` (role tags of
        ``analysis.blocks``)."""
        roles = {c.role for c in self.crossings if c.role is not None} | {rw.role for rw in self.reweigh}
        return roles | ({LOGSIZE_TAG} if self.bias_sites else set())

    @property
    def kept(self) -> int:
        return self.reduce.kept(self.num_tokens)

    @property
    def dynamic(self) -> bool:
        """Whether the cut's counts follow the token count at run time."""
        return getattr(self.reduce, "rule", None) is not None or getattr(self.reduce, "dynamic", False)

    @property
    def reduces(self) -> bool:
        """Whether the cut removes tokens: at its planned count, or (a dynamic token count, planned at
        the probe's length) at a longer input (a VisionZip with more dominant tokens than the probe has
        reduces nothing there, but does on longer inputs)."""
        if self.kept < self.num_tokens:
            return True
        if getattr(getattr(self.reduce, "rule", None), "token_id", None) is not None:
            return True  # the span is found in the ids at run time (the probe's ids hold none of it)
        longer = 64 * max(self.num_tokens, 64)
        return self.dynamic and self.reduce.kept(longer) < longer


@dataclass
class Plan:
    """Token ops to insert: every cut of a pass, in graph order. The cuts name nodes of the one
    graph they were planned on (see :class:`PlannedFacts`); the backends lower them in one go."""

    cuts: list[Cut]

    def identity(self) -> "Plan | None":
        """The same cuts reducing nothing (keep=1, r=0; spans, crossings, fixes and recoveries
        unchanged), whose lowering must compute what the graph it was planned on computes: validation
        compares the two at shapes other than the probe's. None where that does not hold or cannot be
        said: a cut with counts fixed at the probe's length (a static token count), an attention
        recovery (its tokens attend over the kept ones: not the identity), ToMe's and PPT's matching
        (at r=0 their output is the tokens in ToMe's A/B order, a permutation)."""
        if not all(c.dynamic and not isinstance(c.reduce, (Bipartite, Adaptive)) for c in self.cuts) \
                or any(c.recovery and c.recovery.mode == "attn" for c in self.cuts):
            return None
        copies: dict[int, Cut] = {}
        for c in self.cuts:
            new = copy.copy(c)
            new.reduce = _reducing_nothing(c.reduce)
            new.parent = copies[id(c.parent)] if c.parent is not None else None
            copies[id(c)] = new
        return Plan(list(copies.values()))


def _reducing_nothing(r):
    """A dynamic selection, EViT or VisionZip at keep=1: every token kept, in order."""
    if getattr(r, "rule", None) is not None:
        return replace(r, rule=replace(r.rule, keep=1.0, count=None))
    if isinstance(r, Fuse):
        return replace(r, keep=1.0)
    if isinstance(r, Contextual):
        return replace(r, dominant=1 << 30, contextual=0)
    raise PruneError(f"no identity for {type(r).__name__}")


class PlannedFacts:
    """The analysis facts of a graph as the cuts planned so far leave it: the graph is not
    rewritten, so every fact is the analysis' own, except the token count entering a layer,
    which is the kept count of the latest planned cut before it (the token class changes at a
    cut). Attributes not defined here are the wrapped facts'."""

    def __init__(self, facts, cuts: tuple = ()):
        self.facts = facts
        self.cuts = tuple(cuts)

    def __getattr__(self, name):
        return getattr(self.facts, name)

    def after(self, cut: Cut) -> "PlannedFacts":
        """These facts with ``cut`` planned too."""
        return PlannedFacts(self.facts, self.cuts + (cut,))

    def parent_of(self, value: Value) -> Cut | None:
        """The latest planned cut whose reduced tokens reach ``value`` (its producer is after that
        cut and before any point where the cut restores the tokens), or None."""
        for cut in reversed(self.cuts):
            if cut.recovery is not None and cut.recovery.point is value:
                continue  # its consumers read the tokens the cut restores there
            if value.producer is not None and value.producer in cut.post:
                return cut
        return None

    def count_at(self, value: Value) -> int:
        """Tokens carried by the token tensor ``value`` [B, N, ...] once the planned cuts are applied."""
        parent = self.parent_of(value)
        return parent.kept if parent is not None else value.shape[1]

    def tokens(self, layer: int = 0) -> int:
        """Tokens entering ``layer`` (what its attention sees) once the planned cuts are applied:
        a cut before ``layer`` reduces them to its kept count."""
        stream = self.facts.streams[layer]
        at = [c for c in self.cuts if c.stream is stream]
        return at[-1].kept if at else self.count_at(stream)
