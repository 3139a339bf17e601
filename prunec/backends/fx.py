"""Lower a Plan onto a torch.export / fx GraphModule.

Inserts ``call_function`` nodes that call the plain-torch kernels in
:mod:`prunec.ops`, rewires every post-cut use of a crossing edge to its gathered
version, rewrites size literals that spell N, and recompiles. The result is an
ordinary GraphModule that ``torch.export`` can export again.
"""
from __future__ import annotations

import copy
import functools
import operator

import torch
import torch.fx

from .. import ops
from ..errors import PruneError
from ..passes.analysis.blocks import BIAS_TAG, RECOVER_TAG, RECOVERED_TAG, REWEIGH_TAG, LOGSIZE_TAG, MEANW_TAG, SIZE_TAG, split_role
from ..passes.base import Adaptive, Bipartite, Contextual, Diverse, Fuse, GridPool, Merge, PageRank, Plan, Random, TopK

aten = torch.ops.aten


def _selection(graph: torch.fx.Graph, by_name: dict, cut, biases: dict, positions=None):
    """Insert the nodes computing the kept indices [B, M] of ``cut``. ``biases``: site node name ->
    the log-size bias an earlier cut of the plan adds to it; ``positions``: the original positions
    [B, N] of the tokens entering the cut (after earlier cuts of the plan), where it reads a mask."""
    r = cut.reduce
    if isinstance(r, GridPool):  # side inputs follow each window's first token
        return graph.call_function(ops.select_fixed, (by_name[cut.stream.ref.name], r.representatives(), cut.tag))
    rule = _rule_args(r)  # a dynamic token count: the kernels compute span and k at run time
    padded = _padding(graph, by_name, cut, positions) if cut.pad_last else None  # a padded encoder batch
    if isinstance(r, Diverse):
        return graph.call_function(ops.select_diverse, (by_name[r.features.ref.name], r.k, r.span_start, r.span_end,
                                                         cut.tag, rule, padded))
    if isinstance(r, Random):
        return graph.call_function(ops.select_random, (by_name[cut.stream.ref.name], r.k, r.span_start, r.span_end,
                                                        r.seed, cut.tag, rule, padded))
    if isinstance(r, PageRank):
        site = r.site
        if site.probs is not None:
            probs = by_name[site.probs.ref.name]
            kt = by_name[site.k_t.ref.name]  # [B, H, D, N]
            keys = graph.call_function(torch.ops.aten.permute.default, (kt, [0, 3, 1, 2]))
        else:
            q, k = by_name[site.q.ref.name], by_name[site.k.ref.name]
            mask = _mask_with_bias(graph, by_name, site, biases.get(site.node.ref.name))
            probs = graph.call_function(ops.full_probs, (q, k, site.scale, mask, bool(site.node.attrs.get("is_causal"))))
            keys = graph.call_function(torch.ops.aten.permute.default, (k, [0, 2, 1, 3]))
        keys = graph.call_function(torch.ops.aten.flatten.using_ints, (keys, 2))
        return graph.call_function(ops.select_zero_tprune, (probs, keys, r.k, r.span_start, r.span_end, r.iters,
                                                            r.drop_similar, r.cls, cut.tag, rule, r.similar, padded))
    if not isinstance(r, TopK):
        raise PruneError(f"the torch backend cannot lower {type(r).__name__}")
    site = r.score.site
    scores = _site_scores(graph, by_name, site, r.score.query, biases.get(site.node.ref.name), padded)
    if padded is not None:
        return graph.call_function(ops.tokens.select_padded, (scores, padded, *rule, cut.tag))
    rule = r.rule
    if cut.past is not None or cut.padding is not None or cut.ids:  # a decoder's prompt (see select_topk_cached)
        if cut.parent is not None:
            raise PruneError(f"cut '{cut.tag}' follows another cut, and the torch backend ranks a cached decoder's "
                             f"padding or a token span at the first cut only")
        mask = by_name[cut.padding] if cut.padding is not None else None
        past = by_name[cut.past] if cut.past is not None else None
        ids = by_name[cut.ids] if cut.ids else None
        return graph.call_function(ops.tokens.select_topk_cached, (
            scores, by_name[cut.stream.ref.name], past, mask, ids, rule.token_id, rule.start, rule.start_from_end,
            rule.end, rule.end_from_end, rule.keep, rule.count, cut.tag))
    if r.rule is not None:  # a dynamic token count: span, k and M follow N at run time
        return graph.call_function(ops.tokens.select_topk_rule, (scores, rule.start, rule.start_from_end, rule.end,
                                                          rule.end_from_end, rule.keep, rule.count, cut.tag))
    return graph.call_function(ops.select_topk, (scores, r.k, r.span_start, r.span_end, cut.tag))


