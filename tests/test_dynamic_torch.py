"""Dynamic shapes on the torch path: ``prunec.load(module, example, dynamic_shapes=...)`` keeps
torch.export's Dims. A dynamic batch stays dynamic; a dynamic sequence makes the token count
dynamic, as for an ONNX model with a dynamic sequence (tests/test_dynamic.py): every pass but pool
computes span, k, r and the kept count M at run time, every size after the cut that spells the
token symbol N becomes M, and the rewritten GraphModule runs at every (batch, length), where it
equals the plain-PyTorch reference of the method (hooks on the unmodified module) run at that shape
and picks the kept indices the ONNX backend picks on a dynamic export of the same module. keep=1 is
the identity, and the saved ``.pt2`` re-exports with the Dims (it loads back dynamic) for every pass;
per-row counts of a padded batch are refused as .pt2."""
import random
from functools import lru_cache

import numpy as np
import pytest
import torch

import prunec
from fastv_reference import fastv_reference
from reference import reference_run
from test_dynamic import (EVERY_PASS, MERGES, SELECTIONS, SHAPES, _last_hidden, exported, inputs, merge_reference_output,
                          model)

EXAMPLE = (2, 29)  # the example inputs: analysis runs at their length (a prime, unlike any width)
EXPORTER = {"bert": "torchscript17", "llama": "dynamo18"}  # the ONNX export compared against


class _Named(torch.nn.Module):
    """The model with its inputs by name and one tensor out (BERT: the last hidden state)."""

    def __init__(self, m, field):
        super().__init__()
        self.m, self.field = m, field

    def forward(self, input_ids, attention_mask=None):
        kw = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids,
                                                                       "attention_mask": attention_mask}
        return getattr(self.m(**kw), self.field)


def _dims():
    return torch.export.Dim("batch", max=64), torch.export.Dim("sequence", min=3, max=200)


@lru_cache(maxsize=None)
def loaded(name):
    """The module loaded with a dynamic batch and sequence on every input."""
    m, names, field = model(name)
    batch, seq = _dims()
    return prunec.load(_Named(m, field).eval(), inputs(name, *EXAMPLE),
                       dynamic_shapes={k: {0: batch, 1: seq} for k in names})


