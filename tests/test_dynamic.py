"""Dynamic sequence length (issue 11): a model exported with a dynamic batch and sequence is
rewritten without ``--shape`` by every pass but pool, and the written model computes its counts at
run time: at every (batch, length) it equals the plain-PyTorch reference of the method (hooks on
the unmodified module) run at that shape, and keep=1 is the identity. pool (a fixed patch grid) is
refused in one line naming ``--shape``."""
from functools import lru_cache

import numpy as np
import pytest
import torch

import prunec
from conftest import export_dir
from fastv_reference import fastv_reference
from merge_reference import evit_reduce, ppt_reduce, reference_merge, tome_reduce, visionzip_choice
from reference import default_span, divprune_choice, random_choice, reference_run, zero_tprune_choice

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
    if exporter.startswith("torchscript"):  # torchscript14, torchscript17: the opset
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=int(exporter[11:]), input_names=names,
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


def test_pool_and_fixed_image_defaults_are_refused_naming_what_to_give():
    """pool needs a fixed patch grid; ppt's and visionzip's default counts are shares of a fixed image."""
    base = prunec.load(exported("bert", "torchscript17"))
    for pname, opts, what in (("pool", dict(factor=2, grid="4x4", span="1:17"), "--shape"),
                              ("ppt", dict(prefix=1), "give r="), ("visionzip", dict(prefix=1), "give dominant=")):
        with pytest.raises(prunec.PruneError, match=f"dynamic.*{what}") as e:
            prunec.passes.get(pname)(**opts)(base)
        assert "\n" not in str(e.value)


def _last_hidden(out):
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).detach().numpy()


SELECTIONS = {  # pass -> (options, reference choice at n tokens with the default span)
    "divprune": (dict(keep="0.5", layer="2"), lambda n, c: divprune_choice(0.5, default_span(n, 0, c))),
    "random": (dict(keep="0.5", layer="2"), lambda n, c: random_choice(0.5, 0, default_span(n, 0, c))),
    "zero-tprune": (dict(keep="0.5", layer="2"),
                    lambda n, c: zero_tprune_choice(1, 0.5, 30, 0.5, None, default_span(n, 0, c))),
}


@pytest.mark.parametrize("pname", sorted(SELECTIONS))
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_selections_follow_the_length_at_run_time(name, exporter, pname):
    """DivPrune, random and Zero-TPrune on a dynamic sequence: k = round(0.5 · span) at each length,
    the same kept indices as the plain-PyTorch reference on the unmodified module, outputs allclose."""
    m, _, _ = model(name)
    opts, choice = SELECTIONS[pname]
    pruned = prunec.passes.get(pname)(**opts)(prunec.load(exported(name, exporter)))
    for batch, n in SHAPES:
        feeds = inputs(name, batch, n, seed=1)
        ref, ref_idx = reference_run(m, feeds, 2, choice(n, name != "bert"))
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        np.testing.assert_array_equal(pruned.kept_indices(np_feeds)[f"{pname.replace('-', '_')}_l2"], ref_idx.numpy())
        np.testing.assert_allclose(pruned.run(np_feeds)[0], _last_hidden(ref), rtol=1e-4, atol=1e-4)


MERGES = {  # pass and options -> the reference's reductions per block (or a choice at the cut before layer 2)
    "tome r=4": (("tome", dict(r="4", prefix=0)), lambda: ({i: tome_reduce(4, 0) for i in range(3)}, True)),
    "tome r=40 (capped)": (("tome", dict(r="40", prefix=0)), lambda: ({i: tome_reduce(40, 0) for i in range(3)}, True)),
    "evit": (("evit", dict(keep="0.5", layers="0/1", prefix=1)), lambda: ({0: evit_reduce(0.5, 1), 1: evit_reduce(0.5, 1)},
                                                                          False)),
    "ppt prune": (("ppt", dict(r=3, layers="0/1", prefix=1, threshold=0.0)),
                  lambda: ({i: ppt_reduce(3, 0.0, 1) for i in (0, 1)}, True)),
    "ppt pool": (("ppt", dict(r=3, layers="0/1", prefix=1, threshold=1.0)),
                 lambda: ({i: ppt_reduce(3, 1.0, 1) for i in (0, 1)}, True)),
    "visionzip": (("visionzip", dict(dominant=4, contextual=2, prefix=1, layer="2")), None),
}


