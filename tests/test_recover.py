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
from conftest import case, kept, load, run, torch_outputs
from merge_reference import reference_merge
from prunec.passes.analysis.consumers import full_token_consumers
from recovery_models import pose_transformer, seg_vit


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


def _blocks_out(seg):
    enc = seg.encoder
    return Tokens(lambda x: enc.blocks(enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))))


def _reduced_blocks(seg, x, pname, opts):
    """The tokens leaving the last block [B, M, C] and the kept indices, with recover=none."""
    enc = prunec.passes.get(pname)(**opts, recover="none")(prunec.load(_blocks_out(seg), x))
    (idx,) = enc.kept_indices(**x).values()
    return torch.as_tensor(run(enc, x)[0]), torch.as_tensor(idx)