def _padding(graph, by_name, cut, positions):
    """Which tokens entering ``cut`` are padding, [B, N] bool (``ops.tokens.padding_of``: the mask
    input at their original ``positions``), or None when the cut reads no mask."""
    if cut.padding is None:
        return None
    n = graph.call_function(aten.sym_size.int, (by_name[cut.stream.ref.name], 1))
    return graph.call_function(ops.tokens.padding_of, (by_name[cut.padding], positions, n))


def _rule_args(r) -> tuple | None:
    """The :func:`prunec.ops.tokens.rule_counts` arguments after N of a selection's count rule."""
    rule = getattr(r, "rule", None)
    if rule is None:
        return None
    return (rule.start, rule.start_from_end, rule.end, rule.end_from_end, rule.keep, rule.count)


def _site_keys(graph, by_name, site):
    """The site's keys averaged over heads [B, N, D]."""
    if site.probs is not None:
        return graph.call_function(ops.merge.keys_metric, (by_name[site.k_t.ref.name], "bhdn"))
    return graph.call_function(ops.merge.keys_metric, (by_name[site.k.ref.name], "bhnd"))


def _mask_with_bias(graph, by_name, site, bias):
    """The additive (or boolean) mask a fused site's scores use: its own mask, plus ``bias`` (the
    log-size bias [B, 1, 1, N] an earlier cut of the plan adds to this site) when given."""
    mask = by_name[site.mask.ref.name] if site.mask is not None else None
    if bias is None:
        return mask
    if mask is None:
        return bias
    if site.mask.dtype == "bool":
        mask = graph.call_function(aten.where.Scalar, (mask, 0.0, float("-inf")))
    return graph.call_function(aten.add.Tensor, (mask, bias))


def _site_scores(graph, by_name, site, query, bias=None, padding=None):
    """Attention each token receives in ``site`` from ``query`` (a row index or "mean"), mean over
    heads: [B, N]. Fused attention: only the needed softmax rows, from q and k (with ``bias``, see
    :func:`_mask_with_bias`; an eager site's probabilities include it already). ``padding``: which
    tokens are padding [B, N] bool; the real rows alone are averaged (query "mean")."""
    if site.probs is not None:
        if len(site.probs.shape) != 4:
            raise PruneError(f"attention probabilities '{site.probs.name}' are not [B, H, N, N]")
        return graph.call_function(ops.scores_from_probs, (by_name[site.probs.ref.name], query, padding))
    q, k = by_name[site.q.ref.name], by_name[site.k.ref.name]
    mask = _mask_with_bias(graph, by_name, site, bias)
    return graph.call_function(ops.scores_from_qk, (q, k, site.scale, mask, bool(site.node.attrs.get("is_causal")),
                                                    query, padding))


