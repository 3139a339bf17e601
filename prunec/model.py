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

    def facts(self):
        """Analysis facts (attention sites, streams, prefix, ...), computed once."""
        if self._facts is None:
            from .passes.analysis.blocks import analyze

            self._facts = analyze(self.graph())
        return self._facts


class OnnxModel(Model):
    kind = "onnx"

    def __init__(self, model, feeds: dict[str, np.ndarray] | None = None, probe_batch: int = 2):
        super().__init__()
        import onnx_ir as ir

        from .ir.from_onnx import example_inputs

        self.model: ir.Model = model
        _name_nodes(model)
        self.probe_batch = probe_batch
        self.feeds = feeds if feeds is not None else example_inputs(model, probe_batch)
        self._session = None

    def graph(self):
        if self._graph is None:
            from .ir.from_onnx import from_onnx, probe_onnx

            try:
                probe = probe_onnx(self.model, self.feeds)
            except PruneError:
                raise
            except Exception as e:  # noqa: BLE001
                bf16 = _bfloat16_value(self.model)
                if bf16 is not None:
                    raise PruneError(f"'{bf16}' is bfloat16 and ONNX Runtime (CPU) cannot run this bfloat16 graph for "
                                     f"the probe prunec needs; convert the model to float16 or float32") from None
                raise PruneError(f"ONNX Runtime cannot run the model: {str(e).splitlines()[0]}") from None
            self._graph = from_onnx(self.model, probe, self.feeds)
        return self._graph

    def lower(self, plan) -> "OnnxModel":
        from .backends.onnx import lower_onnx

        out = OnnxModel(lower_onnx(self.model, plan), self.feeds, self.probe_batch)
        out.validate()
        return out

    def proto(self):
        import onnx_ir as ir

        return ir.serde.serialize_model(self.model)

    def validate(self) -> None:
        """Full onnx.checker check and one ORT run on the probe inputs."""
        import onnx

        from .backends.onnx import graph_only_proto

        proto = graph_only_proto(self.model, as_inputs=True)  # weights as typed inputs: same check, no copy
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"rewritten graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        try:
            from .backends.onnx import make_session

            make_session(self.model, quick=True).run(None, self.feeds)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"rewritten graph does not run in ONNX Runtime: {str(e).splitlines()[0]}") from None

    def session(self, device: str = "cpu", threads: int | None = None):
        from .backends.onnx import make_session, providers

        return make_session(self.model, providers(device), threads)

    def run(self, feeds: dict[str, Any], outputs: list[str] | None = None, device: str = "cpu") -> list[np.ndarray]:
        if self._session is None or device != "cpu":
            sess = self.session(device)
            if device == "cpu":
                self._session = sess
        else:
            sess = self._session
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in feeds.items()}
        return sess.run(outputs, feeds)

    def save(self, path: str | os.PathLike) -> Path:
        import onnx_ir as ir

        return atomic_write(path, lambda tmp: ir.save(self.model, tmp))

    def kept_indices(self, feeds: dict[str, Any]) -> dict:
        """Run once and return {cut tag: kept indices [B, M]} of every cut (a merge: each output
        token's representative)."""
        return self._named_outputs(feeds, "/keep_idx")

    def merge_maps(self, feeds: dict[str, Any]) -> dict:
        """Run once and return {cut tag: dest [B, N]} of every merge."""
        return self._named_outputs(feeds, "/dest")

    def _named_outputs(self, feeds: dict[str, Any], suffix: str) -> dict:
        from .backends.onnx import make_session

        names = [o.name for n in self.model.graph for o in n.outputs if o.name.endswith(suffix)]
        sess = make_session(self.model, extra_outputs=names)
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in feeds.items()}
        res = sess.run(names, feeds)
        return {name[: -len(suffix)]: r for name, r in zip(names, res)}

    def to_torch(self):
        """A torch module running this graph in ONNX Runtime (the ONNX path)."""
        from .backends.torch_ort import OrtModule

        return OrtModule(self)


def _bfloat16_value(model) -> str | None:
    """The name of a bfloat16 graph input or weight, if any."""
    import onnx_ir as ir

    for v in list(model.graph.inputs) + list(model.graph.initializers.values()):
        if v.dtype == ir.DataType.BFLOAT16:
            return v.name
    return None


