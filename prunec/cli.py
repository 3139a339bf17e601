"""The ``prunec`` command line.

    prunec MODEL --pass fastv --keep 0.25 [-o OUT]    rewrite a model
    prunec inspect MODEL                             attention sites, blocks, token axes, FLOPs
    prunec passes                                    list passes and their options
    prunec bench MODEL --pass ...                    latency, memory, FLOPs before/after
    prunec eval MODEL --pass ... --data DIR          fidelity before/after on real inputs
    prunec generate MODEL --tokenizer DIR --prompt T  greedy generation with a decoder's KV cache
    prunec demo                                      build, export, prune and time a ViT
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .console import console as _console
from .errors import PruneError

EXAMPLES = """examples:
  prunec vit.onnx --pass fastv --keep 0.25 -o vit.fastv.onnx
  prunec llama.onnx --pass fastv --keep 0.5 --layer 2 --span 35:611 --probe-length 640 -o out.onnx
  prunec bert.onnx --pass tome:r=8                   # dynamic batch and sequence: counts follow the length
  prunec llama7b.onnx --pass fastv --span 35:611 --probe-length 640   # weights over 1 GiB: never read
  prunec vit.onnx --pass fastv:keep=0.25,layer=3,query=cls
  prunec vit.onnx --pass tome:r=8                    # merging: tome, evit, ppt, visionzip
  prunec seg.onnx --pass fastv --keep 0.5 --layer 2  # a grid decoder gets its tokens back (recovery)
  prunec bert.onnx --pass fastv --keep 0.5 --recover copy   # last_hidden_state stays [B, N, C]
  prunec dinov2.onnx --pass tome:r=8 --expose sizes,indices  # + outputs O.sizes, O.kept_indices [B, M]
  prunec inspect vit.onnx
  prunec passes
  prunec bench vit.onnx --pass fastv --keep 0.25 --batch 8
  prunec eval vit.onnx --pass fastv --keep 0.25 --data images/
  prunec tune bert.onnx --method fastv --budget 'cosine>=0.99' --inputs calib.npz -o bert.tuned.onnx
  prunec sweep vit.onnx --pass fastv --pass divprune:layer=2 --keeps 0.75,0.5,0.25 --data images/ -o sweep/
  prunec llava_decoder.onnx --pass fastv --keep 0.25 --span 35:611 -o pruned.onnx   # a KV cache: prefill pruned
  prunec generate pruned.onnx --tokenizer tok/ --prompt "Describe the picture" --max-new-tokens 32
  prunec demo
