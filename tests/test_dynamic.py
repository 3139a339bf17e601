"""Dynamic sequence length (issue 11, first step): a model exported with a dynamic batch and
sequence is rewritten without ``--shape`` by the attention top-k selections (FastV, cls-attn),
and the written model computes its counts at run time: at every (batch, length) it equals the
plain-PyTorch FastV reference (hooks on the unmodified module) run at that shape, and keep=1 is
the identity. Other passes are refused in one line naming ``--shape``."""
from functools import lru_cache

import numpy as np
import pytest
import torch

import prunec
from conftest import export_dir
from fastv_reference import fastv_reference

SHAPES = [(1, 7), (3, 33), (8, 128)]


class _Out(torch.nn.Module):
    """The model with its inputs by name and one tensor out (BERT: the last hidden state)."""

    def __init__(self, m, names, field):
        super().__init__()
        self.m, self.names, self.field = m, names, field

    def forward(self, *args):
        return getattr(self.m(**dict(zip(self.names, args))), self.field)


@lru_cache(maxsize=None)
def model(name):
    torch.manual_seed(0)
    if name == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=256)
        return BertModel(cfg).eval(), ["input_ids", "attention_mask"], "last_hidden_state"
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config, cls = (LlamaConfig, LlamaForCausalLM) if name == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    return cls(cfg).eval(), ["input_ids"], "logits"


def inputs(name, batch, n, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n)
    feeds = {"input_ids": torch.randint(0, 100, (batch, n), generator=g)}
    if name == "bert":
        feeds["attention_mask"] = torch.ones(batch, n, dtype=torch.int64)
    return feeds


@lru_cache(maxsize=None)
def exported(name, exporter):
    """The model exported as users export it: dynamic batch and sequence on every input."""
    m, names, field = model(name)
    wrapper = _Out(m, names, field).eval()
    example = inputs(name, 2, 16)
    args = tuple(example[k] for k in names)
    path = export_dir() / f"dyn_{name}.{exporter}.onnx"
    if exporter == "torchscript17":
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={k: {0: "batch", 1: "sequence"} for k in names})
    else:
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=3, max=200)
        torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=18, external_data=False,
                          input_names=names, dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),), verbose=False)
    return path


# (TorchScript cannot export transformers 5's Llama/Qwen2 masks: aten::diff)
CASES = [("bert", "torchscript17"), ("bert", "dynamo18"), ("llama", "dynamo18"), ("qwen2", "dynamo18")]


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_fastv_follows_the_length_at_run_time(name, exporter):
    m, names, _ = model(name)
    base = prunec.load(exported(name, exporter))  # no --shape
    causal = name != "bert"
    query = "last" if causal else "mean"
    pruned = prunec.passes.get("fastv")(keep="0.5", layer="2")(base)
    identity = prunec.passes.get("fastv")(keep="1.0", layer="2")(base)
    for batch, n in SHAPES:
        feeds = inputs(name, batch, n, seed=1)
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        ref_out, ref_idx = fastv_reference(m, feeds, 0.5, 2, query, prefix=0, causal=causal)
        ref = getattr(ref_out, "logits", None)
        ref = ref if ref is not None else ref_out.last_hidden_state
        got = pruned.run(np_feeds)[0]
        np.testing.assert_array_equal(pruned.kept_indices(np_feeds)["fastv_l2"], ref_idx.numpy())
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-4)
        same, original = identity.run(np_feeds)[0], base.run(np_feeds)[0]
        assert same.shape == original.shape == (batch, n) + original.shape[2:]
        np.testing.assert_allclose(same, original, rtol=1e-5, atol=1e-5)


def test_spans_and_counts_resolve_at_each_length():
    """``span=1:-2`` and ``count=`` at run time: the count is capped by a short input's span."""
    base = prunec.load(exported("bert", "torchscript17"))
    span = prunec.passes.get("fastv")(keep="0.5", layer="1", span="1:-2")(base)
    count = prunec.passes.get("fastv")(count=9, layer="1")(base)
    for batch, n in SHAPES:
        feeds = {k: v.numpy() for k, v in inputs("bert", batch, n).items()}
        idx = span.kept_indices(feeds)["fastv_l1"]
        length = n - 3
        k = max(1, min(length, round(0.5 * length)))
        assert idx.shape == (batch, 1 + k + 2)
        assert (idx[:, 0] == 0).all() and (idx[:, -2:] == [n - 2, n - 1]).all()
        assert count.run(feeds)[0].shape == (batch, min(9, n), 64)


def test_other_passes_are_refused_naming_shape():
    base = prunec.load(exported("bert", "torchscript17"))
    for pname, opts in (("tome", dict(r="2")), ("divprune", dict(keep="0.5")), ("random", dict(keep="0.5"))):
        with pytest.raises(prunec.PruneError, match="dynamic.*--shape") as e:
            prunec.passes.get(pname)(**opts)(base)
        assert "\n" not in str(e.value)


def test_cls_attention_on_a_dynamic_encoder():
    """cls-attn (the CLS row of the penultimate layer) at the encoder output, at each length."""
    m, names, _ = model("bert")
    base = prunec.load(exported("bert", "dynamo18"))
    pruned = prunec.passes.get("cls-attn")(keep="0.5", cls=0, span="1:")(base)
    for batch, n in SHAPES:
        feeds = {k: v.numpy() for k, v in inputs("bert", batch, n, seed=2).items()}
        idx = pruned.kept_indices(feeds)["cls_attn_out"]
        k = max(1, round(0.5 * (n - 1)))
        assert idx.shape == (batch, 1 + k) and (idx[:, 0] == 0).all()
        assert pruned.run(feeds)[0].shape == (batch, 1 + k, 64)
