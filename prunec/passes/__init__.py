"""Rewrite passes (one per file) and the analysis passes they read."""
from .base import REGISTRY, Pass, Plan
from .cls_attn import ClsAttention
from .divprune import DivPrune
from .fastv import FastV
from .pool import Pool
from .random_select import RandomSelect
from .tome import ToMe
from .zero_tprune import ZeroTPrune

__all__ = ["REGISTRY", "Pass", "Plan", "FastV", "ClsAttention", "DivPrune", "RandomSelect", "Pool", "ZeroTPrune", "ToMe", "get"]


def get(name: str) -> type[Pass]:
    from ..errors import PruneError

    if name not in REGISTRY:
        raise PruneError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