"""

SUBCOMMANDS = ("inspect", "passes", "bench", "eval", "tune", "sweep", "generate", "demo")  # the keys of _MAINS


def _load_args(ap: argparse.ArgumentParser) -> None:
    """How the model is loaded: --shape, --probe-length, --check (every command that loads one)."""
    ap.add_argument("--shape", action="append", metavar="INPUT=D0,D1,..",
                    help="make dynamic input dims static, e.g. input_ids=?,128 (? keeps a dim dynamic)")
    ap.add_argument("--probe-length", dest="probe_length", type=int, metavar="N",
                    help="analyse a dynamic sequence at N tokens (default 29; a span with absolute ends needs "
                         "N beyond its end, e.g. 612 for --span 35:611)")
    ap.add_argument("--check", choices=("auto", "full", "fast", "none"), default="auto",
                    help="check the written ONNX model: full (onnx.checker and ONNX Runtime runs at several "
                         "shapes; on a dynamic sequence the same passes at keep=1 must also equal the input "
                         "model at two shapes), fast (onnx.checker, and those runs on the graph up to two layers "
                         "after the last cut: only those layers' weights are read), none (onnx.checker only), "
                         "auto (default: full, without the keep=1 comparison over 256 MiB of weights, "
                         "onnx.checker only over 1 GiB, where the model is also analysed without reading them)")


def _pass_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pass", dest="passes", action="append", required=True, metavar="NAME[:K=V,...]",
                    help="pass to apply (repeatable); see `prunec passes`")
    ap.add_argument("--keep", help="fraction of tokens kept, in (0, 1]")
    ap.add_argument("--layer", help="cut before this layer (0-based), 'output', or a schedule a/b/c")
    ap.add_argument("--span", help="START:END token range that may be pruned; negative ends count from the token "
                                   "count N and an end may be left out (1:-8, 1:, -64:)")
    ap.add_argument("--query", help="auto|cls|last|mean|<index> (fastv)")
    _load_args(ap)


def _rewrite(args, status):
    from .model import OnnxModel, apply_passes

    src = Path(args.model)
    passes = build_passes(args.passes, {"keep": args.keep, "layer": args.layer, "span": args.span,
                                        "query": args.query})
    status.update(f"loading {src}")
    model = _load_cli(src, args)
    if not isinstance(model, OnnxModel):
        raise PruneError(f"{src}: bench and eval take ONNX models")
    rewritten, idle = apply_passes(model, passes, progress=status.update)
    if len(idle) == len(passes):
        _console(stderr=True).print("prunec: warning: the passes reduced no tokens at these settings", markup=False)
    return model, rewritten, passes


def bench_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="prunec bench", description="Latency, throughput, peak memory and FLOPs of a model before and after "
        "the passes, on one backend in one run.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  prunec bench vit.onnx --pass fastv --keep 0.25 --batch 8 --json")
    ap.add_argument("model", help="an .onnx model")
    _pass_args(ap)
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0:
        raise PruneError("batch and repeat must be >= 1, warmup >= 0")
    from .measure import bench

    err = _console(stderr=True)
    with err.status("rewriting") as status:
        model, rewritten, passes = _rewrite(args, status)
        res = bench(model, rewritten, batch=args.batch, device=args.provider, warmup=args.warmup,
                    repeat=args.repeat, progress=status.update)
    res["model"], res["passes"] = args.model, [repr(p) for p in passes]
    if args.json:
        import json

        print(json.dumps(res, indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"{args.model}: {', '.join(res['passes'])}; batch {args.batch} on {res['providers'][0]}")
    for col in ("model", "latency ms (median ± IQR)", "throughput /s", "peak memory MiB", "GFLOPs (blocks)",
                "tokens per block"):
        t.add_column(col, justify="right")
    for key in ("original", "rewritten"):
        e = res[key]
        toks = e["tokens_per_block"]
        t.add_row(key, f"{e['latency_ms']:.2f} ± {e['latency_iqr_ms']:.2f}", f"{e['throughput_per_s']:.1f}",
                  f"{e['peak_memory_mib']:.1f}", f"{e['gflops']:.3f}",
                  " ".join(map(str, toks)) if len(toks) <= 16 else f"{toks[0]} .. {toks[-1]}")
    c = _console()
    c.print(t)
    c.print(f"speedup {res['speedup']:.2f}x, FLOPs ideal {res['ideal_speedup']:.2f}x, "
            f"measured / ideal {res['measured_over_ideal']:.2f}")
    return 0


def eval_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="prunec eval", description="Fidelity of the rewritten model against the original on real inputs: "
        "cosine of outputs, top-1 agreement of logits, accuracy when labels are given.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  prunec eval vit.onnx --pass fastv --keep 0.25 --data images/   "
               "# class sub-folders give labels\n  prunec eval bert.onnx --pass fastv --keep 0.5 --inputs batch.npz "
               "  # arrays named after the inputs, optional 'labels'\n\nimage recipe: resize the shorter side to "
               "size/crop-pct (bicubic), center-crop to the model's H x W, scale to [0, 1], normalize by --mean/--std.")
    ap.add_argument("model", help="an .onnx model")
    _pass_args(ap)
    _inputs_args(ap)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .measure import evaluate

    err = _console(stderr=True)
    with err.status("rewriting") as status:
        model, rewritten, passes = _rewrite(args, status)
        status.update("reading inputs")
        batches, labels = _read_inputs(args, model)
        res = evaluate(model, rewritten, batches, labels, progress=status.update)
    res["model"], res["passes"] = args.model, [repr(p) for p in passes]
    if args.json:
        import json

        print(json.dumps(res, indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"{args.model}: {', '.join(res['passes'])}; {res['samples']} samples")
    for col in ("output", "shape", "cosine mean", "cosine min", "top-1 agreement", "accuracy orig -> rewritten"):
        t.add_column(col, justify="right")
    for name, e in res["outputs"].items():
        shape = str(e["shape_original"]) if e["shape_original"] == e["shape_rewritten"] else \
            f"{e['shape_original']} -> {e['shape_rewritten']}"
        acc = (f"{e['accuracy_original']:.3f} -> {e['accuracy_rewritten']:.3f}" if "accuracy_original" in e else "-")
        t.add_row(name, shape, "-" if e["cosine_mean"] is None else f"{e['cosine_mean']:.4f}",
                  f"{e['cosine_min']:.4f}" if "cosine_min" in e else "-",
                  f"{e['top1_agreement']:.3f}" if "top1_agreement" in e else "-", acc)
    _console().print(t)
    return 0


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


def _check_output(src: Path, out: Path, force: bool, same_hint: str = "") -> None:
    """Refuse to write ``out`` over the input ``src``, into a folder we cannot write, or over an
    existing file without --force (``same_hint`` ends the message of the first)."""
    from .model import check_writable

    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise PruneError(f"output {out} is the input file{same_hint}")
    check_writable(out)
    if out.exists() and not force:
        raise PruneError(f"output {out} exists; pass --force to overwrite it")


def _prune_parser() -> argparse.ArgumentParser:
    """The arguments of ``prunec MODEL --pass ...``."""
    ap = argparse.ArgumentParser(
        prog="prunec", description="Rewrite a transformer graph with token-reduction passes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="input model: .onnx (any exporter) or .pt2 (torch.export.save)")
    ap.add_argument("--pass", dest="passes", action="append", metavar="NAME[:K=V,...]",
                    help="pass to apply (repeatable, applied in order); see `prunec passes`")
    ap.add_argument("-o", "--output", help="output path (default: MODEL with the pass names before the suffix)")
    ap.add_argument("--keep", help="fraction of tokens kept, in (0, 1]")
    ap.add_argument("--layer", help="prune before this layer (0-based)")
    ap.add_argument("--span", help="START:END token range that may be pruned (e.g. an image span); negative ends "
                                   "count from the token count N and an end may be left out (1:-8, 1:, -64:)")
    ap.add_argument("--query", help="auto|cls|last|mean|<index>: whose attention scores tokens")
    ap.add_argument("--recover", help="restore the full token count: auto (default: before a grid reshape or token "
                                      "mixing), none, copy, unmerge or attn (also restores token outputs)")
    ap.add_argument("--recover-at", dest="recover_at", type=int, metavar="LAYER",
                    help="restore the full token count before this layer instead of at the output")
    ap.add_argument("--expose", metavar="sizes,indices",
                    help="after the passes, add outputs for each reduced token output O: O.sizes [B, M] (how many "
                         "input tokens each token stands for, 1 for a pure selection) and/or O.kept_indices [B, M] "
                         "(each token's input position; after a merge, its representative), for your own "
                         "size-weighted pooling")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _load_args(ap)
    return ap


def _prune_output(args, src: Path, passes: list) -> Path:
    """The output path (-o, default MODEL.<pass names><suffix>), checked before any work: not the
    input, writable, not an existing file without --force, the input's suffix. A bad --span is
    refused here too."""
    suffix = src.suffix or ".onnx"
    tag = ".".join(p.name for p in passes)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}.{tag}{suffix}")
    if args.span:
        from .passes.selection import span_bounds

        span_bounds(args.span)
    _check_output(src, out, args.force, "; choose another -o")
    if out.suffix != suffix:
        raise PruneError(f"output {out} must have the input's suffix {suffix}")
    return out


def _external_data(out: Path) -> Path:
    """Where an ONNX model written to ``out`` keeps its external weights."""
    return out.with_name(out.name + ".data")


def _apply_and_save(args, src: Path, out: Path, passes: list, status):
    """Load ``src``, apply the passes in order (then --expose) and write the result to ``out``.
    Returns (the rewritten model, the analysis of the model loaded, the passes that reduced nothing)."""
    from .model import OnnxModel, apply_passes

    model = _load_cli(src, args)
    data = _external_data(out)
    if isinstance(model, OnnxModel) and model.external_data() and data.exists() and not args.force:
        raise PruneError(f"output data file {data} exists; pass --force to overwrite it")
    facts_in = model.facts()
    model, idle = apply_passes(model, passes, progress=status.update)
    if args.expose:
        status.update(f"exposing token {args.expose}")
        model = model.expose(args.expose)
    status.update(f"writing {out}")
    model.save(out)
    return model, facts_in, idle


def _print_written(console, model, out: Path, passes: list, idle: list, before: int, seconds: float) -> None:
    """What was written, with a warning for each pass that reduced nothing."""
    from .model import OnnxModel

    if isinstance(model, OnnxModel) and model.external_data():
        written = f"{out} and its weights {_external_data(out)}"
    else:
        written = f"{out}"
    for p in idle:
        console.print(f"prunec: warning: {p!r} reduced no tokens at these settings", markup=False)
    if len(idle) == len(passes):
        console.print(f"[yellow]nothing reduced[/yellow]: wrote {written} unchanged  ({before} tokens in and out; "
                      f"{seconds:.2f} s)")
    else:
        tokens = (f"a dynamic sequence (probed at {before} tokens): counts follow the length at run time"
                  if getattr(model, "dynamic_tokens", False) else f"{before} tokens in")
        checked = ""
        if getattr(model, "checked_layers", None):
            checked = f"; checked by ONNX Runtime on its first {model.checked_layers} layers (--check fast)"
        elif getattr(model, "check_mode", "full") == "structure":
            why = "--check none" if model.check == "none" else "over 1 GiB of weights: analysed without reading them"
            checked = f"; checked by onnx.checker only ({why}; --check full also runs it)"
        console.print(f"[green]wrote[/green] {written}  ({', '.join(repr(p) for p in passes)}; "
                      f"{tokens}{checked}; rewritten in {seconds:.2f} s)")


def prune_main(argv: list[str]) -> int:
    """``prunec MODEL --pass ...``: rewrite a model with the passes and write it."""
    ap = _prune_parser()
    args = ap.parse_args(argv)
    if args.expose is not None and (not args.expose or set(args.expose.split(",")) - {"sizes", "indices"}):
        raise PruneError(f"--expose '{args.expose}': give sizes, indices or sizes,indices")
    if not args.passes:
        ap.error("give at least one --pass (see `prunec passes`)")
    src = Path(args.model)
    passes = build_passes(args.passes, {"keep": args.keep, "layer": args.layer, "span": args.span,
                                        "query": args.query, "recover": args.recover,
                                        "recover_at": None if args.recover_at is None else str(args.recover_at)})
    out = _prune_output(args, src, passes)
    console = _console(stderr=True)
    t0 = time.perf_counter()
    with console.status(f"loading and analysing {src}") as status:
        model, facts_in, idle = _apply_and_save(args, src, out, passes, status)
    before = facts_in.num_tokens
    _print_written(console, model, out, passes, idle, before, time.perf_counter() - t0)
    if getattr(facts_in.graph, "cache_inputs", None) and len(idle) < len(passes):
        console.print(f"[green]KV cache[/green]: the prefill is pruned and the layers after the cut cache only the kept tokens "
                      f"(their present.* are shorter; logits come for the kept tokens, the last one always); "
                      f"decode steps run through the same model: prunec generate {out} ...")
        return 0
    _warn_reduced_outputs(model, console, facts_in)
    return 0


def _written_rows(model, facts_in) -> list[dict]:
    """The written model's reduced token outputs: for ONNX read off the graph outputs' shapes
    (``inspect.onnx_reduced_outputs``) against the input's analysis ``facts_in``, no second one."""
    from .inspect import onnx_reduced_outputs, reduced_token_outputs
    from .model import OnnxModel

    if not isinstance(model, OnnxModel):
        return reduced_token_outputs(model.facts())
    _, n, c = facts_in.streams[0].shape
    return onnx_reduced_outputs(model.model, n, c, model.cuts)


