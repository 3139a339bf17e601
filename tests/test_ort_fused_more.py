"""More graph forms from ``onnxruntime.transformers.optimizer``: a speech encoder (HF Whisper's
encoder: conv front-end halving the frames, fixed sinusoidal positions, no CLS) exported by
TorchScript and dynamo, as exported and through the optimizer's "bart" fusions (what ORT uses for
Whisper encoders) at opt levels 1 and 2: SkipLayerNormalization residual stream, BiasGelu, and
(TorchScript export of eager attention) packed ``com.microsoft.Attention``; GPT-2 through the
"gpt2" fusions; opset-14 graphs, into which ORT writes LayerNormalization. FastV (Whisper: query
= mean over rows; GPT-2: the default decoder span and query) and ToMe (prefix 0) are held to the
plain-PyTorch references on the unmodified torch models: same kept indices, allclose outputs, at
two batch sizes; identity at keep=1."""
from __future__ import annotations

import warnings
from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import pytest
import torch

import prunec
from conftest import export_dir
from fastv_reference import fastv_reference
from merge_reference import reference_merge, tome_reduce

HEADS, WIDTH, DEPTH, FRAMES = 4, 64, 3, 24  # 24 mel frames -> 12 tokens after the stride-2 conv


@lru_cache(maxsize=None)
def whisper_encoder():
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, num_mel_bins=16, d_model=WIDTH, encoder_layers=DEPTH,
                        encoder_attention_heads=HEADS, decoder_layers=1, decoder_attention_heads=HEADS,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=FRAMES // 2,
                        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                        decoder_start_token_id=2)
    return WhisperModel(cfg).get_encoder().eval()


def features(batch, seed=0):
    return torch.randn(batch, 16, FRAMES, generator=torch.Generator().manual_seed(seed))


class _Hidden(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features=input_features).last_hidden_state


