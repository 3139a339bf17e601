"""Grid pooling: average-pool the patch grid by a factor; prefix tokens are kept.

The baseline "Feather the Throttle" shows to be strong. The grid (H × W patches,
row-major as patch embeddings flatten them) is read off the graph: the 4-D output of the
patch-embedding convolution whose H·W equals the number of non-prefix tokens; or given
with ``grid=HxW``. H and W must be divisible by the factor.

A 1-D grid (``grid=Nx1``, e.g. text) is pooled along its one long side.
With ``span=START:END`` the grid is that token range (an image span inside a
decoder's sequence); tokens outside it are kept. Masks and positions of a pooled token
are those of its window's first (top-left) token.

Shapes: [B, P + H·W + S, C] -> [B, P + (H/f)(W/f) + S, C].
"""
from __future__ import annotations

from ..errors import PruneError
from .base import GridPool, Option, register
from .selection import SelectionPass, parse_span


def find_grid(facts, patches: int) -> tuple[int, int] | None:
    for node in facts.graph.nodes:
        name = node.op.split(":")[-1].lower()
        out = node.outputs[0] if node.outputs else None
        if "conv" in name and out is not None and out.shape and len(out.shape) == 4:
            h, w = out.shape[2], out.shape[3]
            if h * w == patches:
                return h, w
    return None


@register
class Pool(SelectionPass):
    name = "pool"
    summary = "average-pool the patch grid by a factor, prefix tokens kept (baseline)"
    default_layer = "output"
    options = [
        Option("factor", int, 2, "pooling window and stride on the patch grid"),
        Option("layer", str, None, "cut: 'output' (default), K (before layer K) or a/b/c"),
        Option("grid", str, None, "HxW patch grid (default: read off the patch embedding)"),
        Option("span", str, None, "START:END of the grid tokens; negative ends count from the token count N "
                                  "(1:-8, 1:) (default: all but prefix tokens)"),
    ]
    keep = None
    count = None

    def _plan_one(self, model, facts, layer, keep, span):
        from .cut import plan_cut

        stream = facts.stream_at(layer)
        n = facts.count_at(stream)
        start, end = parse_span(span, n, facts.prefix, facts.causal)
        patches = end - start
        if self.grid:
            try:
                h, w = (int(x) for x in str(self.grid).lower().split("x"))
            except ValueError:
                raise PruneError(f"grid '{self.grid}' is not HxW") from None
            if h * w != patches:
                raise PruneError(f"grid {h}x{w} does not match the {patches} patch tokens at the cut")
        else:
            hw = find_grid(facts, patches)
            if hw is None:
                raise PruneError(f"cannot find the patch grid of the {patches} tokens at the cut "
                                 f"(no patch-embedding convolution matches); pass grid=HxW")
            h, w = hw
        f = int(self.factor)
        if f < 1 or (h > 1 and h % f) or (w > 1 and w % f):
            raise PruneError(f"factor {f} does not divide the {h}x{w} patch grid")
        return plan_cut(facts, layer, GridPool(start, h, w, f, n), tag=self.cut_tag(layer, facts.depth),
                        recover=self.recover, recover_at=self.recover_at)