def _warn_reduced_outputs(model, console, facts_in) -> None:
    """Name the token outputs that come out reduced, and what to do about it (``facts_in``: the
    analysis of the model the passes were applied to)."""
    from .backends.onnx import EXPOSED
    from .inspect import RECOVER_HINT

    try:
        rows = _written_rows(model, facts_in)
    except PruneError:
        return
    if rows:
        what = ", ".join(f"'{r['name']}' {r['shape']}" for r in rows)
        merged = " (merged tokens, size-weighted)" if any(r["merged"] for r in rows) else ""
        hint = RECOVER_HINT
        if model.exposed:  # EXPOSED: --expose name -> output suffix
            suffixes = [EXPOSED[w] for w in model.exposed]
            names = ", ".join(f"'{r['name']}.{s}'" for r in rows for s in suffixes)
            where = (f"outputs {names}" if model.kind == "onnx"
                     else f"the module returns (outputs, {{{', '.join(map(repr, suffixes))}}})")
            hint = f"{where}: weigh your own pooling by the sizes" if "sizes" in model.exposed else where
        at = f" at the probe's {rows[0]['tokens_in']}-token length" if getattr(model, "dynamic_tokens", False) else ""
        console.print(f"[yellow]note[/yellow]: token output {what} keeps {rows[0]['shape'][1]} of "
                      f"{rows[0]['tokens_in']} tokens{at}{merged}; {hint}")


