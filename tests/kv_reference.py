"""Plain-PyTorch references for generation with a KV cache on an unmodified HF decoder
(tiny Llama / Qwen2), one sample at a time, no padding.

FastV (pkunlp-icler/FastV) with a cache: the prompt's N tokens run layers 0..K-1 in full;
layer K-1's attention probabilities, averaged over heads, row of the last prompt token
(the query), rank the span's tokens; the top round(keep·span) of them plus everything
outside the span go on through layers K.. at their original rotary positions, so layers
< K cache N tokens and layers >= K cache only the kept ones. Greedy decoding follows; every
new token takes the next original position (N, N+1, ...) and attends over each layer's own
cache.

The layers are driven one by one with the model's own modules (embed_tokens, rotary_emb,
layers[i], norm, lm_head) on an eager-attention deepcopy; transformers 5.24's decoder layer
takes ``cache=`` (``past_key_values=`` is a deprecated alias), returns a bare tensor and has
no ``cache_position``; its attention module returns (output, probabilities), read by a hook.
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def _eager(model):
    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    return m


def _causal(n: int, dtype) -> torch.Tensor:
    """Additive mask [1, 1, n, n]: 0 on and below the diagonal, dtype-min above."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _run_layers(m, x, pos, cache, layers, mask):
    """x [1, S, H] at original positions pos [S] through ``layers``; each appends its k/v to ``cache``."""
    cos_sin = m.model.rotary_emb(x, pos[None])
    for i in layers:
        x = m.model.layers[i](x, attention_mask=mask(i), position_ids=pos[None], cache=cache, use_cache=True,
                              position_embeddings=cos_sin)
    return x


def _logits(m, x) -> torch.Tensor:
    """Last position's logits [V]."""
    return m.lm_head(m.model.norm(x[:, -1:]))[0, 0]


def fastv_select(probs: torch.Tensor, span: tuple[int, int] | None, keep: float) -> list[int]:
    """probs [heads, N, N] (layer K-1) -> kept prompt positions, sorted."""
    n = probs.shape[-1]
    start, end = span if span is not None else (1, n - 1)
    assert 0 <= start <= end <= n, (span, n)
    end = min(end, n - 1)  # the query (last token) is always kept
    scores = probs.mean(0)[n - 1].tolist()
    k = min(max(1, round(keep * (end - start))), end - start)
    top = sorted(range(start, end), key=lambda j: (-scores[j], j))[:k]
    return sorted([*range(start), *top, *range(end, n)])


@torch.no_grad()
def fastv_trace(model, ids: list[int], *, layer: int, keep: float, span: tuple[int, int] | None,
                max_new_tokens: int, embeds: torch.Tensor | None = None) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """fastv_generate_reference, plus the logits [V] behind each generated token. ``embeds``
    [1, N, H]: the prompt's input embeddings (a VLM's, image features at its image tokens)."""
    m = _eager(model)
    n_layers = m.config.num_hidden_layers
    assert 1 <= layer <= n_layers and max_new_tokens >= 1 and len(ids) >= 1
    n, dtype = len(ids), m.dtype
    probs = {}
    hook = m.model.layers[layer - 1].self_attn.register_forward_hook(lambda mod, a, out: probs.update(p=out[1]))
    cache = DynamicCache(config=m.config)
    x = m.model.embed_tokens(torch.tensor([ids])) if embeds is None else embeds
    x = _run_layers(m, x, torch.arange(n), cache, range(layer), lambda i: _causal(n, dtype))
    hook.remove()
    kept = fastv_select(probs["p"][0], span, keep)
    x = _run_layers(m, x[:, kept], torch.tensor(kept), cache, range(layer, n_layers),
                    lambda i: _causal(len(kept), dtype))
    logits = [_logits(m, x)]
    tokens = [int(logits[-1].argmax())]
    for step in range(max_new_tokens - 1):
        x = m.model.embed_tokens(torch.tensor([tokens[-1:]]))
        # one query over each layer's own cache (N or len(kept) entries) plus itself: nothing masked
        x = _run_layers(m, x, torch.tensor([n + step]), cache, range(n_layers),
                        lambda i: torch.zeros(1, 1, 1, cache.get_seq_length(i) + 1, dtype=dtype))
        logits.append(_logits(m, x))
        tokens.append(int(logits[-1].argmax()))
    return tokens, kept, logits


