"""prunec: a compiler for training-free token reduction in transformers."""
from . import passes
from .errors import PruneError
from .model import Model, OnnxModel, Pipeline, TorchModel, load

__all__ = ["load", "Pipeline", "Model", "OnnxModel", "TorchModel", "PruneError", "passes"]
__version__ = "0.1.0"
