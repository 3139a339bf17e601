"""Latency measurement shared by ``prunec demo`` and ``benchmarks/``.

Times are the median of ``repeat`` runs after ``warmup`` runs, measured in one
process so pruned and unpruned see the same machine state.
"""
from __future__ import annotations

import statistics
import time


def median_ms(fn, warmup: int = 3, repeat: int = 10) -> tuple[float, float]:
    """(median, interquartile spread) of fn() wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), q[2] - q[0]


def ideal_speedup(facts, cuts: list[tuple[int, int]]) -> float:
    """Block-FLOPs ratio unpruned / pruned. ``cuts``: [(layer, tokens kept from that layer on)].
    Patch embedding and head are not counted (a few % of a ViT's FLOPs)."""
    from .passes.analysis.blocks import block_flops

    full = sum(block_flops(facts, i) for i in range(facts.depth))
    tokens = [facts.tokens(i) for i in range(facts.depth)]
    for layer, m in cuts:
        for i in range(layer, facts.depth):
            tokens[i] = min(tokens[i], m)
    pruned = sum(block_flops(facts, i, tokens[i]) for i in range(facts.depth))
    return full / pruned


def merge_ideal_speedup(facts, tokens_in: list[int], tokens_mid: list[int]) -> float:
    """Block-FLOPs ratio unpruned / merged when block i's attention runs on ``tokens_in[i]``
    tokens and its MLP on ``tokens_mid[i]`` (a merge between attention and MLP, as ToMe).
    Attention: q/k/v/out projections 4·C² and 2·N²·C per block; the MLP: the rest of the block's
    weights (read off the graph)."""
    from .passes.analysis.blocks import _per_token_weight_macs

    def flops(i, n_in, n_mid):
        c = facts.streams[i].shape[-1]
        weights = _per_token_weight_macs(facts, i)
        attn = 4 * c * c
        return 2.0 * (attn * n_in + 2 * n_in * n_in * c + (weights - attn) * n_mid)

    full = sum(flops(i, facts.tokens(i), facts.tokens(i)) for i in range(facts.depth))
    return full / sum(flops(i, a, b) for i, (a, b) in enumerate(zip(tokens_in, tokens_mid)))


def time_pair(onnx_or_torch: str, base, pruned, inputs, warmup=3, repeat=10, threads=None):
    """Median latency (ms) of the unpruned and pruned model on one backend.
    ``inputs``: a feed dict for onnx, an (args, kwargs) pair for torch."""
    import numpy as np
    import torch

    if onnx_or_torch == "onnx":
        feeds = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in inputs.items()}
        sa, sb = base.session("cpu", threads), pruned.session("cpu", threads)
        fa = lambda: sa.run(None, feeds)  # noqa: E731
        fb = lambda: sb.run(None, feeds)  # noqa: E731
    else:
        ma, mb = base.to_torch(), pruned.to_torch()
        args, kwargs = inputs  # positional and keyword inputs of the torch module

        def fa():
            with torch.inference_mode():
                ma(*args, **kwargs)

        def fb():
            with torch.inference_mode():
                mb(*args, **kwargs)
    fa(), fb()
    a = median_ms(fa, warmup, repeat)
    b = median_ms(fb, warmup, repeat)
    a2 = median_ms(fa, 1, repeat)  # second round guards against drift between the two
    return min(a, a2), b
