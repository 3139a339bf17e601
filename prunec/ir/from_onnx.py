"""Build a :class:`~prunec.ir.graph.Graph` from an ONNX model (held as onnx-ir).

ONNX shape information differs between exporters (the TorchScript exporter leaves
most intermediate shapes unknown), so prunec reads concrete shapes and small
integer values off one probe run in ONNX Runtime on example inputs: dynamic batch
dimensions are probed at ``probe_batch``.  Static dims are the model's own.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from .graph import Graph, Node, Value, record_value_facts

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Where", "Pow", "Erf", "Relu", "Sigmoid", "Tanh", "Exp", "Neg",
    "Sqrt", "Cast", "CastLike", "Identity", "Dropout", "Not", "IsNaN", "IsInf", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Reciprocal", "Softplus", "Abs",
    "Clip", "Max", "Min", "Gelu", "FastGelu", "Log", "Cos", "Sin", "Floor", "Ceil", "Round", "Sign",
    "QuickGelu", "BiasGelu", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Mod", "BiasAdd",
}
_RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare"}
# Quantization: (De)QuantizeLinear and DynamicQuantizeLinear pass their first input through
# elementwise (scale / zero point are side operands); integer matmuls are matmuls on inputs 0, 1.
_QUANT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_INT_MATMUL = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_LAYERNORM = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
              "SkipSimplifiedLayerNormalization", "RMSNormalization"}
# ORT contrib attention ops prunec cannot score or cut through (refused, naming the node)
_UNSUPPORTED_ATTENTION = {"PackedAttention", "PackedMultiHeadAttention", "PagedAttention",
                          "SparseAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
                          "QAttention", "QOrderedAttention", "LongformerAttention", "DecoderAttention"}


def _named_inputs(node: ir.Node, names: dict[str, int]) -> dict[str, int]:
    """The optional inputs of a contrib op that are present: name -> input index."""
    return {k: i for k, i in names.items() if len(node.inputs) > i and node.inputs[i] is not None}


# com.microsoft: norm(input + skip [+ bias]); output 3 is the sum
_SKIP_LAYERNORM = {t for t in _LAYERNORM if t.startswith("Skip")}
# op type -> normalized op, attributes kept as they are
_KINDS = {
    **dict.fromkeys(_ELEMENTWISE, "elementwise"),
    **dict.fromkeys(("MatMul", *_INT_MATMUL), "matmul"),
    "Gemm": "gemm",
    **dict.fromkeys(_LAYERNORM - _SKIP_LAYERNORM, "layernorm"),
    **dict.fromkeys(_RESHAPE, "reshape"),
    "Expand": "expand",
    "Slice": "slice",
    **dict.fromkeys(_REDUCE, "reduce"),
    "ConstantOfShape": "create",
    "Range": "range",
    "Shape": "shape",
    "Constant": "constant",
}
# op type -> (normalized op, the attributes it keeps or adds)
_KINDS_ATTRS = {
    **{t: ("elementwise", lambda a: {**a, "quant": True}) for t in _QUANT},
    **{t: ("layernorm", lambda a: {**a, "skip": True}) for t in _SKIP_LAYERNORM},
    "Softmax": ("softmax", lambda a: {"axis": a.get("axis", -1)}),
    "Transpose": ("transpose", lambda a: {"perm": list(a["perm"])} if "perm" in a else {}),
    "Concat": ("concat", lambda a: {"axis": a["axis"]}),
    "Split": ("split", lambda a: {"axis": a.get("axis", 0)}),
    "Gather": ("gather", lambda a: {"axis": a.get("axis", 0)}),
}


def _onnx_attention(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ONNX Attention (opset 23): q/k/v [B, H, N, D] or [B, N, H·D], optional mask input 3."""
    return "sdpa", {"is_causal": bool(attrs.get("is_causal", 0)), "scale": attrs.get("scale"),
                    "q_num_heads": attrs.get("q_num_heads"), "kv_num_heads": attrs.get("kv_num_heads"),
                    "mask_index": 3 if len(node.inputs) > 3 and node.inputs[3] is not None else None}