def merge_reference_output(what: str, feeds: dict) -> np.ndarray:
    """The plain-PyTorch reference of the merge ``what`` (a MERGES key) on the unmodified BERT at
    ``feeds``: its last hidden state."""
    m, _, _ = model("bert")
    reductions = MERGES[what][1]
    if reductions is None:
        ref, _ = reference_run(m, feeds, 2, visionzip_choice(1, 4, 2, 4, 1))
    else:
        per_block, prop_attn = reductions()
        ref, _ = reference_merge(m, feeds, per_block, prop_attn=prop_attn)
    return _last_hidden(ref)


@pytest.mark.parametrize("what", sorted(MERGES))
@pytest.mark.parametrize("exporter", ("torchscript17", "dynamo18"))
def test_merges_follow_the_length_at_run_time(exporter, what):
    """ToMe (r capped at run time at (N − prefix) // 2), EViT, PPT (both branches) and VisionZip on a
    dynamic BERT equal their plain-PyTorch references on the unmodified module at each length."""
    pname, opts = MERGES[what][0]
    merged = prunec.passes.get(pname)(**opts)(prunec.load(exported("bert", exporter)))
    for batch, n in SHAPES:
        feeds = inputs("bert", batch, n, seed=1)
        got = merged.run({k: v.numpy() for k, v in feeds.items()})[0]
        want = merge_reference_output(what, feeds)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


EVERY_PASS = [("fastv", dict(keep="0.5", layer="2")), ("cls-attn", dict(keep="0.5", cls=0, span="1:")),
              ("divprune", dict(count=1, layer="2")), ("random", dict(keep="0.5", layer="1/2")),
              ("zero-tprune", dict(keep="0.5", layer="2")), ("tome", dict(r="4", prefix=1)),
              ("evit", dict(keep="0.5", layers="0/1", prefix=1)), ("ppt", dict(r=3, layers="0/1", prefix=1)),
              ("visionzip", dict(dominant=4, contextual=2, prefix=1, layer="2"))]


def test_every_pass_runs_on_inputs_shorter_than_its_counts():
    """1 to 5 tokens: empty spans, r and k capped to nothing, no B token for ToMe, fewer tokens than
    VisionZip's dominant ones: every written model runs (no op sees an empty axis) and never returns
    more tokens than it was given."""
    base = prunec.load(exported("bert", "torchscript17"))
    for pname, opts in EVERY_PASS:
        model_ = prunec.passes.get(pname)(**opts)(base)
        for n in range(1, 6):
            out = model_.run({k: v.numpy() for k, v in inputs("bert", 2, n).items()})[0]
            assert out.shape[0] == 2 and 1 <= out.shape[1] <= n, (pname, n, out.shape)


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


def test_expose_on_a_dynamic_model_follows_the_length():
    """``expose`` on a dynamic ToMe rewrite: at each length the token sizes equal the reference's
    merged sizes and sum to the input length, and each kept index is a token of the input."""
    m, _, _ = model("bert")
    merged = prunec.passes.get("tome")(r="4", prefix=0)(prunec.load(exported("bert", "dynamo18")))
    exposed = merged.expose("sizes,indices")
    for batch, n in SHAPES:
        feeds = inputs("bert", batch, n, seed=1)
        _, state = reference_merge(m, feeds, {i: tome_reduce(4, 0) for i in range(3)}, prop_attn=True)
        out, sizes, idx = exposed.run({k: v.numpy() for k, v in feeds.items()})
        assert sizes.shape == idx.shape == out.shape[:2]
        np.testing.assert_array_equal(sizes, state["size"][..., 0].numpy())
        assert (sizes.sum(1) == n).all() and ((0 <= idx) & (idx < n)).all()


