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
from ..schedules import PADDING_CROSS as CROSS, tome_order
from .onnx_build import site_scores, site_tensor


def site_keys(b, site, values) -> ir.Value:
    """Keys averaged over heads: [B, N, D] float32."""
    if site.probs is not None:  # eager: kᵀ [B, H, D, N]
        return b.op("Transpose", [b.reduce_mean(b.as_f32(values[site.k_t.name], site.k_t.dtype), [1])], {"perm": [0, 2, 1]})
    return b.reduce_mean(site_tensor(b, site, values, "k")[0], [1])


def unit_rows(b, x: ir.Value, axis: int = -1) -> ir.Value:
    """x scaled to unit L2 norm along ``axis`` (norms below 1e-12 count as 1e-12)."""
    norm = b.op("Sqrt", [b.reduce_sum(b.op("Mul", [x, x]), [axis], keepdims=1)])
    return b.op("Div", [x, b.op("Max", [norm, b.floats(1e-12, "eps")])])


def tome_assign(b, metric: ir.Value, n, r, prefix: int, padding: ir.Value | None = None):
    """ToMe bipartite soft matching (as ``prunec.ops.merge.tome_assign``): dest [B, N], rep [B, N-r].
    ``n``, ``r``: counts (numbers, or run-time values when the token count is dynamic; r is then
    capped at run time at half the mergeable tokens, (N − prefix) // 2, as ToMe caps it).
    ``padding`` [B, N] bool: each row matched as its real tokens alone (:func:`_tome_padded`)."""
    if isinstance(n, ir.Value):
        r = b.arith("Min", r, b.arith("Div", b.arith("Sub", n, prefix), 2))
    if padding is not None:
        return _tome_padded(b, metric, n, r, prefix, padding)
    na, nb = b.arith("Div", b.arith("Add", n, 1), 2), b.arith("Div", n, 2)
    m = unit_rows(b, metric)
    big = np.iinfo(np.int64).max
    a, bb = b.slice(m, 0, big, step=2), b.slice(m, 1, big, step=2)  # even / odd tokens
    scores = b.op("MatMul", [a, b.op("Transpose", [bb], {"perm": [0, 2, 1]})])  # [B, Na, Nb]
    pa, pb = (prefix + 1) // 2, prefix // 2
    if prefix:  # A's first pa rows and B's first pb columns never merge
        rows = b.op("Less", [b.op("Unsqueeze", [b.arange(0, na), b.ints([1], "axes")]), b.ints(pa, "pa")])
        cols = b.op("Less", [b.op("Unsqueeze", [b.arange(0, nb), b.ints([0], "axes")]), b.ints(pb, "pb")])
        scores = b.op("Where", [b.op("Or", [rows, cols]), b.floats(-np.inf, "ninf"), scores])
    if isinstance(n, ir.Value):  # a −inf column: no empty axis when a short input has no B token
        shape = b.op("Concat", [b.batch_size(scores), b.dim(scores, 1), b.ints([1], "one")], {"axis": 0})
        ninf = b.op("Expand", [b.floats([[[-np.inf]]], "ninf"), shape])
        scores = b.op("Concat", [scores, ninf], {"axis": 2})
    node_max = b.reduce("ReduceMax", scores, [2])
    node_idx = b.op("ArgMax", [scores], {"axis": 2, "keepdims": 0})  # [B, Na]
    _, edge = b.op("TopK", [node_max, b.num(na, "na")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    u = b.arith("Sub", na, r)
    unm = b.slice(edge, r, na)
    src = b.slice(edge, 0, r)
    if prefix:
        unm = b.sort_ascending(unm, u)
    zeros = b.op("Mul", [node_idx, b.ints(0, "zero")])
    slot_a = b.op("ScatterElements", [zeros, unm, b.batch_range(0, u, unm)], {"axis": 1})
    dst = b.op("Add", [b.op("GatherElements", [node_idx, src], {"axis": 1}), b.num(u, "u")])
    slot_a = b.op("ScatterElements", [slot_a, src, dst], {"axis": 1})
    slot_b = b.batch_range(u, b.arith("Add", u, nb), unm)
    both = b.op("Concat", [slot_a, slot_b], {"axis": 1})  # [B, Na + Nb]: A tokens, then B tokens
    dest = b.op("Gather", [both, _interleave(b, n, na)], {"axis": 1})
    odd = b.op("Add", [b.op("Mul", [b.batch_range(0, nb, unm), b.ints(2, "two")]), b.ints(1, "one")])
    rep = b.op("Concat", [b.op("Mul", [unm, b.ints(2, "two")]), odd], {"axis": 1})
    if pb:  # slots in ToMe's order with the prefix tokens first (schedules.tome_order)
        order, inverse = _tome_order(b, prefix, u, nb)
        dest = b.op("Gather", [inverse, dest], {"axis": 0})
        rep = b.op("Gather", [rep, order], {"axis": 1})
    return dest, rep


def _tome_padded(b, metric: ir.Value, n, r, prefix: int, padding: ir.Value):
    """ToMe on a padded batch, as ``prunec.ops.merge.tome_assign`` with ``padding``: each row is
    matched as its R real tokens alone (A and B by a token's place among the real ones, r_row =
    min(r, (R − prefix) // 2)), its first R − r_row slots those of its text alone; the padding fills
    the row's last slots in order and the r − r_row padding tokens that M = N − r leaves no room for
    are dropped. On whole-sequence tensors ([B, N, N] scores, [B, N] ranks). ``r``: the batch's count,
    capped at (N − prefix) // 2."""
    i64 = ir.DataType.INT64
    one, two = b.ints(1, "one"), b.ints(2, "two")
    n_v, r_v = b.num(n, "n"), b.num(r, "r")  # [1] int64

    def cumsum(mask):  # [B, N] bool -> a token's place among those the mask holds (0-based)
        return b.op("Sub", [b.op("CumSum", [b.op("Cast", [mask], {"to": i64}), b.ints(1, "axis")]), one])

    real = b.op("Not", [padding])
    index = cumsum(real)
    real_n = b.reduce_sum(b.op("Cast", [real], {"to": i64}), [1], keepdims=1)  # [B, 1]
    r_row = b.op("Min", [b.op("Max", [b.op("Div", [b.op("Sub", [real_n, b.ints(prefix, "prefix")]), two]),
                                      b.ints(0, "zero")]), r_v])
    odd = b.op("Equal", [b.op("Mod", [index, two]), one])
    in_a, in_b = b.op("And", [real, b.op("Not", [odd])]), b.op("And", [real, odd])
    half = b.op("Div", [index, two])
    a_ok = b.op("And", [in_a, b.op("GreaterOrEqual", [half, b.ints((prefix + 1) // 2, "pa")])])
    b_ok = b.op("And", [in_b, b.op("GreaterOrEqual", [half, b.ints(prefix // 2, "pb")])])
    edges = b.op("And", [b.op("Unsqueeze", [a_ok, b.ints([2], "axes")]),
                         b.op("Unsqueeze", [b_ok, b.ints([1], "axes")])])  # [B, N, N]: A row to B column
    unit = unit_rows(b, metric)
    scores = b.op("MatMul", [unit, b.op("Transpose", [unit], {"perm": [0, 2, 1]})])  # [B, N, N]
    scores = b.op("Where", [edges, scores, b.floats(-np.inf, "ninf")])
    node_max = b.reduce("ReduceMax", scores, [2])
    node_idx = b.op("ArgMax", [scores], {"axis": 2, "keepdims": 0})
    _, by_max = b.op("TopK", [node_max, n_v], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # ties: index
    a_first = b.op("Cast", [b.op("GatherElements", [b.op("Cast", [in_a], {"to": i64}), by_max], {"axis": 1})],
                   {"to": ir.DataType.FLOAT})
    _, order = b.op("TopK", [a_first, n_v], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # stable
    by_edge = b.op("GatherElements", [by_max, order], {"axis": 1})
    positions = b.batch_range(0, n, padding)
    rank = b.op("ScatterElements", [positions, by_edge, positions], {"axis": 1})  # an A token's place
    merged = b.op("And", [in_a, b.op("Less", [rank, r_row])])
    u = b.op("Sub", [b.op("Div", [b.op("Add", [real_n, one]), two]), r_row])  # [B, 1]
    if prefix:
        unmerged_slot = cumsum(b.op("And", [in_a, b.op("Not", [merged])]))
    else:
        unmerged_slot = b.op("Sub", [rank, r_row])
    match = b.op("GatherElements", [index, node_idx], {"axis": 1})
    dest = b.op("Where", [odd, b.op("Add", [u, half]),
                          b.op("Where", [merged, b.op("Add", [u, b.op("Div", [match, two])]), unmerged_slot])])
    m = b.arith("Sub", n, r)
    pad_index = cumsum(padding)
    room = b.op("Sub", [b.op("Sub", [n_v, real_n]), b.op("Sub", [r_v, r_row])])
    dropped = b.op("And", [padding, b.op("GreaterOrEqual", [pad_index, room])])
    own = b.op("Sub", [real_n, r_row])  # the row's own slots
    dest = b.op("Where", [real, dest, b.op("Where", [dropped, b.num(m, "m"), b.op("Add", [own, pad_index])])])
    to = b.op("Where", [b.op("Or", [merged, dropped]), b.num(m, "m"), dest])
    slots = b.op("Concat", [b.batch_size(padding), b.num(b.arith("Add", m, 1), "m1")], {"axis": 0})
    zeros = b.op("ConstantOfShape", [slots], {"value": ir.tensor(np.zeros(1, np.int64))})
    rep = b.slice(b.op("ScatterElements", [zeros, to, positions], {"axis": 1}), 0, m)
    if prefix // 2:  # ToMe's order with a distillation token: the prefix tokens' slots first (per row's u)
        new = _prefix_slots_first(b, prefix, u, m)
        column = b.op("Concat", [b.batch_size(padding), b.ints([1], "one")], {"axis": 0})
        trash = b.op("Expand", [b.num(m, "m"), column])  # [B, 1]: a dropped token's dest stays M
        dest = b.op("GatherElements", [b.op("Concat", [new, trash], {"axis": 1}), dest], {"axis": 1})
        rep = b.op("ScatterElements", [rep, new, rep], {"axis": 1})
    return dest, rep


def _prefix_slots_first(b, prefix: int, u: ir.Value, m) -> ir.Value:
    """[B, M]: where each slot goes when the prefix tokens' slots come first in their original
    order (``u`` [B, 1]: each row's unmerged A slots), the others after them in order (as
    ``prunec.ops.merge._prefix_slots_first``)."""
    firsts = b.op("Concat", [b.op("Add", [b.op("Mul", [u, b.ints(0, "zero")]), b.ints(i // 2, "first")]) if i % 2 == 0
                             else b.op("Add", [u, b.ints(i // 2, "first")]) for i in range(prefix)], {"axis": 1})
    slots = b.op("Unsqueeze", [b.arange(0, m), b.ints([0, 2], "axes")])  # [1, M, 1]
    firsts3 = b.op("Unsqueeze", [firsts, b.ints([1], "axes")])  # [B, 1, prefix]
    is_first = b.op("Cast", [b.op("Equal", [slots, firsts3])], {"to": ir.DataType.INT32})  # [B, M, prefix]
    before = b.reduce_sum(b.op("Cast", [b.op("Less", [firsts3, slots])], {"to": ir.DataType.INT64}), [2])
    rest = b.op("Sub", [b.op("Add", [b.op("Squeeze", [slots, b.ints([2], "axes")]), b.ints(prefix, "prefix")]), before])
    place = b.op("ArgMax", [is_first], {"axis": 2, "keepdims": 0})
    first = b.op("Greater", [b.reduce("ReduceMax", is_first, [2]), b.const(np.array(0, np.int32), "zero")])
    return b.op("Where", [first, place, rest])


def _interleave(b, n, na) -> ir.Value:
    """[N] positions in (A tokens, then B tokens) of the tokens in their order: i // 2 for an
    even i (an A token), na + i // 2 for an odd one."""
    if not isinstance(n, ir.Value):
        return b.ints([i // 2 if i % 2 == 0 else na + i // 2 for i in range(n)], "interleave")
    i = b.arange(0, n)
    two = b.ints(2, "two")
    return b.op("Add", [b.op("Div", [i, two]), b.op("Mul", [b.op("Mod", [i, two]), na])])


def _tome_order(b, prefix: int, u, nb) -> tuple[ir.Value, ir.Value]:
    """``schedules.tome_order`` (the slot order with the prefix tokens first) as [M] int64 values,
    with its inverse permutation; at run time when ``u`` is a value (sorting a key: the prefix
    tokens' slots 0..prefix-1, every other slot its index + prefix)."""
    if not isinstance(u, ir.Value):
        order = tome_order(prefix, u, nb)
        inverse = np.empty(len(order), np.int64)
        inverse[np.array(order)] = np.arange(len(order))
        return b.ints(order, "order"), b.ints(inverse, "inverse")
    m = b.arith("Add", u, nb)
    firsts = b.op("Concat", [b.ints([i // 2], "first") if i % 2 == 0 else b.arith("Add", u, i // 2)
                             for i in range(prefix)], {"axis": 0})
    key = b.op("ScatterElements", [b.op("Add", [b.arange(0, m), b.ints(prefix, "prefix")]), firsts,
                                   b.ints(np.arange(prefix), "ranks")], {"axis": 0})

    def argsort(x):
        _, idx = b.op("TopK", [b.op("Cast", [x], {"to": ir.DataType.FLOAT}), m], {"axis": 0, "largest": 0, "sorted": 1},
                      outputs=2)
        return idx
    order = argsort(key)
    return order, argsort(order)


def _prefix_or(b, n, prefix: int, fill, like: ir.Value) -> ir.Value:
    """[B, N] int64: the first ``prefix`` tokens their own index, every other token ``fill``."""
    if not isinstance(n, ir.Value) and not isinstance(fill, ir.Value):
        base = np.full((1, n), fill, np.int64)
        base[0, :prefix] = np.arange(prefix)
        return b.batch_const(base, like, "base")
    pos = b.arange(0, n)
    return b.batch_row(b.op("Where", [b.op("Less", [pos, b.ints(prefix, "prefix")]), pos, b.num(fill, "fill")]), like)


def evit_assign(b, scores: ir.Value, n, k, prefix: int, fuse: bool = True):
    """EViT (as ``prunec.ops.merge.evit_assign``): dest [B, N], weight [B, N, 1], rep [B, M]. ``n``, ``k``:
    counts (run-time values on a dynamic token count; the fused token is then there when N − prefix > k)."""
    rest_count = b.arith("Sub", n, prefix)
    cand = b.slice(scores, prefix, n)
    _, order = b.op("TopK", [cand, b.num(rest_count, "all")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    order = b.op("Add", [order, b.ints(prefix, "prefix")])
    top, rest = b.slice(order, 0, k), b.slice(order, k, rest_count)
    if isinstance(k, ir.Value):  # a short input keeps every token: in their order, as no cut would
        top = b.op("Where", [b.op("GreaterOrEqual", [k, b.num(rest_count)]), b.sort_ascending(top, k), top])
    fused = b.arith("Add", prefix, k)
    dest = b.op("ScatterElements", [_prefix_or(b, n, prefix, fused, scores), top, b.batch_range(prefix, fused, scores)],
                {"axis": 1})
    ones = b.ones_like(scores)
    weight = b.op("ScatterElements", [ones, rest, b.op("GatherElements", [scores, rest], {"axis": 1})], {"axis": 1})
    parts = [top]
    if prefix:
        parts.insert(0, b.batch_const(np.arange(prefix)[None, :], scores, "prefix_idx"))
    if fuse and (isinstance(rest_count, ir.Value) or rest_count > k):  # the first of the rest: the fused slot's rep
        parts.append(b.slice(rest, 0, 1))
    rep = b.op("Concat", parts, {"axis": 1}) if len(parts) > 1 else top
    return dest, b.op("Unsqueeze", [weight, b.ints([2], "axes")]), rep


def evit_count(b, keep: float, rest):
    """max(1, ceil(keep · rest)) in double, at most ``rest`` (int64 values of any shape)."""
    k = b.op("Cast", [b.op("Ceil", [b.op("Mul", [b.op("Cast", [rest], {"to": ir.DataType.DOUBLE}),
                                                 b.const(np.array([keep]), "keep")])])], {"to": ir.DataType.INT64})
    return b.op("Min", [b.op("Max", [k, b.ints([1], "one")]), rest])


def evit_padded(b, scores: ir.Value, padding: ir.Value, n: ir.Value, prefix: int, fuse: bool, keep: float):
    """EViT on a padded batch (as ``prunec.ops.merge._evit_padded``; ``padding`` [B, N] bool): row b
    keeps k_b of its real non-prefix tokens by ``keep`` on their count, fuses its other real ones into
    the slot right after them; the batch keeps k = max k_b, a row with fewer filling the slots after
    its fused one with its padding, then its next best. -> dest [B, N], weight [B, N, 1], rep [B, M]."""
    length = b.arith("Sub", n, prefix)
    pad = b.slice(padding, prefix, n)
    real = b.op("Sub", [length, b.reduce_sum(b.op("Cast", [pad], {"to": ir.DataType.INT64}), [1])])  # [B]
    own = evit_count(b, keep, real)
    k = b.reduce("ReduceMax", own, [0], keepdims=1)
    ninf = b.const(np.array(-np.inf, np.float32), "padding")
    _, order = b.op("TopK", [b.op("Where", [pad, ninf, b.slice(scores, prefix, n)]), length],
                    {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # real tokens best first, then padding
    rank = b.arange(0, length)
    axes = b.ints([1], "axes")
    own1, real1 = b.op("Unsqueeze", [own, axes]), b.op("Unsqueeze", [real, axes])
    neg = b.op("Neg", [rank])
    first = b.op("Where", [b.op("Equal", [own1, real1]), b.op("Neg", [order]), neg])  # all real kept: in order
    key = b.op("Where", [b.op("Less", [rank, own1]), first,
                         b.op("Where", [b.op("Less", [rank, real1]), b.op("Sub", [neg, b.arith("Mul", length, 3)]),
                                        b.op("Sub", [neg, b.arith("Mul", length, 2)])])])
    _, slots = b.op("TopK", [b.op("Cast", [key], {"to": ir.DataType.FLOAT}), length],
                    {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    ranked = b.op("Add", [b.op("GatherElements", [order, slots], {"axis": 1}), b.ints(prefix, "prefix")])
    top, rest = b.slice(ranked, 0, k), b.slice(ranked, k, length)
    if fuse:  # a fused slot when some token is not kept
        fused = b.op("Cast", [b.op("Greater", [length, k])], {"to": ir.DataType.INT64})  # [1]: 0 or 1
    else:
        fused = b.ints([0], "fused")
    slot = b.op("Add", [b.op("Add", [b.arange(0, k), b.ints(prefix, "prefix")]),
                        b.op("Mul", [b.op("Cast", [b.op("GreaterOrEqual", [b.arange(0, k), own1])],
                                          {"to": ir.DataType.INT64}), fused])])  # [B, k]: skips the fused slot
    fused_slot = b.op("Add", [b.op("Where", [b.op("Cast", [fused], {"to": ir.DataType.BOOL}), own1, k]),
                              b.ints(prefix, "prefix")])  # [B, 1]; slot M (dropped) without a fused slot
    pos = b.batch_row(b.arange(0, n), scores)
    dest = b.op("Where", [b.op("Less", [pos, b.ints(prefix, "prefix")]), pos, fused_slot])
    dest = b.op("ScatterElements", [dest, top, slot], {"axis": 1})
    zero = b.floats(0.0, "zero")
    rest_weight = b.op("Where", [b.op("GatherElements", [padding, rest], {"axis": 1}), zero,
                                 b.op("GatherElements", [scores, rest], {"axis": 1})])
    weight = b.op("ScatterElements", [b.ones_like(scores), rest, rest_weight], {"axis": 1})
    m = b.arith("Add", b.arith("Add", prefix, k), fused)
    rep = b.batch_range(0, b.arith("Add", m, 1), scores)  # the prefix tokens: themselves
    rep = b.op("ScatterElements", [rep, slot, top], {"axis": 1})
    spare = b.op("Concat", [order, b.op("Mul", [b.slice(pos, 0, 1), b.ints(0, "zero")])], {"axis": 1})  # L may be 0
    best_rest = b.op("GatherElements", [spare, own1], {"axis": 1})
    rep = b.op("ScatterElements", [rep, fused_slot, b.op("Add", [best_rest, b.ints(prefix, "prefix")])], {"axis": 1})
    return dest, b.op("Unsqueeze", [weight, b.ints([2], "axes")]), b.slice(rep, 0, m)


def _contextual_targets(b, n_rest, contextual: int) -> tuple[ir.Value, ir.Value, object]:
    """VisionZip's targets among the R rest tokens: positions 0, s, 2s, ... (stride s = max(1, R //
    contextual)), at most ``contextual`` of them; and the other positions. -> (targets [T], others
    [R − T], T); at run time when R is a value."""
    if not isinstance(n_rest, ir.Value):
        targets = list(range(0, n_rest, max(1, n_rest // contextual)))[:contextual]
        others = [i for i in range(n_rest) if i not in set(targets)]
        return b.ints(targets, "targets"), b.ints(others, "others"), len(targets)
    step = b.arith("Max", b.arith("Div", n_rest, contextual), 1)
    axes = b.ints([0], "axes")
    every = b.op("Range", [b.ints(0, "zero"), b.op("Squeeze", [n_rest, axes]), b.op("Squeeze", [step, axes])])
    targets = b.slice(every, 0, contextual, axis=0)
    count = b.dim(targets, 0)
    pos = b.arange(0, n_rest)
    is_target = b.op("And", [b.op("Equal", [b.op("Mod", [pos, step]), b.ints(0, "zero")]),
                             b.op("Less", [pos, b.op("Mul", [count, step])])])
    others = b.op("Squeeze", [b.op("NonZero", [b.op("Not", [is_target])]), axes])
    return targets, others, count


def visionzip_assign(b, scores: ir.Value, metric: ir.Value, n, dominant: int, contextual: int, prefix: int,
                     padding: ir.Value | None = None):
    """VisionZip (as ``prunec.ops.merge.visionzip_assign``): dest [B, N], weight [B, N, 1], rep [B, M].
    ``n``: a count (a run-time value on a dynamic token count: ``dominant`` is then capped at N and the
    contextual targets are as many as the rest tokens give, :meth:`Contextual.counts`). ``padding``
    [B, N] bool: a token joins a target of its own kind (padding or real) when there is one."""
    dominant = b.arith("Min", dominant, n)
    _, top = b.op("TopK", [b.slice(scores, prefix, n), b.num(b.arith("Sub", dominant, prefix), "d")],
                  {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    top = b.op("Add", [top, b.ints(prefix, "prefix")])
    if isinstance(n, ir.Value):
        pos = b.op("Cast", [b.op("Unsqueeze", [b.arange(0, n), b.ints([0], "axes")])], {"to": ir.DataType.FLOAT})
        flag = b.batch_row(b.op("Cast", [b.op("Less", [b.arange(0, n), b.ints(prefix, "prefix")])],
                                {"to": ir.DataType.FLOAT}), scores)
        n_f = b.op("Cast", [n], {"to": ir.DataType.FLOAT})
    else:
        flag = np.zeros((1, n), np.float32)
        flag[0, :prefix] = 1.0
        flag = b.batch_const(flag, scores, "flag")
        pos, n_f = b.floats(np.arange(n, dtype=np.float32)[None, :], "pos"), b.floats(float(n), "n")
    keep = b.op("ScatterElements", [flag, top, b.ones_like(b.op("Cast", [top], {"to": ir.DataType.FLOAT}))], {"axis": 1})
    key = b.op("Sub", [pos, b.op("Mul", [keep, n_f])])  # kept first, each part in original order
    _, order = b.op("TopK", [key, b.num(n, "all")], {"axis": 1, "largest": 0, "sorted": 1}, outputs=2)
    dom, rest = b.slice(order, 0, dominant), b.slice(order, dominant, n)
    n_rest = b.arith("Sub", n, dominant)
    ones = b.ones_like(scores)
    if not (contextual and (isinstance(n_rest, ir.Value) or n_rest)):
        dest = b.op("ScatterElements", [b.op("Expand", [b.num(dominant, "drop"), b.op("Shape", [scores])]), dom,
                                        b.batch_range(0, dominant, scores)], {"axis": 1})
        return dest, b.op("Unsqueeze", [ones, b.ints([2], "axes")]), dom
    targets, others, t = _contextual_targets(b, n_rest, contextual)
    m_slots = b.arith("Add", dominant, t)
    dest = b.op("ScatterElements", [b.op("Expand", [b.num(m_slots, "drop"), b.op("Shape", [scores])]), dom,
                                    b.batch_range(0, dominant, scores)], {"axis": 1})
    t_idx = b.op("Gather", [rest, targets], {"axis": 1})
    o_idx = b.op("Gather", [rest, others], {"axis": 1})
    m = unit_rows(b, metric)
    axes2 = b.ints([2], "axes")
    mt = b.op("GatherND", [m, b.op("Unsqueeze", [t_idx, axes2])], {"batch_dims": 1})
    mo = b.op("GatherND", [m, b.op("Unsqueeze", [o_idx, axes2])], {"batch_dims": 1})
    sim = b.op("MatMul", [mo, b.op("Transpose", [mt], {"perm": [0, 2, 1]})])  # [B, R - T, T]
    if padding is not None:
        flags = b.op("Cast", [padding, ], {"to": ir.DataType.FLOAT})
        pad_o = b.op("Greater", [b.op("GatherElements", [flags, o_idx], {"axis": 1}), b.floats(0.5, "half")])
        pad_t = b.op("Greater", [b.op("GatherElements", [flags, t_idx], {"axis": 1}), b.floats(0.5, "half")])
        cross = b.op("Xor", [b.op("Unsqueeze", [pad_o, axes2]), b.op("Unsqueeze", [pad_t, b.ints([1], "axes")])])
        sim = b.op("Where", [cross, b.floats(CROSS, "cross"), sim])
    choice = b.op("ArgMax", [sim], {"axis": 2, "keepdims": 0})
    ones_o = b.ones_like(b.op("Cast", [choice], {"to": ir.DataType.FLOAT}))
    counts = scatter_sum(b, b.op("Unsqueeze", [ones_o, axes2]), choice, t, 1)  # [B, T, 1]
    counts = b.op("Max", [b.op("Squeeze", [counts, axes2]), b.floats(1.0, "one")])
    dest = b.op("ScatterElements", [dest, t_idx, b.batch_range(dominant, m_slots, scores)], {"axis": 1})
    dest = b.op("ScatterElements", [dest, o_idx, b.op("Add", [choice, b.num(dominant, "d")])], {"axis": 1})
    inv = b.op("Div", [b.floats(1.0, "one"), b.op("GatherElements", [counts, choice], {"axis": 1})])
    weight = b.op("ScatterElements", [ones, o_idx, inv], {"axis": 1})
    rep = b.op("Concat", [dom, t_idx], {"axis": 1})
    return dest, b.op("Unsqueeze", [weight, axes2]), rep


def ppt_assign(b, site, values, cls_scores: ir.Value, metric: ir.Value, n, r, prefix: int, threshold: float,
               padding: ir.Value | None = None):
    """PPT (as ``prunec.ops.merge.ppt_scores`` + ``ppt_assign``): dest [B, N], rep [B, N - r]. ``n``, ``r``:
    counts (a run-time N caps r at run time at (N − prefix) // 2, as ToMe); ``padding``: as for
    :func:`tome_assign` (its pooling)."""
    if isinstance(n, ir.Value):
        r = b.arith("Min", r, b.arith("Div", b.arith("Sub", n, prefix), 2))
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
    dof = b.arith("Sub", n, prefix + 1)
    dof = b.op("Cast", [dof], {"to": ir.DataType.FLOAT}) if isinstance(dof, ir.Value) else b.floats(float(dof), "dof")
    var = b.op("Div", [b.reduce_sum(b.op("Mul", [centered, centered]), [1], keepdims=1), dof])
    pool = b.op("Less", [var, b.floats(float(threshold), "threshold")])  # [B, 1]
    dest_m, rep_m = tome_assign(b, metric, n, r, prefix, padding)
    _, order = b.op("TopK", [scores, b.num(n, "all")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    m = b.arith("Sub", n, r)
    kept = b.slice(order, 0, m)
    dest_p = b.op("ScatterElements", [b.op("Expand", [b.num(m, "drop"), b.op("Shape", [scores])]), kept,
                                      b.batch_range(0, m, scores)], {"axis": 1})
    return b.op("Where", [pool, dest_m, dest_p]), b.op("Where", [pool, rep_m, kept])


def scatter_sum(b, x: ir.Value, dest: ir.Value, m: int, width: int) -> ir.Value:
    """Σ over tokens with the same dest: x [B, N, width] -> [B, M, width] (slot M dropped).
    One ScatterND with ``reduction="add"`` over rows of a [B·(M+1), width] view: the index is
    [B·N, 1], not a [B, N, width] tensor, and ORT adds whole rows. Before opset 16 (no
    reductions in the scatters) a one-hot product does the same sum: OneHot(dest, M)ᵀ [B, M, N]
    @ x (an index M is out of range, so its row of the one-hot matrix is zero: dropped)."""
    if b.opset < 16:
        if isinstance(m, ir.Value):  # ORT refuses a depth of 0 (no slot at all): at least 1, cut back to M
            depth = b.op("Max", [m, b.ints([1], "one")])
            onehot = b.op("OneHot", [dest, depth, b.floats([0.0, 1.0], "off_on")], {"axis": 1})
            return b.slice(b.op("MatMul", [onehot, x]), 0, m)
        onehot = b.op("OneHot", [dest, b.num(m, "depth"), b.floats([0.0, 1.0], "off_on")], {"axis": 1})  # [B, M, N]
        return b.op("MatMul", [onehot, x])
    slots = b.num(b.arith("Add", m, 1), "slots")  # [1]: M + 1
    batch = b.batch_size(dest)
    offsets = b.op("Mul", [b.op("Range", [b.ints(0, "zero"), b.op("Squeeze", [batch, b.ints([0], "axes")]),
                                          b.ints(1, "one")]), slots])
    flat = b.op("Add", [dest, b.op("Unsqueeze", [offsets, b.ints([1], "axes")])])
    flat = b.op("Reshape", [flat, b.ints([-1, 1], "rows")])
    shape = b.op("Concat", [b.op("Mul", [batch, slots]), b.ints([width], "width")], {"axis": 0})
    zeros = b.op("Expand", [b.floats(np.zeros((1, width), np.float32), "zeros"), shape])
    out = b.op("ScatterND", [zeros, flat, b.op("Reshape", [x, b.ints([-1, width], "flat")])], {"reduction": "add"})
    if isinstance(m, ir.Value):
        view = b.op("Concat", [b.ints([-1], "batch"), slots, b.ints([width], "width")], {"axis": 0})
    else:
        view = b.ints([-1, m + 1, width], "slots")
    return b.slice(b.op("Reshape", [out, view]), 0, m)


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


def lower_merge(b, cut, values, size_in: ir.Value | None, biases: dict, padding: ir.Value | None = None):
    """The merged stream [B, M, C] (in the stream's float type; merged in float32), dest [B, N]
    and rep [B, M] of a merge cut. ``biases``: site node name -> the log-size bias an earlier cut
    of the plan adds to it (read by the scores of a fused site). ``padding`` [B, N] bool: which
    tokens entering the cut are padding (ToMe matches each row as its real tokens alone; VisionZip
    joins padding with padding)."""
    r = cut.reduce
    bias = biases.get(r.site.node.ref.name)
    n = b.dim(values[cut.stream.name], 1) if r.dynamic else cut.num_tokens
    dt = cut.stream.dtype
    x = b.as_f32(values[cut.stream.name], dt)
    if size_in is not None:
        size_in = b.as_f32(size_in, dt)  # sizes live in the stream's type
    c = cut.stream.shape[-1]
    weight = None
    if isinstance(r, Bipartite):
        dest, rep = tome_assign(b, site_keys(b, r.site, values), n, r.r, r.prefix, padding)
        weight = size_in
    elif isinstance(r, Fuse):
        scores = site_scores(b, r.site, 0, values, n, bias)
        if padding is not None and r.keep is not None:  # counted per row
            dest, weight, rep = evit_padded(b, scores, padding, n, r.prefix, r.fuse, r.keep)
        else:  # on a dynamic token count: min(max(1, ceil(keep · (N − prefix))), N − prefix)
            k = r.k if r.keep is None else evit_count(b, r.keep, b.arith("Sub", n, r.prefix))
            dest, weight, rep = evit_assign(b, scores, n, k, r.prefix, r.fuse)
    elif isinstance(r, Contextual):
        dest, weight, rep = visionzip_assign(b, site_scores(b, r.site, 0, values, n, bias), site_keys(b, r.site, values), n,
                                             r.dominant, r.contextual, r.prefix, padding)
    elif isinstance(r, Adaptive):
        dest, rep = ppt_assign(b, r.site, values, site_scores(b, r.site, 0, values, n, bias), site_keys(b, r.site, values), n,
                               r.r, r.prefix, r.threshold, padding)
        weight = size_in
    else:
        raise PruneError(f"the ONNX backend cannot lower {type(r).__name__}")
    m = b.dim(rep, 1) if r.dynamic else cut.kept
    merged = b.as_dtype(merge(b, x, dest, weight, m, c, r.normalize), dt)
    rep.name = f"{cut.tag}/keep_idx"
    dest.name = f"{cut.tag}/dest"
    return merged, dest, rep

