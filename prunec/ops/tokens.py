"""Token scoring, selection and gathering in plain torch.

Shapes: B batch, H query heads, Hkv key/value heads, N tokens, D head dim,
M kept tokens.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..schedules import HASH_MULTIPLIER, MERSENNE31, PARK_MILLER, hash_offset, random_scores, wpr_start

_RECORDING: list[dict] = []


@contextlib.contextmanager
def recording():
    """Collect the indices :func:`select_topk` returns, keyed by the cut's tag."""
    rec: dict = {}
    _RECORDING.append(rec)
    try:
        yield rec
    finally:
        _RECORDING.remove(rec)


def _query_rows(p: torch.Tensor, query) -> torch.Tensor:
    """p: [B, H, Nq, Nk] -> [B, H, Nk] for one query row or the mean over rows."""
    if query == "mean":
        return p.mean(dim=2)
    return p[:, :, int(query), :]


def _real_rows_mean(p: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """p [B, H, Nq, Nk] -> [B, Nk]: the mean over heads, then over the query rows that are real tokens
    (``padding`` [B, Nq] bool; padding queries left out), as the ONNX lowering's ``site_scores``."""
    w = (~padding).to(p.dtype)[:, :, None]  # [B, Nq, 1]
    return (p.mean(dim=1) * w).sum(dim=1) / w.sum(dim=1)


def scores_from_probs(probs: torch.Tensor, query, padding: torch.Tensor | None = None) -> torch.Tensor:
    """Attention received by each key token. probs: [B, H, N, N] -> [B, N] (mean over heads).
    ``padding`` [B, N] bool (:func:`padding_of`): with query "mean", only real rows are averaged."""
    if padding is not None and query == "mean":
        return _real_rows_mean(probs, padding)
    return _query_rows(probs, query).mean(dim=1)


def scores_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None,
                   causal: bool, query, padding: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`scores_from_probs` for a fused attention, from q and k only.

    q: [B, H, N, D]; k: [B, Hkv, N, D] (GQA: H a multiple of Hkv); mask: additive or
    boolean, broadcastable to [B, H, N, N]. For one query row this costs O(N·D) per
    head and never builds the N×N matrix; ``query="mean"`` needs every row (O(N²)). ``padding``:
    as for :func:`scores_from_probs`.
    """
    n, d = q.shape[-2], q.shape[-1]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale if scale is not None else 1.0 / math.sqrt(d)
    rows = q if query == "mean" else _row(q, int(query))
    logits = torch.matmul(rows, k.transpose(-1, -2)) * s  # [B, H, R, N]
    if mask is not None:
        m = mask if query == "mean" else _row(mask, int(query))
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, float("-inf"))
        else:
            logits = logits + m
    if causal:
        if query == "mean":
            future = torch.arange(n, device=q.device)[None, :] > torch.arange(n, device=q.device)[:, None]
        else:  # the one query row: its position (a negative row counts from the end, N read at run time)
            i = int(query)
            future = (torch.arange(n, device=q.device) > (n + i if i < 0 else i))[None, :]
        logits = logits.masked_fill(future, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if padding is not None and query == "mean":
        return _real_rows_mean(p, padding)
    return p.mean(dim=2).mean(dim=1)


def _row(t: torch.Tensor, i: int) -> torch.Tensor:
    """Row ``i`` of the query axis (-2) of ``t``, kept as an axis of size 1; a negative ``i``
    counts from the end (the last token's row whatever the length: N is read at run time)."""
    if i >= 0:
        return t[..., i:i + 1, :]
    return t.narrow(-2, t.shape[-2] + i, 1)


def round_half_even(x):
    """Python's ``round`` of a non-negative float (half to even), written with the operations
    torch.export traces and serializes on a symbolic float (``math.trunc``, comparisons,
    ``torch.sym_ite``): the same integer as ``round(x)`` for a float, a SymInt for a SymFloat."""
    t = math.trunc(x)
    f = x - t  # exact in double: x minus its integer part
    return t + torch.sym_ite(f > 0.5, 1, 0) + (t % 2) * torch.sym_ite(f == 0.5, 1, 0)


_MAX_TOKENS = 2 ** 32  # above any sequence length a tensor can have


def round_keep(keep: float, length):
    """``round(keep * length)`` as Python computes it (the double product, half to even). ``keep``
    is p / 2^q exactly (a double); where p · length stays below 2^53 for every length the product
    is exact, and the rounding is done in integers (floor divisions, which torch.export reasons
    about quickly on a symbolic length); otherwise in double (:func:`round_half_even`)."""
    p, b = keep.as_integer_ratio()
    if p * _MAX_TOKENS >= 2 ** 53:
        return round_half_even(keep * torch.sym_float(length))
    a = p * length
    if b == 1:
        return a
    h = b // 2
    up = (a + h) // b  # half up
    x = a % b
    tie = x // h - x // (h + 1)  # 1 where a / b is exactly halfway (x == h), else 0
    return up - tie * (up % 2)  # a tie goes to the even neighbour


def rule_counts(n, start: int, start_from_end: bool, end: int, end_from_end: bool, keep: float | None,
                count: int | None):
    """(span start, span end, k) at ``n`` tokens, as ``prunec.passes.base.CountRule.resolve``
    computes them: each end counted from the first token, or from ``n`` when ``*_from_end``,
    clipped to [0, n] (the end to [start, n]); k = ``count`` capped at the span length L, or
    max(1, round(keep · L)) in double, half to even, within [0, L] (keep in (0, 1]). ``n`` may be a SymInt (a
    dynamic token count under torch.export): the counts then follow it symbolically, with
    ``torch.sym_min``/``sym_max`` instead of branches, so nothing is specialised to one length."""
    s = n - start if start_from_end else start
    s = _at_most(_at_least(s, 0), n)
    e = n - end if end_from_end else end
    e = _at_most(_at_least(e, s), n)
    length = e - s
    if count is not None:
        return s, e, _at_most(int(count), length)
    r = round_keep(float(keep), length)  # <= length, as keep <= 1
    # min(L, max(1, r)) is max(r, min(L, 1)) (r <= L, and r = 0 when L = 0): no Min around the
    # rounding, which torch.export reasons about far faster
    return s, e, torch.sym_max(r, 1 if statically_known_true(length >= 1) else torch.sym_min(length, 1))


def _at_least(a, b):
    """max(a, b); on sizes, without a symbolic Max where a >= b holds at every size the dims allow
    (clipping that never happens would only slow torch.export's reasoning down)."""
    return a if statically_known_true(a >= b) else torch.sym_max(a, b)


def _at_most(a, b):
    """min(a, b), as :func:`_at_least`."""
    return a if statically_known_true(a <= b) else torch.sym_min(a, b)


def select_topk_rule(scores: torch.Tensor, start: int, start_from_end: bool, end: int, end_from_end: bool,
                     keep: float | None, count: int | None, tag: str = "") -> torch.Tensor:
    """:func:`select_topk` whose span and k follow the token count N = ``scores.shape[1]`` at run
    time (a ``CountRule``, see :func:`rule_counts`): the top-k span tokens per sample plus every
    token outside the span, ascending. scores: [B, N] -> [B, s + k + (N - e)]. Plain torch with
    sizes from N only (no data-dependent shape), so torch.export keeps N symbolic through it."""
    n = scores.shape[1]
    s, e, k = rule_counts(n, start, start_from_end, end, end_from_end, keep, count)
    order = torch.sort(scores.narrow(1, s, e - s), dim=1, descending=True, stable=True).indices
    top = order.narrow(1, 0, k) + s  # ties to the lower index, as in select_topk and ONNX TopK
    idx = _with_fixed(top, s, e, n)
    _record(tag, idx)
    return idx


def select_topk_cached(scores: torch.Tensor, stream: torch.Tensor, past: torch.Tensor | None,
                       mask: torch.Tensor | None, ids: torch.Tensor | None, token_id: int | None, start: int,
                       start_from_end: bool, end: int, end_from_end: bool, keep: float | None, count: int | None,
                       tag: str = "") -> torch.Tensor:
    """:func:`select_topk_rule` with what a decoder's prompt brings (as the ONNX lowering):
    ``scores`` [B, T] over the cached and the N new tokens of ``stream`` [B, N, C] (the last N
    columns are the new ones'); ``past`` [B, H, P, D] the cache of the layers after the cut: when it
    holds entries (a decode step, a chunked prefill) every new token is kept. ``mask`` [B, P' + N]
    (the caller's 0/1 attention mask): padding is never pruned; each row keeps its padding in the
    span and k of its real span tokens by the rule on their number. ``ids`` [B, N] with
    ``token_id`` (``span=token:ID``): a row's span is where its ids equal ID within the span (never
    padding); it keeps k of those by the rule on their number and every other token. The batch
    keeps the largest row count (a row with fewer keeps more of its best span tokens). Returns the
    kept indices [B, M], ascending. Eager only: M is data-dependent with a mask or ids, and the
    test of the cache length is a branch (torch.export would specialise it)."""
    if _fake(scores):  # symbolic shapes for analysis: the count the rule gives the whole span
        return select_topk_rule(scores.narrow(1, scores.shape[1] - stream.shape[1], stream.shape[1]), start,
                                start_from_end, end, end_from_end, keep, count)
    b, n = stream.shape[0], stream.shape[1]
    positions = torch.arange(n, device=scores.device)
    if past is not None and past.shape[2] > 0:
        idx = positions.expand(b, n)
        _record(tag, idx)
        return idx
    scores = scores.narrow(1, scores.shape[1] - n, n)
    s, e, k = rule_counts(n, start, start_from_end, end, end_from_end, keep, count)
    pad = padding_of(mask, None, n) if mask is not None else None  # [B, N]
    if ids is not None:
        in_span = (ids == token_id) & (positions >= s) & (positions < e)
        if pad is not None:
            in_span &= ~pad
        length = in_span.sum(1)
        m = int((n - length + _rule_count(length, keep, count)).max())
        ranked = scores.masked_fill(~in_span, float("inf"))  # the rest: always kept
        idx = torch.sort(torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :m], dim=1).values
        _record(tag, idx)
        return idx
    span = scores.narrow(1, s, e - s)
    if pad is not None:
        pad = pad.narrow(1, s, e - s)
        span = span.masked_fill(pad, float("inf"))
        p = pad.sum(1)
        k = int((p + _rule_count((e - s) - p, keep, count)).max())
    order = torch.sort(span, dim=1, descending=True, stable=True).indices
    idx = _with_fixed(order[:, :k] + s, s, e, n)
    _record(tag, idx)
    return idx


def _rule_count(length: torch.Tensor, keep: float | None, count: int | None) -> torch.Tensor:
    """k of spans of ``length`` tokens (int64, any shape) by the rule: ``count`` capped at the length,
    or max(1, round(keep · length)) capped at it (0 for an empty span)."""
    if count is not None:
        return torch.clamp(length, max=int(count))
    rounded = torch.round(length.double() * float(keep)).long()  # in double, half to even (as ONNX Round)
    return torch.minimum(torch.clamp(rounded, min=1), length)


def _fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (symbolic shape propagation for a later analysis): a count read
    off data has no value there."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def padding_of(mask: torch.Tensor, positions: torch.Tensor | None, n: int) -> torch.Tensor:
    """Which of the N tokens entering a cut are padding [B, N] bool: ``mask`` [B, S] (0 = padding)
    at the tokens' original ``positions`` [B, N] (what earlier cuts kept; None: the first cut,
    whose tokens are the mask's last N)."""
    own = mask.narrow(1, mask.shape[1] - n, n) if positions is None else mask.gather(1, positions)
    return own == 0


def select_padded(scores: torch.Tensor, padding: torch.Tensor, start: int, start_from_end: bool, end: int,
                  end_from_end: bool, keep: float | None, count: int | None, tag: str = "") -> torch.Tensor:
    """A ranked selection on a padded encoder batch (as the ONNX lowering's ``_real_tokens_top``):
    ``scores`` [B, N] (higher first), ``padding`` [B, N] bool (:func:`padding_of`). Each row picks the top k_b of
    its real span tokens, k_b by the rule on its real span length; the batch keeps k = max k_b, a
    row with fewer filling up with its padding (inert: masked), then its next best tokens; tokens
    outside the span are kept. Returns the kept indices [B, M], ascending (M data-dependent: eager)."""
    if _fake(scores):  # symbolic shapes for analysis: the count the rule gives the whole span
        return select_topk_rule(scores, start, start_from_end, end, end_from_end, keep, count)
    n = scores.shape[1]
    s, e, _ = rule_counts(n, start, start_from_end, end, end_from_end, keep, count)
    length = e - s
    pad = padding.narrow(1, s, length)  # [B, L]
    real = length - pad.sum(1)
    own = _rule_count(real, keep, count)
    k = int(own.max()) if own.numel() else 0
    order = torch.sort(scores.narrow(1, s, length).masked_fill(pad, float("-inf")), dim=1, descending=True,
                       stable=True).indices  # real tokens best first, then padding
    rank = torch.arange(length, device=scores.device)[None, :]
    key = torch.where(rank < own[:, None], -rank,  # its own k best, then its padding, then the rest
                      torch.where(rank < real[:, None], -rank - 2 * length, -rank - length))
    slots = torch.sort(key, dim=1, descending=True).indices[:, :k]
    idx = _with_fixed(order.gather(1, slots) + s, s, e, n)
    _record(tag, idx)
    return idx


def gather_keys(x: torch.Tensor, idx: torch.Tensor, axis: int, batch_axis: int, stream: torch.Tensor,
                past: torch.Tensor) -> torch.Tensor:
    """Gather a key axis of ``x`` (its T entries: the caller's cached tokens, then the N new ones of
    ``stream`` [B, N, C]) for layers that cache only kept tokens: their first P entries (``past``
    [B, H, P, D]: what those layers hold), then the kept new tokens ``idx`` [B, M]. -> [.., P + M, ..]."""
    b = idx.shape[0]
    cached = torch.arange(past.shape[2], device=idx.device).expand(b, past.shape[2])
    return gather_tokens(x, torch.cat([cached, idx + (x.shape[axis] - stream.shape[1])], 1), axis, batch_axis)


def select_topk(scores: torch.Tensor, k: int, span_start: int, span_end: int, tag: str = "") -> torch.Tensor:
    """Keep the top-``k`` span tokens per sample plus every token outside the span.

    scores: [B, N] -> kept indices [B, span_start + k + (N - span_end)], int64, ascending
    (original order).
    """
    # a stable sort: ties go to the lower index, as ONNX TopK specifies
    order = torch.sort(scores[:, span_start:span_end], dim=1, descending=True, stable=True).indices
    top = order[:, :k] + span_start
    idx = _with_fixed(top, span_start, span_end, scores.shape[1])
    _record(tag, idx)
    return idx


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, axis: int, batch_axis: int) -> torch.Tensor:
    """Gather tokens per sample along ``axis``.

    x: any tensor with a batch axis (size B or 1, broadcast) and a token axis of size N;
    idx: [B, M]. Returns x with the token axis of size M (and the batch axis of size B).
    """
    b, m = idx.shape
    xt = x.movedim((batch_axis, axis), (0, 1))
    if xt.shape[0] != b:
        xt = xt.expand(b, *xt.shape[1:])
    rest = xt.shape[2:]
    index = idx[(...,) + (None,) * len(rest)].expand(-1, -1, *rest)  # no size compared: no 0/1 assumption on M
    out = torch.gather(xt, 1, index)
    return out.movedim((0, 1), (batch_axis, axis))


