"""Graph forms deployers ship after export: dynamic int8 and QDQ quantized graphs (ORT's
quantizer), fp16 (ORT's converter, with and without ``keep_io_types``), bf16, and
sequence-first layouts [N, B, C].

References are the plain-PyTorch ones (reference.py, merge_reference.py, run with hooks on
the *unmodified fp32 torch model*). A quantized or fp16 graph cannot match them exactly:
outputs are held to them within the error the form itself brings (the unpruned quantized /
fp16 graph against the unpruned fp32 model), kept indices must equal the reference's
wherever the reference's scores are not near ties. keep=1 / r=0 must reproduce the
converted graph's own ORT outputs exactly.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import onnx
import pytest
import torch

import prunec
from conftest import case, export_dir, onnx_file, torch_outputs
from fastv_reference import fastv_reference
from merge_reference import bipartite_groups, evit_reduce, ppt_reduce, reference_merge, tome_reduce, visionzip_choice
from reference import (Choice, attention_choice, divprune_choice, pool_choice, random_choice, reference_run,
                       zero_tprune_choice)

ALL = os.environ.get("PRUNEC_SLOW_FORMS") == "1"  # opt-in: every pass on every form (slow)


# -- building the forms with ORT's own tools ------------------------------------------------

def _topo_sort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's fp16 converter can write nodes out of topological order. Sorting at load is
    another change's job (issue 12, graph hygiene); the fixture sorts so this file tests dtypes."""
    avail = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    todo, order = list(proto.graph.node), []
    while todo:
        rest = []
        for n in todo:
            if all(i in avail for i in n.input):
                order.append(n)
                avail |= set(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(todo), "cyclic graph"
        todo = rest
    del proto.graph.node[:]
    proto.graph.node.extend(order)
    return proto


class _Calibration:
    """A few batches of the case's inputs for ORT's static quantizer."""

    def __init__(self, c):
        self.batches = iter([{k: v.numpy() for k, v in c.make_inputs(2, s).items()} for s in range(3)])

    def get_next(self):
        return next(self.batches, None)


@lru_cache(maxsize=None)
def form_file(name: str, form: str) -> str:
    """``name``'s TorchScript export (opset 17) turned into ``form``: dyn (quantize_dynamic),
    dynfused (dyn after ORT's extended optimizations: DynamicQuantizeMatMul), qdq (quantize_static, QDQ), fp16 / fp16io (convert_float_to_float16 without / with
    keep_io_types), bf16 (every float initializer and input as bfloat16)."""
    src = str(onnx_file(name, "torchscript17"))
    out = str(export_dir() / f"{name}.{form}.onnx")
    if form == "dyn":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    elif form == "qdq":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(_Calibration, CalibrationDataReader):
            pass
        quantize_static(src, out, Reader(case(name)), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    elif form == "dynfused":  # ORT's own fusions of the dynamic-int8 graph, saved: DynamicQuantizeMatMul
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        ort.InferenceSession(form_file(name, "dyn"), so, providers=["CPUExecutionProvider"])
    elif form in ("fp16", "fp16io"):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(src), keep_io_types=form == "fp16io")
        onnx.save(_topo_sort(proto), out)
    else:
        raise ValueError(form)
    return out


def feeds_for(name: str, form: str, inputs=None) -> dict:
    inputs = case(name).inputs if inputs is None else inputs
    feeds = {k: v.numpy() for k, v in inputs.items()}
    if form == "fp16":  # fp16io, dyn, qdq and fp32 take the float32 inputs
        feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


def ort_run(path: str, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def floats(outs) -> list[np.ndarray]:
    return [np.asarray(o, np.float32) for o in outs if np.asarray(o).dtype.kind == "f"]


# -- passes and their references ------------------------------------------------------------

class Scores:
    """Wraps the reference's attention chooser and records the span scores it ranked [B, S]."""

    def __init__(self, score_layer, query, keep, prefix):
        self.inner = attention_choice(score_layer, query, keep, None, prefix)
        self.layer, self.query, self.prefix, self.keep = score_layer, query, prefix, keep
        self.scores = None

    def __call__(self, hidden, probs):
        row = probs[self.layer][:, :, 0, :] if self.query == "cls" else probs[self.layer].mean(dim=2)
        self.scores = row.mean(dim=1)[:, self.prefix:].numpy()
        return self.inner(hidden, probs)


def assert_same_picks(got, ref, scores, prefix, tol):
    """Kept indices [B, M] equal the reference's except among span tokens whose reference score
    lies within ``tol`` of the k-th best (near ties the form's error may order either way)."""
    assert got.shape == ref.shape
    k = got.shape[1] - prefix
    for row, s in zip(got, scores):
        kth = np.sort(s)[::-1][k - 1]
        sure_in = {i + prefix for i in np.flatnonzero(s > kth + tol)}
        sure_out = {i + prefix for i in np.flatnonzero(s < kth - tol)}
        picked = set(row.tolist())
        assert set(range(prefix)) <= picked
        assert sure_in <= picked and not sure_out & picked, (sorted(picked), sorted(sure_in), sorted(sure_out))


def vit_settings():
    """timm ViT (prefix 1, 17 tokens, 3 layers): {pass: (options, identity options, reference)}
    where reference() -> (outputs, kept indices or None, attention scores of the span or None).
    Every cut is inside the encoder: the head reads only CLS, so an output cut would not show."""
    c = case("timm_vit")
    m, x = c.module, c.inputs

    def sel(layer, choose):
        out, idx = reference_run(m, x, layer, choose)
        return out, idx, getattr(choose, "scores", None)

    def merged(reductions, prop):
        return reference_merge(m, x, reductions, prop_attn=prop)[0], None, None

    return {
        "fastv": (dict(keep=0.5, layer="2"), dict(keep=1.0, layer="2"), lambda: sel(2, Scores(1, "cls", 0.5, 1))),
        "cls-attn": (dict(keep=0.25, layer="2"), dict(keep=1.0, layer="2"), lambda: sel(2, Scores(1, "cls", 0.25, 1))),
        "divprune": (dict(keep=0.5, layer="2"), dict(keep=1.0, layer="2"), lambda: sel(2, divprune_choice(0.5, None, 1))),
        "zero-tprune": (dict(keep=0.5, layer="2", iters=5, similar=0.5), dict(keep=1.0, layer="2"),
                        lambda: sel(2, zero_tprune_choice(1, 0.5, 5, 0.5, 0, None, 1))),
        "random": (dict(keep=0.5, layer="1", seed=3), dict(keep=1.0, layer="1"), lambda: sel(1, random_choice(0.5, 3, None, 1))),
        "pool": (dict(layer="1", factor=2), dict(layer="1", factor=1), lambda: sel(1, pool_choice(2, (4, 4), 1))),
        "tome": (dict(r="3"), dict(r="0"), lambda: merged({i: tome_reduce(3, 1) for i in range(3)}, True)),
        "evit": (dict(keep="0.5", layers="1/2"), dict(keep="1.0", layers="1/2"),
                 lambda: merged({1: evit_reduce(0.5, 1), 2: evit_reduce(0.5, 1)}, False)),
        "ppt": (dict(r=3, layers="0/2", threshold=0.0), dict(r=0, layers="0/2"),
                lambda: merged({0: ppt_reduce(3, 0.0, 1), 2: ppt_reduce(3, 0.0, 1)}, True)),
        "visionzip": (dict(dominant=6, contextual=4, layer="2"), dict(dominant=17, contextual=0, layer="2"),
                      lambda: (reference_run(m, x, 2, visionzip_choice(1, 6, 4, 4, 1))[0], None, None)),
    }


def subset(names):
    """The default run covers ``names``; PRUNEC_SLOW_FORMS=1 every pass."""
    return PASSES if ALL else list(names)


PASSES = ["fastv", "cls-attn", "divprune", "zero-tprune", "random", "pool", "tome", "evit", "ppt", "visionzip"]


@lru_cache(maxsize=None)
def reference(pname):
    out, idx, scores = vit_settings()[pname][2]()
    return torch_outputs(out), (None if idx is None else idx.numpy()), scores


@lru_cache(maxsize=None)
def loaded(name, form):
    return prunec.load(form_file(name, form))


def form_error(name, form):
    """Max |converted − fp32 torch| over the unpruned outputs, relative to the output scale: the
    error the form itself brings."""
    got = floats(ort_run(form_file(name, form), feeds_for(name, form)))
    ref = torch_outputs(case(name).module(**case(name).inputs))
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, ref))