class TorchModel(Model):
    kind = "torch"

    def __init__(self, gm, args: tuple, kwargs: dict):
        super().__init__()
        self.gm = gm
        self.args, self.kwargs = args, kwargs

    @classmethod
    def export(cls, module, args: tuple, kwargs: dict | None = None) -> "TorchModel":
        import torch

        kwargs = kwargs or {}
        try:
            ep = torch.export.export(module.eval() if hasattr(module, "eval") else module, args, kwargs, strict=False)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"torch.export failed: {str(e).splitlines()[0]}") from None
        gm = ep.module()
        gm.graph.eliminate_dead_code()  # e.g. an unused pooler: analysis must see what the outputs use
        gm.recompile()
        return cls(gm, args, kwargs)

    def flat_args(self) -> list:
        import torch.utils._pytree as pytree

        return pytree.tree_flatten((self.args, self.kwargs))[0]

    def graph(self):
        if self._graph is None:
            from .ir.from_fx import from_fx, probe_fx

            gm = self.gm
            if any(n.op == "call_function" and "val" not in n.meta for n in gm.graph.nodes):
                refresh_meta(gm, tuple(self.flat_args()))  # a rewritten graph: shapes changed
            g = from_fx(gm)
            probe_fx(g, gm, tuple(self.flat_args()))
            self._graph = g
        return self._graph

    def lower(self, plan) -> "TorchModel":
        from .backends.fx import lower_fx

        gm = lower_fx(self.gm, plan)
        out = TorchModel(gm, self.args, self.kwargs)
        try:
            out.run(*self.args, **self.kwargs)
        except Exception as e:  # noqa: BLE001
            raise PruneError(f"rewritten torch graph does not run: {str(e).splitlines()[0]}") from None
        return out

    def reexported(self) -> "TorchModel":
        """Re-export through torch.export (fresh shapes on every node; proves exportability)."""
        if not hasattr(self, "_reexported"):
            self._reexported = TorchModel.export(self.gm, self.args, self.kwargs)
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
        import io

        import torch

        ep = torch.export.export(self.gm, self.args, self.kwargs, strict=False)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        return atomic_write(path, buf.getvalue())


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


def atomic_write(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (bytes, or a function that writes a given path) via a temporary file in
    the same folder and rename: never a partial file at ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
                f.write(data)
        if not isinstance(data, (bytes, bytearray)):
            data(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(source, example_inputs=None, *, probe_batch: int = 2, input_shapes: dict | None = None) -> Model:
    """Load a model.

    ``source``: a path to an .onnx file, an ``onnx.ModelProto``, or a torch
    ``nn.Module`` with ``example_inputs`` (a tuple of positional args or a dict of
    keyword args). ``input_shapes`` (ONNX): make dynamic input dimensions static, e.g.
    ``{"input_ids": [None, 128], "attention_mask": [None, 128]}`` (None keeps a dimension).
    """
    import onnx

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
        if input_shapes:
            from .ir.from_onnx import fix_input_shapes

            fix_input_shapes(model, input_shapes)
        return OnnxModel(model, probe_batch=probe_batch)
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise PruneError("loading a torch module needs torch installed") from None
    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise PruneError("a torch module needs example_inputs (a tuple of args or a dict of kwargs)")
        if isinstance(example_inputs, dict):
            return TorchModel.export(source, (), example_inputs)
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        return TorchModel.export(source, tuple(example_inputs), {})
    raise PruneError(f"cannot load a {type(source).__name__}: give an .onnx path or a torch nn.Module")


def _read_onnx(path: Path):
    import onnx_ir as ir

    if path.stat().st_size == 0:
        raise PruneError(f"{path} is empty")
    try:
        model = ir.load(path)  # external data (model.onnx.data) is memory-mapped
    except Exception as e:  # noqa: BLE001
        raise PruneError(f"{path} is not a valid ONNX model ({str(e).splitlines()[0][:120]})") from None
    if len(model.graph) == 0 or not model.graph.outputs or not model.opset_imports:
        raise PruneError(f"{path} is not a valid ONNX model (no nodes, outputs or opset)")
    for v in model.graph.initializers.values():
        # decode each weight once into a numpy-backed tensor: ORT sessions and saving reuse it
        if v.const_value is not None and not isinstance(v.const_value, ir.Tensor):
            v.const_value = ir.Tensor(v.const_value.numpy(), name=v.name)
    return model


class Pipeline:
    """Apply passes in order. Pure: ``Pipeline([...])(model)`` leaves ``model`` untouched."""

    def __init__(self, passes):
        self.passes = list(passes)

    def __call__(self, model: Model) -> Model:
        for p in self.passes:
            model = p.apply(model)
        return model
