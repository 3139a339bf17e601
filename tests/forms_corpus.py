"""The graph forms users ship, built in the test from the tiny models of ``zoo.py``, and
one checker that says what prunec makes of a (model, form, pass) cell.

Forms (each an ONNX file cached for the session, except ``torch``):

* ``torch``: the module through ``torch.export`` (prunec's fx path);
* ``dynamo18`` / ``dynamo23``: the dynamo exporter at opsets 18 and 23;
* ``torchscript14`` / ``16`` / ``17``: the TorchScript exporter (LayerNorm decomposed at 14/16);
* ``ort_opt``: ``onnxruntime.transformers.optimizer.optimize_model`` (model type bert or vit,
  opt_level 1) on the TorchScript opset-17 export;
* ``int8_dynamic``: ``quantize_dynamic`` (DynamicQuantizeLinear + MatMulInteger);
* ``qdq``: ``quantize_static`` in QDQ format, calibrated on 4 batches;
* ``fp16``: ``convert_float_to_float16(keep_io_types=True)``.

The derived forms (ort_opt, int8_dynamic, qdq, fp16) start from the TorchScript opset-17
export, or the dynamo opset-18 one where TorchScript cannot export the model (HF Llama).

:func:`check` returns an :class:`Outcome`: ``works`` (identity at keep=1 / r=0, the
plain-PyTorch reference of the pass on the unmodified torch model matched with the same
kept indices, each batch row equal to that sample alone), ``refused`` (a one-line
PruneError), ``WRONG`` (runs, disagrees) or ``crash`` (any other exception).

Lossy forms (fp16, int8, QDQ): identity is held exactly against the lossy original (fp16:
rel 5e-3, ORT's fp16 kernels differ once the graph changes); selections must keep at least
75% of the reference's indices in every row, and the rows whose kept indices equal the
reference's must be within max(0.02, 4 x the unpruned lossy model's error against torch);
batch rows within 4 x the unpruned lossy model's own batch-vs-alone difference (dynamic
int8 scales span the batch). A row whose choice differs from the reference (a rounding
near-tie), every row of a merge (the reference does not report which tokens merge), and a
row whose kept indices / merge maps alone differ from its choice in the batch, is not
compared: such a cell is ``works*`` and says how many rows went unchecked. The corpus models' query projections are
scaled x4 (:func:`sharpen`) so that near-ties are rare.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import zoo
from fastv_reference import fastv_reference
from merge_reference import evit_reduce, ppt_reduce, ppt_variance, reference_merge, tome_reduce, visionzip_choice
from reference import (attention_choice, divprune_choice, pool_choice, random_choice, reference_run,
                       zero_tprune_choice)

MODELS = ("timm_vit", "hf_vit", "hf_bert", "hf_llama")
FORMS = ("torch", "dynamo18", "dynamo23", "torchscript14", "torchscript16", "torchscript17", "ort_opt",
         "int8_dynamic", "qdq", "fp16")
PASSES = ("fastv", "cls-attn", "divprune", "zero-tprune", "random", "pool", "tome", "evit", "ppt", "visionzip")
LOSSY = ("int8_dynamic", "qdq", "fp16")
SEED = 21  # the checker's batch-3 inputs
HEADS = 4

_DIR = None


def cache_dir() -> Path:
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="prunec-forms-"))
    return _DIR


SHARPEN = 4.0


def sharpen(module, factor: float = SHARPEN):
    """Scale every query projection by ``factor`` (attention logits x factor): random-weight
    tiny models attend almost uniformly, and their near-tied scores flip under fp16/int8
    rounding; sharper attention makes the kept tokens a stable function of the model."""
    with torch.no_grad():
        for name, mod in module.named_modules():
            leaf = name.split(".")[-1]
            if leaf in ("q_proj", "query"):
                mod.weight.mul_(factor)
                if mod.bias is not None:
                    mod.bias.mul_(factor)
            elif leaf == "qkv":
                c = mod.out_features // 3
                mod.weight[:c].mul_(factor)
                if mod.bias is not None:
                    mod.bias[:c].mul_(factor)
    return module


@lru_cache(maxsize=None)
def case(name):
    """The zoo model ``name`` (a copy of its own, attention sharpened)."""
    c = zoo.CASES[name]()
    sharpen(c.module)
    return c


# -- exporters ---------------------------------------------------------------------------

@contextlib.contextmanager
def _stdout_to_stderr():
    """The TorchScript exporter prints its whole IR graph to stdout when it fails."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def export(c: zoo.Case, form: str, path: Path) -> Path:
    """Export ``c`` as ``form`` (dynamoNN or torchscriptNN) to ``path``."""
    with _stdout_to_stderr():
        return _export(c, form, path)


