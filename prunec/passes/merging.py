"""Shared machinery of the merging passes that act at chosen layers (EViT, PPT): the layer
list and one mid-block cut per layer, all planned on one analysis."""
from __future__ import annotations

from ..errors import PruneError
from .base import Pass, Plan, PlannedFacts
from .cut import plan_cut


def cls_prefix(facts, prefix, name: str) -> int:
    """The prefix tokens, CLS first: ``prefix`` if given, else what the graph shows; at least 1 for
    passes that score tokens by the CLS token's attention."""
    p = facts.prefix if prefix is None else int(prefix)
    if p < 1:
        raise PruneError(f"{name} scores tokens by CLS attention, and this model shows no CLS token (give prefix=1)")
    if facts.causal:
        raise PruneError(f"{name} needs a bidirectional encoder with a CLS token; this model is causal")
    return p


def parse_layers(spec, depth: int) -> list[int]:
    """``auto`` (the quarter points of the depth: 3/6/9 for 12 layers, as EViT and PPT use on
    DeiT) or a list ``a/b/c`` of 0-based block indices."""
    text = str(spec).strip().lower()
    if text in ("", "auto", "none"):
        return sorted({min(depth - 1, max(0, round(depth * i / 4))) for i in (1, 2, 3)})
    try:
        layers = [int(x) for x in text.split("/")]
    except ValueError:
        raise PruneError(f"layers '{spec}' is not 'auto' or a list like 3/6/9") from None
    for layer in layers:
        if not 0 <= layer < depth:
            raise PruneError(f"layer {layer} is out of range: the model has {depth} attention layers (0..{depth - 1})")
    if layers != sorted(set(layers)):
        raise PruneError(f"layers '{spec}' must be distinct and increasing")
    return layers


class LayerMergePass(Pass):
    """Subclasses implement :meth:`reduction` (a Merge for one layer, or None to skip it)."""

    def reduction(self, facts, layer: int, step: int):
        raise NotImplementedError

    def plan(self, model, facts: PlannedFacts | None = None) -> Plan:
        """A merge cut in each listed block that reduces, all planned on one analysis (``facts``
        passed to :meth:`reduction` count the tokens the earlier cuts leave)."""
        facts = self.planned_facts(model, facts)
        cuts = []
        for step, layer in enumerate(parse_layers(self.layers, facts.depth)):
            red = self.reduction(facts, layer, step)
            if red is None:
                continue
            cut = plan_cut(facts, layer, red, tag=f"{self.name.replace('-', '_')}_l{layer}", mid=True,
                           recover=self.recover, recover_at=self.recover_at)
            cuts.append(cut)
            facts = facts.after(cut)
        return Plan(cuts)
