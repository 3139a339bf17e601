"""Selection passes on timm vit_base_patch16_224 (random weights), batch 8, cut before layer 2.

For each pass at keep 0.5 and 0.25 (pool: factor 2, which keeps 0.25 of the patches):
unpruned vs pruned latency on ORT CPU and torch (fx path), the block-FLOPs ideal
speedup, measured / ideal, and the cost of the selection itself: the pruned model's
latency minus that of `random` at the same keep (whose selection is a constant), and the
selection kernel timed alone in torch.

    python benchmarks/selection.py [--batch 8] [--repeat 10] [--passes fastv,cls-attn,divprune,random,pool]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--passes", default="fastv,cls-attn,divprune,zero-tprune,random,pool")
    args = ap.parse_args()

    import timm
    from rich.console import Console
    from rich.table import Table

    import prunec
    from prunec import ops
    from prunec.bench import ideal_speedup, median_ms, time_pair

    console = Console(width=200) if not Console().is_terminal else Console()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    src = Path(tempfile.mkdtemp(prefix="prunec-bench-")) / "vit.onnx"
    with console.status("exporting ONNX"):
        torch.onnx.export(model, (x,), str(src), dynamo=True, opset_version=18, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
        base_onnx = prunec.load(src)
        base_torch = prunec.load(model, (x,))
    facts = base_onnx.facts()
    rows, latency = [], {}
    for name in args.passes.split(","):
        for keep in (0.5, 0.25):
            if name == "pool":
                if keep != 0.25:
                    continue
                opts = dict(factor=2, layer=str(args.layer))
            else:
                opts = dict(keep=keep, layer=str(args.layer))
            p = prunec.passes.get(name)(**opts)
            with console.status(f"{name} keep {keep}: rewriting"):
                po, pt = p(base_onnx), p(base_torch)
            kept = p.plan(base_onnx).cuts[0].kept
            ideal = ideal_speedup(facts, [(args.layer, kept)])
            for backend, base, pruned, inputs in (("ORT CPU", base_onnx, po, {"x": x.numpy()}),
                                                  ("torch", base_torch, pt, ((x,), {}))):
                with console.status(f"{name} keep {keep}: timing {backend}"):
                    (a, _), (b, _) = time_pair("onnx" if backend == "ORT CPU" else "torch", base, pruned, inputs,
                                               repeat=args.repeat)
                latency[(name, keep, backend)] = (a, b)
                rows.append((name, keep, kept, backend, a, b, ideal))
    # the selection kernel alone (torch), on the tensors it sees at the cut
    n, c = facts.tokens(args.layer), facts.streams[args.layer].shape[-1]
    feats = torch.randn(args.batch, n, c)
    probs = torch.softmax(torch.randn(args.batch, 12, n, n), -1)
    kernels = {
        "fastv": lambda k: ops.select_topk(ops.scores_from_probs(probs, 0), k, 1, n),
        "cls-attn": lambda k: ops.select_topk(ops.scores_from_probs(probs, 0), k, 1, n),
        "divprune": lambda k: ops.select_diverse(feats, k, 1, n),
        "random": lambda k: ops.select_random(feats, k, 1, n, 0),
        "zero-tprune": lambda k: ops.select_zero_tprune(probs, feats, k, 1, n, 30, (n - 1 - k) // 2, 0),
        "pool": lambda k: ops.pool_tokens(feats, 1, 14, 14, 2, 2),
    }
    t = Table(title=f"selection passes on {args.model}, batch {args.batch}, cut before layer {args.layer} "
                    f"({torch.get_num_threads()} threads; {n} tokens)")
    for col in ("pass", "keep", "tokens", "backend", "unpruned ms", "pruned ms", "speedup", "FLOPs ideal",
                "measured / ideal", "selection cost vs random ms", "kernel alone ms (torch)"):
        t.add_column(col, justify="right")
    for name, keep, kept, backend, a, b, ideal in rows:
        rand = latency.get(("random", keep, backend))
        over = f"{b - rand[1]:+.1f}" if rand and name != "random" else "-"
        k = max(1, round(keep * (n - 1)))
        with torch.inference_mode():
            kern, _ = median_ms(lambda: kernels[name](k), warmup=1, repeat=5) if name in kernels else (float("nan"), 0)
        t.add_row(name, f"{keep}", f"{n}->{kept}", backend, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", f"{ideal:.2f}x",
                  f"{a / b / ideal:.2f}", over, f"{kern:.2f}" if backend == "torch" else "")
    console.print(t)


if __name__ == "__main__":
    main()
