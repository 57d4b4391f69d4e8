"""Hardware cost model: bits stored, compression ratio, BOPs, cycles and energy on a reconfigurable PE array."""

from .cost import EnergyTable, PEArray, cost_report, index_bits, layer_costs

__all__ = ["EnergyTable", "PEArray", "cost_report", "index_bits", "layer_costs"]
