"""Backends that run a prompt model: torch and onnxruntime share one interface."""
