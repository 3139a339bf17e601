"""Plan a cut before a layer: which edges cross it and which shape literals spell N."""
from __future__ import annotations

from ..errors import PruneError
from .analysis.blocks import BIAS_TAG, REWEIGH_TAG, LOGSIZE_TAG, MEANW_TAG, SIZE_TAG, Facts, size_role, skip_role
from .base import (RECOVER_MODES, Adaptive, Bipartite, Contextual, CountFix, Crossing, Cut, Diverse, Fuse, GridPool,
                   LengthMask, Merge, PageRank, PlannedFacts, Random, Recovery, Reweigh, ShapeFix, TopK)

_SIZED = ("reshape", "expand", "create")


def _size_operand(node, n: int | None = None, token=None, post=(), past: frozenset = frozenset()):
    """The entries of a node's size operand (a literal list in fx, a probed int tensor in ONNX).
    ``past``: a cached decoder's cache length symbols (an entry past + N counts as N here).
    ``token``: on an fx graph with a dynamic sequence, the symbolic token count N at the cut (a
    sympy expression; ``n`` its value at the example inputs): an entry is N when it is a SymInt
    spelling N computed before the cut (``post``: the nodes after it; a size read there is the
    run-time one), given as ``n``; literals and other SymInts are None; a SymInt computed from N
    that is not N (``N * 4``, ``N - 1``) is refused naming the node."""
    if node.op not in _SIZED:
        return None
    if "size" in node.attrs and node.attrs["size"] is not None:
        size = node.attrs["size"]
        if token is None:
            return [s if isinstance(s, int) else None for s in size]
        out = []
        for s, v in zip(size, node.attrs.get("size_values") or [None] * len(size)):
            if v is None or v.producer in post:
                out.append(None)
            elif _same_size(v.sym, token) or _token_plus_past(v.sym, token, past):
                out.append(n)  # N, or (a decoder with a KV cache) past + N: the keys, P + M after the cut
            elif _reads_symbols(v.sym, token):
                raise PruneError(f"node '{node.name}' sizes a tensor with '{v.name}' = {v.sym}, computed from the "
                                 f"token count {token}; prunec cannot rewrite it for the kept tokens")
            else:
                out.append(None)
        return out
    if node.ref is not None and hasattr(node.ref, "op_type"):
        if node.ref.op_type in ("Reshape", "Expand"):
            shp = node.inputs[1]
        elif node.ref.op_type == "ConstantOfShape":
            shp = node.inputs[0]
        else:
            return None
        if shp is not None and shp.data is not None:
            return [int(x) for x in shp.data.reshape(-1)]
    return None


_SAMPLES = (*range(1, 41), 48, 57, 64, 97, 128, 199, 256, 509, 1024, 4093)


def _same_size(expr, token) -> bool:
    """Whether two symbolic sizes are the same count: the same expression, or (the token count after
    an earlier cut, which the exporter writes in more than one form) expressions of the same symbols
    that agree at every sampled size of them."""
    if expr == token:
        return True
    syms = getattr(token, "free_symbols", set())
    if not syms or getattr(expr, "free_symbols", set()) != syms:
        return False
    import sympy

    for i, size in enumerate(_SAMPLES):
        env = {x: sympy.Integer(_SAMPLES[(i + j) % len(_SAMPLES)]) for j, x in enumerate(sorted(syms, key=str))}
        a, b = expr.xreplace(env), token.xreplace(env)
        if not (getattr(a, "is_number", False) and getattr(b, "is_number", False)) or a != b:
            return False
    return True


def _token_plus_past(expr, token, past: frozenset) -> bool:
    """Whether the symbolic size ``expr`` is the token count plus one of the ``past`` symbols (a
    decoder's cache lengths): the length of the keys, cached and new."""
    if not past or expr is None or token is None or isinstance(expr, int):
        return False
    rest = expr - token
    return getattr(rest, "is_Symbol", False) and rest in past


def _past_symbols(g) -> frozenset:
    """The symbolic cache lengths (axis 2 of a decoder's cache inputs) of an fx graph."""
    inputs = {v.name: v for v in g.inputs}
    syms = (getattr(inputs[n], "sym", None) for n in getattr(g, "cache_inputs", ()) if n in inputs)
    return frozenset(s[2] for s in syms if isinstance(s, tuple) and len(s) == 4 and not isinstance(s[2], int))


def _reads_symbols(expr, token) -> bool:
    """Whether the sympy expression ``expr`` depends on the symbols of ``token``."""
    return bool(getattr(expr, "free_symbols", set()) & getattr(token, "free_symbols", set()))


