"""A tiny hand-written transformer whose attention spelling and pooling the tests choose:
public ``scaled_dot_product_attention`` or one of aten's private ``_scaled_dot_product_*``
variants, and token pooling written as ``x.sum(1) / x.shape[1]`` (a count that exports as
a number). ``config._attn_implementation = "eager"`` (what the references set) computes the
probabilities explicitly and returns them from the attention module, so the hook
references in ``reference.py`` read them."""
from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten

# attention spellings: (q, k, v, additive mask or None, causal, scale) -> [B, H, N, D]
ATTN = {
    "sdpa": lambda q, k, v, m, c, s: nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c,
                                                                                 scale=s),
    "flash_cpu": lambda q, k, v, m, c, s: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, c,
                                                                                          attn_mask=m, scale=s)[0],
    "flash": lambda q, k, v, m, c, s: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, c, False, scale=s)[0],
    "efficient": lambda q, k, v, m, c, s: aten._scaled_dot_product_efficient_attention(q, k, v, m, False, 0.0, c,
                                                                                      scale=s)[0],
    "cudnn": lambda q, k, v, m, c, s: aten._scaled_dot_product_cudnn_attention(q, k, v, m, False, 0.0, c, False,
                                                                              scale=s)[0],
    "math_for_mps": lambda q, k, v, m, c, s: aten._scaled_dot_product_attention_math_for_mps(q, k, v, m, 0.0, c, None,
                                                                                            scale=s)[0],
    "overrideable": lambda q, k, v, m, c, s: aten._scaled_dot_product_fused_attention_overrideable(q, k, v, m, 0.0, c,
                                                                                                  False, scale=s)[0],
}


class Config:
    def __init__(self, attn):
        self._attn_implementation = attn


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, config, causal, scale):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.config, self.causal, self.scale = heads, config, causal, scale

    def forward(self, x, mask):
        """x [B, N, C], mask additive [B, 1, 1, N] or None -> ([B, N, C], probs [B, H, N, N] or None)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        probs = None
        if self.config._attn_implementation == "eager":
            logits = (q @ k.transpose(-1, -2)) * self.scale
            if mask is not None:
                logits = logits + mask
            if self.causal:
                logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            probs = logits.softmax(-1)
            out = probs @ v
        else:
            out = ATTN[self.config._attn_implementation](q, k, v, mask, self.causal, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), probs


class Block(nn.Module):
    def __init__(self, dim, heads, config, causal, scale):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads, config, causal, scale)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        x = x + self.self_attn(self.ln1(x), mask)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """features [B, N, F] (+ key-padding mask [B, N] of 1/0) -> pooled [B, classes] or tokens.

    pool: ``sum_div`` (``x.sum(1) / x.shape[1]``), ``sum_div_early`` (the same count read off the
    input, before the blocks), ``mean`` or ``none`` (the tokens)."""

    def __init__(self, attn="sdpa", depth=3, dim=32, heads=4, features=16, classes=5, causal=False, scale=0.3,
                 pool="sum_div"):
        super().__init__()
        self.config = Config(attn)
        self.embed = nn.Linear(features, dim)
        self.layers = nn.ModuleList(Block(dim, heads, self.config, causal, scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.pool = pool

    def forward(self, x, mask=None):
        count = x.shape[1]  # read before the blocks: a cut in between does not change it
        additive = None if mask is None else ((1.0 - mask) * -1e4)[:, None, None, :]
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x, additive)
        x = self.norm(x)
        if self.pool == "sum_div":
            return self.head(x.sum(1) / x.shape[1])
        if self.pool == "sum_div_early":
            return self.head(x.sum(1) / count)
        if self.pool == "mean":
            return self.head(x.mean(1))
        return x


def tiny_inputs(batch=2, n=12, features=16, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(batch, n, features, generator=g)}
    if mask:
        m = torch.ones(batch, n)
        m[0, n - 3:] = 0
        out["mask"] = m
    return out


def tiny(attn="sdpa", seed=0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(attn, **kw).eval()
