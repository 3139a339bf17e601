"""Recovery in plain torch: bring a reduced token tensor back to the length and order the
tokens had at a cut.

Shapes: B batch, N tokens at the cut, M reduced tokens, C channels. ``src`` [B, N, C] is
the stream at the cut (before reducing), ``y`` [B, M, C] the reduced tokens at the
recovery point.
"""
from __future__ import annotations

import math

import torch


def recover_copy(src: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kept tokens (``idx`` [B, M]: their positions at the cut) go back to their positions; every
    other token keeps its value at the cut. -> [B, N, C]."""
    return src.scatter(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)


def recover_unmerge(src: torch.Tensor, dest: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every token takes the value of the token it was merged into (``dest`` [B, N], slot M =
    dropped: those keep their value at the cut). -> [B, N, C]."""
    m = y.shape[1]
    got = torch.gather(y, 1, dest.clamp(max=m - 1).unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return torch.where((dest < m).unsqueeze(-1), got, src)


def recover_attn(src: torch.Tensor, keys: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token recovering attention, training-free (after the Hourglass Tokenizer): every token at
    the cut queries the reduced tokens with its own feature there, softmax over scaled dot
    products with the reduced tokens' features at the cut (``keys`` [B, M, C]), and takes the
    weighted sum of their features at the recovery point. -> [B, N, C]."""
    att = torch.softmax(torch.bmm(src, keys.transpose(1, 2)) / math.sqrt(src.shape[-1]), dim=-1)
    return torch.bmm(att, y)
