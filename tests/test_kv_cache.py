"""Decoders with a KV cache (issue 14): FastV prunes the prefill, layers after the cut cache only the
kept tokens, decode steps run through the same written model, and ``prunec.generate`` yields the
token ids of an independent plain-PyTorch FastV-with-cache reference (tests/kv_reference.py) run on
the unmodified HF model, one prompt at a time; keep=1 is the unpruned model's generation."""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from kv_models import (IMAGE, export_cached_decoder, left_pad, random_prompts, tiny_llama, tiny_qwen2, token_span_case,
                       with_image)
from kv_reference import assert_rows_keep_and_generate_as_alone, fastv_generate_reference, greedy_reference

NEW = 8


@pytest.fixture(scope="module", params=["llama-opset18", "qwen2-opset18", "llama-opset23"])
def decoder(request, tmp_path_factory):
    """(HF model, its ONNX export with a KV cache, the loaded export). Opset 23: the ONNX
    Attention and RotaryEmbedding ops (per-token cos/sin caches)."""
    family, opset = request.param.split("-opset")
    model = tiny_llama() if family == "llama" else tiny_qwen2()
    path = export_cached_decoder(model, tmp_path_factory.mktemp("kv") / f"{request.param}.onnx", opset=int(opset))
    return model, path, prunec.load(path)


def _fastv(model, keep, **kw):
    return prunec.Pipeline([prunec.passes.FastV(keep=keep, **kw)])(model)


def test_the_export_and_the_reference_are_the_hf_model(decoder):
    """The fixtures themselves: the ONNX export with a cache runs a left-padded prefill and a decode
    step as torch does, and the reference's unpruned greedy decoding is HF ``generate``'s."""
    import torch

    from kv_models import _check

    hf, path, _ = decoder
    assert _check(hf, path) < 1e-4
    ids = random_prompts([13], seed=1)[0]
    want = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert greedy_reference(hf, ids, NEW) == want[0, len(ids):].tolist()


def test_keep_one_generates_as_the_unpruned_model(decoder):
    hf, path, model = decoder
    ids = random_prompts([21])[0]
    same = _fastv(model, 1.0, layer="2")
    want = greedy_reference(hf, ids, NEW)
    assert prunec.generate(path, [ids], max_new_tokens=NEW)[0, len(ids):].tolist() == want
    assert prunec.generate(same, [ids], max_new_tokens=NEW)[0, len(ids):].tolist() == want


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_prefill_then_decode_equals_the_reference(decoder, layer):
    hf, _, model = decoder
    ids = random_prompts([25], seed=layer)[0]
    pruned = _fastv(model, 0.5, layer=str(layer))
    want, kept = fastv_generate_reference(hf, ids, layer=layer, keep=0.5, span=None, max_new_tokens=NEW)
    assert len(kept) < len(ids)
    got = prunec.generate(pruned, [ids], max_new_tokens=NEW)
    assert got[0, len(ids):].tolist() == want
    feeds = _prefill_feeds(model, np.array([ids]), np.ones((1, len(ids)), np.int64))
    assert next(iter(pruned.kept_indices(feeds).values()))[0].tolist() == kept


def test_left_padded_batch_rows_equal_each_prompt_alone(decoder):
    """Prompts of 30, 22 and 17 tokens in one left-padded batch; the span counted from the end
    (``-14:-2``) picks the same tokens of each prompt padded or alone."""
    hf, _, model = decoder
    prompts = random_prompts([30, 22, 17], seed=7)
    pruned = _fastv(model, 0.5, layer="2", span="-14:-2")
    ids, mask = left_pad(prompts)
    got = prunec.generate(pruned, ids, mask, max_new_tokens=NEW)
    for row, p in enumerate(prompts):
        n = len(p)
        want, _ = fastv_generate_reference(hf, p, layer=2, keep=0.5, span=(n - 14, n - 2), max_new_tokens=NEW)
        assert got[row, ids.shape[1]:].tolist() == want, f"row {row}"