def _ms_multihead_attention(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ORT MultiHeadAttention: q/k/v [B, N, H·D] with optional bias, key mask, attention bias, past."""
    return "sdpa", {"is_causal": bool(attrs.get("unidirectional", 0)), "scale": attrs.get("scale"),
                    "q_num_heads": attrs.get("num_heads"), "kv_num_heads": attrs.get("num_heads"),
                    "mask_index": None, "ms_mha": True, "mask_filter_value": attrs.get("mask_filter_value"),
                    "named_inputs": _named_inputs(node, {"qkv_bias": 3, "key_mask": 4, "attention_bias": 5,
                                                         "past_key": 6, "past_value": 7})}


def _ms_packed_attention(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ORT Attention: input [B, N, C] projected to q/k/v by its packed weight (input 1)."""
    attrs["is_causal"] = bool(attrs.get("unidirectional", 0))
    attrs["named_inputs"] = _named_inputs(node, {"weights": 1, "qkv_bias": 2, "key_mask": 3, "past_key": 4,
                                                 "attention_bias": 5})
    return "packed_attention", attrs


def _ms_group_query_attention(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ORT GroupQueryAttention: causal, q [B, N, H·D], k/v [B, N, Hkv·D]; the attributes prunec
    cannot honour are listed in ``unsupported``."""
    unsupported = [a for a in ("do_rotary", "local_window_size", "softcap")
                   if attrs.get(a) not in (None, 0, -1, 0.0)]
    return "sdpa", {"is_causal": True, "scale": attrs.get("scale"), "q_num_heads": attrs.get("num_heads"),
                    "kv_num_heads": attrs.get("kv_num_heads"), "mask_index": None, "gqa": True,
                    "unsupported": unsupported,
                    "named_inputs": _named_inputs(node, {"past_key": 3, "past_value": 4, "seqlens_k": 5,
                                                         "total_sequence_length": 6, "attention_bias": 10})}


def _ms_rotary(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ORT RotaryEmbedding: x [B, N, C] or [B, H, N, D], positions [B, N] (input 1)."""
    return "rotary", {**attrs, "named_inputs": _named_inputs(node, {"position_ids": 1})}


def _onnx_rotary(node: ir.Node, attrs: dict) -> tuple[str, dict]:
    """ONNX RotaryEmbedding (opset 23): x [B, H, N, D] or [B, N, C]; cos/sin caches [B, N, D/2]
    (or [positions, D/2] with position_ids [B, N], input 3)."""
    return "rotary", {**attrs, "named_inputs": _named_inputs(node, {"cos_cache": 1, "sin_cache": 2,
                                                                   "position_ids": 3})}


# op type -> normalizer(node, attrs) in the standard domain and in com.microsoft
_ONNX_OPS = {"Attention": _onnx_attention, "RotaryEmbedding": _onnx_rotary}
_MS_OPS = {
    "EmbedLayerNormalization": lambda node, attrs: ("embed_layernorm", attrs),
    "MultiHeadAttention": _ms_multihead_attention,
    "Attention": _ms_packed_attention,
    "GroupQueryAttention": _ms_group_query_attention,
    "RotaryEmbedding": _ms_rotary,
    **dict.fromkeys(_UNSUPPORTED_ATTENTION, lambda node, attrs: ("unsupported_attention", attrs)),
}


def _normalize(node: ir.Node) -> tuple[str, dict]:
    """(normalized op, attributes) of an ONNX node: ``unknown:<domain>.<op>`` outside the
    standard and com.microsoft domains, ``unknown:<op>`` for an op prunec has no rule for."""
    t = node.op_type
    attrs = {k: a.value for k, a in node.attributes.items()}
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return f"unknown:{node.domain}.{t}", attrs
    if t in _KINDS:
        return _KINDS[t], attrs
    if t in _KINDS_ATTRS:
        kind, keep = _KINDS_ATTRS[t]
        return kind, keep(attrs)
    special = (_MS_OPS if node.domain == "com.microsoft" else _ONNX_OPS).get(t)
    if special is not None:
        return special(node, attrs)
    return f"unknown:{t}", attrs


def sort_nodes(model: ir.Model) -> None:
    """Put the nodes (and those of subgraphs) in topological order, keeping the given order
    where it already is one. ORT's fp16 converter, for one, writes nodes out of order, and
    everything after loading assumes producers come before their consumers."""
    from ..errors import PruneError

    try:
        model.graph.sort()
    except ValueError as e:
        raise PruneError(f"the graph cannot be put in topological order ({str(e).splitlines()[0][:120]})") from None


def fix_input_shapes(model: ir.Model, shapes: dict[str, list]) -> None:
    """Make input dimensions static: ``{"input_ids": [None, 128]}`` fixes axis 1 to 128 and
    leaves axis 0 (None, "?" or -1) as it is."""
    from ..errors import PruneError

    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise PruneError(f"--shape names '{name}', which is not an input (inputs: {', '.join(inputs)})")
        v = inputs[name]
        if v.shape is None or len(v.shape) != len(dims):
            raise PruneError(f"--shape {name} gives {len(dims)} dims; the input has rank "
                             f"{len(v.shape) if v.shape is not None else 'unknown'}")
        new = []
        for old, d in zip(v.shape, dims):
            if d in (None, "?", -1):
                new.append(old)
            elif isinstance(old, int) and old != d:
                raise PruneError(f"--shape {name}: dimension {old} is static already and differs from {d}")
            else:
                new.append(int(d))
        v.shape = ir.Shape(new)


PROBE_LENGTH = 29  # a dynamic sequence is probed at this length: prime, unlike a width or head count


def sequence_dims(model: ir.Model) -> dict[str, int]:
    """{input name: axis} of the dynamic sequence axes: axis 1 of a rank-2 or rank-3 input (ids,
    masks, positions, embeddings [B, S(, C)]) that is not a fixed number."""
    out = {}
    for v in model.graph.inputs:
        if v.shape is not None and len(v.shape) in (2, 3) and not isinstance(v.shape[1], int):
            out[v.name] = 1
    return out


CACHE_PROBE_PAST = 3  # a decoder's KV cache is analysed empty (prefill) and probed again this long


def cache_inputs(model: ir.Model) -> list[str]:
    """The KV-cache inputs of a decoder exported with one (``past_key_values.{i}.key|value``
    [B, kv_heads, past, head_dim] as Optimum and torch write them): rank-4 inputs whose name says
    ``past`` and whose axis 2 is dynamic, in graph order."""
    return [v.name for v in model.graph.inputs
            if "past" in v.name and v.shape is not None and len(v.shape) == 4 and not isinstance(v.shape[2], int)]


def _total_length_input(name: str, rank: int, cached: bool) -> bool:
    """A decoder's attention mask [B, past + S]: its length is the cache's plus the new tokens'."""
    return cached and rank == 2 and "attention_mask" in name


IMAGE_PROBE_SIDE = 224  # a dynamic image height and width are probed at this size


def image_dims(model: ir.Model) -> set[str]:
    """The inputs [B, C, H, W] whose height and width are both dynamic (an image of any size: its
    token count follows H·W)."""
    return {v.name for v in model.graph.inputs
            if v.shape is not None and len(v.shape) == 4 and not isinstance(v.shape[2], int)
            and not isinstance(v.shape[3], int)}


def example_inputs(model: ir.Model, probe_batch: int = 2, length: int | None = None,
                   side: int | None = None, past: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a probe run: random floats, ones for masks, zeros for ids. Dynamic batch
    dimensions get ``probe_batch``, dynamic sequence axes (:func:`sequence_dims`) ``length``
    (default :data:`PROBE_LENGTH`), a dynamic image height and width (:func:`image_dims`) ``side``
    (default :data:`IMAGE_PROBE_SIDE`), a KV cache (:func:`cache_inputs`) ``past`` entries (default
    none: a prefill) and a decoder's attention mask ``past + length``; any other dynamic dimension
    is refused."""
    rng = np.random.default_rng(0)
    seq, images, cache = sequence_dims(model), image_dims(model), set(cache_inputs(model))
    feeds = {}
    for v in model.graph.inputs:
        dims = []
        for axis, d in enumerate(v.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(probe_batch)
            elif v.name in cache and axis == 2:
                dims.append(past)
            elif seq.get(v.name) == axis:
                total = _total_length_input(v.name, len(v.shape), bool(cache))
                dims.append((length or PROBE_LENGTH) + (past if total else 0))
            elif v.name in images and axis in (2, 3):
                dims.append(side or IMAGE_PROBE_SIDE)
            else:
                from ..errors import PruneError

                raise PruneError(
                    f"input '{v.name}' has a dynamic dimension '{d}' at axis {axis}: prunec needs a static "
                    f"size there; re-export with a fixed size or fix it with --shape {v.name}=...")
        np_dtype = v.dtype.numpy()
        if np.issubdtype(np_dtype, np.floating):
            feeds[v.name] = rng.standard_normal(dims).astype(np_dtype)
        elif np_dtype == np.bool_ or "mask" in v.name:
            feeds[v.name] = np.ones(dims, dtype=np_dtype)
        elif "position" in v.name and dims:
            start = past if cache else 0
            feeds[v.name] = np.broadcast_to(np.arange(start, start + dims[-1], dtype=np_dtype), dims).copy()
        else:
            feeds[v.name] = np.zeros(dims, dtype=np_dtype)
    return feeds


def probe_onnx(model: ir.Model, feeds: dict[str, np.ndarray], light: bool = False) -> dict[str, np.ndarray]:
    """Concrete shapes and the values the analysis needs, as name -> array.

    ONNX shape inference (at the probe's input sizes) gives most shapes for free; ORT (CPU)
    runs only what it leaves open: values without a static shape, small integer tensors
    (shape operands), and square [.., N, N] tensors (to tell causal masks). Those that no
    weight feeds are run in a model of just the nodes they need (:func:`_weight_free_run`);
    the whole model runs once only where a weight feeds one of them other than a float tensor
    of inferred shape (attention probabilities, whose content a pass asks for later:
    ``Graph.probe_facts``). Values known only by shape come back as zero-strided placeholders.

    ``light``: never read the weights (a model too large to run for a probe): only the values
    computed without them (shape arithmetic, masks, positions) are run, in a model of just the
    nodes they need (:func:`_weight_free_run`); what the weights feed is known by its inferred
    shape only, and a value the analysis needs whose shape inference leaves open is refused.
    """
    from .session import graph_only_proto, make_session

    proto = graph_only_proto(model, as_inputs=True)
    for inp in proto.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, feeds[inp.name].shape):
                d.ClearField("dim_param")
                d.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception:  # noqa: BLE001  (inference is an optimization; the probe run covers all)
        infos = []
    known = _static_shapes(infos)
    wanted, produced = [], set()
    for node in model.graph:
        for o in node.outputs:
            if not o.name:
                continue
            produced.add(o.name)
            info = known.get(o.name)
            if info is None:
                wanted.append(o.name)
                continue
            shape, dtype = info
            small_int = np.dtype(dtype).kind in "iu" and int(np.prod(shape)) <= 64
            square = len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] > 1
            if small_int or square:
                wanted.append(o.name)
    if light:
        if any(o.name not in known for node in model.graph for o in node.outputs if o.name):
            known = {**_symbolic_shapes(proto), **known}  # ORT's symbolic inference follows computed shapes
        result = _weight_free_run(model, proto, feeds, wanted, known)
    else:  # the whole model runs only where the weights feed something else the analysis reads
        try:
            result = _weight_free_run(model, proto, feeds, wanted, known, strict=False)
        except Exception:  # noqa: BLE001  (a sub-model ORT cannot run: the whole model is run instead)
            result = None
        if result is None:
            outputs = [v.name for v in model.graph.outputs]
            sess = make_session(model, extra_outputs=[n for n in wanted if n not in outputs], quick=True, proto=proto)
            out_names = [o.name for o in sess.get_outputs()]
            result = dict(zip(out_names, sess.run(out_names, feeds)))
    for name, (shape, dtype) in known.items():
        if name not in result and name in produced:
            result[name] = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, [0] * len(shape))
    return result


def _static_shapes(infos) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, numpy dtype)} of the value infos whose every dimension is a number."""
    known = {}
    for vi in infos:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims):
            continue
        known[vi.name] = (tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return known


def _symbolic_shapes(proto: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Static shapes from ONNX Runtime's symbolic shape inference, which also follows shapes computed
    in the graph (TorchScript exports' Expand / Reshape operands) where ONNX's inference stops."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False, verbose=0)
    except Exception:  # noqa: BLE001  (an aid: what it cannot infer is refused later, naming the value)
        return {}
    return _static_shapes(list(out.graph.value_info) + list(out.graph.output)) if out is not None else {}


_WEIGHT_SLOTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "MatMulInteger": (1,), "Gather": (0,),
                 "MatMulNBits": (1,), "DynamicQuantizeMatMul": (1,), "MatMulIntegerToFloat": (1,),
                 "Attention": (1,), "EmbedLayerNormalization": (2, 3, 4)}


def weight_names(model: ir.Model) -> set[str]:
    """The initializers that are weights: a matmul's / conv's second operand, an embedding table
    (Gather data), ORT Attention's packed projection, each possibly through Transpose, Cast,
    Reshape or DequantizeLinear of an initializer. Other initializers (shape constants, masks,
    position tables) are not."""
    inits = model.graph.initializers
    out = set()
    for node in model.graph:
        for i in _WEIGHT_SLOTS.get(node.op_type, ()):
            v = node.inputs[i] if len(node.inputs) > i else None
            for _ in range(4):
                if v is None:
                    break
                if v.name in inits:
                    out.add(v.name)
                    break
                p = v.producer()
                if p is None or p.op_type not in ("Transpose", "Cast", "Reshape", "DequantizeLinear", "Identity"):
                    break
                v = p.inputs[0]
    return out


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's weights (:func:`weight_names`)."""
    inits = model.graph.initializers
    return sum(inits[n].const_value.nbytes for n in weight_names(model) if inits[n].const_value is not None)


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads: its inputs and the outer values its subgraphs (If/Loop bodies) read."""
    names = {x for x in node.input if x}
    for attr in node.attribute:
        for g in list(attr.g.node and [attr.g] or []) + list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names |= {x for n in g.node for x in _node_inputs(n) if x not in inner}
    return names


def _weight_free_run(model: ir.Model, proto: onnx.ModelProto, feeds: dict, wanted: list[str],
                     known: dict, strict: bool = True) -> dict[str, np.ndarray] | None:
    """The ``wanted`` values that do not depend on a weight, from an ORT run of the nodes they need
    (no weight is read); weight-dependent ones must have an inferred shape (``known``), else the
    probe is refused (``strict``) or None is returned. Without ``strict``, None also where the
    weights feed a wanted value other than a float or boolean one (attention probabilities and
    their NaN tests, known by shape until a pass needs their content), so that no integer the
    analysis reads is a placeholder."""
    from ..errors import PruneError
    from .session import make_session

    weights = weight_names(model)
    heavy, shapes = set(weights), {}  # shapes: a Shape of a weight-dependent value, from its inferred shape
    for node in proto.graph.node:
        if not _node_inputs(node) & heavy:
            continue
        x = node.input[0] if node.input else ""
        if node.op_type in ("Shape", "Size") and x in known:
            dims = np.array(known[x][0], np.int64)
            if node.op_type == "Size":
                shapes[node.output[0]] = np.array(int(np.prod(dims)), np.int64)
            else:
                attrs = {a.name: a.i for a in node.attribute}
                start, end = attrs.get("start", 0), attrs.get("end", len(dims))
                shapes[node.output[0]] = dims[start:end] if "end" in attrs else dims[start:]
            continue
        heavy.update(node.output)
    for name in wanted:
        if not strict and name in heavy and name not in shapes and (
                name not in known or np.dtype(known[name][1]).kind not in "fb"):
            return None
        if name in heavy and name not in known and name not in shapes:
            raise PruneError(f"the shape of '{name}' depends on the weights and shape inference leaves it open: "
                             f"prunec would have to run the model (load it without the light probe)")
    light = [n for n in wanted if n not in heavy and n not in shapes]
    producer = {o: node for node in proto.graph.node for o in node.output if o not in shapes}
    need, stack = set(), list(light)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in need:
            continue
        need.add(id(node))
        stack.extend(_node_inputs(node))
    nodes = [n for n in proto.graph.node if id(n) in need]
    read = set().union(*(_node_inputs(n) for n in nodes)) if nodes else set()
    produced = {o for n in nodes for o in n.output}
    inits = model.graph.initializers
    kept_inits = [t for t in proto.graph.initializer if t.name in read]
    kept_inits += [onnx.numpy_helper.from_array(v, name) for name, v in shapes.items() if name in read]
    inputs = [i for i in proto.graph.input if i.name in read and i.name not in produced
              and not any(t.name == i.name for t in kept_inits)]
    sub_feeds = {}
    for i in inputs:
        if i.name in feeds:
            sub_feeds[i.name] = feeds[i.name]
        elif i.name in inits and inits[i.name].const_value is not None:  # a table or mask kept out of the proto
            sub_feeds[i.name] = inits[i.name].const_value.numpy()
    if not light:
        return dict(shapes)
    graph = onnx.helper.make_graph(nodes, "prunec_probe", inputs, [onnx.ValueInfoProto(name=n) for n in light],
                                   kept_inits)
    sub = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    sub.functions.extend(proto.functions)
    sess = make_session(sub, quick=True)
    return {**shapes, **dict(zip(light, sess.run(light, sub_feeds)))}


def from_onnx(model: ir.Model, probe: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> Graph:
    """Uniform graph over an onnx-ir model; ``probe`` maps value names to concrete arrays."""
    values: dict[int, Value] = {}
    unprobed: list[Value] = []  # known by shape only, not weights: run when a pass needs them
    weights = weight_names(model)  # never read here: their shape and type say all the analysis needs

    def wrap(v: ir.Value | None) -> Value | None:
        if v is None:
            return None
        key = id(v)
        if key not in values:
            const = v.const_value
            if const is not None and v.name in weights:
                arr = np.lib.stride_tricks.as_strided(np.zeros(1, const.dtype.numpy()), tuple(const.shape.numpy()),
                                                      [0] * len(const.shape))
            elif const is not None:
                arr = const.numpy()
            else:
                arr = probe.get(v.name, feeds.get(v.name))
            shape = tuple(int(s) for s in arr.shape) if arr is not None else None
            dtype = str(arr.dtype) if arr is not None else (v.dtype.name.lower() if v.dtype else "unknown")
            val = Value(v.name, shape, dtype, is_param=v.is_initializer(), is_input=v.is_graph_input(), ref=v)
            if arr is not None:
                if arr.size > 1 and not any(arr.strides):  # a shape-only placeholder: no facts about its values
                    if const is None:
                        unprobed.append(val)
                elif const is not None and not np.issubdtype(arr.dtype, np.floating):
                    val.data = arr
                    if arr.ndim >= 2 and arr.shape[-1] == arr.shape[-2]:
                        record_value_facts(val, arr)  # a constant boolean mask: whether it is causal
                elif arr.ndim == 0 or arr.size <= 64 or (arr.ndim >= 2 and arr.shape[-1] == arr.shape[-2]):
                    record_value_facts(val, arr)
            values[key] = val
        return values[key]

    nodes = []
    for i, n in enumerate(model.graph):
        op, attrs = _normalize(n)
        if op == "sdpa" and attrs.get("mask_index") is not None:
            attrs["mask"] = wrap(n.inputs[attrs["mask_index"]])
        for key, j in attrs.get("named_inputs", {}).items():  # contrib attention ops' optional inputs
            attrs[key] = wrap(n.inputs[j])
        name = n.name or f"{n.op_type}_{i}"
        nodes.append(Node(name, op, [wrap(x) for x in n.inputs], [wrap(x) for x in n.outputs], attrs, ref=n))
    graph = Graph("onnx", nodes, [wrap(v) for v in model.graph.inputs], [wrap(v) for v in model.graph.outputs])
    graph.unprobed = {v.name for v in unprobed}
    graph.evaluate = lambda names: run_values(model, feeds, names)
    return graph


def truncated(model: ir.Model, outputs: list[str]) -> ir.Model:
    """A copy of ``model`` (weights shared) whose outputs are the values ``outputs``: the nodes and
    weights after them dropped, the inputs kept (so the same feeds run it)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    out = model.clone()
    values = {o.name: o for node in out.graph for o in node.outputs if o.name in outputs}
    out.graph.outputs.clear()
    out.graph.outputs.extend(values[n] for n in outputs)
    RemoveUnusedNodesPass()(out)
    return out


def run_values(model: ir.Model, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The values ``names`` of ``model`` at ``feeds``: one ORT run of the nodes they need."""
    from .session import make_session

    return dict(zip(names, make_session(truncated(model, names), quick=True).run(names, feeds)))


def unfuse_skip_norms(model: ir.Model) -> None:
    """Split every ORT ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` whose sum
    output (output 3: input + skip [+ bias], [B, N, C]) is read — a pre-norm residual stream —
    into ``Add`` (+ ``Add`` bias) and ``LayerNormalization`` (or RMS norm in standard ops), so the
    stream and the normalized branch are separate tensors (ORT fuses them back when it builds a
    session). Before opset 17 the norm is written in standard ops (no LayerNormalization), and so
    is every plain LayerNormalization (:func:`standard_layer_norms`)."""
    standard_layer_norms(model)
    graph = model.graph
    opset = graph.opset_imports.get("", 0)
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type not in ("SkipLayerNormalization",
                                                                    "SkipSimplifiedLayerNormalization"):
            continue
        outs = list(node.outputs)
        if len(outs) < 4 or not (outs[3].uses() or outs[3].is_graph_output()):
            continue
        if any(o.uses() or o.is_graph_output() for o in outs[1:3]):
            continue
        simplified = node.op_type == "SkipSimplifiedLayerNormalization"
        ins = list(node.inputs) + [None] * 5
        eps = node.attributes.get("epsilon")
        attrs = {"axis": -1, "epsilon": float(eps.value) if eps is not None else 1e-12}  # the Skip ops' default
        new = [ir.Node("", "Add", [ins[0], ins[1]], name=f"{node.name}/add")]
        bias = ins[4] if simplified is False else ins[3]
        if bias is not None:
            new.append(ir.Node("", "Add", [new[-1].outputs[0], bias], name=f"{node.name}/add_bias"))
        total = new[-1].outputs[0]
        if simplified or opset < 17:  # SimplifiedLayerNormalization is not an ONNX op; LayerNormalization from 17
            new += norm_in_standard_ops(graph, node.name, total, ins[2], None if simplified else ins[3],
                                        attrs["epsilon"], simplified, opset)
            norm = new.pop()
        else:
            norm_ins = [total, ins[2]] + ([ins[3]] if ins[3] is not None else [])
            norm = ir.Node("", "LayerNormalization", norm_ins, attributes=[
                ir.convenience.convert_attribute(k, v) for k, v in attrs.items()], name=f"{node.name}/norm")
        new.append(norm)
        for n in new[:-1]:
            n.outputs[0].name = n.name
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, [outs[0], outs[3]],
                                                [norm.outputs[0], total])


def norm_in_standard_ops(graph: ir.Graph, name: str, x: ir.Value, gamma: ir.Value, beta: ir.Value | None,
                         eps: float, rms: bool, opset: int) -> list[ir.Node]:
    """Nodes computing a LayerNorm over the last axis of x [..., C] in standard ops, (x - mean) /
    sqrt(var + eps) · gamma (+ beta); with ``rms`` ORT's simplified (RMS) norm, x / sqrt(mean(x²) +
    eps) · gamma. The last node's output is the norm."""
    dtype = gamma.dtype.numpy() if gamma.dtype is not None else np.dtype(np.float32)
    axes = ir.Value(name=f"{name}/axes", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array([-1], np.int64), name=f"{name}/axes"))
    eps_v = ir.Value(name=f"{name}/eps", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                     const_value=ir.tensor(np.array(eps, dtype), name=f"{name}/eps"))
    if opset >= 18:
        graph.register_initializer(axes)
    graph.register_initializer(eps_v)

    def mean_of(v, what):  # v [..., C] -> its mean over C [..., 1]
        if opset >= 18:
            return ir.Node("", "ReduceMean", [v, axes], attributes=[ir.convenience.convert_attribute("keepdims", 1)],
                           name=f"{name}/{what}")
        return ir.Node("", "ReduceMean", [v], attributes=[ir.convenience.convert_attribute("axes", [-1]),
                       ir.convenience.convert_attribute("keepdims", 1)], name=f"{name}/{what}")
    new = []
    if not rms:
        new.append(mean_of(x, "mean_x"))
        new.append(ir.Node("", "Sub", [x, new[-1].outputs[0]], name=f"{name}/centred"))
        x = new[-1].outputs[0]
    new.append(ir.Node("", "Mul", [x, x], name=f"{name}/square"))
    new.append(mean_of(new[-1].outputs[0], "mean"))
    new.append(ir.Node("", "Add", [new[-1].outputs[0], eps_v], name=f"{name}/add_eps"))
    new.append(ir.Node("", "Sqrt", [new[-1].outputs[0]], name=f"{name}/rms"))
    new.append(ir.Node("", "Div", [x, new[-1].outputs[0]], name=f"{name}/scaled"))
    new.append(ir.Node("", "Mul", [new[-1].outputs[0], gamma], name=f"{name}/norm"))
    if beta is not None:
        new.append(ir.Node("", "Add", [new[-1].outputs[0], beta], name=f"{name}/norm_bias"))
    return new


def standard_layer_norms(model: ir.Model) -> None:
    """Below opset 17 (where ONNX has no LayerNormalization), write each ``LayerNormalization`` over
    the last axis that ORT's optimizer put into the graph (ORT runs it; onnx.checker rejects it) in
    standard ops, so the rewritten model is valid ONNX; ORT fuses it back when it builds a session."""
    graph = model.graph
    opset = graph.opset_imports.get("", 0)
    if opset >= 17:
        return
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type != "LayerNormalization" or len(node.inputs) < 2:
            continue
        x = node.inputs[0]
        axis = node.attributes.get("axis")
        axis = -1 if axis is None else axis.value
        if not (axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)):
            continue
        if any(o.uses() or o.is_graph_output() for o in list(node.outputs)[1:]):
            continue
        eps = node.attributes.get("epsilon")
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        new = norm_in_standard_ops(graph, node.name, x, node.inputs[1], beta,
                                   float(eps.value) if eps is not None else 1e-5, False, opset)
        for n in new[:-1]:
            n.outputs[0].name = n.name
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]])
