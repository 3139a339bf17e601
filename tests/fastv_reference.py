"""FastV reference (see reference.py): layer K−1's attention row of the query token,
averaged over heads, top round(keep·span) span tokens, gathered before layer K. The
query token is never pruned; without a span a causal decoder keeps its first and last token."""
from __future__ import annotations

from reference import attention_choice, reference_run


def fastv_reference(model, inputs: dict, keep: float, layer: int, query, span=None, prefix=0, causal=False):
    """Returns (outputs, kept indices [B, M])."""
    return reference_run(model, inputs, layer, attention_choice(layer - 1, query, keep, span, prefix, causal))
