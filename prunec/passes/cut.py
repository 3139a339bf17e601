"""Plan a cut before a layer: which edges cross it and which shape literals spell N."""
from __future__ import annotations

from ..errors import PruneError
from .analysis.blocks import Facts
from .base import Crossing, Cut, ShapeFix

_SIZED = ("reshape", "expand", "create")


def _size_operand(node):
    """The entries of a node's size operand (a literal list in fx, a probed int tensor in ONNX)."""
    if node.op not in _SIZED:
        return None
    if "size" in node.attrs and node.attrs["size"] is not None:
        size = node.attrs["size"]
        return [s if isinstance(s, int) else None for s in size]
    if node.ref is not None and hasattr(node.ref, "op_type"):
        if node.ref.op_type in ("Reshape", "Expand"):
            shp = node.inputs[1]
        elif node.ref.op_type == "ConstantOfShape":
            shp = node.inputs[0]
        else:
            return None
        if shp is not None and shp.data is not None:
            return [int(x) for x in shp.data.reshape(-1)]
    return None


def plan_cut(facts: Facts, layer: int, reduce, tag: str) -> Cut:
    """A cut before ``layer`` (1..depth-1), or at the encoder output (``layer == depth``:
    after the last block, where the final stream leaves for the head / outputs)."""
    if not 1 <= layer <= facts.depth:
        raise PruneError(f"layer {layer} is out of range: the model has {facts.depth} attention layers "
                         f"(valid cuts: 1..{facts.depth - 1}, or {facts.depth} for the output)")
    g = facts.graph
    stream = facts.stream_at(layer)
    cls_layer = min(layer, facts.depth - 1)
    n = stream.shape[1]
    post = g.consumers_closure(stream)
    cut = Cut(layer, stream, reduce, n, post, tag=tag)
    seen = set()
    for node in sorted(post, key=lambda x: x.index):
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            if v.producer is not None and v.producer in post:
                continue
            seen.add(id(v))
            axes = facts.token_axes(v, cls_layer)
            if not axes:
                continue
            b = facts.batch_axis(v, [u for u, _ in v.uses if u in post], cls_layer)
            if b is None or b in axes:
                raise PruneError(f"token-carrying tensor '{v.name}' (shape {list(v.shape)}) crosses the cut "
                                 f"before layer {layer} without a batch axis; cannot gather it per sample")
            cut.crossings.append(Crossing(v, axes, b))
        if node.op == "range" and node.outputs[0].shape and facts.token_axes(node.outputs[0], cls_layer):
            raise PruneError(f"node '{node.name}' builds a range over the tokens after the cut; "
                             f"pruned tokens would get wrong positions")
        size = _size_operand(node)
        if size is not None:
            out = node.outputs[0]
            tok = facts.token_axes(out, cls_layer)
            pos = [j for j in tok if j < len(size) and size[j] == n]
            if pos:
                cut.shape_fixes.append(ShapeFix(node, pos))
    for v in g.outputs:
        if v.producer is not None and v.producer in post:
            cut.output_axes[v.name] = facts.token_axes(v, cls_layer)
    if not any(c.value is stream for c in cut.crossings):
        raise PruneError(f"the residual stream '{stream.name}' entering layer {layer} has no token axis")
    return cut
