"""Lower a Plan onto an ONNX graph (onnx-ir) with standard ops, and run it in ORT.

Scores: Gather/ReduceMean over materialized probabilities, or MatMul/Softmax over
one query row of q and kᵀ for fused attention. Selection: Slice -> TopK -> Add ->
Concat with the kept prefix/suffix -> sort (TopK on the index values). Gathering:
GatherND with ``batch_dims=1`` on a [B, N, ...] view of each crossing edge. Token
counts are static constants; the batch dimension stays dynamic. Every cut of a Plan is lowered
into one clone of the graph (:func:`lower_onnx`).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import PruneError
from ..ir.session import graph_only_proto, make_session, providers  # noqa: F401  (re-exported: their home before)
from ..passes.analysis.blocks import BIAS_TAG, RECOVER_TAG, RECOVERED_TAG, REWEIGH_TAG, LOGSIZE_TAG, MEANW_TAG, SIZE_TAG, split_role
from ..passes.base import Cut, Diverse, GridPool, Merge, PageRank, Plan, Random, TopK
from ..schedules import HASH_MULTIPLIER, MERSENNE31, PARK_MILLER, hash_offset, random_scores, wpr_start
from .onnx_build import _attention_rows, _Builder, _same_dtype, length_valid, site_scores, site_tensor
from .onnx_merge import lower_merge, merge_sizes, scatter_sum, unit_rows


def _zero_tprune(b: _Builder, r: PageRank, values: dict[str, ir.Value], counts, bias=None, padding=None):
    """Zero-TPrune's I′ -> S -> I selection (as ``prunec.ops.select_zero_tprune``) -> (span picks
    [B, k], k). ``counts``: (N, start, end, k) of the span (numbers, or run-time values on a dynamic
    token count). ``padding`` [B, N] bool (a padded batch): counted per row (:func:`_zero_tprune_padded`)."""
    n, lo, hi, k = counts
    site = r.site
    if site.probs is not None:
        probs = b.as_f32(values[site.probs.name], site.probs.dtype)
        keys = b.op("Transpose", [b.as_f32(values[site.k_t.name], site.k_t.dtype)], {"perm": [0, 3, 1, 2]})  # [B, N, H, D]
    else:
        probs = _attention_rows(b, site, values, "mean", n, bias)
        k4, _ = site_tensor(b, site, values, "k")
        keys = b.op("Transpose", [k4], {"perm": [0, 2, 1, 3]})
    keys = b.op("Reshape", [keys, b.ints([0, 0, -1], "keys")])  # [B, N, Dk]
    if padding is not None:
        return _zero_tprune_padded(b, r, probs, keys, padding, counts)
    # s <- Aᵀ s as the row vector sᵀ A: [B, H, 1, N]
    s = b.op("MatMul", [_wpr_start(b, n, r.cls), probs])
    s1 = s
    for _ in range(r.iters - 1):
        s = b.op("MatMul", [s, probs])

    imp = b.slice(_eir(b, s), lo, hi)
    size = b.arith("Sub", hi, lo)
    drop = r.drop_similar
    if r.rule is not None:  # min(round(similar · (L − k)), L // 2), Python's rounding (half to even)
        drop = b.arith("Min", _round_times(b, b.arith("Sub", size, k), r.similar), b.arith("Div", size, 2))
    if isinstance(drop, ir.Value) or drop > 0:
        rank = b.slice(_eir(b, s1), lo, hi)
        _, order = b.op("TopK", [rank, b.num(size, "all")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
        nb = b.arith("Sub", size, b.arith("Div", size, 2))
        b_idx = b.slice(order, 0, nb)
        a_idx = b.slice(order, nb, size)
        kf = unit_rows(b, b.slice(keys, lo, hi))
        axes2 = b.ints([2], "axes")
        ka = b.op("GatherND", [kf, b.op("Unsqueeze", [a_idx, axes2])], {"batch_dims": 1})
        kb = b.op("GatherND", [kf, b.op("Unsqueeze", [b_idx, axes2])], {"batch_dims": 1})
        best = b.reduce("ReduceMax", b.op("MatMul", [ka, b.op("Transpose", [kb], {"perm": [0, 2, 1]})]), [2])
        _, worst = b.op("TopK", [best, b.num(drop, "r")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
        drop = b.op("GatherElements", [a_idx, worst], {"axis": 1})
        ninf = b.op("Expand", [b.floats([[-np.inf]], "ninf"), b.op("Shape", [drop])])
        imp = b.op("ScatterElements", [imp, drop, ninf], {"axis": 1})
    _, top = b.op("TopK", [imp, b.num(k, "k")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    return top, k


def _eir(b: _Builder, x: ir.Value) -> ir.Value:
    """Root-mean-square over heads: [B, H, 1, N] -> [B, N]."""
    return b.op("Squeeze", [b.op("Sqrt", [b.reduce_mean(b.op("Mul", [x, x]), [1])]), b.ints([1], "axes")])


def _zero_tprune_padded(b: _Builder, r: PageRank, probs: ir.Value, keys: ir.Value, padding: ir.Value, counts) -> tuple:
    """Zero-TPrune on a padded batch (as ``prunec.ops.tokens._zero_tprune_padded``): each row's WPR start is
    uniform over its real tokens (CLS weighted √n_b), its S-stage halves, drop_b and k_b are counted on its
    real span tokens; the top k_b real tokens, the batch keeping k = max k_b (:func:`_real_tokens_top`).
    probs [B, H, N, N], keys [B, N, Dk] -> (span picks [B, k], k [1])."""
    n, lo, hi, _ = counts
    s0 = _wpr_start(b, n, r.cls, b.op("Not", [padding]))  # [B, N]
    s1 = b.op("MatMul", [b.op("Unsqueeze", [s0, b.ints([1, 2], "axes")]), probs])  # [B, H, 1, N]
    s = s1
    for _ in range(r.iters - 1):
        s = b.op("MatMul", [s, probs])
    imp = b.slice(_eir(b, s), lo, hi)
    pad = b.slice(padding, lo, hi)
    length = b.arith("Sub", hi, lo)
    _, real, own = _real_counts(b, r.rule, pad, length)
    drop = b.op("Min", [_round_times(b, b.op("Sub", [real, own]), r.similar), b.op("Div", [real, b.ints(2, "two")])])
    ninf = b.floats(-np.inf, "ninf")
    _, order = b.op("TopK", [b.op("Where", [pad, ninf, b.slice(_eir(b, s1), lo, hi)]), b.num(length, "l")],
                    {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)  # real tokens by rank, then padding
    rank = b.arange(0, length)
    axes = b.ints([1], "axes")
    real1 = b.op("Unsqueeze", [real, axes])
    nb = b.op("Sub", [real1, b.op("Div", [real1, b.ints(2, "two")])])
    in_b = b.op("Less", [rank, nb])
    in_a = b.op("And", [b.op("Not", [in_b]), b.op("Less", [rank, real1])])
    kf = unit_rows(b, b.slice(keys, lo, hi))
    ko = b.op("GatherND", [kf, b.op("Unsqueeze", [order, b.ints([2], "axes")])], {"batch_dims": 1})  # rank order
    sim = b.op("MatMul", [ko, b.op("Transpose", [ko], {"perm": [0, 2, 1]})])
    best = b.reduce("ReduceMax", b.op("Where", [b.op("Unsqueeze", [in_b, axes]), sim, ninf]), [2])
    best = b.op("Where", [in_a, best, ninf])  # [B, L]: A's tokens' best match in B
    _, worst = b.op("TopK", [best, b.num(length, "l")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    chosen = b.op("Cast", [b.op("Less", [rank, b.op("Unsqueeze", [drop, axes])])], {"to": ir.DataType.INT64})
    zeros = b.op("Mul", [order, b.ints(0, "zero")])
    dropped = b.op("ScatterElements", [zeros, worst, chosen], {"axis": 1})  # rank space
    dropped = b.op("ScatterElements", [zeros, order, dropped], {"axis": 1})  # token space
    imp = b.op("Where", [b.op("Cast", [dropped], {"to": ir.DataType.BOOL}),
                         b.floats(np.finfo(np.float32).min, "dropped"), imp])  # below kept ones, above padding
    return _real_tokens_top(b, r.rule, imp, pad, length, np.float32)


def _wpr_start(b: _Builder, n, cls: int | None, real: ir.Value | None = None) -> ir.Value:
    """Zero-TPrune's initial importance [1, N] float32 (``schedules.wpr_start``): uniform, the CLS
    token weighted √N, summing to 1; on a run-time N computed in double as Python does. ``real``
    [B, N] bool (a padded batch) -> [B, N]: per row over its n_b real tokens (√n_b for the CLS token
    when it is real), padding 0."""
    if real is None and not isinstance(n, ir.Value):
        return b.floats(np.array(wpr_start(n, cls), np.float32)[None, :], "s0")
    positions = b.op("Unsqueeze", [b.arange(0, n), b.ints([0], "axes")])  # [1, N]
    if real is None:
        count = b.op("Cast", [n], {"to": ir.DataType.DOUBLE})
        ones = b.op("Expand", [b.const(np.array([[1.0]]), "one"), b.op("Shape", [positions])])
    else:
        ones = b.op("Cast", [real], {"to": ir.DataType.DOUBLE})
        count = b.reduce_sum(ones, [1], keepdims=1)  # n_b [B, 1]
    if cls is None:
        return b.op("Cast", [b.op("Div", [ones, count])], {"to": ir.DataType.FLOAT})
    at_cls = b.op("Equal", [positions, b.ints(cls, "cls")])
    root = b.op("Sqrt", [count])
    total = b.op("Add", [b.op("Sub", [count, b.const(np.array([1.0]), "one")]), root])
    if real is not None:  # a CLS token that is padding weighs nothing
        at_cls = b.op("And", [at_cls, real])
        cls_real = b.op("Greater", [b.reduce_sum(b.op("Cast", [at_cls], {"to": ir.DataType.DOUBLE}), [1], keepdims=1),
                                    b.const(np.array(0.0), "zero")])
        total = b.op("Where", [cls_real, total, count])
    start = b.op("Where", [at_cls, root, ones])
    return b.op("Cast", [b.op("Div", [start, total])], {"to": ir.DataType.FLOAT})


def _round_times(b: _Builder, count: ir.Value, ratio: float) -> ir.Value:
    """round(ratio · count) as a [1] int64 value, in double and half to even, as Python rounds."""
    x = b.op("Mul", [b.op("Cast", [count], {"to": ir.DataType.DOUBLE}), b.const(np.array([ratio], np.float64), "ratio")])
    return b.op("Cast", [b.op("Round", [x])], {"to": ir.DataType.INT64})


def _span_counts(b: _Builder, cut: Cut, n, past: ir.Value | None = None) -> tuple:
    """(start, end, k) of a selection's span: the plan's numbers, or (a dynamic token count: ``n``
    a run-time value) computed by its :class:`~prunec.passes.base.CountRule` as ``resolve`` does:
    ends clipped to [0, N], k = ``count`` capped at the span length L, or max(1, min(L, round(keep · L))).
    ``past``: a decoder's cache length [1] (the span is empty when it is not 0)."""
    r = cut.reduce
    if r.rule is None:
        return r.span_start, r.span_end, r.k
    rule = r.rule

    def bound(offset: int, from_end: bool, low):  # clipped to [low, N]
        if from_end:  # N − offset may be negative: a real Max (arith folds max(x, 0) for counts, x >= 0)
            return b.arith("Min", b.op("Max", [b.arith("Sub", n, offset), b.num(low, "low")]), n)
        return b.arith("Min", b.arith("Max", offset, low), n)
    start = bound(rule.start, rule.start_from_end, 0)
    end = bound(rule.end, rule.end_from_end, start)
    if past is not None:  # a decoder prunes in its prefill only: with entries in the cache the span is empty
        cached = b.op("Greater", [past, b.ints([0], "zero")])
        end = b.op("Where", [cached, b.num(start, "start"), b.num(end, "end")])
    length = b.arith("Sub", end, start)
    if rule.count is not None:
        return start, end, b.arith("Min", length, rule.count)
    return start, end, b.arith("Min", length, b.arith("Max", _round_times(b, length, rule.keep), 1))


