"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"; dvlab-research/VisionZip), training-free.

At the cut (default: before the last layer; or before layer K, or at the encoder output)
the tokens leaving the previous layer are reduced with that layer's attention and keys:

* dominant: the prefix (CLS) tokens plus the non-prefix tokens the CLS token attends to
  most (mean over heads), ``dominant`` in all (CLS included, as VisionZip's count), kept in
  original order;
* contextual: the remaining R tokens (original order) give ``contextual`` targets at stride
  max(1, R // contextual); every other remaining token joins the target its head-averaged
  key is most cosine-similar to; each contextual token is target + mean(joined).

Output: [dominant, contextual]. Defaults: the paper's 54 + 10 for 576 patches, scaled to the
model's patch count (at least prefix + 1 and 1). No token sizes (as VisionZip).

Default layer, as the official code: it reads LLaVA's ``select_layer = -2``, i.e. the
attention (``attentions[-2]``), keys (``layers[-2].metric``) and output
(``hidden_states[-2]``) of the penultimate layer, so prunec cuts before the last layer
scoring with the penultimate one. In LLaVA the last layer is never run; in a graph that
holds it, it runs on the reduced tokens. For a graph exported up to LLaVA's select layer
(the vision tower truncated there), use ``layer=output``.

Shapes: [B, N, C] -> [B, dominant + contextual, C].
"""
from __future__ import annotations

from ..errors import PruneError
from .base import Contextual, Option, Pass, Plan, register
from .cut import plan_cut
from .merging import cls_prefix


@register
class VisionZip(Pass):
    name = "visionzip"
    summary = "dominant tokens by CLS attention + contextual tokens merged by key similarity (VisionZip)"
    options = [
        Option("dominant", int, None, "dominant tokens kept, prefix included (default: 54/576 of the patches)"),
        Option("contextual", int, None, "contextual tokens (default: 10/576 of the patches)"),
        Option("prefix", int, None, "prefix tokens, CLS first (default: those the graph shows; give 1 for a text "
                                    "encoder whose [CLS] the graph does not single out)"),
        Option("layer", str, "penultimate", "cut: 'penultimate' (default: before the last layer, with the "
                                            "penultimate layer's attention, as the official code), K (before "
                                            "layer K, with layer K-1's attention) or 'output'"),
    ]

    def plan(self, model, facts=None) -> Plan:
        """One cut (none when every token is dominant: nothing to merge)."""
        facts = self.planned_facts(model, facts)
        spec = str(self.layer).strip().lower()
        try:
            if spec in ("penultimate", "auto", "", "none"):
                layer = facts.depth - 1
                if layer < 1:
                    raise PruneError("the model has one attention layer: no penultimate layer to score with; "
                                     "use layer=output")
            else:
                layer = facts.depth if spec in ("output", "out", "end") else int(spec)
        except ValueError:
            raise PruneError(f"layer '{self.layer}' is not an integer or 'output'") from None
        if not 1 <= layer <= facts.depth:
            raise PruneError(f"layer {layer} is out of range: the model has {facts.depth} attention layers "
                             f"(valid: 1..{facts.depth - 1}, or 'output')")
        prefix = cls_prefix(facts, self.prefix, self.name)
        n = facts.count_at(facts.stream_at(layer))
        dynamic = getattr(facts.graph, "dynamic_tokens", False)
        if dynamic and (self.dominant is None or self.contextual is None):
            raise PruneError("visionzip's default counts are shares of a fixed image's patch tokens; on a model whose "
                             "sequence length is dynamic give dominant= and contextual=")
        patches = facts.num_tokens - prefix
        dominant = max(prefix + 1, round(54 / 576 * patches)) if self.dominant is None else int(self.dominant)
        contextual = max(1, round(10 / 576 * patches)) if self.contextual is None else int(self.contextual)
        if dominant <= prefix or (dominant > n and not dynamic):  # dynamic: capped at run time
            raise PruneError(f"dominant must be in {prefix + 1}..{n} (the prefix tokens count), got {dominant}")
        if contextual < 0 or (contextual > n - dominant and not dynamic):
            raise PruneError(f"contextual must be in 0..{n - dominant}, got {contextual}")
        red = Contextual(site=facts.sites[layer - 1], prefix=prefix, dominant=dominant, contextual=contextual,
                         normalize=False, dynamic=dynamic)
        tag = "visionzip_" + (f"l{layer}" if layer < facts.depth else "out")
        cut = plan_cut(facts, layer, red, tag=tag, recover=self.recover, recover_at=self.recover_at)
        if cut.kept >= cut.num_tokens and contextual == 0 and not dynamic:
            return Plan([])  # every token is dominant: nothing to do (apply returns an unchanged copy)
        return Plan([cut])
