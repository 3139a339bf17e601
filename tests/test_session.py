"""prunec's own ORT sessions (prunec.ir.session): a quick session feeds the model's large weights as
inputs read in place (ORT copies initializers handed over in memory into every session), keeps a
contrib op's weight an initializer, and computes what a plain session does; the probe and a
rewrite's check each serialise the graph once; the ONNX lowering writes each small constant once."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import prunec
from conftest import onnx_file
from prunec.ir import session

rng = np.random.default_rng(0)


def weights_graph(path):
    """Y = BiasGelu(X @ W, bias) + X @ V: W, V [96, 96] feed MatMul (a standard op), bias [96 * 4 bytes
    = 384 bytes, small] and the large ``big_bias`` [512] feed ORT's contrib BiasGelu / an Add."""
    w = rng.standard_normal((96, 96)).astype(np.float32)
    v = rng.standard_normal((96, 96)).astype(np.float32)
    bias = rng.standard_normal(96).astype(np.float32)
    wide = rng.standard_normal((96, 512)).astype(np.float32)
    big_bias = rng.standard_normal(512).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["xw"]),
             helper.make_node("BiasGelu", ["xw", "bias"], ["g"], domain="com.microsoft"),
             helper.make_node("MatMul", ["X", "V"], ["xv"]),
             helper.make_node("Add", ["g", "xv"], ["Y"]),
             helper.make_node("MatMul", ["X", "wide"], ["xwide"]),
             helper.make_node("BiasGelu", ["xwide", "big_bias"], ["Z"], domain="com.microsoft")]
    graph = helper.make_graph(
        nodes, "w", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 96])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 96]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 512])],
        [numpy_helper.from_array(a, n) for n, a in
         (("W", w), ("V", v), ("bias", bias), ("wide", wide), ("big_bias", big_bias))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    onnx.save(model, path)
    return path


def test_a_quick_session_feeds_standard_ops_weights_in_place(tmp_path):
    path = weights_graph(tmp_path / "w.onnx")
    model = prunec.load(path).model
    seen = []
    sess = session.make_session(model, quick=True, inspect=seen.append)
    assert isinstance(sess, session.WeightFedSession)
    # MatMul's weights are fed; the contrib op's large bias stays an initializer held in memory
    assert set(sess.weights) == {"W", "V", "wide"}
    for name, array in sess.weights.items():  # the model's own memory (here mapped from the file), not a copy
        assert np.shares_memory(array, model.graph.initializers[name].const_value.numpy())
    assert [i.name for i in sess.get_inputs()] == ["X"]
    # the checker's proto has every large weight as a typed input, none as an initializer
    (checked,) = seen
    assert {"W", "V", "wide", "big_bias"} <= {i.name for i in checked.graph.input}
    assert not {"W", "V", "wide", "big_bias"} & {t.name for t in checked.graph.initializer}
    x = rng.standard_normal((3, 96)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for got, want in zip(sess.run(None, {"X": x}), plain.run(None, {"X": x})):
        np.testing.assert_array_equal(got, want)
    assert sess.run(["Z"], {"X": x})[0].shape == (3, 512)


def test_a_full_session_keeps_weights_as_initializers(tmp_path):
    model = prunec.load(weights_graph(tmp_path / "w.onnx")).model
    sess = session.make_session(model)
    assert not isinstance(sess, session.WeightFedSession)
    assert [i.name for i in sess.get_inputs()] == ["X"]


@pytest.fixture
def serialisations(monkeypatch):
    """Counts graph_only_proto calls (where the ONNX backend and the session module call it)."""
    import prunec.backends.onnx as backend

    calls = []

    def counted(real):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(session, "graph_only_proto", counted(session.graph_only_proto))
    monkeypatch.setattr(backend, "graph_only_proto", counted(backend.graph_only_proto))
    return calls


@pytest.mark.parametrize("spec", [prunec.passes.ToMe(r=2), prunec.passes.FastV(keep=0.5, layer=1)],
                         ids=["tome", "fastv"])
def test_the_probe_and_the_check_each_serialise_the_graph_once(spec, serialisations):
    model = prunec.load(onnx_file("timm_vit", "dynamo18"), check="full")
    model.graph()
    assert len(serialisations) == 1  # shape inference and the probe's run share it
    model.graph().probe_facts(model.facts().sites[0].probs)  # (FastV's NaN check: a run up to its scores)
    assert len(serialisations) == 2
    del serialisations[:]
    out = prunec.Pipeline([spec])(model)
    # the outputs' shape inference, onnx.checker and the check session share one serialisation; the
    # comparison with the plan at keep=1 (a dynamic token count) lowers and serialises it once more
    assert len(serialisations) == (2 if model._compares_identity() else 1)
    assert out.cuts


def test_the_lowering_writes_each_small_constant_once():
    model = prunec.load(onnx_file("timm_vit", "dynamo18"))
    out = prunec.Pipeline([prunec.passes.ToMe(r=2)])(model)
    new = [v for n, v in out.model.graph.initializers.items() if n not in model.model.graph.initializers]
    small = [(v.const_value.dtype, tuple(v.const_value.shape), v.const_value.tobytes()) for v in new
             if v.const_value.size <= 16]
    assert small and len(small) == len(set(small))
    # and they are read by many nodes: fewer constants than the nodes prunec added
    added = sum(1 for n in out.model.graph) - sum(1 for n in model.model.graph)
    assert len(small) < added / 4
