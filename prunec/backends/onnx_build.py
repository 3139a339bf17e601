"""Node building blocks for the ONNX lowering: the node builder and the attention-site
tensors (q, kᵀ, v as [B, H, N, D] views, key masks, per-token attention scores).

Shared by :mod:`prunec.backends.onnx` (selection, gather, recovery) and
:mod:`prunec.backends.onnx_merge` (merging); imports neither, so the two do not import
each other back.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import onnx_ir as ir

from ..errors import PruneError


_ARITH = {"Add": lambda a, c: a + c, "Sub": lambda a, c: a - c, "Mul": lambda a, c: a * c,
          "Div": lambda a, c: a // c, "Min": min, "Max": max}
_LOW_FLOATS = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
_NP_FLOATS = {"float16": np.float16, "float64": np.float64}
_CONSTS: "weakref.WeakKeyDictionary[ir.Graph, dict]" = weakref.WeakKeyDictionary()  # graph -> small constants


def _same_dtype(value, dtype: str, node_name: str) -> None:
    """Refuse to mix a prunec tensor of the stream's ``dtype`` into ``value`` of another float type."""
    if value is not None and value.is_float and value.dtype != dtype:
        raise PruneError(f"'{value.name}' at node '{node_name}' is {value.dtype} while the token stream is "
                         f"{dtype}: prunec cannot combine token sizes with it")


