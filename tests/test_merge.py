"""Merging passes (tome, evit, ppt, visionzip) on both backends against the plain-PyTorch
references in merge_reference.py: allclose outputs, r=0 / keep=1 identity, torch and ONNX
agree, batch rows independent; ToMe's matching semantics at the kernel level; size-weighted
mean pooling; composition with selection passes; the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import prunec
from conftest import case, kept, load, run, torch_outputs
from merge_reference import (bipartite_groups, evit_reduce, ppt_reduce, ppt_variance, reference_merge, tome_reduce,
                             visionzip_choice)
from reference import reference_run

MODELS = ("timm_vit", "hf_vit", "hf_dinov2", "hf_clip_vision")
HEADS = 4


def ppt_threshold(name):
    """A threshold between the two samples' importance variances at PPT's first layer (0), so
    that one sample is pruned and the other pooled."""
    c = case(name)
    seen = []

    def record(x, k, v, probs, state):
        seen.append(ppt_variance(probs, v, c.prefix)[1])
        return x
    reference_merge(c.module, c.inputs, {0: record})
    lo, hi = sorted(float(x) for x in seen[0])
    assert lo < hi
    return (lo + hi) / 2


def settings(name):
    """(id, pass name, options, reference runner) per merging pass."""
    c = case(name)
    p = c.prefix
    thr = ppt_threshold(name)
    return [
        ("tome-r3", "tome", dict(r="3"),
         lambda: reference_merge(c.module, c.inputs, {i: tome_reduce(3, p) for i in range(3)}, prop_attn=True)[0]),
        ("tome-list", "tome", dict(r="2/4/0", prop_attn="false"),
         lambda: reference_merge(c.module, c.inputs, {0: tome_reduce(2, p), 1: tome_reduce(4, p)})[0]),
        ("evit", "evit", dict(keep="0.5", layers="1/2"),
         lambda: reference_merge(c.module, c.inputs, {1: evit_reduce(0.5, p), 2: evit_reduce(0.5, p)})[0]),
        ("evit-drop", "evit", dict(keep="0.6", layers="1", fuse="false"),
         lambda: reference_merge(c.module, c.inputs, {1: evit_reduce(0.6, p, fuse=False)})[0]),
        ("ppt", "ppt", dict(r=3, layers="0/2", threshold=thr),
         lambda: reference_merge(c.module, c.inputs, {0: ppt_reduce(3, thr, p), 2: ppt_reduce(3, thr, p)},
                                 prop_attn=True)[0]),
        ("visionzip-out", "visionzip", dict(dominant=5, contextual=3, layer="output"),
         lambda: reference_run(c.module, c.inputs, "output", visionzip_choice(2, 5, 3, HEADS, p))[0]),
        # the default, as the official code: the penultimate layer's attention, keys and output
        ("visionzip-default", "visionzip", dict(dominant=6, contextual=4),
         lambda: reference_run(c.module, c.inputs, 2, visionzip_choice(1, 6, 4, HEADS, p))[0]),
    ]


IDS = ["tome-r3", "tome-list", "evit", "evit-drop", "ppt", "visionzip-out", "visionzip-default"]  # settings() order
CASES = [(m, i) for m in MODELS for i in range(len(IDS))]


def close(got, ref):
    assert [a.shape for a in got] == [b.shape for b in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("name,which", CASES, ids=[f"{m}-{IDS[i]}" for m, i in CASES])
def test_matches_reference(name, which, form):
    c = case(name)
    sid, pname, opts, reference = settings(name)[which]
    assert sid == IDS[which]
    pruned = prunec.passes.get(pname)(**opts)(load(name, form))
    close(run(pruned, c.inputs), torch_outputs(reference()))


@pytest.mark.parametrize("name", ("timm_vit", "hf_clip_vision", "timm_deit_distilled"))
def test_tome_on_fused_onnx_attention_and_distilled(name):
    """Opset-23 exports carry fused ONNX Attention nodes: log(size) goes in as their mask.
    DeiT-distilled: CLS and the distillation token never merge and stay first."""
    c = case(name)
    ref = reference_merge(c.module, c.inputs, {i: tome_reduce(3, c.prefix) for i in range(3)}, prop_attn=True)[0]
    for form in ("dynamo23", "torch"):
        close(run(prunec.passes.get("tome")(r="3")(load(name, form)), c.inputs), torch_outputs(ref))


def test_ppt_mixes_pruning_and_pooling_in_one_batch():
    c = case("timm_vit")
    thr = ppt_threshold("timm_vit")
    record = []
    reference_merge(c.module, c.inputs, {0: ppt_reduce(3, thr, 1, record)}, prop_attn=True)
    assert sorted(record) == ["pool", "prune"]


IDENTITY = [("tome", dict(r="0")), ("evit", dict(keep="1.0", layers="1/2")), ("ppt", dict(r=0, layers="0/2")),
            ("visionzip", dict(dominant=17, contextual=0))]


@pytest.mark.parametrize("pname,opts", IDENTITY, ids=[p for p, _ in IDENTITY])
def test_zero_reduction_is_identity(pname, opts):
    """Nothing to merge: the pass returns a new model (never its input) that reduces no token
    and computes what the unmodified module computes (plain PyTorch, no prunec involved)."""
    c = case("hf_vit")
    with torch.no_grad():
        original = torch_outputs(c.module(**c.inputs))
    for form in ("torch", "dynamo18"):
        model = load("hf_vit", form)
        same = prunec.passes.get(pname)(**opts)(model)
        assert same is not model and not same.reduced_since(model)
        assert (same.gm is not model.gm) if form == "torch" else (same.model is not model.model)
        got = run(same, c.inputs)
        close(got, original)
        for a, b in zip(got, run(model, c.inputs), strict=True):
            np.testing.assert_array_equal(a, b)


AGREE = [("tome", dict(r="3")), ("evit", dict(keep="0.5", layers="1/2")), ("ppt", dict(r=3, layers="0/2")),
         ("visionzip", dict(dominant=5, contextual=3))]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pname,opts", AGREE, ids=[p for p, _ in AGREE])
def test_backends_agree_and_batch_rows_are_independent(name, pname, opts):
    c = case(name)
    inputs = c.make_inputs(3, 5)
    a = prunec.passes.get(pname)(**opts)(load(name, "torch", inputs))
    b = prunec.passes.get(pname)(**opts)(load(name, "dynamo18"))
    ka, kb = kept(a, inputs), kept(b, inputs)
    assert ka.keys() == kb.keys() and ka
    for tag in ka:
        np.testing.assert_array_equal(ka[tag], kb[tag])
    out_b = run(b, inputs)
    for x, y in zip(run(a, inputs), out_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    for i in range(3):  # each sample alone gives its row of the batch
        alone = run(b, {k: v[i:i + 1] for k, v in inputs.items()})
        for x, y in zip(alone, out_b, strict=True):
            np.testing.assert_allclose(x[0], y[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,prefix,r", [(16, 0, 5), (17, 1, 8), (17, 2, 4), (16, 1, 1), (9, 1, 4)])
def test_tome_kernel_merges_the_same_sets_and_sizes_as_bipartite_matching(n, prefix, r):
    """prunec.ops.merge against the paper's algorithm: for the same metric, the same source
    set per output token, the same sizes (starting from uneven sizes) and averages."""
    from prunec.ops import merge

    g = torch.Generator().manual_seed(n * 10 + prefix)
    metric = torch.randn(3, n, 8, generator=g)
    x = torch.randn(3, n, 5, generator=g)
    size = torch.randint(1, 4, (3, n, 1), generator=g).float()
    dest, rep = merge.tome_assign(metric, r, prefix)
    got_x = merge.merge_tokens(x, dest, size, n - r)
    got_size = merge.merge_sizes(size, x, dest, n - r)
    for i in range(3):
        groups = bipartite_groups(metric[i], r, prefix)
        assert len(groups) == n - r
        for j, grp in enumerate(groups):
            assert sorted(torch.nonzero(dest[i] == j).flatten().tolist()) == sorted(grp)
            assert int(rep[i, j]) == grp[0]
            s = size[i, grp]
            assert float(got_size[i, j, 0]) == float(s.sum())
            torch.testing.assert_close(got_x[i, j], (x[i, grp] * s).sum(0) / s.sum())
        assert list(range(prefix)) == [int(t) for t in rep[i, :prefix]]


def _mean_pooled_bert():
    from prunec.examples import MeanPooled

    c = case("hf_bert")
    return MeanPooled(c.module).eval(), c.inputs


@pytest.mark.parametrize("form", ("torch", "onnx"))
def test_mean_pooling_is_size_weighted_and_padding_follows_merges(form, tmp_path):
    """A post-norm BERT with a padding mask and mean pooling inside the graph: ToMe merges between
    attention and MLP (after the post-norm), the padding mask follows each merged token, and
    the pooled mean weighs each token by its size."""
    import zoo

    module, inputs = _mean_pooled_bert()
    ref, _ = reference_merge(module, inputs, {i: tome_reduce(3, 0) for i in range(3)}, prop_attn=True, pooled_mean=True)
    if form == "torch":
        model = prunec.load(module, inputs)
    else:
        path = zoo.export_onnx(zoo.Case("pooled", module, inputs, 0, 3), "dynamo18", tmp_path / "pooled.onnx")
        model = prunec.load(path)
    got = run(prunec.passes.get("tome")(r="3", prefix=0)(model), inputs)
    assert len(got) == 1
    np.testing.assert_allclose(got[0], ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got[0], _unweighted_mean(module, inputs), atol=1e-4)


def _unweighted_mean(module, inputs):
    """The same merges with a plain (unweighted) masked mean: what size weighting must differ from."""
    from merge_reference import layers_of, parts_of, _block

    state = {"size": None, "prop_attn": True, "rep": None}
    m = inputs["attention_mask"].float()
    state["pad"], state["mask"] = m, ((1.0 - m) * torch.finfo(torch.float32).min)[:, None, None, :]
    import copy

    enc = copy.deepcopy(module.encoder)
    for i, layer in enumerate(layers_of(enc)):
        layer.forward = (lambda p: lambda x, *a, **kw: _block(p, x, state, tome_reduce(3, 0)))(parts_of(layer))
    with torch.no_grad():
        h = enc(**inputs).last_hidden_state
    w = state["pad"][..., None]
    return ((h * w).sum(1) / w.sum(1)).numpy()


def test_merges_compose_with_selection_in_one_pipeline():
    """FastV after ToMe gathers the token sizes with the kept tokens; ToMe after EViT tracks sizes
    from there; torch and ONNX agree on every cut."""
    c = case("hf_vit")
    pipe = prunec.Pipeline([prunec.passes.get("tome")(r="2/0/0"), prunec.passes.get("fastv")(keep=0.5, layer="2")])
    pipe2 = prunec.Pipeline([prunec.passes.get("evit")(keep="0.5", layers="0"), prunec.passes.get("tome")(r="0/2/2")])
    for p in (pipe, pipe2):
        a, b = p(load("hf_vit", "torch")), p(load("hf_vit", "dynamo18"))
        ka, kb = kept(a, c.inputs), kept(b, c.inputs)
        assert ka.keys() == kb.keys() and len(ka) >= 2
        for tag in ka:
            np.testing.assert_array_equal(ka[tag], kb[tag])
        for x, y in zip(run(a, c.inputs), run(b, c.inputs), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_bad_merge_options_are_clear_errors():
    m = load("timm_vit", "torch")
    cases = [("tome", dict(r="x")), ("tome", dict(r="-1")), ("tome", dict(r="1/2/3/4")), ("evit", dict(keep="1.5")),
             ("evit", dict(layers="7")), ("ppt", dict(layers="2/1")), ("visionzip", dict(dominant=1)),
             ("visionzip", dict(contextual=99)), ("tome", dict(inflection=3.0))]
    for pname, opts in cases:
        with pytest.raises(prunec.PruneError):
            prunec.passes.get(pname)(**opts)(m)


def test_cli_runs_merging_passes(tmp_path):
    from conftest import onnx_file

    src = onnx_file("timm_vit", "dynamo18")
    for spec in ("tome:r=2", "evit:keep=0.7,layers=1/2", "ppt:r=2,layers=1", "visionzip:dominant=4,contextual=2"):
        out = tmp_path / f"{spec.split(':')[0]}.onnx"
        r = subprocess.run([sys.executable, "-m", "prunec.cli", str(src), "--pass", spec, "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert out.exists()
    r = subprocess.run([sys.executable, "-m", "prunec.cli", str(src), "--pass", "tome:r=x", "-o", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "r" in r.stderr
    assert not (tmp_path / "x.onnx").exists()
