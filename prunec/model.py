"""The model object passes consume and produce: an ONNX graph or a torch.export module.

``prunec.load("m.onnx")`` or ``prunec.load(module, example_inputs)`` give a
:class:`Model`; passes return new Models (the input is never modified).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PruneError


class Model:
    """Common interface of :class:`OnnxModel` and :class:`TorchModel`."""

    kind = ""

    def __init__(self):
        self._facts = None
        self._graph = None
        self.cuts: tuple = ()  # (tag, tokens in, tokens out) of every cut prunec applied to reach this model
        self.reducing: frozenset = frozenset()  # the tags of those cuts that remove tokens (Cut.reduces)
        self.static_dests: dict = {}  # cut tag -> dest [N] of a pool cut (its windows are fixed)
        self.exposed: tuple = ()  # what expose() added: "sizes", "indices"

    def reduced_since(self, other: "Model") -> bool:
        """Whether a cut made after ``other`` (this model's ancestor) removed tokens."""
        return any(tag in self.reducing for tag, _, _ in self.cuts[len(other.cuts):])

    def _after_cuts(self, out: "Model", plan) -> "Model":
        """``out`` (lowered from ``plan`` on this model) with this model's cut records and the plan's."""
        from .passes.base import GridPool

        out.cuts = self.cuts + tuple((c.tag, c.num_tokens, c.kept) for c in plan.cuts)
        out.reducing = self.reducing | {c.tag for c in plan.cuts if c.reduces}
        out.static_dests = {**self.static_dests,
                            **{c.tag: c.reduce.dest() for c in plan.cuts if isinstance(c.reduce, GridPool)}}
        return out

    def _unique_tags(self, plan) -> None:
        """Give each cut of ``plan`` a tag (the prefix of its graph values) no earlier cut of this model
        and no other cut of the plan has: the same pass twice at one layer gets ``_1``, ``_2``."""
        taken = {t for t, _, _ in self.cuts}
        for cut in plan.cuts:
            tag, i = cut.tag, 1
            while cut.tag in taken:
                cut.tag, i = f"{tag}_{i}", i + 1
            taken.add(cut.tag)

    def _check_not_exposed(self) -> None:
        if self.exposed:
            raise PruneError("this model already exposes token sizes/indices as outputs: apply every pass "
                             "first, then expose")

    def expose(self, what=("sizes", "indices")) -> "Model":
        """A new model that also outputs, for its reduced token outputs ([B, M, C] after a cut
        without recovery), the token sizes [B, M] (float32: how many input tokens each output token
        stands for; 1 for a pure selection) and/or the kept indices [B, M] (int64: each output
        token's input position; after a merge its representative), composed over every cut.
        ONNX: graph outputs ``<output>.sizes`` / ``<output>.kept_indices``. Torch: the
        GraphModule returns ``(outputs, {"sizes": ..., "kept_indices": ...})``. Apply it last."""
        from .inspect import reduced_token_outputs

        what = tuple(what.split(",")) if isinstance(what, str) else tuple(what)
        bad = [w for w in what if w not in ("sizes", "indices")]
        if bad or not what:
            raise PruneError(f"cannot expose '{','.join(bad)}': give sizes, indices or sizes,indices")
        self._check_not_exposed()
        if not self.cuts:
            raise PruneError("nothing to expose: no pass reduced tokens in this model (expose in the run that "
                             "applies the passes: --expose, Pipeline(..., expose=...))")
        if isinstance(self, OnnxModel):  # the written graph's shapes say it (a dynamic M too)
            from .inspect import onnx_reduced_outputs

            _, n, c = self.facts().streams[0].shape
            outputs = onnx_reduced_outputs(self.model, n, c, self.cuts)
        else:
            outputs = reduced_token_outputs(self.facts())
        if not outputs:
            raise PruneError("nothing to expose: no graph output carries reduced tokens (a recovered or pooled "
                             "output has every token's value; pool it as usual)")
        steps = [(tag, n, m, self.static_dests.get(tag)) for tag, n, m in self.cuts]
        for (tag, _, m, _), (nxt, n, _, _) in zip(steps, steps[1:]):
            if n != m:
                raise PruneError(f"cannot expose token sizes: cut '{nxt}' takes {n} tokens where cut '{tag}' "
                                 f"left {m} (tokens recovered between them)")
        for o in outputs:
            if o["shape"][1] != steps[-1][2]:
                raise PruneError(f"cannot expose token sizes for output '{o['name']}': it has {o['shape'][1]} "
                                 f"tokens, the last cut left {steps[-1][2]}")
        out = self._exposed([o["name"] for o in outputs], steps, list(what))
        out.cuts, out.static_dests, out.exposed, out.reducing = self.cuts, self.static_dests, what, self.reducing
        return out

    def copy(self) -> "Model":
        """A new model object with the same graph (weights shared): what a pass that reduces
        nothing returns, so that passes never hand back their input."""
        raise NotImplementedError

    def facts(self):
        """Analysis facts (attention sites, streams, prefix, ...), computed once."""
        if self._facts is None:
            from .passes.analysis.blocks import analyze

            self._facts = analyze(self.graph())
        return self._facts


class OnnxModel(Model):
    kind = "onnx"

    def __init__(self, model, feeds: dict[str, np.ndarray] | None = None, probe_batch: int = 2,
                 probe_length: int | None = None, check: str = "auto", light: bool | None = None):
        super().__init__()
        import onnx_ir as ir

        from .ir.from_onnx import example_inputs, image_dims, sequence_dims, unfuse_skip_norms, weight_bytes

        self.model: ir.Model = model
        unfuse_skip_norms(model)
        _name_nodes(model)
        if check not in CHECKS:
            raise PruneError(f"check '{check}' is not one of {', '.join(CHECKS)}")
        self.check = check
        # a model too large to run for analysis is probed without its weights (from_onnx.probe_onnx)
        self.light = weight_bytes(model) > LIGHT_PROBE_BYTES if light is None else light
        self.probe_batch = probe_batch
        self.feeds = feeds if feeds is not None else example_inputs(model, probe_batch, probe_length)
        # a dynamic sequence axis or image size: token counts follow it at run time
        self.dynamic_tokens = bool(sequence_dims(model) or image_dims(model))
        self._session = None
        self.checked_layers: int | None = None  # check "fast": the layers ORT ran

    def graph(self):
        if self._graph is None:
            from .ir.from_onnx import from_onnx, probe_onnx

            try:
                probe = probe_onnx(self.model, self.feeds, light=self.light)
            except PruneError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _ort_failure(self.model, e, "the probe prunec needs") from None
            self._graph = from_onnx(self.model, probe, self.feeds)
            evaluate = self._graph.evaluate

            def evaluate_checked(names):
                try:
                    return evaluate(names)
                except Exception as e:  # noqa: BLE001
                    raise _ort_failure(self.model, e, "the probe prunec needs") from None

            # a model too large to run: what the probe knew by shape stays so
            self._graph.evaluate = None if self.light else evaluate_checked
            self._graph.dynamic_tokens = self.dynamic_tokens
            self._graph.cache_inputs, self._graph.decode_shapes = self._cache_probe(probe_onnx)
        return self._graph

    def _cache_probe(self, probe_onnx) -> tuple[list[str], dict]:
        """A decoder with a KV cache is analysed as a prefill (an empty cache); a second probe with
        :data:`~prunec.ir.from_onnx.CACHE_PROBE_PAST` cached entries gives every value's shape when
        the cache is not empty ({name: (shape, the value of a small integer tensor or None)}), which tells an axis over the cache and the new
        tokens (an attention mask's keys: past + N there) from one over the new tokens only."""
        from .ir.from_onnx import CACHE_PROBE_PAST, cache_inputs, example_inputs

        names = cache_inputs(self.model)
        if not names:
            return [], {}
        if not self.dynamic_tokens:
            raise PruneError(f"the KV cache '{names[0]}' needs a dynamic sequence (a prefill and one-token decode "
                             f"steps run through the same graph); do not fix the sequence length with --shape")
        feeds = example_inputs(self.model, self.probe_batch, self._probe_length(), past=CACHE_PROBE_PAST)
        decode = probe_onnx(self.model, feeds, light=self.light)
        shapes = {k: (tuple(v.shape), v if v.dtype.kind in "iu" and v.size <= 64 else None) for k, v in decode.items()}
        shapes.update({k: (tuple(v.shape), None) for k, v in feeds.items()})
        return names, shapes

    def lower(self, plan) -> "OnnxModel":
        from .backends.onnx import lower_onnx, lower_onnx_with_proto

        self._check_not_exposed()
        self._unique_tags(plan)
        lowered, proto = lower_onnx_with_proto(self.model, plan)
        out = OnnxModel(lowered, self.feeds, self.probe_batch, check=self.check, light=self.light)
        same = plan.identity() if self._compares_identity() else None
        out.validate(original=self.model, upto=self._fast_check_output(plan) if out.check_mode == "fast" else None,
                     identity=lower_onnx(self.model, same) if same is not None else None, proto=proto)
        return self._after_cuts(out, plan)

    def _compares_identity(self) -> bool:
        """Whether validation also compares the plan lowered at keep=1 with this model (a dynamic token
        count, check ``full``; with ``auto`` only up to :data:`IDENTITY_CHECK_BYTES` of weights, as it
        costs two more sessions and runs)."""
        from .ir.from_onnx import weight_bytes

        return self.dynamic_tokens and (self.check == "full" or self.check == "auto" and not self.light
                                        and weight_bytes(self.model) <= IDENTITY_CHECK_BYTES)

    def _fast_check_output(self, plan) -> tuple[str, int] | None:
        """``--check fast``: (the stream leaving layer K + 2, the layers that makes) for the latest cut
        K of ``plan`` (its name is the same in the rewritten graph); None when that is the whole model."""
        facts = self.facts()
        layer = max(c.layer for c in plan.cuts) + 2
        if layer >= facts.depth:
            return None
        return facts.block_output(layer).name, layer + 1

    def _exposed(self, outputs: list[str], steps: list, what: list[str]) -> "OnnxModel":
        from .backends.onnx import expose_onnx

        out = OnnxModel(expose_onnx(self.model, steps, outputs, what), self.feeds, self.probe_batch, check=self.check,
                        light=self.light)
        out.validate()
        return out

    def copy(self) -> "OnnxModel":
        out = OnnxModel(self.model.clone(), self.feeds, self.probe_batch, check=self.check,
                        light=self.light)
        out.cuts, out.static_dests, out.exposed = self.cuts, self.static_dests, self.exposed
        out.reducing = self.reducing
        return out

    def proto(self):
        import onnx_ir as ir

        return ir.serde.serialize_model(self.model)

    @property
    def check_mode(self) -> str:
        """What :meth:`validate` does: ``full`` (onnx.checker and ORT runs), ``fast`` (onnx.checker,
        and ORT runs of the graph up to two layers after the latest cut: the weights of those layers
        only) or ``structure`` (onnx.checker only: ``check="none"``, or ``auto`` on a model over
        :data:`LIGHT_PROBE_BYTES` of weights, which an ORT run would have to read)."""
        if self.check == "fast":
            return "fast"
        return "structure" if self.check == "none" or (self.check == "auto" and self.light) else "full"

    def validate(self, original=None, upto: tuple[str, int] | None = None, identity=None, proto=None) -> None:
        """Full onnx.checker check and ORT runs, when the graph's batch is dynamic, at batch sizes 1
        and 3 — with a shorter and a longer input (or image) there when its token count is dynamic
        (:meth:`_other_shapes`) — else on the probe inputs, in one session; the checker only when
        :attr:`check_mode` is ``structure``. ``original``: the onnx-ir model it was rewritten from; a
        shape that one does not run at either is skipped. ``upto`` (``fast``): (the value, the layers)
        where the graph run is cut short. ``identity``: the same plan lowered at keep=1 / r=0
        (:meth:`~prunec.passes.base.Plan.identity`), which must equal ``original`` at each of those
        shapes (:func:`_check_identity`). ``proto``: this model's ``graph_only_proto(as_inputs=True)``
        if the caller has it (the checker reads it and the session is built from it; else it is made)."""
        from .ir.from_onnx import example_inputs
        from .ir.session import graph_only_proto, make_session

        if self.check_mode == "structure" or upto is not None:
            _check_structure(proto if proto is not None else graph_only_proto(self.model, as_inputs=True))
            if self.check_mode == "structure":
                return
        self.checked_layers = upto[1] if upto is not None else None
        try:  # the checker reads the same serialisation the session is built from
            sess = make_session(self.model if upto is None else _truncated(self.model, upto[0]), quick=True,
                                inspect=_check_structure if upto is None else None,
                                proto=proto if upto is None else None)
        except PruneError:
            raise
        except Exception as e:  # noqa: BLE001
            if _bfloat16_value(self.model) is not None:
                raise _ort_failure(self.model, e, "the check prunec runs") from None
            raise PruneError(f"rewritten graph does not run in ONNX Runtime: {str(e).splitlines()[0]}") from None
        shapes = self._other_shapes()  # (at batch 1 and 3 already, when the batch is dynamic)
        ran = 0
        for batch in () if shapes else self._other_batches():  # a batch size baked in fails here, not at the user's
            try:
                sess.run(None, self._feeds_at(batch))
            except Exception as e:  # noqa: BLE001
                raise PruneError(f"rewritten graph does not run at batch size {batch} (the probe ran at "
                                 f"{self.probe_batch}): {str(e).splitlines()[0]}") from None
            ran += 1
        checked = []
        for batch, size in shapes:  # so is a token count baked in
            what = f"length {size['length']}" if "length" in size else f"image size {size['side']}x{size['side']}"
            if size.get("past"):
                what += f" after {size['past']} cached tokens"
            feeds = example_inputs(self.model, batch, **size)
            try:
                sess.run(None, feeds)
            except Exception as e:  # noqa: BLE001
                if original is not None and not _runs(original, feeds):
                    continue  # the model prunec was given does not take that shape either (a length past its
                    # position table, an image size it cannot patch): not the rewrite's fault
                raise PruneError(f"rewritten graph does not run at batch {batch}, {what} (the probe ran at "
                                 f"{self._probe_length() or self._probe_side()}): {str(e).splitlines()[0]}") from None
            checked.append((f"batch {batch}, {what}", feeds))
        if not ran and not checked:  # a static graph (or no other shape the input model takes): the probe's
            try:
                sess.run(None, self.feeds)
            except Exception as e:  # noqa: BLE001
                raise PruneError(f"rewritten graph does not run in ONNX Runtime: {str(e).splitlines()[0]}") from None
        if identity is not None and original is not None:  # at the shapes other than the probe's (the plan at
            # keep=1 keeps no padding over a real token)
            _check_identity(identity, original, [(what, _without_padding(feeds)) for what, feeds in checked])

    def _probe_length(self) -> int | None:
        from .ir.from_onnx import sequence_dims

        seq = sequence_dims(self.model)
        return next((self.feeds[n].shape[a] for n, a in seq.items() if n in self.feeds), None)

    def _probe_side(self) -> int | None:
        from .ir.from_onnx import image_dims

        return next((self.feeds[n].shape[2] for n in image_dims(self.model) if n in self.feeds), None)

    def _other_shapes(self) -> tuple[tuple[int, dict], ...]:
        """(batch, sizes) pairs other than the probe's that :meth:`validate` also runs when the token
        count is dynamic (batch 1 and 3 where the batch is dynamic): a shorter and a longer sequence
        ({"length": L}), or a larger and the same image size ({"side": S}: 448 and 224, multiples
        of the usual patch sizes 14, 16 and 32)."""
        from .ir.from_onnx import cache_inputs

        n, side = self._probe_length(), self._probe_side()
        b1, b2 = (1, 3) if self._other_batches() else (self.probe_batch, self.probe_batch)
        if not self.dynamic_tokens or (n is None and side is None):
            return ()
        if n is None:
            return (b1, {"side": 2 * side}), (b2, {"side": side})
        shapes = ((b1, {"length": max(2, n - 11)}), (b2, {"length": n + 14}))
        if cache_inputs(self.model):  # decode steps (one new token) and a prefill after a cached one
            shapes += ((b2, {"length": 1, "past": n + 5}), (b1, {"length": 6, "past": n}))
        return shapes

    def _other_batches(self) -> tuple[int, ...]:
        """Batch sizes besides the probe's that :meth:`validate` also runs (1 and 3), when every
        graph input's first dimension is dynamic; none for a graph with a static batch."""
        inputs = list(self.model.graph.inputs)
        if not inputs or any(v.shape is None or len(v.shape) == 0 or isinstance(v.shape[0], int) for v in inputs):
            return ()
        return tuple(b for b in (1, 3) if b != self.probe_batch)

    def _feeds_at(self, batch: int) -> dict[str, np.ndarray]:
        """The probe inputs at another batch size: rows repeated (cycled) from the probe's feeds."""
        return {k: np.take(v, np.arange(batch) % v.shape[0], axis=0) if v.ndim else v for k, v in self.feeds.items()}

    def session(self, device: str = "cpu", threads: int | None = None):
        from .ir.session import make_session, providers

        return make_session(self.model, providers(device), threads)

    def _tagged(self, suffix: str) -> list[str]:
        return [o.name for n in self.model.graph for o in n.outputs if o.name.endswith(suffix)]

    def _cpu_session(self):
        """The CPU session behind :meth:`run`, :meth:`kept_indices` and :meth:`merge_maps`: one
        session (the saved model's graph and optimizations, with the cuts' kept indices and merge
        maps also exposed), so the indices reported are those of the outputs returned, float-level
        near-ties included."""
        if self._session is None:
            from .ir.session import make_session

            self._session = make_session(self.model, extra_outputs=self._tagged("/keep_idx") + self._tagged("/dest"))
        return self._session

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None, device: str = "cpu") -> list[np.ndarray]:
        sess = self._cpu_session() if device == "cpu" else self.session(device)
        if outputs is None:
            outputs = [v.name for v in self.model.graph.outputs]
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in feeds.items()}
        return sess.run(outputs, feeds)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically; with external data (``PATH.data`` beside it) when the input
        had external data or the weights would not fit a 2 GiB protobuf."""
        return save_onnx(self.model, path)

    def external_data(self) -> bool:
        """Whether :meth:`save` writes the weights to ``PATH.data`` beside the model."""
        return _needs_external(self.model)

    def kept_indices(self, feeds: dict[str, Any]) -> dict:
        """Run once and return {cut tag: kept indices [B, M]} of every cut (a merge: each output
        token's representative)."""
        return self._named_outputs(feeds, "/keep_idx")

    def merge_maps(self, feeds: dict[str, Any]) -> dict:
        """Run once and return {cut tag: dest [B, N]} of every merge."""
        return self._named_outputs(feeds, "/dest")

    def _named_outputs(self, feeds: dict[str, Any], suffix: str) -> dict:
        names = self._tagged(suffix)
        if not names:
            return {}
        res = self.run(feeds, outputs=names)
        return {name[: -len(suffix)]: r for name, r in zip(names, res)}

    def to_torch(self):
        """A torch module running this graph in ONNX Runtime (the ONNX path)."""
        from .backends.torch_ort import OrtModule

        return OrtModule(self)


def _without_padding(feeds: dict) -> dict:
    """``feeds`` with every integer or boolean mask input all ones (no padding)."""
    return {k: np.ones_like(v) if "mask" in k and v.dtype.kind in "iub" else v for k, v in feeds.items()}


def _check_identity(identity, original, cases: list) -> None:
    """Refuse a rewrite whose lowering at keep=1 / r=0 (``identity``, an onnx-ir model) does not compute
    what the model it was given (``original``) does, on each of ``cases`` [(what, feeds)] that the
    original runs: every output within 1e-3 of the original's largest magnitude (1e-2 in 16-bit floats:
    only the inserted ops differ), integer outputs equal."""
    from .ir.session import make_session

    same, given = make_session(identity, quick=True), make_session(original, quick=True)
    names = [o.name for o in given.get_outputs()]
    for what, feeds in cases:
        try:
            want = given.run(None, feeds)
        except Exception:  # noqa: BLE001
            continue
        try:
            got = dict(zip([o.name for o in same.get_outputs()], same.run(names, feeds)))
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"the rewrite at keep=1 / r=0 does not run at {what}: {str(e).splitlines()[0]}") from None
        for name, w in zip(names, want):
            _refuse_unless_equal(f"'{name}'", w, got[name], what, 1e-2 if w.dtype.itemsize <= 2 else 1e-3)


