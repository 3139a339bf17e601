"""Compile-time constants of the methods, in plain Python (no torch, no numpy).

Seeded random ranks (RandomSelect), Zero-TPrune's initial importance and ToMe's slot order
with a prefix: computed once while compiling, so the torch kernels (:mod:`prunec.ops`) and
the ONNX backend lower from the same numbers. Imports nothing of prunec.
"""
from __future__ import annotations

import math


PADDING_CROSS = -2.0  # a padding token's similarity to a real one where VisionZip joins tokens (below any cosine)
PARK_MILLER = 48271
MERSENNE31 = 2147483647
HASH_MULTIPLIER = 2654435761


def hash_offset(seed: int) -> int:
    """The seed's offset in :func:`position_hash`."""
    return seed * 40503 + 12345


def position_hash(i: int, seed: int) -> int:
    """A seeded hash of token position ``i``: ((i + 1) · 2654435761 + seed · 40503 + 12345) mod
    (2³¹ − 1), then three Park–Miller steps (h · 48271 mod 2³¹ − 1). Distinct positions get
    distinct hashes, and a position's hash does not depend on the token count, so a graph
    computes them at run time with int64 Mul/Add/Mod for any length."""
    h = ((i + 1) * HASH_MULTIPLIER + hash_offset(seed)) % MERSENNE31
    for _ in range(3):
        h = (h * PARK_MILLER) % MERSENNE31
    return h


def random_scores(n: int, seed: int) -> list[float]:
    """A seeded pseudo-random permutation of 0..n-1: the rank of each position's
    :func:`position_hash` (exact in float32); computed at compile time, so both backends and every
    sample see the same numbers. The top-k by rank are the top-k by hash."""
    order = sorted(range(n), key=lambda i: position_hash(i, seed))
    rank = [0.0] * n
    for r, i in enumerate(order):
        rank[i] = float(r)
    return rank


def wpr_start(n: int, cls: int | None) -> list[float]:
    """Zero-TPrune's initial importance: uniform, the CLS token weighted √N; sums to 1."""
    s = [1.0] * n
    if cls is not None:
        s[cls] = math.sqrt(n)
    total = sum(s)
    return [v / total for v in s]


def tome_order(prefix: int, unmerged: int, nb: int) -> list[int] | None:
    """Slot order putting the prefix tokens first in original order (ToMe with a distillation
    token: [unm[:1], dst[:1], unm[1:], dst[1:]]); None when it is the identity."""
    pb = prefix // 2
    if pb == 0:
        return None
    firsts = [i // 2 if i % 2 == 0 else unmerged + i // 2 for i in range(prefix)]
    rest = [s for s in range(unmerged + nb) if s not in set(firsts)]
    return firsts + rest
