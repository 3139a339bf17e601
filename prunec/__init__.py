"""prunec: a compiler for training-free token reduction in transformers."""
from . import passes
from .errors import PruneError
from .generate import generate
from .model import Model, OnnxModel, Pipeline, TorchModel, load

__all__ = ["load", "generate", "Pipeline", "Model", "OnnxModel", "TorchModel", "PruneError", "passes"]
__version__ = "0.1.0"
