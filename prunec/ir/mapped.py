"""Read an ONNX file with its inline weights memory-mapped instead of copied.

``onnx.load`` reads the whole file, parses every weight's bytes into the protobuf and
``numpy()`` copies them once more: three copies of a model that prunec only passes on (to ONNX
Runtime, which reads the arrays in place, and to the file it writes). :func:`load_mapped` maps
the file, walks the protobuf wire format down to each initializer's ``raw_data`` (ModelProto
field 7 ``graph`` -> GraphProto field 5 ``initializer`` -> TensorProto field 9 ``raw_data``),
parses the model without those bytes and gives each such weight a read-only numpy array that
is a view of the mapping: pages are read from the file when used, never copied.
"""
from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .session import LARGE_WEIGHT_BYTES as MAPPED_BYTES  # the weights ORT sessions take in memory are mapped

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data


class _NotPlain(Exception):
    """The file uses wire-format features this reader leaves to onnx.load."""


def load_mapped(path: str | os.PathLike) -> ir.Model:
    """The ONNX model at ``path`` (binary protobuf) as onnx-ir, each initializer's ``raw_data`` over
    :data:`MAPPED_BYTES` an ``ir.Tensor`` over a read-only numpy view of the memory-mapped file; falls
    back to ``onnx_ir.load`` where the file is not plain (a big-endian machine, a weight type numpy
    cannot view, an unusual encoding)."""
    if sys.byteorder != "little":  # pragma: no cover  (raw_data is little-endian)
        return ir.load(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_WILLNEED"):  # read ahead now, in large requests (faulting pages in one by one is
        mapped.madvise(mmap.MADV_WILLNEED)  # several times slower than a read when the file is not cached)
    try:
        stripped, weights = _strip_weights(memoryview(mapped))
        proto = onnx.ModelProto.FromString(stripped)
    except (_NotPlain, IndexError, DecodeError):
        return ir.load(path)  # not a plain binary model: onnx.load reads it (or says what is wrong)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.fspath(path)))
    arrays = {}
    for offset, length, header in weights:
        tensor = onnx.TensorProto.FromString(header)
        try:
            dtype = ir.DataType(tensor.data_type).numpy()
        except Exception:  # noqa: BLE001
            return ir.load(path)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if dtype.itemsize * count != length or dtype.kind in "OSUV":
            return ir.load(path)  # a packed sub-byte type (int4, float4): onnx-ir unpacks those
        arrays[tensor.name] = np.frombuffer(mapped, dtype, count, offset).reshape(tuple(tensor.dims))
    for name, array in arrays.items():
        value = model.graph.initializers.get(name)
        if value is None:
            return ir.load(path)
        value.const_value = ir.Tensor(array, name=name)
    return model


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(the varint at ``pos``, the position after it)."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _NotPlain


def encode_varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, field start, value start, value end) for each field in
    ``buf[start:end]``."""
    pos = start
    while pos < end:
        head = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _read_varint(buf, pos)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 5:
            value_end = pos + 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value_end = pos + size
        else:  # groups (deprecated)
            raise _NotPlain
        if value_end > end:
            raise _NotPlain
        yield field, wire, head, pos, value_end
        pos = value_end


def _strip_weights(buf: memoryview) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """The ModelProto bytes without the large initializers' raw_data, and for each of those
    (the offset of its bytes in ``buf``, their length, its TensorProto without them)."""
    out = bytearray()
    weights: list[tuple[int, int, bytes]] = []
    for field, wire, head, start, end in _fields(buf, 0, len(buf)):
        if field != _GRAPH or wire != 2:
            out += buf[head:end]
            continue
        graph = bytearray()
        for g_field, g_wire, g_head, g_start, g_end in _fields(buf, start, end):
            if g_field != _INITIALIZER or g_wire != 2:
                graph += buf[g_head:g_end]
                continue
            header = bytearray()
            raw = None
            for t_field, t_wire, t_head, t_start, t_end in _fields(buf, g_start, g_end):
                if t_field == _RAW_DATA and t_wire == 2 and t_end - t_start > MAPPED_BYTES:
                    raw = (t_start, t_end - t_start)
                else:
                    header += buf[t_head:t_end]
            if raw is None:
                graph += buf[g_head:g_end]
                continue
            weights.append((raw[0], raw[1], bytes(header)))
            graph += bytes([_INITIALIZER << 3 | 2]) + encode_varint(len(header)) + header
        out += bytes([_GRAPH << 3 | 2]) + encode_varint(len(graph)) + graph
    return bytes(out), weights