def _token_symbol(facts: Facts, stream):
    """The symbolic token count N at a cut (axis 1 of the stream) on an fx graph with a dynamic
    sequence, else None."""
    sym = getattr(stream, "sym", None)
    if not getattr(facts.graph, "dynamic_tokens", False) or not isinstance(sym, tuple) or len(sym) < 2:
        return None
    return None if isinstance(sym[1], int) else sym[1]


def _check_sym_reads(node, token, post: set) -> None:
    """An fx node after the cut that reads a SymInt computed from N before the cut (other than a
    size entry that is N, which becomes M) would compute with the uncut length: refused."""
    for v in node.attrs.get("sym_reads", ()):
        if v.producer not in post and _reads_symbols(v.sym, token):
            raise PruneError(f"node '{node.name}' reads '{v.name}' = {v.sym}, computed from the token count {token} "
                             f"before the cut; prunec cannot rewrite it for the kept tokens")


def _check_scored_tokens(planned: PlannedFacts, cut: Cut) -> None:
    """The attention a reduction reads must see the tokens the cut reduces: a merge between the
    scored layer and the cut (ToMe inside that block) would leave scores for other tokens."""
    r = cut.reduce
    site = getattr(r, "site", None) or getattr(getattr(r, "score", None), "site", None)
    if site is None:
        return
    seen = planned.tokens(site.layer)
    if seen != cut.num_tokens:
        raise PruneError(f"cut '{cut.tag}' scores its {cut.num_tokens} tokens with layer {site.layer}'s attention, "
                         f"which sees {seen} tokens (an earlier cut reduces them in between); score with a layer "
                         f"after that cut, or cut elsewhere")


def _check_dynamic(facts: Facts, reduce, tag: str) -> None:
    """On a graph whose sequence length is dynamic, only reductions whose counts follow N at run time
    are planned: selections with a :class:`CountRule` and merges marked ``dynamic`` (every pass but
    pool, whose patch grid has a fixed size)."""
    if reduce is None or not getattr(facts.graph, "dynamic_tokens", False):
        return
    if getattr(reduce, "rule", None) is not None or getattr(reduce, "dynamic", False):
        return
    what = "pool: a patch grid of fixed size" if isinstance(reduce, GridPool) else type(reduce).__name__
    raise PruneError(f"cut '{tag}' ({what}) needs a fixed sequence length, and this model's is dynamic: fix it "
                     f"with --shape NAME=?,N (ONNX) or export the torch module without a dynamic sequence")


def _check_scores_finite(reduce, graph) -> None:
    """A reduction scored on attention probabilities that were NaN or infinite in the probe run
    (a QDQ-quantized float-min mask makes every row NaN, which the graph then zeroes) would rank
    garbage: refuse. ToMe's matching reads keys only."""
    site = getattr(reduce, "site", None) or getattr(getattr(reduce, "score", None), "site", None)
    if site is None or site.probs is None or isinstance(reduce, Bipartite):
        return
    if graph.probe_facts(site.probs).get("finite") is False:
        raise PruneError(f"attention probabilities '{site.probs.name}' are not finite (NaN/inf) in the probe run: "
                         f"scores read from them would be meaningless")


