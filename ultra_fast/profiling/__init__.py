"""Performance tooling: FLOP counts of the engine, peak memory, and the ``ultra-fast bench`` measurements."""
from .bench import format_table, parse_targets, run_bench, stride_targets
from .flops import FlopCount, explain_flops, matmul_rate
from .memory import PeakMemory

__all__ = ["FlopCount", "explain_flops", "matmul_rate", "PeakMemory", "run_bench", "format_table",
           "parse_targets", "stride_targets"]
