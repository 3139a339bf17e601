"""Selection passes (cls-attn, divprune, random, pool) on both backends against the
plain-PyTorch references in reference.py: same kept indices, allclose outputs, keep=1 /
factor=1 identity, identical indices across backends, batch rows independent, schedules."""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from conftest import case, kept, load, run, torch_outputs
from reference import (attention_choice, divprune_choice, pool_choice, random_choice, reference_run,
                       zero_tprune_choice)

MODELS = ("timm_vit", "hf_vit", "hf_dinov2", "hf_clip_vision", "hf_llama")
FORMS = ("torch", "dynamo18")
GRID = 4  # 32x32 images, patch 8; the llama case pools its 16-token image span 4:20 as 4x4


def span_of(c):
    return tuple(int(x) for x in c.span.split(":")) if c.span else None


def settings(name):
    """(pass name, options, layer for the reference, reference chooser) per pass."""
    c = case(name)
    span, prefix = span_of(c), c.prefix
    span_opt = {"span": c.span} if c.span else {}
    out = []
    if not c.causal:
        out.append(("cls-attn", dict(keep=0.5), "output", attention_choice(1, "cls", 0.5, span, prefix)))
        out.append(("cls-attn", dict(keep=0.25, layer="2"), 2, attention_choice(1, "cls", 0.25, span, prefix)))
    out.append(("divprune", dict(keep=0.25, layer="2", **span_opt), 2, divprune_choice(0.25, span, prefix)))
    out.append(("divprune", dict(keep=0.5, **span_opt), "output", divprune_choice(0.5, span, prefix)))
    out.append(("random", dict(keep=0.25, layer="1", seed=3, **span_opt), 1, random_choice(0.25, 3, span, prefix)))
    pool_opts = dict(layer="1", factor=2, **({"span": c.span, "grid": "4x4"} if c.span else {}))
    out.append(("pool", pool_opts, 1, pool_choice(2, (GRID, GRID), span[0] if span else prefix)))
    if not c.causal:  # the reference reads keys off the key projection: pre-rotary for llama, so not there
        out.append(("zero-tprune", dict(keep=0.5, layer="2", iters=5, similar=0.75), 2,
                    zero_tprune_choice(1, 0.5, 5, 0.75, 0 if prefix else None, span, prefix)))
    return out


CASES = [(m, i) for m in MODELS for i in range(len(settings(m)))]


def test_zero_tprune_reference_exercises_both_stages():
    """In the setting the passes are held to, the S-stage (key similarity) changes which tokens
    the reference keeps on every model, and the I-stage's iteration count on some, so matching
    the reference tests both."""
    s_stage, iterations = [], []
    for name in [m for m in MODELS if not case(m).causal]:
        c = case(name)
        (_, opts, layer, choose), = [s for s in settings(name) if s[0] == "zero-tprune"]
        cls, span = (0 if c.prefix else None), span_of(c)
        chosen = reference_run(c.module, c.inputs, layer, choose)[1]
        no_s = zero_tprune_choice(layer - 1, opts["keep"], opts["iters"], 0.0, cls, span, c.prefix)
        one_step = zero_tprune_choice(layer - 1, opts["keep"], 1, opts["similar"], cls, span, c.prefix)
        s_stage.append(not np.array_equal(chosen, reference_run(c.module, c.inputs, layer, no_s)[1]))
        iterations.append(not np.array_equal(chosen, reference_run(c.module, c.inputs, layer, one_step)[1]))
    assert all(s_stage) and any(iterations), (s_stage, iterations)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,which", CASES, ids=[f"{m}-{settings(m)[i][0]}-{i}" for m, i in CASES])
