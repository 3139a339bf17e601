"""Blocks, the residual stream, prefix tokens and token-carrying side inputs.

``Facts`` gathers everything a rewrite pass reads: attention sites, the residual
stream tensor entering each layer ([B, N, C]), the token count N, the prefix
tokens (CLS / distillation / registers, read off the concat that builds the
sequence and off index reads of the final stream), the token and batch axis
classes, and whether the model is a causal decoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import PruneError
from ...ir.graph import Graph, Node, Value
from .attention import AttentionSite, find_attention
from .axes import AxisClasses


@dataclass
class Facts:
    graph: Graph
    sites: list[AttentionSite]
    streams: list[Value]  # residual stream entering layer i: [B, N, C]
    num_tokens: int
    prefix: int
    causal: bool
    axes: AxisClasses
    cls_first: bool = False  # token 0 is a CLS token: concatenated alone first, or read off the output
    side_inputs: list[Value] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.sites)

    def output_stream(self) -> Value:
        """The token tensor [B, N, C] leaving the encoder: the last one after the final block
        (e.g. after the final norm) before the tokens meet a head, a pooling or an output."""
        if "_output_stream" not in self.__dict__:
            last = self.streams[-1]
            tail = self.graph.consumers_closure(self.sites[-1].output)
            outs = [o for o in self.graph.outputs if o.producer in tail]
            best = None
            for node in sorted(tail, key=lambda n: n.index):
                for v in node.outputs:
                    if v.shape is None or v.shape != last.shape or self.token_axes(v, self.depth - 1) != [1]:
                        continue
                    below = self.graph.consumers_closure(v) | {node}
                    if all(o.producer in below for o in outs):  # every output comes from it
                        best = v
            if best is None:
                raise PruneError("cannot find the token tensor leaving the last block")
            self.__dict__["_output_stream"] = best
        return self.__dict__["_output_stream"]

    def stream_at(self, layer: int) -> Value:
        """The stream a cut at ``layer`` reduces: entering that layer, or leaving the encoder
        for ``layer == depth``."""
        return self.streams[layer] if layer < self.depth else self.output_stream()

    def mid_stream(self, layer: int) -> Value:
        """The stream between attention and MLP of block ``layer`` ([B, N, C]): the tensor the
        MLP's residual add skips over. Pre-norm blocks: ``x + attn(norm1(x))``; post-norm
        blocks (BERT): the norm after that add. Token merging (ToMe, EViT) cuts here."""
        cache = self.__dict__.setdefault("_mid_streams", {})
        if layer not in cache:
            cache[layer] = _mid_stream(self, layer)
        return cache[layer]

    def size_at(self, layer: int, shape: tuple, before=()) -> Value | None:
        """The token-size tensor [B, N, 1] live at a cut (left by an earlier merge and carried
        through later cuts: the latest value named ``*prunec_size`` of that shape whose producer
        is not in ``before``), or None before any merge."""
        best = None
        for v in self.graph.values():
            if (size_role(v) == SIZE_TAG and v.producer is not None and v.producer not in before
                    and v.shape is not None and tuple(v.shape) == tuple(shape)):
                if best is None or v.producer.index > best.producer.index:
                    best = v
        return best

    def block_output(self, layer: int) -> Value:
        """The residual stream leaving block ``layer`` [B, N, C]: the MLP's residual add, or for a
        post-norm block (BERT: the stream entering each layer is a norm's output) the norm after
        it. Unlike :meth:`output_stream` it comes before a pre-norm model's final norm."""
        mid = self.mid_stream(layer)
        below = self.graph.consumers_closure(mid)
        add = next(u for u, _ in mid.uses if _is_add(u) and any(
            x is not mid and x is not None and x.producer in below for x in _summands(u)))
        out = add.outputs[0]
        if add.op == "layernorm":  # a fused SkipLayerNormalization: the sum is not a tensor, its norm is
            return out
        entering = self.streams[layer].producer
        if entering is not None and _is_norm_output(self.streams[layer]) and len(out.uses) == 1:
            norm = out.uses[0][0]
            if norm.op == "layernorm":
                return norm.outputs[0]
        return out

    def recovery_point(self) -> Value | None:
        """Where an earlier cut restores the full token count (the token tensor its recovery
        reads), or None: later cuts must restore theirs at the same point."""
        for node in self.graph.nodes:
            if any(RECOVER_TAG in o.name for o in node.outputs) and node.inputs and node.inputs[0] is not None:
                v = node.inputs[0]
                if RECOVERED_TAG not in v.name:
                    return v
        return None

    def tokens(self, layer: int = 0) -> int:
        """Tokens entering ``layer`` (an earlier cut may have reduced them)."""
        return self.streams[layer].shape[1]

    def token_axes(self, v: Value, layer: int = 0) -> list[int]:
        """Axes of ``v`` carrying the tokens that enter ``layer``. Axes of another token count
        (before an earlier cut, say) are a different class: gathers stop propagation."""
        return self.axes.axes_in_class(v, (self.streams[layer], 1))

    def batch_axis(self, v: Value, consumers=(), layer: int = 0) -> int | None:
        """The batch axis of ``v``: in the batch class, or a leading size-1 axis that broadcasts
        against the batch axis of every consumer in ``consumers``."""
        anchor = (self.streams[layer], 0)
        if self.streams[layer].shape[0] > 1:
            axes = self.axes.axes_in_class(v, anchor)
            if axes:
                return axes[0]
        if not v.shape or len(v.shape) < 2 or v.shape[0] != 1:
            return None
        if self.streams[layer].shape[0] == 1:
            return 0
        if not consumers:
            return None
        for node in consumers:
            out = node.outputs[0]
            if node.op in ("sdpa", "packed_attention") and v is node.attrs.get("attention_bias"):
                continue  # ORT's attention_bias is [B or 1, H or 1, S, T]
            if node.op != "elementwise" or out.shape is None:
                return None
            j = len(out.shape) - len(v.shape)
            if j < 0 or j not in self.axes.axes_in_class(out, anchor):
                return None
        return 0


SIZE_TAG = "prunec_size"  # token sizes [B, N, 1] (how many input tokens each token stands for)
LOGSIZE_TAG = "prunec_logsize"  # log(size) as an attention-logit bias [B, 1, 1, N]
MEANW_TAG = "prunec_meanw"  # size / mean(size) [B, N, 1]: weights that make a token mean size-weighted
SIZE_DERIVED = (SIZE_TAG, LOGSIZE_TAG, MEANW_TAG)
REWEIGH_TAG = "prunec_reweigh"  # a token mean/sum input times size: rebuilt at every later cut
RECOVER_TAG = "prunec_recover"  # the node that reads the reduced tokens a recovery restores
RECOVERED_TAG = "prunec_recovered"  # a recovery's result [B, N, C]
BIAS_TAG = "prunec_bias"  # a fused attention's mask combined with log(size): rebuilt at every later cut


SKIP = "skip"  # a size weight of the tokens from index S on, for a sum/mean over x[:, S:]: "<role>skip<S>"


def skip_role(role: str, start: int) -> str:
    """The role of ``role``'s weights restricted to the tokens ``start:`` ([B, N - start, 1]; a
    MEANW one divides by the mean size of those tokens)."""
    return f"{role}{SKIP}{start}"


def split_role(role: str) -> tuple[str, int]:
    """(base role, first token) of a role: ``prunec_meanwskip1`` -> (MEANW_TAG, 1); plain roles: 0."""
    m = re.fullmatch(rf"(.*){SKIP}(\d+)", role)
    return (m.group(1), int(m.group(2))) if m else (role, 0)


def size_role(v: Value) -> str | None:
    """Which token-size tensor ``v`` is (one of SIZE_DERIVED, possibly restricted to the tokens
    from an index on: see :func:`skip_role`), or None."""
    m = re.search(rf"({SIZE_TAG}|{MEANW_TAG}){SKIP}\d+", v.name)
    if m:
        return m.group(0)
    for tag in SIZE_DERIVED:
        if tag in v.name:
            return tag
    return None


def _mid_stream(facts: "Facts", layer: int) -> Value:
    g = facts.graph
    site = facts.sites[layer]
    skip = facts.streams[layer]
    attn_add = next((u for u, _ in skip.uses if _is_add(u) and u.outputs[0].shape == skip.shape
                     and u in g.consumers_closure(site.output)), None)
    # (a fused SkipLayerNormalization here is post-norm: its output, the norm of the sum, is the stream)
    if attn_add is None:
        raise PruneError(f"cannot find the attention residual add of layer {layer}")
    start = attn_add.outputs[0]
    end = facts.streams[layer + 1] if layer + 1 < facts.depth else None
    region = g.consumers_closure(start)
    if end is not None:
        region -= g.consumers_closure(end)
    cands = [start] + [o for nd in sorted(region, key=lambda n: n.index) for o in nd.outputs
                       if o.shape == skip.shape and o is not end]
    for h in cands:
        below = g.consumers_closure(h)
        for u, _ in h.uses:
            if _is_add(u) and u.outputs[0].shape == skip.shape:
                a, b = _summands(u)
                other = b if a is h else a
                if other is not None and other.producer is not None and other.producer in below:
                    return h
    raise PruneError(f"cannot find the stream between attention and MLP in layer {layer} "
                     f"(no residual add around the MLP)")


def _is_add(node: Node) -> bool:
    """A residual add: ``Add`` (``aten.add``), or ORT's SkipLayerNormalization (norm(input + skip))."""
    if node.op == "layernorm":
        return bool(node.attrs.get("skip")) and len(node.inputs) >= 2 and None not in node.inputs[:2]
    if node.op != "elementwise":
        return False
    ref = node.ref
    name = node.attrs.get("name") or getattr(ref, "op_type", "")
    return name in ("add", "Add")


def _summands(node: Node) -> tuple:
    """The two tensors a residual add (:func:`_is_add`) sums ((None, None) unless there are two)."""
    if node.op == "elementwise" and len(node.inputs) != 2:
        return None, None
    return node.inputs[0], node.inputs[1]


def _is_norm_output(v: Value) -> bool:
    """``v`` is a norm's normalized output (not a SkipLayerNormalization's sum)."""
    p = v.producer
    return p is not None and p.op == "layernorm" and p.outputs[0] is v


def residual_stream(graph: Graph, site: AttentionSite) -> Value | None:
    """The tensor entering the block of ``site``: the skip input of the first residual add
    after the attention output."""
    out = site.output
    down = graph.consumers_closure(out)
    q = site.q if site.q is not None else site.inp
    anc_q = graph.ancestors_of(q) if q is not None else set()
    for node in sorted(down, key=lambda n: n.index):
        if not _is_add(node):
            continue
        a, b = _summands(node)
        if a is None or b is None:
            continue
        a_down = a.producer in down or a is out
        b_down = b.producer in down or b is out
        if a_down == b_down:
            continue
        skip = b if a_down else a
        if skip.shape is None or skip.shape != node.outputs[0].shape or len(skip.shape) != 3:
            continue
        if q is not None and skip.producer is not None and skip.producer not in anc_q and skip is not q:
            continue
        return skip
    return None


def _prefix_tokens(stream0: Value, last_stream_users: set[Node], n: int) -> tuple[int, bool]:
    """(prefix tokens, whether token 0 is a CLS token). A CLS token is concatenated alone before
    the others (a first concat input of several tokens is registers) or read off the output by
    index 0; one register without a CLS token looks like a CLS token."""
    prefix, cls = 0, False
    # 1) concat that builds the sequence before the first layer
    v = stream0
    for _ in range(12):
        p = v.producer
        if p is None:
            break
        if p.op == "concat" and v.shape is not None and len(v.shape) >= 2:
            axis = p.attrs["axis"] % len(v.shape)
            if axis == 1:
                sizes = [x.shape[axis] for x in p.inputs if x is not None and x.shape]
                big = max(range(len(sizes)), key=lambda i: sizes[i])
                prefix = sum(sizes[:big])
                cls = big > 0 and sizes[0] == 1
                break
        cands = [x for x in p.inputs if x is not None and x.shape is not None and x.shape == v.shape and not x.is_param]
        if not cands:
            cands = [x for x in p.inputs if x is not None and x.shape is not None and len(x.shape) == len(v.shape)
                     and x.is_float and not x.is_param]
        if not cands:
            break
        v = cands[0]
    # 2) fixed positions read off the final stream by index (CLS pooling)
    for node in last_stream_users:
        if node.op == "select" and node.inputs[0].shape and len(node.inputs[0].shape) == 3:
            if node.attrs["axis"] % 3 == 1 and isinstance(node.attrs.get("index"), int):
                idx = node.attrs["index"] % n
                if idx < n // 2:
                    prefix = max(prefix, idx + 1)
                    cls = cls or idx == 0
        if node.op == "gather" and node.inputs[0].shape and len(node.inputs[0].shape) == 3:
            idx = node.inputs[1]
            if node.attrs["axis"] % 3 == 1 and idx is not None and idx.data is not None and idx.data.size == 1:
                i = int(idx.data.reshape(-1)[0]) % n
                if i < n // 2:
                    prefix = max(prefix, i + 1)
                    cls = cls or i == 0
    return prefix, cls


def analyze(graph: Graph) -> Facts:
    sites = find_attention(graph)
    if not sites:
        raise PruneError("no attention found in the graph (looked for sdpa/Attention ops and "
                         "matmul -> softmax -> matmul chains)")
    streams = []
    for s in sites:
        x = residual_stream(graph, s)
        if x is None:
            raise PruneError(f"cannot find the residual stream entering the block of attention node "
                             f"'{s.node.name}'")
        streams.append(x)
    axes = AxisClasses(graph)
    for s, x in zip(sites, streams):
        _check_token_axis(axes, s, x)
    n = streams[0].shape[1]
    # Users of the final stream region (after the last block): the nodes after the last site's
    # residual add whose inputs are 3-D token tensors.
    last = sites[-1]
    tail = graph.consumers_closure(last.output)
    tail_users = {nd for nd in tail if nd.op in ("select", "gather")}
    prefix, cls_first = _prefix_tokens(streams[0], tail_users, n)
    causal = all(s.causal for s in sites)
    facts = Facts(graph, sites, streams, n, prefix, causal, axes, cls_first=cls_first and not causal)
    facts.side_inputs = _side_inputs(facts)
    facts.flops = [block_flops(facts, i) for i in range(len(sites))]
    return facts


def _key_token_axis(site: AttentionSite) -> tuple[Value, int] | None:
    """The axis of the tokens a site attends over: the probabilities' last axis (eager) or
    the keys' sequence axis (fused: [B, H, N, D] or [B, N, H*D])."""
    if site.probs is not None and site.probs.shape:
        return site.probs, len(site.probs.shape) - 1
    if site.k is not None and site.k.shape and len(site.k.shape) in (3, 4):
        return site.k, len(site.k.shape) - 2
    return None


def _check_token_axis(axes: AxisClasses, site: AttentionSite, stream: Value) -> None:
    """prunec reads the residual stream as [B, N, C]. A sequence-first stream [N, B, C]
    (torch.nn.MultiheadAttention / TransformerEncoder without batch_first) carries the tokens the
    attention mixes on axis 0: refuse it rather than prune along the batch."""
    key = _key_token_axis(site)
    if key is None or stream.shape is None or len(stream.shape) != 3:
        return
    if not axes.same((stream, 1), key) and axes.same((stream, 0), key):
        raise PruneError(f"the residual stream '{stream.name}' {list(stream.shape)} is sequence-first ([N, B, C]: "
                         f"attention '{site.node.name}' mixes its axis 0); prunec needs batch-first [B, N, C] "
                         f"(export with batch_first=True)")


def _side_inputs(facts: Facts) -> list[Value]:
    """Token-carrying tensors produced outside the blocks and read inside them (masks,
    rotary cos/sin, position ids): the edges that cross a cut placed before layer 1."""
    if facts.depth < 2:
        return []
    post = facts.graph.consumers_closure(facts.streams[1])
    out, seen = [], set()
    for node in post:
        for v in node.inputs:
            if v is None or id(v) in seen or v is facts.streams[1]:
                continue
            if v.producer is not None and v.producer in post:
                continue
            seen.add(id(v))
            if facts.token_axes(v) and not v.is_param:
                out.append(v)
    return sorted(out, key=lambda v: v.producer.index if v.producer else -1)


def block_flops(facts: Facts, layer: int, tokens: int | None = None) -> float:
    """Analytic multiply-adds ×2 of one block at ``tokens`` tokens: projections and MLP scale
    with N (4·C² + 2·C·hidden per token, read off the block's matmul weights), attention
    with N² (2·N²·C)."""
    n = tokens if tokens is not None else facts.tokens(layer)
    c = facts.streams[layer].shape[-1]
    per_token = facts.__dict__.setdefault("_per_token_macs", {})
    if layer not in per_token:
        per_token[layer] = _per_token_weight_macs(facts, layer)
    return 2.0 * (n * per_token[layer] + 2 * n * n * c)


def _per_token_weight_macs(facts: Facts, layer: int) -> float:
    g = facts.graph
    start = facts.streams[layer]
    end = facts.streams[layer + 1] if layer + 1 < facts.depth else None
    inside = g.consumers_closure(start)
    if end is not None:
        inside -= g.consumers_closure(end)
    macs = 0.0
    for node in inside:
        w = node.attrs.get("weights") if node.op == "packed_attention" else None
        if w is not None and w.shape is not None and len(w.shape) == 2:  # the packed QKV projection
            macs += w.shape[0] * w.shape[1]
        if node.op in ("linear", "matmul", "gemm", "addmm"):
            w = next((x for x in node.inputs if x is not None and x.is_param and x.shape and len(x.shape) == 2), None)
            if w is None and node.op == "matmul" and node.inputs[1] is not None and node.inputs[1].shape and len(node.inputs[1].shape) == 2:
                w = node.inputs[1]
            if w is not None:
                macs += w.shape[0] * w.shape[1]
    return macs
