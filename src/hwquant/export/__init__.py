"""Integer deployment: the bit-exact integer model, ONNX QDQ export, golden vectors for RTL, RTL rounding units.

``integer_model(qmodel, example)`` is the reference every other artefact is checked against: the golden
vectors replay it from files, the ONNX graph runs it in onnxruntime.  :mod:`hwquant.export.rtl` (Amaranth)
is imported on demand.
"""

from .golden import GoldenError, replay, verify, write_golden
from .integer import IntegerModel, IntOp, compare, integer_model, requant_params, rshift_rne
from .onnx import check_onnx, to_onnx
from .qonnx import check_qonnx, to_qonnx

__all__ = ["GoldenError", "IntOp", "IntegerModel", "check_onnx", "compare", "integer_model", "replay",
           "requant_params", "rshift_rne", "to_onnx", "to_qonnx", "check_qonnx", "verify", "write_golden"]
