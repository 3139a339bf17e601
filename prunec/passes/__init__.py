"""Rewrite passes (one per file) and the analysis passes they read."""
from .base import REGISTRY, Pass, Plan
from .cls_attn import ClsAttention
from .divprune import DivPrune
from .evit import EViT
from .fastv import FastV
from .pool import Pool
from .ppt import PPT
from .random_select import RandomSelect
from .tome import ToMe
from .visionzip import VisionZip
from .zero_tprune import ZeroTPrune

__all__ = ["REGISTRY", "Pass", "Plan", "FastV", "ClsAttention", "DivPrune", "RandomSelect", "Pool", "ZeroTPrune", "ToMe", "EViT", "PPT", "VisionZip", "get"]


def get(name: str) -> type[Pass]:
    from ..errors import PruneError

    if name not in REGISTRY:
        raise PruneError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