def _export(c: zoo.Case, form: str, path: Path) -> Path:
    if form.startswith("dynamo"):
        return zoo.export_onnx(c, form, path)
    opset = int(form.removeprefix("torchscript"))
    names = list(c.inputs)
    wrapper = zoo._Wrapper(c.module, names).eval()
    config = getattr(c.module, "config", None)
    saved = getattr(config, "_attn_implementation", None)
    try:
        if config is not None and saved is not None and c.causal:
            config._attn_implementation = "eager"  # as zoo does: TorchScript cannot convert sdpa with GQA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(c.inputs[n] for n in names), str(path), dynamo=False,
                              opset_version=opset, input_names=names, dynamic_axes={n: {0: "batch"} for n in names})
    finally:
        if config is not None and saved is not None:
            config._attn_implementation = saved
    return path


def _base_of_derived(name: str) -> Path:
    for form in ("torchscript17", "dynamo18"):
        p = form_path(name, form)
        if not isinstance(p, Exception):
            return p
    raise p


class _Calibration:
    """quantize_static's calibration reader: 4 batches of the case's inputs."""

    def __init__(self, c, names):
        self.batches = [{k: v.numpy() for k, v in c.make_inputs(2, 100 + i).items() if k in names} for i in range(4)]

    def get_next(self):
        return self.batches.pop() if self.batches else None