def _refuse_unless_equal(output: str, want: np.ndarray, got: np.ndarray, what: str, tol: float) -> None:
    """Refuse the rewrite (PruneError naming ``output`` and ``what`` shape) unless its keep=1 lowering's
    output ``got`` equals the given model's ``want``: the same shape; floats within ``tol`` of the
    largest magnitude (at least 1), other types exactly."""
    if got.shape != want.shape:
        raise PruneError(f"the rewrite at keep=1 / r=0 changes output {output} from {list(want.shape)} to "
                         f"{list(got.shape)} at {what}; refusing a rewrite that is wrong there")
    if want.dtype.kind not in "fc":
        bad, diff = not np.array_equal(got, want), "differs"
    else:
        scale = max(1.0, float(np.abs(want.astype(np.float64)).max(initial=0.0)))
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
        bad, diff = not err <= tol * scale, f"differs by {err:.3g} (largest magnitude {scale:.3g})"
    if bad:
        raise PruneError(f"the rewrite at keep=1 / r=0 does not equal the model it was given at {what}: output "
                         f"{output} {diff}; refusing a rewrite that is wrong there")


def _runs(model, feeds: dict) -> bool:
    """Whether ONNX Runtime runs the onnx-ir ``model`` on ``feeds``."""
    from .ir.session import make_session

    try:
        make_session(model, quick=True).run(None, feeds)
    except Exception:  # noqa: BLE001
        return False
    return True