def _random_scores(b: _Builder, n, seed: int, like: ir.Value) -> ir.Value:
    """The `random` pass's seeded scores [B, N] (``schedules.random_scores``: ranks of Park–Miller
    hashes of the positions; on a run-time N the hashes themselves, in double: the same order)."""
    if not isinstance(n, ir.Value):
        return b.batch_const(np.array(random_scores(n, seed), np.float32)[None, :], like, "ranks")
    h = b.op("Add", [b.op("Mul", [b.op("Add", [b.arange(0, n), b.ints(1, "one")]), b.ints(HASH_MULTIPLIER, "a")]),
                     b.ints(hash_offset(seed), "c")])
    h = b.op("Mod", [h, b.ints(MERSENNE31, "p")])
    for _ in range(3):
        h = b.op("Mod", [b.op("Mul", [h, b.ints(PARK_MILLER, "pm")]), b.ints(MERSENNE31, "p")])
    return b.batch_row(b.op("Cast", [h], {"to": ir.DataType.DOUBLE}), like)


def _per_token(b: _Builder, x: ir.Value, tokens: ir.Value, positions: ir.Value | None) -> ir.Value:
    """The entries of a per-token input ``x`` [B, T] (an attention mask [B, past + S], input ids
    [B, S]: the last S entries are the ``tokens`` [B, S, C] the model was given) for the tokens
    entering a cut, [B, N] (``positions`` [B, N]: the original positions of the tokens an earlier
    cut kept)."""
    own = b.slice(x, b.arith("Sub", b.dim(x, 1), b.dim(tokens, 1)), np.iinfo(np.int64).max)
    return own if positions is None else b.op("GatherElements", [own, positions], {"axis": 1})


def _padding(b: _Builder, cut: Cut, values: dict[str, ir.Value], positions: ir.Value | None,
             tokens: ir.Value) -> ir.Value | None:
    """Where the tokens entering ``cut`` are padding, [B, N] bool (``cut.padding``: the attention
    mask input of a decoder with a KV cache, or of a padded encoder)."""
    if cut.padding is None:
        return None
    mask = values[cut.padding]
    return b.op("Equal", [_per_token(b, mask, tokens, positions), b.const(np.array(0, mask.dtype.numpy()), "zero")])


def _rule_count(b: _Builder, rule, length: ir.Value) -> ir.Value:
    """k of a span of ``length`` tokens (any shape, int64) by the rule: ``count`` capped at the
    length, or max(1, round(keep · length)) capped at it (0 for an empty span)."""
    if rule.count is not None:
        return b.op("Min", [length, b.ints([rule.count], "count")])
    return b.op("Min", [length, b.op("Max", [_round_times(b, length, rule.keep), b.ints([1], "one")])])