def derive(name: str, form: str, path: Path) -> Path:
    """The ORT tools' forms, from the base export."""
    import onnx

    c = case(name)
    base = _base_of_derived(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "ort_opt":
            from onnxruntime.transformers.optimizer import optimize_model

            if c.causal:
                raise NotImplementedError("no ORT optimizer model type for HF Llama in this corpus")
            kind = "bert" if name == "hf_bert" else "vit"
            opt = optimize_model(str(base), model_type=kind, num_heads=HEADS, hidden_size=64, opt_level=1)
            opt.save_model_to_file(str(path))
        elif form == "int8_dynamic":
            from onnxruntime.quantization import quantize_dynamic

            quantize_dynamic(str(base), str(path))
        elif form == "qdq":
            from onnxruntime.quantization import QuantFormat, quantize_static

            names = [i.name for i in onnx.load(str(base)).graph.input]
            quantize_static(str(base), str(path), _Calibration(c, names), quant_format=QuantFormat.QDQ)
        elif form == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            m = convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
            onnx.save(m, str(path))
        else:
            raise ValueError(form)
    return path


@lru_cache(maxsize=None)
def form_path(name: str, form: str):
    """The ONNX file of ``name`` as ``form`` (cached), or the exception that building it raised."""
    path = cache_dir() / f"{name}.{form}.onnx"
    try:
        if form in ("ort_opt",) + LOSSY:
            return derive(name, form, path)
        return export(case(name), form, path)
    except Exception as e:  # noqa: BLE001
        return e


def load(name: str, form: str, inputs: dict):
    import prunec

    if form == "torch":
        return prunec.load(case(name).module, inputs)
    p = form_path(name, form)
    if isinstance(p, Exception):
        raise FormUnavailable(f"{form} cannot be built for {name}: {str(p).splitlines()[0][:120] if str(p) else type(p).__name__}")
    return prunec.load(p)


class FormUnavailable(Exception):
    """The exporter / ORT tool cannot produce this form of this model."""


# -- passes and their references -------------------------------------------------------

@dataclass
class Spec:
    """A pass setting: ``opts`` (a real reduction), ``identity`` (keep=1 / r=0), and the
    reference ``reference(inputs) -> (torch outputs, kept indices [B, M] or None)``."""

    name: str
    opts: dict
    identity: dict
    reference: Callable | None
    compare_indices: bool = True
    note: str = ""


def _span(c):
    return tuple(int(x) for x in c.span.split(":")) if c.span else None


def query_of(c):
    return "last" if c.causal else ("cls" if c.prefix else "mean")


def ppt_threshold(c, inputs) -> float:
    """Between the two smallest importance variances at layer 0, so the batch mixes prune and pool."""
    seen = []

    def record(x, k, v, probs, state):
        seen.append(ppt_variance(probs, v, c.prefix)[1])
        return x
    reference_merge(c.module, inputs, {0: record})
    v = sorted(float(x) for x in seen[0])
    return (v[0] + v[1]) / 2


def spec(name: str, pname: str, inputs: dict | None = None) -> Spec | None:
    """The corpus's setting of ``pname`` on model ``name``; None where no reference exists."""
    c = case(name)
    p, span = c.prefix, _span(c)
    so = {"span": c.span} if c.span else {}
    n = next(iter(c.inputs.values())).shape[-1] if name in ("hf_bert", "hf_llama") else 1 + (zoo.IMG // 8) ** 2
    M = c.module
    if pname == "fastv":
        return Spec(pname, dict(keep=0.25, layer=2, **so), dict(keep=1.0, layer=2, **so),
                    lambda x: fastv_reference(M, x, 0.25, 2, query_of(c), span, p))
    if pname == "cls-attn":
        if c.causal:  # no CLS token: the pass must refuse
            return Spec(pname, dict(keep=0.5), dict(keep=1.0), None)
        return Spec(pname, dict(keep=0.5), dict(keep=1.0),
                    lambda x: reference_run(M, x, "output", attention_choice(c.depth - 2, "cls", 0.5, span, p)))
    if pname == "divprune":
        return Spec(pname, dict(keep=0.5, layer="2", **so), dict(keep=1.0, layer="2", **so),
                    lambda x: reference_run(M, x, 2, divprune_choice(0.5, span, p)))
    if pname == "zero-tprune":
        if c.causal:
            return None
        return Spec(pname, dict(keep=0.25, layer="2", iters=5, similar=0.5),
                    dict(keep=1.0, layer="2", iters=5, similar=0.5),
                    lambda x: reference_run(M, x, 2, zero_tprune_choice(1, 0.25, 5, 0.5, 0 if p else None, span, p)))
    if pname == "random":
        return Spec(pname, dict(keep=0.25, layer="1", seed=3, **so), dict(keep=1.0, layer="1", seed=3, **so),
                    lambda x: reference_run(M, x, 1, random_choice(0.25, 3, span, p)))
    if pname == "pool":
        if name == "hf_bert":
            return None  # a text encoder has no patch grid (1-D pooling has no reference here)
        extra = {"span": c.span, "grid": "4x4"} if c.span else {}
        opts = dict(layer="1", factor=2, **extra)
        return Spec(pname, opts, dict(opts, factor=1),
                    lambda x: reference_run(M, x, 1, pool_choice(2, (4, 4), span[0] if span else p)))
    if c.causal:
        return None  # merges: the references cover encoders only
    if pname == "tome":
        return Spec(pname, dict(r="3"), dict(r="0"),
                    lambda x: (reference_merge(M, x, {i: tome_reduce(3, p) for i in range(c.depth)},
                                               prop_attn=True)[0], None), compare_indices=False)
    if pname == "evit":
        return Spec(pname, dict(keep="0.5", layers="1/2"), dict(keep="1.0", layers="1/2"),
                    lambda x: (reference_merge(M, x, {1: evit_reduce(0.5, p), 2: evit_reduce(0.5, p)})[0], None),
                    compare_indices=False)
    if pname == "ppt":
        thr = ppt_threshold(c, inputs if inputs is not None else c.make_inputs(3, SEED))
        return Spec(pname, dict(r=3, layers="0/2", threshold=thr), dict(r=0, layers="0/2", threshold=thr),
                    lambda x: (reference_merge(M, x, {0: ppt_reduce(3, thr, p), 2: ppt_reduce(3, thr, p)},
                                               prop_attn=True)[0], None), compare_indices=False)
    if pname == "visionzip":
        # the default cut: before the last layer, scored by the penultimate one (the official code)
        return Spec(pname, dict(dominant=5, contextual=3), dict(dominant=n, contextual=0),
                    lambda x: reference_run(M, x, c.depth - 1, visionzip_choice(c.depth - 2, 5, 3, HEADS, p)),
                    compare_indices=False)
    raise ValueError(pname)


# -- the checker ---------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # works | works* | refused | WRONG | crash | n/a (no reference, or the form cannot be built)
    detail: str = ""
    numbers: dict = field(default_factory=dict)
    unavailable: bool = False  # n/a because the exporter / ORT tool cannot build the form

    def __str__(self):
        return f"{self.status}: {self.detail}" if self.detail else self.status


TOL_IDENTITY = {"fp16": 5e-3}  # rel max-abs error of keep=1 / r=0 against the same form unpruned; else 1e-5
LOSSY_FACTOR, LOSSY_FLOOR = 4.0, 0.02  # lossy forms: reference within max(floor, factor x the unpruned form's error)
INDEX_AGREEMENT = 0.75  # lossy forms: share of kept indices in common with the reference, per row


def outputs(model, inputs) -> list[np.ndarray]:
    """Flat float outputs as numpy arrays, for either backend."""
    import torch.utils._pytree as pytree

    if model.kind == "torch":
        out = model.run(**inputs)
        return [t.detach().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return [o for o in model.run({k: v.numpy() for k, v in inputs.items()}) if o.dtype.kind == "f"]


def unfused_outputs(model, inputs) -> list[np.ndarray]:
    """An ONNX model's float outputs without ORT's graph optimizations (no QDQ fusion)."""
    from prunec.backends.onnx import make_session

    sess = make_session(model.model, quick=True)
    return [o for o in sess.run(None, {k: v.numpy() for k, v in inputs.items()}) if o.dtype.kind == "f"]


def torch_outputs(out) -> list[np.ndarray]:
    import torch.utils._pytree as pytree

    return [t.detach().float().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def kept(model, inputs) -> dict:
    return model.kept_indices(**inputs) if model.kind == "torch" else model.kept_indices(
        {k: v.numpy() for k, v in inputs.items()})


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if a.size else 0.0


def token_set_err(a, b) -> float:
    """Lossy forms: a [N, C] against b [N, C] as sets of tokens (each token of either to its
    nearest in the other), relative to b's scale: kept tokens whose order a near-tie under
    quantization flipped (EViT, PPT and VisionZip keep tokens in score order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    return float(max(d.min(1).max(), d.min(0).max()) / max(np.abs(b).max(), 1e-12))


def _close(a, b, rtol, atol) -> bool:
    return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol))


def _rows(inputs, row):
    return {k: v[row:row + 1] for k, v in inputs.items()}


def check(name: str, form: str, pname: str, s: Spec | None = None, inputs: dict | None = None,
          loader: Callable | None = None, module=None) -> Outcome:
    """What prunec makes of pass ``pname`` on model ``name`` in ``form``. ``s``/``inputs``/
    ``loader(inputs) -> prunec model``/``module`` override the corpus's (the fuzz uses them)."""
    import prunec

    c = case(name) if module is None else None
    module = module if module is not None else c.module
    inputs = inputs if inputs is not None else c.make_inputs(3, SEED)
    if s is None:
        s = spec(name, pname, inputs)
    if s is None:
        return Outcome("n/a", f"no reference for {pname} on {name}")
    loader = loader or (lambda x: load(name, form, x))
    P = prunec.passes.get(pname)
    stage = "load"
    try:
        model = loader(inputs)
        stage = "pass"
        out = P(**s.opts)(model)
        if s.reference is None:
            return Outcome("n/a", f"{pname} ran on {name} ({form}) but has no reference there")
        stage = "identity pass"
        same = P(**s.identity)(model)
        stage = "numeric check"
        return _numeric(form, s, P, module, model, out, same, inputs, loader)
    except FormUnavailable as e:
        return Outcome("n/a", str(e), unavailable=True)
    except prunec.PruneError as e:
        msg = str(e)
        if "\n" in msg.strip() or not msg.strip():
            return Outcome("crash", f"{stage}: PruneError without a one-line message: {msg[:200]!r}")
        return Outcome("refused", (f"{stage}: " if stage != "pass" else "") + msg)
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "prunec" in f.filename), "")
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return Outcome("crash", f"{stage}: {type(e).__name__}: {first} [{where}]")


def _numeric(form, s, P, module, model, out, same, inputs, loader) -> Outcome:
    lossy = form in LOSSY
    nums = {}
    if form == "qdq":  # ORT fuses DQ -> op -> Q into integer kernels, and a gather at the cut (here the
        # identity) changes which, by a quantization step: compare the graphs' own (unfused) semantics
        base, ident = unfused_outputs(model, inputs), unfused_outputs(same, inputs)
    else:
        base, ident = outputs(model, inputs), outputs(same, inputs)
    if [a.shape for a in ident] != [a.shape for a in base]:
        return Outcome("WRONG", f"identity setting changed the output shapes {[a.shape for a in base]} -> "
                                f"{[a.shape for a in ident]}")
    e_id = max((rel_err(a, b) for a, b in zip(ident, base)), default=0.0)
    nums["identity"] = e_id
    if e_id > TOL_IDENTITY.get(form, 1e-5):
        return Outcome("WRONG", f"identity ({s.identity}) differs from the original: rel {e_id:.2e}", nums)

    ref_out, ref_idx = s.reference(inputs)
    ref = torch_outputs(ref_out)
    got = outputs(out, inputs)
    if [a.shape for a in got] != [a.shape for a in ref]:
        return Outcome("WRONG", f"output shapes {[a.shape for a in got]} != reference {[a.shape for a in ref]}", nums)
    differ = set()  # lossy forms: rows whose kept indices differ from the reference (a near-tie flipped)
    if s.compare_indices and ref_idx is not None:
        k = kept(out, inputs)
        if not k:
            return Outcome("WRONG", "the pass reports no kept indices", nums)
        idx = np.asarray(list(k.values())[-1])
        ref_idx = ref_idx.numpy()
        if idx.shape != ref_idx.shape:
            return Outcome("WRONG", f"kept indices shape {idx.shape} != reference {ref_idx.shape}", nums)
        per_row = [len(set(a) & set(b)) / len(b) for a, b in zip(idx.tolist(), ref_idx.tolist())]
        agree = float(np.mean(per_row))
        nums["index_agreement"] = agree
        if not lossy and not np.array_equal(idx, ref_idx):
            return Outcome("WRONG", f"kept indices differ from the reference (agreement {agree:.2f})", nums)
        if lossy and min(per_row) < INDEX_AGREEMENT:
            return Outcome("WRONG", f"kept indices agree with the reference on {min(per_row):.2f} only", nums)
        differ = {i for i, a in enumerate(per_row) if a < 1}
    e_ref = max((rel_err(a, b) for a, b in zip(got, ref)), default=0.0)
    nums["reference"] = e_ref
    if lossy:
        with torch.no_grad():
            plain = torch_outputs(module(**inputs))
        e0 = max((rel_err(a, b) for a, b in zip(base, plain)), default=0.0)
        nums["form_error"] = e0
        tol = max(LOSSY_FLOOR, LOSSY_FACTOR * e0)
        b = next(iter(inputs.values())).shape[0]
        if not s.compare_indices:  # merges: which tokens merge is not reported; near-ties decide it
            differ = set(range(b))
        for a, r in zip(got, ref):
            rows = range(b) if a.ndim and a.shape[0] == b else [None]
            for row in rows:
                if row in differ or (row is None and differ):
                    continue
                e = rel_err(a, r) if row is None else rel_err(a[row], r[row])
                if e > tol:
                    return Outcome("WRONG", f"off the reference by rel {e:.2e} (> {tol:.2e}; the unpruned form is off "
                                            f"by {e0:.2e})" + (f" in row {row}" if row is not None else ""), nums)
        nums["rows_unchecked"] = len(differ)
    elif not all(_close(a, b, 1e-4, 1e-4) for a, b in zip(got, ref)):
        return Outcome("WRONG", f"off the reference by rel {e_ref:.2e}", nums)

    # each batch row equals that sample alone
    together = got
    b = next(iter(inputs.values())).shape[0]
    single = out if model.kind != "torch" else P(**s.opts)(loader(_rows(inputs, 0)))
    worst, worst_base, flipped = 0.0, 0.0, 0
    maps = choices(out, inputs) if lossy else {}
    for row in range(b):
        alone_in = _rows(inputs, row)
        if lossy and any(not np.array_equal(v[row:row + 1], choices(single, alone_in)[k]) for k, v in maps.items()):
            flipped += 1  # batch-wide int8 scales moved a near-tie: this row chose other tokens alone
            continue
        for a, t in zip(outputs(single, alone_in), together):
            if t.ndim and t.shape[0] == b:
                e = rel_err(a, t[row:row + 1]) if not _close(a, t[row:row + 1], 1e-4, 1e-5) else 0.0
                worst = max(worst, e)
        if lossy and model.kind != "torch":
            for a, t in zip(outputs(model, alone_in), base):
                if t.ndim and t.shape[0] == b:
                    worst_base = max(worst_base, rel_err(a, t[row:row + 1]))
    nums["rows"] = worst
    if worst > (max(1e-3, LOSSY_FACTOR * worst_base) if lossy else 0.0):
        return Outcome("WRONG", f"a batch row differs from that sample alone: rel {worst:.2e}", nums)
    unchecked = [f"{nums['rows_unchecked']} of {b} rows not compared to the reference"] if nums.get("rows_unchecked") \
        else []
    if flipped:
        unchecked.append(f"{flipped} of {b} rows not compared alone")
    if unchecked:
        return Outcome("works*", " and ".join(unchecked) + " (their choice differs by rounding near-ties)", nums)
    return Outcome("works", "", nums)


def choices(model, inputs) -> dict:
    """The pass's kept indices and merge maps {tag: int64 [B, ...]}."""
    out = dict(kept(model, inputs))
    if hasattr(model, "merge_maps"):
        try:
            out.update({f"map:{k}": v for k, v in (model.merge_maps(**inputs) if model.kind == "torch" else
                                                   model.merge_maps({k: v.numpy() for k, v in inputs.items()})).items()})
        except Exception:  # noqa: BLE001  (selections have no merge maps)
            pass
    return {k: np.asarray(v) for k, v in out.items()}


# -- random small transformers (the fuzz) --------------------------------------------------

FUZZ_FORMS = ("torch", "dynamo18", "torchscript14", "torchscript17")


@dataclass
class Graph:
    """A seeded random model in one form: ``case`` (zoo.Case), ``form`` (an exporter name,
    ``+fp16`` for convert_float_to_float16 with keep_io_types), ``desc`` (what was drawn)."""

    seed: int
    case: zoo.Case
    form: str
    desc: str
    family: str
    pool: str = ""  # timm: token / avg / none
    _models: dict = field(default_factory=dict)
    _path: object = None

    @property
    def lossy_form(self) -> str:
        return "fp16" if self.form.endswith("+fp16") else self.form

    def path(self):
        if self._path is None:
            base = self.form.removesuffix("+fp16")
            p = cache_dir() / f"fuzz{self.seed}.{base}.onnx"
            try:
                export(self.case, base, p)
                if self.form.endswith("+fp16"):
                    import onnx
                    from onnxruntime.transformers.float16 import convert_float_to_float16

                    q = cache_dir() / f"fuzz{self.seed}.{self.form}.onnx"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        onnx.save(convert_float_to_float16(onnx.load(str(p)), keep_io_types=True), str(q))
                    p = q
                self._path = p
            except Exception as e:  # noqa: BLE001
                self._path = e
        if isinstance(self._path, Exception):
            raise FormUnavailable(f"{self.form} cannot be built for {self.desc}: "
                                  f"{(str(self._path).strip().splitlines() or [''])[0][:120]}")
        return self._path

    def loader(self, inputs):
        """The prunec model (cached: ONNX once, torch once per batch size)."""
        import prunec

        key = next(iter(inputs.values())).shape[0] if self.form == "torch" else "onnx"
        if key not in self._models:
            self._models[key] = (prunec.load(self.case.module, inputs) if self.form == "torch"
                                 else prunec.load(self.path()))
        return self._models[key]


def random_graph(seed: int) -> Graph:
    """A seeded random small transformer: timm ViT (CLS or not, 0–4 registers, token / avg /
    sum-divided-by-N / no pooling, fused or eager attention, pre-norm or not), HF BERT with padding, or HF Llama
    with GQA and padding; depth 2–4, width 32–64; in a random form."""
    import random

    rng = random.Random(seed)
    family = rng.choice(["timm", "timm", "timm", "bert", "llama"])
    depth, heads = rng.randint(2, 4), rng.choice([2, 4])
    width = heads * rng.choice([8, 16])
    fused = rng.random() < 0.5
    form = rng.choice(FUZZ_FORMS if family != "llama" else ("torch", "dynamo18"))  # TorchScript cannot export Llama
    if form != "torch" and rng.random() < 0.2:
        form += "+fp16"
    torch.manual_seed(seed)
    if family == "timm":
        from timm.models.vision_transformer import VisionTransformer

        cls = rng.random() < 0.7
        reg = rng.choice([0, 0, 1, 2, 4])
        pool = rng.choice(["token", "avg", "sumdiv", "none"] if cls else ["avg", "sumdiv", "none"])
        pre_norm = rng.random() < 0.25
        m = VisionTransformer(img_size=32, patch_size=8, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=2,
                              class_token=cls, reg_tokens=reg, global_pool={"none": "", "sumdiv": "avg"}.get(pool, pool),
                              num_classes=0 if pool == "none" else 10, pre_norm=pre_norm,
                              no_embed_class=reg > 0, fc_norm=False if pool == "sumdiv" else None).eval()
        for t in (m.cls_token, m.reg_token):  # timm inits them at std 1e-6: with no_embed_class (no position
            if t is not None:  # added) LayerNorm's eps flattens them, and block 0's CLS attention is uniform up to
                torch.nn.init.normal_(t, std=0.02)  # float rounding (ties any backend may break its own way)
        if pool == "sumdiv":  # (no LayerNorm after the pooling: it would hide a wrong divisor)  # a token count written as a number: x.shape[1] exports as the constant N
            m.pool = _sum_div_pool(m.num_prefix_tokens)
        for blk in m.blocks:
            blk.attn.fused_attn = fused
        prefix = int(cls) + reg
        c = zoo.Case(f"fuzz{seed}", m, {"x": zoo._images(3, seed)}, prefix=prefix, depth=depth,
                     make_inputs=lambda b, s=1: {"x": zoo._images(b, s)})
        desc = (f"timm depth={depth} width={width} heads={heads} cls={cls} reg={reg} pool={pool} "
                f"pre_norm={pre_norm} fused={fused}")
        return Graph(seed, c, form, desc + f" form={form}", "timm", pool)
    attn = "sdpa" if fused else "eager"
    if family == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=100, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                         intermediate_size=2 * width, max_position_embeddings=64, attn_implementation=attn)
        m = BertModel(cfg, add_pooling_layer=rng.random() < 0.5).eval()
        n = rng.choice([12, 16])
        prefix = int(m.pooler is not None)  # without the pooler nothing reads [CLS]: the graph shows no prefix
        c = zoo.Case(f"fuzz{seed}", m, zoo._bert_inputs(3, seed, n), prefix=prefix, depth=depth,
                     make_inputs=lambda b, s=1, n=n: zoo._bert_inputs(b, s, n))
        desc = f"bert depth={depth} width={width} heads={heads} n={n} attn={attn} pooler={m.pooler is not None}"
        return Graph(seed, c, form, desc + f" form={form}", "bert")
    from transformers import LlamaConfig, LlamaForCausalLM

    kv = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
    cfg = LlamaConfig(vocab_size=100, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, use_cache=False,
                      attn_implementation=attn)
    m = LlamaForCausalLM(cfg).eval()
    n = 16
    pad = rng.random() < 0.5

    def inputs(b, s=1):
        x = zoo._llama_inputs(b, s, n)
        if pad:
            mask = torch.ones(b, n, dtype=torch.long)
            for i in range(b):
                mask[i, n - (i % 3):] = 0  # right padding, 0-2 tokens
            x["attention_mask"] = mask
        return x
    c = zoo.Case(f"fuzz{seed}", m, inputs(3, seed), prefix=0, depth=depth, causal=True, span="2:14",
                 make_inputs=inputs)
    desc = f"llama depth={depth} width={width} heads={heads} kv={kv} padding={pad} attn={attn}"
    return Graph(seed, c, form, desc + f" form={form}", "llama")


def _sum_div_pool(prefix):
    def pool(x, pool_type=None):
        return x[:, prefix:].sum(1) / (x.shape[1] - prefix)
    return pool


def _weighted_pool(model, holder):
    """timm's avg pooling over the non-prefix tokens, each token weighted by its size (the
    merged-token semantics the README states); the model's own pooling when nothing merged."""
    own = model.pool
    P = model.num_prefix_tokens

    def pool(x, pool_type=None):
        st = holder.get("state")
        if model.global_pool != "avg" or st is None or st.get("size") is None:
            return own(x, pool_type)
        w = st["size"][:, P:]
        return (x[:, P:] * w).sum(1) / w.sum(1)
    return pool


def _merge_ref(c, reductions: dict, prop_attn: bool, weighted: bool):
    """reference_merge with timm's avg pooling size-weighted (``weighted``)."""
    holder = {}

    def spy(red):
        def reduce(x, k, v, probs, state):
            holder["state"] = state
            return red(x, k, v, probs, state)
        return reduce
    m = c.module
    if weighted:
        m = copy.deepcopy(m)
        m.pool = _weighted_pool(m, holder)

    def run(x):
        holder.clear()
        return reference_merge(m, x, {i: spy(r) for i, r in reductions.items()}, prop_attn=prop_attn)[0], None
    return run


def random_spec(g: Graph, rng) -> Spec | None:
    """A random pass with random options on graph ``g`` and its reference (None: no reference)."""
    c = g.case
    p, d = c.prefix, c.depth
    span = _span(c)
    so = {"span": c.span} if c.span else {}
    n = next(iter(c.inputs.values())).shape[-1] if g.family != "timm" else p + 16
    M = c.module
    has_cls = (g.family == "bert" and p == 1) or (g.family == "timm" and M.cls_token is not None)
    registers = g.family == "timm" and p > int(has_cls)
    names = ["fastv", "divprune", "random"]
    if not c.causal:
        names += ["zero-tprune"] + ([] if registers else ["tome", "tome"])  # the ToMe reference protects CLS only
        if has_cls:
            names += ["cls-attn", "evit", "visionzip"] + ([] if registers else ["ppt"])
    if g.family == "timm":
        names += ["pool"]
    pname = rng.choice(names)
    keep = rng.choice([0.25, 0.5, 0.75, 1.0])
    layer = rng.randint(1, d - 1)
    out_ok = rng.random() < 0.4  # the selection passes' default cut: the encoder output
    if pname == "fastv":
        q = query_of(c)
        return Spec(pname, dict(keep=keep, layer=layer, **so), dict(keep=1.0, layer=layer, **so),
                    lambda x: fastv_reference(M, x, keep, layer, q, span, p))
    if pname == "cls-attn":
        lay = "output" if out_ok else layer
        sl = d - 2 if lay == "output" else layer - 1
        if sl < 0:
            return None
        opts = dict(keep=keep) if lay == "output" else dict(keep=keep, layer=str(lay))
        return Spec(pname, opts, dict(opts, keep=1.0),
                    lambda x: reference_run(M, x, lay, attention_choice(sl, 0, keep, span, p)))
    if pname in ("divprune", "random"):
        lay = "output" if out_ok else layer
        opts = dict(keep=keep, **so) if lay == "output" else dict(keep=keep, layer=str(lay), **so)
        if pname == "random":
            opts["seed"] = rng.randint(0, 9)
            choose = random_choice(keep, opts["seed"], span, p)
        else:
            choose = divprune_choice(keep, span, p)
        return Spec(pname, opts, dict(opts, keep=1.0), lambda x: reference_run(M, x, lay, choose))
    if pname == "zero-tprune":
        cls = 0 if has_cls else None  # Zero-TPrune's √N start weight goes to a CLS token, never to a register
        opts = dict(keep=keep, layer=str(layer), iters=5, similar=0.5)
        if g.family == "timm" and not has_cls and p == 1:
            opts["cls"] = "none"  # one register alone in front looks like a CLS token in the graph
        return Spec(pname, opts, dict(opts, keep=1.0),
                    lambda x: reference_run(M, x, layer, zero_tprune_choice(layer - 1, keep, 5, 0.5, cls, span, p)))
    if pname == "pool":
        opts = dict(layer=str(layer), factor=2)
        return Spec(pname, opts, dict(opts, factor=1), lambda x: reference_run(M, x, layer, pool_choice(2, (4, 4), p)))
    weighted = g.pool in ("avg", "sumdiv")  # a mean over tokens is size-weighted after a merge
    if pname == "tome":
        rs = [rng.randint(0, 4) for _ in range(d)]
        prop = rng.random() < 0.7
        opts = dict(r="/".join(map(str, rs)), prop_attn=str(prop).lower())
        return Spec(pname, opts, dict(opts, r="0"),
                    _merge_ref(c, {i: tome_reduce(r, p) for i, r in enumerate(rs) if r}, prop, weighted),
                    compare_indices=False)
    if pname == "evit":
        layers = sorted(rng.sample(range(d), rng.randint(1, min(2, d))))
        k = rng.choice([0.5, 0.7])
        opts = dict(keep=str(k), layers="/".join(map(str, layers)))
        return Spec(pname, opts, dict(opts, keep="1.0"),
                    _merge_ref(c, {i: evit_reduce(k, p) for i in layers}, False, False), compare_indices=False)
    if pname == "ppt":
        layers = sorted(rng.sample(range(d), rng.randint(1, min(2, d))))
        r = rng.randint(1, 4)
        thr = rng.choice([0.0, 1e9, 7e-5])  # always prune, always pool, the paper's default
        opts = dict(r=r, layers="/".join(map(str, layers)), threshold=thr)
        return Spec(pname, opts, dict(opts, r=0),
                    _merge_ref(c, {i: ppt_reduce(r, thr, p) for i in layers}, True, weighted), compare_indices=False)
    if pname == "visionzip":
        # the default cut (before the last layer, scored by the penultimate one), the output, or layer K
        how = "default" if out_ok and rng.random() < 0.5 else ("output" if out_ok else "layer")
        lay = {"default": d - 1, "output": "output", "layer": layer}[how]
        sl = d - 1 if lay == "output" else lay - 1
        dom = rng.randint(p + 1, p + 6)
        ctx = rng.randint(0, 4)
        opts = dict(dominant=dom, contextual=ctx) if how == "default" else dict(dominant=dom, contextual=ctx,
                                                                                   layer=str(lay))
        return Spec(pname, opts, dict(opts, dominant=n, contextual=0),
                    lambda x: reference_run(M, x, lay, visionzip_choice(sl, dom, ctx, heads_of(M), p)),
                    compare_indices=False)
    raise ValueError(pname)


def heads_of(m) -> int:
    from reference import layers_of

    layer = layers_of(m)[0]
    if hasattr(layer, "attn"):
        return layer.attn.num_heads
    return m.config.num_attention_heads

