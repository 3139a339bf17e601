import logging
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")

import zoo  # noqa: E402

_EXPORT_DIR = None


def pytest_addoption(parser):
    parser.addoption("--fuzz-n", type=int, default=None,
                     help="test_fuzz.py: number of random graph x pass cases (default 40)")
    parser.addoption("--forms-all", action="store_true", default=False,
                     help="test_forms.py: every model x form x pass (slow) instead of the default subset; "
                          "or set PRUNEC_FORMS_ALL=1")


def export_dir() -> Path:
    global _EXPORT_DIR
    if _EXPORT_DIR is None:
        import tempfile

        _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="prunec-tests-"))
    return _EXPORT_DIR


@lru_cache(maxsize=None)
def case(name):
    return {**zoo.CASES, **zoo.EXTRA_CASES, **zoo.MORE}[name]()


@lru_cache(maxsize=None)
def onnx_path(name, exporter):
    c = case(name)
    path = export_dir() / f"{name}.{exporter}.onnx"
    try:
        return zoo.export_onnx(c, exporter, path)
    except Exception as e:  # noqa: BLE001
        return e


def onnx_file(name, exporter):
    p = onnx_path(name, exporter)
    if isinstance(p, Exception):
        if name == "hf_llama" and exporter == "torchscript17":
            pytest.skip(f"the TorchScript exporter cannot export HF Llama here: {str(p).splitlines()[0][:100]}")
        raise p
    return p


def load(name, form, inputs=None):
    """A test model as a torch module (form "torch", traced at ``inputs``) or an ONNX export."""
    import prunec

    c = case(name)
    if form == "torch":
        return prunec.load(c.module, inputs if inputs is not None else c.inputs)
    return prunec.load(onnx_file(name, form))


def torch_outputs(out):
    """Float tensors of a (nested) torch output as numpy arrays, in pytree order."""
    import torch
    import torch.utils._pytree as pytree

    return [t.detach().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run(model, inputs):
    """Flat list of float outputs as numpy arrays, for either backend."""
    if model.kind == "torch":
        return torch_outputs(model.run(**inputs))
    return [o for o in model.run(inputs) if o.dtype.kind == "f"]


def kept(model, inputs):
    return model.kept_indices(**inputs) if model.kind == "torch" else model.kept_indices(inputs)


def onnx_block_tail(nodes: list, x: str, i: int) -> str:
    """Append the rest of hand-built block ``i`` after its attention output ``a{i}``: output
    projection ``Wo{i}``, residual add, ReLU MLP ``Wm{i}`` and its residual add. Returns the
    block's output name ``x{i+1}``."""
    from onnx import helper

    nodes.append(helper.make_node("MatMul", [f"a{i}", f"Wo{i}"], [f"o{i}"]))
    nodes.append(helper.make_node("Add", [x, f"o{i}"], [f"r{i}"]))
    nodes.append(helper.make_node("MatMul", [f"r{i}", f"Wm{i}"], [f"m{i}"]))
    nodes.append(helper.make_node("Relu", [f"m{i}"], [f"g{i}"]))
    nodes.append(helper.make_node("Add", [f"r{i}", f"g{i}"], [f"x{i + 1}"]))
    return f"x{i + 1}"
