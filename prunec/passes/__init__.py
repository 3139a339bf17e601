"""Rewrite passes (one per file) and the analysis passes they read."""
from .base import REGISTRY, Pass, Plan
from .fastv import FastV

__all__ = ["REGISTRY", "Pass", "Plan", "FastV", "get"]


def get(name: str) -> type[Pass]:
    from ..errors import PruneError

    if name not in REGISTRY:
        raise PruneError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
