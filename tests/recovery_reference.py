"""Plain-PyTorch references of token recovery, built from the *unmodified* model with hooks
(as fastv_reference.py does), never from prunec's outputs:

* the stream at the cut [B, N, C] is captured entering the cut's block;
* the reduction is the method's reference (reference.py / merge_reference.py) run on the
  encoder's blocks, giving the tokens leaving the last block [B, M, C] and the kept indices
  [B, M] (selections) or, per merge, each source token's output slot (merges);
* recovery is its definition: ``copy`` puts kept tokens back at their positions over the
  stream at the cut; ``unmerge`` gives every token its merged token's value, last merge
  first; ``attn`` (Hourglass Tokenizer) lets every token at the cut query the reduced
  tokens' features at the cut and takes the weighted sum of their final features.
"""
from __future__ import annotations

import torch

from merge_reference import _apply_groups, _carry, _rep_of, bipartite_groups, reference_merge
from reference import reference_run


class Blocks(torch.nn.Module):
    """``embed(x)`` then the blocks: the tokens leaving the last block [B, N, C]."""

    def __init__(self, embed, blocks):
        super().__init__()
        self.embed, self.blocks = embed, blocks

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return h


def stream_into(blocks, k, module, inputs):
    """The tensor entering ``blocks[k]`` in the unmodified ``module`` [B, N, C]."""
    seen = {}
    h = blocks[k].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        h.remove()
    return seen["x"]


def selected(embed, blocks, inputs, layer, choose):
    """(tokens leaving the last block [B, M, C], kept indices [B, M]) of a selection before ``layer``."""
    out, idx = reference_run(Blocks(embed, blocks), inputs, layer, choose)
    return out, idx


def tome_merged(embed, blocks, inputs, r: dict[int, int], prefix: int, prop_attn=True):
    """ToMe at blocks ``r`` {block: r}: (tokens leaving the last block [B, M, C], per merge the
    slot of each source token [B, N_before]); reductions as merge_reference.tome_reduce."""
    dests = []

    def tome(rr_max):
        def reduce(x, k, v, probs, state):
            n = x.shape[1]
            rr = min(rr_max, (n - prefix) // 2)
            if rr <= 0:
                return x
            size = state["size"] if state["size"] is not None else torch.ones_like(x[..., :1])
            metric = k.mean(dim=1)
            pad = state.get("pad")
            groups = [bipartite_groups(metric[i], rr, prefix, None if pad is None else pad[i]) for i in range(x.shape[0])]
            dest = torch.empty(x.shape[0], n, dtype=torch.long)
            for i, gs in enumerate(groups):
                for j, g in enumerate(gs):
                    dest[i, g] = j
            dests.append(dest)
            x, state["size"] = _apply_groups(x, size, groups)
            _carry(state, _rep_of(groups))
            return x
        return reduce
    out, _ = reference_merge(Blocks(embed, blocks), inputs, {i: tome(v) for i, v in r.items()}, prop_attn=prop_attn)
    return out, dests


def recover(mode, src, y, idx=None, dests=None):
    """Restore y [B, M, C] to [B, N, C] (see the module docstring). ``src``: the stream at the cut."""
    if mode == "unmerge" and dests:
        full = y
        for d in reversed(dests):
            full = torch.gather(full, 1, d[..., None].expand(-1, -1, y.shape[-1]))
        return full
    if mode == "attn":
        keys = torch.gather(src, 1, idx[..., None].expand(-1, -1, src.shape[-1]))
        att = torch.softmax(src @ keys.transpose(1, 2) / src.shape[-1] ** 0.5, dim=-1)
        return att @ y
    out = src.clone()
    for b in range(src.shape[0]):
        out[b, idx[b]] = y[b]
    return out
