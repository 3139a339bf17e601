"""FastV on a decoder with a KV cache: time to first token and decode speed, pruned vs unpruned.

The model is LLaVA-1.5-shaped, scaled to a small machine: an HF ``LlamaForCausalLM`` with random
weights (default 8 layers, hidden 1024, 16 heads of 64, 16 KV heads as LLaVA-1.5 has no GQA,
intermediate 2816, vocab 32000), exported by the dynamo exporter (opset 18) with the cache in the
Optimum layout (``prunec.examples.export_cached_decoder``). The prompt is 35 text tokens,
576 "image" tokens and 29 text tokens (640; LLaVA-1.5's image span is 35:611), random ids, no
padding. FastV keep 0.25 before layer 2 over the image span, so layers 2.. see M = 64 + 144 = 208
tokens and cache only those; the pruned model's prefill returns logits for the M kept tokens.

For each batch (``--batches``) the unpruned and the pruned model generate ``--new-tokens`` tokens
greedily with ``prunec.generate`` (ORT, CPUExecutionProvider with default threads, or CUDA), after
a warm-up, ``--repeats`` times, alternating which of the two goes first each repeat so that
machine noise hits both. ``generate`` is handed a session wrapper that clocks each run:

* prefill ms (time to first token): the first run (the whole prompt), median over repeats;
* decode tokens/s: B x (new - 1) tokens made by the decode steps / the time from the end of the
  prefill to the end of ``generate`` (host work between steps included), median over repeats.

The FLOPs ideal of the prefill counts the matmuls: per layer q/k/v/o projections, attention
scores and values (2·t²·hidden each, the full square as the exported graph computes it) and the
three MLP matmuls, plus the lm_head on every position the model returns logits for (N unpruned,
M pruned). Printed: the speedup t_unpruned / t_pruned, the ideal flops_unpruned / flops_pruned and
the fraction of the ideal reached (speedup / ideal, target >= 0.9), and decode tokens/s (target:
pruned not lower). Beforehand a sanity line checks that FastV keep=1.0 generates the same first
tokens as the unpruned model (not timed).

    python benchmarks/decode.py                          # batch 1 and 4, 64 new tokens (minutes on 2 cores)
    python benchmarks/decode.py --quick                  # tiny smoke test: 2 layers, hidden 128
    python benchmarks/decode.py --batches 1 --repeats 3 --keep-files /tmp/prunec-decode --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TEXT_BEFORE, TEXT_AFTER, HEAD_DIM, VOCAB = 35, 29, 64, 32000
KINDS = ("unpruned", "pruned")


def config(layers: int, hidden: int):
    from transformers import LlamaConfig

    heads = hidden // HEAD_DIM
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=2048)


def export(cfg, path: Path) -> Path:
    """Random-weight Llama, dynamo export (opset 18), dynamic batch, sequence and past."""
    from transformers import LlamaForCausalLM

    from prunec.examples import export_cached_decoder

    torch.manual_seed(0)
    return export_cached_decoder(LlamaForCausalLM(cfg).eval(), path)


def prefill_flops(cfg, n: int, kept: int, layer: int) -> float:
    """Matmul FLOPs of a prefill of n tokens (per row) when layers >= ``layer`` see ``kept`` tokens."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * HEAD_DIM

    def block(t):  # q, o: d x d; k, v: d x kv; scores and values: t x t x d each; MLP: gate, up, down
        return 2 * t * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * 2 * t * t * d

    layers = [block(n if i < layer else kept) for i in range(cfg.num_hidden_layers)]
    return sum(layers) + 2 * kept * d * cfg.vocab_size  # lm_head on every position with logits


class Clocked:
    """An ORT session for ``prunec.generate`` that records (start, end, logits length) per run."""

    def __init__(self, sess):
        self.sess, self.runs = sess, []

    def __getattr__(self, name):  # get_inputs, get_outputs
        return getattr(self.sess, name)

    def run(self, names, feeds):
        t0 = time.perf_counter()
        out = self.sess.run(names, feeds)
        self.runs.append((t0, time.perf_counter(), out[0].shape[1]))
        return out


def timed_generate(sess, ids: np.ndarray, new: int, device: str) -> dict:
    import prunec

    clocked = Clocked(sess)
    prunec.generate(clocked, ids, max_new_tokens=new, device=device)
    end = time.perf_counter()
    (t0, t1, kept), steps = clocked.runs[0], len(clocked.runs) - 1
    return dict(prefill_ms=1e3 * (t1 - t0), tok_s=ids.shape[0] * steps / (end - t1) if steps else float("nan"),
                kept=kept)