def plan_cut(facts: Facts | PlannedFacts, layer: int, reduce, tag: str, mid: bool = False, recover="auto",
             recover_at: int | None = None) -> Cut:
    """A cut before ``layer`` (1..depth-1), or at the encoder output (``layer == depth``:
    after the last block, where the final stream leaves for the head / outputs); with
    ``mid``, inside block ``layer`` (0..depth-1) between attention and MLP. ``recover`` /
    ``recover_at``: where and how the full token count comes back (see :func:`plan_recovery`).
    With :class:`PlannedFacts`, the cut comes after the cuts planned there: the latest one
    before it is its parent (its tokens enter this cut)."""
    planned = facts if isinstance(facts, PlannedFacts) else PlannedFacts(facts)
    facts = planned.facts
    if mid:
        if not 0 <= layer < facts.depth:
            raise PruneError(f"layer {layer} is out of range: the model has {facts.depth} attention layers "
                             f"(valid: 0..{facts.depth - 1})")
    elif not 1 <= layer <= facts.depth:
        raise PruneError(f"layer {layer} is out of range: the model has {facts.depth} attention layers "
                         f"(valid cuts: 1..{facts.depth - 1}, or {facts.depth} for the output)")
    _check_scores_finite(reduce, facts.graph)
    _check_dynamic(facts, reduce, tag)
    g = facts.graph
    stream = facts.mid_stream(layer) if mid else facts.stream_at(layer)
    cls_layer = min(layer, facts.depth - 1)
    n = stream.shape[1]  # as the graph spells it; the cut's own count follows the planned cuts
    parent = planned.parent_of(stream)
    post = g.consumers_closure(stream)
    earlier = next((c.recovery.point for c in reversed(planned.cuts) if c.recovery is not None), None)
    recovery = plan_recovery(facts, stream, post, reduce, recover, recover_at,
                             earlier if earlier is not None else facts.recovery_point())
    if recovery is not None:
        _stop_at_recovery(facts, post, recovery, cls_layer)
    _refuse_upstream_of_earlier_cut(post, layer)
    _pull_in(facts, post, cls_layer)
    cut = Cut(layer, stream, reduce, planned.count_at(stream), post, tag=tag, recovery=recovery, parent=parent,
              graph_tokens=n)
    _check_scored_tokens(planned, cut)
    token = _token_symbol(facts, stream)  # fx, dynamic sequence: N is a symbol, no literal spells it
    past = _past_symbols(g) if token is not None else frozenset()
    for node in sorted(post, key=lambda x: x.index):
        if node.op == "range" and node.outputs[0].shape and facts.token_axes(node.outputs[0], cls_layer):
            raise PruneError(f"node '{node.name}' builds a range over the tokens after the cut; "
                             f"pruned tokens would get wrong positions")
        size = _size_operand(node, n, token, post, past)
        if size is not None:
            pos = [j for j in facts.token_axes(node.outputs[0], cls_layer) if j < len(size) and size[j] == n]
            if token is not None and any(s == n and j not in pos for j, s in enumerate(size)):
                j = next(j for j, s in enumerate(size) if s == n and j not in pos)
                raise PruneError(f"node '{node.name}' spells the token count {token} at axis {j} of its size, which "
                                 f"is not a token axis; prunec cannot tell what it should become after the cut")
            if pos:
                cut.shape_fixes.append(ShapeFix(node, pos))
        if token is not None:
            _check_sym_reads(node, token, post)
    _plan_crossings(facts, cut, cls_layer)
    _plan_cache(facts, cut)
    _refuse_per_token_after_earlier_pass(g, cut)
    _plan_length_masks(facts, cut)
    for v in g.outputs:
        if v.producer is not None and v.producer in post:
            cut.output_axes[v.name] = facts.token_axes(v, cls_layer)
    _plan_sizes(facts, cut, cls_layer)
    _plan_counts(facts, cut, cls_layer)
    return cut


def _refuse_upstream_of_earlier_cut(post: set, layer: int) -> None:
    """A cut placed before the cut of a pass applied earlier would hand that cut fewer tokens than
    its counts were planned for: refused (apply the passes in layer order, or as one pass)."""
    for node in post:
        for o in node.outputs:
            if _is_kept_indices(o.name):
                tag = o.name[: -len("/keep_idx")]
                raise PruneError(f"this cut (layer {layer}) comes before the cut '{tag}' of a pass applied earlier, "
                                 f"which was planned for the tokens entering it; apply the passes in layer order")


def _is_kept_indices(name: str) -> bool:
    """Whether a graph value is the kept indices of a cut an earlier pass made (``<tag>/keep_idx``
    in ONNX, ``<tag>_keep_idx`` in fx)."""
    return name.endswith(("/keep_idx", "_keep_idx"))


def _refuse_per_token_after_earlier_pass(g, cut: Cut) -> None:
    """A cut that reads a per-token input (the padding mask, input ids) finds its tokens' entries by
    their original positions, which it knows only for the cuts of its own plan: on a graph an
    earlier pass already cut (its kept indices are in the graph) it would read the wrong entries."""
    if cut.parent is not None or (cut.padding is None and not cut.ids):
        return
    earlier = next((v.name for v in g.values() if _is_kept_indices(v.name)), None)
    if earlier is not None:
        what = f"the padding mask '{cut.padding}'" if cut.padding is not None else f"the ids '{cut.ids}'"
        raise PruneError(f"'{cut.tag}' reads {what} per token, and an earlier pass already reduced this model's "
                         f"tokens ('{earlier}'); apply the passes together (prunec.Pipeline, or several --pass in "
                         f"one command) so each cut finds its tokens' entries")


def _stop_at_recovery(facts: Facts, post: set, recovery: Recovery, layer: int) -> None:
    """Take the nodes after the recovery point out of ``post`` (they see every token again);
    refuse a token tensor other than the point that reaches past it."""
    after = facts.graph.consumers_closure(recovery.point)
    post -= after
    for node in after:
        for v in node.inputs:
            if (v is not None and v is not recovery.point and v.producer in post
                    and facts.token_axes(v, layer)):
                raise PruneError(f"token tensor '{v.name}' reaches node '{node.name}' after the point where "
                                 f"the tokens are restored ('{recovery.point.name}'); only that tensor is restored")


