"""Shared machinery of the token-selection passes: keep ratio or count, the cut
(a layer, a schedule of layers, or the encoder output), the span, and schedules.

Options common to every selection pass:

* ``keep``: fraction of the span kept, in (0, 1]; ``a/b/c`` gives one per scheduled layer.
* ``count``: absolute number of span tokens kept (instead of ``keep``).
* ``layer``: where to cut: ``K`` (before layer K, 0-based), ``output`` (after the last
  block, where the tokens leave the encoder), or a schedule ``3/6/9``.
* ``span``: ``START:END`` of the tokens entering the cut that may be pruned; an end left out
  is the first / last token, a negative end counts from the cut's token count N as in Python
  (``1:-8``: all but the first and the last 8 tokens) (default: all
  but the prefix tokens; on a causal decoder also never the first token, the attention
  sink, nor the last, which predicts the next token). After a cut, the next cut's span is
  the kept part of it. ``token:ID`` (a graph with a dynamic sequence and an ``input_ids``
  input): each sample's span is where its input ids equal ID (LLaVA's image placeholder),
  within the default span, found at run time; each sample keeps its own k of its span, and
  the batch keeps the largest kept count (a sample with a shorter span keeps more of it).
"""
from __future__ import annotations

import dataclasses

from ..errors import PruneError
from .base import CountRule, Option, Pass, Plan, PlannedFacts, keep_count
from .cut import plan_cut

COMMON = [
    Option("keep", str, None, "fraction of span tokens kept, in (0, 1] (a/b/c: one per scheduled layer)"),
    Option("count", int, None, "absolute number of span tokens kept (instead of keep)"),
    Option("span", str, None, "START:END of the tokens entering the cut that may be pruned; negative ends "
                              "count from the token count N and either end may be left out (1:-8, 1:, -64:) "
                              "(default: all but prefix tokens); token:ID: each sample's tokens whose input id "
                              "is ID (an image placeholder), found at run time"),
]


def span_bounds(span: str) -> tuple[int | None, int | None]:
    """'START:END' -> (start, end), either None when left out and either negative to count
    from the end (resolved against the cut's token count by :func:`parse_span`); ``token:ID``
    -> (None, None) (each sample's span is found in its ids, see :func:`_token_span`). Refuses
    text that is not two integers, and a range reversed or empty at every length (both
    ends of one sign); a mixed-sign range can only be checked once resolved."""
    if str(span).strip().startswith("token:"):  # token:ID: checked where the graph is known (_token_span)
        return None, None
    parts = str(span).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise PruneError(f"span '{span}' is not START:END with integer ends (e.g. 1:197, 1:-8 or 1:)") from None
    if start is not None and end is not None and (start < 0) == (end < 0) and start >= end:
        raise PruneError(f"span {start}:{end} is {'empty' if start == end else 'reversed'}: START must be below END")
    return start, end


def parse_span(span, n: int, prefix: int, causal: bool = False) -> tuple[int, int]:
    """[start, end) of the prunable tokens among ``n``; the default is every token after the
    ``prefix``, and for a ``causal`` decoder neither the first nor the last token. A negative
    end counts from ``n`` as a Python slice bound does (``1:-8`` on 24 tokens is 1:16); an end
    beyond the ``n`` tokens either way is refused, not clipped."""
    if span is None or span == "":
        if not causal:
            return prefix, n
        start, end = max(prefix, 1), n - 1
        if start >= end:
            raise PruneError(f"a decoder's {n} tokens leave nothing to prune between its first and last token")
        return start, end
    if isinstance(span, str):
        a, b = span_bounds(span)
        text = span
    else:
        a, b = span
        text = f"{a}:{b}"
    for end_ in (a, b):
        if end_ is not None and not -n <= end_ <= n:
            raise PruneError(f"span {text} is outside the {n} tokens of the model")
    start = 0 if a is None else a + n if a < 0 else a
    end = n if b is None else b + n if b < 0 else b
    if start >= end:
        what = "empty" if start == end else "reversed"
        resolved = "" if text == f"{start}:{end}" else f" (resolved on the {n} tokens at the cut)"
        raise PruneError(f"span {text} is {start}:{end}{resolved}, which is {what}: START must be below END")
    return start, end


