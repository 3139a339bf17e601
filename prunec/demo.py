"""``prunec demo``: the whole job on an embedded default.

Builds timm ``vit_small_patch16_224`` (random weights: no download), exports it to
ONNX (dynamo exporter, opset 18, dynamic batch), inspects it, applies FastV
(keep 0.25 before layer 2), checks that keep=1.0 is the identity, and times the
unpruned and pruned models on ORT CPU and torch against the FLOPs ideal.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path


def _demo_parser() -> argparse.ArgumentParser:
    """The arguments of ``prunec demo``."""
    ap = argparse.ArgumentParser(prog="prunec demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm architecture (random weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", help="folder to keep the .onnx files in (default: a temporary folder)")
    return ap


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
    """``prunec demo``: export a timm ViT, inspect it, apply FastV, check the identity at keep=1
    and the two backends against each other, and time both."""
    args = _demo_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import numpy as np

    from . import load
    from .bench import ideal_speedup
    from .errors import PruneError
    from .inspect import describe, render
    from .console import console as make_console
    from .passes import FastV

    console = make_console()
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="prunec-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
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
    return 0
