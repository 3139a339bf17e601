"""What a pass buys: cost, speed and fidelity of a rewritten model against the original.

``bench(model, rewritten, ...)``: latency (warm-up, median and interquartile spread),
throughput, peak resident-memory growth while running, analytic FLOPs per block and the
measured-vs-ideal speedup, both models on the same backend in one process.

``evaluate(model, rewritten, batches, labels)``: cosine similarity of every output that
keeps its shape (a token output left with fewer tokens: of its size-weighted token mean and
its prefix tokens, the lower), top-1 agreement of logits ([B, classes] outputs) and, with labels,
accuracy of both. Both return plain dicts (the CLI prints them or dumps JSON).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from .bench import median_ms
from .errors import PruneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakMemory:
    """Samples this process's resident memory every 2 ms; ``peak`` is the growth in MiB."""

    def __enter__(self):
        self.base = self.peak_abs = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak_abs = max(self.peak_abs, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, _rss_mib())

    @property
    def peak(self) -> float:
        return self.peak_abs - self.base


def flops_profile(model) -> dict:
    from .passes.analysis.blocks import block_flops

    facts = model.facts()
    per_block = [block_flops(facts, i) for i in range(facts.depth)]
    return {"gflops": sum(per_block) / 1e9, "gflops_per_block": [f / 1e9 for f in per_block],
            "tokens_per_block": [facts.tokens(i) for i in range(facts.depth)]}


def feeds_for(model, batch: int) -> dict[str, np.ndarray]:
    """Random inputs at ``batch`` (floats ~ N(0, 1), ids 0, masks 1), as for the probe."""
    from .ir.from_onnx import example_inputs

    return example_inputs(model.model, batch)


def bench(model, rewritten, batch: int = 8, device: str = "cpu", warmup: int = 3, repeat: int = 10,
          progress=None) -> dict:
    """Time ``model`` and ``rewritten`` (OnnxModels) on one ORT provider; see the module doc."""
    if model.kind != "onnx":
        raise PruneError("bench takes ONNX models (export a torch module first)")
    feeds = feeds_for(model, batch)
    result = {"batch": batch, "device": device, "warmup": warmup, "repeat": repeat}
    for key, m in (("original", model), ("rewritten", rewritten)):
        if progress:
            progress(f"timing the {key} model")
        sess = m.session(device)
        result["providers"] = sess.get_providers()
        with PeakMemory() as mem:
            med, spread = median_ms(lambda: sess.run(None, feeds), warmup, repeat)
        entry = {"latency_ms": med, "latency_iqr_ms": spread, "throughput_per_s": batch / med * 1e3,
                 "peak_memory_mib": round(mem.peak, 1)}
        entry.update(flops_profile(m))
        result[key] = entry
    o, r = result["original"], result["rewritten"]
    result["speedup"] = o["latency_ms"] / r["latency_ms"]
    result["ideal_speedup"] = o["gflops"] / r["gflops"]
    result["measured_over_ideal"] = result["speedup"] / result["ideal_speedup"]
    return result


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def _is_logits(value) -> bool:
    """A [B, classes] output made by a linear layer (Gemm, MatMul, or MatMul + bias Add): a
    classifier head, whose argmax means something (unlike a pooled embedding's)."""
    node = value.producer()
    if node is None or len(value.shape or ()) != 2:
        return False
    if node.op_type == "Add":
        node = next((x.producer() for x in node.inputs if x is not None and x.producer() is not None), None)
    return node is not None and node.op_type in ("Gemm", "MatMul")


def _size_output(rewritten) -> str | None:
    """The token sizes [B, M, 1] of a rewritten ONNX model's last cut that tracks them, or None."""
    from .passes.analysis.blocks import SIZE_TAG

    names = [o.name for n in rewritten.model.graph for o in n.outputs if o.name.endswith("/" + SIZE_TAG)]
    return names[-1] if names else None


def _prefix_of(model) -> int:
    try:
        return model.facts().prefix
    except PruneError:
        return 0


