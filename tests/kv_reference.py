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


# -- LLaVA: a vision-side reduction at the tower's select layer, then FastV with a cache ----------
#
# A vision-side method is a callable (hidden, attentions, keys) -> patches, one image at a time:
#   hidden      [1+n, D]  the tower's hidden states at LLaVA's select layer (-2), CLS first;
#   attentions  per tower layer, [heads, 1+n, 1+n] probabilities (eager attention);
#   keys        per tower layer, [1+n, D] the output of its ``self_attn.k_proj`` (a forward hook);
#   patches     [m, D]    what goes to the projector: the reduced tokens with CLS dropped.
# hidden_states[-2] is the output of layer -2, so attentions[-2] / keys[-2] are that same layer's.


def no_vision_reduction(hidden, attentions, keys):
    """LLaVA's own features: every patch, CLS dropped. [1+n, D] -> [n, D]."""
    return hidden[1:]


def cls_attn_vision(keep: float, score_layer: int):
    """FasterVLM: the top round(keep·n) patches (ties to the lower index) by the [CLS] row of
    layer ``score_layer``'s attention, averaged over heads, in original order. -> [k, D]."""
    def vision(hidden, attentions, keys):
        patches = hidden[1:]
        n = patches.shape[0]
        scores = attentions[score_layer][:, 0, 1:].mean(0).tolist()
        k = max(1, round(keep * n))
        return patches[sorted(sorted(range(n), key=lambda j: (-scores[j], j))[:k])]
    return vision


def visionzip_vision(dominant: int, contextual: int, score_layer: int = -2):
    """VisionZip (dvlab-research/VisionZip) on the 1+n select-layer tokens, CLS included, with
    layer ``score_layer``'s attention and keys (the official code: -2, the layer whose output is taken):
    dominant = CLS + the top (dominant - 1) patches by the CLS row summed over heads, original order;
    the R other tokens (original order) give ``contextual`` targets at stride max(1, R // contextual);
    every other joins the target whose head-averaged key is most cosine-similar; a contextual token
    is target + mean(joined). [dominant, contextual] with CLS dropped -> [dominant - 1 + contextual, D]."""
    def vision(hidden, attentions, keys):
        probs = attentions[score_layer]
        n1, heads = hidden.shape[0], probs.shape[0]
        top = probs[:, 0, 1:].sum(0).topk(dominant - 1).indices + 1
        dom = [0, *sorted(top.tolist())]
        rest = [t for t in range(n1) if t not in dom]
        metric = keys[score_layer].reshape(n1, heads, -1).mean(1)  # [1+n, D/heads]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        targets = rest[::max(1, len(rest) // contextual)][:contextual] if contextual else []
        joined = {t: [] for t in targets}
        for o in (t for t in rest if t not in targets):
            joined[targets[int((metric[targets] @ metric[o]).argmax())]].append(o)
        merged = [hidden[t] + (hidden[joined[t]].mean(0) if joined[t] else 0) for t in targets]
        return torch.cat([hidden[dom], *[m[None] for m in merged]])[1:]
    return vision


def divprune_vision(keep: float):
    """DivPrune (vbdi/divprune) on the n select-layer patches (CLS dropped), i.e. the tower's
    features before the projector: D = 1 - cos; first the patch farthest from its nearest other
    patch, then repeatedly the one farthest from the chosen set (its min distance to it), ties to the
    lower index, until round(keep·n); original order. -> [round(keep·n), D]."""
    def vision(hidden, attentions, keys):
        x = hidden[1:] / hidden[1:].norm(dim=-1, keepdim=True)
        d = 1 - x @ x.T  # [n, n]
        n = d.shape[0]
        chosen = [int((d + torch.diag(torch.full((n,), float("inf")))).min(1).values.argmax())]
        while len(chosen) < round(keep * n):
            to_set = d[:, chosen].min(1).values
            to_set[chosen] = float("-inf")
            chosen.append(int(to_set.argmax()))
        return hidden[1:][sorted(chosen)]
    return vision


@torch.no_grad()
def llava_image_features(model, pixel_values: torch.Tensor, vision=no_vision_reduction) -> torch.Tensor:
    """One image [1, 3, H, W] through the unmodified HF LLaVA's tower (an eager deepcopy), ``vision``
    on its select layer's tokens, then the projector: image features [m, C]."""
    tower = copy.deepcopy(model.model.vision_tower).eval()
    tower.set_attn_implementation("eager")
    keys = {}
    for i, block in enumerate(tower.encoder.layers):
        block.self_attn.k_proj.register_forward_hook(lambda mod, a, out, i=i: keys.update({i: out[0]}))
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    patches = vision(out.hidden_states[-2][0], [p[0] for p in out.attentions], [keys[i] for i in sorted(keys)])
    return model.model.multi_modal_projector(patches[None])[0]


@torch.no_grad()
def llava_generate_reference(model, pixel_values: torch.Tensor, ids: list[int], *, layer: int, keep: float,
                             max_new_tokens: int, vision=None, vision_keep: float = 1.0,
                             vision_score_layer: int = -2) -> list[int]:
    """One sample through the unmodified HF LLaVA: the image features of ``llava_image_features``
    (``vision``; None: FasterVLM with ``vision_keep`` / ``vision_score_layer``, or every patch at
    vision_keep=1), then FastV with a cache on the language model over the image tokens (``ids``
    holds one image token per feature). pixel_values [1, 3, H, W]; returns [max_new_tokens] ids."""
    import transformers

    if vision is None:
        vision = cls_attn_vision(vision_keep, vision_score_layer) if vision_keep < 1 else no_vision_reduction
    features = llava_image_features(model, pixel_values, vision)  # [m, C]
    image = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    assert len(image) == features.shape[0] and image == list(range(image[0], image[0] + len(image)))
    embeds = model.model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeds[0, image] = features
    lm = transformers.LlamaForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    tokens, _, _ = fastv_trace(lm.eval(), ids, layer=layer, keep=keep, span=(image[0], image[-1] + 1),
                               max_new_tokens=max_new_tokens, embeds=embeds)
    return tokens


def assert_rows_keep_and_generate_as_alone(hf, prompts, ids, got, kept, *, layer: int, keep: float,
                                          max_new_tokens: int, image: int) -> None:
    """Each row of a left-padded batch (``ids`` [B, S]; ``got`` the generated ids [B, S + new],
    ``kept`` the prefill's kept indices [B, M]) generates and keeps what the FastV reference does for
    its prompt alone with the span at its own 12 ``image`` tokens."""
    for row, p in enumerate(prompts):
        start = p.index(image)
        want, want_kept = fastv_generate_reference(hf, p, layer=layer, keep=keep, span=(start, start + 12),
                                                   max_new_tokens=max_new_tokens)
        assert got[row, ids.shape[1]:].tolist() == want, f"row {row}"
        pad = ids.shape[1] - len(p)
        assert [i - pad for i in kept[row].tolist() if i >= pad] == want_kept, f"row {row}"


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