def _plan_crossings(facts: Facts, cut: Cut, layer: int) -> None:
    """Every input of a post-cut node made before the cut that carries the tokens (gathered per
    sample along its token axes), or token sizes (recomputed); the stream itself when it is a
    graph output (a feature extractor's tokens: the reduced tensor takes its place and name)."""
    stream, post, seen = cut.stream, cut.post, set()
    for node in sorted(post, key=lambda x: x.index):
        for v in node.inputs:
            if v is None or id(v) in seen or (v.producer is not None and v.producer in post):
                continue
            seen.add(id(v))
            role = size_role(v)
            if role is not None:  # token sizes and what is computed from them: recomputed after the cut
                cut.crossings.append(Crossing(v, [], 0, role))
                continue
            axes = facts.token_axes(v, layer)
            if not axes:
                continue
            if isinstance(cut.reduce, Merge) and v is not stream and v.producer is not None \
                    and v.producer is stream.producer:
                raise PruneError(f"node '{v.producer.name}' makes both the stream '{stream.name}' and '{v.name}', "
                                 f"which crosses the merge; a gathered copy would not be the merged tokens' value")
            b = facts.batch_axis(v, [u for u, _ in v.uses if u in post], layer)
            if b is None or b in axes:
                raise PruneError(f"token-carrying tensor '{v.name}' (shape {list(v.shape)}) crosses the cut "
                                 f"before layer {cut.layer} without a batch axis; cannot gather it per sample")
            cut.crossings.append(Crossing(v, axes, b))
    if any(v is stream for v in facts.graph.outputs) and not any(c.value is stream for c in cut.crossings):
        axes = facts.token_axes(stream, layer)
        b = facts.batch_axis(stream, [], layer)
        if axes and b is not None and b not in axes:
            cut.crossings.append(Crossing(stream, axes, b))
    if not any(c.value is stream for c in cut.crossings):
        raise PruneError(f"the residual stream '{stream.name}' entering layer {cut.layer} has no token axis")


def _padding_input(g, floats: bool = False) -> str | None:
    """The graph's padding mask input: a 2-D integer or boolean ``attention_mask`` (1 = token,
    0 = padding; a float one may be additive, 0 = token: read only with ``floats``, for a decoder's
    cache, whose mask [B, past + S] is 0/1 by the layout)."""
    masks = [v.name for v in g.inputs if v.shape is not None and len(v.shape) == 2 and "attention_mask" in v.name
             and (floats or not v.dtype.startswith(("float", "bfloat")))]
    return masks[0] if masks else None


def _plan_padding(g, cut: Cut) -> None:
    """A ranked selection, DivPrune, Zero-TPrune or EViT on a dynamic sequence with a padding mask input
    counts per row: each row keeps k of its real tokens by the rule on its real length, never padding
    over a real token; the batch keeps the largest count, the other rows filling up with padding
    (``cut.padding``, ``cut.pad_last``). ToMe, PPT and VisionZip (any sequence) read the mask too:
    padding and real tokens do not match."""
    r = cut.reduce
    if g.dynamic_tokens and (isinstance(r, (TopK, Random, Diverse, PageRank)) and getattr(r, "rule", None) is not None
                             and r.rule.token_id is None or isinstance(r, Fuse) and r.keep is not None):
        cut.padding = _padding_input(g)
        cut.pad_last = cut.padding is not None
    elif isinstance(r, (Bipartite, Adaptive, Contextual)):  # ToMe's, PPT's pooling, VisionZip's joins:
        # padding with padding
        cut.padding = _padding_input(g)


def _first_read(v, post: set) -> int | None:
    """The index of the first node after the cut (in ``post``) that reads the cache input ``v``,
    directly or through concatenations (an fx graph appends the cache to an empty one first)."""
    found, front = [], [v]
    while front:
        for u, _ in front.pop().uses:
            if u in post:
                found.append(u.index)
            elif u.op == "concat":
                front.extend(u.outputs)
    return min(found) if found else None


