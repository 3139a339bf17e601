"""Plain-torch reference kernels the torch backend calls (exportable with torch.export)."""
from .tokens import gather_tokens, scores_from_probs, scores_from_qk, select_topk

__all__ = ["gather_tokens", "scores_from_probs", "scores_from_qk", "select_topk"]
