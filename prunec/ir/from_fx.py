"""Build a :class:`~prunec.ir.graph.Graph` from a torch.export / fx GraphModule.

Shapes come from each node's ``meta['val']`` (static export).  A probe run
(:func:`probe_fx`) adds facts that need values: small integer tensors and whether a
square score/probability tensor is causal (upper triangle masked).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .graph import Graph, Node, Value, record_value_facts

aten = torch.ops.aten

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "where", "pow", "gelu", "erf", "relu", "silu", "sigmoid", "tanh",
    "exp", "neg", "sqrt", "rsqrt", "clone", "contiguous", "dropout", "_to_copy", "to", "type_as",
    "alias", "detach", "masked_fill", "lift_fresh_copy", "reciprocal", "abs", "log", "maximum",
    "minimum", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and",
    "logical_or", "bitwise_not", "bitwise_and", "bitwise_or", "cos", "sin", "hardtanh", "quick_gelu",
    "native_dropout", "_assert_tensor_metadata", "fill", "zeros_like", "ones_like", "full_like",
    "bitwise_xor", "sign", "floor", "ceil", "round", "isnan", "logical_xor", "scalar_tensor",
}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as"}
_CREATE = {"new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "full", "empty"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "prod", "var", "std", "any", "all"}


_SDPA = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable",
}


def _sdpa_attrs(fx_node: torch.fx.Node) -> dict:
    """Mask, causal flag and scale of an sdpa call, read by name off the op's schema (the
    private ``_scaled_dot_product_*`` variants place them differently: the flash ones take no
    mask or take it keyword-only, efficient/cudnn call it ``attn_bias`` before a
    ``compute_log_sumexp`` flag). ``mask_arg``: the mask's argument position (int), its
    keyword (str), or None when the op takes no mask; ``tuple_output``: the op returns
    (output, logsumexp, ...)."""
    schema = getattr(fx_node.target, "_schema", None)
    bound, mask_arg = {}, None
    if schema is None:  # torch.nn.functional.scaled_dot_product_attention in a non-aten graph
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        bound = dict(zip(names, fx_node.args)) | dict(fx_node.kwargs)
        mask_arg = 3 if len(fx_node.args) > 3 else "attn_mask"
        returns = 1
    else:
        for i, a in enumerate(schema.arguments):
            if not a.kwarg_only and i < len(fx_node.args):
                bound[a.name] = fx_node.args[i]
            elif a.name in fx_node.kwargs:
                bound[a.name] = fx_node.kwargs[a.name]
            if a.name in ("attn_mask", "attn_bias"):
                mask_arg = a.name if a.kwarg_only or i >= len(fx_node.args) else i
        returns = len(schema.returns)
    mask = bound.get("attn_mask", bound.get("attn_bias"))
    return {
        "is_causal": bool(bound.get("is_causal", False)),
        "scale": bound.get("scale"),
        "enable_gqa": bool(bound.get("enable_gqa", False)),
        "mask_node": mask if isinstance(mask, torch.fx.Node) else None,
        "mask_arg": mask_arg,
        "takes_mask": mask_arg is not None,
        "tuple_output": returns > 1,
    }


def _base_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name.split(".")[0]


def _meta_shape(fx_node):
    val = fx_node.meta.get("val") if isinstance(fx_node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), str(val.dtype).replace("torch.", "")
    if isinstance(val, (tuple, list)):
        return None, "tuple"
    return None, "scalar"


def _normalize(name: str, fx_node: torch.fx.Node, out_rank: int | None) -> tuple[str, dict]:
    args = fx_node.args
    kw = fx_node.kwargs

    def dim(i, default=0):
        d = args[i] if len(args) > i else kw.get("dim", default)
        return d

    if name in _ELEMENTWISE:
        return "elementwise", {"name": name}
    if name in ("matmul", "bmm", "mm"):
        return "matmul", {}
    if name == "linear":
        return "linear", {}
    if name == "addmm":
        return "addmm", {}
    if name in ("softmax", "_softmax", "_safe_softmax", "log_softmax"):
        return "softmax", {"axis": dim(1, -1)}
    if name in ("layer_norm", "native_layer_norm", "rms_norm"):
        return "layernorm", {}
    if name == "transpose":
        rank = out_rank
        d0, d1 = args[1] % rank, args[2] % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return "transpose", {"perm": perm}
    if name == "permute":
        return "transpose", {"perm": [d % out_rank for d in args[1]]}
    if name == "t":
        return "transpose", {"perm": [1, 0]}
    if name in _RESHAPE:
        return "reshape", {"size": args[1] if len(args) > 1 and name in ("view", "reshape", "_unsafe_view") else None}
    if name == "expand":
        return "expand", {"size": args[1]}
    if name == "cat":
        return "concat", {"axis": dim(1, 0)}
    if name in ("split", "split_with_sizes", "unbind", "chunk", "tensor_split"):
        return "split", {"axis": dim(2, 0) if name != "unbind" else dim(1, 0), "unbind": name == "unbind"}
    if name == "getitem":
        return "getitem", {"index": args[1]}
    if name == "select":
        return "select", {"axis": args[1], "index": args[2]}
    if name == "slice":
        return "slice", {"axis": dim(1, 0)}
    if name in _REDUCE and out_rank is not None:
        return "reduce", {}
    if name in _SDPA:
        return "sdpa", _sdpa_attrs(fx_node)
    if name == "embedding":
        return "embedding", {}
    if name in _CREATE:
        return "create", {"size": args[1] if name.startswith("new_") else args[0]}
    if name == "arange":
        return "range", {}
    if name in ("sym_size",):
        return "shape", {}
    if name in ("index_select", "gather", "index", "take_along_dim"):
        return "gather_tensor", {"name": name}
    return f"unknown:{name}", {}


def from_fx(gm: torch.fx.GraphModule) -> Graph:
    """Build the uniform graph from an fx GraphModule produced by torch.export."""
    values: dict[torch.fx.Node, Value] = {}
    inputs, nodes, outputs = [], [], []
    params = dict(gm.named_parameters(remove_duplicate=False))
    params.update(dict(gm.named_buffers(remove_duplicate=False)))
    for fx_node in gm.graph.nodes:
        if fx_node.op in ("placeholder", "get_attr"):
            shape, dtype = _meta_shape(fx_node)
            if shape is None and fx_node.op == "get_attr":
                t = params.get(fx_node.target)
                if t is None:
                    t = getattr(gm, fx_node.target, None)
                if isinstance(t, torch.Tensor):
                    shape, dtype = tuple(t.shape), str(t.dtype).replace("torch.", "")
            v = Value(fx_node.name, shape, dtype, is_input=fx_node.op == "placeholder",
                      is_param=fx_node.op == "get_attr", ref=fx_node)
            values[fx_node] = v
            if fx_node.op == "placeholder":
                inputs.append(v)
        elif fx_node.op == "call_function":
            shape, dtype = _meta_shape(fx_node)
            name = _base_name(fx_node.target)
            op, attrs = _normalize(name, fx_node, None if shape is None else len(shape))
            out = Value(fx_node.name, shape, dtype, ref=fx_node)
            values[fx_node] = out
            tensor_inputs = []
            for a in fx_node.all_input_nodes:
                tensor_inputs.append(values.get(a))
            attrs["args"] = fx_node.args
            node = Node(fx_node.name, op, tensor_inputs, [out], attrs, ref=fx_node)
            if op == "sdpa" and attrs.pop("mask_node") is not None:
                mask = fx_node.args[attrs["mask_arg"]] if isinstance(attrs["mask_arg"], int) else \
                    fx_node.kwargs[attrs["mask_arg"]]
                attrs["mask"] = values[mask]
            nodes.append(node)
        elif fx_node.op == "output":
            for a in fx_node.all_input_nodes:
                if a in values:
                    outputs.append(values[a])
    for node in nodes:  # a private sdpa variant returns (output, logsumexp, ...): its result is item 0
        if node.op == "sdpa" and node.attrs.get("tuple_output"):
            item = next((u for u in node.ref.users if u.target is operator.getitem and u.args[1] == 0), None)
            node.attrs["result"] = values.get(item)
    graph = Graph("fx", nodes, inputs, outputs)
    graph.gm = gm
    return graph


def probe_fx(graph: Graph, gm: torch.fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` once on ``args`` and record facts that need values."""
    by_ref = {v.ref: v for v in graph.values() if v.ref is not None}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            v = by_ref.get(n)
            if v is not None and isinstance(result, torch.Tensor) and result.dim() >= 0:
                small_int = not result.is_floating_point() and result.numel() <= 64 and result.dtype != torch.bool
                square = result.dim() >= 2 and result.shape[-1] == result.shape[-2]
                if small_int or square:
                    record_value_facts(v, result.detach().cpu().numpy())
            return result

    with torch.no_grad():
        Probe(gm).run(*args)
