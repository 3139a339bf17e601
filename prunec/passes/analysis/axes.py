"""Axis equivalence: which tensor axes carry the same dimension (tokens, batch).

Each op contributes equalities between its operands' axes by its semantics
(elementwise broadcasting, matmul contraction, transposes, reshapes matched by
prefix products, concat/split on other axes, ...).  A union-find over
``(value, axis)`` pairs then gives classes; the token class is the one holding the
residual stream's sequence axis.  Ops it does not understand contribute nothing,
so propagation stops there rather than guessing.
"""
from __future__ import annotations

from math import prod

import networkx as nx

from ...ir.graph import Graph, Node, Value


def _align_right(src: Value, dst: Value):
    """Pairs (src_axis, dst_axis) for broadcasting, only where sizes agree and > 1."""
    if src.shape is None or dst.shape is None:
        return
    off = len(dst.shape) - len(src.shape)
    for i, s in enumerate(src.shape):
        j = i + off
        if 0 <= j < len(dst.shape) and s == dst.shape[j] and s > 1:
            yield i, j


def _reshape_pairs(src: Value, dst: Value):
    """Axes kept intact by a reshape: same size and same product of the dims before them."""
    if src.shape is None or dst.shape is None:
        return
    pre_src = {}
    for i, s in enumerate(src.shape):
        pre_src.setdefault((prod(src.shape[:i]), s), i)
    for j, s in enumerate(dst.shape):
        i = pre_src.get((prod(dst.shape[:j]), s))
        if i is not None and s > 1:
            yield i, j


def _axes_without(rank: int, axis: int) -> list[int]:
    """The axes ``0..rank-1`` but ``axis``: where an unbind or select puts its source's axes."""
    return [i for i in range(rank) if i != axis]


def _split_piece_links(split: Node, piece: Value):
    """A piece of a split [.., N, ..] (or of an unbind, which drops the split axis) keeps the
    source's other axes, and the split axis too where the piece has its full size."""
    src = split.inputs[0]
    axis = split.attrs["axis"] % len(src.shape)
    mapping = _axes_without(len(src.shape), axis) if split.attrs.get("unbind") else list(range(len(src.shape)))
    for j, i in enumerate(mapping):
        if i != axis or src.shape[i] == piece.shape[j]:
            yield (src, i), (piece, j)


def _broadcast_links(node: Node, out: Value, rank: int):
    """Elementwise ops, softmax, layernorm and expand: operand axes broadcast right-aligned
    onto the output's (a quantize op and a norm follow their first input only, a
    SkipLayerNormalization its input and skip, onto every output of the output's shape)."""
    ins, outs = node.inputs, node.outputs
    srcs = (ins if node.op == "elementwise" and not node.attrs.get("quant")
            else ins[:2] if node.attrs.get("skip") else ins[:1])
    dsts = [o for o in outs if o is not None and o.shape == out.shape] if node.attrs.get("skip") else [out]
    for v in srcs:
        if v is not None and v.shape is not None and len(v.shape) >= 1:
            for d in dsts:  # SkipLayerNormalization: output 3 is input + skip
                for i, j in _align_right(v, d):
                    yield (v, i), (d, j)


def _matmul_links(node: Node, out: Value, rank: int):
    """a [.., M, K] @ b [.., K, P] -> [.., M, P]: rows of a, columns of b, the contraction,
    and the broadcast batch axes."""
    a, b = node.inputs[0], node.inputs[1]
    if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
        return
    yield (a, len(a.shape) - 2), (out, rank - 2)
    yield (b, len(b.shape) - 1), (out, rank - 1)
    yield (a, len(a.shape) - 1), (b, len(b.shape) - 2)
    for v in (a, b):
        for i, j in _align_right(v, out):
            if j < rank - 2 and i < len(v.shape) - 2:
                yield (v, i), (out, j)


def _linear_links(node: Node, out: Value, rank: int):
    """linear / addmm / gemm: x [.., K] -> [.., P] keeps every axis of x but the last
    (gemm with transA reads x as [K, M])."""
    x = node.inputs[1] if node.op == "addmm" else node.inputs[0]
    if node.op == "gemm" and node.attrs.get("transA"):
        yield (x, 1), (out, 0)
    else:
        for i in range(min(len(x.shape), rank) - 1):
            yield (x, i), (out, i)


def _transpose_links(node: Node, out: Value, rank: int):
    """Output axis j is input axis perm[j] (no perm: the axes reversed)."""
    perm = node.attrs.get("perm") or list(reversed(range(rank)))
    for j, i in enumerate(perm):
        yield (node.inputs[0], i), (out, j)


def _reshape_links(node: Node, out: Value, rank: int):
    """The axes a reshape keeps intact (see ``_reshape_pairs``)."""
    for i, j in _reshape_pairs(node.inputs[0], out):
        yield (node.inputs[0], i), (out, j)


