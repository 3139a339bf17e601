"""Every pass on every opset prunec takes (14-23): a tiny timm ViT (CLS token, timm's
``global_pool='avg'``: the head averages ``x[:, 1:]``) exported by TorchScript at opsets 14 and
16 and by dynamo at 18 and 23. The rewritten graph uses only ops of its opset (onnx.checker at
the graph's opset, which prunec runs on every rewrite, and here once more on the saved file),
runs, keeps the torch path's tokens and matches its outputs. Before opset 16 the scatters have
no ``reduction``: merges sum tokens with a one-hot product instead (same result)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import prunec
from conftest import case, kept, load, onnx_file, run

FORMS = ("torchscript14", "torchscript16", "dynamo18", "dynamo23")
PASSES = [
    ("fastv", dict(keep=0.5, layer="1")),
    ("cls-attn", dict(keep=0.5)),
    ("divprune", dict(keep=0.5)),
    ("zero-tprune", dict(keep=0.5, layer="2", iters=5)),
    ("random", dict(keep=0.5, seed=1)),
    ("pool", dict(factor=2)),
    ("tome", dict(r="0/3/0")),  # one merge: its sums, the size-weighted pooling and a biased later layer
    ("evit", dict(keep="0.5", layers="1")),
    ("ppt", dict(r=3, layers="1")),
    ("visionzip", dict(dominant=5, contextual=3)),
]
NAME = "timm_vit_avg"  # CLS token and timm's global_pool='avg': the head averages x[:, 1:]


def _opset(form: str) -> int:
    return int(form[-2:])


@pytest.fixture(scope="module")
def models():
    out = {form: load(NAME, form) for form in FORMS}
    for form in FORMS:
        assert onnx.load(str(onnx_file(NAME, form))).opset_import[0].version == _opset(form)
    out["torch"] = load(NAME, "torch")
    return out


@pytest.mark.parametrize("pname,opts", PASSES, ids=[p for p, _ in PASSES])
def test_every_pass_on_every_opset(pname, opts, models, tmp_path):
    make = prunec.passes.get(pname)
    inputs = case(NAME).inputs
    ref = make(**opts)(models["torch"])
    ref_out, ref_idx = run(ref, inputs), kept(ref, inputs)
    assert ref_idx
    for form in FORMS:
        opset = _opset(form)
        got = make(**opts)(models[form])
        saved = onnx.load(str(got.save(tmp_path / f"{pname}{opset}.onnx")))
        assert saved.opset_import[0].version == opset  # prunec never changes the opset
        onnx.checker.check_model(saved, full_check=True)
        idx = kept(got, inputs)
        assert idx.keys() == ref_idx.keys()
        for tag in idx:
            np.testing.assert_array_equal(idx[tag], ref_idx[tag], err_msg=f"opset {opset}")
        out = run(got, inputs)
        assert [a.shape for a in out] == [a.shape for a in ref_out]
        for a, b in zip(out, ref_out):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"opset {opset}")


def test_one_hot_sum_is_the_scatter_sum():
    """The opset-14 spelling of a merge's token sum equals the opset-16 ScatterND one."""
    import onnx_ir as ir

    from prunec.backends.onnx import _Builder, make_session
    from prunec.backends.onnx_merge import scatter_sum

    g = np.random.default_rng(0)
    x = g.standard_normal((3, 9, 5)).astype(np.float32)
    dest = g.integers(0, 5, (3, 9)).astype(np.int64)  # slot 4 = M: dropped
    results = []
    for opset in (14, 16):
        xi = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", 9, 5]))
        di = ir.Value(name="dest", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", 9]))
        graph = ir.Graph([xi, di], [], nodes=[], opset_imports={"": opset}, name="g")
        b = _Builder(graph, None, "t", iter(range(1000)))
        y = scatter_sum(b, xi, di, 4, 5)
        y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["b", 4, 5])
        graph.outputs.append(y)
        proto = ir.serde.serialize_model(ir.Model(graph, ir_version=8))
        del proto.graph.value_info[:]
        onnx.checker.check_model(proto, full_check=True)
        results.append(make_session(proto).run(None, {"x": x, "dest": dest})[0])
    want = np.zeros((3, 4, 5), np.float32)
    for i in range(3):
        for j in range(9):
            if dest[i, j] < 4:
                want[i, dest[i, j]] += x[i, j]
    for r in results:
        np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-6)
