"""Token merging in plain torch: assignments (which output slot each token goes to) and
the weighted merge itself.

Shapes: B batch, N tokens in, M tokens out, C channels, D metric width.
An assignment is ``dest`` [B, N] (slot in 0..M, M = dropped), ``weight`` [B, N] and
``rep`` [B, M] (per slot, the source token whose masks/positions it takes).
"""
from __future__ import annotations

import torch

from ..schedules import PADDING_CROSS as CROSS
from .tokens import _at_least, _record


def _cap(count: int, most):
    """min(count, most), symbolic on a size under torch.export."""
    return torch.sym_min(count, most) if isinstance(most, torch.SymInt) else min(count, most)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def keys_metric(k: torch.Tensor, layout: str) -> torch.Tensor:
    """Keys averaged over heads: [B, H, N, D] ("bhnd") or kᵀ [B, H, D, N] ("bhdn") -> [B, N, D]."""
    m = k.mean(dim=1)
    return m.transpose(1, 2) if layout == "bhdn" else m


def tome_assign(metric: torch.Tensor, r: int, prefix: int, tag: str = "", padding: torch.Tensor | None = None):
    """ToMe's bipartite soft matching, per sample.

    metric [B, N, D]: tokens alternate into A (even) and B (odd); each A token's most
    cosine-similar B token is its edge; the ``r`` A tokens with the strongest edges merge
    into their B match. The first ``prefix`` tokens never merge (ToMe: CLS in A's rows,
    a distillation token in B's columns). Output order as ToMe: the unmerged A tokens
    (sorted by index when there are prefix tokens, else by edge strength), then every B
    token; prefix tokens first, in their original order.
    ``r`` is capped at (N − prefix) // 2. Returns dest [B, N], rep [B, M], M = N − r.

    ``padding`` [B, N] bool: each row is matched as its real tokens alone would be (A and B by a
    token's place among the real ones, r capped at (R − prefix) // 2 for R real tokens), so its
    first R − r_row slots are those of its text alone; padding never merges: the r − r_row padding
    tokens the batch's M leaves no room for are dropped (dest M), the others fill the row's last
    slots in order.

    Computed on whole-sequence tensors ([B, N, N] scores with the pairs that are not A-to-B masked
    out, [B, N] ranks), so that the only sizes are N and M, and M is written as
    max(N − r, ⌈(N + prefix) / 2⌉) (the capped N − min(r, (N − prefix) // 2) without a Min):
    torch.export then traces it on a dynamic N without specialising to a length.
    """
    b, n, _ = metric.shape
    dev = metric.device
    m = _at_least(n - r, (n + prefix + 1) // 2)  # tokens out
    r = n - m  # merged (capped: half the mergeable tokens, which a dynamic token count meets at short inputs)
    pos = torch.arange(n, device=dev)
    if padding is None:
        real, index, real_n, r_row = torch.ones(n, dtype=torch.bool, device=dev), pos, n, r
    else:
        real = ~padding
        index = torch.cumsum(real.to(torch.long), dim=1) - 1  # a real token's place among the real ones
        real_n = real.sum(dim=1, keepdim=True)  # [B, 1]
        r_row = ((real_n - prefix) // 2).clamp(min=0).clamp(max=r)  # what the row alone merges
    odd = index % 2 == 1
    in_a, in_b = real & ~odd, real & odd
    pa, pb = (prefix + 1) // 2, prefix // 2  # prefix tokens in A and in B: no edge from or to them
    edges = (in_a & (index // 2 >= pa))[..., :, None] & (in_b & (index // 2 >= pb))[..., None, :]
    unit = _normalized(metric)
    scores = torch.bmm(unit, unit.transpose(1, 2)).masked_fill(~edges, float("-inf"))  # [B, N, N]
    node_max, node_idx = scores.max(dim=-1)  # [B, N]: for A rows
    by_edge = torch.sort(node_max, dim=1, descending=True, stable=True).indices  # A rows first (stable):
    by_edge = by_edge.gather(1, torch.sort((~in_a).expand(b, n).gather(1, by_edge).to(torch.uint8), dim=1,
                                           stable=True).indices)
    rank = torch.empty_like(by_edge).scatter_(1, by_edge, pos.expand(b, n))  # an A token's place in edge order
    merged = in_a & (rank < r_row)
    u = (real_n + 1) // 2 - r_row  # unmerged A tokens: slots 0..u-1, then the B tokens
    if prefix:
        unmerged_slot = torch.cumsum((in_a & ~merged).to(torch.long), dim=1) - 1  # by index
    else:
        unmerged_slot = rank - r_row  # by edge strength
    match = node_idx if padding is None else index.gather(1, node_idx)  # the B token's place among the real
    dest = torch.where(odd, u + index // 2, torch.where(merged, u + match // 2, unmerged_slot))
    gone = merged
    if padding is not None:  # padding after the row's own slots; what M has no room for is dropped
        pad_index = torch.cumsum(padding.to(torch.long), dim=1) - 1
        dropped = padding & (pad_index >= (n - real_n) - (r - r_row))
        dest = torch.where(real, dest, torch.where(dropped, m, real_n - r_row + pad_index))
        gone = merged | dropped
    rep = torch.zeros(b, m + 1, dtype=torch.long, device=dev).scatter_(1, dest.masked_fill(gone, m),
                                                                       pos.expand(b, n))[:, :m]
    if pb:  # ToMe's order with a distillation token: the prefix tokens' slots first
        new = _prefix_slots_first(prefix, u, m, dev).expand(b, m)
        dest = torch.cat([new, torch.full((b, 1), m, dtype=torch.long, device=dev)], dim=1).gather(1, dest)
        rep = torch.empty_like(rep).scatter_(1, new, rep)
    _record(tag, rep)
    _record(f"{tag}/dest" if tag else "", dest)
    return dest, rep


def _prefix_slots_first(prefix: int, u, m, dev) -> torch.Tensor:
    """[M] (or [B, M] for ``u`` [B, 1]): where each of ToMe's M slots goes when the prefix tokens'
    slots come first, in their original order (:func:`~prunec.schedules.tome_order`: ``u``
    unmerged A slots, then B's), the others after them in order."""
    slots = torch.arange(m, device=dev)
    i = torch.arange(prefix, device=dev)
    firsts = torch.where(i % 2 == 0, i // 2, u + i // 2)  # the prefix tokens' slots [prefix] or [B, prefix]
    is_first = slots[:, None] == firsts[..., None, :]  # [(B,) M, prefix]
    before = (firsts[..., None, :] < slots[:, None]).sum(dim=-1)
    return torch.where(is_first.any(dim=-1), is_first.to(torch.long).argmax(dim=-1), prefix + slots - before)


def _scatter_rows(x: torch.Tensor, dest: torch.Tensor, m: int) -> torch.Tensor:
    """Σ of x's rows [B, N, W] per dest slot -> [B, m + 1, W] (an index_add over whole rows)."""
    b, n, w = x.shape
    flat = (dest + torch.arange(b, device=dest.device)[:, None] * (m + 1)).reshape(-1)
    out = torch.zeros(b * (m + 1), w, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(b * n, w))
    return out.reshape(b, m + 1, w)


def merge_tokens(x: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor | None, m: int,
                 normalize: bool = True) -> torch.Tensor:
    """x [B, N, C] -> [B, M, C]: slot j = Σ w·x / Σ w over the tokens with dest == j (or Σ w·x
    without ``normalize``); dest == M drops a token. weight [B, N] or [B, N, 1] (None: ones)."""
    b, n, c = x.shape
    w = torch.ones(b, n, 1, dtype=x.dtype, device=x.device) if weight is None else weight.reshape(b, n, 1).to(x.dtype)
    out = _scatter_rows(x * w, dest, m)
    if normalize:
        out = out / _scatter_rows(w, dest, m).clamp_min(torch.finfo(x.dtype).tiny)
    return out[:, :m]


def merge_sizes(size: torch.Tensor | None, like: torch.Tensor, dest: torch.Tensor, m: int) -> torch.Tensor:
    """Token sizes after a merge: [B, N, 1] summed into [B, M, 1] (None: every token has size 1)."""
    b, n = dest.shape
    if size is None:
        size = torch.ones(b, n, 1, dtype=like.dtype, device=like.device)
    return _scatter_rows(size, dest, m)[:, :m]


def evit_assign(scores: torch.Tensor, k: int, prefix: int, fuse: bool = True, tag: str = "",
                keep: float | None = None, padding: torch.Tensor | None = None):
    """EViT: keep the top-``k`` non-prefix tokens by CLS attention ``scores`` [B, N] (in
    descending score order, as EViT's topk; in their original order when every token is kept,
    as no cut would), fuse the rest into one last token weighted by their attention (an
    unnormalized sum, as EViT; without ``fuse`` they are dropped). ``keep`` (a dynamic token
    count): k = min(max(1, ceil(keep · (N − prefix))), N − prefix) at this N; with ``padding``
    [B, N] bool (a padded batch, see :func:`_evit_padded`) k is counted per row.
    Returns dest [B, N], weight [B, N], rep [B, prefix + k + 1] (the fused slot takes its most
    attended token's masks)."""
    if padding is not None and keep is not None:
        dest, weight, rep = _evit_padded(scores, padding, prefix, fuse, keep)
        _record(tag, rep)
        _record(f"{tag}/dest" if tag else "", dest)
        return dest, weight, rep
    b, n = scores.shape
    dev = scores.device
    if keep is not None:
        k = _cap(_evit_count(keep, n - prefix), n - prefix)
    cand = scores[:, prefix:]
    order = torch.sort(cand, dim=1, descending=True, stable=True).indices + prefix  # [B, N - prefix]
    top, rest = order[:, :k], order[:, k:]
    every = (torch.arange(cand.shape[1], device=dev) < k).all()  # a short input keeps every token: in order
    top = torch.where(every, torch.sort(top, dim=1).values, top)
    fused = prefix + k
    dest = torch.full((b, n), fused, dtype=torch.long, device=dev)
    if prefix:
        dest[:, :prefix] = torch.arange(prefix, device=dev)
    dest.scatter_(1, top, (prefix + torch.arange(k, device=dev)).expand(b, k))
    weight = torch.ones(b, n, dtype=scores.dtype, device=dev)
    weight.scatter_(1, rest, scores.gather(1, rest))
    parts = [torch.arange(prefix, device=dev).expand(b, prefix), top]
    if fuse and rest.shape[1]:
        parts.append(rest[:, :1])
    rep = torch.cat(parts, dim=1)
    _record(tag, rep)
    _record(f"{tag}/dest" if tag else "", dest)
    return dest, weight, rep


def _evit_count(keep: float, rest):
    """max(1, ceil(keep · rest)) in integers (keep = p / q exactly): ``rest`` an int, a SymInt
    (torch.export traces it) or an int64 tensor."""
    p, q = keep.as_integer_ratio()
    k = -((-p * rest) // q)
    return torch.clamp(k, min=1) if isinstance(k, torch.Tensor) else torch.sym_max(k, 1)


def _evit_padded(scores: torch.Tensor, padding: torch.Tensor, prefix: int, fuse: bool, keep: float):
    """EViT on a padded batch (``padding`` [B, N] bool; the prefix tokens real): row b keeps
    k_b = min(max(1, ceil(keep · R_b)), R_b) of its R_b real non-prefix tokens, as its text alone
    does, and fuses its other real ones (padding weighs 0) into the slot right after them; the
    batch keeps k = max k_b, a row with fewer filling the slots after its fused one with its
    padding (masked: inert), then its next best tokens. So a row's first prefix + k_b + 1 slots
    are those of its text alone. -> (dest [B, N], weight [B, N], rep [B, M])."""
    b, n = scores.shape
    dev = scores.device
    length = n - prefix
    pad = padding[:, prefix:]
    real = length - pad.sum(1)
    own = torch.minimum(_evit_count(keep, real), real)  # [B]
    k = int(own.max()) if b else 0
    order = torch.sort(scores[:, prefix:].masked_fill(pad, float("-inf")), dim=1, descending=True,
                       stable=True).indices  # real tokens best first, then padding
    rank = torch.arange(length, device=dev)[None, :]
    every = (own == real)[:, None]  # a row keeping each real token keeps them in order, as alone
    key = torch.where(rank < own[:, None], torch.where(every, -order, -rank),
                      torch.where(rank < real[:, None], -rank - 3 * length, -rank - 2 * length))
    ranked = order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices) + prefix
    top, rest = ranked[:, :k], ranked[:, k:]
    has_fused = fuse and length > k
    slot = prefix + rank[:, :k].expand(b, k) + ((rank[:, :k] >= own[:, None]).long() if has_fused else 0)
    fused_slot = prefix + (own if has_fused else torch.full_like(own, k))  # [B]; past M without a fused slot
    m = prefix + k + int(has_fused)
    dest = fused_slot[:, None].expand(b, n).clone()  # the rest (dropped when there is no fused slot: slot M)
    if prefix:
        dest[:, :prefix] = torch.arange(prefix, device=dev)
    dest.scatter_(1, top, slot)
    weight = torch.ones(b, n, dtype=scores.dtype, device=dev)
    weight.scatter_(1, rest, scores.gather(1, rest).masked_fill(padding.gather(1, rest), 0.0))
    rep = torch.zeros(b, m, dtype=torch.long, device=dev)
    rep[:, :prefix] = torch.arange(prefix, device=dev)
    rep.scatter_(1, slot, top)
    if has_fused:  # its most attended real token (alone, the first of the rest), or a padding one
        rep.scatter_(1, fused_slot[:, None], order.gather(1, own.clamp_max(length - 1)[:, None]) + prefix)
    return dest, weight, rep


def visionzip_assign(scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int, prefix: int,
                     tag: str = "", padding: torch.Tensor | None = None):
    """VisionZip: ``dominant`` tokens (the prefix tokens plus the top non-prefix tokens by CLS
    attention ``scores`` [B, N]) kept in original order; the remaining R tokens (original
    order) give ``contextual`` targets at stride max(1, R // contextual); every other remaining
    token joins its most cosine-similar target by keys ``metric`` [B, N, D]; a contextual
    token is target + mean(joined); with ``padding`` [B, N] bool a token joins a target of its own
    kind when there is one. Returns dest [B, N], weight [B, N], rep [B, dominant +
    contextual] (weights: 1 for dominant and targets, 1/count for joined tokens; no
    normalization)."""
    b, n = scores.shape
    dev = scores.device
    dominant = _cap(dominant, n)  # fewer tokens than dominant ones (a dynamic token count): all kept
    top = torch.sort(scores[:, prefix:], dim=1, descending=True, stable=True).indices[:, :dominant - prefix] + prefix
    keep = torch.zeros(b, n, dtype=torch.bool, device=dev)
    keep[:, :prefix] = True
    keep.scatter_(1, top, True)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, each part in original order
    dom, rest = order[:, :dominant], order[:, dominant:]
    weight = torch.ones(b, n, dtype=scores.dtype, device=dev)
    if not contextual:
        dest = torch.full((b, n), dominant, dtype=torch.long, device=dev)  # the rest: dropped
        dest.scatter_(1, dom, torch.arange(dominant, device=dev).expand(b, dominant))
        _record(tag, dom)
        _record(f"{tag}/dest" if tag else "", dest)
        return dest, weight, dom
    # the T targets among the R rest tokens: positions 0, s, 2s, ... (at most ``contextual``), in sizes and
    # tensor ops only (no branch, no list over R: torch.export traces it for every length)
    n_rest = n - dominant
    step = torch.sym_max(1, n_rest // contextual)
    t = torch.sym_min(contextual, (n_rest + step - 1) // step)
    pos = torch.arange(n_rest, device=dev)
    targets_first = torch.sort((~((pos % step == 0) & (pos < step * contextual))).to(torch.int8), stable=True).indices
    t_idx, o_idx = rest[:, targets_first[:t]], rest[:, targets_first[t:]]
    m = _normalized(metric)
    mt = m.gather(1, t_idx[..., None].expand(-1, -1, m.shape[-1]))
    mo = m.gather(1, o_idx[..., None].expand(-1, -1, m.shape[-1]))
    sim = torch.bmm(mo, mt.transpose(1, 2))  # [B, R - T, T]
    if padding is not None:  # a token joins a target of its own kind when there is one
        sim = sim.masked_fill(padding.gather(1, o_idx)[:, :, None] ^ padding.gather(1, t_idx)[:, None, :], CROSS)
    # a last column no token picks (T >= 1 whenever a token is left to join): argmax over T = 0 targets
    choice = torch.cat([sim, sim.new_full((b, sim.shape[1], 1), float("-inf"))], 2).argmax(dim=2)
    counts = torch.zeros(b, t + 1, dtype=scores.dtype, device=dev).scatter_add(
        1, choice, torch.ones_like(choice, dtype=scores.dtype)).clamp_min(1.0)
    dest = torch.empty(b, n, dtype=torch.long, device=dev)  # every token gets its slot below
    dest.scatter_(1, dom, torch.arange(dominant, device=dev).expand(b, dominant))
    dest.scatter_(1, t_idx, (dominant + torch.arange(t, device=dev)).expand(b, t))
    dest.scatter_(1, o_idx, dominant + choice)
    weight.scatter_(1, o_idx, 1.0 / counts.gather(1, choice))
    rep = torch.cat([dom, t_idx], dim=1)
    _record(tag, rep)
    _record(f"{tag}/dest" if tag else "", dest)
    return dest, weight, rep


def ppt_scores(probs_cls: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """PPT's importance: CLS attention [B, N] (any head reduction) times the value norm (heads
    concatenated; v [B, H, N, D] or [B, N, H·D]), normalized to sum 1 over the non-prefix
    tokens; prefix tokens score 2 (always kept). -> [B, N]."""
    vn = v.pow(2).sum(dim=(1, 3)).sqrt() if v.dim() == 4 else v.pow(2).sum(dim=2).sqrt()
    s = (probs_cls * vn)[:, prefix:]
    s = s / s.sum(dim=1, keepdim=True)
    return torch.cat([torch.full_like(probs_cls[:, :prefix], 2.0), s], dim=1)


def ppt_assign(scores: torch.Tensor, metric: torch.Tensor, r: int, prefix: int, threshold: float, tag: str = "",
               padding: torch.Tensor | None = None):
    """PPT, per sample: when the (unbiased) variance of the non-prefix importance ``scores``
    [B, N] is below ``threshold``, pool (ToMe's matching on ``metric``); otherwise prune the
    ``r`` least important tokens (kept tokens in descending importance, as PPT).
    Returns dest [B, N], rep [B, N - r]."""
    b, n = scores.shape
    dev = scores.device
    pool = (scores[:, prefix:].var(dim=1) < threshold)[:, None]  # [B, 1]
    dest_m, rep_m = tome_assign(metric, r, prefix, padding=padding)  # ``padding``: as for tome_assign
    m = rep_m.shape[1]  # N − r, r capped as ToMe's
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    dest_p = torch.full((b, n), m, dtype=torch.long, device=dev)
    dest_p.scatter_(1, order[:, :m], torch.arange(m, device=dev).expand(b, m))
    dest = torch.where(pool, dest_m, dest_p)
    rep = torch.where(pool, rep_m, order[:, :m])
    _record(tag, rep)
    _record(f"{tag}/dest" if tag else "", dest)
    return dest, rep
