"""The form × pass table: what prunec makes of every pass on every graph form users ship.

    python benchmarks/forms.py [--models timm_vit,hf_bert] [--forms torch,qdq] [--passes tome] [--json out.json]

Each cell is the checker of tests/forms_corpus.py on a tiny random-weight model: ``works``
(identity at keep=1 / r=0, the plain-PyTorch reference matched with the same kept indices,
batch rows independent), ``refused`` (a one-line PruneError), ``WRONG`` (runs, disagrees),
``crash`` (any other exception), ``works*`` (lossy forms: some rows' choice differs from the
reference by a rounding near-tie, so they were not compared; see forms_corpus), ``n/a`` (no reference for the pass on that model, or the
exporter cannot produce the form). Prints one markdown table (rows model / form, columns
passes) and the detail of every cell that is not ``works``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")

import forms_corpus as fc  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(fc.MODELS))
    ap.add_argument("--forms", default=",".join(fc.FORMS))
    ap.add_argument("--passes", default=",".join(fc.PASSES))
    ap.add_argument("--json", help="write every cell (status, detail, numbers) here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    models, forms, passes = (a.split(",") for a in (args.models, args.forms, args.passes))
    cells = []
    t0 = time.time()
    for m in models:
        for f in forms:
            for p in passes:
                t = time.time()
                o = fc.check(m, f, p)
                cells.append(dict(model=m, form=f, passes=p, status=o.status, detail=o.detail, numbers=o.numbers,
                                  seconds=round(time.time() - t, 2)))
                print(f"{m:10s} {f:14s} {p:12s} {o} ({time.time() - t:.1f}s)", file=sys.stderr, flush=True)
    short = {"works": "works", "works*": "works*", "refused": "refused", "WRONG": "**WRONG**", "crash": "**crash**", "n/a": "n/a"}
    print(f"| model | form | {' | '.join(passes)} |")
    print("|---|---|" + "---|" * len(passes))
    for m in models:
        for f in forms:
            row = [short[c["status"]] for c in cells if c["model"] == m and c["form"] == f]
            print(f"| {m} | {f} | {' | '.join(row)} |")
    counts = {s: sum(c["status"] == s for c in cells) for s in short}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f" ({time.time() - t0:.0f} s)\n")
    for c in cells:
        if c["status"] not in ("works", "works*", "n/a"):
            print(f"- {c['model']} / {c['form']} / {c['passes']}: {c['status']}: {c['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    main()
