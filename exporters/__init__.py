"""Exporters (installed as ``fsserve.exporters``): ONNX, TensorRT, Triton model repository."""