def _with_fixed(top: torch.Tensor, span_start, span_end, n) -> torch.Tensor:
    """Add the tokens outside the span to span picks ``top`` [B, k] and sort: [B, M]. No branch on
    the sizes, which may be symbolic (a dynamic token count under torch.export)."""
    b = top.shape[0]
    positions = torch.arange(n, device=top.device)
    idx = torch.cat([positions.narrow(0, 0, span_start).expand(b, span_start), top,
                     positions.narrow(0, span_end, n - span_end).expand(b, n - span_end)], 1)
    return torch.sort(idx, dim=1).values


def _record(tag: str, idx: torch.Tensor) -> None:
    if not tag:
        return
    for rec in _RECORDING:
        rec[tag] = idx.detach().cpu().numpy()


def _diverse_padded(x: torch.Tensor, pad: torch.Tensor, keep: float | None, count: int | None) -> torch.Tensor:
    """DivPrune on span tokens x [B, L, C] of which ``pad`` [B, L] are padding: padding is at infinite
    distance from every token; each row picks k_b (the rule on its real tokens) real tokens as the
    greedy does on its text alone, then its padding (lowest index first), then its next real ones;
    the batch picks k = max k_b. -> span picks [B, k]."""
    b, length = pad.shape
    s = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - torch.bmm(s, s.transpose(1, 2))).masked_fill(pad[:, :, None] | pad[:, None, :], float("inf"))
    own = _rule_count((~pad).sum(1), keep, count)
    k = int(own.max()) if b else 0
    eye = torch.eye(length, dtype=torch.bool, device=x.device)
    score = dist.masked_fill(eye, float("inf")).amin(dim=2)  # the first pick: farthest from its nearest
    chosen = torch.zeros_like(pad)
    rows, positions = torch.arange(b, device=x.device), torch.arange(length, device=x.device)
    mind = torch.full_like(score, float("inf"))

    def best(mask, values):  # (argmax [B] over ``mask`` of ``values`` (never -inf), whether any [B])
        ranked = values.masked_fill(~mask, float("-inf"))
        at = ranked.argmax(dim=1)
        return at, ranked[rows, at] > float("-inf")
    picks = []
    for t in range(k):
        real, padding = ~pad & ~chosen, pad & ~chosen
        mine, has_mine = best(real & (t < own)[:, None], score if t == 0 else mind)
        first_pad, has_pad = best(padding, -positions.float().expand(b, length))
        rest, _ = best(real, score if t == 0 else mind)
        pick = torch.where(has_mine, mine, torch.where(has_pad, first_pad, rest))
        chosen[rows, pick] = True
        mind = torch.minimum(mind, dist[rows, pick])
        picks.append(pick)
    return torch.stack(picks, dim=1) if picks else torch.zeros(b, 0, dtype=torch.long, device=x.device)


