"""The ``prunec`` command line.

    prunec MODEL --pass fastv --keep 0.25 [-o OUT]    rewrite a model
    prunec inspect MODEL                             attention sites, blocks, token axes, FLOPs
    prunec passes                                    list passes and their options
    prunec demo                                      build, export, prune and time a ViT
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import PruneError

EXAMPLES = """examples:
  prunec vit.onnx --pass fastv --keep 0.25 -o vit.fastv.onnx
  prunec llama.onnx --pass fastv --keep 0.5 --layer 2 --span 35:611 -o out.onnx
  prunec vit.onnx --pass fastv:keep=0.25,layer=3,query=cls
  prunec inspect vit.onnx
  prunec passes
  prunec demo
"""

SUBCOMMANDS = ("inspect", "passes", "demo")


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = 160  # pipes and logs: do not wrap tables at 80 columns
    return console


def parse_pass_spec(spec: str) -> tuple[str, dict]:
    """'fastv:keep=0.25,layer=2' -> ('fastv', {'keep': '0.25', 'layer': '2'})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise PruneError(f"pass option '{item}' in '{spec}' is not KEY=VALUE")
        opts[key.strip().replace("-", "_")] = val.strip()
    return name.strip(), opts


def build_passes(specs: list[str], shared: dict) -> list:
    from . import passes

    out = []
    for spec in specs:
        name, opts = parse_pass_spec(spec)
        cls = passes.get(name)
        known = {o.name: o for o in cls.options}
        for key, val in shared.items():
            if val is not None and key in known and key not in opts:
                opts[key] = val
        typed = {}
        for key, val in opts.items():
            if key not in known:
                raise PruneError(f"pass '{name}' has no option '{key}' (options: {', '.join(known)})")
            try:
                typed[key] = known[key].type(val) if val is not None else None
            except ValueError:
                raise PruneError(f"option {key}={val!r} of pass '{name}' is not a {known[key].type.__name__}") from None
        out.append(cls(**typed))
    return out


def prune_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="prunec", description="Rewrite a transformer graph with token-reduction passes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="input model: .onnx (any exporter) or .pt2 (torch.export.save)")
    ap.add_argument("--pass", dest="passes", action="append", metavar="NAME[:K=V,...]",
                    help="pass to apply (repeatable, applied in order); see `prunec passes`")
    ap.add_argument("-o", "--output", help="output path (default: MODEL with the pass names before the suffix)")
    ap.add_argument("--keep", help="fraction of tokens kept, in (0, 1]")
    ap.add_argument("--layer", help="prune before this layer (0-based)")
    ap.add_argument("--span", help="START:END token range that may be pruned (e.g. an image span)")
    ap.add_argument("--query", help="auto|cls|last|mean|<index>: whose attention scores tokens")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = ap.parse_args(argv)
    if not args.passes:
        ap.error("give at least one --pass (see `prunec passes`)")
    src = Path(args.model)
    passes = build_passes(args.passes, {"keep": args.keep, "layer": args.layer, "span": args.span,
                                        "query": args.query})
    suffix = src.suffix or ".onnx"
    tag = ".".join(p.name for p in passes)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}.{tag}{suffix}")
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise PruneError(f"output {out} is the input file; choose another -o")
    if out.exists() and not args.force:
        raise PruneError(f"output {out} exists; pass --force to overwrite it")
    if out.suffix != suffix:
        raise PruneError(f"output {out} must have the input's suffix {suffix}")
    console = _console(stderr=True)
    t0 = time.perf_counter()
    with console.status(f"loading and analysing {src}") as status:
        model = _load_cli(src)
        before = model.facts().num_tokens
        for p in passes:
            status.update(f"applying {p!r}")
            model = p.apply(model)
        status.update(f"writing {out}")
        model.save(out)
    dt = time.perf_counter() - t0
    console.print(f"[green]wrote[/green] {out}  ({', '.join(repr(p) for p in passes)}; "
                  f"{before} tokens in; rewritten in {dt:.2f} s)")
    return 0


def _load_cli(src: Path):
    from . import load

    if src.suffix == ".pt2":
        import torch

        if not src.exists():
            raise PruneError(f"no such file: {src}")
        try:
            ep = torch.export.load(str(src))
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"{src} is not a torch.export program ({str(e).splitlines()[0][:100]})") from None
        if ep.example_inputs is None:
            raise PruneError(f"{src} was saved without example inputs; prunec needs them to analyse shapes")
        from .model import TorchModel

        a, kw = ep.example_inputs
        return TorchModel(ep.module(), a, kw)
    return load(src)


def inspect_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="prunec inspect", description="Print what prunec sees in a model.")
    ap.add_argument("model")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    from .inspect import describe, render

    model = _load_cli(Path(args.model))
    try:
        info = describe(model)
    except PruneError as e:
        if "no attention" in str(e):
            _console().print(f"{args.model}: no attention found: nothing for prunec to rewrite")
            return 0
        raise
    if args.json:
        import json

        print(json.dumps(info, indent=2))
    else:
        render(info, _console())
    return 0


def passes_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="prunec passes", description="List the passes and their options.").parse_args(argv)
    from rich.table import Table

    from .passes import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        t = Table(title=f"{name}: {cls.summary}", title_justify="left")
        for col in ("option", "type", "default", "meaning"):
            t.add_column(col)
        for o in cls.options:
            t.add_row(o.name, o.type.__name__, repr(o.default), o.help)
        _console().print(t)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    try:
        if argv and argv[0] == "inspect":
            return inspect_main(argv[1:])
        if argv and argv[0] == "passes":
            return passes_main(argv[1:])
        if argv and argv[0] == "demo":
            from .demo import demo_main

            return demo_main(argv[1:])
        if not argv:
            argv = ["--help"]
        return prune_main(argv)
    except PruneError as e:
        print(f"prunec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
