"""Tiny random-weight HF decoders (Llama, Qwen2; GQA) and their ONNX export with a KV cache
in the Optimum layout (the exporter is prunec.examples.export_cached_decoder):

inputs   input_ids [B,S] int64, attention_mask [B,past+S] int64, position_ids [B,S] int64,
         past_key_values.{i}.key / .value [B, kv_heads, past, head_dim] float32 (past may be 0)
outputs  logits [B,S,V], present.{i}.key / .value [B, kv_heads, past+S, head_dim]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prunec.examples import cache_io_names, export_cached_decoder  # noqa: F401  (the tests' exporter)

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Like tiny_llama; Qwen2 has q/k/v biases."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def io_names(config) -> tuple[list[str], list[str]]:
    return cache_io_names(config.num_hidden_layers)


IMAGE = 99  # the image placeholder id of the token-span tests (the tiny decoders' vocabulary is 100)


def random_prompts(lengths, seed=0) -> list[list[int]]:
    """Prompts of the given lengths, ids in 1..99."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, n).tolist() for n in lengths]


def with_image(rng, before, image, after) -> list[int]:
    """``before`` text ids, ``image`` IMAGE tokens, ``after`` text ids."""
    return rng.integers(1, IMAGE, before).tolist() + [IMAGE] * image + rng.integers(1, IMAGE, after).tolist()


def token_span_case(seed=4) -> list[list[int]]:
    """Three prompts with their 12 image tokens at different offsets and texts of different lengths."""
    rng = np.random.default_rng(seed)
    return [with_image(rng, 3, 12, 10), with_image(rng, 9, 12, 2), with_image(rng, 1, 12, 17)]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads to the longest prompt: (input_ids [B,S] int64, attention_mask [B,S] int64)."""
    S = max(len(p) for p in prompts)
    ids = np.full((len(prompts), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), S), dtype=np.int64)
    for row, p in enumerate(prompts):
        if p:
            ids[row, S - len(p):], mask[row, S - len(p):] = p, 1
    return ids, mask


def _check(model, path) -> float:
    """One left-padded prefill + one decode step: ONNX (onnxruntime CPU) vs torch with cache; max |Δlogits|."""
    import onnxruntime as ort

    layers, kv_heads, head_dim = kv_shape(model.config)
    inputs, _ = io_names(model.config)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = left_pad([[5, 17, 3, 42, 8, 9], [11, 2, 60]])
    pos = np.where(mask == 1, mask.cumsum(1) - 1, 1).astype(np.int64)
    past = [np.zeros((2, kv_heads, 0, head_dim), np.float32) for _ in range(2 * layers)]
    cache, worst = None, 0.0
    for step in range(2):
        feed = dict(zip(inputs, [ids, mask, pos, *past]))
        logits, *past = sess.run(None, feed)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos), cache=cache, use_cache=True)
        cache = out.cache
        # pad positions (fully masked query rows) are arbitrary from layer 1 on: compare real tokens only
        worst = max(worst, float(np.abs(logits - out.logits.numpy())[mask[:, -ids.shape[1]:] == 1].max()))
        ref_present = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
        worst_kv = max(float(np.abs(a - b).transpose(0, 2, 1, 3)[mask == 1].max()) for a, b in zip(past, ref_present))
        worst = max(worst, worst_kv)
        print(f"  step {step}: logits {tuple(logits.shape)} present {past[0].shape}: max|d| so far {worst:.2e} "
              f"(present {worst_kv:.2e})")
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return worst


if __name__ == "__main__":
    import onnx

    out = Path("/tmp/kvref")
    out.mkdir(exist_ok=True)
    print("left_pad:", *left_pad([[1, 2, 3], [4]], pad_id=9))
    for name, make in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        model = make()
        path = export_cached_decoder(model, out / f"{name}_kv.onnx")
        graph = onnx.load(str(path)).graph
        print(name, path, "inputs", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                                     for i in graph.input[:4]])
        d = _check(model, path)
        assert d < 1e-4, d
    print("ok")


# the LLaVA-style VLM (tiny_llava, export_llava) lives in prunec.examples: the README's runnable example uses it
from prunec.examples import IMAGE_ID, export_llava, tiny_llava  # noqa: E402,F401
