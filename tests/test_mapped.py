"""Reading an ONNX file with its inline weights memory-mapped (prunec.ir.mapped): the same model
as onnx_ir.load gives, weights that are views of the file (not copies), the files prunec's own
streamed writer makes, and a fallback to onnx.load for what the reader leaves alone."""
from __future__ import annotations

import mmap
import shutil

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import prunec
from conftest import case, onnx_file
from prunec.ir.mapped import MAPPED_BYTES, load_mapped
from prunec.model import _read_onnx

rng = np.random.default_rng(0)


def shapes_model(path, tensors: list, opset: int = 17):
    """A graph that outputs the shape of each initializer ``tensors`` (TensorProtos), saved at ``path``."""
    nodes = [helper.make_node("Shape", [t.name], [f"{t.name}_shape"]) for t in tensors]
    outs = [helper.make_tensor_value_info(f"{t.name}_shape", TensorProto.INT64, [len(t.dims)]) for t in tensors]
    graph = helper.make_graph(nodes, "w", [], outs, tensors)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def weights_model(path, arrays: dict, raw=True):
    """:func:`shapes_model` of ``arrays`` (name -> array), as raw_data or (``raw=False``) typed fields."""
    return shapes_model(path, [numpy_helper.from_array(a, name) if raw else
                               helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape,
                                                  a.reshape(-1).tolist()) for name, a in arrays.items()])


def same_weights(a: ir.Model, b: ir.Model):
    assert list(a.graph.initializers) == list(b.graph.initializers)
    for name, v in b.graph.initializers.items():
        x, y = a.graph.initializers[name].const_value, v.const_value
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), name
        assert x.tobytes() == y.tobytes(), name


def test_weights_are_views_of_the_file_and_equal_onnx_load(tmp_path):
    arrays = {
        "f32": rng.standard_normal((64, 33)).astype(np.float32),
        "f16": rng.standard_normal((40, 40)).astype(np.float16),
        "i8": rng.integers(-128, 127, (1500,), dtype=np.int8),
        "i64": rng.integers(0, 1 << 40, (300,), dtype=np.int64),
        "small": np.arange(10, dtype=np.float32),  # under MAPPED_BYTES: parsed as usual
        "scalar": np.array(3.5, np.float32),
    }
    path = weights_model(tmp_path / "w.onnx", arrays)
    got = load_mapped(path)
    same_weights(got, ir.load(path))
    for name, a in arrays.items():
        t = got.graph.initializers[name].const_value
        np.testing.assert_array_equal(t.numpy(), a)
        assert _over_the_mapping(t.numpy()) is (a.nbytes > MAPPED_BYTES), name
        if a.nbytes > MAPPED_BYTES:
            assert not t.numpy().flags.writeable  # a pass that wrote a weight in place would fail loudly


def _over_the_mapping(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_bfloat16_and_non_raw_weights(tmp_path):
    bf = rng.standard_normal((32, 32)).astype(ml_dtypes.bfloat16)
    t = helper.make_tensor("bf", TensorProto.BFLOAT16, bf.shape, bf.view(np.uint16).tobytes(), raw=True)
    path = shapes_model(tmp_path / "bf.onnx", [t])
    got = load_mapped(path)
    same_weights(got, ir.load(path))
    assert got.graph.initializers["bf"].const_value.dtype == ir.DataType.BFLOAT16
    # weights written as float_data (no raw_data) are parsed, not mapped
    path2 = weights_model(tmp_path / "nr.onnx", {"w": rng.standard_normal((30, 30)).astype(np.float32)}, raw=False)
    same_weights(load_mapped(path2), ir.load(path2))


def test_packed_int4_falls_back_to_onnx_load(tmp_path):
    vals = rng.integers(-8, 7, (4000,)).astype(np.int8)
    t = numpy_helper.from_array(vals.astype(ml_dtypes.int4), "q")  # two values a byte, as raw_data
    assert t.data_type == TensorProto.INT4 and len(t.raw_data) == 2000 > MAPPED_BYTES
    path = shapes_model(tmp_path / "q.onnx", [t], opset=21)
    got = load_mapped(path)
    same_weights(got, ir.load(path))
    np.testing.assert_array_equal(got.graph.initializers["q"].const_value.numpy().astype(np.int8), vals)


def test_a_file_prunec_wrote_is_read_mapped_and_runs_the_same(tmp_path):
    src = tmp_path / "vit.onnx"
    shutil.copy(onnx_file("timm_vit", "dynamo18"), src)
    out = tmp_path / "out.onnx"
    prunec.passes.FastV(keep=0.5, layer="1")(prunec.load(src)).save(out)
    raw = out.read_bytes()
    assert len(_graph_fields(raw)) > 1  # the streamed writer's repeated graph fields
    mapped, plain = _read_onnx(out), ir.load(out)
    same_weights(mapped, plain)
    assert len(mapped.graph) == len(plain.graph)
    from prunec.ir.session import make_session

    x = {"x": case("timm_vit").inputs["x"].numpy()}
    for u, v in zip(make_session(mapped).run(None, x), make_session(plain).run(None, x)):
        np.testing.assert_array_equal(u, v)


def _graph_fields(raw: bytes):
    from prunec.ir.mapped import _fields

    return [f for f in _fields(memoryview(raw), 0, len(raw)) if f[0] == 7]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_files_are_refused_in_one_line(tmp_path, damage):
    path = weights_model(tmp_path / "w.onnx", {"w": rng.standard_normal((64, 64)).astype(np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x07\xff" * 500)
    with pytest.raises(prunec.PruneError, match="is not a valid ONNX model"):
        prunec.load(path)
