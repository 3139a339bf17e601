"""Token merging in standard ONNX ops (the same algorithms as :mod:`prunec.ops.merge`).

An assignment is ``dest`` [B, N] int64 (output slot per token, M = dropped), an optional
``weight`` [B, N, 1] and ``rep`` [B, M] (named ``<tag>/keep_idx``). The merge itself is a
ScatterElements with ``reduction="add"`` into M + 1 slots, then a Slice.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import PruneError
from ..passes.base import Adaptive, Bipartite, Contextual, Fuse
from ..schedules import tome_order
from .onnx_build import site_scores, site_tensor


def site_keys(b, site, values) -> ir.Value:
    """Keys averaged over heads: [B, N, D] float32."""
    if site.probs is not None:  # eager: kᵀ [B, H, D, N]
        return b.op("Transpose", [b.reduce_mean(b.as_f32(values[site.k_t.name], site.k_t.dtype), [1])], {"perm": [0, 2, 1]})
    return b.reduce_mean(site_tensor(b, site, values, "k")[0], [1])


def _normalize(b, x: ir.Value, axis: int = -1) -> ir.Value:
    norm = b.op("Sqrt", [b.reduce_sum(b.op("Mul", [x, x]), [axis], keepdims=1)])
    return b.op("Div", [x, b.op("Max", [norm, b.floats(1e-12, "eps")])])


def tome_assign(b, metric: ir.Value, n: int, r: int, prefix: int):
    """ToMe bipartite soft matching (as ``prunec.ops.merge.tome_assign``): dest [B, N], rep [B, N-r]."""
    na, nb = (n + 1) // 2, n // 2
    m = _normalize(b, metric)
    a = b.op("Gather", [m, b.ints(np.arange(0, n, 2), "even")], {"axis": 1})
    bb = b.op("Gather", [m, b.ints(np.arange(1, n, 2), "odd")], {"axis": 1})
    scores = b.op("MatMul", [a, b.op("Transpose", [bb], {"perm": [0, 2, 1]})])  # [B, Na, Nb]
    pa, pb = (prefix + 1) // 2, prefix // 2
    if prefix:
        protect = np.zeros((na, nb), np.float32)
        protect[:pa, :] = -np.inf
        protect[:, :pb] = -np.inf
        scores = b.op("Add", [scores, b.const(protect, "protect")])
    node_max = b.reduce("ReduceMax", scores, [2])
    node_idx = b.op("ArgMax", [scores], {"axis": 2, "keepdims": 0})  # [B, Na]
    _, edge = b.op("TopK", [node_max, b.ints([na], "na")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    u = na - r
    unm = b.slice(edge, r, na)
    src = b.slice(edge, 0, r)
    if prefix:
        unm = b.sort_ascending(unm, u)
    zeros = b.op("Mul", [node_idx, b.ints(0, "zero")])
    slot_a = b.op("ScatterElements", [zeros, unm, b.batch_const(np.arange(u)[None, :], unm, "slots")], {"axis": 1})
    dst = b.op("Add", [b.op("GatherElements", [node_idx, src], {"axis": 1}), b.ints(u, "u")])
    slot_a = b.op("ScatterElements", [slot_a, src, dst], {"axis": 1})
    slot_b = b.batch_const((u + np.arange(nb))[None, :], unm, "slot_b")
    both = b.op("Concat", [slot_a, slot_b], {"axis": 1})  # [B, Na + Nb]: A tokens, then B tokens
    interleave = np.array([i // 2 if i % 2 == 0 else na + i // 2 for i in range(n)], np.int64)
    dest = b.op("Gather", [both, b.ints(interleave, "interleave")], {"axis": 1})
    rep = b.op("Concat", [b.op("Mul", [unm, b.ints(2, "two")]),
                          b.batch_const((2 * np.arange(nb) + 1)[None, :], unm, "odd_idx")], {"axis": 1})
    order = tome_order(prefix, u, nb)
    if order is not None:
        inverse = np.empty(len(order), np.int64)
        inverse[np.array(order)] = np.arange(len(order))
        dest = b.op("Gather", [b.ints(inverse, "inverse"), dest], {"axis": 0})
        rep = b.op("Gather", [rep, b.ints(order, "order")], {"axis": 1})
    return dest, rep


def evit_assign(b, scores: ir.Value, n: int, k: int, prefix: int, fuse: bool = True):
    """EViT (as ``prunec.ops.merge.evit_assign``): dest [B, N], weight [B, N, 1], rep [B, M]."""
    cand = b.slice(scores, prefix, n)
    _, order = b.op("TopK", [cand, b.ints([n - prefix], "all")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    order = b.op("Add", [order, b.ints(prefix, "prefix")])
    top, rest = b.slice(order, 0, k), b.slice(order, k, n - prefix)
    fused = prefix + k
    base = np.full((1, n), fused, np.int64)
    base[0, :prefix] = np.arange(prefix)
    dest = b.op("ScatterElements", [b.batch_const(base, scores, "base"), top,
                                    b.batch_const((prefix + np.arange(k))[None, :], scores, "slots")], {"axis": 1})
    ones = b.ones_like(scores)
    weight = b.op("ScatterElements", [ones, rest, b.op("GatherElements", [scores, rest], {"axis": 1})], {"axis": 1})
    parts = [top]
    if prefix:
        parts.insert(0, b.batch_const(np.arange(prefix)[None, :], scores, "prefix_idx"))
    if fuse and n - prefix > k:
        parts.append(b.slice(rest, 0, 1))
    rep = b.op("Concat", parts, {"axis": 1}) if len(parts) > 1 else top
    return dest, b.op("Unsqueeze", [weight, b.ints([2], "axes")]), rep


def visionzip_assign(b, scores: ir.Value, metric: ir.Value, n: int, dominant: int, contextual: int, prefix: int):
    """VisionZip (as ``prunec.ops.merge.visionzip_assign``): dest [B, N], weight [B, N, 1], rep [B, M]."""
    _, top = b.op("TopK", [b.slice(scores, prefix, n), b.ints([dominant - prefix], "d")],
                  {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    top = b.op("Add", [top, b.ints(prefix, "prefix")])
    flag = np.zeros((1, n), np.float32)
    flag[0, :prefix] = 1.0
    keep = b.op("ScatterElements", [b.batch_const(flag, scores, "flag"), top,
                                    b.ones_like(b.op("Cast", [top], {"to": ir.DataType.FLOAT}))], {"axis": 1})
    key = b.op("Sub", [b.floats(np.arange(n, dtype=np.float32)[None, :], "pos"), b.op("Mul", [keep, b.floats(float(n), "n")])])
    _, order = b.op("TopK", [key, b.ints([n], "all")], {"axis": 1, "largest": 0, "sorted": 1}, outputs=2)
    dom, rest = b.slice(order, 0, dominant), b.slice(order, dominant, n)
    n_rest = n - dominant
    dest = b.op("ScatterElements", [b.batch_const(np.full((1, n), dominant + contextual, np.int64), scores, "drop"),
                                    dom, b.batch_const(np.arange(dominant)[None, :], scores, "slots")], {"axis": 1})
    ones = b.ones_like(scores)
    if not (contextual and n_rest):
        return dest, b.op("Unsqueeze", [ones, b.ints([2], "axes")]), dom
    step = max(1, n_rest // contextual)
    targets = list(range(0, n_rest, step))[:contextual]
    others = [i for i in range(n_rest) if i not in set(targets)]
    t_idx = b.op("Gather", [rest, b.ints(targets, "targets")], {"axis": 1})
    o_idx = b.op("Gather", [rest, b.ints(others, "others")], {"axis": 1})
    m = _normalize(b, metric)
    axes2 = b.ints([2], "axes")
    mt = b.op("GatherND", [m, b.op("Unsqueeze", [t_idx, axes2])], {"batch_dims": 1})
    mo = b.op("GatherND", [m, b.op("Unsqueeze", [o_idx, axes2])], {"batch_dims": 1})
    choice = b.op("ArgMax", [b.op("MatMul", [mo, b.op("Transpose", [mt], {"perm": [0, 2, 1]})])], {"axis": 2, "keepdims": 0})
    ones_o = b.ones_like(b.op("Cast", [choice], {"to": ir.DataType.FLOAT}))
    counts = scatter_sum(b, b.op("Unsqueeze", [ones_o, axes2]), choice, len(targets), 1)  # [B, T, 1]
    counts = b.op("Max", [b.op("Squeeze", [counts, axes2]), b.floats(1.0, "one")])
    dest = b.op("ScatterElements", [dest, t_idx, b.batch_const((dominant + np.arange(len(targets)))[None, :], scores,
                                                                 "t_slots")], {"axis": 1})
    dest = b.op("ScatterElements", [dest, o_idx, b.op("Add", [choice, b.ints(dominant, "d")])], {"axis": 1})
    inv = b.op("Div", [b.floats(1.0, "one"), b.op("GatherElements", [counts, choice], {"axis": 1})])
    weight = b.op("ScatterElements", [ones, o_idx, inv], {"axis": 1})
    rep = b.op("Concat", [dom, t_idx], {"axis": 1})
    return dest, b.op("Unsqueeze", [weight, axes2]), rep


def ppt_assign(b, site, values, cls_scores: ir.Value, metric: ir.Value, n: int, r: int, prefix: int, threshold: float):
    """PPT (as ``prunec.ops.merge.ppt_scores`` + ``ppt_assign``): dest [B, N], rep [B, N - r]."""
    if site.probs is not None:
        v = b.as_f32(values[site.v.name], site.v.dtype)
        axes = [1, 3] if len(site.v.shape) == 4 else [2]
    else:  # fused / packed: [B, H, N, D] with the projection's bias
        v, axes = site_tensor(b, site, values, "v")[0], [1, 3]
    vn = b.op("Sqrt", [b.reduce_sum(b.op("Mul", [v, v]), axes)])  # [B, N]
    s = b.slice(b.op("Mul", [cls_scores, vn]), prefix, n)
    s = b.op("Div", [s, b.reduce_sum(s, [1], keepdims=1)])
    parts = [s]
    if prefix:
        parts.insert(0, b.batch_const(np.full((1, prefix), 2.0, np.float32), cls_scores, "cls_score"))
    scores = b.op("Concat", parts, {"axis": 1}) if prefix else s
    centered = b.op("Sub", [s, b.reduce_mean(s, [1], keepdims=1)])
    var = b.op("Div", [b.reduce_sum(b.op("Mul", [centered, centered]), [1], keepdims=1), b.floats(float(n - prefix - 1), "dof")])
    pool = b.op("Less", [var, b.floats(float(threshold), "threshold")])  # [B, 1]
    dest_m, rep_m = tome_assign(b, metric, n, r, prefix)
    _, order = b.op("TopK", [scores, b.ints([n], "all")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    kept = b.slice(order, 0, n - r)
    dest_p = b.op("ScatterElements", [b.batch_const(np.full((1, n), n - r, np.int64), scores, "drop"), kept,
                                      b.batch_const(np.arange(n - r)[None, :], scores, "slots")], {"axis": 1})
    return b.op("Where", [pool, dest_m, dest_p]), b.op("Where", [pool, rep_m, kept])


def scatter_sum(b, x: ir.Value, dest: ir.Value, m: int, width: int) -> ir.Value:
    """Σ over tokens with the same dest: x [B, N, width] -> [B, M, width] (slot M dropped).
    One ScatterND with ``reduction="add"`` over rows of a [B·(M+1), width] view: the index is
    [B·N, 1], not a [B, N, width] tensor, and ORT adds whole rows. Before opset 16 (no
    reductions in the scatters) a one-hot product does the same sum: OneHot(dest, M)ᵀ [B, M, N]
    @ x (an index M is out of range, so its row of the one-hot matrix is zero: dropped)."""
    if b.opset < 16:
        onehot = b.op("OneHot", [dest, b.ints([m], "depth"), b.floats([0.0, 1.0], "off_on")], {"axis": 1})  # [B, M, N]
        return b.op("MatMul", [onehot, x])
    batch = b.op("Squeeze", [b.batch_size(dest), b.ints([0], "axes")])
    offsets = b.op("Mul", [b.op("Range", [b.ints(0, "zero"), batch, b.ints(1, "one")]), b.ints(m + 1, "slots")])
    flat = b.op("Add", [dest, b.op("Unsqueeze", [offsets, b.ints([1], "axes")])])
    flat = b.op("Reshape", [flat, b.ints([-1, 1], "rows")])
    rows = b.op("Mul", [batch, b.ints(m + 1, "slots")])
    shape = b.op("Concat", [b.op("Unsqueeze", [rows, b.ints([0], "axes")]), b.ints([width], "width")], {"axis": 0})
    zeros = b.op("Expand", [b.floats(np.zeros((1, width), np.float32), "zeros"), shape])
    out = b.op("ScatterND", [zeros, flat, b.op("Reshape", [x, b.ints([-1, width], "flat")])], {"reduction": "add"})
    return b.slice(b.op("Reshape", [out, b.ints([-1, m + 1, width], "slots")]), 0, m)


def merge(b, x: ir.Value, dest: ir.Value, weight: ir.Value | None, m: int, c: int, normalize: bool) -> ir.Value:
    """x [B, N, C] -> [B, M, C]: Σ w·x / Σ w per slot (or Σ w·x)."""
    if weight is None:
        return _mean_by_count(b, x, dest, m, c) if normalize else scatter_sum(b, x, dest, m, c)
    num = scatter_sum(b, b.op("Mul", [x, weight]), dest, m, c)
    if not normalize:
        return num
    den = scatter_sum(b, weight, dest, m, 1)
    return b.op("Div", [num, den])


def _mean_by_count(b, x, dest, m, c):
    ones = b.ones_like(b.slice(x, 0, 1, axis=2))
    return b.op("Div", [scatter_sum(b, x, dest, m, c), scatter_sum(b, ones, dest, m, 1)])


def merge_sizes(b, size: ir.Value | None, stream: ir.Value, dest: ir.Value, m: int) -> ir.Value:
    """Token sizes [B, N, 1] (None: ones like the stream's tokens) summed into [B, M, 1]."""
    if size is None:
        size = b.ones_like(b.slice(stream, 0, 1, axis=2))
    return scatter_sum(b, size, dest, m, 1)


def lower_merge(b, cut, values, size_in: ir.Value | None, biases: dict):
    """The merged stream [B, M, C] (in the stream's float type; merged in float32), dest [B, N]
    and rep [B, M] of a merge cut. ``biases``: site node name -> the log-size bias an earlier cut
    of the plan adds to it (read by the scores of a fused site)."""
    r = cut.reduce
    bias = biases.get(r.site.node.ref.name)
    n, m = cut.num_tokens, cut.kept
    dt = cut.stream.dtype
    x = b.as_f32(values[cut.stream.name], dt)
    if size_in is not None:
        size_in = b.as_f32(size_in, dt)  # sizes live in the stream's type
    c = cut.stream.shape[-1]
    weight = None
    if isinstance(r, Bipartite):
        dest, rep = tome_assign(b, site_keys(b, r.site, values), n, r.r, r.prefix)
        weight = size_in
    elif isinstance(r, Fuse):
        dest, weight, rep = evit_assign(b, site_scores(b, r.site, 0, values, n, bias), n, r.k, r.prefix, r.fuse)
    elif isinstance(r, Contextual):
        dest, weight, rep = visionzip_assign(b, site_scores(b, r.site, 0, values, n, bias), site_keys(b, r.site, values), n,
                                             r.dominant, r.contextual, r.prefix)
    elif isinstance(r, Adaptive):
        dest, rep = ppt_assign(b, r.site, values, site_scores(b, r.site, 0, values, n, bias), site_keys(b, r.site, values), n,
                               r.r, r.prefix, r.threshold)
        weight = size_in
    else:
        raise PruneError(f"the ONNX backend cannot lower {type(r).__name__}")
    merged = b.as_dtype(merge(b, x, dest, weight, m, c, r.normalize), dt)
    rep.name = f"{cut.tag}/keep_idx"
    dest.name = f"{cut.tag}/dest"
    return merged, dest, rep