@lru_cache(maxsize=None)
def fastv(name, keep):
    return prunec.passes.get("fastv")(keep=keep, layer="2")(loaded(name))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fastv_follows_the_length_in_torch(name):
    m, names, field = model(name)
    base = loaded(name)
    assert base.dynamic_tokens and {d[3] for d in base.dims} == {"batch", "sequence"}
    causal = name != "bert"
    query = "last" if causal else "mean"
    pruned, identity = fastv(name, "0.5"), fastv(name, "1.0")
    onnx = prunec.passes.get("fastv")(keep="0.5", layer="2")(prunec.load(exported(name, EXPORTER[name])))
    for batch, n in SHAPES:
        feeds = inputs(name, batch, n, seed=1)
        ref_out, ref_idx = fastv_reference(m, feeds, 0.5, 2, query, prefix=0, causal=causal)
        idx = pruned.kept_indices(**feeds)["fastv_l2"]
        np.testing.assert_array_equal(idx, ref_idx.numpy())
        np.testing.assert_allclose(pruned.run(**feeds).numpy(), getattr(ref_out, field).detach().numpy(),
                                   rtol=1e-4, atol=1e-4)
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        np.testing.assert_array_equal(onnx.kept_indices(np_feeds)["fastv_l2"], idx)
        same, original = identity.run(**feeds), base.run(**feeds)
        assert same.shape == original.shape == (batch, n) + tuple(original.shape[2:])
        np.testing.assert_allclose(same.numpy(), original.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama"])
def test_the_pt2_keeps_the_dims(name, tmp_path):
    """The rewritten model's .pt2 re-exports with the Dims: loaded back (``prunec.load``, which is
    ``torch.export.load(path).module()`` with the saved example inputs) it is dynamic again and runs
    at a batch and length it was never traced at, with the rewritten model's output."""
    pruned = fastv(name, "0.5")
    path = pruned.save(tmp_path / "fastv.pt2")
    back = prunec.load(path)
    assert back.dynamic_tokens
    assert sorted({(kind, lo, hi) for *_, kind, lo, hi in back.dims}) == [("batch", 2, 64), ("sequence", 3, 200)]
    for batch, n in ((5, 51), (1, 4)):
        feeds = inputs(name, batch, n, seed=3)
        want = pruned.run(**feeds).numpy()
        assert want.shape[:2] == (batch, 2 + max(1, round(0.5 * (n - 2))))
        np.testing.assert_allclose(back.run(**feeds).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_cls_attention_on_a_dynamic_torch_encoder():
    """cls-attn (the CLS row of the penultimate layer) at the encoder output, at each length: the
    ONNX backend's kept indices."""
    base = loaded("bert")
    pruned = prunec.passes.get("cls-attn")(keep="0.5", cls=0, span="1:")(base)
    onnx = prunec.passes.get("cls-attn")(keep="0.5", cls=0, span="1:")(prunec.load(exported("bert", "torchscript17")))
    for batch, n in SHAPES:
        feeds = inputs("bert", batch, n, seed=2)
        idx = pruned.kept_indices(**feeds)["cls_attn_out"]
        k = max(1, round(0.5 * (n - 1)))
        assert idx.shape == (batch, 1 + k) and (idx[:, 0] == 0).all()
        assert pruned.run(**feeds).shape == (batch, 1 + k, 64)
        np.testing.assert_array_equal(onnx.kept_indices({k: v.numpy() for k, v in feeds.items()})["cls_attn_out"], idx)


@pytest.mark.parametrize("pname", sorted(SELECTIONS))
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_selections_follow_the_length_in_torch(name, pname):
    """DivPrune, random and Zero-TPrune on the torch path with a dynamic sequence: span and k at each
    length at run time, the plain-PyTorch reference's kept indices (hooks on the unmodified module)
    and its output."""
    m, _, field = model(name)
    opts, choice = SELECTIONS[pname]
    pruned = prunec.passes.get(pname)(**opts)(loaded(name))
    for batch, n in SHAPES:
        feeds = inputs(name, batch, n, seed=1)
        ref, ref_idx = reference_run(m, feeds, 2, choice(n, name != "bert"))
        np.testing.assert_array_equal(pruned.kept_indices(**feeds)[f"{pname.replace('-', '_')}_l2"], ref_idx.numpy())
        np.testing.assert_allclose(pruned.run(**feeds).numpy(), _last_hidden(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what", sorted(MERGES))
def test_merges_follow_the_length_in_torch(what):
    """ToMe (r capped at run time), EViT, PPT (both branches) and VisionZip on the torch path with a
    dynamic sequence equal their plain-PyTorch references at each length, and the ONNX backend's
    rewrite of a dynamic export of the same module, kept slots included."""
    pname, opts = MERGES[what][0]
    merged = prunec.passes.get(pname)(**opts)(loaded("bert"))
    onnx = prunec.passes.get(pname)(**opts)(prunec.load(exported("bert", "torchscript17")))
    for batch, n in SHAPES:
        feeds = inputs("bert", batch, n, seed=1)
        got = merged.run(**feeds).numpy()
        np.testing.assert_allclose(got, merge_reference_output(what, feeds), rtol=1e-4, atol=1e-4)
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        kept_torch, kept_onnx = merged.kept_indices(**feeds), onnx.kept_indices(np_feeds)
        assert kept_torch.keys() == kept_onnx.keys() and kept_torch
        for tag in kept_torch:
            np.testing.assert_array_equal(kept_torch[tag], kept_onnx[tag])


def test_evit_keeps_a_short_input_in_order_as_the_reference_and_onnx():
    """EViT keep 0.7 on 3 and 4 tokens (prefix 1) keeps every token: in their original order, as the
    reference (no reduction) and the ONNX rewrite do, not in attention order (the torch kernel did)."""
    from merge_reference import evit_reduce, reference_merge

    opts = dict(keep="0.7", layers="0/1", prefix=1)
    merged = prunec.passes.EViT(**opts)(loaded("bert"))
    onnx = prunec.passes.EViT(**opts)(prunec.load(exported("bert", "torchscript17")))
    m, _, _ = model("bert")
    for n in (3, 4):
        feeds = inputs("bert", 2, n, seed=5)
        ref, _ = reference_merge(m, feeds, {0: evit_reduce(0.7, 1), 1: evit_reduce(0.7, 1)})
        np.testing.assert_allclose(merged.run(**feeds).numpy(), _last_hidden(ref), rtol=1e-4, atol=1e-4)
        kept = merged.kept_indices(**feeds)
        assert all(v.tolist() == [list(range(n))] * 2 for v in kept.values()), kept
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        for tag, idx in onnx.kept_indices(np_feeds).items():
            np.testing.assert_array_equal(kept[tag], idx)


def test_every_pass_is_the_identity_at_keep_one_and_runs_on_short_inputs():
    """keep=1 / r=0 equals the unmodified module at each length; on 3 to 5 tokens (the Dim's least;
    empty spans, counts capped) every rewritten torch model runs and never returns more tokens than
    it got."""
    base = loaded("bert")
    for pname, opts in (("fastv", dict(keep="1.0", layer="2")), ("divprune", dict(keep="1.0", layer="2")),
                        ("random", dict(keep="1.0", layer="2")), ("zero-tprune", dict(keep="1.0", layer="2")),
                        ("tome", dict(r="0", prefix=1)), ("evit", dict(keep="1.0", layers="0/1", prefix=1, fuse=False))):
        same = prunec.passes.get(pname)(**opts)(base)
        for batch, n in SHAPES:
            feeds = inputs("bert", batch, n, seed=4)
            np.testing.assert_allclose(same.run(**feeds).numpy(), base.run(**feeds).numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=pname)
    for pname, opts in EVERY_PASS:
        model_ = prunec.passes.get(pname)(**opts)(base)
        for n in range(3, 6):
            out = model_.run(**inputs("bert", 2, n))
            assert out.shape[0] == 2 and 1 <= out.shape[1] <= n, (pname, n, out.shape)


def test_a_pt2_of_run_time_counts_reloads_or_is_refused_in_one_line(tmp_path):
    """DivPrune's, Zero-TPrune's, VisionZip's, ToMe's (also per row of a padded batch) and PPT's counts
    re-export with the Dims (the .pt2 reloads and runs at new lengths with the same output); a
    selection's per-row counts of a padded batch (BERT's mask) are refused in one line, nothing
    written."""
    everywhere = ((3, 41), (1, 7), (2, 5), (1, 3))
    # (1, 3): the Dim's least: DivPrune's span is then one token (its kernels use bmm, whose sizes export
    # does not ask to differ from 1). ToMe's r=2 at each of Llama's layers leaves one token from five, where
    # the model's GQA reshape of the keys asserts the count is not 1: lengths that keep two or more.
    for name, pname, opts, shapes in (
            ("llama", "divprune", dict(count=1, layer="2"), everywhere),
            ("llama", "zero-tprune", dict(keep="0.4", layer="2", similar="1.0", iters="5"), everywhere),
            ("bert", "visionzip", dict(dominant=4, contextual=2, prefix=1, layer="2"), everywhere),
            ("llama", "tome", dict(r="2"), ((3, 41), (1, 9), (2, 12), (1, 8))),
            ("bert", "tome", dict(r="2", prefix="1"), ((3, 41), (1, 9), (2, 12), (2, 7))),
            ("bert", "ppt", dict(r="2", prefix="1"), everywhere)):
        rewritten = prunec.passes.get(pname)(**opts)(loaded(name))
        back = prunec.load(rewritten.save(tmp_path / f"{name}_{pname}.pt2"))
        for batch, n in shapes:
            feeds = inputs(name, batch, n, seed=5)
            if name == "bert" and pname == "tome":  # a padded row: ToMe counts per row, in tensor ops
                feeds["attention_mask"][0, n - 3:] = 0
            want = rewritten.run(**feeds).numpy()
            assert want.shape[1] < n or n < 41, (pname, n, want.shape)  # (at a few tokens some keep them all)
            np.testing.assert_allclose(back.run(**feeds).detach().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=pname)
    with pytest.raises(prunec.PruneError, match="padded batch") as e:
        fastv("bert", "0.5").save(tmp_path / "fastv.pt2")
    assert "\n" not in str(e.value) and not (tmp_path / "fastv.pt2").exists()


def test_other_dims_and_expose_are_refused_in_one_line():
    with pytest.raises(prunec.PruneError, match="dynamic") as e:
        fastv("bert", "0.5").expose("indices")
    assert "\n" not in str(e.value)

    class Image(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    h = torch.export.Dim("height", min=4, max=64)
    with pytest.raises(prunec.PruneError, match="dynamic dimension .* at axis 2") as e:
        prunec.load(Image(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({2: h},))
    assert "\n" not in str(e.value)


def test_a_count_read_before_the_cut_is_refused_naming_the_node():
    """``x.sum(1) / x.shape[1]`` after the cut divides by N read off the uncut input (torch.export
    spells every read of the length as the input's size): the static path rewrites the number to
    M, the dynamic one refuses it naming the node; a mean pools the kept tokens."""
    from tiny_models import tiny, tiny_inputs

    batch, seq = _dims()
    for pool in ("sum_div", "mean"):
        base = prunec.load(tiny(pool=pool), tiny_inputs(n=23), dynamic_shapes={"x": {0: batch, 1: seq}})
        fastv_ = prunec.passes.get("fastv")(keep="0.5", layer="1")
        if pool == "mean":
            assert fastv_(base).run(**tiny_inputs(batch=3, n=40)).shape == (3, 5)
            continue
        with pytest.raises(prunec.PruneError, match="node 'div' reads .* computed from the token count") as e:
            fastv_(base)
        assert "\n" not in str(e.value)


def test_without_dynamic_shapes_the_export_stays_static():
    base = prunec.load(_Named(model("bert")[0], "last_hidden_state").eval(), inputs("bert", *EXAMPLE))
    assert base.dims == [] and not base.dynamic_tokens and base.other_shapes() == ()


def test_the_kernel_counts_as_the_count_rule():
    """``ops.rule_counts`` (what the torch graph computes from N, symbolic or not) is
    ``CountRule.resolve`` (what the planner and the ONNX backend use) at every N."""
    from prunec.ops.tokens import rule_counts
    from prunec.passes.base import CountRule

    rnd = random.Random(0)
    for _ in range(3000):
        keep = rnd.choice([0.1, 0.25, 0.3, 0.5, 0.7, 1.0, rnd.random() or 0.5])
        count = rnd.randint(1, 9) if rnd.random() < 0.3 else None
        rule = CountRule(rnd.randint(0, 5), rnd.random() < 0.5, rnd.randint(0, 5), rnd.random() < 0.5,
                         keep=None if count else keep, count=count)
        n = rnd.randint(0, 300)
        got = rule_counts(n, rule.start, rule.start_from_end, rule.end, rule.end_from_end, rule.keep, rule.count)
        assert tuple(got) == rule.resolve(n), (rule, n)


def test_a_torch_rewrite_that_is_wrong_at_keep_one_is_refused_in_one_line(monkeypatch):
    """As on ONNX: the plan lowered at keep=1 must equal the module at the example and the other shapes;
    a kernel that runs but reverses the kept tokens' order is refused."""
    base = loaded("bert")
    prunec.passes.FastV(keep="0.5")(base)  # the real kernel passes
    real = prunec.ops.tokens.select_padded
    monkeypatch.setattr(prunec.ops.tokens, "select_padded", lambda *a, **k: real(*a, **k).flip(1))
    with pytest.raises(prunec.PruneError, match="keep=1 / r=0 does not equal the model it was given") as e:
        prunec.passes.FastV(keep="0.5")(base)
    assert "\n" not in str(e.value)