def _ort_failure(model, error: Exception, what: str) -> PruneError:
    """The one-line refusal of a model ORT failed to run for ``what``: naming a bfloat16 value where
    the graph has one (ORT's CPU provider lacks bfloat16 kernels), else ORT's first line."""
    bf16 = _bfloat16_value(model)
    if bf16 is not None:
        return PruneError(f"'{bf16}' is bfloat16 and ONNX Runtime (CPU) cannot run this bfloat16 graph for "
                          f"{what}; convert the model to float16 or float32")
    return PruneError(f"ONNX Runtime cannot run the model: {str(error).splitlines()[0]}")


def _bfloat16_value(model) -> str | None:
    """The name of a bfloat16 graph input or weight, if any."""
    import onnx_ir as ir

    for v in list(model.graph.inputs) + list(model.graph.initializers.values()):
        if v.dtype == ir.DataType.BFLOAT16:
            return v.name
    return None


class TorchModel(Model):
    """A torch.export program as an fx GraphModule, with the example inputs it was exported (and
    is analysed) at. Dynamic dims (``torch.export.Dim``) stay dynamic: a dynamic batch (axis 0)
    and sequence (axis 1 of [B, S] / [B, S, C] inputs) are read off the graph's inputs
    (``dims``); with a dynamic sequence the model is ``dynamic_tokens`` (the attention top-k
    selections compute their counts from the run-time length), the rewritten GraphModule runs at
    any batch and length in the Dims' ranges, and :meth:`save` re-exports it with those Dims."""

    kind = "torch"

    def __init__(self, gm, args: tuple, kwargs: dict):
        super().__init__()
        from .ir.from_fx import dynamic_dims

        self.gm = gm
        self.args, self.kwargs = args, kwargs
        index = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        # (flat input index, axis, sympy symbol, "batch" | "sequence", min, max or None) of each dynamic dim
        self.dims = [(index[name], axis, sym, kind, *_sym_range(gm, name, axis))
                     for name, axis, sym, kind in dynamic_dims(gm)]
        self.dynamic_tokens = any(d[3] == "sequence" for d in self.dims)
        self.input_names = list(index)
        self.cached = any(d[3] == "past" for d in self.dims)  # a decoder with a KV cache
        self.no_pt2: tuple = ()  # (tag, why) of cuts whose run-time counts torch.export cannot trace yet
        if self.cached and not self.dynamic_tokens:
            raise PruneError("a decoder with a KV cache needs a dynamic sequence (a prefill and one-token decode steps "
                             "run through the same graph): give input_ids a Dim on axis 1")

    @classmethod
    def export(cls, module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None) -> "TorchModel":
        import torch

        kwargs = kwargs or {}
        try:
            ep = torch.export.export(module.eval() if hasattr(module, "eval") else module, args, kwargs,
                                     dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"torch.export failed: {_first_line(e)}") from None
        gm = _module_of(ep)
        _eliminate_dead_code(gm)  # e.g. an unused pooler: analysis must see what the outputs use
        return cls(gm, args, kwargs)

    def flat_args(self) -> list:
        return self._flat(self.args, self.kwargs)

    def graph(self):
        if self._graph is None:
            from .ir.from_fx import from_fx, probe_fx

            gm = self.gm
            if any(n.op == "call_function" and "val" not in n.meta for n in gm.graph.nodes):
                if self.dims:  # symbolic shapes again, from the inputs' symbolic sizes
                    refresh_symbolic_meta(gm)
                else:
                    refresh_meta(gm, tuple(self.flat_args()))  # a rewritten graph: shapes changed
            args = self.flat_args()
            if self.cached:  # a decoder with a KV cache is analysed as a prefill: its cache empty
                args = self._flat(*self.cache_inputs_at(past=0))
            g = from_fx(gm, args)
            probe_fx(g, gm, tuple(args))
            if self.cached:
                g.cache_inputs = [self.input_names[d[0]] for d in self.dims if d[3] == "past"]
                g.decode_shapes = self._decode_shapes()
            self._graph = g
        return self._graph

    @staticmethod
    def _flat(args, kwargs) -> list:
        import torch.utils._pytree as pytree

        return pytree.tree_flatten((args, kwargs))[0]

    def cache_inputs_at(self, batch: int | None = None, length: int | None = None, past: int = 0) -> tuple[tuple, dict]:
        """A decoder with a KV cache: inputs of ``length`` new tokens (default: the example's) after
        ``past`` cached entries, at ``batch`` rows (default: the example's): ids cycled from the
        example's, the cache (``past`` axes) seeded random, the mask (``total`` axis) all ones
        [B, past + length], positions (an int input named ``*position*``) past .. past + length - 1."""
        import torch
        import torch.utils._pytree as pytree

        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        flat = list(flat)
        gen = torch.Generator().manual_seed(past)
        seq = self._range("sequence")
        length = seq[2] if length is None else length
        for i, t in enumerate(flat):
            axes = {axis: kind for j, axis, _, kind, *_ in self.dims if j == i}
            if not axes or not isinstance(t, torch.Tensor):
                continue
            if batch is not None and 0 in axes:
                t = t.index_select(0, torch.arange(batch) % t.shape[0])
            rows = t.shape[0]
            if "past" in axes.values():
                shape = list(t.shape)
                shape[2] = past
                t = torch.randn(shape, generator=gen).to(t.dtype)
            elif "total" in axes.values():
                t = torch.ones(rows, past + length, dtype=t.dtype)
            elif "sequence" in axes.values() and "position" in self.input_names[i]:
                t = torch.arange(past, past + length).expand(rows, length).to(t.dtype).contiguous()
            elif "sequence" in axes.values():
                t = t.index_select(1, torch.arange(length) % t.shape[1])
            flat[i] = t
        return pytree.tree_unflatten(flat, spec)

    def _decode_shapes(self) -> dict:
        """Every value's shape (and a small integer tensor's value) with entries in the cache: a
        run at :data:`~prunec.ir.from_onnx.CACHE_PROBE_PAST` cached entries (as the ONNX frontend's
        second probe)."""
        import numpy as np
        import torch

        from .ir.from_onnx import CACHE_PROBE_PAST

        shapes = {}

        class Record(torch.fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if isinstance(result, torch.Tensor):
                    small = not result.is_floating_point() and result.numel() <= 64 and result.dtype != torch.bool
                    shapes[n.name] = (tuple(result.shape), result.detach().cpu().numpy() if small else None)
                elif isinstance(result, int) and not isinstance(result, bool):  # a size (SymInt) entry
                    shapes[n.name] = ((), np.array(result))
                elif isinstance(result, (list, tuple)) and n.op != "output":
                    small = [int(x) for x in result if isinstance(x, int)]
                    if len(small) == len(result) and small:
                        shapes[n.name] = ((len(small),), np.array(small))
                return result

        with torch.no_grad():
            Record(self.gm).run(*self._flat(*self.cache_inputs_at(past=CACHE_PROBE_PAST)))
        return shapes

    def lower(self, plan) -> "TorchModel":
        from .backends.fx import lower_fx

        self._check_not_exposed()
        self._unique_tags(plan)
        gm = lower_fx(self.gm, plan)
        out = TorchModel(gm, self.args, self.kwargs)
        out.no_pt2 = self.no_pt2 + tuple((c.tag, "counts per row of a padded batch") for c in plan.cuts
                                         if c.dynamic and c.pad_last)
        out.validate()
        same = plan.identity() if self.other_shapes() and not self.cached else None
        if same is not None:
            self._check_identity(TorchModel(lower_fx(self.gm, same), self.args, self.kwargs))
        return self._after_cuts(out, plan)

    def _check_identity(self, identity: "TorchModel") -> None:
        """Refuse a rewrite whose plan lowered at keep=1 (``identity``) does not compute what this model
        does at the shapes other than the example's that :meth:`validate` runs (:func:`_refuse_unless_equal`:
        within 1e-4 of the largest magnitude, 1e-2 in 16-bit floats: only the inserted ops differ)."""
        import torch

        names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]  # the flat inputs, in order
        for batch, length in self.other_shapes():
            args, kwargs = self.inputs_at(batch, length)
            flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
            if len(names) == len(flat):  # no padding (the plan at keep=1 keeps none over a real token)
                flat = [torch.ones_like(t) if "mask" in name and isinstance(t, torch.Tensor) and not t.is_floating_point()
                        else t for name, t in zip(names, flat)]
            args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
            want, got = (torch.utils._pytree.tree_leaves(m.run(*args, **kwargs)) for m in (self, identity))
            what = _shape_text(batch, length)
            for i, (w, g) in enumerate(zip(want, got)):
                if isinstance(w, torch.Tensor):  # (in double: numpy has no bfloat16)
                    as_np = [t.detach().cpu().double().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
                             for t in (w, g)]
                    _refuse_unless_equal(str(i), *as_np, what, 1e-2 if w.dtype in (torch.float16, torch.bfloat16)
                                         else 1e-4)

    def validate(self) -> None:
        """Run the graph at the example inputs and, where its dims are dynamic, at other shapes: batch
        1 and 3 for a dynamic batch, a shorter and a longer input for a dynamic sequence (within the
        Dims' ranges; see :meth:`other_shapes`), so that a size baked in by a rewrite is refused here,
        not at the user's."""
        try:
            self.run(*self.args, **self.kwargs)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"rewritten torch graph does not run: {_first_line(e)}") from None
        if self.cached:
            self._validate_cache()
            return
        for batch, length in self.other_shapes():
            args, kwargs = self.inputs_at(batch, length)
            try:
                self.run(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                example = (self._range("batch") or [None] * 3)[2], (self._range("sequence") or [None] * 3)[2]
                raise PruneError(f"rewritten torch graph does not run at {_shape_text(batch, length)} (it was "
                                 f"analysed at {_shape_text(*example)}): {_first_line(e)}") from None

    def _validate_cache(self) -> None:
        """A decoder with a KV cache: a prefill at batch 1 and 3 and two lengths, a decode step and a
        prefill after cached entries."""
        from .ir.from_onnx import CACHE_PROBE_PAST

        seq = self._range("sequence")
        for batch, length, past in ((1, seq[2], 0), (3, max(2, seq[2] - 5), 0), (3, 1, CACHE_PROBE_PAST),
                                    (1, 4, CACHE_PROBE_PAST + 2)):
            args, kwargs = self.cache_inputs_at(batch, length, past)
            try:
                self.run(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise PruneError(f"rewritten torch graph does not run at batch {batch}, {length} new tokens after "
                                 f"{past} cached: {_first_line(e)}") from None

    def _range(self, kind: str) -> tuple[int, int | None, int] | None:
        """(min, max, example size) of the dynamic dim of ``kind`` ("batch", "sequence"), or None
        when it is static."""
        flat = self.flat_args()
        d = next((d for d in self.dims if d[3] == kind), None)
        return None if d is None else (d[4], d[5], int(flat[d[0]].shape[d[1]]))

    def other_shapes(self) -> tuple[tuple[int | None, int | None], ...]:
        """(batch, length) pairs other than the example's that :meth:`validate` runs: batch 1 and 3
        when the batch is dynamic, a length 11 shorter and 14 longer when the sequence is (each
        clipped to its Dim's range); None for a static dim (it keeps the example's size)."""
        batch, seq = self._range("batch"), self._range("sequence")
        if batch is None and seq is None:
            return ()

        def within(v, r):
            return max(r[0], v) if r[1] is None else min(max(r[0], v), r[1])
        batches = [within(b, batch) for b in (1, 3)] if batch else [None, None]
        lengths = [within(max(2, seq[2] - 11), seq), within(seq[2] + 14, seq)] if seq else [None, None]
        example = (batch[2] if batch else None, seq[2] if seq else None)
        return tuple(s for s in dict.fromkeys(zip(batches, lengths)) if s != example)

    def inputs_at(self, batch: int | None = None, length: int | None = None) -> tuple[tuple, dict]:
        """The example inputs at another batch size and/or sequence length (dynamic dims only): rows
        and positions repeated (cycled) from the example's. Returns (args, kwargs)."""
        import torch
        import torch.utils._pytree as pytree

        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        flat = list(flat)
        for i, axis, _, kind, *_ in self.dims:
            size = batch if kind == "batch" else length
            if size is not None and isinstance(flat[i], torch.Tensor):
                t = flat[i]
                flat[i] = t.index_select(axis, torch.arange(size, device=t.device) % t.shape[axis])
        return pytree.tree_unflatten(flat, spec)

    def dynamic_shapes(self):
        """The torch.export ``dynamic_shapes`` of this graph's forward: one ``torch.export.Dim`` per
        symbol of :attr:`dims` (its name, min and max), keyed by the forward's argument names; None
        when every dim is static."""
        if not self.dims:
            return None
        import inspect

        import torch
        import torch.utils._pytree as pytree

        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        made: dict = {}
        per_input: list = [None] * len(flat)
        for i, axis, sym, kind, lo, hi in self.dims:
            if sym not in made:
                name = kind if kind not in {d.__name__ for d in made.values()} else f"{kind}_{sym}"
                made[sym] = torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)
            per_input[i] = {**(per_input[i] or {}), axis: made[sym]}
        args, kwargs = pytree.tree_unflatten(per_input, spec)
        return dict(inspect.signature(self.gm.forward).bind(*args, **kwargs).arguments)

    def export_program(self):
        """torch.export of this GraphModule at the example inputs, with :meth:`dynamic_shapes`. A
        rewritten graph's counts follow N through min/max/round of sizes, which the exporter cannot
        always prove in range for every length: such checks are kept as run-time asserts
        (``prefer_deferred_runtime_asserts_over_guards``) and sizes are not specialised to 0/1
        (``backed_size_oblivious``), so the program keeps the Dims."""
        import torch

        spec = self.dynamic_shapes()
        if spec is None:
            return torch.export.export(self.gm, self.args, self.kwargs, strict=False)
        from torch.fx.experimental import _config as sym_config

        with sym_config.patch(backed_size_oblivious=True):
            return torch.export.export(self.gm, self.args, self.kwargs, dynamic_shapes=spec, strict=False,
                                       prefer_deferred_runtime_asserts_over_guards=True)

    def _exposed(self, outputs: list[str], steps: list, what: list[str]) -> "TorchModel":
        from .backends.fx import expose_fx

        if self.dynamic_tokens:  # compose_cuts counts with the example's N and M
            raise PruneError("exposing token sizes/indices of a torch model whose sequence length is dynamic is not "
                             "supported yet; load it without a Dim on the sequence axis")

        out = TorchModel(expose_fx(self.gm, steps, what), self.args, self.kwargs)
        out.validate()
        return out

    def copy(self) -> "TorchModel":
        import copy

        shared = {id(t): t for t in [*self.gm.parameters(), *self.gm.buffers()]}  # weights shared, graph new
        out = TorchModel(copy.deepcopy(self.gm, shared), self.args, self.kwargs)
        out.cuts, out.static_dests, out.exposed = self.cuts, self.static_dests, self.exposed
        out.reducing, out.no_pt2 = self.reducing, self.no_pt2
        return out

    def reexported(self) -> "TorchModel":
        """Re-export through torch.export (fresh shapes on every node; proves exportability), with
        the same dynamic dims."""
        if not hasattr(self, "_reexported"):
            try:
                ep = self.export_program()
            except Exception as e:  # noqa: BLE001
                raise PruneError(f"torch.export failed: {_first_line(e)}") from None
            gm = _module_of(ep)
            _eliminate_dead_code(gm)
            self._reexported = TorchModel(gm, self.args, self.kwargs)
        return self._reexported

    def kept_indices(self, *args, **kwargs) -> dict:
        """Run once and return {cut tag: kept indices [B, M]} of every cut (a merge: each output
        token's representative)."""
        return {k: v for k, v in self._recorded(*args, **kwargs).items() if not k.endswith("/dest")}

    def merge_maps(self, *args, **kwargs) -> dict:
        """Run once and return {cut tag: dest [B, N]} of every merge (each input token's output
        slot; M = dropped)."""
        return {k[: -len("/dest")]: v for k, v in self._recorded(*args, **kwargs).items() if k.endswith("/dest")}

    def _recorded(self, *args, **kwargs) -> dict:
        from .ops import tokens

        with tokens.recording() as rec:
            self.run(*args, **kwargs)
        return rec

    def run(self, *args, **kwargs):
        import torch

        with torch.no_grad():
            return self.gm(*args, **kwargs)

    def to_torch(self):
        return self.gm

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.pt2`` (``torch.export.save`` of :meth:`export_program`, with the example
        inputs): it loads back (``prunec.load``, ``torch.export.load``) with the same dynamic dims."""
        import io

        import torch

        if self.no_pt2:
            tag, why = self.no_pt2[0]
            raise PruneError(f"cut '{tag}' ({why}) is not written as .pt2: torch.export cannot trace it yet; the "
                             f"rewritten GraphModule runs at every length in this process; for a file, rewrite the "
                             f"model's ONNX export")
        if self.cached and self.cuts:
            raise PruneError("a rewritten decoder with a KV cache is not written as .pt2 yet (torch.export would "
                             "specialise its test of the cache length to the example's); run it in this process "
                             "(prunec.generate) or rewrite the decoder's ONNX export")
        try:
            ep = self.export_program()
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"torch.export of the rewritten graph failed: {_first_line(e)}") from None
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        return atomic_write(path, buf.getvalue())


def _shape_text(batch: int | None, length: int | None) -> str:
    return ", ".join(f"{what} {v}" for what, v in (("batch", batch), ("length", length)) if v is not None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _eliminate_dead_code(gm) -> None:
    """Drop what the outputs do not use (an unused pooler, the last layer of a tower whose
    penultimate hidden states are the output): analysis must see only what matters. fx keeps an
    unused sdpa (an op with dropout counts as impure): dropped too (prunec's graphs run in eval)."""
    def impure(node) -> bool:
        return "scaled_dot_product" not in str(node.target) and node.is_impure()

    gm.graph.eliminate_dead_code(is_impure_node=impure)
    gm.recompile()


def _module_of(ep):
    """``ep.module()``; for a decoder with a KV cache without the input guards: the exporter assumes
    sizes >= 2 (so past + S >= 4), while a prefill has past 0 and a prompt may be 1 token, and the
    graph runs there (as its ONNX export does)."""
    cached = _has_cache(ep.graph_module)
    gm = ep.module(check_guards=not cached)
    if cached:
        gm._forward_pre_hooks.clear()  # the input range checks
    return gm


def _check_structure(proto) -> None:
    """onnx.checker (full check: with shape inference) on a weight-free proto (weights as typed
    inputs); ORT's contrib ops that its optimizer writes in the ONNX domain are checked as custom ops."""
    import onnx

    ort_ops = [i for i, n in enumerate(proto.graph.node)
               if n.domain in ("", "ai.onnx") and n.op_type in _ORT_ONNX_DOMAIN_OPS]
    if ort_ops:
        from .ir.session import copy_proto

        proto = copy_proto(proto)  # (the caller's proto may be what a session is built from)
    for i in ort_ops:
        proto.graph.node[i].domain = "com.microsoft"
    if ort_ops and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"rewritten graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def _truncated(model, output: str):
    """A copy of ``model`` (weights shared) whose one output is the value ``output`` (``ir.from_onnx.truncated``)."""
    from .ir.from_onnx import truncated

    return truncated(model, [output])


def _has_cache(gm) -> bool:
    """Whether an exported graph is a decoder with a KV cache (see ``from_fx.dynamic_dims``)."""
    from .ir.from_fx import dynamic_dims

    try:
        return any(kind == "past" for *_, kind in dynamic_dims(gm))
    except PruneError:
        return False


def _sym_range(gm, name: str, axis: int) -> tuple[int, int | None]:
    """(min, max or None) the exporter allows for the symbolic dim ``axis`` of input ``name``."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)
    d = node.meta["val"].shape[axis]
    vr = d.node.shape_env.var_to_range.get(d.node.expr)
    if vr is None:
        return 2, None
    lo = int(vr.lower) if vr.lower.is_finite else 0
    hi = int(vr.upper) if vr.upper.is_finite else None
    return lo, hi


def load_pt2(path: Path) -> TorchModel:
    """A ``.pt2`` written by ``torch.export.save`` with its example inputs (dynamic dims stay dynamic)."""
    import torch

    if not path.exists():
        raise PruneError(f"no such file: {path}")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"{path} is not a torch.export program ({_first_line(e)[:100]})") from None
    if ep.example_inputs is None:
        raise PruneError(f"{path} was saved without example inputs; prunec needs them to analyse shapes")
    a, kw = ep.example_inputs
    return TorchModel(_module_of(ep), a, kw)


# contrib ops ORT registers in the ONNX domain, which onnx.checker does not know (checked as custom ops)
_ORT_ONNX_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


def _name_nodes(model) -> None:
    """Give every unnamed (or duplicate-named) node a unique name: plans refer to nodes by name."""
    seen = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)


def refresh_meta(gm, flat_args: tuple) -> None:
    """Set every node's ``meta['val']`` to its concrete output, by one run (after a rewrite the
    exporter's shapes downstream of a cut are stale)."""
    import torch
    import torch.fx

    class Fill(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op == "call_function":  # shape/dtype only: meta tensors hold no memory
                n.meta["val"] = torch.utils._pytree.tree_map_only(
                    torch.Tensor, lambda t: torch.empty_like(t, device="meta"), result)
            return result

    with torch.no_grad():
        Fill(gm).run(*flat_args)


def refresh_symbolic_meta(gm) -> None:
    """As :func:`refresh_meta` for a graph with dynamic dims: every node's ``meta['val']`` becomes a
    fake tensor with symbolic sizes again (propagated from the inputs' symbolic sizes, the token
    count after a cut as the expression the kernels compute), so a later pass can tell the sizes
    that spell the token count."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"cannot propagate the symbolic shapes of the rewritten torch graph: {_first_line(e)}") from None


IDENTITY_CHECK_BYTES = 256 << 20  # weights up to which check "auto" compares the plan at keep=1 with the model
LIGHT_PROBE_BYTES = 1 << 30  # weights above which a model is analysed without running them (and checked structurally)
CHECKS = ("auto", "full", "fast", "none")  # load(check=): validation of written ONNX models
INLINE_LIMIT = 1_900_000_000  # bytes of weights above which a model is saved with external data (protobuf: 2 GiB)


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that cannot be written: a missing folder, a
    directory given as the file, a folder that refuses a new file (read-only, permissions)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise PruneError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if not folder.exists():
        raise PruneError(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise PruneError(f"output folder {folder} is not a folder")
    try:  # the only honest test of writability (root ignores permission bits, not read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PruneError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (bytes, or a function that writes to a given binary file object) via a
    temporary file in the same folder and rename: never a partial file at ``path``, also on
    Ctrl-C. The temporary file is written through the descriptor that created it: reopening it
    with truncation would make ext4 write it back to the disk when it is closed (its
    ``auto_da_alloc``), which costs seconds for a model of some hundred MiB."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise PruneError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
                f.write(data)
            else:
                data(f)
        _publish([(tmp, path)])
    except OSError as e:
        raise PruneError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _publish(moves: list[tuple[str, Path]]) -> None:
    """Give each finished temporary file the usual permissions and rename it into place, in
    order; a Ctrl-C arriving meanwhile takes effect after the last rename (so a model and its
    external data appear together)."""
    import signal
    import threading

    umask = os.umask(0)
    os.umask(umask)
    for tmp, dst in moves:
        if dst.is_dir():
            raise IsADirectoryError(21, "is a directory", str(dst))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
    pending = []
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *a: pending.append(a)) if main else None
    try:
        for tmp, dst in moves:
            os.replace(tmp, dst)
    finally:
        if main:
            signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _external_files(model) -> set[str]:
    import onnx_ir as ir

    return {os.path.realpath(v.const_value.path) for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _needs_external(model) -> bool:
    if _external_files(model):
        return True
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None) > INLINE_LIMIT


def _copy_in_kernel(src: str, dst: str) -> None:
    """Copy a file by its data extents with ``copy_file_range``: the kernel moves the bytes (none pass
    through this process) and holes stay holes (a sparse file stays sparse)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # no data after pos (ENXIO): the rest is a hole
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < end:
                done = os.copy_file_range(fi.fileno(), fo.fileno(), end - off, off, off)
                if done <= 0:
                    raise OSError(f"copy_file_range stopped at {off} of {src}")
                off += done
            pos = end


def _save_beside_data(model, path: str, data_name: str) -> bool:
    """Save ``model`` at ``path`` with its external weights where they are: when every external
    tensor lies in one file and the tensors held in memory (prunec's own, small) fit in the proto,
    that file is copied by the kernel as ``data_name`` beside ``path`` (:func:`_copy_in_kernel`) and the
    proto points into the copy at the same offsets: no weight passes through this process. False
    when the model does not qualify (the caller then writes every weight anew)."""
    import shutil

    import onnx_ir as ir

    files = _external_files(model)
    inline = sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
                 if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
    if len(files) != 1 or inline > INLINE_LIMIT:
        return False
    target = os.path.join(os.path.dirname(path), data_name)
    try:
        _copy_in_kernel(next(iter(files)), target)
    except (OSError, AttributeError):  # no copy_file_range / SEEK_DATA (not Linux), or a filesystem without them
        shutil.copyfile(next(iter(files)), target)
    moved = {}
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                moved[v] = t
                v.const_value = ir.ExternalTensor(data_name, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                                  base_dir=os.path.dirname(path))
    try:
        ir.save(model, path)
    finally:
        for v, t in moved.items():
            v.const_value = t
    return True


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Save an onnx-ir model atomically. A model with external data (or weights over 2 GiB) is
    written as ``PATH`` plus its weights in ``PATH.data`` beside it (the input's data file copied by the
    kernel when it holds every weight: :func:`_save_beside_data`; else every weight written anew): both
    are made in a temporary folder beside ``PATH`` and renamed into place together."""
    import shutil

    import onnx_ir as ir

    path = Path(path)
    if not _needs_external(model):  # one protobuf, its weights streamed (:func:`_write_embedded`)
        return atomic_write(path, lambda f: _write_embedded(model, f))
    data = path.with_name(path.name + ".data")
    if os.path.realpath(data) in _external_files(model):
        raise PruneError(f"{data} holds the input model's weights; write the output under another name")
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise PruneError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if not _save_beside_data(model, os.path.join(tmpdir, path.name), data.name):
            ir.save(model, os.path.join(tmpdir, path.name), external_data=data.name, size_threshold_bytes=1024)
        _publish([(os.path.join(tmpdir, data.name), data), (os.path.join(tmpdir, path.name), path)])
    except OSError as e:
        raise PruneError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _write_embedded(model, f) -> None:
    """Write the onnx-ir ``model`` to the binary file ``f`` as one ModelProto without building it in
    memory: the model with its large weights left out (``graph_only_proto``), then each weight as a
    ``graph`` field holding one ``initializer`` with its bytes as ``raw_data``, written from the
    tensor. Protobuf merges repeated occurrences of a message field (the initializers append), so
    every reader (onnx.load, ORT) sees one graph; a weight is copied once (not into a proto and
    again into its serialisation)."""
    import onnx

    from .ir.mapped import encode_varint
    from .ir.session import drop_initializers, graph_only_proto, large_weights

    big = large_weights(model)
    proto = graph_only_proto(model)
    drop_initializers(proto, big)
    f.write(proto.SerializeToString())
    for name, tensor in big.items():
        head = onnx.TensorProto(name=name, data_type=int(tensor.dtype), dims=list(tensor.shape)).SerializeToString()
        data = _raw_bytes(tensor)
        body = len(head) + 1 + len(encode_varint(len(data))) + len(data)  # TensorProto: its header, raw_data (field 9)
        entry = 1 + len(encode_varint(body)) + body  # GraphProto.initializer (field 5)
        f.write(b"\x3a" + encode_varint(entry) + b"\x2a" + encode_varint(body) + head + b"\x4a" + encode_varint(len(data)))
        f.write(data)  # ModelProto.graph is field 7 (0x3a: length-delimited)


def _raw_bytes(tensor):
    """A weight's raw_data: its array's own memory where that is the same bytes (a numpy-backed
    tensor of a whole-byte type: no copy, also for a weight mapped from a file), else ``tobytes()``."""
    import onnx_ir as ir

    if isinstance(tensor, ir.Tensor) and tensor.dtype != ir.DataType.STRING and tensor.dtype.bitwidth >= 8:
        array = tensor.numpy()
        if array.flags.c_contiguous and array.dtype == tensor.dtype.numpy():
            return array.reshape(-1).view(np.uint8)
    return tensor.tobytes()


def load(source, example_inputs=None, *, probe_batch: int = 2, input_shapes: dict | None = None,
         probe_length: int | None = None, dynamic_shapes=None, check: str = "auto") -> Model:
    """Load a model.

    ``source``: a path to an .onnx file or a ``.pt2`` (``torch.export.save`` with example
    inputs), an ``onnx.ModelProto``, or a torch ``nn.Module`` with ``example_inputs`` (a tuple
    of positional args or a dict of keyword args). ``input_shapes`` (ONNX): make dynamic input
    dimensions static, e.g. ``{"input_ids": [None, 128], "attention_mask": [None, 128]}`` (None
    keeps a dimension). ``probe_length`` (ONNX with a dynamic sequence): the length the model is
    analysed at (default 29); spans with absolute ends need it at least that long
    (``span=35:611``: 612). ``check`` (ONNX): how a rewritten model is checked before a pass
    returns it: ``full`` (onnx.checker and ONNX Runtime runs at the probe's and other shapes; on a
    dynamic token count the plan lowered at keep=1 must equal the input model at two of them),
    ``fast`` (onnx.checker, and those runs on the graph up to two layers after the last cut: only
    those layers' weights are read), ``none`` (onnx.checker only), ``auto`` (full, without the keep=1
    comparison over 256 MiB of weights, or onnx.checker only for a model over 1 GiB of weights: such a
    model is also analysed without reading its weights).

    ``dynamic_shapes`` (torch module): torch.export's ``dynamic_shapes`` spec, passed through,
    e.g. ``{"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}`` with
    ``batch = torch.export.Dim("batch", max=64)``, ``seq = torch.export.Dim("seq", min=3,
    max=512)``. Without it the export is static (the model runs only at the example's shapes).
    A dynamic batch (axis 0) stays dynamic. A dynamic sequence (axis 1 of [B, S] / [B, S, C]
    inputs, one Dim shared by every such input) makes the model's token count dynamic, as for an
    ONNX model with a dynamic sequence: every pass but ``pool`` computes its counts at run time. The model is analysed at the example inputs' sizes, so
    give an example length unlike any other width of the model (a prime such as 29) and within
    the Dim's range. Any other dynamic dimension is refused. The rewritten model runs at every
    batch and length in the Dims' ranges and ``save`` writes a ``.pt2`` that keeps them.
    """
    import onnx

    if dynamic_shapes is not None and not hasattr(source, "forward"):
        raise PruneError("dynamic_shapes applies to a torch module (a loaded model keeps its own dims; an ONNX "
                         "model's can be fixed with input_shapes)")
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".pt2"):
        return load_pt2(Path(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise PruneError(f"no such file: {path}")
        if path.is_dir():
            raise PruneError(f"{path} is a directory, not an ONNX file")
        model = _read_onnx(path)
    elif isinstance(source, onnx.ModelProto):
        import onnx_ir as ir

        model = ir.serde.deserialize_model(source)
    else:
        model = None
    if model is not None:
        from .ir.from_onnx import sort_nodes

        sort_nodes(model)
        if input_shapes:
            from .ir.from_onnx import fix_input_shapes

            fix_input_shapes(model, input_shapes)
        return OnnxModel(model, probe_batch=probe_batch, probe_length=probe_length, check=check)
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise PruneError("loading a torch module needs torch installed") from None
    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise PruneError("a torch module needs example_inputs (a tuple of args or a dict of kwargs)")
        if probe_length is not None:
            raise PruneError("probe_length applies to ONNX models; a torch module is analysed at its example inputs' "
                             "length (give dynamic_shapes to keep its dims dynamic)")
        if isinstance(example_inputs, dict):
            return TorchModel.export(source, (), example_inputs, dynamic_shapes=dynamic_shapes)
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        return TorchModel.export(source, tuple(example_inputs), {}, dynamic_shapes=dynamic_shapes)
    raise PruneError(f"cannot load a {type(source).__name__}: give an .onnx path or a torch nn.Module")


def _read_onnx(path: Path):
    import onnx_ir as ir

    from .ir.mapped import load_mapped
    from .ir.session import LARGE_WEIGHT_BYTES

    if path.stat().st_size == 0:
        raise PruneError(f"{path} is empty")
    try:  # inline weights stay in the file, memory-mapped (a text format goes to onnx.load)
        model = ir.load(path) if path.suffix.lower() in TEXT_FORMATS else load_mapped(path)
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"{path} is not a valid ONNX model ({str(e).splitlines()[0][:120]})") from None
    if len(model.graph) == 0 or not model.graph.outputs or not model.opset_imports:
        raise PruneError(f"{path} is not a valid ONNX model (no nodes, outputs or opset)")
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                _map_external(path, v.name, t)  # memory-mapped: read lazily, never copied whole
                if t.nbytes <= LARGE_WEIGHT_BYTES:  # ORT sessions get only larger weights from memory
                    v.const_value = ir.Tensor(t.numpy().copy(), name=v.name)
            elif t is not None and not isinstance(t, ir.Tensor):
                # decode each inline weight once into a numpy-backed tensor: ORT sessions and saving reuse it
                v.const_value = ir.Tensor(t.numpy(), name=v.name)
    return model


TEXT_FORMATS = (".json", ".textproto", ".txtpb", ".prototxt", ".pbtxt", ".onnxtxt")


def _map_external(path: Path, name: str, t) -> None:
    """Check that an initializer's external data is there in full, and map it (no read)."""
    where = f"{path}: initializer '{name}' has its data in '{t.location}'"
    if not os.path.isfile(t.path):
        raise PruneError(f"{where}, which is missing (keep the .data file beside the model)")
    need, have = (t.offset or 0) + (t.length if t.length is not None else t.nbytes), os.path.getsize(t.path)
    if t.length is not None and t.length < t.nbytes:
        raise PruneError(f"{where} with length {t.length}, but its {t.dtype.name} {list(t.shape)} needs {t.nbytes}")
    if need > have:
        raise PruneError(f"{where}, which is truncated: it needs bytes up to {need}, the file has {have}")
    try:
        t.numpy()
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"{where}, which cannot be read ({str(e).splitlines()[0][:120]})") from None


def apply_passes(model: Model, passes, progress=None) -> tuple[Model, list]:
    """Apply ``passes`` in order, planning as many of them as possible on one analysis and
    lowering their cuts in one go (checked once): a pass joins the plan when its cuts all come
    after the cuts planned so far, else the plan so far is lowered and the pass is planned on the
    rewritten model. Returns (the rewritten model, the passes that reduced nothing).
    ``progress``: called with a line of text before each pass."""
    from .passes.base import Plan, PlannedFacts

    model._check_not_exposed()
    idle, cuts, facts, base = [], [], None, model
    for p in passes:
        if progress is not None:
            progress(f"planning {p!r}")
        if facts is None:
            facts = PlannedFacts(base.facts())
        plan = p.plan(base, facts)
        if cuts and plan.cuts and plan.cuts[0].parent is not cuts[-1]:  # not after the cuts so far
            base, cuts = base.lower(Plan(cuts)), []
            facts = PlannedFacts(base.facts())
            plan = p.plan(base, facts)
        for cut in plan.cuts:
            cuts.append(cut)
            facts = facts.after(cut)
        if not any(c.reduces for c in plan.cuts):
            idle.append(p)
    if progress is not None:
        progress("lowering and checking")
    out = base.lower(Plan(cuts)) if cuts else base
    return (out if out is not model else model.copy()), idle


class Pipeline:
    """Apply passes in order (:func:`apply_passes`: one analysis and one check for passes whose
    cuts follow each other). Pure: ``Pipeline([...])(model)`` leaves ``model`` untouched."""

    def __init__(self, passes, expose=()):
        self.passes = list(passes)
        self.expose = expose  # after the passes: Model.expose(what) ("sizes", "indices")

    def __call__(self, model: Model) -> Model:
        model, _ = apply_passes(model, self.passes)
        return model.expose(self.expose) if self.expose else model
