"""gkp-onnx: Grouped Kernel Pruning for ONNX models.

    from gkp_onnx import optimize
    model, report = optimize("in.onnx", ratio=0.5)

The names below load on first use, so that the command line starts without importing onnx.
"""

import importlib

_EXPORTS = {"GkpError": "gkp_onnx.errors", "ValidationFailed": "gkp_onnx.errors", "optimize": "gkp_onnx.api",
            "build_pipeline": "gkp_onnx.api", "OptimizeOptions": "gkp_onnx.options", "LayerPlan": "gkp_onnx.plan",
            "Plan": "gkp_onnx.plan", "Report": "gkp_onnx.report"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gkp_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
