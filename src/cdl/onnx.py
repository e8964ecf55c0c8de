"""ONNX in and out: ``cdl.onnx.export(model, path_or_file)`` and ``cdl.onnx.load(source)``.

A thin front for :mod:`cdl.io.onnx` (where the layer protocol's ``to_onnx`` and
``from_onnx`` are driven). Importing this module does not import the optional
``onnx`` package; calling a function does (``pip install cdl-cpu[onnx]``).
"""
from .io.onnx import OnnxImportError, export, load, supported_ops, to_model

__all__ = ["export", "load", "supported_ops", "to_model", "OnnxImportError"]