def test_padding_is_never_pruned(decoder):
    """With the default span (all but the first and last token) padding lies inside it: it is kept
    (a decode step must still find it masked), so the written cache holds every padding entry."""
    _, _, model = decoder
    prompts = random_prompts([24, 12], seed=3)
    pruned = _fastv(model, 0.25, layer="2")
    ids, mask = left_pad(prompts)
    kept = next(iter(pruned.kept_indices(_prefill_feeds(model, ids, mask)).values()))
    assert set(range(12)) <= set(kept[1].tolist())  # row 1's 12 padding positions
    assert len(kept[1]) < ids.shape[1]
    out = prunec.generate(pruned, ids, mask, max_new_tokens=3)
    assert out.shape == (2, ids.shape[1] + 3)


def test_a_prefill_after_cached_tokens_keeps_every_token(decoder):
    """Pruning happens in the first prefill only: a second chunk (past > 0) runs as in the original."""
    _, path, model = decoder
    pruned = _fastv(model, 0.5, layer="2")
    first, second = random_prompts([16, 9], seed=11)
    feeds = _prefill_feeds(model, np.array([first]), np.ones((1, 16), np.int64))
    original = prunec.load(path)
    presents = [o.name for o in original.model.graph.outputs if o.name.startswith("present")]
    cache_a = dict(zip(presents, original.run(feeds, presents)))
    cache_b = dict(zip(presents, pruned.run(feeds, presents)))
    assert cache_b[presents[-1]].shape[2] < 16 == cache_a[presents[-1]].shape[2]
    for cache, m in ((cache_a, original), (cache_b, pruned)):
        past = {p.replace("present", "past_key_values"): v for p, v in cache.items()}
        step = {"input_ids": np.array([second]), "attention_mask": np.ones((1, 25), np.int64),
                "position_ids": np.arange(16, 25)[None], **past}
        cache["logits"] = m.run(step, ["logits"])[0]
    assert cache_b["logits"].shape == cache_a["logits"].shape == (1, 9, 100)


def test_merges_are_refused_on_a_cached_decoder(decoder):
    _, path, model = decoder
    with pytest.raises(prunec.PruneError, match="KV cache takes only"):
        prunec.Pipeline([prunec.passes.get("tome")(r=2)])(model)


def test_generate_refuses_right_padding_and_a_model_without_cache(decoder, tmp_path):
    _, path, _ = decoder
    with pytest.raises(prunec.PruneError, match="left"):
        prunec.generate(path, [[5, 6, 7]], [[1, 1, 0]], max_new_tokens=2)
    with pytest.raises(prunec.PruneError, match="no such model file"):
        prunec.generate(tmp_path / "missing.onnx", [[5]], max_new_tokens=1)


def test_generate_stops_at_eos(decoder):
    _, path, _ = decoder
    for seed in range(20):  # a prompt whose greedy continuation produces a new token at some step j >= 1
        ids = random_prompts([10], seed=seed)[0]
        free = prunec.generate(path, [ids], max_new_tokens=6)[0, 10:]
        j = next((j for j in range(1, 6) if free[j] not in free[:j]), None)
        if j is not None:
            break
    out = prunec.generate(path, [ids], max_new_tokens=6, eos_token_id=int(free[j]))
    assert out[0, 10:].tolist() == free[:j + 1].tolist()


def _prefill_feeds(model, ids, mask):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    for v in model.model.graph.inputs:
        if v.name.startswith("past_key_values"):
            feeds[v.name] = np.zeros((ids.shape[0], v.shape[1], 0, v.shape[3]), np.float32)
    return feeds


