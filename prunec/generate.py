"""Greedy generation with a KV cache through an ONNX decoder, original or rewritten by prunec.

The decoder takes the Optimum / torch export layout: ``input_ids`` [B, S], ``attention_mask``
[B, past + S], ``position_ids`` [B, S] (optional), ``past_key_values.{i}.key|value``
[B, kv_heads, past, head_dim]; it returns ``logits`` [B, S', V] (S' may be shorter than S
after a pruned prefill: the last token is always kept) and ``present.{i}.key|value``.

The caller's contract, which a rewritten model keeps (``docs/ARCHITECTURE.md``, "Decoding"):
the attention mask always spans the *original* tokens (the prompt, then one 1 per generated
token) and positions are original positions (``cumsum(mask) - 1``), whatever each layer cached;
every layer reads its own cache length and takes its mask from the last past + S entries of
the caller's. Padding goes on the left.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import PruneError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(model, device: str):
    """An ORT session for a path, a prunec ONNX model, or a session given as is."""
    if hasattr(model, "get_inputs") and hasattr(model, "run"):
        return model
    from .ir.session import make_session, providers

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise PruneError(f"no such model file: {path}")
        return make_session(str(path), providers(device))
    if getattr(model, "kind", None) == "onnx":
        return model.session(device)
    if getattr(model, "kind", None) == "torch" and getattr(model, "cached", False):
        return _TorchSession(model, device)
    raise PruneError(f"generate takes a decoder with a KV cache: ONNX (a path, a prunec ONNX model or an ORT "
                     f"session) or a prunec torch model (prunec.examples.load_cached_decoder), not "
                     f"{type(model).__name__}")


class _Port:
    """An input or output as ORT describes it: name, shape (ints, names for dynamic dims), type."""

    def __init__(self, name: str, shape: list, dtype: str):
        self.name, self.shape, self.type = name, shape, dtype


class _TorchSession:
    """What :func:`generate` needs of an ORT session, over a prunec torch decoder with a KV cache
    (its GraphModule returns (logits, *present) in the cache inputs' order): inputs named as the
    forward's arguments, outputs ``logits`` and ``present.{i}``."""

    def __init__(self, model, device: str):
        import torch

        self.model, self.device = model, torch.device("cuda" if device == "cuda" else "cpu")
        vals = [n.meta.get("val") for n in model.gm.graph.nodes if n.op == "placeholder"]
        self._inputs = [_Port(name, [d if isinstance(d, int) else "dyn" for d in v.shape],
                              "tensor(float16)" if v.dtype == torch.float16 else "tensor(float)")
                        for name, v in zip(model.input_names, vals)]
        pasts = sum(1 for i in self._inputs if "past" in i.name and len(i.shape) == 4)
        self._outputs = [_Port("logits", [], "tensor(float)")] + [_Port(f"present.{i}", [], "") for i in range(pasts)]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def run(self, wanted, feeds: dict):
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[i.name])).to(self.device) for i in self._inputs]
        outs = self.model.run(*args)
        by_name = {o.name: t.detach().float().cpu().numpy() if o.name == "logits" else t.detach().cpu().numpy()
                   for o, t in zip(self._outputs, outs)}
        return [by_name[w] for w in (wanted or by_name)]


def _cache_layout(sess) -> list[tuple[str, str, tuple, Any]]:
    """(past input, present output, [kv_heads, head_dim], dtype) per cache tensor, in input order."""
    outputs = [o.name for o in sess.get_outputs()]
    pasts = [i for i in sess.get_inputs() if "past" in i.name and len(i.shape) == 4]
    presents = [o for o in outputs if "present" in o]
    if len(pasts) != len(presents) or not pasts:
        raise PruneError(f"the decoder needs KV-cache inputs (past_key_values.*) and as many present.* outputs; "
                         f"found {len(pasts)} and {len(presents)}")
    layout = []
    for k, inp in enumerate(pasts):
        want = inp.name.replace("past_key_values", "present").replace("past_key", "present_key").replace(
            "past_value", "present_value")
        out = want if want in outputs else presents[k]
        if not all(isinstance(d, int) for d in (inp.shape[1], inp.shape[3])):
            raise PruneError(f"'{inp.name}' needs a fixed number of heads and head size (axes 1 and 3)")
        layout.append((inp.name, out, (inp.shape[1], inp.shape[3]), _DTYPES.get(inp.type, np.float32)))
    return layout


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, eos_token_id: int | None = None,
             device: str = "cpu", prompt_inputs: dict | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache: a prefill over ``input_ids`` [B, S] (left-padded where
    ``attention_mask`` [B, S] has zeros), then one token per step. Returns the prompt followed by
    the generated tokens, [B, S + new] int64 with new <= ``max_new_tokens`` (fewer when every row
    has produced ``eos_token_id``; a finished row is filled with it). ``model``: an ONNX decoder
    with a KV cache (path, prunec model or ORT session), original or rewritten.
    ``prompt_inputs``: other inputs of the prompt, {name: [B, n, ...]} (a VLM decoder's image
    features, merged at its image tokens), fed with the prefill; decode steps feed them empty
    (n = 0)."""
    if max_new_tokens < 0:
        raise PruneError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    sess = _session(model, device)
    names = {i.name for i in sess.get_inputs()}
    prompt_inputs = {k: np.asarray(v) for k, v in (prompt_inputs or {}).items()}
    for need in ("input_ids", "attention_mask", *prompt_inputs):
        if need not in names:
            raise PruneError(f"the decoder has no '{need}' input (inputs: {', '.join(sorted(names))})")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
    if (mask[:, -1] == 0).any():
        raise PruneError("the prompts must be padded on the left (attention_mask ends with 0 in some row)")
    layout = _cache_layout(sess)
    fed = {"input_ids", "attention_mask", "position_ids", *prompt_inputs, *(past for past, _, _, _ in layout)}
    missing = sorted(names - fed)
    if missing:
        raise PruneError(f"the decoder also needs {', '.join(repr(m) for m in missing)}: give the prompt's "
                         f"(e.g. a VLM's image features) with generate(..., prompt_inputs={{name: array}})")
    batch = ids.shape[0]
    cache = {past: np.zeros((batch, *dims[:1], 0, dims[1]), dtype) for past, _, dims, dtype in layout}
    out, step_ids, finished = [ids], ids, np.zeros(batch, bool)
    logits_name = next((o.name for o in sess.get_outputs() if o.name == "logits"), sess.get_outputs()[0].name)
    wanted = [logits_name] + [present for _, present, _, _ in layout]
    for step in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **cache}
        feeds.update({k: v if step == 0 else v[:, :0] for k, v in prompt_inputs.items()})
        if "position_ids" in names:  # original positions: a rewritten model's caches may be shorter
            pos = np.cumsum(mask, axis=1) - 1
            feeds["position_ids"] = np.where(mask == 0, 1, pos)[:, -step_ids.shape[1]:]
        results = sess.run(wanted, feeds)
        token = results[0][:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            token = np.where(finished, eos_token_id, token)
            finished |= token == eos_token_id
        out.append(token[:, None])
        cache = {past: r for (past, _, _, _), r in zip(layout, results[1:])}
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        if finished.all():
            break
    return np.concatenate(out, axis=1)
