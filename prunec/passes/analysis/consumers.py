"""Consumers that need every token after the encoder: graph outputs with a token axis,
reshapes of the token axis onto a grid (N -> H×W), and token-mixing ops (a matmul or linear
that contracts over the tokens). Attention inside the blocks mixes tokens too; only nodes
after the last attention site are considered."""
from __future__ import annotations

from dataclasses import dataclass

from ...ir.graph import Node, Value


@dataclass
class Consumer:
    kind: str  # "token output" | "grid reshape" | "token mixing"
    name: str  # the node (or output) name
    value: Value  # the token tensor it reads

    @property
    def needs_recovery(self) -> bool:
        """A token output can stay reduced (the model then returns fewer tokens); the others
        break on fewer tokens."""
        return self.kind != "token output"

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' reads {list(self.value.shape)}"


def full_token_consumers(facts) -> list[Consumer]:
    g = facts.graph
    layer = facts.depth - 1
    tail = g.consumers_closure(facts.sites[-1].output)
    out: list[Consumer] = []
    for v in g.outputs:
        if v.producer is not None and v.producer in tail and facts.token_axes(v, layer):
            out.append(Consumer("token output", v.name, v))
    sliced: list = []  # (value, axis): a slice of the tokens (the patch tokens without CLS) and its axis class

    def axes_of(v):
        if v is None:
            return []
        axes = facts.token_axes(v, layer)
        for anchor in sliced:  # the slice's axis class follows transposes and elementwise ops
            axes = axes or facts.axes.axes_in_class(v, anchor)
        return axes

    for node in sorted(tail, key=lambda n: n.index):
        x = next((v for v in node.inputs if axes_of(v)), None)
        if x is None:
            continue
        axes = axes_of(x)
        if node.op == "slice" and node.outputs and node.outputs[0].shape is not None:
            y = node.outputs[0]
            if not axes_of(y) and len(y.shape) == len(x.shape):
                j = next((a for a in axes if y.shape[a] != x.shape[a]), None)
                if j is not None:
                    sliced.append((y, j))
            continue
        kind = _kind(facts, node, x, axes, layer)
        if kind is not None:
            out.append(Consumer(kind, node.name, x))
    return out


def _kind(facts, node: Node, x: Value, axes: list[int], layer: int) -> str | None:
    y = node.outputs[0] if node.outputs else None
    if y is None or y.shape is None or x.shape is None:
        return None
    if node.op == "reshape" and not facts.token_axes(y, layer):
        n = x.shape[axes[0]]
        dims = list(y.shape)
        if any(dims[i] * dims[i + 1] == n and dims[i] > 1 and dims[i + 1] > 1 for i in range(len(dims) - 1)):
            return "grid reshape"
    if node.op in ("matmul", "linear", "gemm") and axes and axes[-1] == len(x.shape) - 1 and node.inputs[0] is x:
        w = node.inputs[1]
        if w is not None and w.is_param:
            return "token mixing"
    return None
