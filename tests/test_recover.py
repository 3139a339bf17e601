"""Recovery: graphs whose consumers need every token get them back (copy, unmerge, attn).

References are plain torch, from the recovery's definition: the stream at the cut comes from
the *unmodified* model (everything before the cut is unchanged), the reduced tokens and the
kept indices / merge maps from the same pass run with ``recover=none`` on the encoder alone
(those are held to the methods' references in test_fastv / test_selection / test_merge)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import prunec
import zoo
from conftest import case, kept, load, run
from merge_reference import reference_merge
from prunec.passes.analysis.consumers import full_token_consumers
from recovery_models import pose_transformer, seg_vit, seg_vit_dpt


class Tokens(torch.nn.Module):
    """A model's token output alone (the encoder of SegViT, the features of the pose model)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _onnx(module, inputs, name, tmp):
    return prunec.load(zoo.export_onnx(zoo.Case(name, module, inputs, 0, 0), "dynamo18", tmp / f"{name}.onnx"))


def _load(module, inputs, form, name, tmp):
    return prunec.load(module, inputs) if form == "torch" else _onnx(module, inputs, name, tmp)


def _stream_into(blocks, k, module, inputs):
    """The tensor entering ``blocks[k]`` in the unmodified model [B, N, C]."""
    seen = {}
    h = blocks[k].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        module(**inputs)
    h.remove()
    return seen["x"]


def recover_ref(mode, src, y, idx=None, dest=None, keys=None):
    """Plain torch: copy / unmerge / attention recovery of y [B, M, C] to [B, N, C]."""
    if mode == "attn":
        att = torch.softmax(src @ keys.transpose(1, 2) / src.shape[-1] ** 0.5, dim=-1)
        return att @ y
    if mode == "unmerge" and dest is not None:
        out = src.clone()
        for b in range(src.shape[0]):
            for i in range(src.shape[1]):
                if int(dest[b, i]) < y.shape[1]:
                    out[b, i] = y[b, int(dest[b, i])]
        return out
    out = src.clone()
    for b in range(src.shape[0]):
        for j, i in enumerate(idx[b].tolist()):
            out[b, i] = y[b, j]
    return out


