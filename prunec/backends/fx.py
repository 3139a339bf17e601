"""Lower a Plan onto a torch.export / fx GraphModule.

Inserts ``call_function`` nodes that call the plain-torch kernels in
:mod:`prunec.ops`, rewires every post-cut use of a crossing edge to its gathered
version, rewrites size literals that spell N, and recompiles. The result is an
ordinary GraphModule that ``torch.export`` can export again.
"""
from __future__ import annotations

import copy

import torch
import torch.fx

from .. import ops
from ..errors import PruneError
from ..passes.base import Diverse, GridPool, PageRank, Plan, Random, TopK


def _selection(graph: torch.fx.Graph, by_name: dict, cut):
    """Insert the nodes computing the kept indices [B, M] of ``cut``."""
    r = cut.reduce
    if isinstance(r, GridPool):  # side inputs follow each window's first token
        return graph.call_function(ops.select_fixed, (by_name[cut.stream.ref.name], r.representatives(), cut.tag))
    if isinstance(r, Diverse):
        return graph.call_function(ops.select_diverse, (by_name[r.features.ref.name], r.k, r.span_start, r.span_end,
                                                         cut.tag))
    if isinstance(r, Random):
        return graph.call_function(ops.select_random, (by_name[cut.stream.ref.name], r.k, r.span_start, r.span_end,
                                                        r.seed, cut.tag))
    if isinstance(r, PageRank):
        site = r.site
        if site.probs is not None:
            probs = by_name[site.probs.ref.name]
            kt = by_name[site.k_t.ref.name]  # [B, H, D, N]
            keys = graph.call_function(torch.ops.aten.permute.default, (kt, [0, 3, 1, 2]))
        else:
            q, k = by_name[site.q.ref.name], by_name[site.k.ref.name]
            mask = by_name[site.mask.ref.name] if site.mask is not None else None
            probs = graph.call_function(ops.full_probs, (q, k, site.scale, mask, bool(site.node.attrs.get("is_causal"))))
            keys = graph.call_function(torch.ops.aten.permute.default, (k, [0, 2, 1, 3]))
        keys = graph.call_function(torch.ops.aten.flatten.using_ints, (keys, 2))
        return graph.call_function(ops.select_zero_tprune, (probs, keys, r.k, r.span_start, r.span_end, r.iters,
                                                            r.drop_similar, r.cls, cut.tag))
    if not isinstance(r, TopK):
        raise PruneError(f"the torch backend cannot lower {type(r).__name__}")
    site, query = r.score.site, r.score.query
    if site.probs is not None:
        if len(site.probs.shape) != 4:
            raise PruneError(f"attention probabilities '{site.probs.name}' are not [B, H, N, N]")
        scores = graph.call_function(ops.scores_from_probs, (by_name[site.probs.ref.name], query))
    else:
        q, k = by_name[site.q.ref.name], by_name[site.k.ref.name]
        mask = by_name[site.mask.ref.name] if site.mask is not None else None
        scores = graph.call_function(ops.scores_from_qk, (q, k, site.scale, mask, bool(site.node.attrs.get("is_causal")),
                                                          query))
    return graph.call_function(ops.select_topk, (scores, r.k, r.span_start, r.span_end, cut.tag))


def lower_fx(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    plan.check_single_cut()
    gm = copy.deepcopy(gm)
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for cut in plan.cuts:
        post = {by_name[n.ref.name] for n in cut.post}
        first_post = min(post, key=order.__getitem__)
        with graph.inserting_before(first_post):
            idx = _selection(graph, by_name, cut)
        for c in cut.crossings:
            src = by_name[c.value.ref.name]
            users = [u for u in src.users if u in post or (u.op == "output" and src.name == cut.stream.ref.name)]
            if not users:
                continue
            with graph.inserting_before(min(users, key=order.__getitem__)):
                if isinstance(cut.reduce, GridPool) and c.value is cut.stream:
                    g = graph.call_function(ops.pool_tokens, (src, cut.reduce.prefix, cut.reduce.height,
                                                              cut.reduce.width, cut.reduce.fh, cut.reduce.fw))
                else:
                    g = src
                    for axis in c.token_axes:
                        g = graph.call_function(ops.gather_tokens, (g, idx, axis, c.batch_axis))
            for u in users:
                u.replace_input_with(src, g)
        m = cut.kept
        for fix in cut.shape_fixes:
            node = by_name[fix.node.ref.name]
            args = list(node.args)
            pos_arg = 0 if fix.node.op == "create" and not str(node.target).startswith("aten.new_") else 1
            if "size" in node.kwargs:
                size = list(node.kwargs["size"])
                for j in fix.positions:
                    size[j] = m
                node.kwargs = {**node.kwargs, "size": size}
            else:
                size = list(args[pos_arg])
                for j in fix.positions:
                    size[j] = m
                args[pos_arg] = size
                node.args = tuple(args)
    graph.lint()
    gm.recompile()
    return gm