def test_matches_reference(name, which, form):
    c = case(name)
    pname, opts, ref_layer, choose = settings(name)[which]
    pruned = prunec.passes.get(pname)(**opts)(load(name, form))
    ref_out, ref_idx = reference_run(c.module, c.inputs, ref_layer, choose)
    idx = kept(pruned, c.inputs)
    assert len(idx) == 1
    np.testing.assert_array_equal(next(iter(idx.values())), ref_idx.numpy())
    ref = torch_outputs(ref_out)
    got = run(pruned, c.inputs)
    assert [a.shape for a in got] == [b.shape for b in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,which", CASES, ids=[f"{m}-{settings(m)[i][0]}-{i}" for m, i in CASES])
def test_keep_one_is_identity_and_backends_agree(name, which):
    c = case(name)
    pname, opts, _, _ = settings(name)[which]
    identity = dict(opts, keep=1.0) if pname != "pool" else dict(opts, factor=1)
    for form in FORMS:
        model = load(name, form)
        same = prunec.passes.get(pname)(**identity)(model)
        for a, b in zip(run(model, c.inputs), run(same, c.inputs), strict=True):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-12)
    inputs = c.make_inputs(3, 5)
    a = kept(prunec.passes.get(pname)(**opts)(load(name, "torch", inputs)), inputs)
    b = kept(prunec.passes.get(pname)(**opts)(load(name, "dynamo18")), inputs)
    assert a.keys() == b.keys()
    for tag in a:
        np.testing.assert_array_equal(a[tag], b[tag])


@pytest.mark.parametrize("name,which", CASES, ids=[f"{m}-{settings(m)[i][0]}-{i}" for m, i in CASES])
def test_batch_rows_are_independent(name, which):
    c = case(name)
    pname, opts, _, _ = settings(name)[which]
    pruned = prunec.passes.get(pname)(**opts)(load(name, "dynamo18"))
    batch = c.make_inputs(3, 13)
    together = run(pruned, batch)
    for row in range(3):
        alone = run(pruned, {k: v[row:row + 1] for k, v in batch.items()})
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_allclose(a[row:row + 1], b, rtol=1e-4, atol=1e-5)


def test_schedule_cuts_in_turn_on_both_backends():
    c = case("hf_vit")
    opts = dict(keep="0.5/0.5", layer="1/2")
    a = prunec.passes.get("divprune")(**opts)(load("hf_vit", "torch"))
    b = prunec.passes.get("divprune")(**opts)(load("hf_vit", "dynamo18"))
    ia, ib = kept(a, c.inputs), kept(b, c.inputs)
    assert list(ia) == ["divprune_l1", "divprune_l2"] and ia.keys() == ib.keys()
    assert ia["divprune_l1"].shape[1] == 9 and ia["divprune_l2"].shape[1] == 5
    for tag in ia:
        np.testing.assert_array_equal(ia[tag], ib[tag])
    assert run(b, c.inputs)[0].shape == (2, 5, 64)


def test_count_and_compose_with_fastv():
    c = case("timm_vit")
    model = load("timm_vit", "dynamo18")
    out = prunec.Pipeline([prunec.passes.FastV(keep=0.5, layer=1), prunec.passes.get("divprune")(count=3, layer="2")])(model)
    idx = kept(out, c.inputs)
    assert idx["fastv_l1"].shape == (2, 9) and idx["divprune_l2"].shape == (2, 4)


@pytest.mark.parametrize("bad,msg", [
    (("cls-attn", dict(keep=0.5), "hf_llama"), "needs a CLS token"),
    (("pool", dict(factor=3), "timm_vit"), "does not divide"),
    (("pool", dict(layer="1"), "hf_llama"), "cannot find the patch grid"),
    (("divprune", dict(count=99), "timm_vit"), "exceeds"),
    (("random", dict(layer="2/1"), "timm_vit"), "increasing order"),
    (("random", dict(keep="0.5/0.5", layer="1"), "timm_vit"), "2 keep values for 1"),
])
def test_selection_errors(bad, msg):
    (pname, opts, name) = bad
    with pytest.raises(prunec.PruneError, match=msg):
        prunec.passes.get(pname)(**opts)(load(name, "dynamo18"))