def parse_shapes(specs: list[str] | None) -> dict:
    """['input_ids=?,128', 'attention_mask=?,128'] -> {'input_ids': [None, 128], ...}."""
    shapes = {}
    for spec in specs or []:
        name, eq, dims = spec.partition("=")
        if not eq or not dims:
            raise PruneError(f"--shape '{spec}' is not NAME=D0,D1,... (use ? to keep a dimension dynamic)")
        try:
            shapes[name] = [None if d.strip() in ("?", "-1", "") else int(d) for d in dims.split(",")]
        except ValueError:
            raise PruneError(f"--shape '{spec}': dimensions must be integers or ?") from None
    return shapes


def _load_cli(src: Path, args):
    """Load ``src`` as the options of :func:`_load_args` say."""
    from . import load

    if src.suffix == ".pt2":
        return load(src)
    if args.probe_length is not None and args.probe_length < 2:
        raise PruneError(f"--probe-length must be at least 2, got {args.probe_length}")
    return load(src, input_shapes=parse_shapes(args.shape), probe_length=args.probe_length, check=args.check)


def inspect_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="prunec inspect", description="Print what prunec sees in a model.")
    ap.add_argument("model")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    _load_args(ap)
    args = ap.parse_args(argv)
    from .inspect import describe, render

    model = _load_cli(Path(args.model), args)
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
    _console().print("after the passes, --expose sizes,indices adds outputs O.sizes [B, M] (how many input tokens "
                     "each token stands for) and O.kept_indices [B, M] (each token's input position) for each "
                     "reduced token output O, for your own size-weighted pooling", markup=False)
    return 0


