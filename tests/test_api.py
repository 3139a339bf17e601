"""The Python API: purity, saving, torch round trips, pipelines, and the ops kernels."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import prunec
from conftest import case, onnx_file
from prunec.ops import gather_tokens, scores_from_probs, scores_from_qk, select_topk


def test_pipeline_is_pure_on_onnx(tmp_path):
    model = prunec.load(onnx_file("timm_vit", "dynamo18"))
    before = model.proto().SerializeToString()
    out = prunec.Pipeline([prunec.passes.FastV(keep=0.25, layer=1)])(model)
    assert model.proto().SerializeToString() == before
    path = out.save(tmp_path / "v.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert out.facts().num_tokens == model.facts().num_tokens  # the first layer still sees every token


def test_pipeline_is_pure_on_torch_and_reexports(tmp_path):
    c = case("hf_vit")
    model = prunec.load(c.module, c.inputs)
    code = model.gm.code
    out = prunec.Pipeline([prunec.passes.FastV(keep=0.5, layer=1)])(model)
    assert model.gm.code == code
    module = out.to_torch()
    assert isinstance(module, torch.nn.Module)
    ep = torch.export.export(module, (), c.inputs, strict=False)  # exportable again
    a = ep.module()(**c.inputs)[0]
    b = module(**c.inputs)[0]
    torch.testing.assert_close(a, b)
    saved = out.save(tmp_path / "vit.pt2")
    loaded = torch.export.load(str(saved)).module()
    torch.testing.assert_close(loaded(**c.inputs)[0], b)


def test_two_fastv_cuts_compose():
    c = case("timm_vit")
    model = prunec.load(c.module, c.inputs)
    out = prunec.Pipeline([prunec.passes.FastV(keep=0.5, layer=1), prunec.passes.FastV(keep=0.5, layer=2)])(model)
    idx = out.kept_indices(**c.inputs)
    assert set(idx) == {"fastv_l1", "fastv_l2"}
    assert idx["fastv_l1"].shape[1] == 1 + 8 and idx["fastv_l2"].shape[1] == 1 + 4
    onnx_model = prunec.load(onnx_file("timm_vit", "dynamo18"))
    onnx_out = prunec.Pipeline([prunec.passes.FastV(keep=0.5, layer=1), prunec.passes.FastV(keep=0.5, layer=2)])(onnx_model)
    oidx = onnx_out.kept_indices(c.inputs)
    for tag in idx:
        np.testing.assert_array_equal(idx[tag], oidx[tag])


def test_onnx_to_torch_runs_the_graph():
    c = case("timm_vit")
    model = prunec.load(onnx_file("timm_vit", "dynamo18"))
    module = model.to_torch()
    out = module(c.inputs["x"])[0]
    np.testing.assert_allclose(out.numpy(), model.run(c.inputs)[0], rtol=1e-6)


def test_kernels_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    kk = k.repeat_interleave(2, dim=1)
    probs = torch.softmax(q @ kk.transpose(-1, -2) / np.sqrt(8), dim=-1)
    torch.testing.assert_close(scores_from_qk(q, k, None, None, False, 0), scores_from_probs(probs, 0))
    torch.testing.assert_close(scores_from_qk(q, k, None, None, False, "mean"), scores_from_probs(probs, "mean"))
    causal = torch.full((9, 9), float("-inf")).triu(1)
    probs_c = torch.softmax(q @ kk.transpose(-1, -2) / np.sqrt(8) + causal, dim=-1)
    torch.testing.assert_close(scores_from_qk(q, k, None, None, True, 4), scores_from_probs(probs_c, 4))
    scores = torch.tensor([[0.0, 5, 1, 4, 2, 3, 9]])
    assert select_topk(scores, 2, 1, 6).tolist() == [[0, 1, 3, 6]]
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3)
    idx = torch.tensor([[0, 2], [1, 6]])
    assert gather_tokens(x, idx, 1, 0).tolist() == [[x[0, 0].tolist(), x[0, 2].tolist()],
                                                   [x[1, 1].tolist(), x[1, 6].tolist()]]


def test_bad_options_raise_clear_errors():
    model = prunec.load(onnx_file("timm_vit", "dynamo18"))
    with pytest.raises(prunec.PruneError, match="no option"):
        prunec.passes.FastV(ratio=0.5)
    with pytest.raises(prunec.PruneError, match="span"):
        prunec.passes.FastV(span="9:3", layer=1)(model)
    with pytest.raises(prunec.PruneError, match="needs example_inputs"):
        prunec.load(copy.deepcopy(case("timm_vit").module))


def test_grid_consumer_after_the_cut_is_refused_not_misrewritten(tmp_path):
    """A decoder that reshapes every patch token onto the grid cannot take fewer tokens: with
    recovery turned off prunec refuses, naming the reshape, instead of emitting a wrong model
    (with the default, recovery restores the tokens: tests/test_recover.py)."""
    vit = case("timm_vit").module

    class Seg(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v, self.conv = v, torch.nn.Conv2d(64, 3, 3, padding=1)

        def forward(self, x):
            t = self.v.forward_features(x)[:, 1:]
            return self.conv(t.reshape(t.shape[0], 4, 4, 64).permute(0, 3, 1, 2))

    m, x = Seg(vit).eval(), case("timm_vit").inputs["x"]
    torch.onnx.export(m, (x,), str(tmp_path / "seg.onnx"), dynamo=True, opset_version=18, external_data=False,
                      verbose=False)
    for model in (prunec.load(m, (x,)), prunec.load(tmp_path / "seg.onnx")):
        with pytest.raises(prunec.PruneError, match="grid reshape .* needs every token"):
            prunec.passes.FastV(keep=0.5, layer=1, recover="none")(model)


def test_kept_indices_come_from_the_session_that_runs_the_model():
    """kept_indices() reads the session behind run() (the saved graph's optimizations), so the
    indices are those behind the outputs returned: at the encoder output the reduced token
    output is the unpruned one gathered at them."""
    c = case("hf_vit")
    model = prunec.load(onnx_file("hf_vit", "dynamo18"))
    out = prunec.passes.get("cls-attn")(keep=0.5)(model)
    got = out.run(c.inputs)
    sess = out._cpu_session()
    idx = out.kept_indices(c.inputs)["cls_attn_out"]
    assert out._cpu_session() is sess
    assert len(got) == len(out.model.graph.outputs)  # the exposed indices are not among run()'s outputs
    full = model.run(c.inputs)[0]
    np.testing.assert_array_equal(got[0], np.take_along_axis(full, idx[:, :, None], axis=1))
