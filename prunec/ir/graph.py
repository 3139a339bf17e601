"""The uniform graph view prunec analyses, whichever frontend made it.

A :class:`Graph` holds :class:`Node` s in topological order with a normalized op
vocabulary and :class:`Value` s with concrete shapes (read off the frontend or off a
probe run on example inputs).  Frontends (``from_fx``, ``from_onnx``) build it;
``ref`` fields point back to the frontend objects so backends can rewrite them.

Normalized ops: ``elementwise``, ``matmul``, ``linear``, ``gemm``, ``softmax``,
``layernorm``, ``transpose`` (attrs ``perm``), ``reshape``, ``expand``, ``concat``
(``axis``), ``split`` (``axis``, several outputs), ``getitem`` (``index``),
``select`` (``axis``: removes the axis), ``gather`` (``axis``), ``slice``
(``axis``), ``reduce`` (``axes``, ``keepdims``), ``sdpa`` (fused attention),
``embedding``, ``create`` (a new tensor from a size list), ``range``, ``shape``,
``constant``; anything else is ``unknown:<name>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np


@dataclass(eq=False)
class Value:
    name: str
    shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    producer: "Node | None" = None
    uses: list = field(default_factory=list)  # [(Node, input_index)]
    data: np.ndarray | None = None  # known content (constants, small int probe values)
    is_param: bool = False
    is_input: bool = False
    facts: dict = field(default_factory=dict)  # probe facts, e.g. {"causal": True}
    ref: Any = None
    sym: Any = None  # fx with dynamic dims: symbolic sizes (sympy or int per axis) / a SymInt's expression

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    def __repr__(self) -> str:
        return f"Value({self.name}, {self.shape}, {self.dtype})"


@dataclass(eq=False)
class Node:
    name: str
    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict = field(default_factory=dict)
    ref: Any = None
    index: int = 0  # position in topological order

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"


def _reach(adjacency, starts: list) -> set:
    """``starts`` and every node reachable from them in ``adjacency`` (node -> its neighbours): one
    walk from all of them (what ``nx.descendants`` of each, united, gives, without a walk per start)."""
    seen: set = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(adjacency[node])
    return seen


class Graph:
    """Nodes in topological order plus a networkx view for graph algorithms."""

    def __init__(self, frontend: str, nodes: list[Node], inputs: list[Value], outputs: list[Value]):
        self.frontend = frontend
        self.nodes = nodes
        self.inputs = inputs
        self.outputs = outputs
        for i, node in enumerate(nodes):
            node.index = i
            for j, v in enumerate(node.inputs):
                if v is not None:
                    v.uses.append((node, j))
            for v in node.outputs:
                v.producer = node
        self._nx: nx.DiGraph | None = None
        self._adjacencies: dict[str, dict] = {}
        self.dynamic_tokens = False  # the token count follows the input's length at run time
        self.cache_inputs: list[str] = []  # a decoder's KV-cache inputs (analysed empty: a prefill)
        self.decode_shapes: dict[str, tuple] = {}  # name -> (shape, small int value or None) with a non-empty cache
        # values the probe knew by shape only (their content not run), and how to run them when a pass
        # needs it: names -> {name: array} (set by a frontend whose probe leaves such values)
        self.unprobed: set[str] = set()
        self.evaluate = None

    def probe_facts(self, v: Value) -> dict:
        """``v.facts``, after running the model up to ``v`` where the probe knew it by shape only
        (attention probabilities the weights feed: whether they are finite, causal)."""
        if v.name in self.unprobed and self.evaluate is not None:
            self.unprobed.discard(v.name)
            record_value_facts(v, self.evaluate([v.name])[v.name])
        return v.facts

    def nx(self) -> nx.DiGraph:
        """Directed graph over nodes (edges follow data flow)."""
        if self._nx is None:
            g = nx.DiGraph()
            g.add_nodes_from(self.nodes)
            for node in self.nodes:
                for v in node.inputs:
                    if v is not None and v.producer is not None:
                        g.add_edge(v.producer, node)
            self._nx = g
        return self._nx

    def consumers_closure(self, value: Value) -> set[Node]:
        """Every node that (transitively) consumes ``value``."""
        return _reach(self._adjacency("succ"), [node for node, _ in value.uses])

    def ancestors_of(self, value: Value) -> set[Node]:
        """``value``'s producer and every node it (transitively) reads from."""
        return _reach(self._adjacency("pred"), [value.producer] if value.producer is not None else [])

    def _adjacency(self, direction: str) -> dict:
        """{node: its consumers} (``succ``) or {node: the nodes it reads} (``pred``), as plain lists (a
        walk over them is several times faster than over networkx's views)."""
        if direction not in self._adjacencies:
            g = self.nx() if direction == "succ" else self.nx().reverse(copy=False)
            self._adjacencies[direction] = nx.to_dict_of_lists(g)
        return self._adjacencies[direction]

    def values(self) -> list[Value]:
        seen: dict[int, Value] = {}
        for v in self.inputs:
            seen[id(v)] = v
        for node in self.nodes:
            for v in list(node.inputs) + list(node.outputs):
                if v is not None:
                    seen.setdefault(id(v), v)
        return list(seen.values())


def record_value_facts(v: Value, arr: np.ndarray) -> None:
    """Facts the analysis needs about a concrete array (any frontend): the content of small
    integer tensors, whether a square [.., N, N] float tensor is finite, and whether it masks
    its upper triangle (causal).
    Probabilities mask with 0, additive masks with -inf (or < -1e30), boolean masks with False."""
    if arr.dtype.kind in "iu" and arr.size <= 64:
        v.data = np.array(arr)
        return
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 2:
        return
    if arr.dtype.kind == "f":
        v.facts["finite"] = bool(np.isfinite(arr).all())  # attention probabilities: NaN/inf = unusable scores
    n = arr.shape[-1]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    if arr.dtype == np.bool_:
        masked = ~arr
    elif arr.dtype.kind == "f":
        if (arr >= 0).all() and (arr <= 1).all() and not (arr == 0).all():
            masked = arr == 0
        else:
            # "minus infinity" of the type: -1e30 and below, or half of fp16's lowest (-65504 masks)
            low = -1e30 if arr.dtype.itemsize >= 4 else float(np.finfo(arr.dtype).min) / 2
            masked = (arr.astype(np.float32) < low) | np.isinf(arr)
    else:
        return
    v.facts["causal"] = bool(masked[..., upper].all()) and not bool(masked[..., ~upper].all())
