"""ONNX spellings beyond the exporters' defaults: ORT's com.microsoft.MultiHeadAttention
(fused, 3-D q/k/v) and opset-14 graphs with LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import prunec
from conftest import case, onnx_block_tail
from fastv_reference import fastv_reference

C, H, N, DEPTH = 32, 4, 12, 3


def _weights(seed=0):
    g = np.random.default_rng(seed)
    layers = []
    for _ in range(DEPTH):
        layers.append({k: (g.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32) for k in ("q", "k", "v", "o", "m")})
    return layers


def _mha_model(weights) -> onnx.ModelProto:
    """x [B, N, C] -> DEPTH pre-norm blocks with MultiHeadAttention -> y [B, N, C]."""
    nodes, inits = [], []
    ln_w = helper.make_tensor("ln_w", TensorProto.FLOAT, [C], np.ones(C, np.float32))
    ln_b = helper.make_tensor("ln_b", TensorProto.FLOAT, [C], np.zeros(C, np.float32))
    inits += [ln_w, ln_b]
    x = "x"
    for i, w in enumerate(weights):
        for k, arr in w.items():
            inits.append(helper.make_tensor(f"W{k}{i}", TensorProto.FLOAT, [C, C], arr.reshape(-1)))
        nodes.append(helper.make_node("LayerNormalization", [x, "ln_w", "ln_b"], [f"n{i}"], axis=-1))
        for k in "qkv":
            nodes.append(helper.make_node("MatMul", [f"n{i}", f"W{k}{i}"], [f"{k}{i}"]))
        nodes.append(helper.make_node("MultiHeadAttention", [f"q{i}", f"k{i}", f"v{i}"], [f"a{i}"],
                                      domain="com.microsoft", num_heads=H))
        x = onnx_block_tail(nodes, x, i)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N, C])], inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _torch_reference(weights, x, keep, layer):
    """The same network in torch with FastV (query: mean over rows, no prefix tokens)."""
    x = torch.from_numpy(x)
    idx = scores = None
    for i, w in enumerate(weights):
        w = {k: torch.from_numpy(v) for k, v in w.items()}
        if i == layer:
            b = x.shape[0]
            k_keep = int(round(keep * x.shape[1]))
            idx = scores.topk(k_keep, dim=1).indices.sort(dim=1).values
            x = torch.gather(x, 1, idx[:, :, None].expand(b, k_keep, C))
        n = torch.nn.functional.layer_norm(x, (C,), eps=1e-5)
        q, k, v = (torch.matmul(n, w[t]).reshape(x.shape[0], x.shape[1], H, C // H).transpose(1, 2) for t in "qkv")
        p = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(C // H), dim=-1)
        if i == layer - 1:
            scores = p.mean(dim=2).mean(dim=1)
        a = (p @ v).transpose(1, 2).reshape(x.shape)
        r = x + a @ w["o"]
        x = r + torch.relu(r @ w["m"])
    return x.numpy(), idx.numpy()


def test_ms_multihead_attention_is_found_and_pruned(tmp_path):
    weights = _weights()
    path = tmp_path / "mha.onnx"
    onnx.save(_mha_model(weights), str(path))
    model = prunec.load(path)
    facts = model.facts()
    assert facts.depth == DEPTH and all(s.kind == "fused" for s in facts.sites)
    assert facts.prefix == 0 and not facts.causal
    x = np.random.default_rng(1).standard_normal((3, N, C)).astype(np.float32)
    same = prunec.passes.FastV(keep=1.0, layer=1)(model)
    np.testing.assert_allclose(same.run({"x": x})[0], model.run({"x": x})[0], rtol=1e-5, atol=1e-6)
    pruned = prunec.passes.FastV(keep=0.5, layer=2)(model)
    ref, ref_idx = _torch_reference(weights, x, 0.5, 2)
    np.testing.assert_array_equal(pruned.kept_indices({"x": x})["fastv_l2"], ref_idx)
    np.testing.assert_allclose(pruned.run({"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_opset14_decomposed_layernorm(tmp_path):
    c = case("timm_vit")
    path = tmp_path / "vit14.onnx"
    torch.onnx.export(c.module, (c.inputs["x"],), str(path), dynamo=False, opset_version=14, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops  # decomposed by the exporter
    model = prunec.load(path)
    assert model.facts().depth == c.depth and model.facts().prefix == 1
    pruned = prunec.passes.FastV(keep=0.25, layer=2)(model)
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=0.25, layer=2, query="cls", prefix=1)
    np.testing.assert_array_equal(pruned.kept_indices(c.inputs)["fastv_l2"], ref_idx.numpy())
    np.testing.assert_allclose(pruned.run(c.inputs)[0], ref_out.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_dynamic_batch_is_preserved(tmp_path):
    from conftest import onnx_file

    pruned = prunec.passes.FastV(keep=0.25, layer=1)(prunec.load(onnx_file("timm_vit", "dynamo18")))
    path = pruned.save(tmp_path / "p.onnx")
    proto = onnx.load(str(path))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    assert pruned.run({"x": x})[0].shape == (5, 10)
