"""A token count written as a number: ``x.sum(1) / x.shape[1]`` exports as a division by the
constant N (torch.export, the dynamo exporter; TorchScript computes it from the shape). After a
cut the division must be by the new count: every form against the reference, which runs the
same pooling on the reduced tokens."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import prunec
from conftest import export_dir, torch_outputs
from fastv_reference import fastv_reference
from tiny_models import tiny, tiny_inputs

FORMS = ("torch", "dynamo18", "torchscript17")


def _load(module, inputs, form):
    if form == "torch":
        return prunec.load(module, inputs)
    path = export_dir() / f"tiny_{module.pool}.{form}.onnx"
    names = list(inputs)
    args = tuple(inputs[n] for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "torchscript17":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names})
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, external_data=False,
                              input_names=names, dynamic_shapes=tuple({0: batch} for _ in names), verbose=False)
    return prunec.load(path)


def _run(model, inputs):
    if model.kind == "torch":
        return torch_outputs(model.run(**inputs))[0]
    return model.run({k: v.numpy() for k, v in inputs.items()})[0]


@pytest.mark.parametrize("form,pool", [(f, "sum_div") for f in FORMS] + [("torchscript17", "sum_div_early")])
def test_sum_over_count_divides_by_the_kept_count(form, pool):
    """``sum_div_early`` reads the count off the input, before the blocks: TorchScript computes
    it there (Shape -> Gather -> Cast) and it stays N, as in the reference (the model's own
    code run on the reduced tokens divides by the input's count)."""
    m = tiny("sdpa", pool=pool)
    inputs = tiny_inputs()
    model = _load(m, inputs, form)
    pruned = prunec.passes.FastV(keep=0.5, layer=2)(model)
    ref_out, ref_idx = fastv_reference(m, inputs, keep=0.5, layer=2, query="mean")
    kept = pruned.kept_indices(**inputs) if form == "torch" else pruned.kept_indices(
        {k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(kept["fastv_l2"], ref_idx.numpy())
    np.testing.assert_allclose(_run(pruned, inputs), torch_outputs(ref_out)[0], rtol=1e-4, atol=1e-5)
    # the identity still holds at keep=1
    same = prunec.passes.FastV(keep=1.0, layer=2)(model)
    np.testing.assert_allclose(_run(same, inputs), torch_outputs(m(**inputs))[0], rtol=1e-5, atol=1e-6)


def test_a_count_used_otherwise_is_refused():
    class SubCount(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny("sdpa", pool="none")

        def forward(self, x):
            t = self.inner(x)
            return t.sum(1) - t.shape[1]

    inputs = tiny_inputs()
    with pytest.raises(prunec.PruneError, match="the token count 12"):
        prunec.passes.FastV(keep=0.5, layer=2)(prunec.load(SubCount().eval(), inputs))


def test_size_weighted_sum_keeps_counting_every_token():
    """After a size-tracking merge the token sum is weighted by size (it sums the N original
    tokens), so its division by N stays: the same result as the pass on x.mean(1)."""
    inputs = tiny_inputs()
    outs = [_run(prunec.passes.ToMe(r="4/0/0")(prunec.load(tiny("sdpa", pool=pool), inputs)), inputs)
            for pool in ("sum_div", "mean")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert np.abs(outs[1] - torch_outputs(tiny("sdpa", pool="mean")(**inputs))[0]).max() > 1e-4  # it merged


def _vit_sum_over_patches(reg=2):
    """A timm ViT (CLS + ``reg`` registers) pooled as ``x[:, P:].sum(1) / (x.shape[1] - P)``: the
    count of the tokens after the prefix exports as the number N - P."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
                          reg_tokens=reg, no_embed_class=reg > 0, global_pool="avg", fc_norm=False,
                          num_classes=10).eval()
    p = m.num_prefix_tokens
    m.pool = lambda x, pool_type=None: x[:, p:].sum(1) / (x.shape[1] - p)
    return m


@pytest.mark.parametrize("form", ["torch", "dynamo18"])
def test_sum_over_the_tokens_after_the_prefix_divides_by_their_kept_count(form):
    m = _vit_sum_over_patches()
    p = m.num_prefix_tokens
    inputs = {"x": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    if form == "torch":
        model = prunec.load(m, inputs)
    else:
        path = export_dir() / "vit_sum_div_tail.dynamo18.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (inputs["x"],), str(path), dynamo=True, opset_version=18, external_data=False,
                              input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                              verbose=False)
        model = prunec.load(path)
    pruned = prunec.passes.FastV(keep=0.25, layer=2)(model)
    ref_out, ref_idx = fastv_reference(m, inputs, keep=0.25, layer=2, query="cls", prefix=p)
    kept = pruned.kept_indices(**inputs) if form == "torch" else pruned.kept_indices({"x": inputs["x"].numpy()})
    np.testing.assert_array_equal(kept["fastv_l2"], ref_idx.numpy())
    np.testing.assert_allclose(_run(pruned, inputs), torch_outputs(ref_out)[0], rtol=1e-4, atol=1e-5)


def test_sum_past_the_kept_prefix_divided_by_its_count_is_refused():
    """x[:, 5:] holds other tokens after a cut that keeps only the first 3 in place: refused."""
    m = _vit_sum_over_patches()
    m.pool = lambda x, pool_type=None: x[:, 5:].sum(1) / (x.shape[1] - 5)
    inputs = {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    with pytest.raises(prunec.PruneError, match="from index 5 on by its count 14"):
        prunec.passes.FastV(keep=0.25, layer=2)(prunec.load(m, inputs))


def test_size_weighted_sum_over_a_count_read_after_the_merge_is_refused():
    """TorchScript reads ``x.shape[1]`` off the merged tokens (Shape -> Gather): the size-weighted
    sum stands for N tokens, the count would be M. Refused naming the division; a count read off
    the input before the blocks stays N and is right (the same result as x.mean(1))."""
    inputs = tiny_inputs()
    with pytest.raises(prunec.PruneError, match="divides the token sum .* by a count read off the tokens' shape"):
        prunec.passes.ToMe(r="4/0/0")(_load(tiny("sdpa", pool="sum_div"), inputs, "torchscript17"))
    early = _run(prunec.passes.ToMe(r="4/0/0")(_load(tiny("sdpa", pool="sum_div_early"), inputs, "torchscript17")),
                 inputs)
    mean = _run(prunec.passes.ToMe(r="4/0/0")(prunec.load(tiny("sdpa", pool="mean"), inputs)), inputs)
    np.testing.assert_allclose(early, mean, rtol=1e-4, atol=1e-5)