def select_diverse(x: torch.Tensor, k: int, span_start: int, span_end: int, tag: str = "",
                   rule: tuple | None = None, padding: torch.Tensor | None = None) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection, per sample.

    x: token features [B, N, C]. Over the span tokens, D = 1 − cos(x_i, x_j); the first pick
    is the token farthest from its nearest other token (diagonal excluded); then, k−1
    times, the token whose distance to the chosen set (min over chosen) is largest.
    Ties go to the lowest index. ``rule`` (a dynamic token count): the :func:`rule_counts`
    arguments after N, which give span and k at this N; with ``padding`` [B, N] bool (a padded batch)
    k is counted per row (:func:`_diverse_padded`). Returns kept indices [B, M], ascending.
    """
    n = x.shape[1]
    if rule is not None:
        span_start, span_end, k = rule_counts(n, *rule)
    if padding is not None:  # a padded encoder batch (the rule's keep and count: per row)
        keep, count = rule[4], rule[5]
        idx = _with_fixed(_diverse_padded(x[:, span_start:span_end].float(), padding[:, span_start:span_end], keep,
                                          count) + span_start, span_start, span_end, n)
        _record(tag, idx)
        return idx
    s = x[:, span_start:span_end].float()
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - torch.bmm(s, s.transpose(1, 2))  # [B, S, S]
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)  # [B]
    rows = torch.arange(dist.shape[0], device=x.device)
    mind = dist[rows, first].clone()
    mind[rows, first] = float("-inf")
    picks = [first]
    for _ in range(k - 1):
        nxt = mind.argmax(dim=1)
        mind = torch.minimum(mind, dist[rows, nxt])
        mind[rows, nxt] = float("-inf")
        picks.append(nxt)
    top = torch.stack(picks, dim=1) + span_start
    idx = _with_fixed(top, span_start, span_end, n)
    _record(tag, idx)
    return idx


def select_random(x: torch.Tensor, k: int, span_start: int, span_end: int, seed: int, tag: str = "",
                  rule: tuple | None = None, padding: torch.Tensor | None = None) -> torch.Tensor:
    """Keep k span tokens chosen by a seeded pseudo-random order (the same for every sample).
    x: [B, N, ...] (only its shape is used); ``rule`` as for :func:`select_diverse`; ``padding``
    [B, N] bool (a padded encoder batch): counted per row by :func:`select_padded`. Returns [B, M]."""
    b, n = x.shape[0], x.shape[1]
    if rule is not None:  # the hashes themselves (the same order as their ranks), computed for this N
        h = ((torch.arange(n, device=x.device) + 1) * HASH_MULTIPLIER + hash_offset(seed)) % MERSENNE31
        for _ in range(3):
            h = (h * PARK_MILLER) % MERSENNE31
        if padding is not None:
            return select_padded(h.double().expand(b, n), padding, *rule, tag=tag)
        span_start, span_end, k = rule_counts(n, *rule)
        top = torch.topk(h.narrow(0, span_start, span_end - span_start).double(), k).indices + span_start
        idx = _with_fixed(top.expand(b, k), span_start, span_end, n)
        _record(tag, idx)
        return idx
    scores = torch.tensor(random_scores(n, seed)[span_start:span_end], dtype=torch.float32, device=x.device)
    top = torch.topk(scores, k).indices + span_start
    idx = _with_fixed(top.expand(b, k), span_start, span_end, n)
    _record(tag, idx)
    return idx


def pool_tokens(x: torch.Tensor, prefix: int, height: int, width: int, fh: int, fw: int) -> torch.Tensor:
    """Average-pool the patch grid by fh × fw windows. x: [B, prefix + H·W + suffix, C]
    (row-major grid) -> [B, prefix + (H/fh)·(W/fw) + suffix, C]; tokens outside the grid pass
    through."""
    b, _, c = x.shape
    end = prefix + height * width
    grid = x[:, prefix:end].reshape(b, height // fh, fh, width // fw, fw, c)
    pooled = grid.mean(dim=(2, 4)).reshape(b, (height // fh) * (width // fw), c)
    return torch.cat([x[:, :prefix], pooled, x[:, end:]], dim=1)


def select_fixed(x: torch.Tensor, indices: list[int], tag: str = "") -> torch.Tensor:
    """The same kept indices for every sample: [B, len(indices)]. x: [B, N, ...] (shape only)."""
    idx = torch.tensor(indices, dtype=torch.int64, device=x.device).expand(x.shape[0], len(indices))
    _record(tag, idx)
    return idx


def full_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) for one fused-attention layer: [B, H, N, N] (GQA expanded)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q, k.transpose(-1, -2)) * s
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if causal:
        n = q.shape[-2]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def wpr(probs: torch.Tensor, s: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` weighted-PageRank steps s <- Aᵀ s per head, computed as the row vector sᵀ A
    (same numbers, no transpose of A). probs: [B, H, N, N]; s: [.., 1, N] -> [B, H, 1, N]."""
    for _ in range(iters):
        s = torch.matmul(s, probs)
    return s


