"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2"; pkunlp-icler/FastV).

Before layer K (default 2), every span token is scored by the attention it receives
from the query token in layer K−1, averaged over heads; the top
``round(keep × span_len)`` span tokens and every token outside the span are kept
in original order, and layers K.. see only those (hidden states, masks, rotary
cos/sin: every token-carrying edge crossing the cut is gathered with the same
indices, so kept tokens keep their original positions).

Deviations from the official code, on purpose: tokens are chosen per sample
(the original uses batch 0 for the whole batch), and when attention is fused
(sdpa / ONNX Attention) only the needed softmax row is computed from q and k
(O(N) per head) instead of materializing the N×N matrix. Query default: the last
token for causal decoders, the CLS token for encoders with prefix tokens, else the
mean over all query rows (the FastV paper's "average attention received"). The query
token is never pruned (left out of the span; a span with the query strictly inside is
refused); without ``span`` a causal decoder keeps its first (attention-sink) and last
token (the official code prunes only the image tokens it is told about).

Shapes: hidden [B, N, C] -> [B, M, C] with M = prefix + k + suffix.
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Option, Score, TopK, register
from .selection import COMMON, SelectionPass


def resolve_query(query, facts, n: int) -> int | str:
    if query in (None, "", "auto"):
        if facts.causal:
            return n - 1
        return 0 if facts.prefix > 0 else "mean"
    if query == "cls":
        return 0
    if query == "last":
        return n - 1
    if query == "mean":
        return "mean"
    try:
        q = int(query)
    except (TypeError, ValueError):
        raise PruneError(f"query '{query}' is not auto|cls|last|mean|<index>") from None
    if not -n <= q < n:
        raise PruneError(f"query token {q} is outside the {n} tokens")
    return q % n


def attention_score(facts, score_layer: int, query) -> Score:
    """The scores of ``query``'s attention row in layer ``score_layer``. On a dynamic token count
    the last token's row is row -1 (whatever the length)."""
    site = facts.sites[score_layer]
    n = facts.tokens(score_layer)
    q = resolve_query(query, facts, n)
    from_end = query in (None, "", "auto", "last") or str(query).strip().startswith("-")
    if getattr(facts.graph, "dynamic_tokens", False) and q == n - 1 and from_end:
        q = -1
    return Score(site, q)


@register
class FastV(SelectionPass):
    name = "fastv"
    summary = "prune span tokens after layer K by the attention they receive in layer K-1"
    default_keep = 0.5
    default_layer = "2"
    options = COMMON + [
        Option("layer", str, None, "prune before this layer (0-based; default 2), scoring with layer-1's "
                                   "attention; a/b/c: a schedule"),
        Option("query", str, "auto", "auto|cls|last|mean|<index>: whose attention scores the tokens"),
    ]

    def narrow_span(self, facts, layer, start, end):
        """The query token is always kept: at an end of the span it is left out of it."""
        if layer >= facts.depth:
            return start, end
        q = resolve_query(self.query, facts, facts.tokens(layer - 1))
        if isinstance(q, str) or not start <= q < end:
            return start, end
        if q == end - 1:
            end -= 1
        elif q == start:
            start += 1
        else:
            raise PruneError(f"the query token {q} lies inside the span {start}:{end}; FastV keeps its query, "
                             f"so give a span that leaves it out")
        if start >= end:
            raise PruneError(f"the span holds only the query token {q}; nothing is left to prune")
        return start, end

    def reduction(self, model, facts, layer, k, start, end):
        if layer >= facts.depth:
            raise PruneError(f"layer {layer} is out of range: FastV prunes before a layer "
                             f"(valid: 1..{facts.depth - 1})")
        return TopK(k, start, end, score=attention_score(facts, layer - 1, self.query))
