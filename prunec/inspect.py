"""``prunec inspect``: the analysis facts of a model as a dict and as rich tables."""
from __future__ import annotations

from .errors import PruneError
from .passes.analysis.blocks import SIZE_TAG, size_role
from .passes.analysis.consumers import full_token_consumers
from .passes.cut import plan_cut

RECOVER_HINT = ("pooling them outside the graph weighs the remaining tokens wrongly; --recover unmerge (after a "
                "merge) or --recover copy (after a selection) returns every token; --expose sizes,indices adds "
                "each token's size and original position as outputs for your own pooling")


def _rewritten_by_prunec(graph) -> bool:
    """Whether a prunec cut is in the graph (its kept-index tensors, or calls of prunec.ops)."""
    for node in graph.nodes:
        if any("keep_idx" in o.name for o in node.outputs):
            return True
        if str(getattr(getattr(node.ref, "target", None), "__module__", "")).startswith("prunec.ops"):
            return True
    return False


def reduced_token_outputs(facts) -> list[dict]:
    """Graph outputs of a prunec-rewritten model that carry fewer tokens than enter it ([B, M, C]
    with M < N): a backbone's token output after a cut without recovery. ``merged``: the tokens
    carry sizes (a merge), so a plain mean over them is not the original mean."""
    g = facts.graph
    if not _rewritten_by_prunec(g):
        return []
    _, n, c = facts.streams[0].shape
    merged = any(size_role(v) == SIZE_TAG for v in g.values())
    return token_output_rows([(v.name, v.shape) for v in g.outputs], n, c, merged)


def onnx_reduced_outputs(model, n: int, c: int, cuts) -> list[dict]:
    """:func:`reduced_token_outputs` of an ONNX model prunec wrote (an onnx-ir Model), read off its
    graph outputs' declared shapes, which the lowering writes (M, or ``<cut>_tokens`` for a dynamic
    count), against the token count ``n`` and width ``c`` entering it: no analysis of the model.
    ``cuts``: the model's (tag, tokens in, tokens out) records."""
    names = [o.name for node in model.graph for o in node.outputs]
    if not any(name.endswith("keep_idx") for name in names):
        return []
    merged = any(name.endswith(SIZE_TAG) for name in names)
    outputs = [(v.name, None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape])
               for v in model.graph.outputs]
    return token_output_rows(outputs, n, c, merged, {f"{tag}_tokens": m for tag, _, m in cuts})


def token_output_rows(outputs, n: int, c: int, merged: bool, kept: dict | None = None) -> list[dict]:
    """The rows of :func:`reduced_token_outputs` from graph outputs [(name, shape)]: [B, M, C] with
    M < N tokens (``n`` entering, ``c`` wide). M named ``<cut>_tokens`` (a dynamic token count, as the
    ONNX lowering declares it) counts as reduced, shown as ``kept[name]`` (the cut's count at the
    probe) or as N when it is the same there; an exporter's own symbolic size does not count."""
    names = {name for name, _ in outputs}
    rows = []
    for name, shape in outputs:
        if shape is None or len(shape) != 3 or (isinstance(shape[-1], int) and shape[-1] != c):
            continue  # (an exporter may leave the width symbolic)
        dynamic = not isinstance(shape[1], int) and str(shape[1]).endswith("_tokens")
        m = shape[1] if isinstance(shape[1], int) else (kept or {}).get(str(shape[1]), n) if dynamic else None
        if m is not None and (1 <= m < n or dynamic):
            rows.append({"name": name, "shape": [shape[0], m, c], "tokens_in": n, "merged": merged,
                         "exposed": [f"{name}.{s}" for s in ("sizes", "kept_indices") if f"{name}.{s}" in names]})
    return rows