def test_cli_generate_with_a_tokenizer_and_with_ids(decoder, tmp_path):
    """``prunec generate``: text through a tokenizer.json, or token ids; the rewritten model runs
    through the same command."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from prunec.cli import main

    hf, path, model = decoder
    vocab = {f"w{i}": i for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    pruned = tmp_path / "pruned.onnx"
    assert main([str(path), "--pass", "fastv", "--keep", "0.5", "-o", str(pruned)]) == 0
    prompt = random_prompts([20], seed=2)[0]
    text = " ".join(f"w{i}" for i in prompt)
    want, _ = fastv_generate_reference(hf, prompt, layer=2, keep=0.5, span=None, max_new_tokens=5)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", str(pruned), "--tokenizer", str(tmp_path), "--prompt", text,
                     "--max-new-tokens", "5"]) == 0
        assert main(["generate", str(pruned), "--ids", ",".join(map(str, prompt)), "--max-new-tokens", "5"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [f"w{i}" for i in want]
    assert lines[1] == ",".join(map(str, want))
    assert main(["generate", str(pruned), "--prompt", text]) == 2  # no tokenizer: one-line error


def test_token_span_finds_each_samples_image(decoder):
    """``span=token:ID``: samples with their 12 image tokens at different offsets and different text
    lengths, in one left-padded batch, each generate what the reference generates for that prompt
    alone with the span at its own image."""
    hf, _, model = decoder
    prompts = token_span_case()
    pruned = _fastv(model, 0.5, layer="2", span=f"token:{IMAGE}")
    ids, mask = left_pad(prompts)
    got = prunec.generate(pruned, ids, mask, max_new_tokens=NEW)
    kept = next(iter(pruned.kept_indices(_prefill_feeds(model, ids, mask)).values()))
    assert_rows_keep_and_generate_as_alone(hf, prompts, ids, got, kept, layer=2, keep=0.5, max_new_tokens=NEW,
                                           image=IMAGE)


def test_token_spans_of_different_lengths_keep_the_batch_largest_count(decoder):
    """Each sample keeps round(keep x its span) of its image tokens; the batch keeps the largest total,
    so a sample with a shorter image keeps more of it, and every text token stays."""
    _, _, model = decoder
    rng = np.random.default_rng(5)
    prompts = [with_image(rng, 2, 12, 6), with_image(rng, 2, 8, 10)]  # both 20 tokens
    pruned = _fastv(model, 0.5, layer="2", span=f"token:{IMAGE}")
    ids, mask = left_pad(prompts)
    kept = next(iter(pruned.kept_indices(_prefill_feeds(model, ids, mask)).values()))
    assert kept.shape == (2, 20 - 4)  # max(20 - 12 + 6, 20 - 8 + 4)
    for row in range(2):
        text = [i for i in range(20) if ids[row, i] != IMAGE]
        assert set(text) <= set(kept[row].tolist())
    assert sum(ids[0, i] == IMAGE for i in kept[0]) == 8 and sum(ids[1, i] == IMAGE for i in kept[1]) == 4
    assert prunec.generate(pruned, ids, mask, max_new_tokens=2).shape == (2, 22)


def test_token_span_refusals(decoder, tmp_path):
    _, _, model = decoder
    with pytest.raises(prunec.PruneError, match="token:ID with an integer"):
        _fastv(model, 0.5, span="token:image")


def test_fp16_cached_decoder(decoder, tmp_path):
    """ORT's fp16 converter on the cached decoder: keep=1 generates as the fp16 original, and the
    pruned prefill leaves the later layers' cache shorter (fp16 cache inputs and outputs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, path, _ = decoder
    half = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(path), keep_io_types=False), half)
    model = prunec.load(half)
    ids, mask = left_pad(random_prompts([26, 15], seed=9))
    want = prunec.generate(half, ids, mask, max_new_tokens=5)
    assert (prunec.generate(_fastv(model, 1.0), ids, mask, max_new_tokens=5) == want).all()
    pruned = _fastv(model, 0.5, span="-12:-2")
    assert prunec.generate(pruned, ids, mask, max_new_tokens=5).shape == want.shape
    feeds = {k: (v.astype(np.float16) if v.dtype == np.float32 else v)
             for k, v in _prefill_feeds(model, ids, mask).items()}
    last = [o.name for o in model.model.graph.outputs if o.name.startswith("present")][-1]
    assert pruned.run(feeds, [last])[0].shape[2] == ids.shape[1] - 5  # 10 span tokens -> 5 kept
