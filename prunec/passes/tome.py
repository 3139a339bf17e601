"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster"; facebookresearch/ToMe).

In every block, between attention and MLP (after ``x = x + attn(norm1(x))``), the
block's keys averaged over heads [B, N, D] are the metric of bipartite soft matching:
tokens alternate into sets A (even) and B (odd), each A token's most cosine-similar B
token is its edge, and the ``r`` strongest edges merge (the A token into its B match)
by size-weighted average. Token sizes [B, N, 1] are carried from block to block (a
tensor named ``<tag>/prunec_size``); with proportional attention (the default, as
ToMe for off-the-shelf models) every later attention adds log(size) to its logits —
before the softmax when attention is eager, as the additive mask when it is fused.
CLS / distillation tokens (the prefix tokens the graph shows) never merge; r is capped at
half the mergeable tokens, ``(N - prefix) // 2``. Output tokens come in ToMe's order
(unmerged A tokens, then B). Token means after the last merge (mean pooling, masked mean
pooling) are made size-weighted.

r schedule (ToMe's ``parse_r``): ``r=8`` merges 8 per layer; ``r=8/8/4`` lists r per layer
(padded with 0); ``inflection`` in [-1, 1] bends a constant r into ToMe's schedule
(-1: the paper's decreasing schedule, same total).

Deviations: ties in edge strength go to the lower index (a stable sort; ToMe's argsort
is unstable); with more than two prefix tokens (registers) all are protected, alternating
between A's rows and B's columns as ToMe does for CLS and the distillation token.

Shapes: [B, N, C] -> [B, N - r, C] per layer.
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Bipartite, Option, Pass, Plan, PlannedFacts, flag, register
from .cut import plan_cut


def parse_r(spec, inflection: float, depth: int) -> list[int]:
    """r per layer, as ToMe's parse_r: a list (padded with zeros) or a constant bent by
    ``inflection``."""
    text = str(spec)
    try:
        values = [int(x) for x in text.split("/")]
    except ValueError:
        raise PruneError(f"r '{spec}' is not an integer or a list a/b/c of integers") from None
    if any(v < 0 for v in values):
        raise PruneError(f"r must not be negative, got {spec}")
    if "/" in text:
        if len(values) > depth:
            raise PruneError(f"{len(values)} r values for a model of {depth} layers")
        return values + [0] * (depth - len(values))
    if not -1.0 <= inflection <= 1.0:
        raise PruneError(f"inflection must be in [-1, 1], got {inflection}")
    r = values[0]
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / max(depth - 1, 1)
    return [int(lo + step * i) for i in range(depth)]


@register
class ToMe(Pass):
    name = "tome"
    summary = "merge the r most similar token pairs in every block (ToMe bipartite soft matching)"
    options = [
        Option("r", str, "8", "tokens merged per layer: N, or a list a/b/c (one per layer, padded with 0)"),
        Option("inflection", float, 0.0, "ToMe's schedule shape in [-1, 1]: 0 constant, -1 decreasing"),
        Option("prop_attn", flag, True, "proportional attention: add log(size) to later attention logits"),
        Option("prefix", int, None, "tokens never merged (default: the CLS/distillation tokens the graph shows)"),
    ]

    def schedule(self, depth: int) -> list[int]:
        return parse_r(self.r, float(self.inflection), depth)

    def _plan_layer(self, facts: PlannedFacts, layer: int, r: int):
        """The merge cut in block ``layer`` after the cuts planned in ``facts`` (None: nothing to merge)."""
        n = facts.tokens(layer)
        prefix = facts.prefix if self.prefix is None else int(self.prefix)
        if not 0 <= prefix < n:
            raise PruneError(f"prefix {prefix} is outside the {n} tokens")
        dynamic = getattr(facts.graph, "dynamic_tokens", False)
        if not dynamic:  # a dynamic token count caps r at run time, for the length it has then
            r = min(r, (n - prefix) // 2)
        if r <= 0:
            return None
        red = Bipartite(site=facts.sites[layer], prefix=prefix, r=r, track_size=True, prop_attn=flag(self.prop_attn),
                        dynamic=dynamic)
        return plan_cut(facts, layer, red, tag=f"tome_l{layer}", mid=True,
                        recover=self.recover, recover_at=self.recover_at)

    def plan(self, model, facts: PlannedFacts | None = None) -> Plan:
        """A merge cut in every block whose r is above 0, all planned on one analysis."""
        facts = self.planned_facts(model, facts)
        cuts = []
        for layer, r in enumerate(self.schedule(facts.depth)):
            cut = self._plan_layer(facts, layer, r)
            if cut is not None:
                cuts.append(cut)
                facts = facts.after(cut)
        return Plan(cuts)