class _Builder:
    """Creates nodes inserted before a given node of the graph."""

    def __init__(self, graph: ir.Graph, before: ir.Node, prefix: str, counter):
        self.graph, self.before, self.prefix, self.counter = graph, before, prefix, counter
        self.opset = graph.opset_imports.get("", 17)

    def ints(self, array, name: str) -> ir.Value:
        return self.const(np.array(array, np.int64), name)

    def floats(self, array, name: str) -> ir.Value:
        return self.const(np.array(array, np.float32), name)

    def slice(self, x: ir.Value, start, end, axis: int = 1, step: int = 1) -> ir.Value:
        """x[start:end:step] along ``axis``; the bounds are counts (numbers or [1] int64 values)."""
        inputs = [x, self.num(start, "s"), self.num(end, "e"), self.ints([axis], "ax")]
        return self.op("Slice", inputs + ([self.ints([step], "step")] if step != 1 else []))

    # Token counts: a number when the token count is static, else a [1] int64 value computed at run
    # time. The helpers below fold numbers in Python and build nodes only for run-time values, so
    # a static graph gets the constants it always had.

    def num(self, x, name: str = "n") -> ir.Value:
        """A count as a [1] int64 value (a number becomes a constant)."""
        return x if isinstance(x, ir.Value) else self.ints([x], name)

    def arith(self, op_type: str, a, c):
        """``a op c`` on non-negative counts: Add, Sub, Mul, Div (floor), Min, Max. Identities
        (x + 0, x − 0, x − x, min(0, x), max(0, x), min/max(x, x)) fold without a node."""
        if not isinstance(a, ir.Value) and not isinstance(c, ir.Value):
            return _ARITH[op_type](int(a), int(c))
        zero_a, zero_c = not isinstance(a, ir.Value) and a == 0, not isinstance(c, ir.Value) and c == 0
        if (op_type in ("Add", "Max") and zero_a) or (op_type in ("Min", "Max") and a is c):
            return c
        if op_type in ("Add", "Sub", "Max") and zero_c:
            return a
        if op_type == "Min" and (zero_a or zero_c):
            return 0
        if op_type == "Sub" and a is c:
            return 0
        return self.op(op_type, [self.num(a), self.num(c)])

    def arange(self, lo, hi) -> ir.Value:
        """lo, lo+1, ..., hi-1 as a 1-D int64 tensor [hi - lo] (a constant for numbers)."""
        if not isinstance(lo, ir.Value) and not isinstance(hi, ir.Value):
            return self.ints(np.arange(lo, hi), "range")
        axes = self.ints([0], "axes")
        return self.op("Range", [self.op("Squeeze", [self.num(lo), axes]), self.op("Squeeze", [self.num(hi), axes]),
                                 self.ints(1, "one")])

    def batch_range(self, lo, hi, like: ir.Value) -> ir.Value:
        """[B, hi - lo]: lo, ..., hi-1 in every row, B being ``like``'s batch size."""
        if not isinstance(lo, ir.Value) and not isinstance(hi, ir.Value):
            return self.batch_const(np.arange(lo, hi)[None, :], like, "range")
        return self.batch_row(self.arange(lo, hi), like)

    def batch_row(self, row: ir.Value, like: ir.Value) -> ir.Value:
        """A 1-D tensor [T] repeated in every row: [B, T], B being ``like``'s batch size."""
        row = self.op("Unsqueeze", [row, self.ints([0], "axes")])
        return self.op("Expand", [row, self.op("Concat", [self.batch_size(like), self.ints([1], "one")], {"axis": 0})])

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """[1] int64 holding x's dimension ``axis`` at run time."""
        if self.opset >= 15:
            return self.op("Shape", [x], {"start": axis, "end": axis + 1})
        return self.slice(self.op("Shape", [x]), axis, axis + 1, axis=0)

    def reduce(self, op_type: str, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        if self.opset >= 18 or op_type == "ReduceSum" and self.opset >= 13:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64), "axes")], {"keepdims": keepdims})
        return self.op(op_type, [x], {"axes": axes, "keepdims": keepdims})

    def reduce_mean(self, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        return self.reduce("ReduceMean", x, axes, keepdims)

    def reduce_sum(self, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        return self.reduce("ReduceSum", x, axes, keepdims)

    def reduce_min(self, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        return self.reduce("ReduceMin", x, axes, keepdims)

    def batch_size(self, x: ir.Value) -> ir.Value:
        """[1] int64 holding x's first dimension."""
        if self.opset >= 15:
            return self.op("Shape", [x], {"start": 0, "end": 1})
        return self.slice(self.op("Shape", [x]), 0, 1, axis=0)

    def batch_const(self, array, like: ir.Value, name: str) -> ir.Value:
        """A [1, ...] constant expanded to ``like``'s batch size (the batch stays dynamic)."""
        array = np.asarray(array)
        shape = self.op("Concat", [self.batch_size(like), self.ints(list(array.shape[1:]), "rest")], {"axis": 0})
        return self.op("Expand", [self.const(array, name), shape])

    def ones_like(self, x: ir.Value) -> ir.Value:
        """Float ones of x's shape."""
        return self.op("Add", [self.op("Mul", [x, self.floats(0.0, "zero")]), self.floats(1.0, "one")])

    def sort_ascending(self, idx: ir.Value, k) -> ir.Value:
        """Int64 indices [B, k] sorted ascending along axis 1 (TopK on their float values); ``k`` a
        number or a [1] int64 value."""
        as_float = self.op("Cast", [idx], {"to": ir.DataType.FLOAT})
        kv = self.num(k, "k")
        ordered, _ = self.op("TopK", [as_float, kv], {"axis": 1, "largest": 0, "sorted": 1}, outputs=2)
        return self.op("Cast", [ordered], {"to": ir.DataType.INT64})

    def as_f32(self, x: ir.Value, dtype: str) -> ir.Value:
        """``x`` (a graph value of element type ``dtype``, as the probe saw it) in float32:
        prunec scores and merges in float32 whatever the graph computes in."""
        return x if dtype not in _LOW_FLOATS else self.op("Cast", [x], {"to": ir.DataType.FLOAT})

    def as_dtype(self, x: ir.Value, dtype: str) -> ir.Value:
        """A float32 value prunec computed, cast back to the graph's ``dtype``."""
        return x if dtype not in _LOW_FLOATS else self.op("Cast", [x], {"to": _LOW_FLOATS[dtype]})

    def scalar(self, value: float, dtype: str, name: str) -> ir.Value:
        """A float scalar constant in the element type ``dtype`` of the values it meets."""
        return self.const(np.array(value, _NP_FLOATS.get(dtype, np.float32)), name)

    @property
    def count(self) -> int:
        return next(self.counter)

    def const(self, array, name: str) -> ir.Value:
        """A constant as an initializer; a small one equal (type, shape, bytes) to one made before in
        this graph is that one again (thousands of [1] counts and axes become a few)."""
        array = np.asarray(array)
        small = array.size <= 16
        key = (array.dtype.str, array.shape, array.tobytes()) if small else None
        consts = _CONSTS.setdefault(self.graph, {})
        v = consts.get(key) if small else None
        if v is not None and v.graph is self.graph:
            return v
        t = ir.Tensor(np.array(array), name=f"{self.prefix}/{name}_{self.count}")
        v = ir.Value(name=t.name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.graph.register_initializer(v)
        if small:
            consts[key] = v
        return v

    def op(self, op_type: str, inputs, attrs=None, name: str = "", outputs: int = 1):
        node = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v)
                                                         for k, v in (attrs or {}).items()],
                       num_outputs=outputs, name=f"{self.prefix}/{name or op_type}_{self.count}")
        for i, o in enumerate(node.outputs):
            o.name = f"{node.name}:{i}" if outputs > 1 else node.name
        if self.before is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(self.before, node)
        return node.outputs[0] if outputs == 1 else node.outputs


def _as_4d_heads(b: _Builder, x: ir.Value, shape, heads: int | None) -> ir.Value:
    """[B, N, H*D] -> [B, H, N, D]; 4-D inputs pass through."""
    if len(shape) == 4:
        return x
    if not heads:
        raise PruneError(f"3-D attention input '{x.name}' without a head count")
    hd = shape[2]
    x = b.op("Reshape", [x, b.const(np.array([0, -1, heads, hd // heads], np.int64), "heads")])
    return b.op("Transpose", [x], {"perm": [0, 2, 1, 3]})

def site_tensor(b: _Builder, site, values: dict[str, ir.Value], which: str) -> tuple[ir.Value, tuple]:
    """q, k or v (``which``) of a fused or packed site as float32 [B, H, N, D] with its shape, the input
    projection's bias included: ORT ``MultiHeadAttention`` adds its ``bias`` [3C] to 3-D q/k/v,
    ORT ``Attention`` projects its input [B, N, C] with the packed weight [C, 3C] and bias."""
    attrs = site.node.attrs
    heads = attrs.get("q_num_heads") or site.heads
    kv_heads = (attrs.get("kv_num_heads") or heads) if which != "q" else heads
    part = "qkv".index(which)
    if site.kind == "packed":
        w = attrs["weights"]
        sizes = list(attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3)
        lo, hi = sum(sizes[:part]), sum(sizes[:part + 1])
        x = b.op("MatMul", [values[site.inp.name], b.slice(values[w.name], lo, hi, axis=1)])
        if attrs.get("qkv_bias") is not None:
            x = b.op("Add", [x, b.slice(values[attrs["qkv_bias"].name], lo, hi, axis=0)])
        shape = (site.inp.shape[0], site.inp.shape[1], hi - lo)
    else:
        v = (site.q, site.k, site.v)[part]
        shape = tuple(v.shape)
        x = values[v.name]
        if attrs.get("ms_mha"):
            if len(site.q.shape) != 3 or site.k is None or len(site.k.shape) != 3 or site.v is None:
                raise PruneError(f"attention node '{site.node.name}' (MultiHeadAttention) has packed QKV or 4-D "
                                 f"key/value inputs; prunec scores only 3-D q/k/v")
            if attrs.get("qkv_bias") is not None:
                c = site.q.shape[-1]
                lo = (0, c, 2 * c)[part]
                x = b.op("Add", [x, b.slice(values[attrs["qkv_bias"].name], lo, lo + shape[-1], axis=0)])
    h = heads if which == "q" else kv_heads
    x = b.as_f32(x, site.inp.dtype if site.kind == "packed" else v.dtype)
    x4 = _as_4d_heads(b, x, shape, h)
    shape4 = shape if len(shape) == 4 else (shape[0], h, shape[1], shape[2] // h)
    return x4, shape4


def length_valid(b: _Builder, lengths: ir.Value, ends_starts: bool, positions: ir.Value) -> ir.Value:
    """Which ``positions`` ([1, T] or [B, M], original token positions) a lengths mask marks valid:
    lengths [B] (positions [0, len)) or, with ``ends_starts``, [2B] (exclusive ends, then inclusive
    starts). Boolean, broadcast to [B, T] / [B, M]."""
    x = b.op("Cast", [lengths], {"to": ir.DataType.INT64})
    if not ends_starts:
        return b.op("Less", [positions, b.op("Unsqueeze", [x, b.ints([1], "axes")])])
    se = b.op("Reshape", [x, b.ints([2, -1, 1], "ends_starts")])
    end = b.op("Squeeze", [b.slice(se, 0, 1, axis=0), b.ints([0], "axes")])
    start = b.op("Squeeze", [b.slice(se, 1, 2, axis=0), b.ints([0], "axes")])
    return b.op("And", [b.op("Less", [positions, end]), b.op("GreaterOrEqual", [positions, start])])


def _positions(b: _Builder, t) -> ir.Value:
    """Token positions [1, T] int64: a constant for a static count ``t``, or (``t`` a [1] int64
    value: a dynamic count) a Range at run time."""
    if not isinstance(t, ir.Value):
        return b.const(np.arange(t, dtype=np.int64)[None, :], "pos")
    count = b.op("Squeeze", [t, b.ints([0], "axes")])
    return b.op("Unsqueeze", [b.op("Range", [b.ints(0, "zero"), count, b.ints(1, "one")]), b.ints([0], "axes")])


def _key_mask(b: _Builder, site, values: dict[str, ir.Value], query, t) -> ir.Value | None:
    """The additive mask [B, 1, R, T] (or [B, 1, 1, T]) of an ORT contrib attention's ``key_mask``
    (MultiHeadAttention ``key_padding_mask`` / Attention ``mask_index``): lengths [B] (right
    padding), end/start positions [2B], a 0/1 mask [B, T] or [B, S, T]; masked keys get the op's
    ``mask_filter_value`` (default -10000). ``t``: the token count (see :func:`_positions`)."""
    pos = _positions(b, t)
    seqlens = site.node.attrs.get("seqlens_k")
    if seqlens is not None:  # GroupQueryAttention: keys [0, seqlens_k] are valid
        last = b.op("Unsqueeze", [b.op("Cast", [values[seqlens.name]], {"to": ir.DataType.INT64}), b.ints([1], "axes")])
        valid = b.op("Unsqueeze", [b.op("LessOrEqual", [pos, last]), b.ints([1, 2], "axes")])
        return b.op("Where", [valid, b.floats(0.0, "zero"), b.floats(-np.inf, "ninf")])
    m = site.node.attrs.get("key_mask")
    if m is None:
        return None
    fill = site.node.attrs.get("mask_filter_value")
    fill = -10000.0 if fill is None else float(fill)
    x = values[m.name]
    batch = site.output.shape[0]
    if len(m.shape) == 1 and m.shape[0] in (batch, 2 * batch):
        valid = length_valid(b, x, m.shape[0] != batch, pos)  # [B, T]
        valid = b.op("Unsqueeze", [valid, b.ints([1, 2], "axes")])
    elif len(m.shape) == 2:
        valid = b.op("Unsqueeze", [b.op("Cast", [x], {"to": ir.DataType.BOOL}), b.ints([1, 2], "axes")])
    elif len(m.shape) == 3:
        if query != "mean":
            x = b.op("Gather", [x, b.ints([int(query)], "row")], {"axis": 1})
        valid = b.op("Unsqueeze", [b.op("Cast", [x], {"to": ir.DataType.BOOL}), b.ints([1], "axes")])
    else:
        raise PruneError(f"attention node '{site.node.name}' has a mask '{m.name}' of shape {list(m.shape)} "
                         f"prunec cannot score with")
    return b.op("Where", [valid, b.floats(0.0, "zero"), b.floats(fill, "fill")])


def _attention_rows(b: _Builder, site, values: dict[str, ir.Value], query, n, bias=None) -> ir.Value:
    """softmax(q kᵀ·scale + masks) for one fused or packed site over its ``n`` tokens: the query
    row(s) [B, H, R, N] (R = 1) or, with query "mean", every row [B, H, N, N]. Masks: the site's
    additive/boolean mask, ORT's key mask and attention bias, causal (``is_causal`` /
    ``unidirectional``), and ``bias`` (the log-size bias [B, 1, 1, N] an earlier cut of the same
    plan adds to this site). ``n`` None: the token count is dynamic (read off k at run time)."""
    q, (_, h, _, d) = site_tensor(b, site, values, "q")
    k, kshape = site_tensor(b, site, values, "k")
    if n is None:
        n = b.dim(k, 2)
    if kshape[1] != h:
        rep = h // kshape[1]
        k = b.op("Unsqueeze", [k, b.const(np.array([2], np.int64), "axes")])
        k = b.op("Expand", [k, b.const(np.array([1, 1, rep, 1, 1], np.int64), "rep")])
        k = b.op("Reshape", [k, b.const(np.array([0, h, -1, d], np.int64), "gqa")])
    if query != "mean":
        q = b.op("Gather", [q, b.const(np.array([int(query)], np.int64), "row")], {"axis": 2})
    kt = b.op("Transpose", [k], {"perm": [0, 1, 3, 2]})
    logits = b.op("MatMul", [q, kt])  # [B, H, R, N]
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(d)
    logits = b.op("Mul", [logits, b.const(np.array(scale, np.float32), "scale")])
    masks = [(site.mask, False)] if site.mask is not None else []
    if site.node.attrs.get("attention_bias") is not None:
        masks.append((site.node.attrs["attention_bias"], False))
    for mask, _ in masks:
        m = b.as_f32(values[mask.name], mask.dtype)
        if query != "mean" and mask.shape[-2] > 1:
            m = b.op("Gather", [m, b.const(np.array([int(query)], np.int64), "row")], {"axis": len(mask.shape) - 2})
        if mask.dtype == "bool":
            m = b.op("Where", [m, b.floats(0.0, "zero"), b.floats(-np.inf, "ninf")])
        logits = b.op("Add", [logits, m])
    if bias is not None:
        logits = b.op("Add", [logits, b.as_f32(bias, site.q.dtype if site.q is not None else site.inp.dtype)])
    key_mask = _key_mask(b, site, values, query, n)
    if key_mask is not None:
        logits = b.op("Add", [logits, key_mask])
    if site.node.attrs.get("is_causal") and isinstance(n, ir.Value):  # dynamic: the mask at run time
        cols = _positions(b, n)  # [1, N]
        rows = cols if query == "mean" else b.op("Gather", [cols, b.ints([int(query)], "row")], {"axis": 1})
        future = b.op("Greater", [cols, b.op("Transpose", [rows], {"perm": [1, 0]})])  # [R, N]
        logits = b.op("Add", [logits, b.op("Where", [future, b.floats(-np.inf, "ninf"), b.floats(0.0, "zero")])])
    elif site.node.attrs.get("is_causal"):
        rows = np.arange(n) if query == "mean" else np.array([int(query)])
        future = np.where(np.arange(n)[None, :] > rows[:, None], -np.inf, 0.0).astype(np.float32)
        logits = b.op("Add", [logits, b.const(future, "causal")])
    return b.op("Softmax", [logits], {"axis": -1})


def site_scores(b: _Builder, site, query, values: dict[str, ir.Value], n, bias=None,
                real: ir.Value | None = None) -> ir.Value:
    """Attention each of the ``n`` tokens receives in ``site`` from ``query`` (a row index or
    "mean"), mean over heads: [B, N] float32 (whatever the graph's float type). ``bias``: see
    :func:`_attention_rows` (an eager site's probabilities include it already). ``real`` [B, N]
    bool: with query "mean", the rows averaged (padding queries left out)."""
    if site.probs is not None:
        if len(site.probs.shape) != 4:
            raise PruneError(f"attention probabilities '{site.probs.name}' are not [B, H, N, N]")
        p = b.as_f32(values[site.probs.name], site.probs.dtype)
        if query != "mean":
            row = b.op("Gather", [p, b.const(np.array(int(query), np.int64), "row")], {"axis": 2})
            return b.reduce_mean(row, [1])
    else:
        p = _attention_rows(b, site, values, query, n, bias)
    if real is None:
        return b.reduce_mean(p, [1, 2])
    w = b.op("Unsqueeze", [b.op("Cast", [real], {"to": ir.DataType.FLOAT}), b.ints([2], "axes")])  # [B, N, 1]
    total = b.reduce_sum(b.op("Mul", [b.reduce_mean(p, [1]), w]), [1])  # [B, N keys]
    return b.op("Div", [total, b.reduce_sum(w, [1])])


