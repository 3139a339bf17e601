"""Dynamic shapes on the torch path: ``prunec.load(module, example, dynamic_shapes=...)`` keeps
torch.export's Dims. A dynamic batch stays dynamic; a dynamic sequence makes the token count
dynamic, as for an ONNX model with a dynamic sequence (tests/test_dynamic.py): FastV and
cls-attn compute span, k and the kept count M at run time, every size after the cut that spells
the token symbol N becomes M, and the rewritten GraphModule runs at every (batch, length), where it
equals the plain-PyTorch FastV reference (hooks on the unmodified module) run at that shape and
picks the kept indices the ONNX backend picks on a dynamic export of the same module. keep=1 is
the identity, and the saved ``.pt2`` re-exports with the Dims (it loads back dynamic)."""
import random
from functools import lru_cache

import numpy as np
import pytest
import torch

import prunec
from fastv_reference import fastv_reference
from test_dynamic import SHAPES, exported, inputs, model

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


def test_other_passes_and_dims_are_refused_in_one_line():
    base = loaded("bert")
    for pname, opts in (("tome", dict(r="2")), ("divprune", dict(keep="0.5")), ("random", dict(keep="0.5"))):
        with pytest.raises(prunec.PruneError, match="dynamic") as e:
            prunec.passes.get(pname)(**opts)(base)
        assert "\n" not in str(e.value)
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