def span_rule(span, prefix: int, causal: bool) -> tuple[tuple[int, bool], tuple[int, bool]]:
    """The ends of a span as (offset, counted from the end) pairs, which :func:`parse_span`
    resolves at any token count N: the default span is ``prefix:`` (a decoder: ``max(prefix, 1):-1``);
    ``1:-8`` is (1, False), (8, True); an end left out is the first / last token."""
    if span is None or span == "":
        return ((max(prefix, 1), False), (1, True)) if causal else ((prefix, False), (0, True))
    a, b = span_bounds(span) if isinstance(span, str) else span
    start = (0, False) if a is None else (-a, True) if a < 0 else (a, False)
    end = (0, True) if b is None else (-b, True) if b < 0 else (b, False)
    return start, end


def count_rule(span, n: int, prefix: int, causal: bool, narrowed: tuple[int, int], keep, count) -> CountRule:
    """The :class:`CountRule` of a selection on a dynamic token count: the span's ends as
    :func:`span_rule` reads them, moved as the pass narrowed them at the probe's ``n`` tokens
    (FastV leaving its query out)."""
    (s_off, s_end), (e_off, e_end) = span_rule(span, prefix, causal)
    s0, e0 = parse_span(span, n, prefix, causal)
    ds, de = narrowed[0] - s0, narrowed[1] - e0
    rule = CountRule(s_off - ds if s_end else s_off + ds, s_end, e_off - de if e_end else e_off + de, e_end,
                     keep=keep, count=None if count is None else int(count))
    return rule


def _token_span(span, graph, dynamic: bool) -> tuple[int | None, str | None]:
    """``token:ID`` -> (ID, the name of the graph's input ids [B, S]); (None, None) for other spans."""
    if not isinstance(span, str) or not span.strip().startswith("token:"):
        return None, None
    try:
        token_id = int(span.split(":", 1)[1])
    except ValueError:
        raise PruneError(f"span '{span}' is not token:ID with an integer token id (e.g. token:32000)") from None
    if not dynamic:
        raise PruneError(f"span '{span}' needs a model whose sequence length is dynamic (the span is found in "
                         f"each sample's ids at run time); give START:END for a fixed length")
    ids = [v for v in graph.inputs if v.name == "input_ids" and v.shape is not None and len(v.shape) == 2]
    if not ids:
        raise PruneError(f"span '{span}' reads the ids of the model's 'input_ids' input [B, S]; this model has none")
    return token_id, ids[0].name


