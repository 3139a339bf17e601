"""Compile-time constants of the methods, in plain Python (no torch, no numpy).

Seeded random ranks (RandomSelect), Zero-TPrune's initial importance and ToMe's slot order
with a prefix: computed once while compiling, so the torch kernels (:mod:`prunec.ops`) and
the ONNX backend lower from the same numbers. Imports nothing of prunec.
"""
from __future__ import annotations

import math


PARK_MILLER = 48271
MERSENNE31 = 2147483647


def random_scores(n: int, seed: int) -> list[float]:
    """A seeded pseudo-random permutation of 0..n-1 (one score per token position, from
    Park–Miller hashes); computed at compile time, so both backends and every sample see
    the same numbers, and exact in float32."""
    hashes = []
    for i in range(n):
        h = ((i + 1) * 2654435761 % MERSENNE31) ^ (seed * 40503 + 12345)
        for _ in range(3):
            h = (h * PARK_MILLER) % MERSENNE31
        hashes.append((h, i))
    rank = [0.0] * n
    for r, (_, i) in enumerate(sorted(hashes)):
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