def fastv_generate_reference(model, ids: list[int], *, layer: int, keep: float, span: tuple[int, int] | None,
                             max_new_tokens: int) -> tuple[list[int], list[int]]:
    """FastV prefill over prompt ``ids`` (N tokens), then greedy decoding with the pruned cache.

    layer: K, pruning before layer K by layer K-1's attention (1 <= K <= num_layers);
    span: [start, end) of prunable prompt positions, None -> (1, N-1); the last token is never pruned.
    Returns (generated ids [max_new_tokens], kept prompt positions [M], sorted).
    """
    tokens, kept, _ = fastv_trace(model, ids, layer=layer, keep=keep, span=span, max_new_tokens=max_new_tokens)
    return tokens, kept


@torch.no_grad()
def greedy_trace(model, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """greedy_reference plus each step's logits [V]."""
    cache, tokens, logits, inp = DynamicCache(config=model.config), [], [], torch.tensor([ids])
    for _ in range(max_new_tokens):
        out = model(input_ids=inp, cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
        inp = torch.tensor([tokens[-1:]])
    return tokens, logits


def greedy_reference(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Unpruned greedy decoding with the plain HF model and its cache (no eos handling): [max_new_tokens] ids."""
    return greedy_trace(model, ids, max_new_tokens)[0]


if __name__ == "__main__":
    from kv_models import tiny_llama, tiny_qwen2

    torch.manual_seed(1)
    prompts = [torch.randint(3, 100, (n,)).tolist() for n in (12, 21)]
    new = 8
    for name, make in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for ids in prompts:
            n = len(ids)
            want, want_logits = greedy_trace(model, ids, new)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert gen[0, n:].tolist() == want, (gen, want)
            for layer in (1, 2, 3):
                for span in (None, (2, n - 3), (1, n)):
                    got, kept, logits = fastv_trace(model, ids, layer=layer, keep=1.0, span=span, max_new_tokens=new)
                    d = max(float((a - b).abs().max()) for a, b in zip(logits, want_logits))
                    assert got == want and kept == list(range(n)) and d < 1e-4, (name, layer, span, d)
            print(f"{name} N={n}: keep=1 == greedy {want} (layers 1-3, 3 spans), max|dlogits| {d:.1e}")
            for layer, span in ((2, None), (1, (2, n - 3)), (2, (1, n))):
                got, kept, logits = fastv_trace(model, ids, layer=layer, keep=0.5, span=span, max_new_tokens=new)
                start, end = span or (1, n - 1)
                end = min(end, n - 1)
                assert len(kept) == n - (end - start) + round(0.5 * (end - start)) and n - 1 in kept, kept
                assert kept != list(range(n))
                d = max(float((a - b).abs().max()) for a, b in zip(logits, want_logits))
                assert d > 1e-3, d
                print(f"  keep=0.5 K={layer} span={span}: kept {len(kept)}/{n} {kept} -> {got}, max|dlogits| {d:.2f}")
            # pruning after the last layer changes nothing but the reported positions
            got, kept, logits = fastv_trace(model, ids, layer=3, keep=0.5, span=None, max_new_tokens=new)
            assert got == want and len(kept) < n
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert model.config._attn_implementation != "eager"
    print("ok")


@torch.no_grad()
def llava_generate_reference(model, pixel_values: torch.Tensor, ids: list[int], *, vision_keep: float,
                             vision_score_layer: int, layer: int, keep: float, max_new_tokens: int) -> list[int]:
    """One sample through the unmodified HF LLaVA: FasterVLM on the vision side ([CLS] attention of
    tower layer ``vision_score_layer``, averaged over heads, keeps the top round(vision_keep · n)
    patches' features, in order), then FastV with a cache on the language model over the image
    tokens (``ids`` holds one image token per kept feature). pixel_values [1, 3, H, W]."""
    import transformers

    tower = copy.deepcopy(model.model.vision_tower).eval()
    tower.set_attn_implementation("eager")
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    patches = out.hidden_states[-2][:, 1:]  # [1, n, D]: LLaVA's features, CLS dropped
    n = patches.shape[1]
    if vision_keep < 1.0:
        scores = out.attentions[vision_score_layer][0, :, 0, 1:].mean(0).tolist()
        k = max(1, round(vision_keep * n))
        kept = sorted(sorted(range(n), key=lambda j: (-scores[j], j))[:k])
        patches = patches[:, kept]
    features = model.model.multi_modal_projector(patches)[0]  # [k, C]
    image = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    assert len(image) == features.shape[0] and image == list(range(image[0], image[0] + len(image)))
    embeds = model.model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeds[0, image] = features
    lm = transformers.LlamaForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    tokens, _, _ = fastv_trace(lm.eval(), ids, layer=layer, keep=keep, span=(image[0], image[-1] + 1),
                               max_new_tokens=max_new_tokens, embeds=embeds)
    return tokens
