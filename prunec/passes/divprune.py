"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning"; vbdi/divprune).

At the cut (default: the encoder output, where the official code prunes visual tokens
before the LLM), the kept span subset is chosen by the greedy max-min diversity rule on
the cosine distance D = 1 − cos of the token features [B, N, C] at the cut: the first
pick is the token farthest from its nearest other token, then repeatedly the token
farthest from the chosen set (its min distance to it); the kept set is restored to
original order. Deterministic (ties to the lowest index). Paper default retained ratio
0.098. Deviation: the official code takes the second-smallest distance of a column for
the first pick (the smallest being the token itself); prunec excludes the diagonal
explicitly, which is the same unless two tokens coincide. Per sample for batch > 1.

Cost: O(S²·C) for the distances plus k greedy steps of O(S) per sample (a Loop in ONNX).
"""
from __future__ import annotations

from .base import Diverse, Option, register
from .selection import COMMON, SelectionPass


@register
class DivPrune(SelectionPass):
    name = "divprune"
    summary = "keep a diverse subset: greedy max-min cosine distance (DivPrune)"
    default_keep = 0.098
    default_layer = "output"
    options = COMMON + [
        Option("layer", str, None, "cut: 'output' (default), K (before layer K) or a/b/c"),
    ]

    def reduction(self, model, facts, layer, k, start, end):
        stream = facts.stream_at(layer)
        return Diverse(k, start, end, features=stream)