def _plan_cache(facts: Facts, cut: Cut) -> None:
    """A decoder with a KV cache (analysed as a prefill, its cache empty): the layers after the cut
    cache only the kept tokens. ``cut.past`` is the cache input of the first layer after it (its
    length is what those layers hold); a crossing axis that spans the cache and the new tokens
    (an attention mask's keys: past + N when the cache holds entries, per the second probe) is a
    key axis, gathered with the cached entries in front of the kept tokens."""
    g = facts.graph
    if not g.cache_inputs:
        _plan_padding(g, cut)
        return
    if not isinstance(cut.reduce, (TopK, Random)):
        raise PruneError(f"'{cut.tag}' is not a ranked selection, and a decoder with a KV cache takes only those "
                         f"(fastv, cls-attn, random): a merge, DivPrune or Zero-TPrune could drop padding, which "
                         f"decode steps must still see masked")
    if cut.recovery is not None:
        raise PruneError(f"'{cut.tag}' restores tokens, which a decoder with a KV cache cannot (its later layers "
                         f"cache only the kept tokens); use recover=none")
    by_name = {v.name: v for v in g.inputs}
    cut.padding = _padding_input(g, floats=True)
    first = {n: _first_read(by_name[n], cut.post) for n in g.cache_inputs}
    read = [n for n in g.cache_inputs if first[n] is not None]
    if not read:
        return
    cut.past = min(read, key=first.__getitem__)
    keys = g.decode_shapes[cut.past][0][2] + cut.graph_tokens  # past + N at the second probe
    for c in cut.crossings:
        shape = g.decode_shapes.get(c.value.name, (None,))[0]
        if shape is None:
            raise PruneError(f"'{c.value.name}' crosses the cut and prunec could not see its shape with a cache")
        c.key_axes = [a for a in c.token_axes if shape[a] == keys]
    for fix in cut.shape_fixes:
        if g.frontend == "fx":  # the size's entries are SymInt values, each probed on its own
            entries = fix.node.attrs.get("size_values") or []
            at = [g.decode_shapes.get(v.name, (None, None))[1] if v is not None else None for v in entries]
            fix.key_positions = [j for j in fix.positions if j < len(at) and at[j] is not None and int(at[j]) == keys]
            continue
        size = fix.node.inputs[0 if fix.node.ref.op_type == "ConstantOfShape" else 1]
        value = g.decode_shapes.get(size.name, (None, None))[1]
        if value is not None:
            fix.key_positions = [j for j in fix.positions if int(value.reshape(-1)[j]) == keys]


def plan_recovery(facts: Facts, stream, post: set, reduce, recover, recover_at, earlier=None) -> Recovery | None:
    """Where the cut's tokens come back to full length, and how.

    ``recover``: ``auto`` restores them before consumers that break on fewer tokens (a reshape
    onto the patch grid, token mixing) and leaves token outputs reduced; ``copy``, ``unmerge``
    or ``attn`` restore them with that mode, token outputs too. The point is the stream leaving
    the last block (before a final norm, which then sees every token); ``none``
    never does, and refuses a graph that needs it. ``recover_at``: before that layer instead.
    Once a cut restores tokens somewhere (``earlier``: that point), every later cut restores there too.
    Default mode: ``copy`` after a selection, ``unmerge`` after a merge or pooling."""
    from .analysis.consumers import full_token_consumers

    mode = str(recover if recover is not None else "auto").strip().lower()
    if mode not in RECOVER_MODES:
        raise PruneError(f"recover '{recover}' is not one of {', '.join(RECOVER_MODES)}")
    point = earlier
    if point is None and recover_at is not None:
        if not 1 <= int(recover_at) < facts.depth:
            raise PruneError(f"recover_at {recover_at} is out of range (valid: 1..{facts.depth - 1})")
        point = facts.streams[int(recover_at)]
    needs = []
    if point is None:
        needs = [c for c in full_token_consumers(facts) if c.needs_recovery]
        if mode == "none":
            if needs:
                raise PruneError(f"{needs[0].describe()} and needs every token; restore them "
                                 f"(recover=copy|unmerge|attn) or cut elsewhere")
            return None
        if mode == "auto" and not needs:
            return None
        point = facts.block_output(facts.depth - 1)  # before the final norm: every token goes through it
    if point is not stream and (point.producer is None or point.producer not in post):
        if earlier is None and recover_at is None and (mode != "auto" or needs):
            what = needs[0].describe() + " and needs every token" if needs else "the token outputs must keep every token"
            raise PruneError(f"the cut comes after '{point.name}', where the tokens are restored, but {what}; "
                             f"cut before a layer")
        return None  # restored before this cut: nothing to do
    if point is stream:
        raise PruneError(f"the cut reduces '{stream.name}', where the tokens must be restored for what follows; "
                         f"cut before a layer instead")
    if mode in ("auto", "none"):
        mode = "unmerge" if isinstance(reduce, (Merge, GridPool)) else "copy"
    return Recovery(point, mode)