def _inputs_args(ap: argparse.ArgumentParser) -> None:
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of images (optionally in class sub-folders)")
    src.add_argument("--inputs", help=".npz with one array per model input (and optional 'labels')")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mean", default="0.485,0.456,0.406", help="per-channel mean of the image recipe")
    ap.add_argument("--std", default="0.229,0.224,0.225", help="per-channel std of the image recipe")
    ap.add_argument("--crop-pct", type=float, default=0.875, help="center-crop fraction of the image recipe")


def _read_inputs(args, model):
    from .measure import image_batches, npz_batches

    if args.inputs:
        path = Path(args.inputs)
        if not path.is_file():
            raise PruneError(f"no such file: {path}")
        return npz_batches(path, model, args.batch)
    folder = Path(args.data)
    if not folder.is_dir():
        raise PruneError(f"no such folder: {folder}")
    mean, std = _mean_std(args)
    return image_batches(folder, model, args.batch, mean, std, args.crop_pct)


def _mean_std(args) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image recipe's per-channel --mean and --std."""
    try:
        return tuple(float(x) for x in args.mean.split(",")), tuple(float(x) for x in args.std.split(","))
    except ValueError:
        raise PruneError("--mean and --std take comma-separated numbers") from None


def _tune_parser() -> argparse.ArgumentParser:
    """The arguments of ``prunec tune``."""
    ap = argparse.ArgumentParser(
        prog="prunec tune", description="Find the strongest setting of a method (lowest keep, cheapest layer) "
        "that meets a fidelity budget on calibration data, check it on held-out data, write that model and "
        "the curve.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  prunec tune bert.onnx --method fastv --budget 'cosine>=0.99' --inputs docs.npz "
               "-o bert.tuned.onnx --curve curve.csv")
    ap.add_argument("model", help="an .onnx model")
    ap.add_argument("--method", required=True, help="a pass with a keep option (fastv, cls-attn, divprune, ...)")
    ap.add_argument("--budget", required=True, help="cosine>=X (mean output cosine) or top1>=X (agreement)")
    ap.add_argument("--layers", help="candidate cut layers, comma-separated (default: every layer 1..depth-1)")
    ap.add_argument("--option", action="append", default=[], metavar="K=V", help="fixed pass option (repeatable)")
    ap.add_argument("--holdout", type=float, default=0.5, help="fraction of the samples held out (default 0.5)")
    _load_args(ap)
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled calibration / held-out split")
    _inputs_args(ap)
    ap.add_argument("-o", "--output", help="where to write the tuned model (default MODEL.tuned.onnx)")
    ap.add_argument("--curve", help="CSV of every setting tried (default: OUTPUT with .csv)")
    ap.add_argument("--force", action="store_true", help="overwrite existing output files")
    ap.add_argument("--json", action="store_true")
    return ap


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys, the first one's order) as CSV, whole or not at all."""
    import csv
    import io

    from .model import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def _shuffled_split(batches: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Cut input batches into single-sample feeds, shuffle them (seeded) and split them into
    calibration and held-out samples, at least one of each (``holdout``: the held-out fraction)."""
    import numpy as np

    samples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]
    if len(samples) < 2:
        raise PruneError("tune needs at least 2 samples (calibration and held-out)")
    cut = max(1, min(len(samples) - 1, round(len(samples) * (1 - holdout))))
    order = np.random.default_rng(seed).permutation(len(samples))
    samples = [samples[i] for i in order]
    return samples[:cut], samples[cut:]


def _batched(samples: list[dict], batch: int) -> list[dict]:
    """Single-sample feeds [1, ...] joined into feeds of up to ``batch`` samples [<=batch, ...]."""
    import numpy as np

    return [{k: np.concatenate([r[k] for r in samples[i:i + batch]]) for k in samples[0]}
            for i in range(0, len(samples), batch)]


def _print_tune(args, res: dict) -> None:
    """The chosen setting, its fidelity on both splits against the budget, and the files written."""
    c = _console()
    verdict = "meets" if res["holdout_meets_budget"] else "[red]misses[/red]"
    c.print(f"{args.method}: layer {res['layer']}, keep {res['keep']:.3f} "
            f"({res['ideal_speedup']:.2f}x fewer block FLOPs); {res['metric']} {res['calibration']:.4f} on "
            f"{res['calibration_samples']} calibration samples, {res['holdout']:.4f} on "
            f"{res['holdout_samples']} held-out samples: "
            f"{verdict} the budget {args.budget} (gap {res['holdout_gap']:+.4f})")
    c.print(f"wrote {res['output']} and {res['curve_csv']} ({len(res['curve'])} settings tried)")


def tune_main(argv: list[str]) -> int:
    """``prunec tune``: search, on calibration samples, the strongest setting within the budget,
    check it on held-out samples, write the tuned model and the curve."""
    args = _tune_parser().parse_args(argv)
    from .measure import tune

    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}.tuned.onnx")
    curve_path = Path(args.curve) if args.curve else out.with_suffix(".csv")
    for p in (out, curve_path):
        _check_output(src, p, args.force)
    if not 0 < args.holdout < 1:
        raise PruneError("--holdout must be in (0, 1)")
    options = dict(parse_pass_spec("x:" + ",".join(args.option))[1]) if args.option else {}
    err = _console(stderr=True)
    with err.status(f"loading {src}") as status:
        model = _load_cli(src, args)
        batches, _ = _read_inputs(args, model)
        calibration, holdout = _shuffled_split(batches, args.holdout, args.seed)
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        res = tune(model, args.method, args.budget, _batched(calibration, args.batch),
                   _batched(holdout, args.batch), layers, options, progress=status.update)
        status.update(f"writing {out}")
        res.pop("model").save(out)
        _write_csv(curve_path, res["curve"])
    res["output"], res["curve_csv"], res["calibration_samples"], res["holdout_samples"] = \
        str(out), str(curve_path), len(calibration), len(holdout)
    if args.json:
        import json

        print(json.dumps(res, indent=2))
        return 0
    _print_tune(args, res)
    return 0


def _sweep_parser() -> argparse.ArgumentParser:
    """The arguments of ``prunec sweep``."""
    ap = argparse.ArgumentParser(
        prog="prunec sweep", description="The keep / speed / fidelity curve of several passes (CSV and PNG plot) "
        "and, for image models, a picture of the patches each cut kept for the first image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  prunec sweep vit.onnx --pass fastv --pass divprune:layer=2 --keeps 0.75,0.5,0.25 "
               "--data images/ -o sweep/\n\nwrites OUT/sweep.csv, OUT/sweep.png and (image models) "
               "OUT/kept_tokens.png")
    ap.add_argument("model", help="an .onnx model")
    ap.add_argument("--pass", dest="passes", action="append", required=True, metavar="NAME[:K=V,...]",
                    help="pass to sweep (repeatable); keep is swept, other options fixed")
    ap.add_argument("--keeps", default="0.75,0.5,0.25", help="keep values (comma-separated)")
    _inputs_args(ap)
    ap.add_argument("--bench-batch", type=int, default=8, help="batch of the latency runs")
    _load_args(ap)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--picture", help="pass spec drawn in kept_tokens.png (default: the first pass at the "
                                      "smallest keep)")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("--force", action="store_true", help="overwrite files in the output folder")
    return ap


def _parse_keeps(text: str) -> list[float]:
    """'0.75,0.5' -> [0.75, 0.5], each in (0, 1]."""
    try:
        keeps = [float(k) for k in text.split(",")]
    except ValueError:
        raise PruneError(f"--keeps '{text}' is not a comma-separated list of numbers") from None
    if any(not 0 < k <= 1 for k in keeps):
        raise PruneError("every keep must be in (0, 1]")
    return keeps


def _kept_tokens_figure(args, model, specs: list[tuple[str, dict]], keeps: list[float], feeds: dict,
                        path: Path) -> list[str]:
    """Draw the patches one pass keeps of the first image in ``feeds`` (--picture, default the first
    swept pass at the smallest keep), the image un-normalised by --mean/--std back to HxWx3 uint8.
    Returns the cut tags drawn."""
    import numpy as np

    from .measure import kept_token_picture

    spec = args.picture or f"{specs[0][0]}:" + ",".join(
        [f"{k}={v}" for k, v in specs[0][1].items()] + [f"keep={min(keeps)}"])
    (p,) = build_passes([spec], {})
    name = next(iter(feeds))
    mean, std = (np.array(c, np.float32)[:, None, None] for c in _mean_std(args))
    img = np.clip((feeds[name][0] * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return kept_token_picture(model, p.apply(model), feeds, img, path, repr(p))


def _print_sweep(args, rows: list[dict], files: list[Path], drawn: list[str] | None) -> None:
    """One table row per pass and keep, and the files written."""
    from rich.table import Table

    t = Table(title=f"sweep of {args.model}")
    for col in ("pass", "options", "keep", "GFLOPs", "ideal", "speedup", "cosine", "top-1"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["pass"], r["options"], f"{r['keep']}", f"{r['gflops']:.3f}", f"{r['ideal_speedup']:.2f}x",
                  f"{r['speedup']:.2f}x", f"{r['cosine']:.4f}",
                  "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}")
    c = _console()
    c.print(t)
    c.print(f"wrote {files[0]}, {files[1]}" + (f", {files[2]} ({', '.join(drawn)})" if drawn else ""))


def sweep_main(argv: list[str]) -> int:
    """``prunec sweep``: measure each pass at each keep, write the CSV, the plot and (image
    inputs) the kept-token picture."""
    args = _sweep_parser().parse_args(argv)
    from .measure import plot_sweep, sweep

    keeps = _parse_keeps(args.keeps)
    specs = [parse_pass_spec(s) for s in args.passes]
    from .passes import get

    for name, _ in specs:
        get(name)
    out = Path(args.output)
    files = [out / "sweep.csv", out / "sweep.png", out / "kept_tokens.png"]
    if not args.force and any(f.exists() for f in files):
        raise PruneError(f"{out} already holds sweep files; pass --force to overwrite them")
    err = _console(stderr=True)
    with err.status(f"loading {args.model}") as status:
        model = _load_cli(Path(args.model), args)
        batches, _ = _read_inputs(args, model)
        rows = sweep(model, specs, keeps, batches, args.bench_batch, args.repeat, progress=status.update)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(files[0], rows)
        status.update("plotting")
        plot_sweep(rows, files[1], f"{Path(args.model).name}: batch {args.bench_batch}, ORT CPU")
        drawn = _kept_tokens_figure(args, model, specs, keeps, batches[0], files[2]) if args.data else None
    _print_sweep(args, rows, files, drawn)
    return 0


def _span_values_joined(argv: list[str]) -> list[str]:
    """``--span -64:`` -> ``--span=-64:``: argparse reads a value that starts with '-' as an option."""
    out = []
    for arg in argv:
        if out and out[-1] == "--span" and arg.startswith("-") and ":" in arg:
            out[-1] = f"--span={arg}"
        else:
            out.append(arg)
    return out


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="prunec generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Greedy generation through an ONNX decoder with a KV cache (past_key_values.* inputs, "
                    "present.* outputs), original or rewritten by prunec: the same command runs both.",
        epilog="examples:\n"
               "  prunec generate llama.onnx --tokenizer tok/ --prompt 'The capital of France is'\n"
               "  prunec generate llama.fastv.onnx --tokenizer tok/ --prompt 'Hello' --prompt 'Hi there'\n"
               "  prunec generate llama.onnx --ids 1,415,5565 --max-new-tokens 8   # token ids in and out\n")
    ap.add_argument("model", help="an ONNX decoder with a KV cache")
    ap.add_argument("--tokenizer", metavar="DIR", help="a folder with tokenizer.json (a Hugging Face tokenizer)")
    ap.add_argument("--prompt", action="append", help="text to continue (repeat for a left-padded batch)")
    ap.add_argument("--ids", action="append", help="token ids instead of text: 1,415,5565 (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eos", type=int, help="stop a row at this token id (default: the tokenizer's, if any)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    import numpy as np

    if bool(args.prompt) == bool(args.ids):
        raise PruneError("give the prompt as --prompt TEXT (with --tokenizer) or as --ids 1,2,3, one of the two")
    tokenizer = _tokenizer(args.tokenizer) if args.prompt else None
    if args.prompt:
        prompts = [tokenizer.encode(text).ids for text in args.prompt]
    else:
        try:
            prompts = [[int(x) for x in spec.split(",") if x.strip()] for spec in args.ids]
        except ValueError:
            raise PruneError(f"--ids takes comma-separated integers, not {args.ids!r}") from None
    if any(not p for p in prompts):
        raise PruneError("a prompt is empty")
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    eos = args.eos if args.eos is not None else _eos_id(tokenizer)
    from .generate import generate

    start = time.perf_counter()
    out = generate(Path(args.model), ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                   device=args.device)
    seconds = time.perf_counter() - start
    for row in range(len(prompts)):
        new = [t for t in out[row, width:].tolist() if eos is None or t != eos]
        print(tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new)))
    print(f"{out.shape[1] - width} new tokens x {len(prompts)} in {seconds:.2f} s", file=sys.stderr)
    return 0


def _tokenizer(folder: str | None):
    """A Hugging Face fast tokenizer from ``folder``/tokenizer.json (the ``tokenizers`` package)."""
    if folder is None:
        raise PruneError("--prompt needs --tokenizer DIR (a folder with tokenizer.json), or give --ids")
    path = Path(folder) / "tokenizer.json" if Path(folder).is_dir() else Path(folder)
    if not path.exists():
        raise PruneError(f"no tokenizer.json in {folder}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PruneError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    return Tokenizer.from_file(str(path))


def _eos_id(tokenizer) -> int | None:
    """The tokenizer's end-of-sequence token id, when it names one of the usual ones."""
    if tokenizer is None:
        return None
    for name in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "[SEP]", "<eos>"):
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    return None


def _demo_main(argv: list[str]) -> int:
    """``prunec demo``, imported when asked for (it needs timm)."""
    from .demo import demo_main

    return demo_main(argv)


# subcommand -> its main; anything else is a model to rewrite (prune_main)
_MAINS = {"inspect": inspect_main, "passes": passes_main, "bench": bench_main, "eval": eval_main,
          "tune": tune_main, "sweep": sweep_main, "generate": generate_main, "demo": _demo_main}


def main(argv: list[str] | None = None) -> int:
    argv = _span_values_joined(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    try:
        if argv and argv[0] in _MAINS:
            return _MAINS[argv[0]](argv[1:])
        if not argv:
            argv = ["--help"]
        return prune_main(argv)
    except PruneError as e:
        print(f"prunec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunec: error: interrupted (files are written whole or not at all)", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused something: one line naming the file, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"prunec: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``prunec`` command: :func:`main`, its output flushed, then the process ends without tearing
    the interpreter down object by object (0.3-0.4 s after rewriting a 135M model: its graphs,
    sessions and weight mappings; every file is closed and renamed into place before main returns).
    An uncaught exception still ends the usual way, with its traceback."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
