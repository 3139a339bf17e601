"""Zero-TPrune (Wang et al., "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the
Attention Graph in Pre-Trained Transformers", CVPR 2024).

Before layer K, with layer K−1's attention A [B, H, N, N] as a graph:

* I′-stage: one weighted-PageRank step per head, s ← Aᵀ s from a uniform start in which
  the CLS token weighs √N (none without a CLS token; register tokens are not one), heads combined by root-mean-square (EIR), ranks the span;
* S-stage: the span is split by that rank into the more important half B and the less
  important half A ("Seq-U"); each A token's best cosine similarity to a B token is
  computed on the layer's key vectors (all heads concatenated), and the ``drop_similar``
  most redundant A tokens are dropped;
* I-stage: ``iters`` WPR steps in all; the top-k remaining span tokens by importance are kept.

Defaults and deviations (the official code was not available to read; these follow the
paper as summarized in its write-ups): the variance-based head filter (VHF) is not
applied (its variance scale is unspecified); the paper's per-layer iteration counts
(30–50 early, 5–10 middle, 1 late) become one ``iters`` option (default 30); the share of
the pruned tokens the S-stage removes is ``similar`` (default 0.5, capped at half the
span), a prunec choice since the paper's split is not stated.

Fused attention: the scoring layer's full attention matrix is computed from q and k for
that one layer only (O(N²)); every other layer keeps its fused kernel.
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Option, PageRank, register
from .selection import COMMON, SelectionPass


@register
class ZeroTPrune(SelectionPass):
    name = "zero-tprune"
    summary = "weighted PageRank importance + key-similarity pruning (Zero-TPrune)"
    default_keep = 0.5
    default_layer = "2"
    options = COMMON + [
        Option("layer", str, None, "prune before this layer (default 2), with layer-1's attention graph; a/b/c"),
        Option("iters", int, 30, "weighted-PageRank iterations of the I-stage"),
        Option("similar", float, 0.5, "share of the pruned tokens dropped by the S-stage (key similarity)"),
        Option("cls", str, "auto", "token given the CLS start weight √N: 'auto' (token 0 when the graph shows a "
                                   "CLS token; registers are not one), 'none', or an index"),
    ]

    def reduction(self, model, facts, layer, k, start, end):
        if layer >= facts.depth:
            raise PruneError(f"zero-tprune prunes before a layer (valid: 1..{facts.depth - 1})")
        site = facts.sites[layer - 1]
        if int(self.iters) < 1:
            raise PruneError(f"iters must be at least 1, got {self.iters}")
        if not 0.0 <= float(self.similar) <= 1.0:
            raise PruneError(f"similar must be in [0, 1], got {self.similar}")
        span = end - start
        drop = min(int(round(float(self.similar) * (span - k))), span // 2)
        spec = str(self.cls).strip().lower()
        if spec == "auto":
            cls = 0 if facts.cls_first and facts.prefix > 0 else None
        elif spec == "none":
            cls = None
        else:
            try:
                cls = int(spec)
            except ValueError:
                raise PruneError(f"cls '{self.cls}' is not 'auto', 'none' or a token index") from None
            if not 0 <= cls < facts.num_tokens:
                raise PruneError(f"cls {cls} is out of range: the model has {facts.num_tokens} tokens")
        return PageRank(k, start, end, site=site, iters=int(self.iters), drop_similar=drop, cls=cls,
                        similar=float(self.similar))