class SelectionPass(Pass):
    """Subclasses implement :meth:`reduction` (a Select for one cut) and set defaults."""

    default_keep = 0.5
    default_layer = "output"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if getattr(self, "keep", None) is None:
            self.keep = self.default_keep
        if getattr(self, "layer", None) is None:
            self.layer = self.default_layer

    def reduction(self, model, facts, layer: int, k: int, start: int, end: int):
        raise NotImplementedError

    def narrow_span(self, facts, layer: int, start: int, end: int) -> tuple[int, int]:
        """The span a pass actually prunes (FastV leaves its query token out)."""
        return start, end

    def schedule(self, depth: int) -> list[tuple[int, float | None]]:
        """[(cut layer, keep)], ascending; ``depth`` means the encoder output."""
        spec = str(self.layer)
        layers = []
        for part in spec.split("/"):
            part = part.strip()
            if part in ("output", "out", "end"):
                layers.append(depth)
                continue
            try:
                layers.append(int(part))
            except ValueError:
                raise PruneError(f"layer '{spec}' is not an integer, 'output' or a schedule like 3/6/9") from None
        for layer in layers:
            if not 1 <= layer <= depth:
                raise PruneError(f"layer {layer} is out of range: the model has {depth} attention layers "
                                 f"(valid: 1..{depth - 1}, or 'output')")
        if layers != sorted(set(layers)):
            raise PruneError(f"schedule '{spec}' must list distinct layers in increasing order")
        if self.count is not None:
            if int(self.count) < 1:
                raise PruneError(f"count must be at least 1, got {self.count}")
            return [(layer, None) for layer in layers]
        keeps = [k for k in str(self.keep).split("/")]
        if len(keeps) == 1:
            keeps = keeps * len(layers)
        if len(keeps) != len(layers):
            raise PruneError(f"{len(keeps)} keep values for {len(layers)} scheduled layers")
        out = []
        for layer, kv in zip(layers, keeps):
            try:
                keep = float(kv)
            except ValueError:
                raise PruneError(f"keep '{kv}' is not a number") from None
            if not 0.0 < keep <= 1.0:
                raise PruneError(f"keep must be in (0, 1], got {kv}")
            out.append((layer, keep))
        return out

    def _plan_one(self, model, facts: PlannedFacts, layer: int, keep: float | None, span):
        """The cut at ``layer`` after the cuts already planned in ``facts``."""
        stream = facts.stream_at(layer)
        n = facts.count_at(stream)
        dynamic = getattr(facts.graph, "dynamic_tokens", False)
        token_id, ids = _token_span(span, facts.graph, dynamic)
        if token_id is not None:
            span = None  # the default span bounds the ID tokens
        try:
            start, end = self.narrow_span(facts, layer, *parse_span(span, n, facts.prefix, facts.causal))
        except PruneError as e:
            if dynamic and "outside the" in str(e):
                raise PruneError(f"{e} (its sequence is dynamic and was analysed at {n} tokens: analyse it past the "
                                 f"span's end: --probe-length / load(probe_length=) for ONNX, a longer example "
                                 f"input for a torch module)") from None
            raise
        if keep is None:
            if int(self.count) > end - start and not dynamic:
                raise PruneError(f"count {self.count} exceeds the {end - start} tokens of the span")
            k = min(int(self.count), end - start)
        else:
            k = keep_count(keep, end - start)
        red = self.reduction(model, facts, layer, k, start, end)
        if dynamic and hasattr(red, "rule"):
            if isinstance(span, tuple):
                raise PruneError("a schedule of cuts with a span on a model whose sequence length is dynamic is not "
                                 "supported yet: cut once, or fix the length with --shape NAME=?,N")
            red.rule = count_rule(span, n, facts.prefix, facts.causal, (start, end), keep,
                                  self.count if keep is None else None)
            assert red.rule.resolve(n) == (start, end, k), (red.rule, start, end, k)
            if token_id is not None:
                red.rule = dataclasses.replace(red.rule, token_id=token_id)
        cut = plan_cut(facts, layer, red, tag=self.cut_tag(layer, facts.depth),
                       recover=self.recover, recover_at=self.recover_at)
        cut.ids = ids
        return cut

    def cut_tag(self, layer: int, depth: int) -> str:
        """Name of a cut (and prefix of its graph values): ``fastv_l2``, ``divprune_out``."""
        return f"{self.name.replace('-', '_')}_" + (f"l{layer}" if layer < depth else "out")

    def plan(self, model, facts: PlannedFacts | None = None) -> Plan:
        """One cut per scheduled layer, all planned on one analysis of ``model``: after a cut, the
        next cut's span is the kept part of it."""
        facts = self.planned_facts(model, facts)
        span, cuts = self.span, []
        for layer, keep in self.schedule(facts.depth):
            cut = self._plan_one(model, facts, layer, keep, span)
            red = cut.reduce
            if span is not None and hasattr(red, "k") and cut.ids is None:
                span = (red.span_start, red.span_start + red.k)
            cuts.append(cut)
            facts = facts.after(cut)
        return Plan(cuts)
