"""Random token selection: the baseline token-pruning papers compare against.

Keeps ``k`` span tokens chosen by a seeded pseudo-random order: the k positions with the largest
``schedules.position_hash`` (a hash of the position and the seed that does not depend on the
token count, so a graph with a dynamic sequence computes it at run time). Deviation, on purpose:
the order is the same for every sample (computed at compile time from the seed), so
both backends keep identical tokens and each row of a batch equals that input alone;
change ``seed`` for another draw.
"""
from __future__ import annotations

from .base import Option, Random, register
from .selection import COMMON, SelectionPass


@register
class RandomSelect(SelectionPass):
    name = "random"
    summary = "keep a seeded random subset of the span (baseline)"
    default_keep = 0.5
    default_layer = "output"
    options = COMMON + [
        Option("layer", str, None, "cut: 'output' (default), K (before layer K) or a/b/c"),
        Option("seed", int, 0, "seed of the random order"),
    ]

    def reduction(self, model, facts, layer, k, start, end):
        return Random(k, start, end, seed=int(self.seed))
