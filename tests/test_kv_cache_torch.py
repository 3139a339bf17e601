"""Decoders with a KV cache on the torch path (issue 14): an HF causal LM exported by torch.export with a
dynamic batch, sequence and cache length (``prunec.examples.load_cached_decoder``), FastV on its prefill,
and ``prunec.generate`` on the rewritten GraphModule yields the token ids (and kept indices) of the
independent plain-PyTorch FastV-with-cache reference (tests/kv_reference.py) on the unmodified HF model,
one prompt at a time; keep=1 is the unpruned model's generation. The same contract as the ONNX tests
(tests/test_kv_cache.py): padding is never pruned, a chunked prefill keeps every token, token spans are
found per sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import prunec
from kv_models import IMAGE, left_pad, random_prompts, tiny_llama, tiny_qwen2, token_span_case
from kv_reference import assert_rows_keep_and_generate_as_alone, fastv_generate_reference, greedy_reference
from prunec.examples import load_cached_decoder

NEW = 8


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request):
    """(HF model, the prunec torch model of it with a KV cache)."""
    hf = tiny_llama() if request.param == "llama" else tiny_qwen2()
    return hf, load_cached_decoder(hf)


def _prefill(hf, ids, mask) -> tuple:
    """The decoder's inputs for a prefill of ``ids`` [B, S] (left-padded by ``mask``): empty caches."""
    layers, kv_heads = hf.config.num_hidden_layers, hf.config.num_key_value_heads
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return (ids, mask, positions, *[torch.zeros(len(ids), kv_heads, 0, head_dim) for _ in range(2 * layers)])


def _kept(model, hf, ids, mask) -> np.ndarray:
    return next(iter(model.kept_indices(*_prefill(hf, ids, mask)).values()))


def test_keep_one_generates_as_the_unpruned_model(decoder):
    hf, model = decoder
    ids = random_prompts([21])[0]
    want = greedy_reference(hf, ids, NEW)
    assert prunec.generate(model, [ids], max_new_tokens=NEW)[0, 21:].tolist() == want
    same = prunec.passes.FastV(keep=1.0, layer=2)(model)
    assert prunec.generate(same, [ids], max_new_tokens=NEW)[0, 21:].tolist() == want


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_prefill_then_decode_equals_the_reference(decoder, layer):
    hf, model = decoder
    ids = random_prompts([25], seed=layer)[0]
    pruned = prunec.passes.FastV(keep=0.5, layer=layer)(model)
    want, kept = fastv_generate_reference(hf, ids, layer=layer, keep=0.5, span=None, max_new_tokens=NEW)
    assert len(kept) < len(ids)
    assert prunec.generate(pruned, [ids], max_new_tokens=NEW)[0, 25:].tolist() == want
    assert _kept(pruned, hf, [ids], [[1] * 25])[0].tolist() == kept


def test_left_padded_batch_rows_equal_each_prompt_alone(decoder):
    """Prompts of 30, 22 and 17 tokens in one left-padded batch, the span counted from the end."""
    hf, model = decoder
    prompts = random_prompts([30, 22, 17], seed=7)
    pruned = prunec.passes.FastV(keep=0.5, layer=2, span="-14:-2")(model)
    ids, mask = left_pad(prompts)
    got = prunec.generate(pruned, ids, mask, max_new_tokens=NEW)
    for row, p in enumerate(prompts):
        n = len(p)
        want, _ = fastv_generate_reference(hf, p, layer=2, keep=0.5, span=(n - 14, n - 2), max_new_tokens=NEW)
        assert got[row, ids.shape[1]:].tolist() == want, f"row {row}"


def test_padding_is_never_pruned_and_the_later_caches_are_shorter(decoder):
    hf, model = decoder
    prompts = random_prompts([24, 12], seed=3)
    pruned = prunec.passes.FastV(keep=0.25, layer=2)(model)
    ids, mask = left_pad(prompts)
    kept = _kept(pruned, hf, ids, mask)
    assert set(range(12)) <= set(kept[1].tolist()) and kept.shape[1] < 24  # row 1's 12 padding positions
    with torch.no_grad():
        outs = pruned.run(*_prefill(hf, ids, mask))
    layers = hf.config.num_hidden_layers
    assert [outs[1 + 2 * i].shape[2] for i in range(layers)] == [24, 24] + [kept.shape[1]] * (layers - 2)


def test_a_prefill_after_cached_tokens_keeps_every_token(decoder):
    """Pruning happens in the first prefill only: a second chunk (past > 0) keeps all its tokens."""
    hf, model = decoder
    pruned = prunec.passes.FastV(keep=0.5, layer=2)(model)
    first, second = random_prompts([16, 9], seed=11)
    with torch.no_grad():
        cache = pruned.run(*_prefill(hf, [first], [[1] * 16]))[1:]
        assert cache[-1].shape[2] < 16
        step = (torch.tensor([second]), torch.ones(1, 25, dtype=torch.int64), torch.arange(16, 25)[None], *cache)
        out = pruned.run(*step)
    assert out[0].shape == (1, 9, 100) and out[-1].shape[2] == cache[-1].shape[2] + 9


def test_token_span_finds_each_samples_image(decoder):
    """``span=token:ID`` on the torch path: images at different offsets, texts of different lengths."""
    hf, model = decoder
    prompts = token_span_case()
    pruned = prunec.passes.FastV(keep=0.5, layer=2, span=f"token:{IMAGE}")(model)
    ids, mask = left_pad(prompts)
    got = prunec.generate(pruned, ids, mask, max_new_tokens=NEW)
    kept = _kept(pruned, hf, ids, mask)
    assert_rows_keep_and_generate_as_alone(hf, prompts, ids, got, kept, layer=2, keep=0.5, max_new_tokens=NEW,
                                           image=IMAGE)


def test_refusals(decoder):
    _, model = decoder
    with pytest.raises(prunec.PruneError, match="KV cache takes only"):
        prunec.passes.get("tome")(r=2)(model)
    with pytest.raises(prunec.PruneError, match="generate takes a decoder with a KV cache"):
        prunec.generate(object(), [[1, 2]], max_new_tokens=1)


def test_pt2_of_the_original_reloads_and_of_a_rewrite_is_refused(decoder, tmp_path):
    """The unmodified decoder saves as .pt2 with its Dims (a 1-token prefill runs after reloading:
    the exporter's input guards assume sizes >= 2); a rewritten one is refused in one line, the file
    not written."""
    hf, model = decoder
    back = prunec.load(model.save(tmp_path / "orig.pt2"))
    ids = random_prompts([1, 9], seed=6)
    want = prunec.generate(model, [ids[1]], max_new_tokens=3)
    assert (prunec.generate(back, [ids[1]], max_new_tokens=3) == want).all()
    assert prunec.generate(back, [ids[0]], max_new_tokens=2).shape == (1, 3)
    pruned = prunec.passes.FastV(keep=0.5, layer=2)(model)
    with pytest.raises(prunec.PruneError, match="not written as .pt2"):
        pruned.save(tmp_path / "pruned.pt2")
    assert not (tmp_path / "pruned.pt2").exists()