def _concat_links(node: Node, out: Value, rank: int):
    """Every input of the output's rank shares the output's axes but the concat axis. Where all
    inputs but one are empty along the concat axis (a decoder's KV cache, probed with no past:
    ``present = Concat(past [B, H, 0, D], k [B, H, N, D])``), that one input's axis is the output's."""
    axis = node.attrs["axis"] % rank
    same_rank = [v for v in node.inputs if v is not None and v.shape is not None and len(v.shape) == rank]
    for v in same_rank:
        for i in range(rank):
            if i != axis:
                yield (v, i), (out, i)
    filled = [v for v in same_rank if v.shape[axis] != 0]
    if len(filled) == 1 and len(same_rank) > 1:
        yield (filled[0], axis), (out, axis)


def _split_links(node: Node, out: Value, rank: int):
    """Each output of a split or unbind (see ``_split_piece_links``)."""
    for piece in node.outputs:
        if piece.shape is not None:
            yield from _split_piece_links(node, piece)


def _getitem_links(node: Node, out: Value, rank: int):
    """fx tuple items: item 0 of a layernorm is its normalised input, an item of a split a piece."""
    ins = node.inputs
    producer = ins[0].producer if ins and ins[0] is not None else None
    if producer is None:
        return
    if producer.op == "layernorm" and node.attrs["index"] == 0:
        for i, j in _align_right(producer.inputs[0], out):
            yield (producer.inputs[0], i), (out, j)
    elif producer.op == "split":
        yield from _split_piece_links(producer, out)


def _select_links(node: Node, out: Value, rank: int):
    """x.select(axis, i) drops ``axis`` and keeps the others in order."""
    src = node.inputs[0]
    axis = node.attrs["axis"] % len(src.shape)
    for j, i in enumerate(_axes_without(len(src.shape), axis)):
        yield (src, i), (out, j)


def _gather_links(node: Node, out: Value, rank: int):
    """Gather(data, idx, axis): data's axes before ``axis``, then idx's axes (those > 1),
    then data's axes after ``axis``."""
    data, idx = node.inputs[0], node.inputs[1]
    axis = node.attrs["axis"] % len(data.shape)
    idx_rank = len(idx.shape) if idx.shape is not None else 0
    for i in range(axis):
        yield (data, i), (out, i)
    for k in range(idx_rank):
        if idx.shape[k] > 1:
            yield (idx, k), (out, axis + k)
    for i in range(axis + 1, len(data.shape)):
        yield (data, i), (out, i - 1 + idx_rank)


def _embedding_links(node: Node, out: Value, rank: int):
    """embedding(weight, ids [B, N]) -> [B, N, C]: the ids' axes lead the output's."""
    ids = node.inputs[1]
    for k in range(len(ids.shape)):
        yield (ids, k), (out, k)


def _slice_links(node: Node, out: Value, rank: int):
    """A slice keeps the axes whose size it does not change."""
    for i, j in _align_right(node.inputs[0], out):
        yield (node.inputs[0], i), (out, j)


def _reduce_links(node: Node, out: Value, rank: int):
    """A reduction that keeps its dims keeps the axes it does not reduce (size > 1)."""
    src = node.inputs[0]
    if src.shape is not None and len(src.shape) == rank:
        for i, j in _align_right(src, out):
            yield (src, i), (out, j)


def _embed_layernorm_links(node: Node, out: Value, rank: int):
    """ORT EmbedLayerNormalization: ids [B, N] -> [B, N, C] (+ mask_index [B]); input_ids,
    segment_ids, mask and position_ids (maybe [1, N]) are all [B, N]."""
    ins, outs = node.inputs, node.outputs
    ids = ins[0]
    for j in (0, 1, 7, 8):  # input_ids, segment_ids, mask, position_ids
        if j < len(ins) and ins[j] is not None:
            for i, a in _align_right(ins[j], ids):
                yield (ins[j], i), (ids, a)
    for o in outs:
        if o is not None and o.shape is not None and len(o.shape) == 3:
            yield (ids, 0), (o, 0)
            yield (ids, 1), (o, 1)
    if len(outs) > 1 and outs[1] is not None and outs[1].shape is not None and len(outs[1].shape) == 1:
        if outs[1].shape[0] == ids.shape[0] > 1:
            yield (outs[1], 0), (ids, 0)


def _rotary_links(node: Node, out: Value, rank: int):
    """ORT / ONNX RotaryEmbedding: x [B, N, C] or [B, H, N, D] -> the same shape; position_ids
    [B, N], or (ONNX, without positions) cos/sin caches [B, N, D/2]."""
    x = node.inputs[0]
    for i in range(len(x.shape)):
        yield (x, i), (out, i)
    tok = 1 if len(x.shape) == 3 else 2
    pos = node.attrs.get("position_ids")
    per_token = [pos] if pos is not None else [node.attrs.get("cos_cache"), node.attrs.get("sin_cache")]
    for p in per_token:
        if p is None or p.shape is None or len(p.shape) not in (2, 3):
            continue
        if p.shape[1] == x.shape[tok] > 1:
            yield (p, 1), (x, tok)
        if p.shape[0] == x.shape[0] > 1:
            yield (p, 0), (x, 0)


