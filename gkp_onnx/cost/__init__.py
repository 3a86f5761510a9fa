"""Cost models for the group-count choice: analytic (default), measured (onnxruntime
micro-benchmarks, cached), and the NCHWc block rules both use."""

from gkp_onnx.cost.analytic import AnalyticCpuCost, CostModel, gathers_left
from gkp_onnx.cost.measured import MeasuredCost
from gkp_onnx.cost.nchwc import nchwc_block_size, probe_nchwc_block

__all__ = ["AnalyticCpuCost", "CostModel", "MeasuredCost", "gathers_left",
           "nchwc_block_size", "probe_nchwc_block"]
