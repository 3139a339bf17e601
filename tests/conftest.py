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


def export_dir() -> Path:
    global _EXPORT_DIR
    if _EXPORT_DIR is None:
        import tempfile

        _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="prunec-tests-"))
    return _EXPORT_DIR


@lru_cache(maxsize=None)
def case(name):
    return zoo.CASES[name]()


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
