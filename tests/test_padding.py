"""Padded batches on a dynamic sequence (issue 11): a ranked selection (fastv, cls-attn, random),
DivPrune, Zero-TPrune, EViT and ToMe count per row (ToMe matches a row's real tokens as that text
alone and never merges its padding). Each row keeps k of its real span tokens by the rule on its own real span length, never a
padding token over a real one; the batch keeps the largest count and a row with fewer fills up
with its padding (masked: inert). So each row keeps the tokens, and gives the outputs, of its text
run alone without padding. BERT exported with a dynamic batch and sequence by the TorchScript and
dynamo exporters (and the torch path, which counts as the ONNX rewrite does); the texts are right-padded
(30, 21 and 9 tokens of 30)."""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from test_dynamic import exported

LENGTHS = (30, 21, 9)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n], mask[row, :n] = rng.integers(1, 100, n), 1
    return ids, mask


def _kept(model, ids, mask):
    """The input positions [B, M] of the output tokens, through every cut (in order)."""
    steps = iter(model.kept_indices({"input_ids": ids, "attention_mask": mask}).values())
    kept = next(steps)
    for idx in steps:
        kept = np.take_along_axis(kept, idx, 1)
    return kept


@pytest.mark.parametrize("exporter", ["torchscript17", "dynamo18"])
@pytest.mark.parametrize("spec", ["fastv:keep=0.5", "fastv:keep=0.3,query=cls", "cls-attn:keep=0.5,cls=0,span=1:",
                                  "random:keep=0.4", "fastv:count=6,span=1:", "divprune:keep=0.5,layer=2",
                                  "divprune:count=5,layer=1", "zero-tprune:keep=0.5",
                                  "zero-tprune:keep=0.4,cls=none,similar=1.0,iters=5",
                                  "evit:keep=0.5,layers=1,prefix=1", "evit:keep=0.6,layers=0/2,prefix=1,fuse=false",
                                  "tome:r=4,prefix=1", "tome:r=2", "tome:r=3,prefix=2"])
def test_each_padded_row_keeps_and_gives_what_its_text_alone_does(exporter, spec):
    from prunec.cli import parse_pass_spec

    name, opts = parse_pass_spec(spec)
    model = prunec.passes.get(name)(**opts)(prunec.load(exported("bert", exporter)))
    ids, mask = _batch()
    out = model.run({"input_ids": ids, "attention_mask": mask})[0]
    kept = _kept(model, ids, mask)
    for row, n in enumerate(LENGTHS):
        alone = {"input_ids": ids[row:row + 1, :n], "attention_mask": mask[row:row + 1, :n]}
        want_idx = _kept(model, alone["input_ids"], alone["attention_mask"])[0].tolist()
        real = [i for i in kept[row].tolist() if i < n]
        assert real == want_idx, f"row {row}"
        assert kept[row].tolist()[:len(real)] == real  # padding only after every kept real token
        want = model.run(alone)[0][0]
        np.testing.assert_allclose(out[row, :len(real)], want, rtol=1e-5, atol=1e-5, err_msg=f"row {row}")


def test_counts_follow_each_rows_real_length():
    """FastV keep 0.5 (mean query; span 1: on BERT without a pooler, the first token is kept): row of
    n real tokens keeps 1 + round(0.5 (n - 1)) real ones; the batch keeps the largest count."""
    model = prunec.passes.FastV(keep=0.5, span="1:")(prunec.load(exported("bert", "dynamo18")))
    ids, mask = _batch(seed=3)
    kept = _kept(model, ids, mask)
    real = [sum(i < n for i in kept[row].tolist()) for row, n in enumerate(LENGTHS)]
    assert real == [1 + round(0.5 * (n - 1)) for n in LENGTHS]
    assert kept.shape[1] == max(real)


def test_a_batch_without_padding_is_unchanged():
    model = prunec.passes.FastV(keep=0.5)(prunec.load(exported("bert", "dynamo18")))
    ids, _ = _batch(seed=1)
    full = np.ones_like(ids)
    kept = _kept(model, ids, full)
    n = ids.shape[1]
    assert kept.shape == (3, round(0.5 * n))


@pytest.mark.parametrize("spec", ["fastv:keep=0.5", "fastv:keep=0.3,query=cls", "cls-attn:keep=0.5,cls=0,span=1:",
                                  "random:keep=0.4", "divprune:keep=0.5,layer=2", "random:keep=0.6,layer=1/2",
                                  "zero-tprune:keep=0.4,similar=1.0,iters=5", "evit:keep=0.6,layers=0/2,prefix=1",
                                  "tome:r=4,prefix=1", "tome:r=3,prefix=2"])
