"""A plain-PyTorch FastV, written from the paper / official code, applied to the
*unmodified* model with hooks (the way the official code patches the decoder):

* layer K−1's attention probabilities [B, H, N, N] are captured (eager attention);
* scores = probs[:, :, query, :].mean over heads -> [B, N];
* kept = sort(cat(arange(start), topk(scores[:, start:end], round(keep·len)) + start, arange(end, N)));
* before layer K the hidden states are gathered; before every layer >= K the
  attention mask and rotary cos/sin given to the layer are gathered with the same
  indices (kept tokens keep their original positions).
"""
from __future__ import annotations

import copy

import torch


def _reference_select(probs, query, keep, start, end):
    n = probs.shape[-1]
    row = probs.mean(dim=2) if query == "mean" else probs[:, :, query, :]
    scores = row.mean(dim=1)  # [B, N]
    k = max(1, int(round(keep * (end - start))))
    top = scores[:, start:end].topk(k, dim=1).indices + start
    b = scores.shape[0]
    idx = torch.cat([torch.arange(start).expand(b, start), top, torch.arange(end, n).expand(b, n - end)], dim=1)
    return idx.sort(dim=1).values


def _gather(x, idx, axis):
    b = idx.shape[0]
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    x = x.movedim(axis, 1)
    index = idx.reshape(b, -1, *([1] * (x.dim() - 2))).expand(b, idx.shape[1], *x.shape[2:])
    return torch.gather(x, 1, index).movedim(1, axis)


def _layers(model):
    for path in ("blocks", "encoder.layer", "encoder.layers", "vision_model.encoder.layers", "model.layers", "layers"):
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


def fastv_reference(model, inputs: dict, keep: float, layer: int, query, span=None, prefix=0):
    """Run FastV on a copy of ``model`` with ``inputs``; returns (outputs, kept indices [B, M])."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "eager"  # the official code reads eager probabilities
        for mod in model.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = "eager"
    layers = _layers(model)
    state: dict = {}
    hooks = []

    def capture_probs(module, args, kwargs, output):
        if "probs" in state:
            return
        outs = output if isinstance(output, tuple) else (output,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-1] == o.shape[-2]:
                state["probs"] = o
                return

    is_timm = hasattr(layers[0], "attn") and hasattr(layers[0], "norm1")

    def before_prev(module, args, kwargs):
        if is_timm:
            state["probs"] = _timm_probs(module, args[0])

    def before_cut(module, args, kwargs):
        probs = state["probs"]
        n = probs.shape[-1]
        start, end = (prefix, n) if span is None else span
        q = n - 1 if query == "last" else (0 if query == "cls" else query)
        idx = _reference_select(probs, q, keep, start, end)
        state["idx"], state["n"] = idx, n
        return gather_layer_inputs(module, args, kwargs, gather_hidden=True)

    def gather_layer_inputs(module, args, kwargs, gather_hidden=False):
        idx, n = state["idx"], state["n"]
        args = list(args)
        if gather_hidden:
            if args:
                args[0] = _gather(args[0], idx, 1)
            else:
                kwargs["hidden_states"] = _gather(kwargs["hidden_states"], idx, 1)
        extra = {f"__arg{i}": a for i, a in enumerate(args[1:], start=1)}
        for key, val in list(kwargs.items()) + list(extra.items()):
            if key == "hidden_states":
                continue
            if isinstance(val, torch.Tensor) and val.dim() >= 2:
                for axis in range(val.dim() - 2, val.dim()):
                    if val.shape[axis] == n:
                        val = _gather(val, idx, axis)
            elif isinstance(val, tuple) and all(isinstance(t, torch.Tensor) for t in val):  # rotary (cos, sin)
                val = tuple(_gather(t, idx, 1) if t.shape[1] == n else t for t in val)
            else:
                continue
            if key.startswith("__arg"):
                args[int(key[5:])] = val
            else:
                kwargs[key] = val
        return tuple(args), kwargs

    if is_timm:
        hooks.append(layers[layer - 1].register_forward_pre_hook(before_prev, with_kwargs=True))
    else:
        for mod in layers[layer - 1].modules():
            hooks.append(mod.register_forward_hook(capture_probs, with_kwargs=True))
    hooks.append(layers[layer].register_forward_pre_hook(before_cut, with_kwargs=True))
    for later in layers[layer + 1:]:
        hooks.append(later.register_forward_pre_hook(gather_layer_inputs, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, state["idx"]