def spread(values: list[float], digits: int) -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4", help="batch sizes, comma-separated (default 1,4)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per model and batch (default 5)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size; heads = hidden / 64 (default 1024)")
    ap.add_argument("--image-tokens", type=int, default=576, help="length of the pruned span (default 576)")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--layer", type=int, default=2, help="FastV cut before this layer (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 layers, hidden 128, 64 image tokens, 8 new tokens, 2 repeats, cut at layer 1")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="ORT execution provider (default cpu)")
    ap.add_argument("--keep-files", metavar="DIR", help="keep the export here and reuse it in later runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.image_tokens, args.new_tokens, args.repeats = 2, 128, 64, 8, 2
    args.layer = min(args.layer, args.layers - 1)
    batches = [int(v) for v in args.batches.split(",") if v]

    import prunec
    from prunec.ir.session import make_session, providers
    from rich.console import Console
    from rich.table import Table

    log = Console(width=200) if not Console().is_terminal else Console()
    try:
        provider = providers(args.device)
    except prunec.PruneError as e:
        sys.exit(f"--device {args.device}: {e}")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    cfg = config(args.layers, args.hidden)
    n = TEXT_BEFORE + args.image_tokens + TEXT_AFTER
    span = f"{TEXT_BEFORE}:{TEXT_BEFORE + args.image_tokens}"
    folder = Path(args.keep_files or tempfile.mkdtemp(prefix="prunec-decode-"))
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"llama_L{args.layers}_H{args.hidden}_kv.onnx"
    log.print(f"decoder: {args.layers} layers, hidden {args.hidden}, {cfg.num_attention_heads} heads "
              f"(KV {cfg.num_key_value_heads}), intermediate {cfg.intermediate_size}, vocab {VOCAB}; prompt {n} "
              f"tokens, span {span}; load average {load_start[0]:.2f} on {os.cpu_count()} CPUs")
    if not base.exists():
        with log.status(f"exporting to {base}"):
            t0 = time.perf_counter()
            export(cfg, base)
        log.print(f"exported in {time.perf_counter() - t0:.0f} s ({base.stat().st_size / 2**20:.0f} MiB)")
    paths = {}
    for name, keep in (("pruned", args.keep), ("keep1", 1.0)):
        with log.status(f"FastV keep {keep} before layer {args.layer}, span {span}"):
            t0 = time.perf_counter()
            out = prunec.Pipeline([prunec.passes.FastV(keep=keep, layer=str(args.layer), span=span)])(
                prunec.load(base, probe_length=n))
            paths[name] = out.save(folder / f"{base.stem}_{name}.onnx")
            del out
        log.print(f"FastV keep {keep}: rewritten and saved in {time.perf_counter() - t0:.0f} s")

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, VOCAB, (max(batches), n), dtype=np.int64)
    sessions = {k: make_session(str(p), provider) for k, p in
                (("unpruned", base), ("pruned", paths["pruned"]), ("keep1", paths["keep1"]))}
    check = min(8, args.new_tokens)
    a = prunec.generate(sessions["unpruned"], prompts[:1], max_new_tokens=check, device=args.device)[0, n:]
    b = prunec.generate(sessions.pop("keep1"), prompts[:1], max_new_tokens=check, device=args.device)[0, n:]
    same = a.tolist() == b.tolist()
    log.print(f"sanity: keep=1.0 vs unpruned, first {check} generated tokens "
              f"{'identical' if same else '[red]DIFFER[/red]'}: {a.tolist()}" + ("" if same else f" vs {b.tolist()}"))

    results = {(k, bs): [] for k in KINDS for bs in batches}
    for bs in batches:  # warm-up: ORT's first runs at a shape allocate
        for k in KINDS:
            timed_generate(sessions[k], prompts[:bs], 2, args.device)
    for r in range(args.repeats):
        for bs in batches:
            for k in (KINDS if r % 2 == 0 else KINDS[::-1]):
                with log.status(f"repeat {r + 1}/{args.repeats}, batch {bs}, {k}"):
                    results[k, bs].append(timed_generate(sessions[k], prompts[:bs], args.new_tokens, args.device))
            u, p = results["unpruned", bs][-1], results["pruned", bs][-1]
            log.print(f"repeat {r + 1}/{args.repeats} batch {bs}: prefill {u['prefill_ms']:.0f} / {p['prefill_ms']:.0f}"
                      f" ms, decode {u['tok_s']:.1f} / {p['tok_s']:.1f} tok/s (unpruned / pruned)")
    total, load_end = time.perf_counter() - t_start, os.getloadavg()

    t = Table(title=f"FastV keep {args.keep} before layer {args.layer}, span {span}, with KV cache; ORT "
                    f"{provider[0]}, {args.new_tokens} new tokens, median (min-max) of {args.repeats} "
                    f"interleaved repeats")
    for col in ("batch", "tokens", "prefill ms unpruned", "prefill ms pruned", "speedup", "FLOPs ideal",
                "of ideal", "decode tok/s unpruned", "decode tok/s pruned", "decode pruned/unpruned"):
        t.add_column(col, justify="right")
    rows = []
    for bs in batches:
        runs = {k: {m: [r[m] for r in results[k, bs]] for m in ("prefill_ms", "tok_s")} for k in KINDS}
        med = {k: {m: statistics.median(v) for m, v in runs[k].items()} for k in KINDS}
        kept = results["pruned", bs][0]["kept"]
        ideal = prefill_flops(cfg, n, n, args.layer) / prefill_flops(cfg, n, kept, args.layer)
        speedup = med["unpruned"]["prefill_ms"] / med["pruned"]["prefill_ms"]
        decode, frac = med["pruned"]["tok_s"] / med["unpruned"]["tok_s"], speedup / ideal
        cell = {(k, m): spread(v, 1 if m == "tok_s" else 0) for k in KINDS for m, v in runs[k].items()}
        t.add_row(str(bs), f"{n}->{kept}", cell["unpruned", "prefill_ms"], cell["pruned", "prefill_ms"],
                  f"{speedup:.2f}x", f"{ideal:.2f}x", f"{frac:.2f}" + ("" if frac >= 0.9 else " [red]<0.9[/red]"),
                  cell["unpruned", "tok_s"], cell["pruned", "tok_s"],
                  f"{decode:.2f}" + ("" if decode >= 1 else " [red]<1[/red]"))
        rows.append(dict(batch=bs, tokens=n, kept=kept, speedup=speedup, ideal=ideal, of_ideal=frac,
                         decode_ratio=decode))
    log.print(t)
    log.print(f"total {total:.0f} s; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    if not args.keep_files:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return {"same": same, "rows": rows}


if __name__ == "__main__":
    sys.exit(0 if main()["same"] else 1)  # keep=1.0 must generate as the unpruned model