def _real_counts(b: _Builder, rule, pad: ir.Value, length) -> tuple:
    """A span of ``length`` tokens with padding (``pad`` [B, L] bool): per row (its padding p [B],
    its real tokens L − p [B], k of them by the rule [B])."""
    p = b.reduce_sum(b.op("Cast", [pad], {"to": ir.DataType.INT64}), [1])
    real = b.op("Sub", [length, p])
    return p, real, _rule_count(b, rule, real)


def _real_tokens_top(b: _Builder, rule, span: ir.Value, pad: ir.Value, length, dtype) -> tuple:
    """A span with padding, in an encoder (``span`` [B, L] scores in ``dtype``, ``pad`` [B, L] bool):
    each row picks the top k_b of its real tokens, k_b by the rule on its real span length; the
    batch keeps k = max k_b, a row with fewer filling up with its padding (masked, so the row's
    result is that of its text alone), then its next best tokens. Returns (picks [B, k] span-relative,
    unsorted; k [1])."""
    _, real, own = _real_counts(b, rule, pad, length)
    k = b.reduce("ReduceMax", own, [0], keepdims=1)
    ranked = b.op("Where", [pad, b.const(np.array(-np.inf, dtype), "padding"), span])
    _, order = b.op("TopK", [ranked, b.num(length, "l")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    rank = b.arange(0, length)  # slot r of a row's order: its real tokens best first, then its padding
    axes = b.ints([1], "axes")
    own, real = b.op("Unsqueeze", [own, axes]), b.op("Unsqueeze", [real, axes])
    neg = b.op("Neg", [rank])
    key = b.op("Where", [b.op("Less", [rank, own]), neg,  # its own k best, then padding, then the rest
                         b.op("Where", [b.op("Less", [rank, real]), b.op("Sub", [neg, b.arith("Mul", length, 2)]),
                                        b.op("Sub", [neg, b.num(length, "l")])])])
    _, slots = b.op("TopK", [b.op("Cast", [key], {"to": ir.DataType.FLOAT}), k], {"axis": 1, "largest": 1,
                                                                                 "sorted": 1}, outputs=2)
    return b.op("GatherElements", [order, slots], {"axis": 1}), k


def _token_span_top(b: _Builder, rule, scores: ir.Value, ids: ir.Value, n, start, end, dtype,
                    padding: ir.Value | None = None) -> tuple:
    """span=token:ID: each sample's span is where its ``ids`` [B, N] equal ID within [start, end)
    (never ``padding`` [B, N], even with ID as its id; ``scores`` [B, N] in ``dtype``);
    it keeps k of its span by the rule on its own span length and every other token; the batch
    keeps M = the largest such count. Returns (picks [B, M] unsorted, M [1])."""
    pos = b.arange(0, n)
    inside = b.op("And", [b.op("GreaterOrEqual", [pos, b.num(start, "start")]), b.op("Less", [pos, b.num(end, "end")])])
    ids = b.op("Cast", [ids], {"to": ir.DataType.INT64})
    in_span = b.op("And", [b.op("Equal", [ids, b.const(np.array(rule.token_id, np.int64), "id")]), inside])
    if padding is not None:
        in_span = b.op("And", [in_span, b.op("Not", [padding])])
    length = b.reduce_sum(b.op("Cast", [in_span], {"to": ir.DataType.INT64}), [1])
    kept = b.op("Add", [b.op("Sub", [b.num(n, "n"), length]), _rule_count(b, rule, length)])
    m = b.reduce("ReduceMax", kept, [0], keepdims=1)
    ranked = b.op("Where", [in_span, scores, b.const(np.array(np.inf, dtype), "outside")])  # the rest: always kept
    _, top = b.op("TopK", [ranked, m], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    return top, m


def _count_with_padding(b: _Builder, rule, pad: ir.Value, length) -> ir.Value:
    """k for a span that holds padding (``pad`` [B, L] bool; ``length``: L): each row keeps all its
    padding p and k of its real tokens by the rule on L − p; the batch keeps the largest such count
    ([1] int64), so a row with fewer keeps more of its best real tokens."""
    p, _, k = _real_counts(b, rule, pad, length)
    return b.reduce("ReduceMax", b.op("Add", [p, k]), [0], keepdims=1)


def _selection(b: _Builder, cut: Cut, values: dict[str, ir.Value], biases: dict,
               padding: ir.Value | None = None, ids: ir.Value | None = None) -> ir.Value | None:
    """Nodes computing the kept indices [B, M] of ``cut``. ``biases``: site node name -> the
    log-size bias an earlier cut of the plan adds to it. On a dynamic token count (the reduction
    has a ``rule``) N, the span, k and M are computed at run time. ``padding`` [B, N] bool: tokens
    ranked first (a decoder's cache keeps padding, so that decode steps find it masked). ``ids``
    [B, N]: the entering tokens' input ids (``span=token:ID``)."""
    r = cut.reduce
    if isinstance(r, GridPool):  # side inputs follow each window's first token
        reps = r.representatives()
        idx = b.batch_const([reps], values[cut.stream.name], "reps")
        idx.name = f"{cut.tag}/keep_idx"
        return idx
    stream = values[cut.stream.name]
    n = b.dim(stream, 1) if r.rule is not None else cut.num_tokens
    start, end, k = _span_counts(b, cut, n, b.dim(values[cut.past], 2) if cut.past else None)
    if isinstance(r, Diverse):
        top, k = _diverse(b, b.as_f32(values[r.features.name], r.features.dtype), start, end, k,
                          padding if cut.pad_last else None, r.rule)
    elif isinstance(r, PageRank):
        top, k = _zero_tprune(b, r, values, (n, start, end, k), biases.get(r.site.node.ref.name),
                              padding if cut.pad_last else None)
    else:
        if isinstance(r, Random):
            scores = _random_scores(b, n, r.seed, stream)
        elif isinstance(r, TopK):
            site = r.score.site
            real = b.op("Not", [padding]) if padding is not None and cut.pad_last and r.score.query == "mean" else None
            scores = site_scores(b, site, r.score.query, values, None if r.rule is not None else n,
                                 biases.get(site.node.ref.name), real)
        else:
            raise PruneError(f"the ONNX backend cannot lower {type(r).__name__}")
        dtype = np.float64 if isinstance(r, Random) else np.float32  # the scores' type
        if cut.past and isinstance(r, TopK):  # attention over the cache and the new tokens: the new ones' columns
            scores = b.slice(scores, b.arith("Sub", b.dim(scores, 1), n), np.iinfo(np.int64).max)
        if ids is not None:
            top, m = _token_span_top(b, r.rule, scores, ids, n, start, end, dtype, padding)
            out = b.sort_ascending(top, m)
            out.name = f"{cut.tag}/keep_idx"
            return out
        if padding is not None and cut.pad_last:
            top, k = _real_tokens_top(b, r.rule, b.slice(scores, start, end), b.slice(padding, start, end),
                                      b.arith("Sub", end, start), dtype)
            return _with_fixed(b, top, stream, (n, start, end, k), cut.tag)
        if padding is not None:
            scores = b.op("Where", [padding, b.const(np.array(np.inf, dtype), "padding"), scores])
            k = _count_with_padding(b, r.rule, b.slice(padding, start, end), b.arith("Sub", end, start))
        span = scores if (not isinstance(start, ir.Value) and start == 0 and end is n) else b.slice(scores, start, end)
        _, top = b.op("TopK", [span, b.num(k, "k")], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    return _with_fixed(b, top, stream, (n, start, end, k), cut.tag)


def _diverse(b: _Builder, x: ir.Value, lo, hi, k, padding: ir.Value | None = None, rule=None) -> tuple:
    """DivPrune's greedy max-min selection over the span [lo, hi) of x [B, N, C] -> (span picks [B, k],
    k) (same algorithm as ``prunec.ops.select_diverse``; the k−1 greedy steps run in a Loop). With
    run-time counts a short input's empty span is widened to one token and the loop runs at least
    once, so no op sees an empty axis; the picks are then cut back to k. ``padding`` [B, N] bool (a
    padded encoder batch; with the count ``rule``): padding is at infinite distance from every token,
    each row picks its own k_b (the rule on its real span tokens) real tokens as it would alone, then
    its padding, then its next real ones; k = max k_b."""
    dynamic = isinstance(k, ir.Value)
    if dynamic:
        lo = b.arith("Min", lo, b.arith("Sub", b.dim(x, 1), 1))
        hi = b.arith("Max", hi, b.arith("Add", lo, 1))
    pad = own = None
    if padding is not None:
        pad = b.slice(padding, lo, hi)  # [B, S]
        _, _, own = _real_counts(b, rule, pad, b.arith("Sub", hi, lo))
        k = b.reduce("ReduceMax", own, [0], keepdims=1)
    s = unit_rows(b, b.slice(x, lo, hi))
    sim = b.op("MatMul", [s, b.op("Transpose", [s], {"perm": [0, 2, 1]})])
    dist = b.op("Sub", [b.floats(1.0, "one"), sim])  # [B, S, S]
    size = b.arith("Sub", hi, lo)
    if isinstance(size, ir.Value):  # +inf on the diagonal at run time
        pos = b.arange(0, size)
        eye = b.op("Equal", [b.op("Unsqueeze", [pos, b.ints([1], "axes")]), b.op("Unsqueeze", [pos, b.ints([0], "axes")])])
        diag = b.op("Where", [eye, b.floats(np.inf, "inf"), b.floats(0.0, "zero")])
    else:
        diag = b.const(np.where(np.eye(size, dtype=bool), np.inf, 0.0).astype(np.float32), "diag")
    if pad is not None:  # padding is infinitely far: never a real token's nearest, never nearer a chosen one
        cross = b.op("Or", [b.op("Unsqueeze", [pad, b.ints([2], "axes")]), b.op("Unsqueeze", [pad, b.ints([1], "axes")])])
        dist = b.op("Where", [cross, b.floats(np.inf, "inf"), dist])
    nearest = b.reduce_min(b.op("Add", [dist, diag]), [2])
    if pad is not None:
        first = _diverse_tier_pick(b, b.op("Not", [pad]), pad, b.op("Greater", [own, b.ints([0], "zero")]), nearest,
                                   b.arange(0, b.dim(pad, 1)))
    else:
        first = b.op("ArgMax", [nearest], {"axis": 1, "keepdims": 1})  # [B, 1]
    mind = b.op("GatherND", [dist, first], {"batch_dims": 1})  # [B, S]
    ninf = b.op("Expand", [b.floats([[-np.inf]], "ninf"), b.op("Shape", [first])])
    mind = b.op("ScatterElements", [mind, first, ninf], {"axis": 1})
    if not isinstance(k, ir.Value) and k == 1:
        return first, k
    # Loop body: (iteration, cond, mind) -> (cond, mind', pick)
    it = ir.Value(name=f"{b.prefix}/body_iter", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond_in = ir.Value(name=f"{b.prefix}/body_cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    mind_in = ir.Value(name=f"{b.prefix}/body_mind", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, None]))
    body_nodes = []

    def node(op_type, inputs, attrs=None, name=""):
        n = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v)
                                                      for k, v in (attrs or {}).items()],
                    name=f"{b.prefix}/body/{name or op_type}_{len(body_nodes)}")
        n.outputs[0].name = n.name
        body_nodes.append(n)
        return n.outputs[0]

    if pad is None:
        nxt = node("ArgMax", [mind_in], {"axis": 1, "keepdims": 1})
    else:  # the tiers of _diverse_tier_pick at step it + 1, built in the body
        unchosen = node("Greater", [mind_in, ninf])
        step = node("Add", [it, b.ints(1, "one")])
        nxt = _diverse_tier_pick(b, node("And", [unchosen, node("Not", [pad])]), node("And", [unchosen, pad]),
                                 node("Less", [step, own]), mind_in, b.arange(0, b.dim(pad, 1)), node)
    row = node("GatherND", [dist, nxt], {"batch_dims": 1})
    new_mind = node("Min", [mind_in, row])
    new_mind = node("ScatterElements", [new_mind, nxt, ninf], {"axis": 1})
    cond_out = node("Identity", [cond_in])
    pick = node("Identity", [nxt])
    pick.type, pick.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([None, 1])  # typed: inference follows the picks
    body = ir.Graph([it, cond_in, mind_in], [cond_out, new_mind, pick], nodes=body_nodes,
                    name=f"{b.prefix}/divprune_body")
    steps = b.arith("Max", b.arith("Sub", k, 1), 1) if dynamic else k - 1
    steps = b.op("Squeeze", [steps, b.ints([0], "axes")]) if dynamic else b.ints(steps, "steps")
    _, picks = b.op("Loop", [steps, b.const(np.array(True), "true"), mind],
                    {"body": body}, outputs=2)  # picks: [k-1, B, 1]
    rest = b.op("Squeeze", [b.op("Transpose", [picks], {"perm": [1, 0, 2]}), b.ints([2], "axes")])
    picks = b.op("Concat", [first, rest], {"axis": 1})
    return (b.slice(picks, 0, k) if dynamic else picks), k


def _diverse_tier_pick(b: _Builder, real: ir.Value, pad: ir.Value, before: ir.Value, score: ir.Value,
                       positions: ir.Value, node=None) -> ir.Value:
    """One pick [B, 1] of DivPrune on a padded row: among ``real`` [B, S] candidates while the row
    has picks of its own left (``before`` [B]), the largest ``score``; else its first ``pad``
    candidate; else the real one with the largest ``score``. ``node``: how to add an op (a Loop
    body's builder), else ``b.op``."""
    op = node or (lambda t, i, a=None: b.op(t, i, a))
    ninf = b.floats(-np.inf, "ninf")

    def best(mask, values):  # (argmax [B, 1] over ``mask`` of ``values`` (never -inf), whether any [B, 1])
        ranked = op("Where", [mask, values, ninf])
        at = op("ArgMax", [ranked], {"axis": 1, "keepdims": 1})
        return at, op("Greater", [op("GatherElements", [ranked, at], {"axis": 1}), ninf])
    mine, has_mine = best(op("And", [real, op("Unsqueeze", [before, b.ints([1], "axes")])]), score)
    first_pad, has_pad = best(pad, op("Neg", [op("Cast", [positions], {"to": ir.DataType.FLOAT})]))
    rest, _ = best(real, score)
    return op("Where", [has_mine, mine, op("Where", [has_pad, first_pad, rest])])


def _pool(b: _Builder, x: ir.Value, r: GridPool) -> ir.Value:
    """x [B, prefix + H·W + suffix, C] -> [B, prefix + (H/f)(W/f) + suffix, C] by average
    pooling the grid."""
    h, w, fh, fw, p = r.height, r.width, r.fh, r.fw, r.prefix
    end = p + h * w
    grid = b.slice(x, p, end)
    grid = b.op("Reshape", [grid, b.ints([0, h // fh, fh, w // fw, fw, -1], "grid")])
    pooled = b.reduce_mean(grid, [2, 4])
    parts = [b.op("Reshape", [pooled, b.ints([0, (h // fh) * (w // fw), -1], "flat")])]
    if p:
        parts.insert(0, b.slice(x, 0, p))
    if end < r.num_tokens:
        parts.append(b.slice(x, end, r.num_tokens))
    return b.op("Concat", parts, {"axis": 1}) if len(parts) > 1 else parts[0]


def _with_fixed(b: _Builder, top: ir.Value, batch_of: ir.Value, counts, tag: str) -> ir.Value:
    """Span picks [B, k] (span-relative) -> kept indices [B, M] (``<tag>/keep_idx``): offset, add
    the tokens outside the span, sort ascending. ``counts``: (N, start, end, k), numbers or
    run-time values; M = start + k + N − end."""
    n, s, e, k = counts
    if isinstance(s, ir.Value) or s:
        top = b.op("Add", [top, b.num(s, "off")])
    before = [b.batch_range(0, s, batch_of)] if isinstance(s, ir.Value) or s > 0 else []
    after = [] if e is n else [b.batch_range(e, n, batch_of)] if isinstance(e, ir.Value) or isinstance(
        n, ir.Value) or n > e else []
    parts = before + [top] + after
    idx = b.op("Concat", parts, {"axis": 1}) if len(parts) > 1 else top
    out = b.sort_ascending(idx, b.arith("Add", b.arith("Add", s, k), b.arith("Sub", n, e)))
    out.name = f"{tag}/keep_idx"
    return out


def _gather(b: _Builder, x: ir.Value, shape, idx: ir.Value, axis: int, batch_axis: int) -> ir.Value:
    """Gather ``x`` per sample along ``axis`` with idx [B, M]."""
    rank = len(shape)
    perm = [batch_axis, axis] + [i for i in range(rank) if i not in (batch_axis, axis)]
    if perm != list(range(rank)):
        x = b.op("Transpose", [x], {"perm": perm})
    if shape[batch_axis] == 1:  # broadcast the batch only: 1 elsewhere keeps each size (also dynamic ones)
        target = b.op("Concat", [b.batch_size(idx), b.const(np.ones(rank - 1, np.int64), "rest")], {"axis": 0})
        x = b.op("Expand", [x, target])
    index = b.op("Unsqueeze", [idx, b.const(np.array([2], np.int64), "axes")])
    y = b.op("GatherND", [x, index], {"batch_dims": 1})
    if perm != list(range(rank)):
        inv = [perm.index(i) for i in range(rank)]
        y = b.op("Transpose", [y], {"perm": inv})
    return y


def _key_index(b: _Builder, x: ir.Value, axis: int, stream: ir.Value, past: ir.Value, idx: ir.Value) -> ir.Value:
    """The entries [B, P + M] to take along ``x``'s key axis (T = the caller's cached + new tokens)
    for layers that cache only kept tokens (``past``: their cache [B, H, P, D]; ``idx``: the kept
    new tokens [B, M] of the ``stream`` [B, S, C]): the first P entries, then the kept new ones.
    In a prefill (P = 0, T = S) that is ``idx``. In a decode step the caller's mask is that of the
    original tokens, left-padded: [0 × padding, 1 × the rest]; the layer's cache holds every
    padding token (never pruned) and fewer real ones, all 1, so its mask is the caller's first P."""
    new_from = b.arith("Sub", b.dim(x, axis), b.dim(stream, 1))  # T − S: where the new tokens start
    cached = b.batch_range(0, b.dim(past, 2), idx)
    return b.op("Concat", [cached, b.op("Add", [idx, new_from])], {"axis": 1})


def _kept_valid(b: _Builder, lengths: ir.Value, ends_starts: bool, idx: ir.Value) -> ir.Value:
    """A lengths mask of the uncut sequence (see :func:`length_valid`) -> the int32 0/1 mask
    [B, M] of the kept tokens ``idx`` [B, M] (their original positions)."""
    return b.op("Cast", [length_valid(b, lengths, ends_starts, idx)], {"to": ir.DataType.INT32})


def _rows(b: _Builder, m) -> ir.Value:
    """The shape [1, 1, M, 1] that expands a log-size bias [B, 1, 1, M] over the query axis."""
    if not isinstance(m, ir.Value):
        return b.ints([1, 1, m, 1], "rows")
    return b.op("Concat", [b.ints([1, 1], "ones"), m, b.ints([1], "one")], {"axis": 0})


def _add_bias(graph, node: ir.Node, site, bias: ir.Value, m: int, counter, tag: str, dtype: str) -> None:
    """Add log(size) [B, 1, 1, M] (in the stream's ``dtype``) to a site's logits: before its
    Softmax (eager) or into the additive mask of an ONNX Attention node."""
    b = _Builder(graph, node, f"{tag}/bias", counter)
    _same_dtype(site.logits if site.kind == "eager" else site.q, dtype, node.name)
    if site.kind == "eager":
        node.replace_input_with(0, b.op("Add", [node.inputs[0], bias]))
        return
    if node.domain == "com.microsoft" and node.op_type in ("Attention", "MultiHeadAttention"):
        # ORT's attention_bias (input 5): [B or 1, H or 1, S, T], added to the logits
        old = node.inputs[5] if len(node.inputs) > 5 else None
        bias = b.op("Expand", [bias, _rows(b, m)], name=BIAS_TAG)
        new = bias if old is None else b.op("Add", [old, bias], name=BIAS_TAG)
        if len(node.inputs) < 6:
            node.resize_inputs(6)
        node.replace_input_with(5, new)
        return
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        raise PruneError(f"attention node '{node.name}' ({node.op_type}) takes no additive bias")
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    bias = b.op("Expand", [bias, _rows(b, m)], name=BIAS_TAG)  # ORT wants the query axis
    if mask is None:
        new = bias
    elif site.mask is not None and site.mask.dtype == "bool":
        additive = b.op("Where", [mask, b.scalar(0.0, dtype, "zero"), b.scalar(-np.inf, dtype, "ninf")], name=BIAS_TAG)
        new = b.op("Add", [additive, bias], name=BIAS_TAG)
    else:
        new = b.op("Add", [mask, bias], name=BIAS_TAG)
    if len(node.inputs) < 4:
        node.resize_inputs(4)
    node.replace_input_with(3, new)


def _recover(graph, cut, values, src, idx, dest, reduced, post_names, order, counter, m) -> None:
    """Restore the tokens at ``cut.recovery.point`` to the length and order of ``src`` (the stream
    entering the cut) as ``prunec.ops.recover`` does; every use of the point after the cut (an
    earlier cut's recovery, when several restore there) reads the restored tensor."""
    point = values[cut.recovery.point.name]
    uses = [(u, i) for u, i in point.uses() if u.name not in post_names]
    # an earlier cut's recovery reads the point first (its node is prunec's, not in ``order``)
    before = min((u for u, _ in uses), key=lambda u: order.get(u.name, -1)) if uses else None
    b = _Builder(graph, before, f"{cut.tag}/recover", counter)
    entry = b.op("Identity", [point], name=RECOVER_TAG)
    r, mode = cut.reduce, cut.recovery.mode
    axes2 = b.ints([2], "axes")
    if mode == "unmerge" and isinstance(r, GridPool):
        dest = b.batch_const([r.dest()], src, "dest")
    if mode == "attn":  # in float32, cast back to the stream's type
        dt = cut.stream.dtype
        scale = b.floats(1.0 / math.sqrt(cut.stream.shape[-1]), "scale")
        keys = b.op("Transpose", [b.as_f32(reduced, dt)], {"perm": [0, 2, 1]})
        logits = b.op("Mul", [b.op("MatMul", [b.as_f32(src, dt), keys]), scale])
        full = b.as_dtype(b.op("MatMul", [b.op("Softmax", [logits], {"axis": -1}), b.as_f32(entry, dt)]), dt)
    elif mode == "unmerge" and dest is not None:
        last = b.arith("Sub", m, 1)
        got = b.op("GatherND", [entry, b.op("Unsqueeze", [b.op("Min", [dest, b.num(last, "last")]), axes2])],
                   {"batch_dims": 1})
        keep = b.op("Unsqueeze", [b.op("Less", [dest, b.num(m, "m")]), axes2])
        full = b.op("Where", [keep, got, src])
    else:
        where = b.op("Expand", [b.op("Unsqueeze", [idx, axes2]), b.op("Shape", [entry])])
        full = b.op("ScatterElements", [src, where, entry], {"axis": 1})
    full.name = f"{cut.tag}/{RECOVERED_TAG}"
    for u, i in uses:
        u.replace_input_with(i, full)
    if point.is_graph_output():
        name = point.name
        point.name = f"{name}/reduced"
        full.name = name
        full.type = point.type
        shape = cut.recovery.point.shape
        full.shape = ir.Shape(list(shape)) if shape is not None else None
        graph.outputs[graph.outputs.index(point)] = full


@dataclass
class _Lowered:
    """What lowering a cut leaves for the cuts after it in the same plan (its children)."""

    values: dict  # value name in the planned graph -> the value the post-cut nodes read now (gathered)
    size: ir.Value | None = None  # token sizes [B, M, 1] after the cut, in the stream's type
    positions: ir.Value | None = None  # original positions of the kept tokens [B, M] (for lengths masks)


def lower_onnx(model: ir.Model, plan: Plan) -> ir.Model:
    """A new model (weights shared, graph cloned once) with every cut of ``plan`` lowered, in
    order. A cut reads what its parent left (gathered crossings, token sizes, positions); where
    several cuts fix the same node (a shape literal, a token count, a log-size bias, a size
    weight, a lengths mask), the last cut's fix is the one written."""
    return lower_onnx_with_proto(model, plan)[0]


def lower_onnx_with_proto(model: ir.Model, plan: Plan):
    """:func:`lower_onnx`, and the rewritten model as ``graph_only_proto(model, as_inputs=True)``
    (weights as typed inputs): the serialisation its outputs' shapes were inferred on, which the
    model's check can build its session from instead of serialising the graph again."""
    model = model.clone()  # weights are shared, the graph is new: the input stays untouched
    graph = model.graph
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    values.update({v.name: v for v in graph.initializers.values()})
    nodes: dict[str, ir.Node] = {}
    order = {}
    for i, n in enumerate(graph):
        nodes[n.name] = n
        order[n.name] = i
        for o in n.outputs:
            values[o.name] = o
    ctx = _Context(graph, values, nodes, order, itertools.count(), {},
                   any(c.length_masks or c.padding or c.ids for c in plan.cuts))
    lowered: dict[str, _Lowered] = {}
    for cut in plan.cuts:
        lowered[cut.tag] = _lower_cut(ctx, cut, lowered[cut.parent.tag] if cut.parent is not None else None)
    for fix in ctx.fixes.values():  # the last cut's fix of each node
        fix()
    return model, _declare_outputs(model, ctx.output_tokens)


def _declare_outputs(model: ir.Model, output_tokens: dict[str, dict]):
    """Declare the shapes of the graph outputs computed after a cut (``output_tokens``: output name
    -> {token axis: its count, a number or a dimension name}). A token axis gets the cut's count;
    every other dimension is what ONNX shape inference now infers there (a number), else the name
    the output declared (a symbolic dimension), else it is left open: a dimension derived from the
    token count outside the token class (a CLS slice's N - 1, say) must not keep the probe's size.
    Returns the model's weight-free proto (weights as inputs), its outputs declared as in the model."""
    import onnx

    outputs = {v.name: v for v in model.graph.outputs}
    declared = {name: outputs[name].shape for name in output_tokens}
    for name in output_tokens:
        outputs[name].shape = None
    proto = graph_only_proto(model, as_inputs=True)
    if not output_tokens:
        return proto
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        inferred = {o.name: o.type.tensor_type.shape for o in inferred.graph.output
                    if o.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001  (an op inference does not know stops it: dimensions stay open)
        inferred = {}
    for name, tokens in output_tokens.items():
        old = declared[name]
        if old is None:
            continue
        new = inferred.get(name)
        dims = []
        for j, d in enumerate(old):
            got = new.dim[j] if new is not None and len(new.dim) == len(old) else None
            if j in tokens:
                dims.append(tokens[j])
            elif got is not None and got.HasField("dim_value"):
                dims.append(got.dim_value)
            elif isinstance(d, ir.SymbolicDim) and d.value is not None:
                dims.append(d.value)
            else:
                dims.append(None)
        outputs[name].shape = ir.Shape(dims)
    for i, o in enumerate(proto.graph.output):
        if o.name in output_tokens:
            proto.graph.output[i].CopyFrom(ir.serde.serialize_value(outputs[o.name]))
    return proto


@dataclass
class _Context:
    """The graph being rewritten and what every cut's lowering shares."""

    graph: ir.Graph
    values: dict  # value name -> value, as the model came in
    nodes: dict  # node name -> node
    order: dict  # node name -> its index in the incoming graph
    counter: Any
    fixes: dict  # (what, node name, slot) -> a function writing that fix (later cuts overwrite)
    positions: bool  # whether cuts track the original positions of their kept tokens
    site_bias: dict = field(default_factory=dict)  # site node name -> the log-size bias the latest cut adds
    output_tokens: dict = field(default_factory=dict)  # graph output after a cut -> {token axis: count}


def _lower_cut(ctx: _Context, cut: Cut, parent: _Lowered | None) -> _Lowered:
    """Lower one cut: reduce its stream, gather the crossings, restore at its recovery point, and
    register its fixes of later nodes."""
    graph, nodes, order, counter = ctx.graph, ctx.nodes, ctx.order, ctx.counter
    values = dict(parent.values if parent is not None else ctx.values)
    post_names = {n.ref.name for n in cut.post}
    first = nodes[min(post_names, key=order.__getitem__)] if post_names else None  # None: the stream is an output
    b = _Builder(graph, first, cut.tag, counter)
    size_in = parent.size if parent is not None and parent.size is not None else (
        values[cut.size_in.name] if cut.size_in is not None else None)
    stream = values[cut.stream.name]  # the tokens entering the cut [B, N, C]
    merged = dest = None
    root = (cut.ancestors() or [cut])[-1]  # the first cut of the chain: the tokens the model was given
    tokens, positions = ctx.values[root.stream.name], parent.positions if parent is not None else None
    padding = _padding(b, cut, values, positions, tokens)
    if isinstance(cut.reduce, Merge):
        merged, dest, idx = lower_merge(b, cut, values, size_in, ctx.site_bias, padding)
    else:
        ids = _per_token(b, values[cut.ids], tokens, positions) if cut.ids else None
        idx = _selection(b, cut, values, ctx.site_bias, padding, ids)
    kept = b.dim(idx, 1) if _dynamic(cut) else cut.kept  # M: a run-time value when N is dynamic
    out = _Lowered(values)
    if ctx.positions:
        out.positions = idx if parent is None or parent.positions is None else b.op(
            "GatherElements", [parent.positions, idx], {"axis": 1})
    sizes = _size_tensors(b, cut, size_in, stream, merged, dest, idx, kept) if cut.sizes_out else {}
    out.size = sizes.get(SIZE_TAG)
    reduced = merged
    for c in cut.crossings:
        src = values[c.value.name]
        uses = [(u, i) for u, i in src.uses() if u.name in post_names]
        as_output = src.is_graph_output() and c.value is cut.stream  # a cut at the output
        if not uses and not as_output:
            continue
        before = min((u for u, _ in uses), key=lambda u: order[u.name]) if uses else None
        gb = _Builder(graph, before, f"{cut.tag}/gather", counter)
        if c.role is not None:
            y = sizes[c.role]
        elif merged is not None and c.value is cut.stream:
            y = merged
        elif isinstance(cut.reduce, GridPool) and c.value is cut.stream:
            y = _pool(gb, src, cut.reduce)
        else:
            y, shape = src, list(c.value.shape)
            for axis in c.token_axes:
                shape[axis] = cut.num_tokens  # the planned graph spells N; the parent left num_tokens
            for axis in c.token_axes:
                by = _key_index(gb, y, axis, stream, values[cut.past], idx) if axis in c.key_axes else idx
                y = _gather(gb, y, shape, by, axis, c.batch_axis)
                shape[axis] = cut.kept
        for u, i in uses:
            u.replace_input_with(i, y)
        values[c.value.name] = y
        if c.value is cut.stream:
            reduced = y
        if as_output:  # the reduced tensor takes the output's place and name
            _take_output(graph, src, y, c.token_axes, f"{cut.tag}_tokens" if _dynamic(cut) else cut.kept)
    if cut.recovery is not None:
        _recover(graph, cut, values, stream, idx, dest, reduced, post_names, order, counter, kept)
    _register_fixes(ctx, cut, sizes, idx if out.positions is None else out.positions, kept)
    ctx.output_tokens.update(_clear_shapes(cut, post_names, nodes))
    return out


def _dynamic(cut: Cut) -> bool:
    """Whether the cut's counts follow a dynamic token count at run time."""
    return getattr(cut.reduce, "rule", None) is not None or getattr(cut.reduce, "dynamic", False)


def _size_tensors(b: _Builder, cut: Cut, size_in, stream, merged, dest, idx, kept) -> dict:
    """Token sizes after the cut [B, M, 1] (``<tag>/prunec_size``, in the stream's type) and what
    is computed from them (log-size bias, size weights): {role: value}."""
    dt = cut.stream.dtype
    if merged is not None:  # sizes are kept in the stream's float type (integers: exact in fp16)
        size_f32 = b.as_f32(size_in, dt) if size_in is not None else None
        size = b.as_dtype(merge_sizes(b, size_f32, b.as_f32(stream, dt), dest, kept), dt)
    else:
        size = _gather(b, size_in, [cut.stream.shape[0], cut.num_tokens, 1], idx, 1, 0)
    size.name = f"{cut.tag}/{SIZE_TAG}"
    sizes = {SIZE_TAG: size}
    roles = cut.size_roles()
    if LOGSIZE_TAG in roles:  # [B, M, 1] -> [B, 1, 1, M]
        log = b.op("Unsqueeze", [b.op("Transpose", [b.op("Log", [size])], {"perm": [0, 2, 1]}), b.ints([1], "axes")])
        log.name = f"{cut.tag}/{LOGSIZE_TAG}"
        sizes[LOGSIZE_TAG] = log
    for role in sorted(roles - {SIZE_TAG, LOGSIZE_TAG}):
        base, start = split_role(role)  # the tokens start: (a mean over x[:, start:])
        part = b.slice(size, start, np.iinfo(np.int64).max) if start else size
        if base == MEANW_TAG:  # size / mean over those tokens
            part = b.op("Div", [part, b.reduce_mean(part, [1], keepdims=1)])
        part.name = f"{cut.tag}/{role}"
        sizes[role] = part
    return sizes


def _take_output(graph: ir.Graph, src: ir.Value, y: ir.Value, token_axes: list[int], m) -> None:
    """The reduced tensor ``y`` replaces the graph output ``src`` under its name (``m`` tokens: a
    number, or a dimension name when the count is dynamic)."""
    name = src.name
    src.name = f"{name}/unpruned"
    y.name = name
    dims = list(src.shape) if src.shape is not None else None
    if dims is not None:
        for j in token_axes:
            dims[j] = m
        y.shape = ir.Shape(dims)
    y.type = src.type
    graph.outputs[graph.outputs.index(src)] = y


def _register_fixes(ctx: _Context, cut: Cut, sizes: dict, positions: ir.Value, m) -> None:
    """Record this cut's fixes of later nodes in ``ctx.fixes``, replacing an earlier cut's fix of the
    same node: log-size biases, size weights, token counts, shape literals and lengths masks.
    ``positions``: the kept tokens' original positions [B, M] (the kept indices of a first cut);
    ``m``: the kept count M, a number or (dynamic token count) a [1] int64 value."""
    graph, nodes, counter, values = ctx.graph, ctx.nodes, ctx.counter, ctx.values
    for site in cut.bias_sites:
        ctx.site_bias[site.node.ref.name] = sizes[LOGSIZE_TAG]  # what a later cut scoring this site must add
        ctx.fixes[("bias", site.node.ref.name)] = functools.partial(
            _add_bias, graph, nodes[site.node.ref.name], site, sizes[LOGSIZE_TAG], m, counter, cut.tag, cut.stream.dtype)
    for rw in cut.reweigh:
        ctx.fixes[("reweigh", rw.node.ref.name)] = functools.partial(_reweigh, graph, nodes[rw.node.ref.name], rw,
                                                                     sizes[rw.role], cut, counter)
    for fix in cut.count_fixes:  # x.sum(1) / N -> / M, in the constant's dtype and shape
        ctx.fixes[("count", fix.node.ref.name, fix.slot)] = functools.partial(
            _fix_count, graph, nodes[fix.node.ref.name], fix, m, fix.value != cut.kept, cut.tag, counter)
    past = values[cut.past] if cut.past else None
    for fix in cut.shape_fixes:
        ctx.fixes[("shape", fix.node.ref.name)] = functools.partial(
            _fix_shape, graph, nodes[fix.node.ref.name], fix, m, cut.tag, counter, past)
    for lm in cut.length_masks:
        ctx.fixes[("lengths", lm.node.ref.name, lm.input_index)] = functools.partial(
            _fix_lengths, graph, nodes[lm.node.ref.name], lm, values[lm.value.name], positions, m, cut, counter)


def _reweigh(graph, node: ir.Node, rw, weight: ir.Value, cut: Cut, counter) -> None:
    """A token mean/sum after the cut reads its input times the tokens' size weight."""
    wb = _Builder(graph, node, f"{cut.tag}/reweigh", counter)
    _same_dtype(rw.node.inputs[0], cut.stream.dtype, node.name)
    node.replace_input_with(0, wb.op("Mul", [node.inputs[0], weight], name=REWEIGH_TAG))


def _fix_count(graph, node: ir.Node, fix, m, inverse: bool, tag: str, counter) -> None:
    """The constant N (or 1/N with ``inverse``) becomes M (1/M), in its dtype and shape; at run time
    when ``m`` is a value."""
    src = node.inputs[fix.slot]
    shape = tuple(src.shape) if src.shape is not None else ()
    cb = _Builder(graph, node, f"{tag}/count", counter)
    if not isinstance(m, ir.Value):
        node.replace_input_with(fix.slot, cb.const(np.full(shape, fix.value).astype(src.dtype.numpy()), "count"))
        return
    new = cb.op("Cast", [m], {"to": src.dtype})
    if inverse:
        new = cb.op("Div", [cb.const(np.array([1], src.dtype.numpy()), "one"), new])
    node.replace_input_with(fix.slot, cb.op("Reshape", [new, cb.ints(list(shape), "shape")]))


def _fix_shape(graph, node: ir.Node, fix, m, tag: str, counter, past: ir.Value | None = None) -> None:
    """The size operand's entries that spell N become M: a new constant, or (a computed shape, as
    with a dynamic batch; or M a run-time value) a ScatterElements overwriting only those entries
    at run time. ``past``: in a decoder with a KV cache, the cache [B, H, P, D] of the layers after
    the cut; an entry spelling past + N (``fix.key_positions``) becomes P + M."""
    slot = 0 if node.op_type == "ConstantOfShape" else 1
    shp = node.inputs[slot]
    if isinstance(m, ir.Value):
        fb = _Builder(graph, node, f"{tag}/shape", counter)
        pos = fb.const(np.array(fix.positions, np.int64), "pos")
        if fix.key_positions:
            keys = fb.op("Add", [fb.dim(past, 2), m])
            new = fb.op("Where", [fb.const(np.isin(fix.positions, fix.key_positions), "is_key"), keys, m])
        else:
            new = m if len(fix.positions) == 1 else fb.op("Expand", [m, fb.ints([len(fix.positions)], "n")])
        node.replace_input_with(slot, fb.op("ScatterElements", [shp, pos, new], {"axis": 0}))
        return
    new = np.array(fix.node.inputs[slot].data).reshape(-1).copy()
    for j in fix.positions:
        new[j] = m
    fb = _Builder(graph, node, f"{tag}/shape", counter)
    if shp.const_value is not None or (shp.producer() is not None and shp.producer().op_type == "Constant"):
        node.replace_input_with(slot, fb.const(new, "size"))
    else:
        pos = np.array(fix.positions, np.int64)
        upd = np.full(len(fix.positions), m, np.int64)
        node.replace_input_with(slot, fb.op("ScatterElements", [shp, fb.const(pos, "pos"), fb.const(upd, "upd")],
                                            {"axis": 0}))


def _fix_lengths(graph, node: ir.Node, lm, lengths: ir.Value, positions: ir.Value, m, cut: Cut, counter) -> None:
    """A lengths mask of the uncut sequence, read after the cut, becomes that of the kept tokens
    (``positions``: their original positions [B, M]; ``m``: M, a number or a run-time value)."""
    lb = _Builder(graph, node, f"{cut.tag}/lengths", counter)
    if lm.kind == "total" and isinstance(m, ir.Value):
        new = lb.op("Reshape", [lb.op("Cast", [m], {"to": ir.DataType.INT32}), lb.ints(list(lm.value.shape or ()), "shape")])
    elif lm.kind == "total":  # GroupQueryAttention's total_sequence_length: the kept count
        new = lb.const(np.array(cut.kept, np.int32).reshape(lm.value.shape or ()), "total")
    elif lm.kind == "seqlens":  # GroupQueryAttention: valid lengths − 1 -> kept valid tokens − 1
        lens = lb.op("Add", [lb.op("Cast", [lengths], {"to": ir.DataType.INT32}), lb.const(np.array(1, np.int32), "one")])
        valid = _kept_valid(lb, lens, False, positions)
        new = lb.op("Sub", [lb.reduce_sum(valid, [1]), lb.const(np.array(1, np.int32), "one")])
    else:
        two = lm.value.shape[0] != cut.stream.shape[0]  # [2B]: ends, then starts
        new = _kept_valid(lb, lengths, two, positions)
    node.replace_input_with(lm.input_index, new)


def _clear_shapes(cut: Cut, post_names: set, nodes: dict) -> dict[str, dict]:
    """Shapes after the cut are stale: dropped from inner values. Returns the graph outputs the cut
    reaches, {name: {token axis: the cut's count}}, for :func:`_declare_outputs`."""
    m = f"{cut.tag}_tokens" if _dynamic(cut) else cut.kept
    outputs = {}
    for name in post_names:
        for o in nodes[name].outputs:
            if o.is_graph_output():
                outputs[o.name] = {j: m for j in cut.output_axes.get(o.name, [])}
            else:
                o.shape = None
    return outputs


EXPOSED = {"sizes": "sizes", "indices": "kept_indices"}  # --expose name -> output suffix


def expose_onnx(model: ir.Model, steps: list, outputs: list[str], what: list[str]) -> ir.Model:
    """A copy of ``model`` with extra graph outputs for each reduced token output ``o`` in
    ``outputs``: ``o.sizes`` [B, M] float32 (how many input tokens each output token stands for:
    1 for a pure selection) and ``o.kept_indices`` [B, M] int64 (each output token's position in
    the input tokens: its representative after a merge), composed over ``steps``: every cut
    (tag, tokens in N, tokens out M, static dest [N] or None), in order. A cut's kept indices are
    its ``<tag>/keep_idx`` value, a merge's slots its ``<tag>/dest`` (or the static dest). M is read
    off the kept indices at run time, so a model whose token count is dynamic exposes them too."""
    model = model.clone()
    graph = model.graph
    values = {o.name: o for n in graph for o in n.outputs}
    b = _Builder(graph, None, "prunec_expose", itertools.count())
    size = pos = None
    axes2 = b.ints([2], "axes")
    for tag, n, m, static_dest in steps:
        idx = values.get(f"{tag}/keep_idx")
        if idx is None:
            raise PruneError(f"cannot expose token sizes: the kept indices of cut '{tag}' are not in the graph")
        dest = values.get(f"{tag}/dest")
        if dest is None and static_dest is not None:
            dest = b.batch_const(np.array([static_dest], np.int64), idx, "dest")
        if dest is not None:  # a merge: sizes summed into the output slots
            if size is None:  # every input token has size 1
                size = b.ones_like(b.op("Cast", [dest], {"to": ir.DataType.FLOAT}))
            size = b.op("Squeeze", [scatter_sum(b, b.op("Unsqueeze", [size, axes2]), dest, b.dim(idx, 1), 1), axes2])
        else:
            size = b.ones_like(b.op("Cast", [idx], {"to": ir.DataType.FLOAT})) if size is None else b.op(
                "GatherElements", [size, idx], {"axis": 1})
        pos = idx if pos is None else b.op("GatherElements", [pos, idx], {"axis": 1})
    made = {"sizes": size, "indices": pos}
    by_name = {v.name: v for v in graph.outputs}
    for name in outputs:
        dims = by_name[name].shape
        for w in what:
            y = b.op("Identity", [made[w]])
            y.name = f"{name}.{EXPOSED[w]}"
            y.type = ir.TensorType(ir.DataType.FLOAT if w == "sizes" else ir.DataType.INT64)
            y.shape = ir.Shape([dims[0], dims[1]]) if dims is not None else None
            graph.outputs.append(y)
    return model
