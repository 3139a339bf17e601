"""Plain-PyTorch references of the token-reduction methods, applied to the *unmodified*
model with hooks (the way the official code patches a model):

* the attention probabilities [B, H, N, N] of every layer before the cut are captured
  (eager attention; timm: recomputed from the block's qkv);
* ``choose(hidden, probs)`` returns the kept indices [B, M] (and, for pooling, the
  reduced hidden states);
* a cut before layer K gathers the hidden states entering layer K and, before every
  layer >= K, the attention masks and rotary cos/sin handed to the layer; a cut at the
  output reduces the encoder's final token tensor (last_hidden_state / timm's norm
  output) and leaves outputs that read only prefix tokens as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch


def gather(x, idx, axis):
    """Per-sample gather of x along ``axis`` with idx [B, M] (x's batch may be 1)."""
    b = idx.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    x = x.movedim(axis, 1)
    index = idx.reshape(b, -1, *([1] * (x.dim() - 2))).expand(b, idx.shape[1], *x.shape[2:])
    return torch.gather(x, 1, index).movedim(1, axis)


def layers_of(model):
    for path in ("blocks", "encoder.layer", "encoder.layers", "vision_model.encoder.layers", "model.layers", "layers", "h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError("unknown model family")


def _timm_probs(block, x):
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@dataclass
class Choice:
    idx: torch.Tensor  # kept indices [B, M] (pooling: each output token's representative)
    hidden: torch.Tensor  # the reduced hidden states [B, M, C]


def reference_run(model, inputs: dict, layer, choose: Callable[[torch.Tensor, dict], Choice]):
    """Run ``model`` on ``inputs`` with a cut before ``layer`` (int) or at "output"."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
        for mod in model.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = "eager"  # the official codes read eager probabilities
    layers = layers_of(model)
    is_timm = hasattr(layers[0], "attn") and hasattr(layers[0], "norm1")
    # probs[i]: [B, H, N, N]; probs["keys"][i]: keys [B, N, Dk]; probs["mask"]: the padding mask [B, N] or None
    state: dict = {"probs": {"keys": {}, "mask": inputs.get("attention_mask")}}
    hooks = []

    def probs_hook(i):
        def pre(module, args, kwargs):
            if is_timm:
                state["probs"][i] = _timm_probs(module, args[0])

        def post(module, args, kwargs, output):
            if i in state["probs"]:
                return
            for o in output if isinstance(output, tuple) else (output,):
                if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-1] == o.shape[-2]:
                    state["probs"][i] = o
                    return
        return pre, post

    n_layers = len(layers)
    cut_at = n_layers if layer == "output" else int(layer)

    def keys_hook(i, timm_qkv=False):
        def hook(module, args, output):
            if timm_qkv:
                c = output.shape[-1] // 3
                state["probs"]["keys"][i] = output[..., c:2 * c]
            else:
                state["probs"]["keys"][i] = output
        return hook

    for i in range(cut_at):
        if is_timm:
            hooks.append(layers[i].attn.qkv.register_forward_hook(keys_hook(i, True)))
        else:
            for name, mod in layers[i].named_modules():
                if name.split(".")[-1] in ("key", "k_proj"):
                    hooks.append(mod.register_forward_hook(keys_hook(i)))
    for i in range(cut_at):
        pre, post = probs_hook(i)
        if is_timm:
            hooks.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            for mod in layers[i].modules():
                hooks.append(mod.register_forward_hook(post, with_kwargs=True))

    def side_inputs(module, args, kwargs, gather_hidden=False):
        idx, n = state["choice"].idx, state["n"]
        args = list(args)
        if gather_hidden:
            if args:
                args[0] = state["choice"].hidden
            else:
                kwargs["hidden_states"] = state["choice"].hidden
        extra = {f"__arg{i}": a for i, a in enumerate(args[1:], start=1)}
        for key, val in list(kwargs.items()) + list(extra.items()):
            if key == "hidden_states":
                continue
            if isinstance(val, torch.Tensor) and val.dim() >= 2:
                for axis in range(val.dim() - 2, val.dim()):
                    if val.shape[axis] == n:
                        val = gather(val, idx, axis)
            elif isinstance(val, tuple) and all(isinstance(t, torch.Tensor) for t in val):  # rotary (cos, sin)
                val = tuple(gather(t, idx, 1) if t.shape[1] == n else t for t in val)
            else:
                continue
            if key.startswith("__arg"):
                args[int(key[5:])] = val
            else:
                kwargs[key] = val
        return tuple(args), kwargs

    def before_cut(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state["n"] = hidden.shape[1]
        state["choice"] = choose(hidden, state["probs"])
        return side_inputs(module, args, kwargs, gather_hidden=True)

    if cut_at < n_layers:
        hooks.append(layers[cut_at].register_forward_pre_hook(before_cut, with_kwargs=True))
        for later in layers[cut_at + 1:]:
            hooks.append(later.register_forward_pre_hook(side_inputs, with_kwargs=True))
    elif is_timm or hasattr(getattr(model, "model", None), "norm"):  # the final norm's output leaves the encoder
        final_norm = model.norm if is_timm else model.model.norm

        def after_norm(module, args, output):
            state["n"] = output.shape[1]
            state["choice"] = choose(output, state["probs"])
            return state["choice"].hidden
        hooks.append(final_norm.register_forward_hook(after_norm))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    if cut_at == n_layers and hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
        state["n"] = hidden.shape[1]
        state["choice"] = choose(hidden, state["probs"])
        out.last_hidden_state = state["choice"].hidden
    return out, state["choice"].idx


# -- selection rules, written from the papers -------------------------------------------

def with_fixed(top, start, end, n):
    b = top.shape[0]
    idx = torch.cat([torch.arange(start).expand(b, start), top, torch.arange(end, n).expand(b, n - end)], dim=1)
    return idx.sort(dim=1).values


def keep_of(keep, span_len):
    return max(1, int(round(keep * span_len)))


def default_span(n, prefix, causal):
    """Prunable tokens when no span is given: all but the prefix; a decoder also keeps its
    first (attention-sink) and last (next-token) token."""
    return (max(prefix, 1), n - 1) if causal else (prefix, n)


def attention_choice(score_layer, query, keep, span=None, prefix=0, causal=False):
    """FastV's rule; the query token is never pruned (it leaves the span at either end)."""
    def choose(hidden, probs):
        p = probs[score_layer]
        n = p.shape[-1]
        start, end = default_span(n, prefix, causal) if span is None else span
        q = n - 1 if query == "last" else (0 if query == "cls" else query)
        if q == end - 1:
            end -= 1
        elif q == start:
            start += 1
        row = p.mean(dim=2) if q == "mean" else p[:, :, q, :]
        scores = row.mean(dim=1)
        top = scores[:, start:end].topk(keep_of(keep, end - start), dim=1).indices + start
        idx = with_fixed(top, start, end, n)
        return Choice(idx, gather(hidden, idx, 1))
    return choose


def divprune_choice(keep, span=None, prefix=0):
    """DivPrune's greedy max-min on cosine distance, one sample at a time (as the official code)."""
    def choose(hidden, probs):
        n = hidden.shape[1]
        start, end = (prefix, n) if span is None else span
        k = keep_of(keep, end - start)
        rows = []
        for x in hidden[:, start:end]:
            x = x / x.norm(dim=-1, keepdim=True)
            d = 1 - x @ x.T
            s = d.shape[0]
            nearest = torch.stack([torch.cat([d[i, :i], d[i, i + 1:]]).min() for i in range(s)])
            chosen = [int(nearest.argmax())]
            while len(chosen) < k:
                to_set = torch.stack([d[i, chosen].min() for i in range(s)])
                to_set[chosen] = float("-inf")
                chosen.append(int(to_set.argmax()))
            rows.append(torch.tensor(chosen) + start)
        idx = with_fixed(torch.stack(rows), start, end, n)
        return Choice(idx, gather(hidden, idx, 1))
    return choose


def park_miller_order(n, seed):
    """The documented seeded order of the `random` pass: Park–Miller hashes per position."""
    hashes = []
    for i in range(n):
        h = ((i + 1) * 2654435761 + seed * 40503 + 12345) % 2147483647
        for _ in range(3):
            h = h * 48271 % 2147483647
        hashes.append(h)
    return torch.tensor(hashes, dtype=torch.float64)


def random_choice(keep, seed=0, span=None, prefix=0):
    def choose(hidden, probs):
        b, n = hidden.shape[:2]
        start, end = (prefix, n) if span is None else span
        scores = park_miller_order(n, seed)[start:end]
        top = scores.topk(keep_of(keep, end - start)).indices + start
        idx = with_fixed(top.expand(b, -1), start, end, n)
        return Choice(idx, gather(hidden, idx, 1))
    return choose


def pool_choice(factor, grid, start):
    def choose(hidden, probs):
        b, n, c = hidden.shape
        h, w = grid
        end = start + h * w
        g = hidden[:, start:end].reshape(b, h, w, c).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(g, factor).flatten(2).transpose(1, 2)
        reps = [start + (i * factor) * w + j * factor for i in range(h // factor) for j in range(w // factor)]
        idx = torch.tensor(list(range(start)) + reps + list(range(end, n))).expand(b, -1)
        return Choice(idx, torch.cat([hidden[:, :start], pooled, hidden[:, end:]], dim=1))
    return choose


def wpr_scores(attn: torch.Tensor, steps: int, cls: int | None) -> torch.Tensor:
    """Weighted PageRank on one layer's attention graphs, as Zero-TPrune defines it: token i
    passes its score to token j in proportion to the attention i pays j, so after ``steps``
    iterations the scores are (Aᵀ)^steps · s₀ per head. s₀ is uniform, the CLS token (if any)
    starting at √N times the others, normalized to sum 1. attn [H, N, N] -> scores [H, N]."""
    h, n, _ = attn.shape
    s0 = torch.ones(n, dtype=torch.float64)
    if cls is not None:
        s0[cls] = n ** 0.5
    s0 = s0 / s0.sum()
    walk = torch.linalg.matrix_power(attn.double().transpose(1, 2), steps)  # [H, N, N]
    return walk @ s0


def emphasize_informative_region(scores: torch.Tensor) -> torch.Tensor:
    """EIR: the heads' scores [H, N] combined by root mean square -> [N]."""
    return scores.square().mean(dim=0).sqrt()


def descending(values: torch.Tensor) -> list[int]:
    """Positions by decreasing value, equal values by increasing position."""
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


def zero_tprune_choice(score_layer, keep, iters, similar, cls, span=None, prefix=0):
    """Zero-TPrune, written from the method description (the pass's docstring and the paper)
    and run on the attention and keys of the unmodified model (captured by hooks):

    * I′-stage: importance after one WPR step ranks the span tokens;
    * S-stage ("Seq-U" partition): the more important half of the span by that rank is B, the
      rest is A; an A token's redundancy is its highest key cosine similarity (all heads'
      keys concatenated) to any B token; the ``similar`` share of the tokens to prune (at
      most the size of A) goes first, the most redundant A tokens;
    * I-stage: importance after ``iters`` WPR steps; the ``keep`` share of the span is kept,
      the most important of the tokens the S-stage left, in their original order.
    """
    def choose(hidden, probs):
        attn = probs[score_layer]  # [B, H, N, N]
        keys = probs["keys"][score_layer]  # [B, N, C]
        n = attn.shape[-1]
        start, end = (prefix, n) if span is None else span
        size = end - start
        k = keep_of(keep, size)
        n_similar = min(int(round(similar * (size - k))), size // 2)
        rows = []
        for a, key in zip(attn, keys):  # one sample at a time
            rough = emphasize_informative_region(wpr_scores(a, 1, cls))[start:end]
            final = emphasize_informative_region(wpr_scores(a, iters, cls))[start:end]
            ranked = descending(rough)
            group_b, group_a = ranked[:size - size // 2], ranked[size - size // 2:]
            unit = key[start:end].double()
            unit = unit / unit.norm(dim=-1, keepdim=True)
            redundancy = torch.full((size,), float("-inf"), dtype=torch.float64)
            for t in group_a:
                redundancy[t] = max(float(unit[t] @ unit[u]) for u in group_b)
            pruned = set(descending(redundancy)[:n_similar])
            survivors = [t for t in descending(final) if t not in pruned]
            rows.append(torch.tensor(sorted(survivors[:k])) + start)
        idx = with_fixed(torch.stack(rows), start, end, n)
        return Choice(idx, gather(hidden, idx, 1))
    return choose