def check_against_reference(name, form, pname):
    """The pass on the converted graph against the plain reference on the fp32 torch model."""
    opts = vit_settings()[pname][0]
    pruned = prunec.passes.get(pname)(**opts)(loaded(name, form))
    feeds = feeds_for(name, form)
    ref_out, ref_idx, scores = reference(pname)
    err = form_error(name, form)
    if ref_idx is not None:
        idx = pruned.kept_indices(feeds)
        assert len(idx) == 1
        got_idx = next(iter(idx.values()))
        if scores is None:
            np.testing.assert_array_equal(got_idx, ref_idx)
        else:
            assert_same_picks(got_idx, ref_idx, scores, 1, tol=4 * err * float(scores.max()))
    got = floats(pruned.run(feeds))
    assert [a.shape for a in got] == [b.shape for b in ref_out]
    for a, b in zip(got, ref_out):  # pruning itself moves these outputs by 5-18%
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        assert rel <= 4 * err + 1e-3, (pname, rel, err)


def check_identity(name, form, pname, opts):
    """keep=1 / r=0 / factor=1 reproduces the converted graph's own ORT outputs, up to a few
    units in the last place of its float type (ORT fuses the graph around the cut differently)."""
    same = prunec.passes.get(pname)(**opts)(loaded(name, form))
    feeds = feeds_for(name, form)
    if form == "qdq":  # ORT fuses DQ -> op -> Q into integer kernels; a gather at the cut (here
        # the identity) changes which, by a quantization step. Compare the graphs' own semantics.
        from prunec.backends.onnx import make_session

        orig = make_session(form_file(name, form), quick=True).run(None, feeds)
        new = make_session(same.model, quick=True).run(None, feeds)
    else:
        orig, new = ort_run(form_file(name, form), feeds), same.run(feeds)
    for a, b in zip(orig, new, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype.kind == "f":
            scale = float(np.abs(a.astype(np.float32)).max())
            eps = np.finfo(np.float16 if form.startswith("fp16") else a.dtype).eps  # the type it computes in
            assert float(np.abs(a.astype(np.float32) - b).max()) <= 4 * eps * scale
        else:
            np.testing.assert_array_equal(a, b)


# -- fp16 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pname", PASSES)
def test_fp16_vit_matches_reference(pname):
    check_against_reference("timm_vit", "fp16", pname)


@pytest.mark.parametrize("pname", PASSES)
def test_fp16_vit_identity(pname):
    check_identity("timm_vit", "fp16", pname, vit_settings()[pname][1])


@pytest.mark.parametrize("pname", subset(["fastv", "tome"]))
def test_fp16_keep_io_types_vit(pname):
    """keep_io_types: float32 inputs and outputs around an fp16 body (Casts at the edges)."""
    check_against_reference("timm_vit", "fp16io", pname)
    check_identity("timm_vit", "fp16io", pname, vit_settings()[pname][1])


BERT = {  # pass: (options, identity options)
    "fastv": (dict(keep=0.5, layer="2"), dict(keep=1.0, layer="2")),
    "cls-attn": (dict(keep=0.5, layer="2"), dict(keep=1.0, layer="2")),
    "divprune": (dict(keep=0.5, layer="2"), dict(keep=1.0, layer="2")),
    "zero-tprune": (dict(keep=0.5, layer="2", iters=5), dict(keep=1.0, layer="2")),
    "random": (dict(keep=0.5, layer="1", seed=3), dict(keep=1.0, layer="1")),
    "pool": (dict(layer="1", factor=3, grid="15x1"), dict(layer="1", factor=1, grid="15x1")),
    "tome": (dict(r="3"), dict(r="0")),
    "evit": (dict(keep="0.5", layers="1/2"), dict(keep="1.0", layers="1/2")),
    "ppt": (dict(r=3, layers="0/2", threshold=0.0), dict(r=0, layers="0/2")),
    "visionzip": (dict(dominant=6, contextual=4, layer="2"), dict(dominant=16, contextual=0, layer="2")),
}


@lru_cache(maxsize=None)
def bert_fp32(pname):
    """The pass on the fp32 TorchScript export of the same BERT (held to the plain references on
    the torch model by test_fastv / test_selection / test_merge): kept indices and outputs."""
    model = prunec.passes.get(pname)(**BERT[pname][0])(prunec.load(str(onnx_file("hf_bert", "torchscript17"))))
    feeds = feeds_for("hf_bert", "fp32")
    return model.kept_indices(feeds), floats(model.run(feeds))


@pytest.mark.parametrize("pname", subset(["fastv", "tome", "ppt"]))
def test_fp16_bert(pname):
    """Padded BERT in fp16 (masks, post-norm): same kept tokens as the fp32 graph, outputs within
    fp16 error of it, and the identity setting reproduces the fp16 graph exactly."""
    pruned = prunec.passes.get(pname)(**BERT[pname][0])(loaded("hf_bert", "fp16"))
    feeds = feeds_for("hf_bert", "fp16")
    ref_idx, ref_out = bert_fp32(pname)
    idx = pruned.kept_indices(feeds)
    assert idx.keys() == ref_idx.keys()
    for tag in idx:
        np.testing.assert_array_equal(idx[tag], ref_idx[tag])
    err = form_error("hf_bert", "fp16")
    got = floats(pruned.run(feeds))
    assert [a.shape for a in got] == [b.shape for b in ref_out]
    for a, b in zip(got, ref_out):
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        assert rel <= 4 * err + 1e-3, (pname, rel, err)
    check_identity("hf_bert", "fp16", pname, BERT[pname][1])


# -- quantized graphs -------------------------------------------------------------------------

QUANT_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear")


def ort_values(path: str, feeds: dict, names: list[str]) -> dict:
    """Intermediate values of the *unmodified* graph, read the way a hook reads them."""
    import onnxruntime as ort

    proto = onnx.load(path)
    known = {o for n in proto.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    assert not missing, f"the export no longer names {missing}"
    for n in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def read_name(path: str, name: str) -> str:
    """``name`` as the graph's consumers read it: through its DequantizeLinear in a QDQ graph."""
    dq = f"{name}_DequantizeLinear_Output"
    return dq if any(dq in n.output for n in onnx.load(path).graph.node) else name


@pytest.mark.parametrize("form", ["dyn", "qdq"])
def test_quantized_fastv_matches_ort_reference(form):
    """FastV (keep 0.5 before layer 2, CLS query) on the quantized ViT against FastV done by hand
    on the unmodified quantized graph: layer 1's softmax read out of ORT, the top half of the
    span by CLS attention (mean over heads), the stream entering layer 2 gathered and run
    through the graph's own tail (onnx.utils.extract_model). Same indices, same outputs; the
    rewritten graph is still quantized."""
    path, feeds = form_file("timm_vit", form), feeds_for("timm_vit", form)
    probs_name, stream_name = "/module/blocks/blocks.1/attn/Softmax_output_0", "/module/blocks/blocks.1/Add_1_output_0"
    got = ort_values(path, feeds, [probs_name, stream_name])
    scores = got[probs_name][:, :, 0, 1:].astype(np.float64).mean(axis=1)  # [B, 16]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :8] + 1
    ref_idx = np.sort(np.concatenate([np.zeros((2, 1), np.int64), top], axis=1), axis=1)
    s = np.sort(scores, axis=1)[:, ::-1]
    assert (s[:, 7] - s[:, 8]).min() > 1e-7  # far from a float32 tie at the boundary
    tail = str(export_dir() / f"timm_vit.{form}.tail.onnx")
    out_names = [o.name for o in onnx.load(path).graph.output]
    onnx.utils.extract_model(path, tail, [stream_name], out_names)
    sub = onnx.load(tail)  # the tail at any token count: the extractor wrote the probe's shapes
    sub.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"
    del sub.graph.value_info[:]
    onnx.save(sub, tail)
    gathered = np.take_along_axis(got[stream_name], ref_idx[:, :, None], axis=1)
    ref_out = ort_run(tail, {stream_name: gathered})

    pruned = prunec.passes.FastV(keep=0.5, layer="2")(loaded("timm_vit", form))
    np.testing.assert_array_equal(pruned.kept_indices(feeds)["fastv_l2"], ref_idx)
    for a, b in zip(pruned.run(feeds), ref_out, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert_still_quantized(path, pruned)


def assert_still_quantized(path: str, pruned) -> None:
    """Every quantization op and integer weight of the original is in the rewritten graph, and
    prunec added no dequantized copy of a weight (no new float initializer bigger than 256)."""
    from collections import Counter

    orig = onnx.load(path)
    new = pruned.proto()
    count = lambda m: Counter(n.op_type for n in m.graph.node if n.op_type in QUANT_OPS)  # noqa: E731
    before, after = count(orig), count(new)
    assert before and all(after[k] >= v for k, v in before.items()), (before, after)
    ints = {t.name: t.data_type for t in orig.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    new_inits = {t.name: t for t in new.graph.initializer}
    assert all(n in new_inits and new_inits[n].data_type == dt for n, dt in ints.items())
    old_names = {t.name for t in orig.graph.initializer}
    for t in new.graph.initializer:
        if t.name not in old_names and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            assert int(np.prod(t.dims)) <= 256, t.name


@pytest.mark.parametrize("form", ["dyn", "qdq"])
def test_quantized_tome_matches_matching_on_its_keys(form):
    """ToMe (r=3 in block 0) on the quantized ViT: each token's slot equals ToMe's bipartite
    matching (merge_reference.bipartite_groups) on the keys block 0's attention reads in the
    unmodified quantized graph (through its Q/DQ pair in QDQ); the graph stays quantized."""
    path, feeds = form_file("timm_vit", form), feeds_for("timm_vit", form)
    k_name = read_name(path, "/module/blocks/blocks.0/attn/Mul_1_output_0")  # kᵀ·√scale [B, H, D, N]
    kt = ort_values(path, feeds, [k_name])[k_name]
    metric = torch.from_numpy(kt.mean(axis=1).transpose(0, 2, 1).copy())  # [B, N, D]
    want = np.zeros((2, 17), np.int64)
    for i in range(2):
        for slot, group in enumerate(bipartite_groups(metric[i], 3, 1)):
            want[i, group] = slot
    pruned = prunec.passes.ToMe(r="3/0/0")(loaded("timm_vit", form))
    np.testing.assert_array_equal(pruned.merge_maps(feeds)["tome_l0"], want)
    assert [o.shape for o in pruned.run(feeds)] == [o.shape for o in ort_run(path, feeds)]
    assert_still_quantized(path, pruned)


QUANT_CASES = [("timm_vit", "fastv"), ("timm_vit", "tome"), ("hf_bert", "fastv"), ("hf_bert", "tome")]


@pytest.mark.parametrize("form", ["dyn", "qdq"])
@pytest.mark.parametrize("name,pname", QUANT_CASES)
def test_quantized_identity_and_stays_quantized(name, pname, form):
    """keep=1 / r=0 reproduces the quantized graph; a real setting rewrites it and keeps it
    quantized (BERT: padded, post-norm, masks crossing the cut). BERT FastV: the kept tokens by
    hand on the unmodified graph's layer-1 softmax, or, where that softmax is NaN (ORT's QDQ
    quantizer turns HF's float-min mask into NaN rows that the graph then zeroes), a one-line
    refusal naming it."""
    settings = {n: (o, i) for n, (o, i, _) in vit_settings().items()} if name == "timm_vit" else BERT
    opts, identity = settings[pname]
    path, feeds = form_file(name, form), feeds_for(name, form)
    if name == "hf_bert" and pname == "fastv":
        probs = "/module/encoder/layer.1/attention/self/Softmax_output_0"
        p = ort_values(path, feeds, [probs])[probs]
        if not np.isfinite(p).all():
            for o in (opts, identity):
                with pytest.raises(prunec.PruneError) as e:
                    prunec.passes.get(pname)(**o)(loaded(name, form))
                assert "\n" not in str(e.value) and probs in str(e.value) and "not finite" in str(e.value)
            return
        scores = p[:, :, 0, 1:].astype(np.float64).mean(axis=1)  # CLS row, [B, 15]; padding gets ~0
        top = np.argsort(-scores, axis=1, kind="stable")[:, :8] + 1
        s = np.sort(scores, axis=1)[:, ::-1]
        assert (s[:, 7] - s[:, 8]).min() > 1e-7
        want = np.sort(np.concatenate([np.zeros((2, 1), np.int64), top], axis=1), axis=1)
        np.testing.assert_array_equal(prunec.passes.get(pname)(**opts)(loaded(name, form)).kept_indices(feeds)["fastv_l2"],
                                      want)
    check_identity(name, form, pname, identity)
    pruned = prunec.passes.get(pname)(**opts)(loaded(name, form))
    outs = pruned.run(feeds)
    assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
    assert_still_quantized(path, pruned)


@pytest.mark.parametrize("pname,opts", [("fastv", dict(keep=0.5, layer="2")), ("tome", dict(r="3/0/0"))])
def test_dynamic_quantize_matmul_graph(pname, opts):
    """ORT fuses DynamicQuantizeLinear + MatMulInteger into com.microsoft.DynamicQuantizeMatMul
    (and the last residual add into SkipLayerNormalization) when it saves its optimized graph:
    the same tokens kept / merged as on the unfused graph (held to the ORT reference above), the
    same outputs."""
    feeds = feeds_for("timm_vit", "dyn")
    fused = prunec.passes.get(pname)(**opts)(loaded("timm_vit", "dynfused"))
    plain = prunec.passes.get(pname)(**opts)(loaded("timm_vit", "dyn"))
    assert any(n.op_type == "DynamicQuantizeMatMul" for n in fused.model.graph)
    a, b = fused.kept_indices(feeds), plain.kept_indices(feeds)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(fused.run(feeds)[0], plain.run(feeds)[0], rtol=1e-5, atol=1e-5)


# -- fp16 from the exporter, bf16 ----------------------------------------------------------------

def test_half_model_exported_by_dynamo():
    """A torch model made .half() and exported by dynamo at opset 23 (fp16 from the start, fused
    ONNX Attention: ToMe's log-size bias goes into its fp16 mask): FastV and ToMe keep the
    tokens the fp16 converter's (eager) graph keeps, keep=1 is the identity."""
    import copy

    import zoo

    c = case("timm_vit")
    half = zoo.Case(c.name, copy.deepcopy(c.module).half(), {"x": c.inputs["x"].half()}, c.prefix, c.depth)
    path = str(export_dir() / "timm_vit.half.dynamo23.onnx")
    zoo.export_onnx(half, "dynamo23", path)
    model, feeds = prunec.load(path), feeds_for("timm_vit", "fp16")
    assert {s.kind for s in model.facts().sites} == {"fused"}
    for pname in ("fastv", "tome"):
        opts, identity, _ = vit_settings()[pname]
        got = prunec.passes.get(pname)(**opts)(model)
        want = prunec.passes.get(pname)(**opts)(loaded("timm_vit", "fp16"))
        a, b = got.kept_indices(feeds), want.kept_indices(feeds)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.values(), b.values()))
        out = got.run(feeds)
        assert out[0].dtype == np.float16
        np.testing.assert_allclose(out[0].astype(np.float32), want.run(feeds)[0].astype(np.float32), atol=5e-3, rtol=0)
        same = prunec.passes.get(pname)(**identity)(model)
        np.testing.assert_allclose(same.run(feeds)[0].astype(np.float32), ort_run(path, feeds)[0].astype(np.float32),
                                   atol=4 * np.finfo(np.float16).eps, rtol=4 * np.finfo(np.float16).eps)


def test_bfloat16_graph_is_refused_in_one_line(tmp_path):
    """ORT's CPU provider has no bfloat16 MatMul / Softmax kernels, so prunec cannot probe a
    bfloat16 graph: a one-line refusal naming a bfloat16 value (when ORT runs it, this fails)."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.BFLOAT16, [8, 8], np.zeros(64, np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"]), helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "q"], ["a"]), helper.make_node("Add", ["x", "a"], ["y"])]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["b", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["b", 6, 8])], [w])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(prunec.PruneError) as e:
        prunec.passes.FastV(keep=0.5, layer="1")(prunec.load(path))
    msg = str(e.value)
    assert "\n" not in msg and "bfloat16" in msg and "'x'" in msg


# -- sequence-first layouts ---------------------------------------------------------------------

class SeqFirst(torch.nn.Module):
    """torch.nn.TransformerEncoder without batch_first: x [N, B, C] -> CLS feature [B, C]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False)
        self.enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 32))

    def forward(self, x):
        x = torch.cat([self.cls.expand(1, x.shape[1], 32), x], 0)
        return self.enc(x)[0]


