"""ONNX Runtime sessions and weight-free serialisation of an onnx-ir Model.

Shared by the IR's probe (:func:`prunec.ir.from_onnx.probe_onnx`), the ONNX backend and
the model wrappers; it knows no Plan and no pass.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import PruneError


def providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in avail and _cuda_usable():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise PruneError("the CUDA execution provider is not usable on this machine")
    return ["CPUExecutionProvider"]


def _cuda_usable() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def make_session(model, providers: list[str] | None = None, threads: int | None = None,
                 extra_outputs: list[str] | None = None, quick: bool = False, inspect=None,
                 proto: onnx.ModelProto | None = None):
    """An ORT session with quiet logs and explicit providers.

    ``model``: an onnx-ir Model (its weights are handed to ORT in memory, so only the
    graph is serialized), a ModelProto, a path or bytes. ``extra_outputs``: intermediate
    values to expose as outputs. ``quick``: no graph optimizations (prunec's own probe and
    check runs: faster to build, run a few times); an onnx-ir model's large weights then become
    typed graph inputs fed at each run from their arrays (:class:`WeightFedSession`), which ORT
    reads in place, where initializers handed over in memory are copied at every session build.
    ``inspect`` (with an onnx-ir ``model``): called with the proto the session is built from, its
    weights as typed inputs, before the session is built (onnx.checker on the same serialisation).
    ``proto`` (with an onnx-ir ``model`` and ``quick``): ``graph_only_proto(model, as_inputs=True)``
    that the caller made already (for shape inference, say); the session is built from it (it gains
    the extra outputs) where every large weight can be fed, so the graph is serialised once.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors surface as exceptions; keep ORT from printing them too
    if quick:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_mem_reuse = False  # ORT's memory planner takes seconds on big graphs; one run needs none
    if threads:
        so.intra_op_num_threads = threads
    keepalive: list = []
    fed: dict[str, np.ndarray] = {}
    if isinstance(model, ir.Model):
        weights = large_weights(model)
        fed = {n: np.ascontiguousarray(weights[n].numpy()) for n in _feedable(model, weights)} if quick else {}
        if proto is None or len(fed) < len(weights) or not quick:
            proto = graph_only_proto(model, so, keepalive=keepalive, as_inputs=set(fed))
        if inspect is not None:
            if len(fed) < len(weights):  # weights ORT holds in memory: typed inputs in the checker's copy
                copy = copy_proto(proto)
                _weights_as_inputs(copy, {n: c for n, c in weights.items() if n not in fed})
                inspect(copy)
            else:
                inspect(proto)
        model = proto
    if extra_outputs:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        known = {o.name for o in model.graph.output}
        for name in extra_outputs:
            if name not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        # drop only the exposed values' own shape records: the others keep the optimizer's view
        # (and so its fusions and float results) the same as in a session without extra outputs
        kept = [vi for vi in model.graph.value_info if vi.name not in set(extra_outputs)]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    sess = ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])
    sess._prunec_keepalive = keepalive  # ORT reads the weights in place: keep the buffers alive
    return WeightFedSession(sess, fed) if fed else sess


class WeightFedSession:
    """An ORT session whose graph takes the model's large weights as inputs: :meth:`run` feeds
    them (``weights``: name -> array, read in place) beside the caller's feeds; the weights are
    not among :meth:`get_inputs`. Everything else is the ORT session's."""

    def __init__(self, session, weights: dict[str, np.ndarray]):
        self._session, self.weights = session, weights

    def run(self, output_names, input_feed: dict, run_options=None) -> list:
        return self._session.run(output_names, {**input_feed, **self.weights}, run_options)

    def get_inputs(self) -> list:
        return [i for i in self._session.get_inputs() if i.name not in self.weights]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def _feedable(model: ir.Model, weights: dict) -> list[str]:
    """The ``weights`` every reader of which is a standard ONNX op: ORT's contrib kernels may want
    their weights as constant initializers (prepacked), so those stay initializers."""
    def standard(v: ir.Value) -> bool:
        return all(u.domain in ("", "ai.onnx") for u, _ in v.uses())

    return [n for n in weights if standard(model.graph.initializers[n])]


_IN_MEMORY = "__prunec_in_memory__"
LARGE_WEIGHT_BYTES = 1024  # initializers larger than this are handed to ORT in memory, not serialised


def large_weights(model: ir.Model) -> dict:
    """The initializers over :data:`LARGE_WEIGHT_BYTES`, name -> tensor: what :func:`graph_only_proto`
    leaves out."""
    return {n: v.const_value for n, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.nbytes > LARGE_WEIGHT_BYTES}


def graph_only_proto(model: ir.Model, so=None, as_inputs: bool | set = False,
                     keepalive: list | None = None) -> onnx.ModelProto:
    """The model as a proto without its large weights (cheap to serialize).

    ``as_inputs``: True, or the names of some large weights: those become typed graph inputs
    (for onnx.checker, or fed at run time). With ``so`` (ORT SessionOptions) the other large
    weights are registered as in-memory external initializers.
    """
    saved = large_weights(model)
    big = {n: model.graph.initializers[n] for n in saved}
    try:
        for n, v in big.items():
            c = saved[n]
            v.const_value = ir.ExternalTensor(_IN_MEMORY, 0, c.nbytes, c.dtype, shape=c.shape, name=n)
        proto = ir.serde.serialize_model(model)
    finally:
        for n, v in big.items():
            v.const_value = saved[n]
    inputs = saved if as_inputs is True else {n: saved[n] for n in as_inputs or ()}
    held = [n for n in big if n not in inputs]
    if so is not None and held:
        import onnxruntime as ort

        arrays = [np.ascontiguousarray(saved[n].numpy()) for n in held]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        so.add_external_initializers(held, values)
        if keepalive is not None:
            keepalive.extend(arrays + values)
    _weights_as_inputs(proto, inputs)
    return proto


def copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``proto``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def drop_initializers(proto: onnx.ModelProto, names) -> None:
    """Remove the initializers ``names`` (a set or dict of names) from ``proto``'s graph."""
    keep = [t for t in proto.graph.initializer if t.name not in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _weights_as_inputs(proto: onnx.ModelProto, weights: dict) -> None:
    """Make ``weights`` (name -> tensor) typed graph inputs of ``proto`` instead of initializers."""
    if not weights:
        return
    drop_initializers(proto, weights)
    for n, c in weights.items():
        proto.graph.input.append(onnx.helper.make_tensor_value_info(n, int(c.dtype), list(c.shape)))