def _reduced_tokens(a: np.ndarray, b: np.ndarray) -> bool:
    """b [B, M, C] is a token tensor a [B, N, C] with fewer tokens."""
    return a.ndim == b.ndim == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[2] and b.shape[1] < a.shape[1]


def _reduced_cosine(a: np.ndarray, b: np.ndarray, size: np.ndarray | None, prefix: int) -> np.ndarray:
    """Per sample: the cosine between the token mean of a [B, N, C] and the size-weighted token mean
    of b [B, M, C] (size [B, M, 1]; None: unweighted), and, with prefix tokens (kept in place by
    every pass), the lower of that and the cosine of the prefix tokens."""
    w = np.ones(b.shape[:2] + (1,), np.float64) if size is None else size.astype(np.float64)
    pooled = (b * w).sum(1) / np.maximum(w.sum(1), 1e-30)
    cos = _cosine(a.mean(1), pooled)
    if prefix:
        cos = np.minimum(cos, _cosine(a[:, :prefix], b[:, :prefix]))
    return cos


def reference_outputs(model, batches) -> list[list[np.ndarray]]:
    """The original model's outputs per batch, computed once for many :func:`evaluate` calls."""
    return [model.run(feeds) for feeds in batches]


def evaluate(model, rewritten, batches, labels: np.ndarray | None = None, progress=None,
             reference: list | None = None) -> dict:
    """Compare outputs over ``batches`` (a list of feed dicts). Returns per-output metrics;
    top-1 agreement and accuracy only for classifier outputs (see :func:`_is_logits`).
    ``reference``: the original's outputs from :func:`reference_outputs`, when several
    rewritten models are compared on the same batches."""
    names = [v.name for v in model.model.graph.outputs]
    logits = {v.name for v in model.model.graph.outputs if _is_logits(v)}
    size_name, prefix, size_sess = _size_output(rewritten), None, []

    def sizes(feeds):
        """The rewritten model's token sizes [B, M, 1] on ``feeds`` (a second run exposing them)."""
        if not size_sess:
            from .ir.session import make_session

            size_sess.append(make_session(rewritten.model, extra_outputs=[size_name]))
        return size_sess[0].run([size_name], {k: np.asarray(v) for k, v in feeds.items()})[0]

    reduced: dict[str, str] = {}
    cos: dict[str, list] = {n: [] for n in names}
    agree: dict[str, list] = {n: [] for n in names}
    top1: dict[str, dict[str, list]] = {n: {"original": [], "rewritten": []} for n in names}
    shapes: dict[str, tuple] = {}
    samples = 0
    for i, feeds in enumerate(batches):
        if progress:
            progress(f"batch {i + 1}")
        a_out = reference[i] if reference is not None else model.run(feeds)
        b_out = rewritten.run(feeds)
        for name, a, b in zip(names, a_out, b_out):
            shapes[name] = (tuple(a.shape[1:]), tuple(b.shape[1:]))
            if a.dtype.kind != "f":
                continue
            if a.shape == b.shape:
                cos[name].extend(_cosine(a, b).tolist())
            elif _reduced_tokens(a, b):  # compared by its (size-weighted) token mean and prefix tokens
                prefix = _prefix_of(model) if prefix is None else prefix
                size = sizes(feeds) if size_name is not None else None
                weighed = size is not None and size.shape[:2] == b.shape[:2]
                cos[name].extend(_reduced_cosine(a, b, size if weighed else None, prefix).tolist())
                reduced[name] = (f"reduced token output ({b.shape[1]} of {a.shape[1]} tokens): compared by its "
                                 f"{'size-weighted ' if weighed else ''}token mean"
                                 + (f" and its {prefix} prefix token(s) (the lower cosine)" if prefix else ""))
            if name in logits and a.ndim == 2 and a.shape == b.shape and a.shape[1] > 1:
                pa, pb = a.argmax(1), b.argmax(1)
                agree[name].extend((pa == pb).tolist())
                top1[name]["original"].extend(pa.tolist())
                top1[name]["rewritten"].extend(pb.tolist())
        samples += len(next(iter(feeds.values())))
    return {"samples": samples,
            "outputs": {name: _output_summary(shapes.get(name, ((), ())), cos[name], reduced.get(name),
                                              agree[name], top1[name], labels) for name in names}}


