"""Find attention sites in every spelling prunec knows.

* fused: torch ``scaled_dot_product_attention`` (fx/aten), ONNX ``Attention``
  (opset 23), ORT ``com.microsoft.MultiHeadAttention`` (its bias, key padding mask,
  attention bias and ``unidirectional`` are node attrs ``qkv_bias``, ``key_mask``,
  ``attention_bias``, ``is_causal``).
* packed: ORT ``com.microsoft.Attention`` (one QKV weight [C, 3C] and bias [3C]; the
  backends project q and k from its input ``inp`` [B, N, C]).
* ORT ``GroupQueryAttention`` (causal, grouped k/v; ``seqlens_k`` lengths) is fused; positions
  come from ``RotaryEmbedding`` ops before it (their ``position_ids`` follow the tokens).
* refused, naming the node: ORT attention ops with a KV cache (``past`` inputs),
  GroupQueryAttention with in-op rotary / local window / softcap (implicit positions) and the
  ops prunec cannot score or cut (the packed-token / paged / sparse variants).
* eager: ``q @ kᵀ -> [scale Mul/Div] -> [mask Add/Where] -> [Cast] -> softmax ->
  [Cast/Dropout/Where] -> @ v``, in fx or ONNX; quantized graphs add Q/DQ pairs
  (``QuantizeLinear -> DequantizeLinear``) anywhere on that chain, and integer matmuls
  (``MatMulInteger``, ``DynamicQuantizeMatMul``) count as matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import PruneError
from ...ir.graph import Graph, Node, Value

_PASS_THROUGH = {"elementwise"}


@dataclass(eq=False)
class AttentionSite:
    """One attention computation.

    q: [B, H, N, D] (or [B, N, H*D] for 3-D fused forms); k: [B, Hkv, N, D];
    k_t: kᵀ as fed to the logits matmul ([B, H, D, N]) for eager sites;
    v: [B, Hkv, N, Dv]; probs: [B, H, N, N] when materialized (eager); output: the
    attention output; mask: additive/boolean mask or None; causal: bool.
    """

    kind: str  # "fused" | "eager" | "packed"
    node: Node  # the sdpa/Attention node, or the softmax node for eager
    q: Value | None
    k: Value | None
    v: Value | None
    output: Value
    probs: Value | None = None
    k_t: Value | None = None
    logits: Value | None = None
    mask: Value | None = None
    causal: bool = False
    heads: int | None = None
    scale: float | None = None
    layer: int = -1
    inp: Value | None = None  # packed sites: the input [B, N, C] the QKV projection reads

    def describe(self) -> str:
        return f"{self.kind} @ {self.node.name}"



def _walk_back_to_matmul(v: Value, mask_holder: list) -> Node | None:
    for _ in range(12):  # room for a Q/DQ pair after each op of a quantized graph
        p = v.producer
        if p is None:
            return None
        if p.op == "matmul":
            return p
        if p.op not in _PASS_THROUGH:
            return None
        if p.attrs.get("quant"):  # QDQ: read through (De)QuantizeLinear to the float value
            v = p.inputs[0]
            continue
        # follow the operand that has the same shape as the output (the logits), note masks
        same = [x for x in p.inputs if x is not None and x.shape == v.shape and x.is_float and not x.is_param]
        others = [x for x in p.inputs if x is not None and x not in same and x.shape and len(x.shape) >= 2]
        if not same:
            same = [x for x in p.inputs if x is not None and x.shape and len(x.shape) == len(v.shape) and x.is_float]
            others = [x for x in p.inputs if x is not None and x not in same[:1] and x.shape and len(x.shape) >= 2]
        if not same:
            return None
        cand = same[0]
        if len(same) > 1:  # both operands full shape: the one that comes from a matmul chain is the logits
            for x in same:
                if x.producer is not None and x.producer.op in ("matmul", "elementwise"):
                    cand = x
                    others = [y for y in same if y is not x] + others
                    break
        mask_holder.extend(others)
        v = cand
    return None


def _walk_forward_to_matmul(v: Value) -> tuple[Node, Value] | None:
    """From the probabilities forward through casts / dropout / no-ops (fx ``to(dtype)``,
    ``dropout(p=0)``) to the ``@ v`` matmul; users whose output nobody reads (fx
    ``_assert_tensor_metadata`` checks) are skipped."""
    for _ in range(10):
        if not v.uses:
            return None
        for user, idx in v.uses:
            if user.op == "matmul" and idx == 0:
                return user, v
        live = [u for u, _ in v.uses if not (u.op in _PASS_THROUGH and not any(o.uses for o in u.outputs))]
        user = live[0] if len(live) == 1 else next((u for u in live if u.op in _PASS_THROUGH), None)
        if user is None or user.op not in _PASS_THROUGH:
            return None
        v = user.outputs[0]
    return None


def find_attention(graph: Graph) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        if node.op == "unsupported_attention":
            raise PruneError(f"node '{node.name}' ({node.ref.op_type if node.ref is not None else node.op}) is an "
                             f"ORT fused attention/rotary op prunec cannot score or cut through")
        if node.attrs.get("past_key") is not None or node.attrs.get("past_value") is not None:
            raise PruneError(f"attention node '{node.name}' reads past key/value state (a KV cache); "
                             f"prunec cannot cut tokens of a graph with a cache")
        if node.attrs.get("unsupported"):
            raise PruneError(f"attention node '{node.name}' (GroupQueryAttention) uses "
                             f"{', '.join(node.attrs['unsupported'])}, which depend on implicit token positions")
        if node.op == "sdpa":
            q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
            heads = node.attrs.get("q_num_heads") or (q.shape[1] if q.shape and len(q.shape) == 4 else None)
            mask = node.attrs.get("mask")
            causal = bool(node.attrs.get("is_causal")) or bool(mask is not None and mask.facts.get("causal"))
            if node.attrs.get("tuple_output") and node.attrs.get("result") is None:
                continue  # a private fx variant whose output tensor is never read
            output = node.attrs.get("result") or node.outputs[0]
            sites.append(AttentionSite("fused", node, q, k, v, output, mask=mask, causal=causal,
                                       heads=heads, scale=node.attrs.get("scale")))
        elif node.op == "packed_attention":
            sites.append(AttentionSite("packed", node, None, None, None, node.outputs[0],
                                       causal=bool(node.attrs.get("is_causal")), heads=node.attrs.get("num_heads"),
                                       scale=node.attrs.get("scale"), inp=node.inputs[0]))
        elif node.op == "softmax":
            logits = node.inputs[0]
            if logits.shape is None or len(logits.shape) < 3 or logits.shape[-1] != logits.shape[-2]:
                continue
            axis = node.attrs.get("axis", -1) % len(logits.shape)
            if axis != len(logits.shape) - 1:
                continue
            masks: list[Value] = []
            qk = _walk_back_to_matmul(logits, masks)
            fw = _walk_forward_to_matmul(node.outputs[0])
            if qk is None or fw is None:
                continue
            pv, probs_used = fw
            probs = node.outputs[0]
            mask = next((m for m in masks if not m.is_param), None)
            causal = probs.facts.get("causal")  # not probed (a light probe: the weights feed it): from the masks
            causal = bool(causal) if causal is not None else any(m.facts.get("causal") for m in masks)
            heads = probs.shape[-3] if len(probs.shape) == 4 else None
            sites.append(AttentionSite("eager", node, qk.inputs[0], None, pv.inputs[1], pv.outputs[0],
                                       probs=probs, k_t=qk.inputs[1], logits=logits, mask=mask,
                                       causal=causal, heads=heads))
    sites.sort(key=lambda s: s.output.producer.index)
    for i, s in enumerate(sites):
        s.layer = i
    return sites