def eir(s: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over heads ("emphasizing informative region"): [B, H, 1, N] -> [B, N]."""
    return (s * s).mean(dim=1).sqrt()[:, 0, :]


def _wpr_start_at(real: torch.Tensor, cls: int | None, like: torch.Tensor) -> torch.Tensor:
    """Zero-TPrune's start (``schedules.wpr_start``) from the tokens as tensors, in double as the ONNX
    lowering computes it: uniform over each row's real tokens, the CLS token (when real) weighted √n,
    summing to 1. ``real`` [R, N] bool (one row of N trues, or a padded batch's real tokens) -> [R, N]
    in ``like``'s type; padding 0."""
    ones = real.double()
    count = ones.sum(1, keepdim=True)
    if cls is None:
        return (ones / count).to(like.dtype)
    at_cls = (torch.arange(real.shape[1], device=real.device) == cls)[None, :] & real
    root = count.sqrt()
    total = torch.where(at_cls.any(1, keepdim=True), count - 1 + root, count)
    return (torch.where(at_cls, root, ones) / total).to(like.dtype)


def select_zero_tprune(probs: torch.Tensor, keys: torch.Tensor, k: int, span_start: int, span_end: int,
                       iters: int, drop_similar: int, cls: int | None, tag: str = "", rule: tuple | None = None,
                       similar: float = 0.0, padding: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-TPrune's I′ -> S -> I selection over the span.

    probs: [B, H, N, N] attention of the scoring layer; keys: [B, N, Dk] its key vectors.
    I′: one WPR step ranks the span; S: the less important half A is compared with the
    more important half B by cosine similarity of keys and the ``drop_similar`` A tokens
    most similar to some B token are dropped; I: ``iters`` WPR steps, top-k of the rest.
    Ties go to the lower index. ``rule`` as for :func:`select_diverse`; then ``drop_similar`` is
    min(round(``similar`` · (L − k)), L // 2) at this N (L: the span length). ``padding`` [B, N] bool (a
    padded batch, with the ``rule``): counted per row (:func:`_zero_tprune_padded`). Returns kept indices [B, M].
    """
    n = probs.shape[-1]
    if padding is not None and not _fake(probs):
        span_start, span_end, _ = rule_counts(n, *rule)
        top = _zero_tprune_padded(probs, keys, padding, span_start, span_end, iters, cls, rule[4], rule[5], similar)
        idx = _with_fixed(top + span_start, span_start, span_end, n)
        _record(tag, idx)
        return idx
    if rule is not None:  # counts and start from N as tensor and symbolic ops (torch.export traces them)
        span_start, span_end, k = rule_counts(n, *rule)
        size = span_end - span_start
        drop_similar = torch.sym_min(round_keep(similar, size - k), size // 2)
        s0 = _wpr_start_at(torch.ones(1, n, dtype=torch.bool, device=probs.device), cls, probs)
    else:
        s0 = torch.tensor(wpr_start(n, cls), dtype=probs.dtype, device=probs.device)[None, :]
    s1 = wpr(probs, s0, 1)
    span = span_end - span_start
    imp = eir(wpr(probs, s1, iters - 1))[:, span_start:span_end]
    if similar > 0 if rule is not None else drop_similar > 0:  # (no branch on the run-time count)
        rank = eir(s1)[:, span_start:span_end]
        order = torch.sort(rank, dim=1, descending=True, stable=True).indices
        nb = span - span // 2
        b_idx, a_idx = order[:, :nb], order[:, nb:]
        kf = keys[:, span_start:span_end].float()
        kf = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ka = torch.gather(kf, 1, a_idx[..., None].expand(-1, -1, kf.shape[-1]))
        kb = torch.gather(kf, 1, b_idx[..., None].expand(-1, -1, kf.shape[-1]))
        best = torch.matmul(ka, kb.transpose(1, 2)).amax(dim=2)  # [B, |A|]
        worst = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :drop_similar]
        drop = torch.gather(a_idx, 1, worst)
        imp = imp.scatter(1, drop, float("-inf"))
    top = torch.sort(imp, dim=1, descending=True, stable=True).indices[:, :k] + span_start
    idx = _with_fixed(top, span_start, span_end, n)
    _record(tag, idx)
    return idx


def _zero_tprune_padded(probs, keys, pad, lo: int, hi: int, iters: int, cls: int | None, keep: float | None,
                        count: int | None, similar: float) -> torch.Tensor:
    """Zero-TPrune on a padded batch (``pad`` [B, N] bool; probs [B, H, N, N], keys [B, N, Dk]), each row
    as its text alone: the WPR start is uniform over its n_b real tokens (the CLS token weighted √n_b),
    so padding (a query row there, a masked key column) weighs nothing; over its L_b real span tokens
    k_b (the rule) and the S-stage's halves and drop_b = min(round(similar · (L_b − k_b)), L_b // 2)
    are its own. Then the top k_b real tokens, the batch keeping k = max k_b (:func:`select_padded`'s
    fill: padding, then the next best). -> span picks [B, k], span-relative."""
    b = pad.shape[0]
    s1 = wpr(probs, _wpr_start_at(~pad, cls, probs)[:, None, None, :], 1)
    imp = eir(wpr(probs, s1, iters - 1))[:, lo:hi]
    span_pad = pad[:, lo:hi]
    length = hi - lo
    real = length - span_pad.sum(1)  # L_b
    own = _rule_count(real, keep, count)
    drop = torch.minimum(torch.round((real - own).double() * similar).long(), real // 2)  # half to even, as Python
    order = torch.sort(eir(s1)[:, lo:hi].masked_fill(span_pad, float("-inf")), dim=1, descending=True,
                       stable=True).indices  # real tokens by rank, then padding
    rank = torch.arange(length, device=pad.device)[None, :]
    nb = (real - real // 2)[:, None]
    in_b, in_a = rank < nb, (rank >= nb) & (rank < real[:, None])
    kf = keys[:, lo:hi].float()
    kf = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ko = kf.gather(1, order[..., None].expand(-1, -1, kf.shape[-1]))  # in rank order
    best = torch.bmm(ko, ko.transpose(1, 2)).masked_fill(~in_b[:, None, :], float("-inf")).amax(dim=2)
    best = best.masked_fill(~in_a, float("-inf"))  # [B, L]: A's tokens' best match in B
    worst = torch.sort(best, dim=1, descending=True, stable=True).indices
    dropped = torch.zeros_like(span_pad).scatter(1, worst, rank.expand(b, length) < drop[:, None])  # rank space
    dropped = torch.zeros_like(span_pad).scatter(1, order, dropped)
    imp = imp.masked_fill(dropped, torch.finfo(imp.dtype).min)  # below every kept token, above padding
    return select_padded(imp, span_pad, 0, False, 0, True, keep, count)


def compose_cuts(steps: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sizes and positions after a chain of cuts, for users who pool the reduced tokens
    themselves. ``steps``: per cut, in order, (kept indices [B, M], dest [B, N] or a static dest
    list [N] for a merge or pool, else None, N, M). Returns sizes [B, M] float32 (how many input
    tokens each output token stands for) and kept indices [B, M] int64 (each output token's input
    position: its representative after a merge)."""
    size = pos = None
    for idx, dest, n, m in steps:
        b = idx.shape[0]
        if size is None:
            size = torch.ones(b, n, dtype=torch.float32, device=idx.device)
            pos = torch.arange(n, device=idx.device).expand(b, n)
        if dest is not None:
            if not isinstance(dest, torch.Tensor):
                dest = torch.tensor(dest, device=idx.device).expand(b, n)
            size = torch.zeros(b, m + 1, dtype=size.dtype, device=size.device).scatter_add(1, dest, size)[:, :m]
        else:
            size = size.gather(1, idx)
        pos = pos.gather(1, idx)
    return size, pos
