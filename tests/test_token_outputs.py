"""Graphs whose output is the token tensor, and token means over a prefix slice.

* ``layer=output`` (the default of cls-attn, divprune, random, pool and visionzip) when the graph
  output *is* the token tensor (a timm feature extractor with no head, BERT without pooler: the
  VLM vision-encoder case): the reduced tensor becomes the output, as the plain-PyTorch
  reference reduces the encoder's final tokens. Also at opset 14, where the final LayerNorm is
  decomposed into ReduceMean/Sub/Pow/Sqrt/Div.
* After ``tome`` / ``ppt``, timm's ``global_pool='avg'`` (``x[:, prefix:].mean(1)``, with CLS and
  with CLS + 2 registers) is size-weighted like the same pooling without a prefix: held to the
  plain-PyTorch ToMe / PPT reference (merge_reference.py, size-weighted pooling).
"""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from conftest import case, kept, load, run, torch_outputs
from merge_reference import ppt_reduce, reference_merge, tome_reduce
from reference import attention_choice, divprune_choice, pool_choice, random_choice, reference_run

FORMS = ("torch", "torchscript14")  # TorchScript at opset 14: the final LayerNorm is decomposed


def _selections(name):
    c = case(name)
    p = c.prefix  # BERT: nothing in the graph reads [CLS] without the pooler, so it is declared
    span = {} if name.startswith("timm") else {"span": "1:"}
    cls = {} if name.startswith("timm") else {"cls": 0}
    out = [("cls-attn", dict(keep=0.5, **span, **cls), attention_choice(1, "cls", 0.5, None, p)),
           ("divprune", dict(keep=0.5, **span), divprune_choice(0.5, None, p)),
           ("random", dict(keep=0.25, seed=2, **span), random_choice(0.25, 2, None, p))]
    if name.startswith("timm"):
        out.append(("pool", dict(factor=2), pool_choice(2, (4, 4), p)))
    return out


OUTPUT_CASES = [(n, i) for n in ("timm_vit_features", "hf_bert_no_pooler") for i in range(len(_selections(n)))]


@pytest.mark.parametrize("name,which", OUTPUT_CASES, ids=[f"{n}-{_selections(n)[i][0]}" for n, i in OUTPUT_CASES])
def test_output_cut_when_the_output_is_the_token_tensor(name, which):
    c = case(name)
    pname, opts, choose = _selections(name)[which]
    ref_out, ref_idx = reference_run(c.module, c.inputs, "output", choose)
    ref = torch_outputs(ref_out)
    assert len(ref) == 1 and ref[0].shape[1] == ref_idx.shape[1]  # the output is the reduced token tensor
    for form in FORMS:
        pruned = prunec.passes.get(pname)(**opts)(load(name, form))
        (idx,) = kept(pruned, c.inputs).values()
        np.testing.assert_array_equal(idx, ref_idx.numpy(), err_msg=form)
        got = run(pruned, c.inputs)
        assert [a.shape for a in got] == [b.shape for b in ref], form
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4, err_msg=form)
    if pname != "pool":  # keep=1 gives the unchanged token output back
        model = load(name, "torchscript14")
        same = prunec.passes.get(pname)(**dict(opts, keep=1.0))(model)
        np.testing.assert_array_equal(run(same, c.inputs)[0], run(model, c.inputs)[0])


def test_visionzip_at_the_output_of_a_feature_extractor():
    from merge_reference import visionzip_choice

    c = case("timm_vit_features")
    ref = torch_outputs(reference_run(c.module, c.inputs, "output", visionzip_choice(2, 5, 3, 4, 1))[0])
    for form in FORMS:
        got = run(prunec.passes.get("visionzip")(dominant=5, contextual=3, layer="output")(load("timm_vit_features", form)), c.inputs)
        assert got[0].shape == ref[0].shape == (2, 8, 64)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4, err_msg=form)


