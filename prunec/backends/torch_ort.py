"""A torch ``nn.Module`` that runs an ONNX model in ONNX Runtime (``OnnxModel.to_torch``)."""
from __future__ import annotations

import torch


class OrtModule(torch.nn.Module):
    """forward(*tensors) feeds the graph inputs in order and returns a tuple of tensors."""

    def __init__(self, model, device: str = "cpu"):
        super().__init__()
        self._model = model
        self._session = model.session(device)
        self._names = [i.name for i in self._session.get_inputs()]

    def forward(self, *args, **kwargs):
        feeds = dict(zip(self._names, args))
        feeds.update(kwargs)
        feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        outs = self._session.run(None, feeds)
        return tuple(torch.from_numpy(o) for o in outs)
