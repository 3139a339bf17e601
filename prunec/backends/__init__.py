"""Backends that lower a Plan: ``fx`` (torch) and ``onnx``."""