def _merge(graph, by_name, cut, size_in, biases: dict, positions=None):
    """Insert a merge: returns (merged stream [B, M, C], dest [B, N], rep [B, M]). ``biases``: as
    for :func:`_selection`; ``positions``: the original positions [B, N] of the tokens entering the
    cut (None at a first cut), for which of them are padding."""
    r = cut.reduce
    bias = biases.get(r.site.node.ref.name)
    x = by_name[cut.stream.ref.name]
    m = cut.kept
    weight = None
    padding = _padding(graph, by_name, cut, positions)  # ToMe's, PPT's and VisionZip's matching: kind with kind
    if isinstance(r, Bipartite):
        res = graph.call_function(ops.merge.tome_assign, (_site_keys(graph, by_name, r.site), r.r, r.prefix, cut.tag,
                                                          padding))
        weight = size_in
    elif isinstance(r, Fuse):
        scores = _site_scores(graph, by_name, r.site, 0, bias)
        res = graph.call_function(ops.merge.evit_assign, (scores, r.k, r.prefix, r.fuse, cut.tag,
                                                          r.keep if r.dynamic else None, padding))
        weight = graph.call_function(operator.getitem, (res, 1))
    elif isinstance(r, Contextual):
        scores = _site_scores(graph, by_name, r.site, 0, bias)
        res = graph.call_function(ops.merge.visionzip_assign, (scores, _site_keys(graph, by_name, r.site), r.dominant,
                                                               r.contextual, r.prefix, cut.tag, padding))
        weight = graph.call_function(operator.getitem, (res, 1))
    elif isinstance(r, Adaptive):
        cls = _site_scores(graph, by_name, r.site, 0, bias)
        scores = graph.call_function(ops.merge.ppt_scores, (cls, by_name[r.site.v.ref.name], r.prefix))
        res = graph.call_function(ops.merge.ppt_assign, (scores, _site_keys(graph, by_name, r.site), r.r, r.prefix,
                                                         r.threshold, cut.tag, padding))
        weight = size_in
    else:
        raise PruneError(f"the torch backend cannot lower {type(r).__name__}")
    dest = graph.call_function(operator.getitem, (res, 0))
    rep = graph.call_function(operator.getitem, (res, -1))
    if r.dynamic:  # M follows N (the kernels cap their counts at run time)
        m = graph.call_function(aten.sym_size.int, (rep, 1))
    merged = graph.call_function(ops.merge.merge_tokens, (x, dest, weight, m, r.normalize))
    return merged, dest, rep


def _named(graph, target, args, name):
    return graph.create_node("call_function", target, args, name=name)


def _size_state(graph, cut, size_in, x, idx, dest, m):
    """Token sizes after the cut [B, M, 1] (named ``<tag>_prunec_size``; ``m``: M, a number or a
    run-time size) and the tensors derived from them, built on demand: {role: node}."""
    if isinstance(cut.reduce, Merge):
        size = _named(graph, ops.merge.merge_sizes, (size_in, x, dest, m), f"{cut.tag}_{SIZE_TAG}")
    else:
        size = _named(graph, ops.gather_tokens, (size_in, idx, 1, 0), f"{cut.tag}_{SIZE_TAG}")
    made = {SIZE_TAG: size}

    def get(role):
        if role not in made:
            if role == LOGSIZE_TAG:  # [B, M, 1] -> [B, 1, 1, M]
                t = graph.call_function(aten.permute.default, (graph.call_function(aten.log.default, (size,)), [0, 2, 1]))
                made[role] = _named(graph, aten.unsqueeze.default, (t, 1), f"{cut.tag}_{LOGSIZE_TAG}")
            else:
                base, start = split_role(role)  # the tokens start: (a mean/sum over x[:, start:])
                name = f"{cut.tag}_{role}"
                if base == MEANW_TAG:  # size / mean over those tokens
                    part = graph.call_function(aten.slice.Tensor, (size, 1, start)) if start else size
                    mean = graph.call_function(aten.mean.dim, (part, [1], True))
                    made[role] = _named(graph, aten.div.Tensor, (part, mean), name)
                else:
                    made[role] = _named(graph, aten.slice.Tensor, (size, 1, start), name)
        return made[role]
    return get