def _output_summary(shapes: tuple, cos: list, note: str | None, agree: list, top1: dict[str, list],
                    labels: np.ndarray | None) -> dict:
    """One output's entry of :func:`evaluate`: its shapes (original, rewritten) without the
    batch axis, cosine mean and min over the samples (None where the shape changed), the note
    on how a reduced token output was compared, top-1 agreement and, with ``labels``, the
    accuracy of both models (``top1``: the predicted classes per model)."""
    entry = {"shape_original": list(shapes[0]), "shape_rewritten": list(shapes[1])}
    if cos:
        c = np.array(cos)
        entry.update({"cosine_mean": float(c.mean()), "cosine_min": float(c.min())})
        if note is not None:
            entry["note"] = note
    else:
        entry["cosine_mean"] = None
        entry["note"] = "shape changed by the rewrite: not compared"
    if agree:
        entry["top1_agreement"] = float(np.mean(agree))
        if labels is not None:
            lab = np.asarray(labels)[: len(top1["original"])]
            entry["accuracy_original"] = float((np.array(top1["original"]) == lab).mean())
            entry["accuracy_rewritten"] = float((np.array(top1["rewritten"]) == lab).mean())
    return entry


def npz_batches(path: Path, model, batch: int):
    """Feed dicts of at most ``batch`` samples from an .npz whose arrays are named after the
    model's inputs (plus optional ``labels``)."""
    data = np.load(path)
    inputs = [v.name for v in model.model.graph.inputs]
    missing = [n for n in inputs if n not in data.files]
    if missing:
        raise PruneError(f"{path} has no array for input(s) {', '.join(missing)} (it has {', '.join(data.files)})")
    total = len(data[inputs[0]])
    labels = data["labels"] if "labels" in data.files else None
    feeds = [{n: data[n][i:i + batch] for n in inputs} for i in range(0, total, batch)]
    return feeds, labels