@lru_cache(maxsize=None)
def exported(exporter: str, attention: str) -> str:
    """The encoder ([B, 16, 24] -> last_hidden_state [B, 12, 64]) exported by ``exporter``
    ("torchscript14" | "torchscript17" | "dynamo18") with HF attention ``attention`` ("sdpa" | "eager")."""
    enc = whisper_encoder()
    saved = enc.config._attn_implementation
    path = export_dir() / f"whisper_enc.{attention}.{exporter}.onnx"
    x = features(2)
    try:
        for mod in enc.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = attention
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter.startswith("torchscript"):  # torchscript14 | torchscript17
                torch.onnx.export(_Hidden(enc), (x,), str(path), dynamo=False, opset_version=int(exporter[11:]),
                                  input_names=["input_features"], dynamic_axes={"input_features": {0: "batch"}})
            else:
                torch.onnx.export(_Hidden(enc), (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                                  input_names=["input_features"], verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    finally:
        for mod in enc.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = saved
    return str(path)


@lru_cache(maxsize=None)
def optimized(exporter: str, attention: str, level: int) -> str:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    out = export_dir() / f"whisper_enc.{attention}.{exporter}.o{level}.onnx"
    optimize_model(exported(exporter, attention), model_type="bart", num_heads=HEADS, hidden_size=WIDTH,
                   opt_level=level, use_gpu=False,
                   optimization_options=FusionOptions("bart")).save_model_to_file(str(out))
    return str(out)


def ops_of(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def check_fastv_tome(path):
    enc = whisper_encoder()
    model = prunec.load(path)
    assert not model.facts().causal
    for batch, seed in ((2, 0), (3, 5)):
        x = features(batch, seed)
        feeds = {"input_features": x.numpy()}
        pruned = prunec.passes.FastV(keep=0.5, layer=2, query="mean")(model)
        ref, ref_idx = fastv_reference(enc, {"input_features": x}, keep=0.5, layer=2, query="mean")
        np.testing.assert_array_equal(pruned.kept_indices(feeds)["fastv_l2"], ref_idx.numpy())
        np.testing.assert_allclose(pruned.run(feeds)[0], ref.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    x = features(2)
    feeds = {"input_features": x.numpy()}
    same = prunec.passes.FastV(keep=1.0, layer=2, query="mean")(model)  # identity at keep=1
    np.testing.assert_allclose(same.run(feeds)[0], model.run(feeds)[0], rtol=1e-5, atol=1e-6)
    merged = prunec.passes.ToMe(r="2")(model)
    ref, _ = reference_merge(enc, {"input_features": x}, {i: tome_reduce(2, 0) for i in range(DEPTH)}, prop_attn=True)
    out = merged.run(feeds)[0]
    assert out.shape == (2, 12 - 2 * DEPTH, WIDTH)
    np.testing.assert_allclose(out, ref.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
def test_whisper_encoder_export(exporter):
    """The un-optimized export: the conv front-end and the sinusoidal positions sit before the cut."""
    check_fastv_tome(exported(exporter, "sdpa"))


@pytest.mark.parametrize("exporter,attention,level,fused", [
    ("torchscript17", "eager", 1, "Attention"), ("torchscript17", "eager", 2, "Attention"),
    ("dynamo18", "sdpa", 2, "Softmax"), ("torchscript14", "eager", 1, "Attention")],
    ids=["ts17-packed-o1", "ts17-packed-o2", "dynamo18-o2", "ts14-packed-o1"])
def test_whisper_encoder_ort_optimized(exporter, attention, level, fused):
    path = optimized(exporter, attention, level)
    ops = ops_of(path)
    assert ops["SkipLayerNormalization"] == 2 * DEPTH and ops["BiasGelu"] == DEPTH and ops[fused] == DEPTH, ops
    check_fastv_tome(path)


# -- GPT-2 through the optimizer's "gpt2" fusions -------------------------------------------------
# Exported with an attention_mask input: without one, transformers 5 builds a packed-sequence mask
# with aten::diff, which the TorchScript exporter cannot convert. ORT's gpt2 optimizer (1.31) fuses
# SkipLayerNormalization and FastGelu but no attention (HF 5's mask form is not its pattern); on the
# dynamo export it crashes (onnx_model_gpt2.py postprocess: IndexError on a Gemm without bias).

GPT2_N = 16


@lru_cache(maxsize=None)
def gpt2(attention: str):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS,
                     attn_implementation=attention)
    return GPT2Model(cfg).eval()


def gpt2_inputs(batch, seed=0):
    ids = torch.randint(0, 100, (batch, GPT2_N), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Gpt2Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class _Stop(Exception):
    pass


class _Gpt2Reference(torch.nn.Module):
    """The unmodified GPT2Model, its output read at ``ln_f`` (GPT2Model then views the hidden
    states back to the input's [B, N, C], which a cut inside the model cannot pass)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.h, self.config = model, model.h, model.config

    def forward(self, **inputs):
        out = {}

        def hook(module, args, output):
            out["y"] = output
            raise _Stop

        handle = self.model.ln_f.register_forward_hook(hook)
        try:
            self.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return out["y"]


@lru_cache(maxsize=None)
def gpt2_file(attention: str, opset: int, level: int = 0) -> str:
    """GPT-2 ([B, 16] ids and mask -> last_hidden_state [B, 16, 64]) by TorchScript at ``opset``,
    then (``level`` > 0) through ``optimize_model(model_type="gpt2")``."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    src = export_dir() / f"gpt2.{attention}.ts{opset}.onnx"
    if not src.exists():
        inputs = gpt2_inputs(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Gpt2Hidden(gpt2(attention)), tuple(inputs.values()), str(src), dynamo=False,
                              opset_version=opset, input_names=list(inputs),
                              dynamic_axes={k: {0: "batch"} for k in inputs})
    if not level:
        return str(src)
    out = export_dir() / f"gpt2.{attention}.ts{opset}.o{level}.onnx"
    optimize_model(str(src), model_type="gpt2", num_heads=HEADS, hidden_size=WIDTH, opt_level=level, use_gpu=False,
                   optimization_options=FusionOptions("gpt2")).save_model_to_file(str(out))
    return str(out)


def check_gpt2_fastv(path, attention, keep=0.5):
    """FastV with the default span (a decoder keeps its first and last token; query: the last) at
    batch 2 and 3 against the reference on the unmodified model; identity at keep=1."""
    reference = _Gpt2Reference(gpt2(attention))
    model = prunec.load(path)
    assert model.facts().causal
    pruned = prunec.passes.FastV(keep=keep, layer=2)(model)
    for batch, seed in ((2, 0), (3, 4)):
        inputs = gpt2_inputs(batch, seed)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        ref, ref_idx = fastv_reference(reference, inputs, keep=keep, layer=2, query="last", causal=True)
        got_idx = pruned.kept_indices(feeds)["fastv_l2"]
        np.testing.assert_array_equal(got_idx, ref_idx.numpy())
        assert (got_idx[:, 0] == 0).all() and (got_idx[:, -1] == GPT2_N - 1).all()
        np.testing.assert_allclose(pruned.run(feeds)[0], ref.numpy(), rtol=1e-4, atol=1e-4)
    feeds = {k: v.numpy() for k, v in gpt2_inputs(2).items()}
    same = prunec.passes.FastV(keep=1.0, layer=2)(model)
    np.testing.assert_allclose(same.run(feeds)[0], model.run(feeds)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,level", [("eager", 1), ("eager", 2), ("sdpa", 2)])
def test_gpt2_ort_optimized_fastv(attention, level):
    path = gpt2_file(attention, 17, level)
    ops = ops_of(path)
    assert ops["SkipLayerNormalization"] == 2 * DEPTH and ops["FastGelu"] == DEPTH, ops
    check_gpt2_fastv(path, attention)
    check_gpt2_fastv(path, attention, keep=6 / 14)  # 8 kept: 2·8·C values also fit the uncut [-1, 16, C]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gpt2_unoptimized_works_or_refuses(attention):
    """The un-optimized TorchScript export (its [B, 1, N, N] mask is built by index arithmetic prunec
    does not follow to the batch axis): a one-line refusal, else the reference."""
    path = gpt2_file(attention, 17)
    try:
        check_gpt2_fastv(path, attention)
    except prunec.PruneError as e:
        assert "\n" not in str(e)


# -- opset 14: ORT's LayerNormalization and a pre-norm SkipLayerNormalization in standard ops -------
# ORT's optimizer writes LayerNormalization into opset-14 graphs (ORT runs it, onnx.checker rejects
# it: every rewrite was refused); prunec writes it in standard ops at load. A pre-norm
# SkipLayerNormalization was left fused below opset 17, and a cut at its sum output left the next
# attention reading the norm of the *uncut* stream (FastV silently wrong, hidden only by the checker).

def test_opset14_layernorm_and_prenorm_skip_layernorm():
    from test_ort_fused import check_fastv, check_tome
    from test_ort_fused import optimized as optimized_vit

    path = gpt2_file("eager", 14, 1)
    ops = ops_of(path)
    assert onnx.load(path).opset_import[0].version == 14
    assert ops["SkipLayerNormalization"] == 2 * DEPTH and ops["LayerNormalization"] == 1
    check_gpt2_fastv(path, "eager")
    path = optimized_vit("timm_vit", "torchscript14", 1)
    ops = ops_of(path)
    assert ops["SkipLayerNormalization"] == 2 * DEPTH and ops["LayerNormalization"] == 1
    check_fastv(path, "timm_vit")
    check_tome(path, "timm_vit")
