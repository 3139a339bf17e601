"""ToMe speed on timm vit_base_patch16_224 (random weights), batch 8, r = 8 and 16.

For each r: tokens per layer (entering attention -> after the merge), the block-FLOPs
ideal speedup, unmerged vs merged latency on ORT CPU (dynamo ONNX, opset 18) and torch
(fx path), measured / ideal, and the merge overhead: the share of the merged model's time
spent in the ops prunec inserted (matching, merging, sizes, log-size bias), read off ORT's
profiler (nodes named ``tome_l*``) and off a timed fx Interpreter run (nodes the rewrite
added).

    python benchmarks/tome_speed.py [--batch 8] [--r 8 16] [--repeat 10]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def ort_overhead(model, feeds, prefix: str = "tome_l") -> float:
    """Share of kernel time in nodes whose name starts with ``prefix`` (ORT profiler, 3 runs)."""
    import onnxruntime as ort

    from prunec.backends.onnx import graph_only_proto

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    keep: list = []
    proto = graph_only_proto(model.model, so, keepalive=keep)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(4):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    total = inserted = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        total += e["dur"]
        if e["name"].startswith(prefix):
            inserted += e["dur"]
    return inserted / total


def fx_overhead(base_gm, gm, args) -> float:
    """Share of a timed fx Interpreter run spent in nodes the rewrite added."""
    original = {n.name for n in base_gm.graph.nodes}
    times = {"added": 0.0, "all": 0.0}

    class Timed(torch.fx.Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            dt = time.perf_counter() - t0
            times["all"] += dt
            if n.op == "call_function" and n.name not in original:
                times["added"] += dt
            return out

    with torch.inference_mode():
        for _ in range(3):
            times.update(added=0.0, all=0.0)
            Timed(gm).run(*args)
    return times["added"] / times["all"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import timm
    from rich.console import Console
    from rich.table import Table

    import prunec
    from prunec.bench import merge_ideal_speedup, time_pair

    console = Console(width=200)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    src = Path(tempfile.mkdtemp(prefix="prunec-bench-")) / "vit.onnx"
    with console.status("exporting ONNX (dynamo, opset 18)"):
        torch.onnx.export(model, (x,), str(src), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
    base_onnx = prunec.load(src)
    with console.status("torch.export"):
        base_torch = prunec.load(model, (x,))
    facts = base_onnx.facts()
    threads = torch.get_num_threads()
    t = Table(title=f"ToMe on {args.model}, batch {args.batch} ({threads} threads)")
    for col in ("r", "backend", "rewrite s", "unmerged ms", "merged ms", "speedup", "FLOPs ideal", "measured / ideal",
                "merge overhead"):
        t.add_column(col, justify="right")
    tokens_rows = []
    for r in args.r:
        tome = prunec.passes.ToMe(r=str(r))
        with console.status(f"rewriting r={r} (ONNX)"):
            t0 = time.perf_counter()
            merged_onnx = tome(base_onnx)
            onnx_s = time.perf_counter() - t0
        with console.status(f"rewriting r={r} (torch)"):
            t0 = time.perf_counter()
            merged_torch = tome(base_torch)
            torch_s = time.perf_counter() - t0
        n, tin, tmid = facts.num_tokens, [], []
        for rr in tome.schedule(facts.depth):
            rr = min(rr, (n - facts.prefix) // 2)
            tin.append(n)
            n -= rr
            tmid.append(n)
        tokens_rows.append((r, tin, tmid))
        ideal = merge_ideal_speedup(facts, tin, tmid)
        for backend, base, merged, rew in (("ORT CPU", base_onnx, merged_onnx, onnx_s),
                                           ("torch (fx)", base_torch, merged_torch, torch_s)):
            with console.status(f"timing r={r} {backend}"):
                onnx = backend.startswith("ORT")
                (a, da), (b, db) = time_pair("onnx" if onnx else "torch", base, merged,
                                             {"x": x} if onnx else ((x,), {}), repeat=args.repeat)
                over = (ort_overhead(merged, {"x": x.numpy()}) if onnx
                        else fx_overhead(base.gm, merged.gm, (x,)))
            s = a / b
            t.add_row(str(r), backend, f"{rew:.1f}", f"{a:.1f} ±{da:.1f}", f"{b:.1f} ±{db:.1f}", f"{s:.2f}x",
                      f"{ideal:.2f}x", f"{s / ideal:.2f}", f"{100 * over:.1f}%")
    console.print(t)
    for r, tin, tmid in tokens_rows:
        console.print(f"r={r} tokens per layer (attention -> MLP): " + ", ".join(f"{a}->{b}" for a, b in zip(tin, tmid)))


if __name__ == "__main__":
    main()
