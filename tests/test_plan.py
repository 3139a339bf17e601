"""One Plan of many cuts (issue 13): a pass plans every cut on one analysis and both backends
lower them in one go. The oracle is the cut-by-cut rewrite (one single-layer pass after another,
each re-analysing the rewritten graph), which the reference tests hold to the plain-PyTorch
references: the one-plan rewrite must pick the same tokens and compute the same outputs."""
import numpy as np
import pytest

import prunec
from conftest import case, kept, load, run

# (model, pass, options of the whole pass, options of each single-cut pass in turn)
CHAINS = [
    ("timm_vit", "tome", dict(r="3"), [dict(r="3/0/0"), dict(r="0/3/0"), dict(r="0/0/3")]),
    ("hf_vit", "evit", dict(keep="0.5", layers="1/2"), [dict(keep="0.5", layers="1"), dict(keep="0.5", layers="2")]),
    ("timm_vit", "ppt", dict(r=3, layers="0/2"), [dict(r=3, layers="0"), dict(r=3, layers="2")]),
    ("hf_llama", "fastv", dict(keep="0.5", layer="1/2"), [dict(keep="0.5", layer="1"), dict(keep="0.5", layer="2")]),
    ("hf_bert", "divprune", dict(keep="0.6", layer="1/2"), [dict(keep="0.6", layer="1"), dict(keep="0.6", layer="2")]),
    ("hf_dinov2", "tome", dict(r="2", recover="unmerge"),
     [dict(r="2/0/0", recover="unmerge"), dict(r="0/2/0", recover="unmerge"), dict(r="0/0/2", recover="unmerge")]),
]


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("name,pname,whole,steps", CHAINS, ids=[f"{c[0]}-{c[1]}" for c in CHAINS])
def test_one_plan_equals_cut_by_cut(name, pname, whole, steps, form):
    c = case(name)
    inputs = c.make_inputs(3, 7)
    model = load(name, form, inputs)
    cls = prunec.passes.get(pname)
    plan = cls(**whole).plan(model)
    assert len(plan.cuts) == len(steps) and plan.cuts[0].parent is None
    assert all(cut.parent is prev for prev, cut in zip(plan.cuts, plan.cuts[1:]))
    assert all(cut.num_tokens == prev.kept for prev, cut in zip(plan.cuts, plan.cuts[1:]))
    one = cls(**whole)(model)
    step_by_step = model
    for opts in steps:
        step_by_step = cls(**opts)(step_by_step)
    assert one.cuts == step_by_step.cuts  # (tag, tokens in, tokens out) of every cut
    k1, k2 = kept(one, inputs), kept(step_by_step, inputs)
    assert k1.keys() == k2.keys() and len(k1) == len(steps)
    for tag in k1:
        np.testing.assert_array_equal(k1[tag], k2[tag])
    for a, b in zip(run(one, inputs), run(step_by_step, inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_pass_of_many_cuts_analyses_probes_and_checks_once(monkeypatch):
    """ToMe in every layer: one analysis and one probe of the input model, one lowering, one check
    of the result (before issue 13: one of each per cut)."""
    from prunec.ir import from_onnx
    from prunec.model import OnnxModel
    from prunec.passes.analysis import blocks

    model = load("timm_vit", "dynamo18")
    calls = {"analyze": 0, "probe": 0, "validate": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(blocks, "analyze", counting("analyze", blocks.analyze))
    monkeypatch.setattr(from_onnx, "probe_onnx", counting("probe", from_onnx.probe_onnx))
    monkeypatch.setattr(OnnxModel, "validate", counting("validate", OnnxModel.validate))
    out = prunec.passes.get("tome")(r="2")(model)
    assert len(out.cuts) == 3
    assert calls == {"analyze": 1, "probe": 1, "validate": 1}


def test_torch_rewrite_shares_the_weights():
    """The rewritten GraphModule holds the input's parameters, not copies of them."""
    model = load("timm_vit", "torch")
    out = prunec.passes.get("tome")(r="2")(model)
    before = {id(p) for p in model.gm.parameters()}
    after = [id(p) for p in out.gm.parameters()]
    assert after and all(i in before for i in after)


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_a_pass_cutting_before_an_earlier_pass_is_refused(form):
    """FastV before layer 2, then ToMe from layer 0: ToMe's cuts would hand FastV's (planned for 17
    tokens) fewer tokens. Refused in one line; in layer order the two passes compose."""
    model = load("timm_vit", form)
    fastv = prunec.passes.get("fastv")(keep="0.5", layer="2")
    with pytest.raises(prunec.PruneError, match="comes before the cut 'fastv_l2'.*layer order"):
        prunec.passes.get("tome")(r="2")(fastv(model))
    out = fastv(prunec.passes.get("tome")(r="2/0/0")(model))
    assert [c[0] for c in out.cuts] == ["tome_l0", "fastv_l2"]


PIPES = [(("tome", dict(r="2/0/0")), ("fastv", dict(keep="0.5", layer="2"))),
         (("fastv", dict(keep="0.5", layer="2")), ("tome", dict(r="0/0/2")))]


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("steps", PIPES, ids=["tome-fastv", "fastv-tome"])
def test_a_pipeline_is_one_plan_equal_to_pass_by_pass(steps, form, monkeypatch):
    """Passes whose cuts follow each other are planned on one analysis and lowered together:
    the same tokens and outputs as applying them one by one (each re-analysing)."""
    from prunec.passes.analysis import blocks

    c = case("timm_vit")
    model = load("timm_vit", form)
    passes = [prunec.passes.get(p)(**o) for p, o in steps]
    one_by_one = model
    for p in passes:
        one_by_one = p(one_by_one)
    calls = []
    monkeypatch.setattr(blocks, "analyze", lambda g, _a=blocks.analyze: calls.append(1) or _a(g))
    model = load("timm_vit", form)
    together = prunec.Pipeline(passes)(model)
    assert len(calls) == 1 and together.cuts == one_by_one.cuts
    k1, k2 = kept(together, c.inputs), kept(one_by_one, c.inputs)
    assert k1.keys() == k2.keys() and len(k1) == 2
    for tag in k1:
        np.testing.assert_array_equal(k1[tag], k2[tag])
    for a, b in zip(run(together, c.inputs), run(one_by_one, c.inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_scores_of_a_layer_a_merge_reduced_in_between_are_refused(form):
    """FastV before layer 2 scores with layer 1's attention; ToMe merging inside block 1 leaves the
    cut fewer tokens than layer 1 scored (ONNX used to map 15 scores onto 13 tokens)."""
    model = load("timm_vit", form)
    with pytest.raises(prunec.PruneError, match="scores its 13 tokens with layer 1's attention, which sees 15"):
        prunec.Pipeline([prunec.passes.get("tome")(r="2/2/0"), prunec.passes.get("fastv")(keep="0.5", layer="2")])(model)