def image_batches(folder: Path, model, batch: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875):
    """Feed dicts from the images in ``folder`` (class sub-folders give labels, sorted names
    as indices). Recipe: resize the shorter side to size/crop_pct, center-crop to the
    model's input size, scale to [0, 1], normalize by mean/std, NCHW float32."""
    from PIL import Image

    inputs = model.model.graph.inputs
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise PruneError("--data needs a model with one image input [B, 3, H, W]")
    h, w = inputs[0].shape[2], inputs[0].shape[3]
    if not isinstance(h, int) or not isinstance(w, int):
        raise PruneError("the model's image input has no static height/width")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
    if not files:
        raise PruneError(f"no images (jpg/png/bmp/webp) under {folder}")
    classes = sorted({p.parent.name for p in files}) if any(p.parent != folder for p in files) else None
    arrays, labels = [], []
    for p in files:
        img = Image.open(p).convert("RGB")
        scale = (min(h, w) / crop_pct) / min(img.size)
        img = img.resize((max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))), Image.BICUBIC)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
        x = (np.asarray(img, np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
        arrays.append(x.transpose(2, 0, 1))
        if classes:
            labels.append(classes.index(p.parent.name))
    x = np.stack(arrays)
    name = inputs[0].name
    return [{name: x[i:i + batch]} for i in range(0, len(x), batch)], (np.array(labels) if classes else None)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def parse_budget(text: str) -> tuple[str, float]:
    """'cosine>=0.99' -> ('cosine', 0.99); metrics: cosine (mean output cosine), top1 (agreement)."""
    metric, sep, value = text.replace(" ", "").partition(">=")
    if not sep or metric not in ("cosine", "top1"):
        raise PruneError(f"budget '{text}' is not cosine>=X or top1>=X")
    try:
        return metric, float(value)
    except ValueError:
        raise PruneError(f"budget '{text}': {value!r} is not a number") from None


def fidelity(result: dict, metric: str) -> float:
    """The budget metric of an :func:`evaluate` result: the worst output that keeps its shape."""
    key = "cosine_mean" if metric == "cosine" else "top1_agreement"
    vals = [e[key] for e in result["outputs"].values() if e.get(key) is not None]
    if not vals:
        raise PruneError(f"no output of the model can be compared for {metric} (every output changed shape)")
    return min(vals)


def tune(model, method: str, budget: str, calib, holdout, layers=None, options=None, progress=None) -> dict:
    """The strongest setting of ``method`` (lowest keep at each candidate layer, then the
    cheapest in block FLOPs) whose fidelity on ``calib`` meets ``budget``; checked on
    ``holdout``. ``calib``/``holdout``: lists of feed dicts. Keep is searched by bisection
    over whole-token steps (fidelity is assumed to rise with keep)."""
    from .passes import get

    metric, threshold = parse_budget(budget)
    cls = get(method)
    if "keep" not in {o.name for o in cls.options}:
        raise PruneError(f"pass '{method}' has no keep option to tune")
    facts = model.facts()
    layers = layers or list(range(1, facts.depth))
    options = dict(options or {})
    curve, best = [], None
    base_flops = flops_profile(model)["gflops"]
    calib_ref = reference_outputs(model, calib)

    def measure(layer, keep):
        p = cls(**{**options, "keep": keep, "layer": str(layer)})
        rewritten = p.apply(model)
        value = fidelity(evaluate(model, rewritten, calib, reference=calib_ref), metric)
        gflops = flops_profile(rewritten)["gflops"]
        curve.append({"layer": layer, "keep": keep, metric: value, "gflops": gflops,
                      "ideal_speedup": base_flops / gflops})
        if progress:
            progress(f"layer {layer} keep {keep:.3f}: {metric} {value:.4f}")
        return value, rewritten, gflops

    from .passes.selection import parse_span

    for layer in layers:
        if not 1 <= layer < facts.depth:
            raise PruneError(f"layer {layer} is out of range (valid: 1..{facts.depth - 1})")
        start, end = parse_span(options.get("span"), facts.tokens(layer), facts.prefix, facts.causal)
        n = end - start
        lo, hi = 1, n  # kept span tokens; hi is known to meet the budget (keep = 1 is the identity)
        found = None
        while lo < hi:
            mid = (lo + hi) // 2
            value, rewritten, gflops = measure(layer, mid / n)
            if value >= threshold:
                hi, found = mid, (mid / n, value, rewritten, gflops)
            else:
                lo = mid + 1
        if found is None or hi != round(found[0] * n):
            value, rewritten, gflops = measure(layer, hi / n)
            found = (hi / n, value, rewritten, gflops)
        if found[1] >= threshold and (best is None or found[3] < best["gflops"]):
            best = {"layer": layer, "keep": found[0], "calib": found[1], "gflops": found[3], "model": found[2]}
    if best is None:
        raise PruneError(f"no setting of {method} meets {budget} on the calibration data")
    held = fidelity(evaluate(model, best["model"], holdout), metric)
    return {
        "method": method, "budget": budget, "metric": metric, "threshold": threshold,
        "layer": best["layer"], "keep": best["keep"], "calibration": best["calib"], "holdout": held,
        "holdout_meets_budget": held >= threshold, "holdout_gap": held - threshold,
        "gflops": best["gflops"], "gflops_original": base_flops, "ideal_speedup": base_flops / best["gflops"],
        "curve": sorted(curve, key=lambda r: (r["layer"], r["keep"])), "model": best["model"],
    }


def sweep(model, specs: list[tuple[str, dict]], keeps: list[float], batches, bench_batch: int = 8,
          repeat: int = 5, progress=None) -> list[dict]:
    """For every pass spec × keep: block-FLOPs ideal speedup, measured ORT latency speedup and
    fidelity (worst output cosine, top-1 agreement where there are logits)."""
    from .passes import get

    rows = []
    base_flops = flops_profile(model)["gflops"]
    ref = reference_outputs(model, batches)
    for name, opts in specs:
        for keep in keeps:
            label = ",".join(f"{k}={v}" for k, v in opts.items())
            if progress:
                progress(f"{name} {label} keep {keep}")
            p = get(name)(**{**opts, "keep": keep})
            rewritten = p.apply(model)
            b = bench(model, rewritten, batch=bench_batch, repeat=repeat, warmup=1)
            ev = evaluate(model, rewritten, batches, reference=ref)
            agree = [e["top1_agreement"] for e in ev["outputs"].values() if e.get("top1_agreement") is not None]
            rows.append({"pass": name, "options": label, "keep": keep, "gflops": b["rewritten"]["gflops"],
                         "ideal_speedup": base_flops / b["rewritten"]["gflops"], "speedup": b["speedup"],
                         "latency_ms": b["rewritten"]["latency_ms"], "latency_ms_original": b["original"]["latency_ms"],
                         "cosine": fidelity(ev, "cosine"), "top1_agreement": min(agree) if agree else None})
    return rows


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG at 110 dpi and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    """Speedup against keep, and cosine against speedup, one line per pass and options."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["pass"], r["options"]) for r in rows}):
        sel = sorted((r for r in rows if (r["pass"], r["options"]) == key), key=lambda r: r["keep"])
        label = key[0] + (f" ({key[1]})" if key[1] else "")
        ax1.plot([r["keep"] for r in sel], [r["speedup"] for r in sel], "o-", label=label)
        ax2.plot([r["speedup"] for r in sel], [r["cosine"] for r in sel], "o-", label=label)
    ideal = sorted({(r["keep"], r["ideal_speedup"]) for r in rows if r["pass"] == rows[0]["pass"]})
    ax1.plot([k for k, _ in ideal], [s for _, s in ideal], "k--", lw=1, label="FLOPs ideal")
    ax1.set_xlabel("keep")
    ax1.set_ylabel("measured speedup (ORT CPU)")
    ax1.invert_xaxis()
    ax2.set_xlabel("measured speedup")
    ax2.set_ylabel("output cosine vs original")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)


def kept_token_picture(model, rewritten, feeds: dict, image: np.ndarray, path: Path, title: str = "") -> list[str]:
    """Draw, for one image, the patches each cut kept (the others greyed out), one panel per
    cut. ``image``: HxWx3 uint8 as fed (after the recipe's crop). Returns the cut tags drawn."""
    plt = _pyplot()

    from .passes.pool import find_grid

    facts = model.facts()
    n = facts.tokens(0)
    grid = find_grid(facts, n - facts.prefix)
    if grid is None:
        raise PruneError("cannot find the patch grid to draw kept tokens")
    gh, gw = grid
    kept = rewritten.kept_indices({k: v[:1] for k, v in feeds.items()})
    tags = list(kept)
    alive = np.arange(n)  # original token index of each current position
    panels = [("input", np.ones(gh * gw, bool))]
    for tag in tags:
        alive = alive[kept[tag][0]]
        mask = np.zeros(gh * gw, bool)
        patches = alive[alive >= facts.prefix] - facts.prefix
        mask[patches[patches < gh * gw]] = True
        panels.append((f"{tag}: {mask.sum()}/{gh * gw} patches", mask))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    h, w = image.shape[:2]
    for ax, (label, mask) in zip(np.atleast_1d(axes), panels):
        shade = np.repeat(np.repeat(mask.reshape(gh, gw), h // gh, 0), w // gw, 1)
        shown = image[: shade.shape[0], : shade.shape[1]].astype(np.float32)
        shown[~shade] = shown[~shade] * 0.15 + 40
        ax.imshow(shown.astype(np.uint8))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    _save_figure(fig, path)
    return tags
