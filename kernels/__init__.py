"""Fused GPU kernels (installed as ``fsserve.kernels``); each op has a torch reference."""