def _packed_attention_links(node: Node, out: Value, rank: int):
    """ORT Attention: input [B, N, C] -> [B, N, Cv], and its masks against the input."""
    x = node.inputs[0]
    yield (x, 0), (out, 0)
    yield (x, 1), (out, 1)
    yield from _mask_links(node, x, x)


def _sdpa_links(node: Node, out: Value, rank: int):
    """Attention on q/k/v [B, H, N, D] (aten sdpa, ONNX Attention) with a mask
    [.., N, T], or on [B, N, H·D] (ORT MultiHeadAttention, GroupQueryAttention) with
    the contrib masks: q's tokens are the output's, k and v share theirs."""
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    if len(q.shape) == 4 and rank == 4:
        yield (q, 2), (out, 2)
        yield (k, 2), (v, 2)
        yield (q, 0), (out, 0)
        yield (k, 0), (out, 0)
        yield (v, 0), (out, 0)
        if q.shape[1] == k.shape[1]:
            yield (q, 1), (k, 1)
        mask = node.attrs.get("mask")
        if mask is not None and mask.shape is not None:
            mr = len(mask.shape)
            if mask.shape[-2] == q.shape[2] and mask.shape[-2] > 1:
                yield (mask, mr - 2), (q, 2)
            if mask.shape[-1] == k.shape[2] and mask.shape[-1] > 1:
                yield (mask, mr - 1), (k, 2)
            if mr == 4 and mask.shape[0] == q.shape[0] and mask.shape[0] > 1:
                yield (mask, 0), (q, 0)
    elif len(q.shape) == 3:
        yield (q, 1), (out, 1)
        yield (q, 0), (out, 0)
        if k is not None and v is not None and len(k.shape) == 3 and len(v.shape) == 3:
            yield (k, 1), (v, 1)
            yield (k, 0), (out, 0)
            yield (v, 0), (out, 0)
            yield from _mask_links(node, q, k)


# normalized op -> its rule: rule(node, out, rank) yields the op's axis equalities
_LINKS = {
    **dict.fromkeys(("elementwise", "softmax", "layernorm", "expand"), _broadcast_links),
    "matmul": _matmul_links,
    **dict.fromkeys(("linear", "addmm", "gemm"), _linear_links),
    "transpose": _transpose_links,
    "reshape": _reshape_links,
    "concat": _concat_links,
    "split": _split_links,
    "getitem": _getitem_links,
    "select": _select_links,
    "gather": _gather_links,
    "embedding": _embedding_links,
    "slice": _slice_links,
    "reduce": _reduce_links,
    "embed_layernorm": _embed_layernorm_links,
    "rotary": _rotary_links,
    "packed_attention": _packed_attention_links,
    "sdpa": _sdpa_links,
}


def axis_links(node: Node):
    """Yield ((value, axis), (value, axis)) equalities contributed by ``node``: nothing for an
    op without a rule in ``_LINKS`` or whose output shape is unknown."""
    out = node.outputs[0] if node.outputs else None
    if node.op == "sdpa" and node.attrs.get("result") is not None:  # fx private variants: item 0 of a tuple
        out = node.attrs["result"]
    rule = _LINKS.get(node.op)
    if rule is None or out is None or out.shape is None:
        return
    yield from rule(node, out, len(out.shape))


def _mask_links(node: Node, q: Value, k: Value):
    """ORT contrib attention masks: ``key_mask`` [B, T] or [B, S, T] (0 = masked; a 1-D length
    mask has no token axis) and ``attention_bias`` [B or 1, H or 1, S, T] against q [B, S, ...]
    and k [B, T, ...]."""
    for name in ("key_mask", "attention_bias"):
        m = node.attrs.get(name)
        if m is None or m.shape is None or len(m.shape) < 2:
            continue
        r = len(m.shape)
        if m.shape[0] == q.shape[0] > 1:
            yield (m, 0), (q, 0)
        if m.shape[-1] == k.shape[1] > 1:
            yield (m, r - 1), (k, 1)
        if r >= 3 and m.shape[-2] == q.shape[1] > 1:
            yield (m, r - 2), (q, 1)


class AxisClasses:
    """Union-find over (value, axis) pairs."""

    def __init__(self, graph: Graph):
        self.uf = nx.utils.UnionFind()
        for node in graph.nodes:
            try:
                for a, b in axis_links(node):
                    if a[0] is None or b[0] is None:
                        continue
                    self.uf.union((id(a[0]), a[1]), (id(b[0]), b[1]))
            except (TypeError, IndexError, KeyError, AttributeError):
                continue  # an op whose operands do not match the rule contributes nothing

    def same(self, a: tuple[Value, int], b: tuple[Value, int]) -> bool:
        return self.uf[(id(a[0]), a[1])] == self.uf[(id(b[0]), b[1])]

    def axes_in_class(self, value: Value, anchor: tuple[Value, int]) -> list[int]:
        """Axes of ``value`` in the class of ``anchor`` (with the anchor's size)."""
        if value is None or value.shape is None:
            return []
        size = anchor[0].shape[anchor[1]]
        root = self.uf[(id(anchor[0]), anchor[1])]
        return [i for i, s in enumerate(value.shape) if s == size and self.uf[(id(value), i)] == root]