def describe(model) -> dict:
    facts = model.facts()
    layers = []
    for s, stream, fl in zip(facts.sites, facts.streams, facts.flops):
        masks = (s.mask, s.node.attrs.get("key_mask"), s.node.attrs.get("seqlens_k"))  # ORT ops: key mask / lengths
        layers.append({
            "layer": s.layer, "attention": s.kind, "node": s.node.name, "heads": s.heads,
            "causal": s.causal, "mask": next((m.name for m in masks if m is not None), None),
            "probabilities": s.probs.name if s.probs is not None else None,
            "stream": stream.name, "stream_shape": list(stream.shape), "gflops": round(fl / 1e9, 4),
        })
    shape_literals = []
    if facts.depth > 1:
        try:
            shape_literals = [f.node.name for f in plan_cut(facts, 1, None, tag="inspect").shape_fixes]
        except PruneError:  # a model prunec already cut: its literals were rewritten then
            pass
    return {
        "kind": model.kind,
        "tokens": facts.num_tokens,
        "batch": facts.streams[0].shape[0],
        "prefix_tokens": facts.prefix,
        "causal": facts.causal,
        "layers": layers,
        "side_inputs": [{"name": v.name, "shape": list(v.shape), "token_axes": facts.token_axes(v)}
                        for v in facts.side_inputs],
        "token_count_literals": shape_literals,
        "full_token_consumers": [{"kind": c.kind, "node": c.name, "reads": c.value.name, "shape": list(c.value.shape),
                                  "needs_recovery": c.needs_recovery} for c in full_token_consumers(facts)],
        "reduced_token_outputs": reduced_token_outputs(facts),
        "total_gflops": round(sum(facts.flops) / 1e9, 4),
    }


def render(info: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{info['kind']} model[/bold]: {len(info['layers'])} attention layers, "
                  f"{info['tokens']} tokens (probe batch {info['batch']}), "
                  f"{info['prefix_tokens']} prefix token(s), "
                  f"{'causal decoder' if info['causal'] else 'bidirectional encoder'}")
    t = Table(title="attention sites and blocks", title_justify="left")
    for col in ("layer", "attention", "node", "heads", "causal", "mask", "stream (entering)", "GFLOPs"):
        t.add_column(col)
    for row in info["layers"]:
        t.add_row(str(row["layer"]), row["attention"] + ("" if row["probabilities"] else " (no probs)"),
                  row["node"], str(row["heads"]), str(row["causal"]), row["mask"] or "-",
                  f"{row['stream']} {row['stream_shape']}", f"{row['gflops']:.4f}")
    console.print(t)
    if info["side_inputs"]:
        s = Table(title="token-carrying side inputs read inside the blocks", title_justify="left")
        for col in ("tensor", "shape", "token axes"):
            s.add_column(col)
        for row in info["side_inputs"]:
            s.add_row(row["name"], str(row["shape"]), str(row["token_axes"]))
        console.print(s)
    lits = info["token_count_literals"]
    console.print(f"shape literals spelling the token count after layer 0: {len(lits)}"
                  + (f" ({', '.join(lits[:6])}{', ...' if len(lits) > 6 else ''})" if lits else ""))
    cons = info.get("full_token_consumers") or []
    if cons:
        c = Table(title="consumers that need every token (recovery restores them; token outputs only on request)",
                  title_justify="left")
        for col in ("kind", "node / output", "reads", "restored by default"):
            c.add_column(col)
        for row in cons:
            c.add_row(row["kind"], row["node"], f"{row['reads']} {row['shape']}", "yes" if row["needs_recovery"] else "no")
        console.print(c)
    for row in info.get("reduced_token_outputs") or []:
        console.print(f"[yellow]reduced token output[/yellow] {row['name']} {row['shape']}: {row['shape'][1]} of "
                      f"{row['tokens_in']} tokens{' (merged: size-weighted)' if row['merged'] else ''}; "
                      + (f"exposed: {', '.join(row['exposed'])} (--expose)" if row.get("exposed") else RECOVER_HINT))
    console.print(f"total block FLOPs: {info['total_gflops']:.4f} G")