def test_analysis_names_the_consumers_that_need_every_token(tmp_path):
    seg, x = seg_vit()
    for model in (prunec.load(seg, x), _onnx(seg, x, "seg", tmp_path)):
        kinds = {c.kind for c in full_token_consumers(model.facts())}
        assert kinds == {"grid reshape"}
    pose, p = pose_transformer()
    assert {c.kind for c in full_token_consumers(prunec.load(pose, p).facts())} == {"token output"}
    bert = load("hf_bert", "torch")
    assert "token output" in {c.kind for c in full_token_consumers(bert.facts())}
    r = subprocess.run([sys.executable, "-m", "prunec.cli", "inspect", str(tmp_path / "seg.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "grid reshape" in r.stdout


SELECTIONS = [("fastv", dict(keep=0.5, layer="1"), 1), ("divprune", dict(keep=0.5, layer="2"), 2),
              ("cls-attn", dict(keep=0.25, layer="2"), 2)]


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("mode", ("copy", "unmerge", "attn"))
@pytest.mark.parametrize("pname,opts,layer", SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_seg_decoder_after_selection_matches_recovery_reference(pname, opts, layer, mode, form, tmp_path):
    seg, x = seg_vit()
    pruned = prunec.passes.get(pname)(**opts, recover=mode)(_load(seg, x, form, "seg", tmp_path))
    got = run(pruned, x)[0]
    y, idx = _reduced_blocks(seg, x, pname, opts)
    src = _stream_into(seg.encoder.blocks, layer, seg, x)
    full = recover_ref(mode, src, y, idx=idx, keys=torch.gather(src, 1, idx[..., None].expand(-1, -1, 64)))
    with torch.no_grad():  # recovery sits before the final norm, which then sees every token
        ref = seg.decode(seg.encoder.norm(full))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ("torch", "torchscript17", "dynamo18"))
def test_grid_decoder_behind_slice_transpose_reshape_gets_every_token(form, tmp_path):
    """DINOv2/DPT-style heads: drop CLS (Slice), Transpose to [B, C, N], Reshape to [B, C, H, W].
    The reshape is found as a grid consumer, so recover=auto restores every token (before, the
    rewritten graph failed in that Reshape or reshaped the wrong count)."""
    seg, x = seg_vit_dpt()
    if form == "torch":
        model = prunec.load(seg, x)
    else:
        model = prunec.load(zoo.export_onnx(zoo.Case("dpt", seg, x, 0, 0), form, tmp_path / f"dpt.{form}.onnx"))
    assert [c.kind for c in full_token_consumers(model.facts())] == ["grid reshape"]
    opts = dict(keep=0.5, layer="1")
    got = run(prunec.passes.get("fastv")(**opts)(model), x)[0]
    y, idx = _reduced_blocks(seg, x, "fastv", opts)
    full = recover_ref("copy", _stream_into(seg.encoder.blocks, 1, seg, x), y, idx=idx)
    with torch.no_grad():
        ref = seg.decode(seg.encoder.norm(full))
    assert got.shape == tuple(ref.shape) == (2, 5, 4, 4)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


def _blocks_out(seg):
    enc = seg.encoder
    return Tokens(lambda x: enc.blocks(enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))))


def _reduced_blocks(seg, x, pname, opts):
    """The tokens leaving the last block [B, M, C] and the kept indices, with recover=none."""
    enc = prunec.passes.get(pname)(**opts, recover="none")(prunec.load(_blocks_out(seg), x))
    (idx,) = enc.kept_indices(**x).values()
    return torch.as_tensor(run(enc, x)[0]), torch.as_tensor(idx)


def _mid_stream(seg, x, layer):
    """x + attn(norm1(x)) inside block ``layer`` of the unmodified encoder [B, N, C]."""
    seen = {}

    def grab(y, k, v, probs, state):
        seen["x"] = y
        return y
    reference_merge(seg.encoder, {"x": x["x"]}, {layer: grab})
    return seen["x"]


MERGES = [("tome", dict(r="3"), "unmerge"), ("tome", dict(r="3/0/0"), "copy"), ("tome", dict(r="3/0/0"), "attn"),
          ("evit", dict(keep="0.5", layers="1/2"), "unmerge"), ("pool", dict(factor=2, layer="1"), "unmerge")]


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("pname,opts,mode", MERGES, ids=[f"{p}-{o.get('r', o.get('keep', ''))}-{m}"
                                                          for p, o, m in MERGES])
def test_seg_decoder_after_merging_matches_recovery_reference(pname, opts, mode, form, tmp_path):
    """unmerge composes the merges' maps (each token takes its final merged token's value);
    copy / attn after one ToMe merge in block 0 use the stream there."""
    seg, x = seg_vit()
    got = run(prunec.passes.get(pname)(**opts, recover=mode)(_load(seg, x, form, "seg", tmp_path)), x)[0]
    enc = prunec.passes.get(pname)(**opts, recover="none")(prunec.load(_blocks_out(seg), x))
    y = torch.as_tensor(run(enc, x)[0])
    b = y.shape[0]
    if mode == "unmerge":
        if pname == "pool":  # each 2x2 window's tokens take the pooled token
            dests = [torch.tensor([0] + [1 + (i // 8) * 2 + (i % 4) // 2 for i in range(16)]).expand(b, -1)]
        else:
            dests = [torch.as_tensor(d) for d in enc.merge_maps(**x).values()]
        full = y
        for d in reversed(dests):  # last merge first
            full = torch.gather(full, 1, d[..., None].expand(-1, -1, y.shape[-1]))
    else:
        src = _mid_stream(seg, x, 0)
        (rep,) = enc.kept_indices(**x).values()
        (dest,) = enc.merge_maps(**x).values()
        dest = torch.as_tensor(dest)
        keys = torch.zeros(b, y.shape[1], src.shape[-1])
        for i in range(b):  # the merged tokens at the cut: mean of their sources (sizes start at 1)
            for j in range(y.shape[1]):
                keys[i, j] = src[i, dest[i] == j].mean(0)
        full = recover_ref(mode, src, y, idx=torch.as_tensor(rep), keys=keys)
    with torch.no_grad():
        ref = seg.decode(seg.encoder.norm(full))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_keep_one_with_recovery_is_identity(form, tmp_path):
    seg, x = seg_vit()
    model = _load(seg, x, form, "seg", tmp_path)
    base = run(model, x)[0]
    for mode in ("copy", "attn"):
        same = run(prunec.passes.FastV(keep=1.0, layer="1", recover=mode)(model), x)[0]
        if mode == "copy":
            np.testing.assert_allclose(same, base, rtol=1e-5, atol=1e-6)
        else:  # attention recovery mixes tokens even when none was pruned: it runs, shapes hold
            assert same.shape == base.shape


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
def test_bert_last_hidden_state_keeps_its_shape_and_padding_stays_put(form):
    """FastV before layer 1 with copy recovery: last_hidden_state is [B, N, C] again; kept tokens
    hold the pruned model's values at their own positions, every other token (padding among
    them) its hidden state entering layer 1."""
    c = case("hf_bert")
    model = load("hf_bert", form)
    pruned = prunec.passes.FastV(keep=0.5, layer="1", recover="copy")(model)
    out = run(pruned, c.inputs)
    base = run(model, c.inputs)
    assert [o.shape for o in out] == [o.shape for o in base]
    reduced = prunec.passes.FastV(keep=0.5, layer="1", recover="none")(model)
    (idx,) = kept(reduced, c.inputs).values()
    y = run(reduced, c.inputs)[0]
    src = _stream_into(c.module.encoder.layer, 1, c.module, c.inputs).numpy()
    hidden = out[0]
    mask = c.inputs["attention_mask"].numpy()
    for b in range(hidden.shape[0]):
        kept_pos = set(idx[b].tolist())
        for i in range(hidden.shape[1]):
            want = y[b, sorted(kept_pos).index(i)] if i in kept_pos else src[b, i]
            np.testing.assert_allclose(hidden[b, i], want, rtol=1e-4, atol=1e-4)
    assert (mask == 0).any()  # the inputs hold padding tokens


@pytest.mark.parametrize("mode", ("copy", "attn"))
def test_pose_transformer_prunes_frames_and_recovers_every_frame(mode, tmp_path):
    """Frames as tokens: prune at layer 2, restore every frame at the end (attn: the Hourglass
    Tokenizer's recovering attention, training-free); per-frame output [B, F, J·3] as the
    reference computes it; both backends."""
    pose, p = pose_transformer()
    feats = Tokens(lambda x: pose.blocks(pose.embed(x) + pose.pos))
    enc = prunec.passes.FastV(keep=0.5, layer="2", recover="none")(prunec.load(feats, p))
    y = torch.as_tensor(run(enc, p)[0])
    (idx,) = enc.kept_indices(**p).values()
    idx = torch.as_tensor(idx)
    src = _stream_into(pose.blocks, 2, pose, p)
    full = recover_ref(mode, src, y, idx=idx, keys=torch.gather(src, 1, idx[..., None].expand(-1, -1, src.shape[-1])))
    with torch.no_grad():
        ref = pose.head(pose.norm(full)).numpy()
    for form in ("torch", "dynamo18"):
        model = _load(pose, p, form, "pose", tmp_path)
        out = run(prunec.passes.FastV(keep=0.5, layer="2", recover=mode)(model), p)
        assert out[0].shape == (2, 27, 51)
        np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)


def test_cli_recover_flags(tmp_path):
    seg, x = seg_vit()
    src = zoo.export_onnx(zoo.Case("seg", seg, x, 0, 0), "dynamo18", tmp_path / "seg.onnx")
    for extra in ([], ["--recover", "attn"], ["--recover-at", "2"]):
        out = tmp_path / f"out{len(extra)}{extra[-1] if extra else ''}.onnx"
        r = subprocess.run([sys.executable, "-m", "prunec.cli", str(src), "--pass", "fastv", "--keep", "0.5",
                            "--layer", "1", "-o", str(out), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert prunec.load(out).run({"x": x["x"].numpy()})[0].shape == (2, 5, 4, 4)
    out = tmp_path / "none.onnx"
    r = subprocess.run([sys.executable, "-m", "prunec.cli", str(src), "--pass", "fastv", "--keep", "0.5", "--layer", "1",
                        "--recover", "none", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "grid reshape" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


EVERY = [("fastv", dict(keep=0.5, layer="1")), ("cls-attn", dict(keep=0.5, layer="2")),
         ("divprune", dict(keep=0.5, layer="2")), ("zero-tprune", dict(keep=0.5, layer="2")),
         ("random", dict(keep=0.5, layer="1")), ("pool", dict(factor=2, layer="1")), ("tome", dict(r="3")),
         ("evit", dict(keep="0.5", layers="1/2")), ("ppt", dict(r=3, layers="0/2")),
         ("visionzip", dict(dominant=6, contextual=4, layer="2"))]


@pytest.mark.parametrize("pname,opts", EVERY, ids=[p for p, _ in EVERY])
def test_every_pass_gets_the_grid_back_and_backends_agree(pname, opts, tmp_path):
    seg, x = seg_vit()
    a = prunec.passes.get(pname)(**opts)(_load(seg, x, "torch", "seg", tmp_path))
    b = prunec.passes.get(pname)(**opts)(_load(seg, x, "dynamo18", "seg", tmp_path))
    ya, yb = run(a, x)[0], run(b, x)[0]
    assert ya.shape == yb.shape == (2, 5, 4, 4)
    np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4)


def test_a_cut_after_the_restore_point_is_refused(tmp_path):
    seg, x = seg_vit()
    with pytest.raises(prunec.PruneError, match="cut before a layer"):
        prunec.passes.get("cls-attn")(keep=0.5)(prunec.load(seg, x))  # default cut: the encoder output


class TwoTaps(torch.nn.Module):
    """A decoder that reads the last block's tokens and block 1's (a DPT-style skip)."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x):
        enc = self.seg.encoder
        h1 = enc.blocks[1](enc.blocks[0](enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))))
        return self.seg.decode(enc.norm(enc.blocks[2](h1)) + h1)


def test_a_second_token_tensor_past_the_restore_point_is_refused():
    """Only the stream at the restore point comes back: a skip from a layer after the cut
    would reach the decoder with fewer tokens, so the rewrite is refused, naming it."""
    seg, x = seg_vit()
    model = prunec.load(TwoTaps(seg).eval(), x)
    with pytest.raises(prunec.PruneError, match="reaches node .* after the point"):
        prunec.passes.FastV(keep=0.5, layer="1")(model)
    assert run(prunec.passes.FastV(keep=0.5, layer="2")(model), x)[0].shape == (2, 5, 4, 4)  # cut after the tap