def _add_bias(graph, by_name, site, bias):
    """Add log(size) [B, 1, 1, M] to the logits of ``site``: before the softmax (eager) or as
    the additive mask of a fused attention."""
    node = by_name[site.node.ref.name]
    if site.kind == "eager":
        logits = node.args[0]
        with graph.inserting_before(node):
            biased = graph.call_function(aten.add.Tensor, (logits, bias))
        node.replace_input_with(logits, biased)
        return
    slot = site.node.attrs.get("mask_arg", 3)  # a position, a keyword (private variants) or None
    if slot is None:
        raise PruneError(f"attention node '{site.node.name}' takes no mask; log(size) cannot be added")
    args = list(node.args)
    mask = args[slot] if isinstance(slot, int) and slot < len(args) else node.kwargs.get(
        slot if isinstance(slot, str) else "attn_mask")
    with graph.inserting_before(node):
        if mask is None:
            new = bias
        else:  # aten ops, so that analysis follows the token axes through them
            if site.mask is not None and site.mask.dtype == "bool":
                mask = _named(graph, aten.where.Scalar, (mask, 0.0, float("-inf")), f"{site.node.name}_{BIAS_TAG}_additive")
            new = _named(graph, aten.add.Tensor, (mask, bias), f"{site.node.name}_{BIAS_TAG}")
    if isinstance(slot, int) and slot < len(args):
        args[slot] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, slot if isinstance(slot, str) else "attn_mask": new}


def _recover(graph, by_name, cut, src, idx, dest, reduced, post):
    """Restore the tokens at ``cut.recovery.point`` to the length and order of ``src`` (the stream
    entering the cut); every use of the point after the cut (an earlier cut's recovery, when
    several restore there) reads the restored tensor [B, N, C]."""
    point = by_name[cut.recovery.point.ref.name]
    users = [u for u in point.users if u not in post]
    r = cut.reduce
    with graph.inserting_before(point.next):
        entry = _named(graph, aten.alias.default, (point,), f"{cut.tag}_{RECOVER_TAG}")
        mode = cut.recovery.mode
        if mode == "unmerge" and isinstance(r, GridPool):
            dest = graph.call_function(ops.select_fixed, (src, r.dest()))
        if mode == "attn":
            args, fn = (src, reduced, entry), ops.recover.recover_attn
        elif mode == "unmerge" and dest is not None:
            args, fn = (src, dest, entry), ops.recover.recover_unmerge
        else:
            args, fn = (src, idx, entry), ops.recover.recover_copy
        full = _named(graph, fn, args, f"{cut.tag}_{RECOVERED_TAG}")
    for u in users:
        u.replace_input_with(point, full)


