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
from conftest import case, export_dir, onnx_block_tail, torch_outputs
from fastv_reference import fastv_reference
from merge_reference import reference_merge, tome_reduce
from prunec.errors import PruneError

HEADS, WIDTH = 4, 64


@lru_cache(maxsize=None)
def optimized(name: str, exporter: str, opt_level: int, attention: str = "default") -> str:
    """``name`` exported by ``exporter`` and run through ORT's transformer optimizer.
    ``attention``: "default"; "eager" (HF eager attention, which the BERT fusions match: packed
    Attention with a lengths mask_index from EmbedLayerNormalization); "raw" (eager, the 0/1
    mask [B, N] as mask_index); "mha" (eager, fused to MultiHeadAttention instead)."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    c = case(name)
    src = export_dir() / f"{name}.{'default' if attention == 'default' else 'eager'}.{exporter}.onnx"
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
    model_type = "bert" if "bert" in name else "gpt2" if "llama" in name else "vit"
    options = FusionOptions(model_type)
    options.use_multi_head_attention = attention == "mha"
    if attention == "raw":
        options.attention_mask_format = AttentionMaskFormat.AttentionMask
    out = export_dir() / f"{name}.{attention}.{exporter}.o{opt_level}.onnx"
    optimize_model(str(src), model_type=model_type, num_heads=HEADS, hidden_size=WIDTH, opt_level=opt_level,
                   use_gpu=False, optimization_options=options).save_model_to_file(str(out))
    return str(out)


def ops_of(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def feeds(c):
    return {k: v.numpy() for k, v in c.inputs.items()}


def check_fastv(path, name, keep=0.5, layer=2, batches=(None,)):
    """FastV on the optimized graph against the reference on the unmodified model, at the probe's
    inputs (None) and at other batch sizes (``batches``: other inputs of that many samples)."""
    c = case(name)
    pruned = prunec.passes.FastV(keep=keep, layer=layer)(prunec.load(path))
    for batch in batches:
        inputs = c.inputs if batch is None else c.make_inputs(batch, 7)
        data = {k: v.numpy() for k, v in inputs.items()}
        ref_out, ref_idx = fastv_reference(c.module, inputs, keep=keep, layer=layer, query="cls", prefix=c.prefix)
        np.testing.assert_array_equal(pruned.kept_indices(data)[f"fastv_l{layer}"], ref_idx.numpy())
        close(pruned.run(data), torch_outputs(ref_out))


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


# -- pre-norm RMS decoder: SkipSimplifiedLayerNormalization (and ORT's SimplifiedLayerNormalization) --

def test_llama_skip_simplified_layernorm_fastv():
    c = case("hf_llama")
    path = optimized("hf_llama", "dynamo18", 1)
    ops = ops_of(path)
    assert ops["SkipSimplifiedLayerNormalization"] == 6 and ops["SimplifiedLayerNormalization"] >= 1
    model = prunec.load(path)
    assert model.facts().causal
    pruned = prunec.passes.FastV(keep=0.5, layer=2, span=c.span)(model)
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=0.5, layer=2, query="last", span=(4, 20))
    np.testing.assert_array_equal(pruned.kept_indices(feeds(c))["fastv_l2"], ref_idx.numpy())
    close(pruned.run(feeds(c)), torch_outputs(ref_out))


# -- MultiHeadAttention: bias, key padding mask, attention bias, unidirectional (silent wrong 1) --

N, C = 12, 32


def _mha_graph(weights, mask_kind: str, rel: bool, causal: bool, packed: bool = False) -> onnx.ModelProto:
    """x [B, N, C], mask [B, N] (right padding) -> 3 pre-norm blocks with MultiHeadAttention reading
    q/k/v without bias, the bias [3C], the key padding mask (``mask_kind``: "2d" as given, "lengths"
    [B], or "none") and (``rel``) an attention bias [1, H, N, N] -> y [B, N, C]. With ``packed``,
    the packed com.microsoft.Attention instead (weight [C, 3C] = Wq | Wk | Wv, same bias)."""
    nodes = [helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32)]
    if mask_kind == "lengths":
        nodes.append(helper.make_node("ReduceSum", ["mask32", "one_axis"], ["key_mask"], keepdims=0))
    else:
        nodes.append(helper.make_node("Identity", ["mask32"], ["key_mask"]))
    inits = [helper.make_tensor("one_axis", TensorProto.INT64, [1], [1])]
    x = "x"
    for i, w in enumerate(weights):
        w = dict(w, Wqkv=np.concatenate([w["Wq"], w["Wk"], w["Wv"]], axis=1)) if packed else w
        for k, arr in w.items():
            unused = (k == "rel" and not rel) or (k in ("Wq", "Wk", "Wv") if packed else k == "Wqkv")
            if not unused:  # ORT refuses unused initializers handed to it in memory
                inits.append(helper.make_tensor(f"{k}{i}", TensorProto.FLOAT, list(arr.shape), arr.reshape(-1)))
        nodes.append(helper.make_node("LayerNormalization", [x, f"ln{i}", f"lnb{i}"], [f"n{i}"], axis=-1))
        masks = ["key_mask" if mask_kind != "none" else "", f"rel{i}" if rel else ""]
        if packed:
            nodes.append(helper.make_node("Attention", [f"n{i}", f"Wqkv{i}", f"bias{i}", masks[0], ""] + masks[1:],
                                          [f"a{i}"], domain="com.microsoft", num_heads=HEADS,
                                          unidirectional=int(causal)))
        else:
            for k in "qkv":
                nodes.append(helper.make_node("MatMul", [f"n{i}", f"W{k}{i}"], [f"{k}{i}"]))
            nodes.append(helper.make_node("MultiHeadAttention", [f"q{i}", f"k{i}", f"v{i}", f"bias{i}"] + masks,
                                          [f"a{i}"], domain="com.microsoft", num_heads=HEADS,
                                          unidirectional=int(causal)))
        x = onnx_block_tail(nodes, x, i)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C]),
                                             helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N, C])], inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _mha_weights(seed=0, depth=3):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(depth):
        w = {f"W{k}": (g.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32) for k in "qkvom"}
        w["bias"] = g.standard_normal(3 * C).astype(np.float32)  # large: ignoring it changes the choice
        w["rel"] = (2.0 * g.standard_normal((1, HEADS, N, N))).astype(np.float32)
        w["ln"], w["lnb"] = np.ones(C, np.float32), np.zeros(C, np.float32)
        out.append(w)
    return out


def _mha_reference(weights, x, mask, rel, keep, layer, causal, end=N):
    """The same network in torch with FastV before ``layer`` (query: the last token when causal,
    else the mean over rows): the bias, padding mask (-10000), attention bias and causal mask
    are part of the scores; the mask and the attention bias are gathered with the tokens. Tokens
    from ``end`` on are always kept."""
    x, valid = torch.from_numpy(x), torch.from_numpy(mask).bool()
    idx = scores = None
    h, d = HEADS, C // HEADS
    pos = torch.arange(N)
    for i, w in enumerate(weights):
        w = {k: torch.from_numpy(v) for k, v in w.items()}
        if i == layer:
            top = scores[:, :end].topk(int(round(keep * end)), dim=1).indices
            idx = torch.cat([top, torch.arange(end, N).expand(x.shape[0], -1)], dim=1).sort(dim=1).values
            x = torch.gather(x, 1, idx[:, :, None].expand(-1, idx.shape[1], C))
            valid = torch.gather(valid, 1, idx)
        keep_pos = pos.expand(x.shape[0], -1) if idx is None else idx
        bias = w["rel"].expand(x.shape[0], -1, -1, -1) * float(rel)
        bias = torch.gather(bias, 2, keep_pos[:, None, :, None].expand(-1, h, -1, N))
        bias = torch.gather(bias, 3, keep_pos[:, None, None, :].expand(-1, h, keep_pos.shape[1], -1))
        b, n = x.shape[:2]
        ln = torch.nn.functional.layer_norm(x, (C,), eps=1e-5)
        q, k, v = ((ln @ w[f"W{t}"] + w["bias"][j * C:(j + 1) * C]).reshape(b, n, h, d).transpose(1, 2)
                   for j, t in enumerate("qkv"))
        logits = q @ k.transpose(-1, -2) / np.sqrt(d) + bias
        logits = logits + torch.where(valid, 0.0, -10000.0)[:, None, None, :]
        if causal:
            logits = logits + torch.where(keep_pos[:, None, :] > keep_pos[:, :, None], -torch.inf, 0.0)[:, None]
        p = torch.softmax(logits, dim=-1)
        if i == layer - 1:
            scores = (p[:, :, -1, :] if causal else p.mean(dim=2)).mean(dim=1)
        a = (p @ v).transpose(1, 2).reshape(b, n, C)
        r = x + a @ w["Wo"]
        x = r + torch.relu(r @ w["Wm"])
    return x.numpy(), idx.numpy()


@pytest.mark.parametrize("packed,mask_kind,rel,causal", [
    (False, "none", False, False), (False, "2d", True, False), (False, "lengths", True, False),
    (False, "2d", False, True), (True, "2d", True, False), (True, "lengths", False, True)],
    ids=["bias", "mask2d-attnbias", "lengths-attnbias", "unidirectional", "packed-mask2d-attnbias",
         "packed-lengths-unidirectional"])
def test_multihead_attention_bias_masks_are_scored(tmp_path, packed, mask_kind, rel, causal):
    """Silent wrong 1: the scores read MultiHeadAttention's bias, key padding mask (a lengths mask
    too, rewritten at the cut), attention bias and unidirectional flag; before, the bias and masks
    were ignored and FastV kept other tokens than the model's own attention ranks highest. The
    packed Attention reads the same inputs through its QKV projection."""
    weights = _mha_weights()
    path = tmp_path / "mha.onnx"
    onnx.save(_mha_graph(weights, mask_kind, rel, causal, packed), str(path))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, N, C)).astype(np.float32)
    mask = np.ones((3, N), np.int64)
    if mask_kind != "none":
        mask[0, 9:] = 0
        mask[2, 7:] = 0
    model = prunec.load(path)
    assert model.facts().causal == causal
    span = None if not causal else f"0:{N - 1}"  # a decoder keeps its query token
    pruned = prunec.passes.FastV(keep=0.5, layer=2, span=span)(model)
    ref, ref_idx = _mha_reference(weights, x, mask, rel, 0.5, 2, causal, end=N - 1 if causal else N)
    feeds_ = {"x": x, "mask": mask}
    np.testing.assert_array_equal(pruned.kept_indices(feeds_)["fastv_l2"], ref_idx)
    np.testing.assert_allclose(pruned.run(feeds_)[0], ref, rtol=1e-4, atol=1e-4)
    same = prunec.passes.FastV(keep=1.0, layer=2)(model)  # identity at keep=1
    np.testing.assert_allclose(same.run(feeds_)[0], model.run(feeds_)[0], rtol=1e-5, atol=1e-6)


# -- BERT through the optimizer's attention fusions (HF eager attention) ----------------------------

@pytest.mark.parametrize("attention,level", [("eager", 1), ("eager", 2), ("mha", 1), ("raw", 1)],
                         ids=["attention-o1", "attention-o2", "multiheadattention-o1", "attention-mask2d-o1"])
def test_bert_fused_attention_with_lengths_mask(attention, level):
    """EmbedLayerNormalization turns the padding mask into lengths [B] (mask_index) that every
    packed Attention / MultiHeadAttention reads (silent wrong 4: after a cut they still counted
    the uncut positions). Scores come from the packed QKV projection with its bias and the
    lengths mask; ToMe's proportional attention goes through the ops' attention_bias input."""
    path = optimized("hf_bert", "torchscript17", level, attention)
    ops = ops_of(path)
    fused = "MultiHeadAttention" if attention == "mha" else "Attention"
    assert ops[fused] == 3 and ops["EmbedLayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 6
    mask_index = [n.input[3 if fused == "Attention" else 4] for n in onnx.load(path).graph.node if n.op_type == fused]
    assert all(("mask_index" in m) == (attention != "raw") for m in mask_index)  # the lengths form, or 0/1
    check_fastv(path, "hf_bert", batches=(None, 3))
    check_tome(path, "hf_bert")


def test_bert_lengths_mask_random_selection():
    """Silent wrong 4 for passes that score nothing: a random cut also rewrites the lengths."""
    from reference import random_choice, reference_run

    c = case("hf_bert")
    path = optimized("hf_bert", "torchscript17", 1, "eager")
    pruned = prunec.passes.get("random")(keep="0.5", layer="2")(prunec.load(path))
    ref_out, ref_idx = reference_run(c.module, c.inputs, 2, random_choice(0.5, 0, None, c.prefix))
    np.testing.assert_array_equal(pruned.kept_indices(feeds(c))["random_l2"], ref_idx.numpy())
    close(pruned.run(feeds(c)), torch_outputs(ref_out))


def _ppt_threshold(c):
    """Between the two samples' importance variances at PPT's first layer: one prunes, one pools."""
    from merge_reference import ppt_variance

    seen = []
    reference_merge(c.module, c.inputs, {0: lambda x, k, v, probs, state: seen.append(
        ppt_variance(probs, v, c.prefix)[1]) or x})
    lo, hi = sorted(float(x) for x in seen[0])
    return (lo + hi) / 2


def _every_pass(c):
    from merge_reference import evit_reduce, ppt_reduce, visionzip_choice
    from reference import attention_choice, divprune_choice, reference_run, zero_tprune_choice

    p, thr = c.prefix, _ppt_threshold(c)
    return {
        "cls-attn": (dict(keep=0.25, layer="2"), lambda: reference_run(c.module, c.inputs, 2, attention_choice(
            1, "cls", 0.25, None, p))),
        "divprune": (dict(keep=0.25, layer="2"), lambda: reference_run(c.module, c.inputs, 2, divprune_choice(
            0.25, None, p))),
        "zero-tprune": (dict(keep=0.25, layer="2", iters=5, similar=0.5), lambda: reference_run(
            c.module, c.inputs, 2, zero_tprune_choice(1, 0.25, 5, 0.5, 0, None, p))),
        "evit": (dict(keep="0.5", layers="1/2"), lambda: reference_merge(
            c.module, c.inputs, {1: evit_reduce(0.5, p), 2: evit_reduce(0.5, p)})),
        "ppt": (dict(r=3, layers="0/2", threshold=thr), lambda: reference_merge(
            c.module, c.inputs, {0: ppt_reduce(3, thr, p), 2: ppt_reduce(3, thr, p)}, prop_attn=True)),
        "visionzip": (dict(dominant=6, contextual=4, layer="2"), lambda: reference_run(
            c.module, c.inputs, 2, visionzip_choice(1, 6, 4, HEADS, p))),
    }


@pytest.mark.parametrize("pname", ["cls-attn", "divprune", "zero-tprune", "evit", "ppt", "visionzip"])
def test_bert_packed_attention_every_pass(pname):
    """The other selections and merges on the packed-Attention BERT (lengths mask, post-norm
    SkipLayerNormalization): outputs allclose to their references on the unmodified model."""
    c = case("hf_bert")
    opts, reference = _every_pass(c)[pname]
    got = prunec.passes.get(pname)(**opts)(prunec.load(optimized("hf_bert", "torchscript17", 2, "eager")))
    close(got.run(feeds(c)), torch_outputs(reference()[0]))


# -- a GroupQueryAttention decoder with RotaryEmbedding: positions follow the kept tokens ---------

KV = 2  # kv heads


def _gqa_graph(weights, window=-1, offset_positions=False) -> onnx.ModelProto:
    """ids-free decoder: x [B, N, C], position_ids [B, N] -> 3 pre-norm blocks: RotaryEmbedding on q
    and k (positions from the input, or with ``offset_positions`` a constant offset [1]),
    GroupQueryAttention (HEADS q heads, KV kv heads, seqlens_k from a ReduceSum of the mask input)
    -> y [B, N, C]."""
    d = C // HEADS
    half = np.arange(64)[:, None] / (10000.0 ** (np.arange(d // 2)[None, :] / (d // 2)))
    inits = [helper.make_tensor("cos", TensorProto.FLOAT, half.shape, np.cos(half).reshape(-1)),
             helper.make_tensor("sin", TensorProto.FLOAT, half.shape, np.sin(half).reshape(-1)),
             helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
             helper.make_tensor("total", TensorProto.INT32, [], [N])]
    if offset_positions:
        inits.append(helper.make_tensor("pos", TensorProto.INT64, [1], [0]))
    nodes = [helper.make_node("ReduceSum", ["mask", "ax1"], ["count"], keepdims=0),
             helper.make_node("Sub", ["count", "one"], ["last"]),
             helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32)]
    x = "x"
    for i, w in enumerate(weights):
        for k, arr in w.items():
            inits.append(helper.make_tensor(f"{k}{i}", TensorProto.FLOAT, list(arr.shape), arr.reshape(-1)))
        nodes.append(helper.make_node("LayerNormalization", [x, f"ln{i}", f"lnb{i}"], [f"n{i}"], axis=-1))
        for k in "qkv":
            nodes.append(helper.make_node("MatMul", [f"n{i}", f"W{k}{i}"], [f"{k}{i}"]))
        for k, heads in (("q", HEADS), ("k", KV)):
            nodes.append(helper.make_node("RotaryEmbedding", [f"{k}{i}", "pos", "cos", "sin"], [f"{k}r{i}"],
                                          domain="com.microsoft", num_heads=heads))
        nodes.append(helper.make_node("GroupQueryAttention", [f"qr{i}", f"kr{i}", f"v{i}", "", "", "seqlens_k",
                                                              "total"], [f"a{i}"], domain="com.microsoft",
                                      num_heads=HEADS, kv_num_heads=KV, local_window_size=window))
        x = onnx_block_tail(nodes, x, i)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", N])]
    if not offset_positions:
        inputs.insert(1, helper.make_tensor_value_info("pos", TensorProto.INT64, ["batch", N]))
    graph = helper.make_graph(nodes, "gqa", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                      ["batch", N, C])], inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _gqa_weights(seed=0):
    g = np.random.default_rng(seed)
    d = C // HEADS
    out = []
    for _ in range(3):
        w = {f"W{k}": (g.standard_normal((C, C if k in "qom" else KV * d)) / np.sqrt(C)).astype(np.float32)
             for k in "qkvom"}
        w["ln"], w["lnb"] = np.ones(C, np.float32), np.zeros(C, np.float32)
        out.append(w)
    return out


def _gqa_reference(weights, x, pos, keep, layer, end):
    """The decoder in torch with FastV before ``layer`` (query: the last token; tokens from ``end``
    on kept): rotary at each kept token's own position, causal over the kept tokens."""
    x, pos = torch.from_numpy(x), torch.from_numpy(pos)
    d, rep = C // HEADS, HEADS // KV
    half = torch.arange(64)[:, None] / (10000.0 ** (torch.arange(d // 2)[None, :] / (d // 2)))
    idx = scores = None

    def rotary(t, heads, p):  # [B, n, heads·d] -> [B, heads, n, d]
        t = t.reshape(t.shape[0], t.shape[1], heads, d)
        cos, sin = torch.cos(half)[p][:, :, None].float(), torch.sin(half)[p][:, :, None].float()
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).transpose(1, 2)
    for i, w in enumerate(weights):
        w = {k: torch.from_numpy(v) for k, v in w.items()}
        if i == layer:
            top = scores[:, :end].topk(int(round(keep * end)), dim=1).indices
            idx = torch.cat([top, torch.arange(end, N).expand(x.shape[0], -1)], dim=1).sort(dim=1).values
            x = torch.gather(x, 1, idx[:, :, None].expand(-1, idx.shape[1], C))
            pos = torch.gather(pos, 1, idx)
        b, n = x.shape[:2]
        ln = torch.nn.functional.layer_norm(x, (C,), eps=1e-5)
        q, k = rotary(ln @ w["Wq"], HEADS, pos), rotary(ln @ w["Wk"], KV, pos)
        v = (ln @ w["Wv"]).reshape(b, n, KV, d).transpose(1, 2)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = q @ k.transpose(-1, -2) / np.sqrt(d)
        logits = logits + torch.triu(torch.full((n, n), -torch.inf), 1)
        p = torch.softmax(logits, dim=-1)
        if i == layer - 1:
            scores = p[:, :, -1, :].mean(dim=1)
        r = x + (p @ v).transpose(1, 2).reshape(b, n, C) @ w["Wo"]
        x = r + torch.relu(r @ w["Wm"])
    return x.numpy(), idx.numpy()


def test_group_query_attention_with_rotary_fastv(tmp_path):
    weights = _gqa_weights()
    path = tmp_path / "gqa.onnx"
    onnx.save(_gqa_graph(weights), str(path))
    x = np.random.default_rng(2).standard_normal((2, N, C)).astype(np.float32)
    pos = np.broadcast_to(np.arange(N), (2, N)).copy()
    data = {"x": x, "pos": pos, "mask": np.ones((2, N), np.int64)}
    model = prunec.load(path)
    assert model.facts().causal and all(s.kind == "fused" for s in model.facts().sites)
    pruned = prunec.passes.FastV(keep=0.5, layer=2, span=f"0:{N - 1}")(model)
    ref, ref_idx = _gqa_reference(weights, x, pos, 0.5, 2, N - 1)
    np.testing.assert_array_equal(pruned.kept_indices(data)["fastv_l2"], ref_idx)
    np.testing.assert_allclose(pruned.run(data)[0], ref, rtol=1e-4, atol=1e-4)
    path2 = tmp_path / "gqa_window.onnx"  # a sliding window counts positions inside the op: refused
    onnx.save(_gqa_graph(weights, window=4), str(path2))
    with pytest.raises(PruneError, match="GroupQueryAttention.*local_window_size"):
        prunec.passes.FastV(keep=0.5, layer=2)(prunec.load(path2))
    path3 = tmp_path / "gqa_offset.onnx"  # rotary positions as an offset [1]: kept tokens would be renumbered
    onnx.save(_gqa_graph(weights, offset_positions=True), str(path3))
    with pytest.raises(PruneError, match="rotary node 'RotaryEmbedding.*positions") as e:
        prunec.passes.FastV(keep=0.5, layer=2)(prunec.load(path3))
    assert "\n" not in str(e.value)


# -- refusals: one line naming the node ------------------------------------------------------------

def _small_graph(extra_nodes, extra_inputs, attn_inputs, inits=()) -> onnx.ModelProto:
    """x [B, N, C] -> q/k/v projections -> extra nodes -> MultiHeadAttention(attn_inputs) -> x + a."""
    g = np.random.default_rng(0)
    inits = list(inits) + [helper.make_tensor(f"W{k}", TensorProto.FLOAT, [C, C], g.standard_normal(C * C) / C)
                           for k in "qkv"]
    nodes = [helper.make_node("MatMul", ["x", f"W{k}"], [k]) for k in "qkv"] + list(extra_nodes)
    nodes += [helper.make_node("MultiHeadAttention", attn_inputs, ["a"], domain="com.microsoft", num_heads=HEADS),
              helper.make_node("Add", ["x", "a"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, N, C])] + list(extra_inputs)
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N, C])],
                              inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_kv_cache_is_refused(tmp_path):
    d = C // HEADS
    past = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, HEADS, 3, d]) for n in ("pk", "pv")]
    path = tmp_path / "cached.onnx"
    onnx.save(_small_graph([], past, ["q", "k", "v", "", "", "", "pk", "pv"]), str(path))
    with pytest.raises(PruneError) as e:
        prunec.passes.FastV(keep=0.5, layer=1)(prunec.load(path))
    msg = str(e.value)
    assert "\n" not in msg and "past key/value" in msg and "MultiHeadAttention" in msg, msg
