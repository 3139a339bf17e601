"""aten's private ``_scaled_dot_product_*`` variants (what decomposed or hand-written torch
graphs hold): the fx parser reads mask / is_causal / scale by the op's schema, and passes
prune through them as through the public op."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import prunec
from conftest import torch_outputs
from fastv_reference import fastv_reference
from prunec.ir.from_fx import from_fx
from tiny_models import ATTN, tiny, tiny_inputs


@pytest.mark.parametrize("attn", [a for a in ATTN if a != "sdpa"])
def test_variant_is_parsed_by_its_schema(attn):
    """Each variant called with a mask (where it takes one), is_causal=True and scale=0.3; traced
    with fake tensors, so variants without a CPU kernel are parsed too."""
    m = tiny(attn, causal=True, scale=0.3)
    ep = torch.export.export(m, (), tiny_inputs(mask=True), strict=False)
    g = from_fx(ep.module())
    sdpa = [n for n in g.nodes if n.op == "sdpa"]
    assert len(sdpa) == 3
    for node in sdpa:
        assert node.attrs["is_causal"] is True
        assert node.attrs["scale"] == pytest.approx(0.3)
        if attn == "flash":  # takes no mask at all
            assert node.attrs["takes_mask"] is False and node.attrs.get("mask") is None
        else:
            assert node.attrs["mask"].shape == (2, 1, 1, 12)
        assert node.attrs["result"].shape == (2, 4, 12, 8)  # item 0 of the op's tuple


@pytest.mark.parametrize("causal", [False, True])
def test_flash_for_cpu_fastv_matches_reference(causal):
    """End to end on the variant that runs on CPU: keyword mask (encoder) or is_causal (decoder)."""
    m = tiny("flash_cpu", causal=causal, pool="mean")
    inputs = tiny_inputs(mask=not causal)
    model = prunec.load(m, inputs)
    site = model.facts().sites[0]
    assert site.causal is causal and (site.mask is None) is causal and site.scale == pytest.approx(0.3)
    pruned = prunec.passes.FastV(keep=0.5, layer=2)(model)
    ref_out, ref_idx = fastv_reference(m, inputs, keep=0.5, layer=2, query="last" if causal else "mean",
                                       causal=causal)
    np.testing.assert_array_equal(pruned.kept_indices(**inputs)["fastv_l2"], ref_idx.numpy())
    np.testing.assert_allclose(torch_outputs(pruned.run(**inputs))[0], torch_outputs(ref_out)[0],
                               rtol=1e-4, atol=1e-5)


def test_flash_for_cpu_takes_the_size_bias_as_the_public_op():
    """ToMe's proportional attention goes into the variant's keyword mask: the same result as
    ToMe on the same weights spelled with the public op."""
    inputs = tiny_inputs(mask=True)
    outs = []
    for attn in ("flash_cpu", "sdpa"):
        m = tiny(attn, pool="mean")
        outs.append(torch_outputs(prunec.passes.ToMe(r="3")(prunec.load(m, inputs)).run(**inputs))[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    unmerged = torch_outputs(tiny("sdpa", pool="mean")(**inputs))[0]
    assert np.abs(outs[1] - unmerged).max() > 1e-4  # the merge did change the result