def lower_fx(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """A new GraphModule (parameters and buffers shared, graph copied once) with every cut of
    ``plan`` lowered, in order. A cut reads what its parent left (gathered crossings, token
    sizes); where several cuts fix the same node (a log-size bias, a size weight, a token count,
    a shape literal), the last cut's fix is the one written."""
    shared = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    gm = copy.deepcopy(gm, shared)
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    fixes: dict = {}  # (what, node name[, slot]) -> a function writing that fix (later cuts overwrite)
    biases: dict = {}  # site node name -> the log-size bias the latest cut adds to it
    lowered: dict = {}  # cut tag -> (node names -> the nodes its children read, token sizes node or None, positions)
    track = any(c.padding is not None for c in plan.cuts)  # cuts read a padding mask at their tokens' positions
    for cut in plan.cuts:
        parent = lowered[cut.parent.tag] if cut.parent is not None else None
        lowered[cut.tag] = _lower_cut(graph, cut, by_name, order, parent, fixes, biases, track)
    for fix in fixes.values():  # the last cut's fix of each node
        fix()
    graph.lint()
    gm.recompile()
    return gm


def _lower_cut(graph, cut, nodes: dict, order: dict, parent, fixes: dict, biases: dict, track: bool = False):
    """Lower one cut; returns what its children read: (name -> node map, token sizes node, original
    positions of the kept tokens [B, M], tracked when ``track``, else None)."""
    by_name = dict(parent[0] if parent is not None else nodes)
    post = {nodes[n.ref.name] for n in cut.post}
    first_post = (min(post, key=order.__getitem__) if post  # no post-cut node: the stream is an output
                  else next(n for n in graph.nodes if n.op == "output"))
    size_in = parent[1] if parent is not None and parent[1] is not None else (
        by_name[cut.size_in.ref.name] if cut.size_in is not None else None)
    stream = by_name[cut.stream.ref.name]  # the tokens entering the cut [B, N, C]
    merged = dest = None
    with graph.inserting_before(first_post):
        if isinstance(cut.reduce, Merge):
            merged, dest, idx = _merge(graph, by_name, cut, size_in, biases, parent[2] if parent is not None else None)
            dest._rename(f"{cut.tag}_dest")
        else:
            idx = _selection(graph, by_name, cut, biases, parent[2] if parent is not None else None)
        idx._rename(f"{cut.tag}_keep_idx")  # found by name again by expose_fx
        # the kept count M: a number, or read off the kept indices at run time when it follows N
        kept = graph.call_function(aten.sym_size.int, (idx, 1)) if cut.dynamic else cut.kept
        keys = None  # P + M: the key length of the layers after the cut in a decoder with a KV cache
        if cut.past is not None:
            keys = graph.call_function(operator.add, (graph.call_function(aten.sym_size.int, (by_name[cut.past], 2)),
                                                      kept))
        sizes = _size_state(graph, cut, size_in, stream, idx, dest, kept) if cut.sizes_out else None
        for role in cut.size_roles():  # before the first post-cut node: every later use sees them
            sizes(role)
    reduced = merged
    for c in cut.crossings:
        src = by_name[c.value.ref.name]
        users = [u for u in src.users if u in post or (u.op == "output" and c.value is cut.stream)]
        if not users:
            continue
        with graph.inserting_before(min(users, key=lambda u: order.get(u, -1))):
            if c.role is not None:
                g = sizes(c.role)
            elif merged is not None and c.value is cut.stream:
                g = merged
            elif isinstance(cut.reduce, GridPool) and c.value is cut.stream:
                g = graph.call_function(ops.pool_tokens, (src, cut.reduce.prefix, cut.reduce.height,
                                                          cut.reduce.width, cut.reduce.fh, cut.reduce.fw))
            else:
                g = src
                for axis in c.token_axes:
                    if axis in c.key_axes:  # a decoder's keys: the cached entries, then the kept new ones
                        g = graph.call_function(ops.tokens.gather_keys, (g, idx, axis, c.batch_axis, stream,
                                                                          by_name[cut.past]))
                    else:
                        g = graph.call_function(ops.gather_tokens, (g, idx, axis, c.batch_axis))
        for u in users:
            u.replace_input_with(src, g)
        by_name[c.value.ref.name] = g
        if c.value is cut.stream:
            reduced = g
    if cut.recovery is not None:
        _recover(graph, by_name, cut, stream, idx, dest, reduced, post)
    for site in cut.bias_sites:
        biases[site.node.ref.name] = sizes(LOGSIZE_TAG)  # what a later cut scoring this site must add
        fixes[("bias", site.node.ref.name)] = functools.partial(_add_bias, graph, nodes, site, sizes(LOGSIZE_TAG))
    for rw in cut.reweigh:
        fixes[("reweigh", rw.node.ref.name)] = functools.partial(_reweigh, graph, nodes[rw.node.ref.name],
                                                                 sizes(rw.role))
    for fix in cut.count_fixes:  # x.sum(1) / N -> / M
        fixes[("count", fix.node.ref.name, fix.slot)] = functools.partial(_fix_count, nodes[fix.node.ref.name], fix)
    for fix in cut.shape_fixes:
        fixes[("shape", fix.node.ref.name)] = functools.partial(_fix_shape, nodes[fix.node.ref.name], fix, kept, keys)
    positions = None  # the kept tokens' original positions [B, M], where a padding mask is read
    if track:
        with graph.inserting_before(first_post):
            positions = idx if parent is None or parent[2] is None else graph.call_function(
                aten.gather.default, (parent[2], 1, idx))
    return by_name, (sizes(SIZE_TAG) if sizes is not None else None), positions


def _reweigh(graph, node, weight) -> None:
    """A token mean/sum after the cut reads its input times the tokens' size weight."""
    x = node.args[0]
    with graph.inserting_before(node):
        weighed = _named(graph, aten.mul.Tensor, (x, weight), f"{node.name}_{REWEIGH_TAG}")
    node.replace_input_with(x, weighed)


def _fix_count(node, fix) -> None:
    args = list(node.args)
    args[fix.slot] = int(fix.value) if isinstance(args[fix.slot], int) else fix.value
    node.args = tuple(args)


def _fix_shape(node, fix, m, keys=None) -> None:
    """The size argument's entries that spell N become M (a number, or the node reading M off the
    kept indices at run time); in a decoder with a KV cache those that spell past + N (the keys,
    ``fix.key_positions``) become ``keys`` = P + M."""
    def value(j):
        return keys if j in getattr(fix, "key_positions", ()) and keys is not None else m
    if "size" in node.kwargs:
        size = list(node.kwargs["size"])
        for j in fix.positions:
            size[j] = value(j)
        node.kwargs = {**node.kwargs, "size": _static_inferred(node, size, m)}
        return
    args = list(node.args)
    pos_arg = 0 if fix.node.op == "create" and not str(node.target).startswith("aten.new_") else 1
    size = list(args[pos_arg])
    for j in fix.positions:
        size[j] = value(j)
    args[pos_arg] = _static_inferred(node, size, m)
    node.args = tuple(args)


def _static_inferred(node, size: list, m) -> list:
    """With a run-time M (a node), a -1 entry of a view/reshape whose size is static (the heads of
    ``[B, M, -1, 16]``) is written as that number: torch.export would otherwise infer it by dividing
    two expressions of M, which its symbolic reasoning simplifies very slowly."""
    val = node.meta.get("val")
    if not isinstance(m, torch.fx.Node) or not isinstance(val, torch.Tensor) or len(val.shape) != len(size):
        return size
    return [int(d) if s == -1 and isinstance(d, int) else s for s, d in zip(size, val.shape)]


def expose_fx(gm: torch.fx.GraphModule, steps: list, what: list[str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` (weights shared) returning ``(outputs, extras)``: its own outputs unchanged
    and a dict with ``"sizes"`` [B, M] float32 and/or ``"kept_indices"`` [B, M] int64 of the tokens
    the last cut left (as ``prunec.ops.tokens.compose_cuts``). ``steps``: every cut (tag, tokens
    in N, tokens out M, static dest [N] or None), in order; a cut's kept indices and a merge's
    dest are the nodes ``<tag>_keep_idx`` / ``<tag>_dest`` that :func:`lower_fx` named."""
    import torch.utils._pytree as pytree

    shared = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    gm = copy.deepcopy(gm, shared)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    out = next(n for n in graph.nodes if n.op == "output")
    args = []
    for tag, n, m, static_dest in steps:
        if f"{tag}_keep_idx" not in nodes:
            raise PruneError(f"cannot expose token sizes: the kept indices of cut '{tag}' are not in the graph")
        args.append((nodes[f"{tag}_keep_idx"], nodes.get(f"{tag}_dest", static_dest), n, m))
    with graph.inserting_before(out):
        res = graph.call_function(ops.tokens.compose_cuts, (args,))
        made = {"sizes": graph.call_function(operator.getitem, (res, 0)),
                "kept_indices": graph.call_function(operator.getitem, (res, 1))}
    keys = [k for k in ("sizes", "kept_indices") if (k if k == "sizes" else "indices") in what]
    info = graph._codegen.pytree_info
    flat = list(out.args[0])
    structure = pytree.tree_unflatten([0] * len(flat), info.out_spec)
    out.args = (tuple(flat + [made[k] for k in keys]),)
    graph._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure((structure, {k: 0 for k in keys})))
    graph.lint()
    gm.recompile()
    return gm