def _pull_in(facts: Facts, post: set, layer: int) -> None:
    """Add to ``post`` the nodes placed after the cut that feed it and must see the reduced tokens:
    masks combined with log(size) for a later fused attention and size-weighed token means
    (prunec's own, tagged), and sums/means over the tokens computed off the stream (a pooling's
    mask count) together with what lies between them and the cut's nodes."""
    g = facts.graph
    first = min(n.index for n in post) if post else 0
    token_sums = set()
    for node in g.nodes:
        if (node.index > first and node not in post and node.op == "reduce" and node.inputs
                and node.inputs[0] is not None and facts.token_axes(node.inputs[0], layer)
                and not any(facts.token_axes(o, layer) for o in node.outputs)):
            token_sums |= {node} | g.consumers_closure(node.outputs[0])
    for node in sorted(g.nodes, key=lambda x: -x.index):
        if node.index < first or node in post:
            continue
        if not any(u in post for o in node.outputs for u, _ in o.uses):
            continue
        if node in token_sums or any(BIAS_TAG in o.name or REWEIGH_TAG in o.name for o in node.outputs):
            post.add(node)


def _plan_sizes(facts: Facts, cut: Cut, layer: int) -> None:
    """Token sizes: the size tensor entering the cut, the later attention sites that need a
    log(size) bias, and the token means/sums to re-weigh (those not already handled by an
    earlier merge, whose size-derived tensors cross this cut and are recomputed)."""
    if cut.parent is None:  # sizes left by a merge of an earlier pass, found in the graph
        cut.size_in = facts.size_at(layer, (cut.stream.shape[0], cut.graph_tokens, 1), before=cut.post)
    if not cut.sizes_out:
        crossing = next((c.value for c in cut.crossings if c.role is not None), None)
        if crossing is not None:
            raise PruneError(f"token sizes '{crossing.name}' cross the cut before layer {cut.layer} but none enter it")
        return
    if isinstance(cut.reduce, GridPool):
        raise PruneError("pool cannot follow a token merge (the patch grid no longer exists)")
    if any(getattr(c.reduce, "prop_attn", False) for c in [cut, *cut.ancestors()]):  # this cut's sizes now
        for site in facts.sites:
            if site.node in cut.post and not _has_bias(site):
                if site.node.attrs.get("takes_mask") is False:
                    raise PruneError(f"attention node '{site.node.name}' takes no additive bias; proportional "
                                     f"attention cannot be added (prop_attn=false turns it off)")
                cut.bias_sites.append(site)
    for node in sorted(cut.post, key=lambda x: x.index):
        kind = _reduce_kind(node)
        if kind is None or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        role = SIZE_TAG if kind == "sum" else MEANW_TAG
        if facts.token_axes(node.outputs[0], layer):
            continue  # the tokens survive it: not a reduction over them
        if facts.token_axes(x, layer) != [1]:
            start = _token_slice_start(facts, x, layer)
            if start is None or _reduce_axes(node) != [1]:
                continue  # not a reduction over the token axis of a [B, N, ...] tensor (or a slice of it)
            if start > _leading_fixed(cut.reduce):
                raise PruneError(f"node '{node.name}' reduces the tokens from index {start} on; after the cut "
                                 f"before layer {cut.layer} those positions hold other tokens, so it cannot be "
                                 f"size-weighted")
            role = skip_role(role, start)
        if x.producer is not None and any(size_role(v) for v in x.producer.inputs if v is not None):
            continue  # already re-weighed by an earlier merge
        cut.reweigh.append(Reweigh(node, role))
        if kind == "sum":
            _check_sum_count(node, cut)


def _check_sum_count(node, cut: Cut) -> None:
    """A size-weighted token sum stands for the N original tokens: dividing it by a count read
    off a token tensor's shape after the cut (TorchScript's ``x.sum(1) / x.shape[1]``) would
    count the merged tokens instead; refused (a count written as the number N stays right)."""
    frontier = [node.outputs[0]]
    for _ in range(4):
        nxt = []
        for v in frontier:
            for user, _ in v.uses:
                if _op_name(user) in ("div", "mul"):
                    for w in user.inputs:
                        if w is not None and w is not v and _shape_read_after(w, cut.post):
                            raise PruneError(f"node '{user.name}' divides the token sum '{node.name}' by a count read "
                                             f"off the tokens' shape after a token merge; the "
                                             f"size-weighted sum stands for the original tokens (write the count as "
                                             f"a number, or use a mean)")
                elif user.op == "reshape" or (user.op == "elementwise"
                                              and sum(1 for u in user.inputs if u is not None) == 1):
                    nxt.extend(user.outputs)
        frontier = nxt


def _shape_read_after(v, post: set, depth: int = 8) -> bool:
    """Whether ``v`` is computed from a shape node in ``post`` within ``depth`` producers."""
    seen, frontier = set(), [v]
    for _ in range(depth):
        nxt = []
        for w in frontier:
            p = w.producer
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.op == "shape" and p in post:
                return True
            nxt.extend(u for u in p.inputs if u is not None)
        frontier = nxt
    return False


def _leading_fixed(reduce) -> int:
    """How many leading tokens a reduction keeps in place (prefix tokens / tokens before the span)."""
    if isinstance(reduce, (Merge, GridPool)):
        return reduce.prefix
    return getattr(reduce, "span_start", 0)


