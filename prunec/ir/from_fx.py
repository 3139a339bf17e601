"""Build a :class:`~prunec.ir.graph.Graph` from a torch.export / fx GraphModule.

Shapes come from each node's ``meta['val']``.  A probe run (:func:`probe_fx`) adds facts
that need values: small integer tensors and whether a square score/probability tensor is
causal (upper triangle masked).

Dynamic dims (``torch.export.Dim``): ``meta['val']`` then holds SymInts. Analysis runs on
concrete sizes (each symbol at the size the example inputs give it), while every Value keeps
its symbolic sizes in ``Value.sym`` and every node the graph values of the SymInts it reads
(``attrs["size_values"]`` for the entries of a view/reshape/expand/creation size,
``attrs["sym_reads"]`` for any other SymInt argument), so that a cut can tell the token count
N from a number that happens to equal it and rewrite what spells N (see
:func:`dynamic_dims`: a dynamic batch, axis 0, and sequence, axis 1 of [B, S] / [B, S, C]
inputs, are the dims prunec handles).
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx

from ..errors import PruneError
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


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def sym_expr(x):
    """The sympy expression of a SymInt/SymFloat/SymBool, an int as it is, else None."""
    if isinstance(x, _SYMBOLIC):
        return x.node.expr
    return x if isinstance(x, int) else None


def dynamic_dims(gm: torch.fx.GraphModule) -> list[tuple[str, int, object, str]]:
    """(input name, axis, sympy symbol, kind) of every symbolic dimension of the graph's inputs,
    kind "batch" (axis 0) or "sequence" (axis 1 of a rank-2 or rank-3 input, as the ONNX
    frontend reads a dynamic sequence). A decoder with a KV cache (rank-4 inputs named ``*past*``
    with a dynamic axis 2: [B, kv_heads, past, head_dim]) adds kind "past" there and "total" for an axis 1 of
    its own symbol on a rank-2 input named ``*mask*`` (the attention mask [B, past + S]). Any other
    symbolic dimension, or one that is an expression rather than a symbol, is refused in one line
    naming the input."""
    out = []
    placeholders = [(n, n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    cached = any(_cache_input(n.name, v) for n, v in placeholders)
    seq = {v.shape[1].node.expr for n, v in placeholders if isinstance(v, torch.Tensor) and v.dim() in (2, 3)
           and _is_symbol(v.shape[1]) and "mask" not in n.name}
    for n, val in placeholders:
        if not isinstance(val, torch.Tensor):
            continue
        for axis, d in enumerate(val.shape):
            if not isinstance(d, torch.SymInt):
                continue
            expr = d.node.expr
            if expr.is_number:
                continue
            if axis == 0:
                kind = "batch"
            elif axis == 2 and _cache_input(n.name, val):
                kind = "past"
            elif cached and axis == 1 and val.dim() == 2 and "mask" in n.name and expr not in seq:
                kind = "total"
            elif axis == 1 and val.dim() in (2, 3):
                kind = "sequence"
            else:
                raise PruneError(f"input '{n.name}' has a dynamic dimension '{expr}' at axis {axis} (shape "
                                 f"{list(val.shape)}): prunec handles a dynamic batch (axis 0) and sequence (axis 1 "
                                 f"of [B, S] / [B, S, C] inputs) only, and a KV cache's length (axis 2 of "
                                 f"[B, heads, past, D]); give that dimension no Dim")
            if not expr.is_Symbol:
                raise PruneError(f"input '{n.name}' has the dimension '{expr}' at axis {axis}, an expression of "
                                 f"other dims; give it a Dim of its own or none")
            out.append((n.name, axis, expr, kind))
    kinds = {}
    for name, axis, sym, kind in out:
        if kinds.setdefault(sym, kind) != kind:
            raise PruneError(f"input '{name}' uses the dynamic dimension '{sym}' both as a {kinds[sym]} and as a "
                             f"{kind} length; give them separate Dims")
    return out


def _cache_input(name: str, val) -> bool:
    """A KV-cache input: named ``*past*``, [B, kv_heads, past, head_dim] with a dynamic past."""
    return "past" in name and isinstance(val, torch.Tensor) and val.dim() == 4 and _is_symbol(val.shape[2])


def _is_symbol(d) -> bool:
    return isinstance(d, torch.SymInt) and d.node.expr.is_Symbol


def sym_env(gm: torch.fx.GraphModule, args) -> dict:
    """{sympy symbol: its size in ``args``} (the flat inputs, in placeholder order): the concrete
    sizes analysis runs at."""
    env = {}
    if args is None:
        return env
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, a in zip(placeholders, args):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(a, torch.Tensor) and val.dim() == a.dim():
            for d, size in zip(val.shape, a.shape):
                if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                    env[d.node.expr] = sympy.Integer(int(size))
    return env


def _concrete(d, env: dict, where: str) -> int:
    """A size as a number: an int as it is, a SymInt at the example inputs' sizes."""
    if not isinstance(d, torch.SymInt):
        return int(d)
    expr = d.node.expr
    if isinstance(expr, int):
        return expr
    value = expr.xreplace(env) if env else expr
    if value.is_number:
        return int(value)
    hint = d.node.hint
    if hint is None:
        raise PruneError(f"'{where}' has a size '{expr}' prunec cannot evaluate at the example inputs")
    return int(hint)


