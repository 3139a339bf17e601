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
                 extra_outputs: list[str] | None = None, quick: bool = False, inspect=None):
    """An ORT session with quiet logs and explicit providers.

    ``model``: an onnx-ir Model (its weights are handed to ORT in memory, so only the
    graph is serialized), a ModelProto, a path or bytes. ``extra_outputs``: intermediate
    values to expose as outputs. ``quick``: basic graph optimizations only (prunec's own
    probe and check runs: faster to build, run once). ``inspect`` (with an onnx-ir ``model``):
    called with a copy of the proto the session is built from, its weights as typed inputs,
    before the session is built (onnx.checker on the same serialisation).
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
    if isinstance(model, ir.Model):
        weights = large_weights(model) if inspect is not None else {}
        model = graph_only_proto(model, so, keepalive=keepalive)
        if inspect is not None:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            _weights_as_inputs(copy, weights)
            inspect(copy)
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
    return sess


_IN_MEMORY = "__prunec_in_memory__"
LARGE_WEIGHT_BYTES = 1024  # initializers larger than this are handed to ORT in memory, not serialised


def large_weights(model: ir.Model) -> dict:
    """The initializers over :data:`LARGE_WEIGHT_BYTES`, name -> tensor: what :func:`graph_only_proto`
    leaves out."""
    return {n: v.const_value for n, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.nbytes > LARGE_WEIGHT_BYTES}


def graph_only_proto(model: ir.Model, so=None, as_inputs: bool = False, keepalive: list | None = None) -> onnx.ModelProto:
    """The model as a proto without its large weights (cheap to serialize).

    With ``so`` (ORT SessionOptions) the weights are registered as in-memory external
    initializers; with ``as_inputs`` they become typed graph inputs (for onnx.checker).
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
    if so is not None and big:
        import onnxruntime as ort

        arrays = [np.ascontiguousarray(saved[n].numpy()) for n in big]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        so.add_external_initializers(list(big), values)
        if keepalive is not None:
            keepalive.extend(arrays + values)
    if as_inputs:
        _weights_as_inputs(proto, saved)
    return proto


def _weights_as_inputs(proto: onnx.ModelProto, weights: dict) -> None:
    """Make ``weights`` (name -> tensor) typed graph inputs of ``proto`` instead of initializers."""
    if not weights:
        return
    keep = [t for t in proto.graph.initializer if t.name not in weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for n, c in weights.items():
        proto.graph.input.append(onnx.helper.make_tensor_value_info(n, int(c.dtype), list(c.shape)))