def _token_slice_start(facts: Facts, v, layer: int) -> int | None:
    """S when ``v`` is ``x[:, S:]`` of a token tensor x [B, N, ...] (static S >= 1, step 1, to the end),
    else None."""
    node = v.producer
    if node is None or node.op != "slice" or not node.inputs or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    if facts.token_axes(x, layer) != [1] or x.shape is None:
        return None
    n, rank = x.shape[1], len(x.shape)
    ref = node.ref
    if hasattr(ref, "op_type"):  # ONNX Slice(data, starts, ends, axes, steps)
        def data(i):
            w = node.inputs[i] if len(node.inputs) > i else None
            return None if w is None else (None if w.data is None else [int(t) for t in w.data.reshape(-1)])
        starts, ends, axes, steps = data(1), data(2), data(3), data(4)
        if starts is None or ends is None or len(starts) != 1:
            return None
        axes = axes if axes is not None else [0]
        start, end, step, axis = starts[0], ends[0], (steps or [1])[0], axes[0] % rank
    else:  # aten.slice.Tensor(x, dim, start, end, step)
        args = list(ref.args) + [None] * 5
        axis, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
        end = n if end is None else end
        if not all(isinstance(t, int) for t in (axis, start, end, step)):
            return None
        axis %= rank
    if axis != 1 or step != 1 or end < n or not 0 < start < n:
        return None
    return start


