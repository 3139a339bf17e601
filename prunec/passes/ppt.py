"""PPT (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers";
xjwu1024/PPT), training-free.

At each chosen block (default ``auto``: 3/6/9 of 12, PPT's pp_loc_list), between attention
and MLP, per sample: the importance of each non-prefix token is the CLS attention it gets
(summed over heads) times the norm of its value vector, normalized to sum 1. When the
(unbiased) variance of these scores is at least ``threshold`` the sample is *pruned*: the
``r`` least important tokens are dropped (kept tokens in descending importance, as PPT);
otherwise it is *pooled*: ToMe's bipartite soft matching on the block's keys merges ``r``
pairs by size-weighted average. Both remove ``r`` tokens (capped at (N − prefix) // 2), so a
batch can mix them. Token sizes are tracked and later attention adds log(size) (PPT's
default proportional attention).

Defaults: threshold 7e-5 (PPT's README for DeiT-S); r: PPT's 50 of 196 patches, scaled to
the model's patch count (``r=N`` sets it).

Shapes: [B, N, C] -> [B, N − r, C] per chosen layer.
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Adaptive, Option, flag, register
from .merging import LayerMergePass, cls_prefix


@register
class PPT(LayerMergePass):
    name = "ppt"
    summary = "per sample, prune by importance or pool by similarity, chosen by score variance (PPT)"
    options = [
        Option("r", int, None, "tokens removed at each chosen layer (default: 50/196 of the patch tokens)"),
        Option("threshold", float, 7e-5, "importance-score variance at and above which a sample is pruned"),
        Option("layers", str, "auto", "0-based blocks that reduce: a/b/c, or auto (3/6/9 of 12)"),
        Option("prefix", int, None, "prefix tokens, CLS first (default: those the graph shows; give 1 for a text "
                                    "encoder whose [CLS] the graph does not single out)"),
        Option("prop_attn", flag, True, "proportional attention: add log(size) to later attention logits"),
    ]

    def reduction(self, facts, layer, step):
        prefix = cls_prefix(facts, self.prefix, self.name)
        if facts.sites[layer].v is None and facts.sites[layer].kind != "packed":  # packed: v projected from its input
            raise PruneError(f"attention node '{facts.sites[layer].node.name}' hides its values; ppt needs them")
        n = facts.tokens(layer)
        dynamic = getattr(facts.graph, "dynamic_tokens", False)
        if dynamic and self.r is None:
            raise PruneError("ppt's default r is a share of a fixed image's patch tokens; on a model whose sequence "
                             "length is dynamic give r= (tokens removed per chosen layer)")
        r = max(1, round(50 / 196 * (facts.num_tokens - prefix))) if self.r is None else int(self.r)
        if r < 0:
            raise PruneError(f"r must not be negative, got {self.r}")
        if not dynamic:  # a dynamic token count caps r at run time, for the length it has then
            r = min(r, (n - prefix) // 2)
        if r <= 0:
            return None
        return Adaptive(site=facts.sites[layer], prefix=prefix, r=r, threshold=float(self.threshold),
                        track_size=True, prop_attn=flag(self.prop_attn), dynamic=dynamic)
