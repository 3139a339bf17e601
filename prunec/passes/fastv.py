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
mean over all query rows (the FastV paper's "average attention received").

Shapes: hidden [B, N, C] -> [B, M, C] with M = prefix + k + suffix.
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Option, Pass, Plan, Score, TopK, keep_count, register
from .cut import plan_cut


def parse_span(span, n: int, prefix: int) -> tuple[int, int]:
    if span is None or span == "":
        return prefix, n
    if isinstance(span, str):
        try:
            a, b = span.split(":")
            start, end = int(a) if a else 0, int(b) if b else n
        except ValueError:
            raise PruneError(f"span '{span}' is not START:END") from None
    else:
        start, end = span
    if not 0 <= start < end <= n:
        raise PruneError(f"span {start}:{end} is outside the {n} tokens of the model")
    return start, end


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


@register
class FastV(Pass):
    name = "fastv"
    summary = "prune span tokens after layer K by the attention they receive in layer K-1"
    options = [
        Option("keep", float, 0.5, "fraction of span tokens kept, in (0, 1]"),
        Option("layer", int, 2, "prune before this layer (0-based), scoring with layer-1's attention"),
        Option("span", str, None, "START:END range of the tokens entering the layer that may be pruned "
                                  "(default: all but prefix tokens)"),
        Option("query", str, "auto", "auto|cls|last|mean|<index>: whose attention scores the tokens"),
    ]

    def plan(self, model) -> Plan:
        keep = float(self.keep)
        if not 0.0 < keep <= 1.0:
            raise PruneError(f"keep must be in (0, 1], got {self.keep}")
        facts = model.facts()
        layer = int(self.layer)
        if not 1 <= layer < facts.depth:
            raise PruneError(f"layer {layer} is out of range: the model has {facts.depth} attention layers "
                             f"(valid: 1..{facts.depth - 1})")
        n = facts.tokens(layer)
        start, end = parse_span(self.span, n, facts.prefix)
        k = keep_count(keep, end - start)
        site = facts.sites[layer - 1]
        if site.kind == "packed":
            raise PruneError(f"attention node '{site.node.name}' packs q/k inside a com.microsoft.Attention "
                             f"op; FastV cannot score it")
        score = Score(site, resolve_query(self.query, facts, facts.tokens(layer - 1)))
        return Plan([plan_cut(facts, layer, score, TopK(k, start, end), tag=f"fastv_l{layer}")])