def _reduce_axes(node) -> list[int] | None:
    """The (non-negative) axes a reduction node reduces, when static."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    ref = node.ref
    if hasattr(ref, "op_type"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].data is not None:
            axes = [int(t) for t in node.inputs[1].data.reshape(-1)]
    else:
        axes = ref.args[1] if len(ref.args) > 1 else ref.kwargs.get("dim")
        axes = [axes] if isinstance(axes, int) else axes
    if axes is None or not all(isinstance(a, int) for a in list(axes)):
        return None
    return sorted(a % rank for a in axes)


def _scalar_operand(node):
    """[(slot, value)] of the scalar constants ``node`` combines its tensor with: fx numbers in
    its arguments, ONNX single-element initializers / Constant outputs."""
    if node.op != "elementwise":
        return []
    ref = node.ref
    if hasattr(ref, "op_type"):  # ONNX
        out = []
        for i, v in enumerate(node.inputs):
            arr = None if v is None or v.ref is None else getattr(v.ref, "const_value", None)
            if arr is None and v is not None and v.producer is not None and v.producer.op == "constant":
                attr = v.producer.ref.attributes.get("value")
                arr = attr.value if attr is not None else None
            if arr is not None:
                a = arr.numpy() if hasattr(arr, "numpy") else arr
                if a.size == 1 and a.dtype.kind in "fiu":
                    out.append((i, float(a.reshape(-1)[0])))
        return out
    return [(i, float(a)) for i, a in enumerate(node.attrs.get("args", ()))
            if isinstance(a, (int, float)) and not isinstance(a, bool)]


def _op_name(node) -> str:
    return str(getattr(node.ref, "op_type", None) or node.attrs.get("name", "")).lower()


def _plan_counts(facts: Facts, cut: Cut, layer: int) -> None:
    """Numbers equal to N that meet a reduction over the tokens after the cut (a token count
    written as a constant: ``x.sum(1) / N``, ``x.sum(1) * (1 / N)``) become M, through casts and
    reshapes between them; any other op combining such a reduction with N is refused. A
    size-weighted reduction (after a merge tracking sizes) still counts the N original tokens:
    its numbers stay."""
    if cut.reduce is None:  # a cut planned only to be described (inspect)
        return
    if _token_symbol(facts, cut.stream) is not None:  # N is symbolic: a number equal to it is not the count
        return
    weighed = {rw.node for c in [cut, *cut.ancestors()] for rw in c.reweigh}  # size-weighted: counts stay N
    for node in sorted(cut.post, key=lambda x: x.index):
        if node.op != "reduce" or not node.inputs or node.inputs[0] is None or node in weighed:
            continue
        x = node.inputs[0]
        if facts.token_axes(node.outputs[0], layer):
            continue  # the tokens survive it
        start = 0  # x[:, S:].sum(1) / (N - S): a sum over the tokens after the S prefix tokens
        if not facts.token_axes(x, layer):
            start = _token_slice_start(facts, x, layer)
            if start is None or _reduce_axes(node) != [1]:
                continue  # not a reduction over the tokens
        if x.producer is not None and any(size_role(v) for v in x.producer.inputs if v is not None):
            continue  # size-weighted by an earlier merge
        n, m = cut.graph_tokens - start, cut.kept - start  # the graph spells N; this cut leaves M
        frontier = [node.outputs[0]]
        for _ in range(4):
            nxt = []
            for v in frontier:
                for user, _ in v.uses:
                    consts = _scalar_operand(user)
                    name = _op_name(user)
                    hits = [(i, c) for i, c in consts if c == n or (name == "mul" and abs(c * n - 1) < 1e-6)]
                    if hits and start > _leading_fixed(cut.reduce):
                        raise PruneError(f"node '{user.name}' divides the token reduction '{node.name}' from index "
                                         f"{start} on by its count {n}; after the cut before layer {cut.layer} those "
                                         f"positions hold other tokens")
                    if hits and (name == "mul" or (name == "div" and [i for i, _ in hits] == [1])):
                        for i, c in hits:
                            cut.count_fixes.append(CountFix(user, i, float(m) if c == n else 1.0 / m))
                    elif hits:
                        raise PruneError(f"node '{user.name}' combines the token reduction '{node.name}' with the "
                                         f"number {hits[0][1]:g} (the token count {n}); cannot rewrite it for {m} "
                                         f"tokens")
                    elif user.op == "reshape" or (user.op == "elementwise" and not consts
                                                  and sum(1 for u in user.inputs if u is not None) == 1):
                        nxt.extend(user.outputs)  # a cast / reshape of the reduction
            frontier = nxt


def _has_bias(site) -> bool:
    if site.kind == "eager":
        v = site.node.inputs[0]
        return v.producer is not None and any(x is not None and size_role(x) == LOGSIZE_TAG
                                              for x in v.producer.inputs)
    masks = [site.mask, site.node.attrs.get("attention_bias")]
    return any(m is not None and (size_role(m) == LOGSIZE_TAG or BIAS_TAG in m.name) for m in masks)


def _reduce_kind(node) -> str | None:
    if node.op != "reduce":
        return None
    ref = node.ref
    name = str(getattr(ref, "op_type", None) or getattr(ref, "target", "")).lower()
    if "mean" in name:
        return "mean"
    if "sum" in name and "square" not in name:
        return "sum"
    return None


def _plan_length_masks(facts: Facts, cut: Cut) -> None:
    """ORT attention ops after the cut whose key mask is a sequence-lengths vector made before it
    (EmbedLayerNormalization's ``mask_index`` [B], or [2B] end/start positions): lengths of the
    uncut sequence, rewritten at the cut (:class:`LengthMask`). Other index forms are refused."""
    batch = cut.stream.shape[0]
    layer = min(cut.layer, facts.depth - 1)
    for node in sorted(cut.post, key=lambda x: x.index):
        if node.op == "rotary":
            pos = node.attrs.get("position_ids")
            if pos is None:  # ONNX RotaryEmbedding without positions: per-token cos/sin caches [B, N, D/2]
                pos = node.attrs.get("cos_cache")
            if pos is None or (not facts.token_axes(pos, layer) and not (pos.producer in cut.post)):
                raise PruneError(f"rotary node '{node.name}' reads positions that do not follow the tokens "
                                 f"('{pos.name if pos is not None else 'none'}'); kept tokens would get new positions")
        if node.attrs.get("gqa"):
            inputs = node.attrs["named_inputs"]
            for key, kind in (("seqlens_k", "seqlens"), ("total_sequence_length", "total")):
                v = node.attrs.get(key)
                if v is not None and (v.producer is None or v.producer not in cut.post):
                    if kind == "seqlens" and (v.shape is None or len(v.shape) != 1 or v.shape[0] != batch
                                              or isinstance(cut.reduce, Merge)):  # lengths need ascending tokens
                        raise PruneError(f"attention node '{node.name}' reads seqlens_k '{v.name}' (shape {v.shape}), "
                                         f"which prunec can rewrite only after a selection, not a merge")
                    cut.length_masks.append(LengthMask(node, inputs[key], v, kind))
        m = node.attrs.get("key_mask")
        if m is None or m.shape is None or (m.producer is not None and m.producer in cut.post):
            continue
        if len(m.shape) == 1:
            if m.shape[0] not in (batch, 2 * batch):
                raise PruneError(f"attention node '{node.name}' reads the mask index '{m.name}' of shape "
                                 f"{list(m.shape)}, which prunec cannot rewrite for fewer tokens")
            cut.length_masks.append(LengthMask(node, node.attrs["named_inputs"]["key_mask"], m))
        elif len(m.shape) == 4 or not facts.token_axes(m, layer):
            raise PruneError(f"attention node '{node.name}' reads the mask '{m.name}' of shape {list(m.shape)}, "
                             f"which prunec cannot gather for fewer tokens")
