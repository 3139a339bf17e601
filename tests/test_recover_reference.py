"""Recovery held to references built from the unmodified model with hooks
(recovery_reference.py): the method's own reference reduction, then copy / unmerge / attn
recovery by definition; both backends. (test_recover.py's references take the reduced tokens
and maps from prunec itself; these do not.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import prunec
import zoo
from conftest import run
from recovery_models import pose_transformer, seg_vit
from recovery_reference import recover, selected, stream_into, tome_merged
from reference import attention_choice, divprune_choice

SELECTIONS = [("fastv", dict(keep=0.5, layer="1"), 1, attention_choice(0, "cls", 0.5, None, 1)),
              ("divprune", dict(keep=0.5, layer="2"), 2, divprune_choice(0.5, None, 1)),
              ("cls-attn", dict(keep=0.25, layer="2"), 2, attention_choice(1, "cls", 0.25, None, 1))]


def _load(module, inputs, form, name, tmp):
    if form == "torch":
        return prunec.load(module, inputs)
    return prunec.load(zoo.export_onnx(zoo.Case(name, module, inputs, 0, 0), "dynamo18", tmp / f"{name}.onnx"))


def _seg_embed(enc):
    return lambda x: enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))


def _differs_from_unpruned(ref, module, inputs):
    with torch.no_grad():
        base = module(**inputs)
    assert not torch.allclose(ref, base, atol=1e-3)  # the reduction changed something: the check can fail


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("mode", ("copy", "attn"))
@pytest.mark.parametrize("pname,opts,layer,choose", SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_seg_decoder_after_selection(pname, opts, layer, choose, mode, form, tmp_path):
    seg, x = seg_vit()
    enc = seg.encoder
    y, idx = selected(_seg_embed(enc), enc.blocks, x, layer, choose)
    full = recover(mode, stream_into(enc.blocks, layer, seg, x), y, idx=idx)
    with torch.no_grad():  # recovery sits before the final norm, which then sees every token
        ref = seg.decode(enc.norm(full))
    _differs_from_unpruned(ref, seg, x)
    got = run(prunec.passes.get(pname)(**opts, recover=mode)(_load(seg, x, form, "seg", tmp_path)), x)[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ("torch", "dynamo18"))
@pytest.mark.parametrize("r", ({0: 3, 1: 3, 2: 3}, {0: 2, 2: 4}), ids=("r3", "r2-0-4"))
def test_seg_decoder_after_tome_unmerge(r, form, tmp_path):
    seg, x = seg_vit()
    enc = seg.encoder
    y, dests = tome_merged(_seg_embed(enc), enc.blocks, x, r, prefix=1)
    full = recover("unmerge", None, y, dests=dests)
    with torch.no_grad():
        ref = seg.decode(enc.norm(full))
    _differs_from_unpruned(ref, seg, x)
    spec = "/".join(str(r.get(i, 0)) for i in range(3))
    got = run(prunec.passes.get("tome")(r=spec, recover="unmerge")(_load(seg, x, form, "seg", tmp_path)), x)[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ("copy", "attn"))
def test_pose_transformer_recovers_every_frame(mode, tmp_path):
    pose, p = pose_transformer()
    y, idx = selected(lambda x: pose.embed(x) + pose.pos, pose.blocks, p, 2, attention_choice(1, "mean", 0.5, None, 0))
    full = recover(mode, stream_into(pose.blocks, 2, pose, p), y, idx=idx)
    with torch.no_grad():
        ref = pose.head(pose.norm(full))
    _differs_from_unpruned(ref, pose, p)
    for form in ("torch", "dynamo18"):
        out = run(prunec.passes.FastV(keep=0.5, layer="2", recover=mode)(_load(pose, p, form, "pose", tmp_path)), p)
        assert out[0].shape == (2, 27, 51)
        np.testing.assert_allclose(out[0], ref.numpy(), rtol=1e-4, atol=1e-4)
