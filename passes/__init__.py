"""The pipeline stages of gkp-onnx, one module each (installed as `gkp_onnx.passes`)."""
