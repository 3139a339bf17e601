"""Plain-torch reference kernels the torch backend calls (exportable with torch.export)."""
from . import merge, recover
from .tokens import (full_probs, gather_tokens, select_zero_tprune, pool_tokens, random_scores, scores_from_probs, scores_from_qk, select_diverse,
                     select_fixed, select_random, select_topk)

__all__ = ["merge", "recover", "full_probs", "select_zero_tprune", "gather_tokens", "pool_tokens", "random_scores", "scores_from_probs", "scores_from_qk", "select_diverse",
           "select_fixed", "select_random", "select_topk"]
