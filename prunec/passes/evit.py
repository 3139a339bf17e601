"""EViT (Liang et al., "Not All Patches Are What You Need: Expediting Vision Transformers via
Token Reorganizations"; youweiliang/evit), training-free.

At each chosen block (default ``auto``: 3/6/9 of 12, EViT's ``drop_loc``), between
attention and MLP: the attention the CLS token pays every other token in that block,
averaged over heads [B, N], ranks the non-prefix tokens; the top
``ceil(keep × (N − prefix))`` are kept (in descending attention order, as EViT's sorted
topk) and the rest are fused into one token appended last, Σ a_j·x_j with a_j their CLS
attention (unnormalized, as EViT). A fused token from an earlier layer is an ordinary token
later. ``fuse=false`` drops the rest instead (EViT without ``--fuse_token``). No token
sizes, no proportional attention (as EViT). Default keep 0.7 (EViT's base_keep_rate).

Shapes: [B, N, C] -> [B, prefix + k + 1, C] per chosen layer.
"""
from __future__ import annotations

import math

from ..errors import PruneError
from .base import Fuse, Option, flag, register
from .merging import LayerMergePass, cls_prefix, parse_layers


@register
class EViT(LayerMergePass):
    name = "evit"
    summary = "keep the tokens CLS attends to most, fuse the rest into one (EViT)"
    options = [
        Option("keep", str, "0.7", "fraction of non-prefix tokens kept at each chosen layer (a/b/c: one per layer)"),
        Option("layers", str, "auto", "0-based blocks that reduce: a/b/c, or auto (3/6/9 of 12)"),
        Option("prefix", int, None, "prefix tokens, CLS first (default: those the graph shows; give 1 for a text "
                                    "encoder whose [CLS] the graph does not single out)"),
        Option("fuse", flag, True, "fuse the inattentive tokens into one token (false: drop them)"),
    ]

    def reduction(self, facts, layer, step):
        prefix = cls_prefix(facts, self.prefix, self.name)
        keeps = str(self.keep).split("/")
        n_layers = len(parse_layers(self.layers, facts.depth))
        if len(keeps) not in (1, n_layers):
            raise PruneError(f"{len(keeps)} keep values for {n_layers} layers")
        try:
            keep = float(keeps[step if len(keeps) > 1 else 0])
        except ValueError:
            raise PruneError(f"keep '{self.keep}' is not a number") from None
        if not 0.0 < keep <= 1.0:
            raise PruneError(f"keep must be in (0, 1], got {keep}")
        n = facts.tokens(layer)
        k = max(1, math.ceil(keep * (n - prefix)))
        dynamic = getattr(facts.graph, "dynamic_tokens", False)  # k follows the length at run time
        if k >= n - prefix and not (dynamic and keep < 1.0):
            return None
        return Fuse(site=facts.sites[layer], prefix=prefix, k=min(k, n - prefix), fuse=flag(self.fuse),
                    normalize=False, keep=keep if dynamic else None, dynamic=dynamic)
