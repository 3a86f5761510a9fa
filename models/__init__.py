"""Benchmark-zoo model definitions and ONNX export (installed as `gkp_onnx.models`)."""
