"""FastV speed on timm vit_base_patch16_224 (random weights), batch 8, keep 0.25 after layer 2.

Prints unpruned vs pruned latency on ORT CPU and torch (fx path), the block-FLOPs ideal
speedup, measured / ideal, and the time ``prunec`` takes to rewrite the ONNX file.

    python benchmarks/speed.py [--batch 8] [--keep 0.25] [--layer 2] [--repeat 10]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import timm
    from rich.console import Console
    from rich.table import Table

    import prunec
    from prunec.bench import ideal_speedup, time_pair

    console = Console(width=200) if not Console().is_terminal else Console()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    tmp = Path(tempfile.mkdtemp(prefix="prunec-bench-"))
    src, dst = tmp / "vit.onnx", tmp / "vit.fastv.onnx"
    with console.status("exporting ONNX (dynamo, opset 18)"):
        torch.onnx.export(model, (x,), str(src), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
    with console.status("prunec rewrite (CLI, timed)"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "prunec.cli", str(src), "--pass", "fastv", "--keep",
                            str(args.keep), "--layer", str(args.layer), "-o", str(dst)], capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        if r.returncode:
            sys.exit(r.stderr)
        t0 = time.perf_counter()
        base_onnx = prunec.load(src)
        t1 = time.perf_counter()
        pruned_onnx = prunec.passes.FastV(keep=args.keep, layer=args.layer)(base_onnx)
        t2 = time.perf_counter()
        load_s, rewrite_s = t1 - t0, t2 - t1
    fastv = prunec.passes.FastV(keep=args.keep, layer=args.layer)
    with console.status("torch.export + fx rewrite"):
        base_torch = prunec.load(model, (x,))
        pruned_torch = fastv(base_torch)
    facts = base_onnx.facts()
    plan = fastv.plan(base_onnx)
    kept = plan.cuts[0].kept
    ideal = ideal_speedup(facts, [(args.layer, kept)])
    rows = []
    threads = torch.get_num_threads()
    for backend, base, pruned in (("ORT CPU", base_onnx, pruned_onnx), ("torch (fx)", base_torch, pruned_torch)):
        with console.status(f"timing {backend}"):
            (a, da), (b, db) = time_pair("onnx" if backend.startswith("ORT") else "torch", base, pruned,
                                         {"x": x} if backend.startswith("ORT") else ((x,), {}), repeat=args.repeat)
        rows.append((backend, a, da, b, db, a / b))
    t = Table(title=f"FastV on {args.model}, batch {args.batch}, keep {args.keep} after layer {args.layer}: "
                    f"{facts.num_tokens} -> {kept} tokens ({threads} threads)")
    for col in ("backend", "unpruned ms", "pruned ms", "speedup", "FLOPs ideal", "measured / ideal"):
        t.add_column(col, justify="right")
    for backend, a, da, b, db, s in rows:
        t.add_row(backend, f"{a:.1f} ±{da:.1f}", f"{b:.1f} ±{db:.1f}", f"{s:.2f}x", f"{ideal:.2f}x", f"{s / ideal:.2f}")
    console.print(t)
    size_mb = src.stat().st_size / 2**20
    console.print(f"prunec rewrite (analyse + plan + lower + onnx.checker + ORT check run): {rewrite_s:.2f} s; "
                  f"reading the {size_mb:.0f} MiB model: {load_s:.2f} s; CLI end to end (process start, read, "
                  f"rewrite, write): {cli_s:.2f} s")


if __name__ == "__main__":
    main()
