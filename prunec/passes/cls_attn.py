"""[CLS]-attention pruning (FasterVLM: "[CLS] Attention is All You Need for Training-Free
Visual Token Pruning").

Tokens are scored by the attention the CLS token pays them in ``score_layer``
(default: the penultimate layer, as FasterVLM reads the vision encoder's penultimate
layer), averaged over heads, and the top fraction is kept at the cut (default: the
encoder output, i.e. before a downstream consumer such as an LLM projector; or before
any later layer). Fused attention: only the CLS row of softmax(q kᵀ) is computed.

Shapes: scores [B, N] from the CLS row; tokens [B, N, C] -> [B, M, C].
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Option, TopK, register
from .fastv import attention_score
from .selection import COMMON, SelectionPass


@register
class ClsAttention(SelectionPass):
    name = "cls-attn"
    summary = "keep the tokens the CLS token attends to most (FasterVLM)"
    default_keep = 0.25
    default_layer = "output"
    options = COMMON + [
        Option("layer", str, None, "cut: 'output' (default: the encoder output), K (before layer K) or a/b/c"),
        Option("score_layer", int, None, "layer whose CLS attention scores tokens (default: the penultimate "
                                         "layer, or the layer before the cut if that is earlier)"),
        Option("cls", int, None, "index of the CLS token (default: 0, when the graph shows prefix tokens; "
                                 "give it for text encoders whose [CLS] the graph does not single out)"),
    ]

    def reduction(self, model, facts, layer, k, start, end):
        if facts.prefix < 1 and self.cls is None:
            raise PruneError("cls-attn needs a CLS token, and this model has no prefix token (give cls=INDEX)")
        if facts.causal:
            raise PruneError("cls-attn scores with the CLS row of a bidirectional encoder; this model is causal")
        score_layer = self.score_layer if self.score_layer is not None else min(facts.depth - 2, layer - 1)
        score_layer = max(score_layer, 0)
        if not 0 <= score_layer < layer:
            raise PruneError(f"score_layer {score_layer} must come before the cut at layer {layer}")
        cls = 0 if self.cls is None else int(self.cls)
        if start <= cls < end:
            raise PruneError(f"the CLS token {cls} is inside the pruned span {start}:{end}")
        return TopK(k, start, end, score=attention_score(facts, score_layer, cls))