def test_the_torch_path_counts_per_row_as_onnx(spec):
    """The same BERT loaded on the torch path with a dynamic batch and sequence: the padded batch
    keeps, row by row, the ONNX rewrite's tokens (themselves each text's alone) with its outputs."""
    import torch

    from prunec.cli import parse_pass_spec
    from test_dynamic_torch import loaded

    name, opts = parse_pass_spec(spec)
    torch_model = prunec.passes.get(name)(**opts)(loaded("bert"))
    onnx_model = prunec.passes.get(name)(**opts)(prunec.load(exported("bert", "torchscript17")))
    ids, mask = _batch(seed=2)
    feeds = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    kept_torch, kept_onnx = torch_model.kept_indices(**feeds), onnx_model.kept_indices({"input_ids": ids,
                                                                                       "attention_mask": mask})
    assert kept_torch.keys() == kept_onnx.keys()
    for tag in kept_torch:  # a second cut reads the mask at the tokens the first kept
        np.testing.assert_array_equal(kept_torch[tag], kept_onnx[tag])
    assert next(iter(kept_torch.values())).shape[1] < ids.shape[1]
    np.testing.assert_allclose(torch_model.run(**feeds).numpy(), onnx_model.run({"input_ids": ids, "attention_mask": mask})[0],
                               rtol=1e-4, atol=1e-4)


def _mixed_slots(maps: dict, reps: dict, mask) -> int:
    """Slots (over every ToMe cut, composed) whose sources are padding and real tokens together."""
    pad, mixed = mask == 0, 0
    for tag in maps:
        dest, rep = maps[tag], reps[tag]
        for row in range(dest.shape[0]):
            mixed += sum(len(set(pad[row][dest[row] == slot].tolist())) > 1 for slot in range(rep.shape[1]))
        pad = np.take_along_axis(pad, rep, 1)
    return mixed


@pytest.mark.parametrize("spec", ["tome:r=4,prefix=1", "ppt:r=3,layers=0/1,prefix=1,threshold=1.0",
                                  "visionzip:dominant=6,contextual=3,prefix=1,layer=2"])
def test_merges_never_merge_padding_into_a_real_token(spec):
    """ToMe r=4 at every layer, PPT's ToMe pooling and VisionZip's contextual joins on a padded BERT
    batch: no slot holds padding and real tokens together (ToMe and PPT's pooling never merge
    padding; VisionZip's padding and real tokens score below any cosine), on ONNX from both
    exporters and on the torch path, with the same slots; the unpadded row equals its text alone."""
    import torch

    from prunec.cli import parse_pass_spec
    from test_dynamic_torch import loaded

    name, opts = parse_pass_spec(spec)
    ids, mask = _batch(seed=2)
    feeds = {"input_ids": ids, "attention_mask": mask}
    models = [prunec.passes.get(name)(**opts)(prunec.load(exported("bert", e))) for e in ("torchscript17", "dynamo18")]
    torch_model = prunec.passes.get(name)(**opts)(loaded("bert"))
    tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    for maps, reps in [(m.merge_maps(feeds), m.kept_indices(feeds)) for m in models] + [
            (torch_model.merge_maps(**tfeeds), torch_model.kept_indices(**tfeeds))]:
        assert maps and _mixed_slots(maps, reps, mask) == 0
        for tag in maps:
            np.testing.assert_array_equal(maps[tag], models[0].merge_maps(feeds)[tag])
    out = models[0].run(feeds)[0]
    alone = models[0].run({"input_ids": ids[:1], "attention_mask": mask[:1]})[0]
    np.testing.assert_allclose(out[:1], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(torch_model.run(**tfeeds).numpy(), out, rtol=1e-4, atol=1e-4)


def test_padded_example_inputs_on_the_torch_path_are_validated_without_their_padding():
    """Example inputs whose every row is padded (a tokenizer's padding="max_length") load and rewrite:
    the keep=1 comparison of validation runs without padding (with it, keep=1 would still drop the
    trailing padding no row needs, so it could not equal the module)."""
    import torch

    from test_dynamic import inputs, model
    from test_dynamic_torch import _dims, _Named

    m, names, field = model("bert")
    example = inputs("bert", *_batch()[0].shape)
    example["attention_mask"] = torch.from_numpy(_batch()[1][:, :example["input_ids"].shape[1]])
    example["attention_mask"][:, -1] = 0  # every row ends in padding
    batch, seq = _dims()
    base = prunec.load(_Named(m, field).eval(), example, dynamic_shapes={k: {0: batch, 1: seq} for k in names})
    for spec in (prunec.passes.FastV(keep="0.5"), prunec.passes.EViT(keep="0.5", layers="1", prefix=1)):
        out = spec(base).run(**example)
        assert out.shape[1] < example["input_ids"].shape[1]
