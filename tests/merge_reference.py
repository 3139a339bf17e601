"""Plain-PyTorch references of the merging methods, written from the papers, on the
*unmodified* model: every block's forward is replaced by a plain re-implementation that
calls the block's own submodules (so the weights are the model's), computes attention
eagerly (adding log(size) to the logits when proportional attention is on), and lets a
method reduce the tokens between attention and MLP. Families: timm ViT blocks, HF ViT,
Dinov2, CLIP (pre-norm) and BERT (post-norm, with its padding mask).

A reduction is ``reduce(x, k, v, probs, state) -> x``: x [B, N, C] after the attention
residual; k, v [B, H, N, D]; probs [B, H, N, N]; ``state`` holds ``size`` [B, N, 1] (or
None), the additive padding ``mask`` [B, 1, 1, N] (or None) and ``rep`` (per output token,
the token it takes its mask from).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from reference import gather, layers_of


@dataclass
class Parts:
    norm1: Callable
    q: Callable
    k: Callable
    v: Callable
    out: Callable
    heads: int
    scale: float
    ls1: Callable
    norm2: Callable
    mlp: Callable
    ls2: Callable
    post_norm: bool = False  # BERT: norm1 after the attention residual, norm2 after the MLP residual
    qk_norm: tuple = (None, None)


def _identity(x):
    return x


def parts_of(layer) -> Parts:
    if hasattr(layer, "attn") and hasattr(layer.attn, "qkv"):  # timm
        a = layer.attn
        c = a.qkv.out_features // 3
        return Parts(layer.norm1, lambda h: a.qkv(h)[..., :c], lambda h: a.qkv(h)[..., c:2 * c],
                     lambda h: a.qkv(h)[..., 2 * c:], a.proj, a.num_heads, a.scale, layer.ls1, layer.norm2, layer.mlp,
                     layer.ls2, qk_norm=(a.q_norm, a.k_norm))
    if hasattr(layer, "layernorm_before"):  # HF ViT
        a = layer.attention
        return Parts(layer.layernorm_before, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.config.num_attention_heads,
                     a.scaling, _identity, layer.layernorm_after, layer.mlp, _identity)
    if hasattr(layer, "layer_scale1"):  # Dinov2
        a = layer.attention
        return Parts(layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.config.num_attention_heads, a.scaling,
                     layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2)
    if hasattr(layer, "self_attn_layer_norm"):  # Whisper encoder (pre-norm, fc1 -> activation -> fc2)
        a = layer.self_attn
        return Parts(layer.self_attn_layer_norm, a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.scaling,
                     _identity, layer.final_layer_norm, lambda h: layer.fc2(layer.activation_fn(layer.fc1(h))),
                     _identity)
    if hasattr(layer, "self_attn"):  # CLIP
        a = layer.self_attn
        return Parts(layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.scale, _identity,
                     layer.layer_norm2, layer.mlp, _identity)
    if hasattr(layer, "intermediate"):  # BERT
        s, o = layer.attention.self, layer.attention.output
        return Parts(o.LayerNorm, s.query, s.key, s.value, o.dense, s.num_attention_heads,
                     s.attention_head_size ** -0.5, _identity, layer.output.LayerNorm,
                     lambda h: layer.output.dense(layer.intermediate(h)), _identity, post_norm=True)
    raise ValueError(f"no reference block for {type(layer).__name__}")


def _block(p: Parts, x, state, reduce):
    b, n, c = x.shape
    h = x if p.post_norm else p.norm1(x)
    q, k, v = (f(h).reshape(b, n, p.heads, c // p.heads).transpose(1, 2) for f in (p.q, p.k, p.v))
    if p.qk_norm[0] is not None:
        q, k = p.qk_norm[0](q), p.qk_norm[1](k)
    logits = (q * p.scale) @ k.transpose(-2, -1)
    if state.get("mask") is not None:
        logits = logits + state["mask"]
    if state.get("prop_attn") and state.get("size") is not None:
        logits = logits + state["size"].log()[:, None, None, :, 0]
    probs = logits.softmax(dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(b, n, c)
    x = x + p.ls1(p.out(o))
    if p.post_norm:
        x = p.norm1(x)
    if reduce is not None:
        x = reduce(x, k, v, probs, state)
    y = x + p.ls2(p.mlp(x if p.post_norm else p.norm2(x)))
    return p.norm2(y) if p.post_norm else y


def reference_merge(model, inputs: dict, reductions: dict[int, Callable], prop_attn: bool = False,
                    pooled_mean: bool = False):
    """Run ``model`` with its blocks replaced by :func:`_block`, reducing at ``reductions``
    {block index: reduce}. With ``pooled_mean`` the model is a mean-pooling wrapper
    (prunec.examples.MeanPooled): the pooled output is Σ size·mask·x / Σ size·mask."""
    model = copy.deepcopy(model).eval()
    state = {"size": None, "mask": None, "prop_attn": prop_attn, "rep": None}
    if "attention_mask" in inputs:
        m = inputs["attention_mask"].to(torch.float32)
        state["pad"] = m
        state["mask"] = ((1.0 - m) * torch.finfo(torch.float32).min)[:, None, None, :]
    inner = model.encoder if pooled_mean else model
    if getattr(model, "global_pool", None) == "avg" and hasattr(model, "pool"):  # timm: a size-weighted token mean
        model.pool = lambda x: _weighted_avg_pool(x, state["size"], model.num_prefix_tokens)
    for i, layer in enumerate(layers_of(inner)):
        p = parts_of(layer)
        layer.forward = (lambda p, red: lambda x, *a, **kw: _block(p, x, state, red))(p, reductions.get(i))
    with torch.no_grad():
        if pooled_mean:
            h = inner(**inputs).last_hidden_state
            size = state["size"] if state["size"] is not None else torch.ones_like(h[..., :1])
            w = state["pad"][..., None] * size
            return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9), state
        return model(**inputs), state


def _weighted_avg_pool(x, size, prefix: int):
    """timm's ``global_pool='avg'`` (the mean of the tokens after the prefix tokens) with each token
    weighted by its size: x [B, N, C], size [B, N, 1] or None -> [B, C]."""
    x = x[:, prefix:]
    if size is None:
        return x.mean(dim=1)
    w = size[:, prefix:]
    return (x * w).sum(dim=1) / w.sum(dim=1)


def _carry(state, rep, groups=None):
    """After a reduction: side tensors follow each output token's representative ``rep``
    [B, M]; sizes are summed over ``groups`` (per sample, per output token: source indices)."""
    if state.get("mask") is not None:
        state["mask"] = gather(state["mask"], rep, 3)
    if state.get("pad") is not None:
        state["pad"] = gather(state["pad"], rep, 1)
    state["rep"] = rep


# -- ToMe ---------------------------------------------------------------------------------

def bipartite_groups(metric, r: int, prefix: int, pad=None) -> list[list[int]]:
    """ToMe's bipartite soft matching on one sample's metric [N, D], from the paper: tokens
    alternate into A (even) and B (odd); each A token's edge is its most cosine-similar B
    token; the r strongest edges merge A into B. Prefix tokens (CLS, distillation, registers)
    neither merge (in A) nor take merges (in B). Returns the output tokens, each as the
    list of source tokens it stands for, in ToMe's order: unmerged A (by index when there is a
    CLS token, else by edge strength), then B; with two or more prefix tokens, the prefix tokens first in order.
    ``pad`` [N] (1 = real token, 0 = padding; prunec's documented rule for padded batches): the real
    tokens are matched as they are alone (r capped at (R - prefix) // 2 for R of them), then each
    padding token is an output token of its own, in order, but for the last r - r_row of them, which
    are dropped (the batch's count has no room for them)."""
    if pad is not None and bool((pad == 0).any()):
        real = [i for i in range(metric.shape[0]) if pad[i] != 0]
        pads = [i for i in range(metric.shape[0]) if pad[i] == 0]
        r_row = max(0, min(r, (len(real) - prefix) // 2))
        alone = bipartite_groups(metric[real], r_row, prefix) if real else []
        return [[real[j] for j in g] for g in alone] + [[p] for p in pads[:len(pads) - (r - r_row)]]
    n = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    sim = m[a_idx] @ m[b_idx].T
    sim[:(prefix + 1) // 2, :] = -math.inf  # prefix tokens in A never merge
    sim[:, :prefix // 2] = -math.inf  # prefix tokens in B take no merges
    best, match = sim.max(dim=1)
    ranked = sorted(range(len(a_idx)), key=lambda i: (-float(best[i]), i))
    merged, unmerged = ranked[:r], ranked[r:]
    if prefix:
        unmerged = sorted(unmerged)
    out = [[a_idx[i]] for i in unmerged]
    for j, bt in enumerate(b_idx):
        out.append([bt] + [a_idx[i] for i in merged if int(match[i]) == j])
    if prefix >= 2:  # every prefix token first, in original order
        first = sorted((g for g in out if g[0] < prefix), key=lambda g: g[0])
        out = first + [g for g in out if g[0] >= prefix]
    return out


def _apply_groups(x, size, groups_per_sample):
    """Size-weighted average of x [B, N, C] over groups; returns (x [B, M, C], size [B, M, 1])."""
    xs, ss = [], []
    for i, groups in enumerate(groups_per_sample):
        rows, sizes = [], []
        for g in groups:
            s = size[i, g]  # [len, 1]
            rows.append((x[i, g] * s).sum(0) / s.sum())
            sizes.append(s.sum(0))
        xs.append(torch.stack(rows))
        ss.append(torch.stack(sizes))
    return torch.stack(xs), torch.stack(ss)


def _rep_of(groups_per_sample, pick=lambda g: g[0]):
    return torch.tensor([[pick(g) for g in groups] for groups in groups_per_sample])


def tome_reduce(r: int, prefix: int):
    def reduce(x, k, v, probs, state):
        n = x.shape[1]
        rr = min(r, (n - prefix) // 2)
        if rr <= 0:
            return x
        size = state["size"] if state["size"] is not None else torch.ones_like(x[..., :1])
        metric = k.mean(dim=1)
        pad = state.get("pad")
        groups = [bipartite_groups(metric[i], rr, prefix, None if pad is None else pad[i]) for i in range(x.shape[0])]
        x, state["size"] = _apply_groups(x, size, groups)
        _carry(state, _rep_of(groups, pick=lambda g: g[0]))
        return x
    return reduce


# -- EViT ---------------------------------------------------------------------------------

def evit_reduce(keep: float, prefix: int, fuse: bool = True):
    """EViT: CLS attention (mean over heads) ranks the non-prefix tokens; the top
    ceil(keep·(N − prefix)) are kept in descending order, the rest fused as Σ a_j x_j."""
    def reduce(x, k, v, probs, state):
        b, n, c = x.shape
        left = math.ceil(keep * (n - prefix))
        if left >= n - prefix:
            return x
        cls_attn = probs[:, :, 0, prefix:].mean(dim=1)  # [B, N - prefix]
        _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
        others = x[:, prefix:]
        kept = torch.gather(others, 1, idx[..., None].expand(-1, -1, c))
        parts = [x[:, :prefix], kept]
        rep = [torch.arange(prefix).expand(b, prefix), idx + prefix]
        if fuse:
            mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
            w = cls_attn * mask
            parts.append((others * w[..., None]).sum(dim=1, keepdim=True))
            rep.append((cls_attn.masked_fill(~mask, -1).argmax(dim=1) + prefix)[:, None])
        _carry(state, torch.cat(rep, dim=1))
        return torch.cat(parts, dim=1)
    return reduce


# -- PPT ----------------------------------------------------------------------------------

def ppt_variance(probs, v, prefix: int = 1):
    """PPT's importance (CLS attention summed over heads × value norm, normalized over the
    non-prefix tokens) and its unbiased variance per sample."""
    b, h, n, d = v.shape
    vnorm = v.transpose(1, 2).reshape(b, n, h * d).norm(dim=2)
    s = (probs[:, :, 0].sum(dim=1) * vnorm)[:, prefix:]
    s = s / s.sum(dim=1, keepdim=True)
    return s, s.var(dim=1)


def ppt_reduce(r: int, threshold: float, prefix: int = 1, record: list | None = None):
    def reduce(x, k, v, probs, state):
        b, n, c = x.shape
        rr = min(r, (n - prefix) // 2)
        if rr <= 0:
            return x
        size = state["size"] if state["size"] is not None else torch.ones_like(x[..., :1])
        s, var = ppt_variance(probs, v, prefix)
        scores = torch.cat([torch.full((b, prefix), 2.0), s], dim=1)
        metric = k.mean(dim=1)
        groups = []
        for i in range(b):
            if float(var[i]) < threshold:  # pool
                groups.append(bipartite_groups(metric[i], rr, prefix, None if state.get("pad") is None else state["pad"][i]))
            else:  # prune: keep the N - r most important, in descending importance
                order = sorted(range(n), key=lambda t: (-float(scores[i, t]), t))
                groups.append([[t] for t in order[:n - rr]])
            if record is not None:
                record.append("pool" if float(var[i]) < threshold else "prune")
        x, state["size"] = _apply_groups(x, size, groups)
        _carry(state, _rep_of(groups))
        return x
    return reduce


# -- VisionZip (a choice for reference.reference_run: hidden at the cut) -------------------

def visionzip_choice(score_layer: int, dominant: int, contextual: int, heads: int, prefix: int = 1):
    """VisionZip, one sample at a time, on the hidden states at the cut with ``score_layer``'s
    attention and keys (the official code: LLaVA's select layer −2, i.e. the penultimate
    layer's attention / keys and the hidden states entering the last layer, a cut before layer
    depth − 1 scored by layer depth − 2): dominant = CLS + the top (dominant − 1) tokens by CLS
    attention summed over heads, original order; the rest (original order) give contextual
    targets at stride max(1, R // contextual); others join their most key-similar target;
    contextual token = target + mean(joined)."""
    from reference import Choice

    def choose(hidden, probs):
        p = probs[score_layer]  # [B, H, N, N]
        keys = probs["keys"][score_layer]  # [B, N, H·D]
        b, n, c = hidden.shape
        metric = keys.reshape(b, n, heads, -1).mean(dim=2)
        outs, reps = [], []
        for i in range(b):
            cls_sum = p[i, :, 0, prefix:].sum(dim=0)
            top = (cls_sum.topk(dominant - prefix).indices + prefix).tolist()
            dom = sorted(list(range(prefix)) + top)
            rest = [t for t in range(n) if t not in set(dom)]
            rows, rep = [hidden[i, t] for t in dom], list(dom)
            if contextual and rest:
                step = max(1, len(rest) // contextual)
                tpos = list(range(0, len(rest), step))[:contextual]
                targets = [rest[j] for j in tpos]
                others = [t for t in rest if t not in set(targets)]
                mn = metric[i] / metric[i].norm(dim=-1, keepdim=True)
                joined = {t: [] for t in targets}
                pad = probs.get("mask")  # prunec's documented rule on padded batches: a token joins its own kind
                for o in others:
                    sims = torch.stack([mn[o] @ mn[t] if pad is None or bool(pad[i, o] == 0) == bool(pad[i, t] == 0)
                                        else torch.tensor(-2.0) for t in targets])
                    joined[targets[int(sims.argmax())]].append(o)
                for t in targets:
                    extra = torch.stack([hidden[i, o] for o in joined[t]]).mean(0) if joined[t] else 0.0
                    rows.append(hidden[i, t] + extra)
                    rep.append(t)
            outs.append(torch.stack(rows))
            reps.append(rep)
        return Choice(torch.tensor(reps), torch.stack(outs))
    return choose
