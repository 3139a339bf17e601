"""Plain-torch reference kernels the torch backend calls (exportable with torch.export)."""
from .tokens import (gather_tokens, pool_tokens, random_scores, scores_from_probs, scores_from_qk, select_diverse,
                     select_fixed, select_random, select_topk)

__all__ = ["gather_tokens", "pool_tokens", "random_scores", "scores_from_probs", "scores_from_qk", "select_diverse",
           "select_fixed", "select_random", "select_topk"]