@pytest.mark.parametrize("form", ["torch", "torchscript17"])
def test_sequence_first_is_refused_naming_the_stream(form, tmp_path):
    """Read as [B, N, C], a sequence-first stream would be pruned along its batch axis; prunec
    refuses in one line naming the stream (torch path and ONNX)."""
    m, x = SeqFirst().eval(), torch.randn(12, 2, 32)
    if form == "torch":
        model = prunec.load(m, (x,))
    else:
        path = tmp_path / "seqfirst.onnx"
        torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
        model = prunec.load(path)
    for p in (prunec.passes.FastV(keep=0.5, layer="2"), prunec.passes.ToMe(r="2")):
        with pytest.raises(prunec.PruneError) as e:
            p(model)
        msg = str(e.value)
        assert "\n" not in msg and "sequence-first" in msg and "[13, 2, 32]" in msg


def test_fp16_causal_mask_is_recognised():
    """ORT's fp16 converter clamps a float32 min mask to fp16's lowest (-65504), far above
    -1e30: the probe must still read it as a causal mask (decoders: span and query defaults)."""
    from prunec.ir.graph import Value, record_value_facts

    n = 6
    for fill in (np.finfo(np.float16).min, -np.inf):
        mask = np.where(np.triu(np.ones((n, n), bool), 1), fill, 0).astype(np.float16)[None, None]
        v = Value("mask", mask.shape, "float16")
        record_value_facts(v, mask)
        assert v.facts["causal"] is True
    v = Value("mask", (1, 1, n, n), "float16")
    record_value_facts(v, np.zeros((1, 1, n, n), np.float16))
    assert v.facts["causal"] is False
