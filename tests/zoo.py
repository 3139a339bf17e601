"""Tiny models for the tests (random weights, 2-4 layers, width <= 128) and exporters."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

IMG = 32


@dataclass
class Case:
    name: str
    module: torch.nn.Module
    inputs: dict  # keyword inputs of the module (torch tensors), batch 2
    prefix: int
    depth: int
    causal: bool = False
    span: str | None = None
    make_inputs: object = None  # batch -> inputs dict with different content

    def args(self):
        return self.inputs


def _images(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=g)


def timm_vit():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=3,
                          embed_dim=64, num_heads=4, num_classes=10).eval()
    return Case("timm_vit", m, {"x": _images(2)}, prefix=1, depth=3,
                make_inputs=lambda b, s=1: {"x": _images(b, s)})


def timm_deit_distilled():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=3,
                          embed_dim=64, num_heads=4, num_classes=10).eval()
    return Case("timm_deit_distilled", m, {"x": _images(2)}, prefix=2, depth=3,
                make_inputs=lambda b, s=1: {"x": _images(b, s)})


def hf_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=IMG, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=128)
    m = ViTModel(cfg).eval()
    return Case("hf_vit", m, {"pixel_values": _images(2)}, prefix=1, depth=3,
                make_inputs=lambda b, s=1: {"pixel_values": _images(b, s)})


def hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=IMG, patch_size=8, hidden_size=64, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=128)
    m = CLIPVisionModel(cfg).eval()
    return Case("hf_clip_vision", m, {"pixel_values": _images(2)}, prefix=1, depth=3,
                make_inputs=lambda b, s=1: {"pixel_values": _images(b, s)})


def hf_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=IMG, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       mlp_ratio=2)
    m = Dinov2Model(cfg).eval()
    return Case("hf_dinov2", m, {"pixel_values": _images(2)}, prefix=1, depth=3,
                make_inputs=lambda b, s=1: {"pixel_values": _images(b, s)})


def _bert_inputs(batch, seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, n), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(batch, n, dtype=torch.long)
    for b in range(batch):
        pad = int(torch.randint(0, n // 3, (1,), generator=g))
        if pad:
            mask[b, n - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    m = BertModel(cfg).eval()
    return Case("hf_bert", m, _bert_inputs(2), prefix=1, depth=3, make_inputs=lambda b, s=1: _bert_inputs(b, s))


def _llama_inputs(batch, seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (batch, n), generator=g)}


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    m = LlamaForCausalLM(cfg).eval()
    return Case("hf_llama", m, _llama_inputs(2), prefix=0, depth=3, causal=True, span="4:20",
                make_inputs=lambda b, s=1: _llama_inputs(b, s))


def hf_llama_eager():
    """HF Llama with eager attention: in fx, ``to(dtype)``, ``dropout`` and
    ``_assert_tensor_metadata`` sit between the softmax and the ``@ v`` matmul."""
    c = hf_llama()
    c.module.config._attn_implementation = "eager"
    for mod in c.module.modules():
        if hasattr(mod, "config"):
            mod.config._attn_implementation = "eager"
    c.name = "hf_llama_eager"
    return c


def _timm_variant(name, prefix, **kw):
    def make():
        import timm

        torch.manual_seed(0)
        m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=3,
                              embed_dim=64, num_heads=4, **kw).eval()
        return Case(name, m, {"x": _images(2)}, prefix=prefix, depth=3, make_inputs=lambda b, s=1: {"x": _images(b, s)})
    make.__name__ = name
    return make


def hf_bert_no_pooler():
    """BERT whose only output is last_hidden_state (the token tensor)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    return Case("hf_bert_no_pooler", m, _bert_inputs(2), prefix=1, depth=3, make_inputs=lambda b, s=1: _bert_inputs(b, s))


# Graph forms beyond CASES (not in the FastV matrix): timm's avg pooling over x[:, prefix:] (with CLS,
# with CLS + 2 registers), a timm feature extractor whose output is the token tensor, BERT without pooler.
MORE = {f.__name__: f for f in (
    _timm_variant("timm_vit_avg", 1, num_classes=10, global_pool="avg"),
    _timm_variant("timm_vit_avg_reg", 3, num_classes=10, global_pool="avg", reg_tokens=2),
    _timm_variant("timm_vit_features", 1, num_classes=0, global_pool=""),
    hf_bert_no_pooler)}

CASES = {f.__name__: f for f in (timm_vit, timm_deit_distilled, hf_vit, hf_clip_vision, hf_dinov2, hf_bert, hf_llama)}
EXTRA_CASES = {f.__name__: f for f in (hf_llama_eager,)}  # for focused tests only
EXPORTERS = ("dynamo18", "torchscript17", "dynamo23")  # export_onnx also takes torchscript14..16


class _Wrapper(torch.nn.Module):
    """Positional-argument wrapper returning a tuple of tensors (for the ONNX exporters)."""

    def __init__(self, module, names):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *args):
        out = self.module(**dict(zip(self.names, args)))
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "to_tuple"):
            return tuple(o for o in out.to_tuple() if isinstance(o, torch.Tensor))
        return tuple(out)


def export_onnx(case: Case, exporter: str, path: Path) -> Path:
    names = list(case.inputs)
    args = tuple(case.inputs[n] for n in names)
    wrapper = _Wrapper(case.module, names).eval()
    config = getattr(case.module, "config", None)
    saved_attn = getattr(config, "_attn_implementation", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter.startswith("torchscript") and case.name == "hf_llama":
                # The TorchScript exporter cannot convert sdpa with enable_gqa: export the eager spelling.
                config._attn_implementation = "eager"
            if exporter.startswith("torchscript"):  # torchscript14 .. torchscript17
                torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=int(exporter[11:]),
                                  input_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in names})
            else:
                opset = 18 if exporter == "dynamo18" else 23
                batch = torch.export.Dim("batch", min=1, max=64)
                torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=opset, external_data=False,
                                  input_names=names,
                                  dynamic_shapes=(tuple({0: batch} for _ in names),), verbose=False)
    finally:
        if config is not None and saved_attn is not None:
            config._attn_implementation = saved_attn
    return path