@lru_cache(maxsize=None)
def image_model():
    """A timm ViT that takes any image size (``dynamic_img_size``: position embeddings interpolated),
    exported with a dynamic batch, height and width (multiples of its 16-pixel patches)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True, depth=3, embed_dim=64,
                          num_heads=4, num_classes=10).eval()
    path = export_dir() / "dyn_vit_image.onnx"
    patches = (torch.export.Dim("hp", min=2, max=64), torch.export.Dim("wp", min=2, max=64))
    torch.onnx.export(m, (torch.randn(2, 3, 224, 224),), str(path), dynamo=True, opset_version=18, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64), 2: 16 * patches[0],
                                       3: 16 * patches[1]},), verbose=False)
    return m, path


def test_a_dynamic_image_size_is_pruned_at_every_size():
    """An image input [B, 3, H, W] with a dynamic H and W is probed at 224x224 and its token count
    (1 + H·W / 256) followed at run time: FastV (same kept tokens) and ToMe equal their references on
    the unmodified model at 160x160 and 320x240, at batch 1 and 3."""
    m, path = image_model()
    base = prunec.load(path)
    assert base.dynamic_tokens and base.feeds["x"].shape == (2, 3, 224, 224) and base.facts().num_tokens == 197
    fastv = prunec.passes.get("fastv")(keep="0.5", layer="2")(base)
    tome = prunec.passes.get("tome")(r="8")(base)
    for batch, (h, w) in ((1, (160, 160)), (3, (320, 240))):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        ref, ref_idx = fastv_reference(m, {"x": x}, 0.5, 2, "cls", prefix=1)
        np.testing.assert_array_equal(fastv.kept_indices({"x": x.numpy()})["fastv_l2"], ref_idx.numpy())
        np.testing.assert_allclose(fastv.run({"x": x.numpy()})[0], ref.detach().numpy(), rtol=1e-4, atol=1e-4)
        ref, _ = reference_merge(m, {"x": x}, {i: tome_reduce(8, 1) for i in range(3)}, prop_attn=True)
        np.testing.assert_allclose(tome.run({"x": x.numpy()})[0], ref.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_a_dynamic_cut_that_keeps_every_token_at_the_probe_length_still_reduces():
    """VisionZip with 40 dominant tokens keeps all 29 probe tokens, yet halves a 128-token input: the
    pipeline does not call it idle, the model says it reduced, and expose finds its token output."""
    base = prunec.load(exported("bert", "dynamo18"))
    vz = prunec.passes.get("visionzip")(dominant=40, contextual=8, prefix=1, layer="2")
    out, idle = prunec.model.apply_passes(base, [vz])
    assert idle == [] and out.reduced_since(base) and out.cuts[0][1:] == (29, 29)
    feeds = {k: v.numpy() for k, v in inputs("bert", 2, 128).items()}
    exposed = out.expose("sizes")
    hidden, sizes = exposed.run(feeds)
    assert hidden.shape == (2, 48, 64) and sizes.shape == (2, 48) and (sizes.sum(1) == 128).all()


def test_opset14_merges_run_when_no_slot_is_left():
    """Below opset 16 a merge sums tokens with a one-hot product, whose depth ORT refuses at 0: VisionZip
    on 2..6 tokens (every token dominant, no contextual slot) runs and keeps them all."""
    base = prunec.load(exported("bert", "torchscript14"))
    vz = prunec.passes.get("visionzip")(dominant=6, contextual=2, prefix=1, layer="2")(base)
    for n in range(2, 9):
        out = vz.run({k: v.numpy() for k, v in inputs("bert", 2, n).items()})[0]
        assert out.shape == (2, min(n, 8), 64)


def test_validation_skips_lengths_the_model_itself_does_not_take():
    """Probed at 250 tokens for a span up to 240, the model (256 positions) cannot run the longer
    validation input: the rewrite is not blamed for it."""
    base = prunec.load(exported("bert", "torchscript17"), probe_length=250)
    pruned = prunec.passes.get("fastv")(keep="0.5", layer="2", span="1:240")(base)
    out = pruned.run({k: v.numpy() for k, v in inputs("bert", 1, 250).items()})[0]
    assert out.shape == (1, 1 + 120 + 10, 64)


def test_the_same_pass_twice_at_one_layer_gets_tags_of_its_own():
    """(Llama: no padding mask. On BERT the second DivPrune, planned on the first one's rewrite, would
    read the mask per token after an earlier pass, which is refused: see tests/test_padding.py.)"""
    base = prunec.load(exported("llama", "dynamo18"))
    p = prunec.passes.get("divprune")(keep="0.5", layer="2")
    out = prunec.Pipeline([p, p])(base)
    assert [t for t, _, _ in out.cuts] == ["divprune_l2", "divprune_l2_1"]
    # 40 tokens, span 1:-1: 1 + 19 + 1 = 21; then 1 + round(0.5 * 19) + 1 = 12
    assert out.run({k: v.numpy() for k, v in inputs("llama", 1, 40).items()})[0].shape == (1, 12, 100)
    with pytest.raises(prunec.PruneError, match="earlier pass already reduced"):
        prunec.Pipeline([p, p])(prunec.load(exported("bert", "torchscript17")))


@pytest.mark.parametrize("pname,opts", [("fastv", dict(keep="0.5")), ("evit", dict(keep="0.5", layers="1", prefix=1))])
def test_a_rewrite_that_is_wrong_at_keep_one_is_refused_in_one_line(monkeypatch, pname, opts):
    """Validation lowers the same plan at keep=1 and compares it with the model it was given at the
    probe's and two other shapes: a lowering that runs but reverses the kept tokens' order (so would
    write a wrong model) is refused, naming the output; the correct one passes."""
    import prunec.backends.onnx as lowering

    model = prunec.load(exported("bert", "dynamo18"))
    prunec.passes.get(pname)(**opts)(model)  # the real lowering passes the check
    if pname == "fastv":
        real = lowering._with_fixed

        def reversed_order(b, top, batch_of, counts, tag):
            return b.slice(real(b, top, batch_of, counts, tag), -1, np.iinfo(np.int64).min, step=-1)
        monkeypatch.setattr(lowering, "_with_fixed", reversed_order)
    else:
        import prunec.backends.onnx_merge as merging
        real = merging.evit_padded

        def reversed_slots(b, scores, padding, n, prefix, fuse, keep):
            dest, weight, rep = real(b, scores, padding, n, prefix, fuse, keep)
            m = b.dim(rep, 1)  # slot j -> M - 1 - j (the dropped slot M stays)
            dest = b.op("Where", [b.op("Less", [dest, m]), b.op("Sub", [b.op("Sub", [m, b.ints(1, "one")]), dest]), dest])
            return dest, weight, b.slice(rep, -1, np.iinfo(np.int64).min, step=-1)
        monkeypatch.setattr(merging, "evit_padded", reversed_slots)
    with pytest.raises(prunec.PruneError, match="keep=1 / r=0 does not equal the model it was given") as e:
        prunec.passes.get(pname)(**opts)(model)
    assert "\n" not in str(e.value)


def test_check_auto_compares_keep_one_on_models_up_to_its_size_and_full_always(monkeypatch):
    """Check ``auto`` makes the keep=1 comparison on models up to IDENTITY_CHECK_BYTES of weights (it costs
    two more sessions and runs); ``full`` makes it on any model."""
    import prunec.backends.onnx as lowering
    import prunec.model

    real = lowering._with_fixed
    monkeypatch.setattr(lowering, "_with_fixed", lambda b, top, batch_of, counts, tag: b.slice(
        real(b, top, batch_of, counts, tag), -1, np.iinfo(np.int64).min, step=-1))
    monkeypatch.setattr(prunec.model, "IDENTITY_CHECK_BYTES", 0)
    prunec.passes.FastV(keep="0.5")(prunec.load(exported("bert", "dynamo18")))  # auto: not compared, so not seen
    with pytest.raises(prunec.PruneError, match="keep=1 / r=0 does not equal"):
        prunec.passes.FastV(keep="0.5")(prunec.load(exported("bert", "dynamo18"), check="full"))
