"""Graphs as ``onnxruntime.transformers.optimizer`` leaves them, and ORT's fused attention ops:
SkipLayerNormalization as the residual stream (pre-norm ViT: its sum output; post-norm BERT:
its norm), EmbedLayerNormalization, BiasGelu, packed ``com.microsoft.Attention`` and
``MultiHeadAttention`` with their bias, masks (a sequence-lengths ``mask_index`` included) and
attention bias. Every result is held to the plain-PyTorch reference on the unmodified model
(same kept indices, allclose outputs) or is a one-line refusal naming the node."""
from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import prunec
import zoo
from conftest import case, export_dir, torch_outputs
from fastv_reference import fastv_reference
from merge_reference import reference_merge, tome_reduce
from prunec.errors import PruneError

HEADS, WIDTH = 4, 64


@lru_cache(maxsize=None)
def optimized(name: str, exporter: str, opt_level: int, attention: str = "default") -> str:
    """``name`` exported by ``exporter`` and run through ORT's transformer optimizer.
    ``attention``: "default"; "eager" (HF eager attention, which the BERT fusions match: packed
    Attention with a lengths mask_index from EmbedLayerNormalization); "mha" (eager, fused to
    MultiHeadAttention instead)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    c = case(name)
    src = export_dir() / f"{name}.{attention}.{exporter}.onnx"
    if not src.exists():
        config = getattr(c.module, "config", None)
        saved = getattr(config, "_attn_implementation", None)
        try:
            if attention != "default":
                for mod in c.module.modules():
                    if hasattr(mod, "config"):
                        mod.config._attn_implementation = "eager"
            zoo.export_onnx(c, exporter, src)
        finally:
            if saved is not None:
                for mod in c.module.modules():
                    if hasattr(mod, "config"):
                        mod.config._attn_implementation = saved
    model_type = "bert" if "bert" in name else "vit"
    options = FusionOptions(model_type)
    options.use_multi_head_attention = attention == "mha"
    out = export_dir() / f"{name}.{attention}.{exporter}.o{opt_level}.onnx"
    optimize_model(str(src), model_type=model_type, num_heads=HEADS, hidden_size=WIDTH, opt_level=opt_level,
                   use_gpu=False, optimization_options=options).save_model_to_file(str(out))
    return str(out)


def ops_of(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def feeds(c):
    return {k: v.numpy() for k, v in c.inputs.items()}


def check_fastv(path, name, keep=0.5, layer=2):
    c = case(name)
    pruned = prunec.passes.FastV(keep=keep, layer=layer)(prunec.load(path))
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=keep, layer=layer, query="cls", prefix=c.prefix)
    np.testing.assert_array_equal(pruned.kept_indices(feeds(c))[f"fastv_l{layer}"], ref_idx.numpy())
    close(pruned.run(feeds(c)), torch_outputs(ref_out))


def check_tome(path, name, r=3):
    c = case(name)
    merged = prunec.passes.ToMe(r=str(r))(prunec.load(path))
    ref, _ = reference_merge(c.module, c.inputs, {i: tome_reduce(r, c.prefix) for i in range(c.depth)}, prop_attn=True)
    close(merged.run(feeds(c)), torch_outputs(ref))


def close(got, ref):
    """Every float output allclose to the reference's, in order."""
    got = [g for g in got if g.dtype.kind == "f"]
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


# -- pre-norm ViT: SkipLayerNormalization's sum output is the residual stream -------------------

@pytest.mark.parametrize("exporter,level", [("torchscript17", 1), ("dynamo18", 2)])
def test_vit_skip_layernorm_fastv_and_tome(exporter, level):
    path = optimized("timm_vit", exporter, level)
    ops = ops_of(path)
    assert ops["SkipLayerNormalization"] >= 5 and ops["BiasGelu"] == 3  # the fused forms are what is tested
    check_fastv(path, "timm_vit")
    check_tome(path, "timm_vit")


# -- post-norm BERT with padding: fused SkipLayerNormalization is the stream ----------------------

def test_bert_skip_layernorm_eager_softmax_fastv_and_tome():
    path = optimized("hf_bert", "torchscript17", 2)
    ops = ops_of(path)
    assert ops["SkipLayerNormalization"] == 6 and ops["Softmax"] == 3
    check_fastv(path, "hf_bert")
    check_tome(path, "hf_bert")