MERGES = [("tome", dict(r="3"), lambda p: {i: tome_reduce(3, p) for i in range(3)}),
          ("ppt", dict(r=3, layers="0/2", threshold=1.0), lambda p: {0: ppt_reduce(3, 1.0, p), 2: ppt_reduce(3, 1.0, p)})]


@pytest.mark.parametrize("name", ("timm_vit_avg", "timm_vit_avg_reg"))
@pytest.mark.parametrize("pname,opts,reductions", MERGES, ids=[m[0] for m in MERGES])
def test_prefix_slice_mean_is_size_weighted(pname, opts, reductions, name):
    c = case(name)
    assert load(name, "torch").facts().prefix == c.prefix
    ref = reference_merge(c.module, c.inputs, reductions(c.prefix), prop_attn=True)[0].numpy()
    unweighted = _unweighted(c, reductions(c.prefix))
    assert np.abs(ref - unweighted).max() > 1e-2  # the weighting matters here
    for form in ("torch", "torchscript14"):  # test_opsets holds the other ONNX forms to the torch path
        got = run(prunec.passes.get(pname)(**opts)(load(name, form)), c.inputs)
        assert len(got) == 1
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4, err_msg=form)


def _unweighted(c, reductions):
    """The same merges with timm's plain (unweighted) average pooling."""
    import copy

    module = copy.deepcopy(c.module)
    module.global_pool = "avg-plain"  # not "avg": merge_reference leaves the pooling as timm's
    module.pool = lambda x: x[:, module.num_prefix_tokens:].mean(dim=1)
    return reference_merge(module, c.inputs, reductions, prop_attn=True)[0].numpy()


def test_reduced_token_outputs_are_named_and_evaluated(tmp_path, capsys):
    """A merge on a feature extractor: the CLI's output line and `prunec inspect` name the reduced
    token output and the fix; `evaluate` compares it by its size-weighted token mean and its CLS
    token (the lower cosine), computed here from the plain-PyTorch ToMe reference."""
    from conftest import onnx_file
    from prunec.cli import main
    from prunec.measure import evaluate

    c = case("timm_vit_features")
    src = onnx_file("timm_vit_features", "torchscript14")
    out = tmp_path / "tome.onnx"
    assert main([str(src), "--pass", "tome:r=0/0/3", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "token output" in err and "14 of 17 tokens" in err
    assert "--recover unmerge" in err
    assert main(["inspect", str(out)]) == 0
    assert "reduced token output" in capsys.readouterr().out
    assert main([str(src), "--pass", "tome:r=0/0/3", "--recover", "unmerge", "-o", str(tmp_path / "u.onnx")]) == 0
    assert "--recover unmerge" not in capsys.readouterr().err  # every token is back: nothing to say

    original, merged = prunec.load(src), prunec.load(out)
    x = c.inputs["x"].numpy()
    res = evaluate(original, merged, [{"x": x}])
    (entry,) = res["outputs"].values()
    assert entry["shape_original"] == [17, 64] and entry["shape_rewritten"] == [14, 64] and "size-weighted" in entry["note"]
    ref, state = reference_merge(c.module, c.inputs, {2: tome_reduce(3, 1)}, prop_attn=True)
    with_sizes = (ref * state["size"]).sum(1) / state["size"].sum(1)
    full = original.run({"x": x})[0]
    want = np.minimum(_cos(full.mean(1), with_sizes.numpy()), _cos(full[:, :1], ref[:, :1].numpy()))
    np.testing.assert_allclose(entry["cosine_mean"], want.mean(), rtol=1e-5)


def _cos(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_mean_over_a_slice_past_the_kept_prefix_is_refused():
    """x[:, 3:].mean(1) with one prefix token: after a merge, positions 1-2 hold other tokens than
    before, so no weighting makes that mean right; the pass refuses naming the node."""
    import torch

    c = case("timm_vit_features")

    class Tail(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[:, 3:].mean(1)

    model = prunec.load(Tail(c.module).eval(), c.inputs)
    with pytest.raises(prunec.PruneError, match="from index 3 on"):
        prunec.passes.get("tome")(r="2")(model)
