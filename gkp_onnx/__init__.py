"""gkp-onnx: Grouped Kernel Pruning for ONNX models."""

from gkp_onnx.errors import GkpError, ValidationFailed
from gkp_onnx.api import build_pipeline, optimize
from gkp_onnx.options import OptimizeOptions
from gkp_onnx.plan import LayerPlan, Plan
from gkp_onnx.report import Report

__all__ = ["GkpError", "LayerPlan", "OptimizeOptions", "Plan", "Report", "ValidationFailed", "build_pipeline", "optimize"]
__version__ = "0.1.0"