def _meta_shape(fx_node, env: dict | None = None):
    val = fx_node.meta.get("val") if isinstance(fx_node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(_concrete(s, env or {}, fx_node.name) for s in val.shape), str(val.dtype).replace("torch.", "")
    if isinstance(val, (tuple, list)):
        return None, "tuple"
    return None, "scalar"


def _sym_shape(fx_node):
    """The symbolic sizes of a node's tensor value (sympy expressions or ints), its expression for
    a SymInt value, or None when nothing about it is symbolic."""
    val = fx_node.meta.get("val")
    if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
        return tuple(sym_expr(d) for d in val.shape)
    if isinstance(val, _SYMBOLIC):
        return val.node.expr
    return None


def _sym_args(fx_node: torch.fx.Node, size) -> list[torch.fx.Node]:
    """The nodes producing a SymInt/SymFloat/SymBool that ``fx_node`` reads as arguments, except
    the entries of its size operand ``size``."""
    skip = {id(e) for e in size} if isinstance(size, (list, tuple)) else set()
    out = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            if id(a) not in skip and isinstance(a.meta.get("val"), _SYMBOLIC):
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, torch.fx.Node) and id(x) in skip:
                    continue
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
    visit(list(fx_node.args))
    visit(dict(fx_node.kwargs))
    return out


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


def from_fx(gm: torch.fx.GraphModule, args=None) -> Graph:
    """Build the uniform graph from an fx GraphModule produced by torch.export. ``args``: the flat
    example inputs; with dynamic dims, every size is evaluated at theirs."""
    values: dict[torch.fx.Node, Value] = {}
    inputs, nodes, outputs = [], [], []
    params = dict(gm.named_parameters(remove_duplicate=False))
    params.update(dict(gm.named_buffers(remove_duplicate=False)))
    dims = dynamic_dims(gm)
    env = sym_env(gm, args)
    for fx_node in gm.graph.nodes:
        if fx_node.op in ("placeholder", "get_attr"):
            shape, dtype = _meta_shape(fx_node, env)
            if shape is None and fx_node.op == "get_attr":
                t = params.get(fx_node.target)
                if t is None:
                    t = getattr(gm, fx_node.target, None)
                if isinstance(t, torch.Tensor):
                    shape, dtype = tuple(t.shape), str(t.dtype).replace("torch.", "")
            v = Value(fx_node.name, shape, dtype, is_input=fx_node.op == "placeholder",
                      is_param=fx_node.op == "get_attr", ref=fx_node, sym=_sym_shape(fx_node) if dims else None)
            values[fx_node] = v
            if fx_node.op == "placeholder":
                inputs.append(v)
        elif fx_node.op == "call_function":
            shape, dtype = _meta_shape(fx_node, env)
            name = _base_name(fx_node.target)
            if isinstance(fx_node.meta.get("val"), _SYMBOLIC) and name not in ("sym_size",):
                op, attrs = f"unknown:sym_{name}", {}  # arithmetic on sizes, not a tensor op
            else:
                op, attrs = _normalize(name, fx_node, None if shape is None else len(shape))
            out = Value(fx_node.name, shape, dtype, ref=fx_node, sym=_sym_shape(fx_node) if dims else None)
            values[fx_node] = out
            tensor_inputs = []
            for a in fx_node.all_input_nodes:
                tensor_inputs.append(values.get(a))
            attrs["args"] = fx_node.args
            if dims:  # the SymInts it reads: a cut rewrites (size entries) or refuses (others) those spelling N
                size = attrs.get("size")
                if isinstance(size, (list, tuple)) and any(isinstance(e, torch.fx.Node) for e in size):
                    attrs["size_values"] = [values.get(e) if isinstance(e, torch.fx.Node) else None for e in size]
                attrs["sym_reads"] = [values[a] for a in _sym_args(fx_node, size) if a in values]
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
    graph.dynamic_tokens = any(kind == "sequence" for *_, kind in dims)  # counts follow N at run time
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
